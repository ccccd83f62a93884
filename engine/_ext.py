"""Optional compiled ops (`depthcut._C`, registering torch.ops.depthcut.*).

HAS_EXT tells whether they loaded. `pip install --no-build-isolation` (and `make install`)
prebuild them beside this file for the installed torch. A plain `pip install .` ships only
their C++/CUDA sources, so the first import compiles them with ninja into the user's cache,
once per torch version; so does a prebuilt copy made for another torch. Without them depthcut
falls back to Triton on CUDA and plain torch on the CPU; DEPTHCUT_NO_EXT=1 neither loads nor
builds them. setup.py runs this file on its own (no package) for build_tag() and build_args().
"""
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

RECORD = "_C_torch.txt"  # written by setup.py beside a prebuilt _C: the build_tag() it was compiled for
BUILD_TIME = "about 40 s on 2 free cores"  # the C++ ops with torch 2.13: 25-45 s idle, 2 min on busy cores


def build_tag() -> str:
    """What a compiled _C is tied to: the torch release, its CUDA (or CPU) flavour, the Python ABI."""
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return f"{torch.__version__.split('+')[0]}-{flavour}-cp{sys.version_info[0]}{sys.version_info[1]}"


def build_args(src: Path) -> dict:
    """Sources and flags of _C, one set for setup.py and for the build at first import.

    The CUDA ops join when torch is a CUDA build and nvcc is found. With no GPU visible
    (a build machine) torch has no arch to target, so TORCH_CUDA_ARCH_LIST defaults to
    Ampere and Hopper, plus PTX for later GPUs.
    """
    from torch.utils import cpp_extension

    cxx = ["-O3", "-fno-math-errno", "-fopenmp-simd"]  # omp simd: vectorised reductions
    link = []
    if torch.backends.openmp.is_available():
        # ATen's parallel_for runs on OpenMP here; the flag also makes omp pragmas and
        # the OpenMP runtime of torch visible to our code.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cu = sorted(src.glob("*.cu"))
    home = cpp_extension.CUDA_HOME
    have_nvcc = home is not None and (shutil.which("nvcc") or (Path(home) / "bin" / "nvcc").exists())
    cuda = bool(torch.version.cuda and have_nvcc and cu)
    if cuda and torch.cuda.device_count() == 0:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return {"sources": sorted(src.glob("*.cpp")) + (cu if cuda else []), "cuda": cuda, "cxx": cxx,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] if cuda else [], "link": link}


def cache_dir() -> Path:
    """Where the first import compiles _C: $XDG_CACHE_HOME (or ~/.cache)/depthcut/ext/<build tag>."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "depthcut" / "ext" / build_tag()


def _sources() -> Path:
    here = Path(__file__).resolve().parent
    for src in (here / "csrc", here.parent / "csrc"):  # an installed wheel's package data; a source checkout
        if (src / "registration.cpp").is_file():
            return src
    raise FileNotFoundError(f"no C++ sources beside {here}")


def _build() -> None:
    """Compiles _C into the cache (ninja: only what changed) and loads it as depthcut._C."""
    from torch.utils import cpp_extension

    args = build_args(_sources())
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "_C.so").exists():
        print(f"depthcut: compiling its C++ ops for torch {torch.__version__} into {out} "
              f"(once per torch version; {BUILD_TIME}) ...", file=sys.stderr, flush=True)
    module = cpp_extension.load("_C", [str(s) for s in args["sources"]], extra_cflags=args["cxx"],
                                extra_cuda_cflags=args["nvcc"], extra_ldflags=args["link"],
                                build_directory=str(out), with_cuda=args["cuda"])
    sys.modules[f"{__package__}._C"] = module
    sys.modules[__package__]._C = module  # as an import would


def _load() -> str | None:
    """Loads _C, compiling it when none fits the running torch; returns why it is unavailable."""
    name = f"{__package__}._C"
    if name in sys.modules and sys.modules[name] is None:
        return "its import is blocked"  # None in sys.modules says so: compile nothing behind it
    record = Path(__file__).with_name(RECORD)
    if record.is_file() and record.read_text().strip() == build_tag():
        try:
            from . import _C  # noqa: F401  (loading registers the ops)

            return None
        except ImportError as exc:  # e.g. an undefined symbol
            why = f"the prebuilt one does not load: {exc}"
    else:
        why = f"none prebuilt for torch {build_tag()}"
    try:
        _build()
        return None
    except Exception as exc:  # no compiler, no ninja, a failed compile: the fallbacks still work
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return f"{why}; compiling it failed: {next((ln for ln in lines if 'error:' in ln), lines[0])}"


HAS_EXT = False
if __package__ and os.environ.get("DEPTHCUT_NO_EXT") != "1":
    _why = _load()
    HAS_EXT = _why is None
    if _why:
        warnings.warn(f"depthcut: compiled ops depthcut._C unavailable ({_why}); falling back to Triton on "
                      "CUDA and pure torch on the CPU. DEPTHCUT_NO_EXT=1 skips them without this warning.",
                      stacklevel=2)
