"""Optional compiled ops (`depthcut._C`, registering torch.ops.depthcut.*).

HAS_EXT tells whether they loaded. Without them depthcut falls back to Triton on
CUDA and plain torch on the CPU; DEPTHCUT_NO_EXT=1 does not even try to load them.
"""
import os
import warnings

HAS_EXT = False
if os.environ.get("DEPTHCUT_NO_EXT") != "1":
    try:
        from . import _C  # noqa: F401  (loading registers the ops)

        HAS_EXT = True
    except ImportError as exc:
        warnings.warn(
            f"depthcut: compiled extension depthcut._C not built ({exc}); falling back to pure torch "
            "on the CPU. Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=2,
        )
