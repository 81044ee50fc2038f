"""Shared test fixtures: everything offline, tiny and real.

- `tokenizer`: GPT-2's tokenizer from the local ranks file (tokenizer.py).
- `corpus_documents`: a small real English corpus, the topics of Python's reference manual that
  ship with every Python (pydoc_data.topics), one document per topic.
- `tiny_config`: a tiny GPTConfig with non-square sizes.
- `hf_gpt2_dir`: a randomly initialised transformers GPT2LMHeadModel saved with save_pretrained,
  the offline stand-in for OpenAI's weights.
"""

import os
import sys

# No test may touch the network: without these a hub call retries for ~25 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several processes (torchrun, killed runs)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/test_gpu.py; skipped without one)")


def pytest_ignore_collect(collection_path, config):
    """`-m gpu` collects tests/test_gpu.py alone: a GPU machine with only the training stack (no
    datasets, no Jupyter) must not fail on the imports of modules that hold no GPU test."""
    name = collection_path.name
    if config.option.markexpr == "gpu" and name.startswith("test_") and name != "test_gpu.py":
        return True
    return None


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizer import get_tokenizer
    return get_tokenizer()


@pytest.fixture(scope="session")
def corpus_documents():
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


@pytest.fixture
def tiny_config():
    from model import GPTConfig
    return GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=3, n_embd=48)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A random GPT-2 in Hugging Face format (n_positions 64, vocab 50257, 2 layers, 4 heads, 64 wide)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return str(path)
