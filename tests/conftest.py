"""Shared fixtures: offline, quiet, deterministic; tiny models on disk; the real SmolLM2 once."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, interpreted

from tiny_models import tiny_model  # noqa: E402


@pytest.fixture
def single_torch_thread():
    """Tiny CPU ops only lose from OpenMP barriers on a loaded 2-core machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from depthcut.models import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=48,
                       num_hidden_layers=8)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once for the integration tests."""
    from depthcut import load_model

    return load_model(dtype=torch.float32, device="cpu")
