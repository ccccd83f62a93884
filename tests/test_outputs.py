"""Outputs: replaced only when depthcut wrote them, never over an input, complete or absent
even when the writing process is killed."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.outputs import MANIFEST, atomic_path, atomic_write, check_output, clean_leftovers, written_by_depthcut
from depthcut.scores import BlockScores

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def run(*args):
    return main([str(a) for a in args])


def expect_error(capsys, code, message):
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("depthcut: error:") and message in last, err


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- ownership


def test_missing_and_own_outputs_may_be_written(tmp_path):
    assert check_output(tmp_path / "new", folder=True) == tmp_path / "new"
    with atomic_path(tmp_path / "m", is_dir=True) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["entries"] == ["w.bin"]
    check_output(tmp_path / "m", folder=True)  # depthcut's own: no error
    with atomic_path(tmp_path / "m", is_dir=True) as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [MANIFEST, "v.bin"]


def test_foreign_folders_and_files_are_refused_unless_forced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(DepthcutError, match=r"holds files depthcut did not write \(thesis.tex\).*--force"):
        check_output(mine, folder=True)
    assert check_output(mine, folder=True, force=True) == mine
    (tmp_path / "notes.json").write_text('{"a": 1}')
    with pytest.raises(DepthcutError, match="depthcut did not write it"):
        atomic_write(tmp_path / "notes.json", b"{}")
    assert (tmp_path / "notes.json").read_text() == '{"a": 1}'
    atomic_write(tmp_path / "notes.json", b"{}", force=True)
    assert (tmp_path / "notes.json").read_text() == "{}"


def test_a_user_file_added_to_a_depthcut_folder_protects_it(tmp_path):
    with atomic_path(tmp_path / "m", is_dir=True) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    (tmp_path / "m" / "my-eval.csv").write_text("x")
    with pytest.raises(DepthcutError, match="my-eval.csv"):
        check_output(tmp_path / "m", folder=True)


def test_kind_mismatches_links_and_inputs_are_refused_even_with_force(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(DepthcutError, match="not a folder"):
        check_output(tmp_path / "f", folder=True, force=True)
    with pytest.raises(DepthcutError, match="is a folder"):
        check_output(tmp_path / "d", folder=False, force=True)
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(DepthcutError, match="symbolic link"):
        check_output(tmp_path / "link", folder=True, force=True)
    model = tmp_path / "models" / "dense"
    model.mkdir(parents=True)
    for out in (model, tmp_path / "models", tmp_path):
        with pytest.raises(DepthcutError, match="would replace the input"):
            check_output(out, folder=True, inputs=[model], force=True)
    with pytest.raises(DepthcutError, match="would replace the input"):
        check_output(tmp_path / "f", folder=False, inputs=[tmp_path / "f"], force=True)
    check_output(model / "pruned", folder=True, inputs=[model])  # inside the input: nothing lost


def test_marks_tell_depthcut_files_from_others(tmp_path, smollm2_tokenizer):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from depthcut.export_gguf import export_gguf
    from depthcut.models import default_model_path
    from tiny_models import tiny_model

    scores = BlockScores({"ppl": [3.0, 1.0, 2.0]}, 3, {})
    assert written_by_depthcut(scores.save_json(tmp_path / "s.json"))
    assert written_by_depthcut(scores.plot(tmp_path / "s.png"))
    plt.plot([1, 2])
    plt.savefig(tmp_path / "other.png")
    plt.close()
    (tmp_path / "other.json").write_text(json.dumps({"scores": {}}))
    assert not written_by_depthcut(tmp_path / "other.png")
    assert not written_by_depthcut(tmp_path / "other.json")
    assert not written_by_depthcut(default_model_path())  # a GGUF file someone else wrote
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2)
    assert written_by_depthcut(export_gguf(model, smollm2_tokenizer, tmp_path / "x.gguf"))


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "f.json", b"{}")
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------- leftovers and swaps


def test_leftovers_of_dead_runs_are_removed_and_a_hidden_folder_is_put_back(tmp_path):
    dead, live = dead_pid(), os.getpid()
    (tmp_path / f".m.depthcut-{dead}-aaaaaa.tmp").mkdir()
    (tmp_path / f".s.json.depthcut-{dead}-bbbbbb.tmp").write_text("half")
    (tmp_path / f".m.depthcut-{live}-cccccc.tmp").mkdir()  # a running writer's: kept
    hidden = tmp_path / f".gone.depthcut-{dead}-dddddd.old"
    hidden.mkdir()
    (hidden / "w.bin").write_text("good")
    (tmp_path / ".m.mine.tmp").write_text("not depthcut's name pattern")
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.depthcut-%d-cccccc.tmp" % live, ".m.mine.tmp", "gone"]
    assert (tmp_path / "gone" / "w.bin").read_text() == "good"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_folder_swap(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr("depthcut.outputs._exchange", lambda a, b: False)
    for content in ("old", "new"):
        with atomic_path(tmp_path / "m", is_dir=True) as tmp:
            (tmp / "w.txt").write_text(content)
    assert (tmp_path / "m" / "w.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    atomic_write(tmp_path / "s.json", b'{"written_by": "depthcut"}')
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "s.json") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert written_by_depthcut(tmp_path / "s.json")


# ---------------------------------------------------------------- killed saves

# Runs `depthcut prune` with a pause injected at one point of the save, so the test can kill it there.
DRIVER = """
import os, sys, time
from pathlib import Path
import depthcut.outputs as outputs
from depthcut.cli import main

