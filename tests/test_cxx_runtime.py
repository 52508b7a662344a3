"""The check that refuses (setup.py) and reports (import, `python -m fastkern info`) a build of
fastkern._C carrying a private copy of the C++ runtime (fastkern/_elf.py)."""
import shutil
import subprocess
import sys

import pytest

from fastkern import _elf
from fastkern._ext import _C

SRC = r"""
#include <sstream>
#include <string>
std::string shape_message(long n) { std::ostringstream os; os << "shape [" << n << "]"; return os.str(); }
"""


def _shared_object(tmp_path, name, flags):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    src = tmp_path / "lib.cpp"
    src.write_text(SRC)
    out = tmp_path / name
    r = subprocess.run([cxx, "-shared", "-fPIC", "-O1", str(src), "-o", str(out)] + flags,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("%s cannot link %s: %s" % (cxx, " ".join(flags) or "a shared object", r.stderr[-300:]))
    return str(out)


def test_shared_runtime_passes(tmp_path):
    lib = _shared_object(tmp_path, "shared.so", [])
    needed = _elf.needed_libraries(lib)
    assert any(n.startswith("libstdc++") for n in needed), needed
    assert _elf.cxx_runtime_problem(lib) is None


def test_private_runtime_is_named(tmp_path):
    lib = _shared_object(tmp_path, "private.so", ["-static-libstdc++"])
    needed = _elf.needed_libraries(lib)
    assert needed and not any(n.startswith("libstdc++") for n in needed), needed
    msg = _elf.cxx_runtime_problem(lib)
    assert msg and lib in msg and "private copy of libstdc++" in msg and "CXX=" in msg


def test_not_an_elf_object_says_nothing(tmp_path):
    for data in (b"", b"\x7fELF", b"not an elf file at all" * 10):
        f = tmp_path / "x.bin"
        f.write_bytes(data)
        assert _elf.needed_libraries(str(f)) is None
        assert _elf.cxx_runtime_problem(str(f)) is None


def test_truncated_elf_says_nothing(tmp_path):
    lib = _shared_object(tmp_path, "shared.so", [])
    data = open(lib, "rb").read()
    assert _elf.needed_libraries(lib)  # whole: readable
    for cut in (64, len(data) // 2, len(data) - 8):
        f = tmp_path / "cut.so"
        f.write_bytes(data[:cut])
        assert _elf.needed_libraries(str(f)) is None
        assert _elf.cxx_runtime_problem(str(f)) is None


@pytest.mark.skipif(_C is None, reason="fastkern._C is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check: Linux only")
def test_this_build_loads_the_shared_runtime():
    assert _elf.cxx_runtime_problem(_C.__file__) is None, _elf.needed_libraries(_C.__file__)
