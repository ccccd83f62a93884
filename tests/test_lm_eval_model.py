"""The "depthcut" lm-eval model type: the same log-likelihoods as a direct computation with the
model's full logits and as lm-eval's own `hf` model, on tasks written here as local files."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from depthcut.evaluate import continuation_logprobs, head_argmax
from tiny_models import tiny_model

WORDS = "the cat dog sat ran on a mat log big small red blue house tree river stone went home fast".split()


def write_tasks(folder, docs: int = 10, seed: int = 0):
    """tiny_mc (multiple choice, 4 choices), tiny_ll (loglikelihood) and tiny_roll
    (loglikelihood_rolling) as lm-eval YAML files over JSON lines, all in `folder`."""
    rng = random.Random(seed)
    phrase = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    rows = [{"question": phrase(3, 12), "choices": [phrase(1, 5) for _ in range(4)], "answer": rng.randrange(4),
             "context": phrase(2, 8), "continuation": " " + phrase(1, 3), "text": phrase(20, 60)}
            for _ in range(docs)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\n")
    mean = "    aggregation: mean\n    higher_is_better: true\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n" + mean + "  - metric: acc_norm\n" + mean)
    (folder / "tiny_ll.yaml").write_text(
        "task: tiny_ll\n" + common + "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: acc\n" + mean)
    (folder / "tiny_roll.yaml").write_text(
        "task: tiny_roll\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n")
    return rows


def direct_logprob(model, context: list[int], continuation: list[int], max_length: int):
    """log P(continuation | context) and greedy flag from the model's full logits, as lm-eval's hf model."""
    tokens = (context + continuation)[-(max_length + 1):]
    logp = model(input_ids=torch.tensor([tokens[:-1]])).logits[0, -len(continuation):].float().log_softmax(-1)
    target = torch.tensor(continuation)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_continuation_logprobs_match_full_logits(family, single_torch_thread):
    """Shared and single contexts, truncated windows, one-token and greedy continuations; gemma2's
    sliding windows (8) are shorter than the contexts and its logits are softcapped."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(0, 211, (n,), generator=gen).tolist()  # noqa: E731
    contexts = [rand(n) for n in (1, 5, 13, 29)]
    pairs = [(c, rand(k)) for c in contexts for k in (1, 3, 4)] + [(rand(n), rand(2)) for n in (2, 9, 40)]
    for c in contexts[:3]:  # the model's own greedy continuation
        tokens = list(c)
        for _ in range(3):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        pairs.append((c, tokens[len(c):]))
    max_length = 24
    got = continuation_logprobs(model, pairs, max_length, batch_size=4)
    want = [direct_logprob(model, c, k, max_length) for c, k in pairs]
    assert [g[1] for g in got] == [w[1] for w in want]
    assert sum(w[1] for w in want) >= 3
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([w[0] for w in want]),
                               atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("rows, vocab, tile", [(1, 7, 4), (5, 211, 64), (9, 1000, 1000), (3, 1001, 256)])
def test_head_argmax_matches_torch(rows, vocab, tile):
    gen = torch.Generator().manual_seed(rows + vocab)
    hidden, weight = torch.randn(rows, 24, generator=gen), torch.randn(vocab, 24, generator=gen)
    assert torch.equal(head_argmax(hidden, weight, tile), (hidden @ weight.T).argmax(1))
    tied = torch.cat([weight, weight])  # ties: the lowest id wins, as torch.argmax
    assert torch.equal(head_argmax(hidden, tied, tile), (hidden @ tied.T).argmax(1))


def _evaluate(model: str, model_args: str, folder, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import depthcut.lm_eval_model  # noqa: F401  registers "depthcut": lm-eval 0.4 has no plugin discovery

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   batch_size=4, device="cpu", log_samples=True, bootstrap_iters=0)


def test_same_loglikelihoods_and_accuracies_as_hf_model(tiny_model_dir, tmp_path):
    """The registered name works through lm_eval.simple_evaluate, and every request's
    log-likelihood, every accuracy and the rolling perplexity agree with the hf model's."""
    write_tasks(tmp_path, docs=6)
    tasks = ["tiny_mc", "tiny_ll", "tiny_roll"]
    ours = _evaluate("depthcut", f"pretrained={tiny_model_dir},dtype=fp32", tmp_path, tasks)
    theirs = _evaluate("hf", f"pretrained={tiny_model_dir},dtype=float32", tmp_path, tasks)
    for task in tasks:
        a = [x for s in ours["samples"][task] for x in s["resps"]]
        b = [x for s in theirs["samples"][task] for x in s["resps"]]
        assert len(a) == len(b) > 0
        logp = lambda rs: torch.tensor([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in rs],  # noqa: E731
                                       dtype=torch.float64)
        torch.testing.assert_close(logp(a), logp(b), atol=1e-4, rtol=1e-5)
        if task != "tiny_roll":
            assert [r[0][1] for r in a] == [r[0][1] for r in b]  # is_greedy
        for key, value in theirs["results"][task].items():
            if key.split(",")[0] in ("acc", "acc_norm"):
                assert ours["results"][task][key] == value, (task, key)
            elif key.split(",")[0] == "word_perplexity":
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5)


def test_lm_eval_own_command_line(tiny_model_dir, tmp_path):
    """lm-eval's own CLI with --model depthcut (the module registers the name, then hands over)."""
    write_tasks(tmp_path, docs=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "depthcut.lm_eval_model", "run", "--model", "depthcut",
                           "--model_args", f"pretrained={tiny_model_dir},dtype=fp32", "--tasks", "tiny_mc",
                           "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "4"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.replace(" ", "")
    assert f"depthcut({{'pretrained':'{tiny_model_dir}'" in table and "|tiny_mc|" in table and "|acc_norm|" in table


def test_importing_depthcut_leaves_lm_eval_unloaded():
    code = ("import sys, depthcut, depthcut.cli, depthcut.zero_shot; depthcut.cli.build_parser(); "
            "print('lm_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
