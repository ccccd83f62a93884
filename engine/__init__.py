"""depthcut: depth pruning of Hugging Face decoder LLMs."""
