"""Build script for fastkern and its native extension ``fastkern._C``.

Build switches (environment variables):
  FASTKERN_CUDA=1|0        build the CUDA kernels (default: when torch is a CUDA
                           build and a GPU is visible)
  TORCH_CUDA_ARCH_LIST     CUDA archs to build for (default "8.0;8.6;8.9;9.0a")
  FASTKERN_DEBUG=1         -O0 -g, for debugging kernels
  MAX_JOBS                 parallel compile jobs (ninja); default from free memory
"""
import glob
import os
import re
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "fastkern", "version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def want_cuda():
    flag = os.environ.get("FASTKERN_CUDA")
    if flag is not None:
        return flag not in ("0", "", "false", "False")
    return torch.version.cuda is not None and torch.cuda.is_available()


def default_max_jobs():
    # A torch C++ translation unit needs about 1.5 GB to compile; more parallel
    # jobs than memory allows would push a small machine into swap or the OOM killer.
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return str(os.cpu_count() or 1)
    return str(max(1, min(os.cpu_count() or 1, int(avail // (1.5 * 2**30)))))


def cxx_std():
    # torch >= 2.14's headers refuse anything older than C++20 (torch/all.h has an
    # #error); older torch builds with C++17. The CUDA kernels compile under both.
    all_h = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "api",
                         "include", "torch", "all.h")
    try:
        with open(all_h) as f:
            return "-std=c++20" if "202002L" in f.read() else "-std=c++17"
    except OSError:
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def openmp_backend():
    """True when torch's ATen parallel backend is OpenMP (the pip wheels on Linux)."""
    info = torch.__config__.parallel_info()
    return "parallel backend: OpenMP" in info and sys.platform.startswith("linux")


def extension():
    debug = os.environ.get("FASTKERN_DEBUG") == "1"
    with_cuda = want_cuda()
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0a")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", default_max_jobs())

    sources = ["csrc/registration.cpp", "csrc/autograd.cpp", "csrc/cpu_entry.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # Baseline x86-64 code only: AVX2/FMA/AVX-512 kernels carry their own
    # target attributes and are chosen at run time, so one wheel runs anywhere.
    cxx = opt + [cxx_std(), "-fno-math-errno"]
    # at::parallel_for is a header template: under torch's OpenMP backend its
    # `omp parallel` is compiled into this extension, and without -fopenmp it
    # silently runs every kernel on one thread. Linking libgomp.so.1 binds to
    # the copy torch has already loaded (same soname), so one pool serves both.
    link = []
    if openmp_backend():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = [
        ("FASTKERN_TORCH_VERSION", '"%s"' % torch.__version__),
        ("FASTKERN_VERSION", '"%s"' % read_version()),
        ("FASTKERN_WITH_CUDA", "1" if with_cuda else "0"),
        ("FASTKERN_CUDA_ARCHS", '"%s"' % (archs if with_cuda else "")),
    ]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fastkern._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = opt + [
        cxx_std(),
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + (["-Xcompiler", "-fopenmp"] if link else [])
    return cpp_extension.CUDAExtension(
        "fastkern._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


def _load_elf_check():
    # fastkern/_elf.py by path: importing the package here would try to load the extension
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastkern_elf", os.path.join(ROOT, "fastkern", "_elf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cxx_runtime_problem


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's build, then a refusal of an extension that carries a private copy of the C++
    runtime (a compiler toolset other than the system's can link one in; see fastkern/_elf.py):
    its kernels would work, but its error messages would crash the process."""

    def run(self):
        super().run()
        check = _load_elf_check()
        for ext in self.extensions:
            problem = check(self.get_ext_fullpath(ext.name))
            if problem:
                raise RuntimeError("fastkern build: " + problem)


def torch_requirement():
    # The binary is tied to the torch it was compiled against; pin it so pip
    # does not pair this build with another torch.
    return "torch==%s" % torch.__version__.split("+")[0]


setup(
    version=read_version(),
    install_requires=[torch_requirement(), "numpy"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
)
