"""python -m fastkern info"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"] or not argv:
        import fastkern

        fastkern.info()
        return 0
    print("usage: python -m fastkern info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
