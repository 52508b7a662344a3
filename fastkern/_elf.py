"""The shared libraries an ELF shared object names as needed (its DT_NEEDED entries).

Used to catch a build of ``fastkern._C`` that carries a private copy of the C++ runtime: a
compiler toolset whose libstdc++ differs from the system's (a Red Hat gcc-toolset on Ubuntu,
or ``-static-libstdc++``) can link the stream code into the extension instead of naming
``libstdc++.so.6``. torch runs on the shared copy; the two copies do not share their locale
state, so formatting a number inside the extension (every error message that names a shape)
prints garbage or crashes the process. Seen on a GPU machine's image (bench/results/gpu-h200.md).

Only the standard library is imported here: setup.py loads this file before torch's build runs.
"""
import struct

_SHT_DYNAMIC = 6
_DT_NULL, _DT_NEEDED = 0, 1


def needed_libraries(path):
    """DT_NEEDED names of the 64-bit little-endian ELF file at ``path``, in order; None when the
    file is not such an ELF object, is truncated or malformed, or has no dynamic section
    (nothing can be said about it)."""
    try:
        return _needed(path)
    except (struct.error, IndexError):
        return None


def _needed(path):
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        if shoff == 0 or shnum == 0 or shentsize < 64:
            return None
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        if len(table) < shentsize * shnum:
            return None
        sections = []  # (type, file offset, size, link)
        for i in range(shnum):
            _, typ, _, _, offset, size, link = struct.unpack_from("<IIQQQQI", table, i * shentsize)
            sections.append((typ, offset, size, link))
        dynamic = [s for s in sections if s[0] == _SHT_DYNAMIC]
        if not dynamic or dynamic[0][3] >= len(sections):
            return None
        _, offset, size, link = dynamic[0]
        f.seek(offset)
        entries = f.read(size)
        _, str_offset, str_size, _ = sections[link]
        f.seek(str_offset)
        strings = f.read(str_size)
        if len(entries) < size or len(strings) < str_size:
            return None
    names = []
    for j in range(0, len(entries) - 15, 16):
        tag, value = struct.unpack_from("<qQ", entries, j)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED and value < len(strings):
            end = strings.find(b"\0", value)
            names.append(strings[value:end if end >= 0 else None].decode("utf-8", "replace"))
    return names


def cxx_runtime_problem(path):
    """A message when the ELF shared object at ``path`` names no shared C++ runtime
    (libstdc++ or libc++) among its needed libraries, else None (also when it cannot tell)."""
    needed = needed_libraries(path)
    if needed is None or any(n.startswith(("libstdc++", "libc++")) for n in needed):
        return None
    return (
        "%s does not load the shared C++ runtime (its needed libraries: %s): it was linked with "
        "a private copy of libstdc++, which does not share its locale state with the copy torch "
        "uses, so formatting a number in one of its messages can crash the process. Rebuild it "
        "with the system compiler, e.g. `CXX=/usr/bin/g++ CC=/usr/bin/gcc pip install "
        "--no-build-isolation -e .`." % (path, ", ".join(needed) or "none")
    )
