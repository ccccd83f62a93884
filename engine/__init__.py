"""depthcut: depth pruning of Hugging Face decoder LLMs.

The data flows one way: calibration -> model adapter -> one scoring pass -> ranking ->
pruner -> retraining -> export or inference::

    import engine
    model, tokenizer = engine.load_model()              # bundled SmolLM2-135M, or a folder/.gguf
    calib = engine.Calibration.load(tokenizer)          # 10 x 128 tokens of pydoc text
    scores = engine.score(model, calib, ["ppl", "taylor", "magnitude"])
    blocks = scores.select("taylor", 6)                 # "+" heuristic: first 4 / last 2 kept
    engine.prune_blocks(model, blocks)
    engine.save_model(model, tokenizer, "out/pruned")
    print(engine.perplexity(model, calib.heldout_ids[:40]))
    data = engine.TrainingSet.from_default_text(tokenizer)   # never the calibration/evaluation windows
    model = engine.retrain(model, data, engine.RetrainConfig(steps=30, lr=1e-3), "out/pruned.train").model
"""
from .calibration import Calibration, default_text, read_text, tokenize_windows
from .errors import DepthcutError
from .evaluate import perplexity
from .models import FAMILIES, ModelAdapter, load_model
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
    "perplexity",
    "prune_blocks",
    "read_documents",
    "read_text",
    "retrain",
    "save_model",
    "score",
    "tokenize_windows",
]
