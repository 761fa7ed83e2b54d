"""Build beyond-cls: the Python package, the Triton kernels and the C++ extension.

Environment switches:
  BEYOND_CLS_NO_EXT=1          skip the C++ extension (pure Python install)
  BEYOND_CLS_WITH_CUDA=1       also compile csrc/*.cu when nvcc is found
  TORCH_CUDA_ARCH_LIST         CUDA archs (default "8.0;9.0")
  MAX_JOBS                     parallel compile jobs
"""

import glob
import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("BEYOND_CLS_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds (e.g. isolated sdist)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp-simd: honour `#pragma omp simd` (no OpenMP runtime); -fno-trapping-math lets the
    # vectorizer if-convert selects. Portable GCC/Clang flags, no architecture-specific ones.
    # -fopenmp: at::parallel_for is OpenMP inside torch's headers; without it the ops run on one thread.
    extra = {"cxx": ["-O3", "-fopenmp-simd", "-fno-trapping-math"]}
    link = []
    if sys.platform.startswith("linux"):
        extra["cxx"].append("-fopenmp")
        link.append("-fopenmp")
    ext_cls = cpp_extension.CppExtension
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if cuda_sources and os.environ.get("BEYOND_CLS_WITH_CUDA") == "1" and cpp_extension.CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        extra["nvcc"] = ["-O3"]
    ext = ext_cls("beyond_cls._C", sources, include_dirs=["csrc"], extra_compile_args=extra, extra_link_args=link)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "beyond_cls",
        "beyond_cls.analysis",
        "beyond_cls.data",
        "beyond_cls.data.layouts",
        "beyond_cls.heads",
        "beyond_cls.localization",
        "beyond_cls.models",
        "beyond_cls.models.architectures",
        "beyond_cls.models.formats",
        "beyond_cls.models.hf",
        "beyond_cls.ops",
        "beyond_cls.probe",
        "beyond_cls.kernels",
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
