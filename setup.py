"""Builds the optional compiled ops `depthcut._C` (metadata lives in pyproject.toml).

Only where torch is importable while building: `pip install --no-build-isolation .` and
`make install` compile csrc/ against the torch installed there, with ninja, and record that
torch beside the module. A plain `pip install .` or `pip wheel .` builds in an isolated
environment without torch: the wheel is pure Python and carries csrc/ as package data, and
the first `import depthcut` compiles it for the user's torch (engine/_ext.py).
DEPTHCUT_NO_EXT=1 skips the extension: depthcut then runs on Triton / pure torch.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup


def _ext_modules():
    if os.environ.get("DEPTHCUT_NO_EXT") == "1" or importlib.util.find_spec("torch") is None:
        return [], {}
    from torch.utils import cpp_extension

    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("depthcut_ext_build", root / "engine" / "_ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)  # build_tag() and build_args() only: no package, so nothing loads
    args = ext.build_args(root / "csrc")
    kind = cpp_extension.CUDAExtension if args["cuda"] else cpp_extension.CppExtension
    # py_limited_api is off: the module links libtorch (C++ ABI) anyway.
    module = kind("depthcut._C", [str(p.relative_to(root)) for p in args["sources"]],
                  extra_compile_args={"cxx": args["cxx"], "nvcc": args["nvcc"]}, extra_link_args=args["link"])

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Writes beside _C the torch it was compiled for; _ext.py recompiles it for any other."""

        def run(self):
            super().run()
            Path(self.get_ext_fullpath(module.name)).with_name(ext.RECORD).write_text(ext.build_tag() + "\n")

    return [module], {"build_ext": BuildExt}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
