"""Retraining: the fused loss against Hugging Face's, LoRA merge and reload, resume, schedule."""
import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthcut.pruner import prune_blocks, save_model
from depthcut.retrain import CausalLMLoss, RetrainConfig, cosine_schedule, retrain, window_order
from depthcut.train_data import IGNORE_INDEX, TrainingSet
from tiny_models import random_tokens, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Tied and untied heads, a logit softcap (gemma2) and a logit divisor (granite).
LOSS_FAMILIES = ["llama", "gemma", "gemma2", "granite"]


def _batch(model, n=3, t=13, seed=0):
    ids = random_tokens(model, n, t, seed)
    labels = ids.clone()
    labels[0, 3:7] = IGNORE_INDEX  # a masked stretch, as chat data has
    return ids, labels


def _assert_grads_close(actual: dict, expected: dict):
    """fp32 agreement relative to each tensor's scale (tied Gemma embeddings reach |g| ~ 30)."""
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        torch.testing.assert_close(actual[name], e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()), msg=name)


def _loss_and_grads(model, ids, labels, loss, teacher=None, a=0.0):
    model.zero_grad(set_to_none=True)
    nll, kl = CausalLMLoss(model, teacher, loss)(ids, labels)
    ((1 - a) * nll + a * kl).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return nll.detach(), kl.detach(), grads


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("family", LOSS_FAMILIES)
def test_fused_loss_and_gradients_equal_hugging_face(family, backend, monkeypatch):
    """Full training: every weight's gradient, the head's (and tied embedding's) included."""
    monkeypatch.setenv("DEPTHCUT_OPS", backend)
    model = tiny_model(family)
    ids, labels = _batch(model)
    nll_f, _, grads_f = _loss_and_grads(model, ids, labels, "fused")
    nll_h, _, grads_h = _loss_and_grads(model, ids, labels, "hf")
    torch.testing.assert_close(nll_f, nll_h, rtol=1e-5, atol=1e-5)
    head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    assert head in grads_h
    _assert_grads_close(grads_f, grads_h)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_distillation_loss_equals_kl_div_on_full_logits(family, backend, monkeypatch):
    monkeypatch.setenv("DEPTHCUT_OPS", backend)
    teacher = tiny_model(family, seed=1)
    student = prune_blocks(copy.deepcopy(teacher), [2, 5])
    ids, labels = _batch(student)
    nll_f, kl_f, grads_f = _loss_and_grads(student, ids, labels, "fused", teacher, a=0.7)
    nll_h, kl_h, grads_h = _loss_and_grads(student, ids, labels, "hf", teacher, a=0.7)
    assert kl_f > 0
    torch.testing.assert_close(kl_f, kl_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll_f, nll_h, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads_f, grads_h)
    assert all(p.grad is None for p in teacher.parameters())


def test_kl_to_itself_is_zero():
    model = tiny_model("llama")
    ids, labels = _batch(model)
    _, kl = CausalLMLoss(model, copy.deepcopy(model))(ids, labels)
    assert abs(kl.item()) < 1e-4


def _data(model, n_train=24, n_eval=4, t=17, seed=3):
    ids = random_tokens(model, n_train + n_eval, t, seed)
    return TrainingSet(ids[n_eval:], ids[n_eval:].clone(), ids[:n_eval], {"source": "random tokens"})


