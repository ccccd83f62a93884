"""Builds the optional compiled ops `depthcut._C` (metadata lives in pyproject.toml).

C++ CPU ops always; the CUDA ops too when torch is a CUDA build and nvcc is found.
DEPTHCUT_NO_EXT=1 skips the extension: depthcut then runs on Triton / pure torch.
"""
import glob
import os
import shutil

from setuptools import setup


def _ext_modules():
    if os.environ.get("DEPTHCUT_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join(root, "csrc", "*.cu")))
    cxx = ["-O3", "-fno-math-errno", "-fopenmp-simd"]  # omp simd: vectorised reductions
    link = []
    if torch.backends.openmp.is_available():
        # ATen's parallel_for runs on OpenMP here; the flag also makes omp pragmas and
        # the OpenMP runtime of torch visible to our code.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    have_nvcc = cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    rel = [os.path.relpath(p, root) for p in cpp]
    if torch.version.cuda and have_nvcc and cu:
        ext = cpp_extension.CUDAExtension(
            "depthcut._C",
            rel + [os.path.relpath(p, root) for p in cu],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("depthcut._C", rel, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    # py_limited_api is off: the module links libtorch (C++ ABI) anyway.
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
