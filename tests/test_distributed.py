"""Scoring under torchrun (gloo, CPU): the ranks' all-reduced sums are the one-process scores."""
import json
import os
import subprocess
import sys

import pytest
import torch

from depthcut.distributed import my_windows
from depthcut.errors import DepthcutError

CRITERIA = "ppl,taylor,bi,angular"


def _score(model_dir, out, processes: int, *extra):
    cmd = [sys.executable, "-m", "depthcut.cli", "score", str(model_dir), "--criteria", CRITERIA, "--window", "1",
           "--window", "3", "--seq-len", "32", "--compute-dtype", "fp32", "--out", str(out), *map(str, extra)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(29600 + os.getpid() % 1000)] + cmd[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("windows, budget", [(4, []), (5, ["--max-memory", "60kB"])])
def test_two_processes_give_the_one_process_scores(tiny_model_dir, tmp_path, windows, budget):
    """Even and uneven splits; with a tiny budget each rank also takes several chunks."""
    args = ["--n-samples", windows, *budget]
    one = _score(tiny_model_dir, tmp_path / "one.json", 1, *args)
    two = _score(tiny_model_dir, tmp_path / "two.json", 2, *args)
    names = ["ppl", "taylor", "bi", "angular1", "angular3", "taylor_ppl_estimate"]
    for name in names:
        a, b = torch.tensor(two["scores"][name], dtype=torch.float64), torch.tensor(one["scores"][name],
                                                                                    dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
        assert two["ranking"][name] == one["ranking"][name], name
    assert two["meta"]["taylor_backward"] in ("per_block", "per_chunk")  # signed sums all-reduced, not |·| per rank
    assert not list(tmp_path.glob(".*tmp"))


def test_windows_are_split_without_overlap_or_gap(monkeypatch):
    from depthcut import distributed

    for n in (2, 5, 7):
        shares = []
        for rank in range(2):
            monkeypatch.setattr(distributed, "rank_and_size", lambda rank=rank: (rank, 2))
            shares.append(my_windows(n))
        assert [shares[0].start, shares[0].stop, shares[1].stop] == [0, n // 2, n]
    monkeypatch.setattr(distributed, "rank_and_size", lambda: (0, 4))
    with pytest.raises(DepthcutError, match="3 calibration windows cannot be split over 4 processes"):
        my_windows(3)
