"""`pip wheel .` the default (isolated) way, installed into a fresh venv outside the checkout.

The wheel is pure Python and carries csrc/; its first import compiles depthcut._C into the
user's cache (about 40 s on 2 free cores: done once here, into a temporary cache). The fresh
venv sees this venv's packages (torch, transformers, ...) through a .pth line: a folder
named there is put on sys.path without its own .pth files being read, so the editable
install of this checkout stays inactive and `depthcut` is the wheel's.
"""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from depthcut._ext import RECORD, build_tag

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import depthcut, depthcut.kernels, torch
    from depthcut._ext import HAS_EXT
from depthcut.kernels.decode import swiglu_ref
facts = {"HAS_EXT": HAS_EXT, "package": depthcut.__file__, "kernels": depthcut.kernels.__file__,
         "warnings": [str(w.message) for w in caught if "depthcut._C" in str(w.message)]}
if HAS_EXT:
    gu = torch.randn(3, 10)
    facts["C"] = sys.modules["depthcut._C"].__file__
    facts["op_ok"] = torch.allclose(torch.ops.depthcut.swiglu(gu, False), swiglu_ref(gu), atol=1e-6)
try:
    import engine
    facts["engine"] = engine.__file__
except ImportError:
    facts["engine"] = None
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """The isolated wheel of this working tree (a copy of its files: no build/ left behind), installed."""
    tmp = tmp_path_factory.mktemp("install")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():  # a deleted file stays listed until the deletion is staged
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp / "src" / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(tmp / "src"), "--no-deps", "-w", str(tmp / "wheels")], check=True)
    (wheel,) = (tmp / "wheels").glob("depthcut-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = tmp / "venv" / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "this_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (tmp / "work").mkdir()
    return SimpleNamespace(tmp=tmp, wheel=wheel, python=python, site=site)


def _run(venv, args, cache, **env):
    """Runs in the fresh venv from a folder outside the checkout, with its own compile cache."""
    inherited = {k: v for k, v in os.environ.items() if k != "DEPTHCUT_NO_EXT"}
    env = {**inherited, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache), **env}
    return subprocess.run(args, cwd=venv.tmp / "work", env=env, capture_output=True, text=True, timeout=600)


def _probe(venv, cache, **env):
    proc = _run(venv, [venv.python, "-c", PROBE], cache, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def compiled(venv):
    """The first import without a prebuilt extension: compiles it into a fresh cache."""
    cache = venv.tmp / "cache"
    return cache, *_probe(venv, cache)


def test_isolated_build_makes_a_pure_wheel_carrying_the_sources(venv):
    assert venv.wheel.name.endswith("-py3-none-any.whl")
    names = set(zipfile.ZipFile(venv.wheel).namelist())
    sources = {f"depthcut/csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h")}
    assert "depthcut/csrc/registration.cpp" in sources and sources <= names
    assert not [n for n in names if n.endswith(".so") or n.endswith(RECORD)]


def test_wheel_runs_without_the_extension(venv):
    facts, stderr = _probe(venv, venv.tmp / "unused-cache", DEPTHCUT_NO_EXT="1")
    assert Path(facts["package"]).parent == venv.site / "depthcut"
    assert Path(facts["kernels"]).parent == venv.site / "depthcut" / "kernels"
    assert facts["HAS_EXT"] is False and facts["warnings"] == [] and facts["engine"] is None
    assert not (venv.tmp / "unused-cache").exists() and "compiling" not in stderr
    cli = _run(venv, [venv.python.parent / "depthcut", "--help"], venv.tmp / "unused-cache", DEPTHCUT_NO_EXT="1")
    assert cli.returncode == 0 and cli.stdout.startswith("usage: depthcut"), cli.stderr


def test_first_import_compiles_the_extension_once(venv, compiled):
    cache, facts, stderr = compiled
    built = cache / "depthcut" / "ext" / build_tag()
    assert facts["HAS_EXT"] is True and facts["op_ok"] is True and facts["warnings"] == []
    assert Path(facts["C"]).parent == built
    assert stderr.count("depthcut: compiling its C++ ops") == 1
    again, stderr = _probe(venv, cache)
    assert again["HAS_EXT"] is True and again["C"] == facts["C"] and "compiling" not in stderr


def test_prebuilt_extension_used_only_for_the_running_torch(venv, compiled):
    cache, facts, _ = compiled
    prebuilt = venv.site / "depthcut" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    record = venv.site / "depthcut" / RECORD
    try:
        shutil.copy(facts["C"], prebuilt)
        record.write_text(build_tag() + "\n")
        assert _probe(venv, cache)[0]["C"] == str(prebuilt)
        record.write_text("2.0.0-cpu-cp311\n")  # built for another torch: not even loaded
        assert _probe(venv, cache)[0]["C"] == facts["C"]
        record.write_text(build_tag() + "\n")
        prebuilt.write_bytes(b"not a shared object")  # fails to load, like an undefined symbol
        again = _probe(venv, cache)[0]
        assert again["HAS_EXT"] is True and again["C"] == facts["C"] and again["warnings"] == []
    finally:
        prebuilt.unlink(missing_ok=True)
        record.unlink(missing_ok=True)


def test_failed_compile_warns_once_and_falls_back(venv):
    facts, _ = _probe(venv, venv.tmp / "empty-cache", CXX=shutil.which("false"))
    assert facts["HAS_EXT"] is False
    assert len(facts["warnings"]) == 1 and "compiling it failed" in facts["warnings"][0]
