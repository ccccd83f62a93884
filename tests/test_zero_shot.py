"""depthcut eval --tasks/--ppl (the paper's table, JSON, chart), prune/retrain --eval-tasks and
the model card, and the one-line answers when data is not available offline."""
import json
import os
import subprocess
import sys
import time

import torch

from depthcut import load_model, perplexity, tokenize_windows
from depthcut.zero_shot import table
from test_cli import expect_error, run
from test_lm_eval_model import direct_logprob, write_tasks


def test_eval_table_json_chart_against_direct_computation(tiny_model_dir, tmp_path, capsys):
    docs = write_tasks(tmp_path, docs=8)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(d["text"] for d in docs))
    out = tmp_path / "out" / "eval.json"
    assert run("eval", tiny_model_dir, tiny_model_dir, "--tasks", "tiny_mc,tiny_ll", "--include-path", tmp_path,
               "--ppl", text, "--seq-len", 16, "--max-windows", 5, "--out", out, "--dtype", "fp32") == 0
    printed = capsys.readouterr().out
    assert "tiny_mc (acc_norm)  tiny_ll (acc)  text.txt (perplexity)  average" in printed
    data = json.loads(out.read_text())
    assert data["written_by"] == "depthcut" and data["harness"].startswith("lm-eval 0.4.")
    assert [r["name"] for r in data["models"]] == ["tiny-llama", "tiny-llama"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same numbers from the model's full logits: lm-eval's request layout, written out here
    model, tok = load_model(str(tiny_model_dir), dtype=torch.float32)
    max_length = model.config.max_position_embeddings

    def logprob(context, continuation):
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        return direct_logprob(model, ctx, whole[len(ctx):], max_length)

    acc = acc_norm = greedy = 0
    for d in docs:
        scores = [logprob(f"Question: {d['question']}\nAnswer:", " " + c)[0] for c in d["choices"]]
        acc += max(range(4), key=lambda i: scores[i]) == d["answer"]
        acc_norm += max(range(4), key=lambda i: scores[i] / len(d["choices"][i])) == d["answer"]
        greedy += logprob(d["context"], d["continuation"])[1]
    results = data["models"][0]["results"]
    assert results["tiny_mc"] == {"metric": "acc_norm", "value": acc_norm / len(docs)}
    assert results["tiny_ll"] == {"metric": "acc", "value": greedy / len(docs)}
    windows = tokenize_windows(text.read_text(), tok, 16)[:5]
    assert results["text.txt"]["value"] == perplexity(model, windows)
    assert f"{(acc_norm + greedy) / len(docs) / 2 * 100:.2f}" in printed.splitlines()[-2]


def test_table_names_metrics_and_averages_accuracies_only():
    rows = [{"name": "a", "results": {"x": {"metric": "acc", "value": 0.5}, "y": {"metric": "acc_norm", "value": 0.25},
                                      "w": {"metric": "perplexity", "value": 12.5}}},
            {"name": "b", "results": {"x": {"metric": "acc", "value": 1.0}}}]
    header, cells = table(rows)
    assert header == ["model", "x (acc)", "y (acc_norm)", "w (perplexity)", "average"]
    assert cells == [["a", "50.00", "25.00", "12.5", "37.50"], ["b", "100.00", "", "", "100.00"]]


def test_paper_corpora_are_read_by_the_papers_protocol(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--ppl wikitext2,ptb: the test split of each named dataset through `datasets`, rows joined as
    the paper's evaluation joins them, perplexity over seq-len windows (no network here: the
    dataset reader is replaced by one that records what was asked and gives a split)."""
    import datasets

    pieces = [" = Heading = ", "A first paragraph of text .", "", "Another one , with numbers 1 2 3 ."] * 12
    asked = []

    def load_dataset(path, config=None, split=None):
        asked.append((path, config, split))
        return {"text" if path == "wikitext" else "sentence": pieces}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "e.json"
    assert run("eval", tiny_model_dir, "--ppl", "wikitext2,ptb", "--seq-len", 16, "--out", out, "--dtype", "fp32") == 0
    assert asked == [("wikitext", "wikitext-2-raw-v1", "test"), ("ptb-text-only/ptb_text_only", None, "test")]
    got = json.loads(out.read_text())["models"][0]["results"]
    model, tokenizer = load_model(tiny_model_dir, dtype=torch.float32)
    for name, joiner in (("wikitext2", "\n\n"), ("ptb", " ")):
        windows = tokenize_windows(joiner.join(pieces), tokenizer, 16)
        assert got[name]["windows"] == len(windows) > 1
        assert abs(got[name]["value"] - perplexity(model, windows)) < 1e-4 * got[name]["value"]


def test_unavailable_data_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "absent.yaml").write_text("task: tiny_absent\ndataset_path: depthcut-tests/not-a-cached-dataset\n"
                                          "test_split: test\noutput_type: loglikelihood\n"
                                          'doc_to_text: "{{a}}"\ndoc_to_target: "{{b}}"\n')
    t0 = time.perf_counter()
    expect_error(capsys, run("eval", tiny_model_dir, "--tasks", "tiny_absent", "--include-path", tmp_path,
                             "--out", tmp_path / "e.json"),
                 "task 'tiny_absent': its data is not available offline")
    assert time.perf_counter() - t0 < 60
    expect_error(capsys, run("eval", "--ppl", tmp_path / "missing.txt", "--out", tmp_path / "e.json"),
                 "'" + str(tmp_path / "missing.txt") + "' is neither a corpus (wikitext2, ptb) nor a file")
    # a corpus through `datasets` with an empty cache, offline: named, with how to make it available
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "depthcut.cli", "eval", "--ppl", "wikitext2", "--out",
                           str(tmp_path / "e.json")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("depthcut: error: --ppl wikitext2: the wikitext test split is not available offline")
    assert "HF_DATASETS_OFFLINE=0" in last and "local .txt/.jsonl file" in last
    assert not (tmp_path / "e.json").exists()


def test_prune_and_retrain_report_before_after_in_the_card(tiny_model_dir, tmp_path, capsys):
    write_tasks(tmp_path, docs=4)
    pruned, healed = tmp_path / "p", tmp_path / "h"
    flags = ["--eval-tasks", "tiny_mc", "--eval-include-path", tmp_path, "--eval-limit", 3]
    assert run("prune", tiny_model_dir, "--blocks", "2,5", "--out", pruned, *flags) == 0
    assert "tiny_mc (acc_norm)" in capsys.readouterr().out
    card = json.loads((pruned / "depthcut.json").read_text())["zero_shot"]
    assert card["harness"].startswith("lm-eval 0.4.") and card["limit"] == 3 and card["tasks"] == ["tiny_mc"]
    assert [m["name"] for m in card["models"]] == ["dense", "pruned"]
    assert "## Zero-shot accuracy" in (pruned / "README.md").read_text()

    # the numbers are those `depthcut eval` gives the dense and the saved pruned model
    assert run("eval", tiny_model_dir, pruned, "--tasks", "tiny_mc", "--include-path", tmp_path, "--limit", 3,
               "--out", tmp_path / "e.json") == 0
    direct = json.loads((tmp_path / "e.json").read_text())["models"]
    assert [m["results"] for m in card["models"]] == [m["results"] for m in direct]

    assert run("retrain", pruned, "--seq-len", 32, "--batch-size", 2, "--eval-windows", 4, "--steps", 1,
               "--lr", 0.05, "--out", healed, *flags) == 0
    card = json.loads((healed / "depthcut.json").read_text())["zero_shot"]
    assert [m["name"] for m in card["models"]] == ["before", "after"]
    assert card["models"][0]["results"] == direct[1]["results"]
    assert "## Zero-shot accuracy" in (healed / "README.md").read_text()
