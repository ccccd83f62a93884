"""depthcut: depth pruning of Hugging Face decoder LLMs.

The data flows one way: calibration -> model adapter -> one scoring pass -> ranking ->
pruner -> retraining -> export or inference::

    import depthcut
    model, tokenizer = depthcut.load_model()            # bundled SmolLM2-135M, or a folder/.gguf
    # larger than memory: depthcut.load_streamed(folder, "disk") keeps one block in memory at a time
    calib = depthcut.Calibration.load(tokenizer)        # 10 x 128 tokens of pydoc text
    scores = depthcut.score(model, calib, ["ppl", "taylor", "magnitude"])
    blocks = scores.select("taylor", 6)                 # "+" heuristic: first 4 / last 2 kept
    depthcut.prune_blocks(model, blocks)
    depthcut.save_model(model, tokenizer, "out/pruned")
    print(depthcut.perplexity(model, calib.heldout_ids[:40]))
    data = depthcut.TrainingSet.from_default_text(tokenizer)  # never the calibration/evaluation windows
    model = depthcut.retrain(model, data, depthcut.RetrainConfig(steps=30, lr=1e-3), "out/pruned.train").model
"""
from .calibration import Calibration, default_text, read_text, tokenize_windows
from .errors import DepthcutError
from .evaluate import perplexity
from .models import FAMILIES, ModelAdapter, load_model
from .offload import load_streamed
from .pruner import blocks_for_ratio, prune_blocks, save_model
from .retrain import RetrainConfig, RetrainResult, retrain
from .scores import BlockScores, Protect
from .scoring import score
from .train_data import TrainingSet, read_documents

__all__ = [
    "BlockScores",
    "Calibration",
    "DepthcutError",
    "FAMILIES",
    "ModelAdapter",
    "Protect",
    "RetrainConfig",
    "RetrainResult",
    "TrainingSet",
    "blocks_for_ratio",
    "default_text",
    "load_model",
    "load_streamed",
    "perplexity",
    "prune_blocks",
    "read_documents",
    "read_text",
    "retrain",
    "save_model",
    "score",
    "tokenize_windows",
]
