import sys

from fastkern.bench.cli import main

sys.exit(main())