point, ready, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def pause():
    ready.write_text("ready")
    time.sleep(120)

swap_in, exchange, replace = outputs._swap_in, outputs._exchange, os.replace
if point == "before-swap":  # the new folder is complete, the old one untouched
    outputs._swap_in = lambda tmp, path: (pause(), swap_in(tmp, path))
elif point == "between-renames":  # the fallback swap has moved the old folder aside
    outputs._exchange = lambda a, b: False
    def hooked(a, b):
        replace(a, b)
        if str(b).endswith(".old"):
            pause()
    os.replace = hooked
elif point == "after-exchange":  # the new folder is in place, the old one not yet removed
    outputs._exchange = lambda a, b: exchange(a, b) and (pause() or True)
sys.exit(main(argv))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", ["before-swap", "between-renames", "after-exchange"])
def test_a_killed_save_keeps_a_complete_output(tiny_model_dir, tmp_path, sig, point, capsys):
    out = tmp_path / "pruned"
    assert run("prune", tiny_model_dir, "--blocks", "1", "--out", out) == 0
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, point, str(ready), "prune", str(tiny_model_dir),
                             "--blocks", "1,2", "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "Traceback" not in err and err.strip().endswith("depthcut: terminated"), err
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left behind
    else:
        assert proc.returncode == -signal.SIGKILL
    if not (sig == signal.SIGKILL and point == "between-renames"):
        layers = AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers
        assert layers in (7, 6) and (layers == 6) == (point == "after-exchange")
    # the next run cleans up whatever the killed one left, and writes a complete output
    assert run("prune", tiny_model_dir, "--blocks", "3", "--out", out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "ready"]
    assert json.loads((out / "depthcut.json").read_text())["removed"] == [3]


def test_a_crash_between_renames_is_repaired_before_anything_else(tiny_model_dir, tmp_path):
    """After kill -9 between the two renames the old folder is hidden; the next run puts it back
    even when that run then refuses to write."""
    out = tmp_path / "pruned"
    assert run("prune", tiny_model_dir, "--blocks", "1", "--out", out) == 0
    hidden = tmp_path / f".pruned.depthcut-{dead_pid()}-abcdef.old"
    os.replace(out, hidden)
    clean_leftovers(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 7


# ---------------------------------------------------------------- the command line


def test_cli_refuses_outputs_that_would_lose_something(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "results"
    user.mkdir()
    (user / "paper.md").write_text("draft")
    (tmp_path / "chart.png").write_bytes(b"\x89PNG user's own")
    (tmp_path / "scores.json").write_text('{"mine": true}')
    before = snapshot(tmp_path)
    cases = [
        (["prune", tiny_model_dir, "--blocks", "1", "--out", user], "did not write (paper.md)"),
        (["prune", tiny_model_dir, "--blocks", "1", "--out", tiny_model_dir], "would replace the input"),
        (["prune", tiny_model_dir, "--blocks", "1", "--out", tiny_model_dir.parent], "would replace the input"),
        (["retrain", tiny_model_dir, "--steps", "1", "--out", tiny_model_dir], "would replace the input"),
        (["prune", tiny_model_dir, "--blocks", "1", "--out", "p", "--gguf", "p/m.gguf"], "outputs collide"),
        (["score", tiny_model_dir, "--out", "chart.png"], "the chart goes beside it"),
        (["score", tiny_model_dir, "--out", "chart.json"], "chart.png exists and depthcut did not write it"),
        (["score", tiny_model_dir], "scores.json exists and depthcut did not write it"),
        (["score", tiny_model_dir, "--out", "results"], "is a folder"),
        (["export", tiny_model_dir, "--gguf", "results/paper.md"], "depthcut did not write it"),
        (["bench", tiny_model_dir, "--out", "results"], "did not write (paper.md)"),
        (["demo", "--out", "results"], "did not write (paper.md)"),
    ]
    for args, message in cases:
        expect_error(capsys, run(*args), message)
    assert snapshot(tmp_path) == before


def test_force_replaces_a_foreign_output(tiny_model_dir, tmp_path, capsys):
    user = tmp_path / "results"
    user.mkdir()
    (user / "paper.md").write_text("draft")
    assert run("prune", tiny_model_dir, "--blocks", "1", "--out", user, "--force") == 0
    assert not (user / "paper.md").exists()
    assert AutoModelForCausalLM.from_pretrained(user).config.num_hidden_layers == 7


def test_a_full_disk_is_one_line_and_keeps_the_old_output(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    out = tmp_path / "pruned"
    assert run("prune", tiny_model_dir, "--blocks", "1", "--out", out) == 0

    def full(self, folder, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    expect_error(capsys, run("prune", tiny_model_dir, "--blocks", "2", "--out", out), "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]
    assert json.loads((out / "depthcut.json").read_text())["removed"] == [1]


def test_a_missing_output_parent_is_created_and_a_file_parent_refused(tiny_model_dir, tmp_path, capsys):
    assert run("prune", tiny_model_dir, "--blocks", "1", "--out", tmp_path / "a" / "b" / "p") == 0
    (tmp_path / "file").write_text("x")
    expect_error(capsys, run("prune", tiny_model_dir, "--blocks", "1", "--out", tmp_path / "file" / "p"),
                 "is not a folder")
