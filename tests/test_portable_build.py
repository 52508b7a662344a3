"""The native sources compile for a CPU without the x86 paths (DESIGN §7: a portable path on any
machine): every C++ source of fastkern._C's CPU side, syntax only, with FASTKERN_PORTABLE_ONLY
(csrc/cpu/isa.h then sets FASTKERN_X86 to 0, as on a non-x86 compiler). x86-only code outside its
guards fails here, on an x86 machine, before a non-x86 build meets it."""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) + [
    os.path.join(ROOT, "csrc", "cpu_entry.cpp"), os.path.join(ROOT, "csrc", "autograd.cpp")]


def _std():
    # the standard setup.py builds with: C++20 where torch's headers ask for it
    all_h = os.path.join(cpp_extension.include_paths()[1], "torch", "all.h")
    try:
        with open(all_h) as f:
            return "-std=c++20" if "202002L" in f.read() else "-std=c++17"
    except OSError:
        return "-std=c++20"


def test_cpu_sources_compile_without_x86_paths():
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    if not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("the C++ sources are not in this checkout")
    flags = [_std(), "-fsyntax-only", "-DFASTKERN_PORTABLE_ONLY", "-I" + os.path.join(ROOT, "csrc"),
             "-I" + sysconfig.get_paths()["include"]] + ["-I" + p for p in cpp_extension.include_paths()]

    def compile_one(src):
        r = subprocess.run([cxx] + flags + [src], capture_output=True, text=True)
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        return src, r.returncode, errors

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failed = {os.path.relpath(src, ROOT): errors[:5] for src, rc, errors in results if rc != 0}
    assert not failed, "sources that do not compile without the x86 paths: %s" % failed