def test_lora_training_lowers_the_loss_and_the_merged_model_reloads(tmp_path):
    from peft import PeftModel

    model = tiny_model("llama")
    data = _data(model, n_train=4)  # few windows, many epochs: the loss must fall
    cfg = RetrainConfig(steps=30, batch_size=4, lr=1e-2, lora_dropout=0.0)
    result = retrain(model, data, cfg, tmp_path / "run", progress=False, keep_adapter=True)
    losses = [e["loss"] for e in result.log if "loss" in e]
    assert losses[-1] < 0.8 * losses[0]
    assert set(result.summary) >= {"perplexity_before", "perplexity_after", "tokens", "final_loss"}
    assert result.summary["tokens"] == 30 * 4 * 17

    ids = random_tokens(model, 2, 11, seed=9)
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), result.adapter_dir).eval()
    save_model(result.model, None, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        expected = peft_model(ids).logits
        assert (expected - tiny_model("llama")(ids).logits).abs().max() > 1e-3  # the adapter changed something
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, method):
    """Dropout on (LoRA): the RNG state travels with the checkpoint too."""
    cfg = RetrainConfig(method=method, steps=6, batch_size=2, grad_accum=2, lr=1e-3, save_every=2, seed=5)
    data = _data(tiny_model("llama"), n_train=10)  # 10 windows, 4 per step: epochs wrap mid-step
    whole = retrain(tiny_model("llama"), data, cfg, tmp_path / "a", progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    resumed = retrain(tiny_model("llama"), data, cfg, tmp_path / "a", resume=True, progress=False)
    assert resumed.summary["resumed_from_step"] == 4
    for (k, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [e["loss"] for e in resumed.log if "loss" in e] == [e["loss"] for e in whole.log if "loss" in e]


def test_the_next_save_clears_a_checkpoint_a_killed_run_left_half_written(tmp_path):
    data = _data(tiny_model("llama"))
    cfg = RetrainConfig(steps=3, batch_size=2, save_every=2)
    retrain(tiny_model("llama"), data, cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / ".step-00000003.tmp").mkdir()
    retrain(tiny_model("llama"), data, cfg, tmp_path, resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_new_run_over_an_earlier_runs_checkpoints_needs_force(tmp_path):
    from depthcut.errors import DepthcutError

    data = _data(tiny_model("llama"))
    retrain(tiny_model("llama"), data, RetrainConfig(steps=5, batch_size=2, save_every=2), tmp_path, progress=False)
    cfg = RetrainConfig(steps=3, batch_size=2, save_every=2)
    with pytest.raises(DepthcutError, match="earlier run's checkpoints: --resume continues it, --force starts over"):
        retrain(tiny_model("llama"), data, cfg, tmp_path, progress=False)
    retrain(tiny_model("llama"), data, cfg, tmp_path, progress=False, force=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_run_folder_with_someone_elses_files_is_refused(tmp_path):
    from depthcut.errors import DepthcutError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DepthcutError, match=r"did not write \(notes.txt\)"):
        retrain(tiny_model("llama"), _data(tiny_model("llama")), RetrainConfig(steps=1, batch_size=2), tmp_path,
                progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_refuses_another_recipe(tmp_path):
    from depthcut.errors import DepthcutError

    data = _data(tiny_model("llama"))
    retrain(tiny_model("llama"), data, RetrainConfig(steps=3, batch_size=2, save_every=2), tmp_path, progress=False)
    with pytest.raises(DepthcutError, match="another recipe.*lr"):
        retrain(tiny_model("llama"), data, RetrainConfig(steps=3, batch_size=2, lr=5e-4), tmp_path, resume=True,
                progress=False)


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    from depthcut.errors import DepthcutError

    data = _data(tiny_model("llama"))
    cfg = RetrainConfig(steps=3, batch_size=2, save_every=2)
    retrain(tiny_model("llama"), data, cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "step-00000002" / "optimizer.pt").write_bytes(b"truncated")
    with pytest.raises(DepthcutError, match="damaged checkpoint"):
        retrain(tiny_model("llama"), data, cfg, tmp_path, resume=True, progress=False)


def test_window_order_is_a_pure_function_of_the_step():
    n, g = 10, 4
    first_epoch = torch.cat([window_order(s, g, n, seed=1) for s in range(3)])[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))  # every window once per epoch
    assert torch.equal(window_order(2, g, n, 1), window_order(2, g, n, 1))
    assert not torch.equal(window_order(0, g, n, 1), window_order(0, g, n, 2))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = cosine_schedule(warmup=4, total=20)
    values = [f(s) for s in range(21)]
    assert values[:4] == sorted(values[:4]) and values[3] < 1.0
    assert values[4] == 1.0 and math.isclose(values[20], 0.0, abs_tol=1e-12)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 1, "lr": 0.0}, "--lr must be positive"),
    ({"steps": 1, "lr": -1e-4}, "--lr must be positive"),
    ({}, "exactly one of --steps and --tokens"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"steps": 1, "method": "qlora"}, "unknown retraining method"),
    ({"steps": 1, "distill_weight": 1.5}, "--distill-weight"),
    ({"steps": 1, "lora_dropout": 1.0}, "--lora-dropout"),
])
def test_bad_recipes_are_refused(kwargs, message):
    from depthcut.errors import DepthcutError

    with pytest.raises(DepthcutError, match=message):
        RetrainConfig(**kwargs)


def test_fp16_training_on_the_cpu_is_refused_before_it_starts(tmp_path):
    from depthcut.errors import DepthcutError

    model = tiny_model("llama", dtype=torch.float16)
    with pytest.raises(DepthcutError, match="fp16 training on the CPU"):
        retrain(model, _data(tiny_model("llama")), RetrainConfig(steps=1, batch_size=2), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_training_windows_longer_than_the_context_are_refused(tmp_path):
    from depthcut.errors import DepthcutError

    model = tiny_model("llama", max_position_embeddings=16)
    with pytest.raises(DepthcutError, match="context"):
        retrain(model, _data(tiny_model("llama")), RetrainConfig(steps=1, batch_size=2), tmp_path, progress=False)
