"""The GPT-2 tokenizer, the one every file of this project uses.

    from tokenizer import get_tokenizer, EOT
    enc = get_tokenizer()
    ids = enc.encode_ordinary("Hello, I'm a language model,")

GPT-2's byte-level BPE is tiktoken's "gpt2" encoding. tiktoken downloads its vocabulary on first
use, so without a network we build the same encoding from a local ranks file instead:
  1. the file named by the environment variable GPT2_TIKTOKEN_FILE, or
  2. `whisper/assets/gpt2.tiktoken`, shipped by `pip install --no-deps openai-whisper==20250625`.
Both are checked against the sha256 of tiktoken's r50k_base ranks, which tokenize exactly like
gpt2 (same 50,256 merges, same split pattern, <|endoftext|> = 50256).
"""

import functools
import hashlib
import importlib.util
import os

import tiktoken

EOT = 50256  # <|endoftext|>: precedes every document in our shards
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def local_ranks_file():
    """Path of a local GPT-2 ranks file, or None when there is none."""
    path = os.environ.get("GPT2_TIKTOKEN_FILE")
    if path:
        return path
    spec = importlib.util.find_spec("whisper")  # importing whisper itself needs its heavy deps
    if spec is not None and spec.origin is not None:
        path = os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken")
        if os.path.exists(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer: from a local ranks file when there is one, else tiktoken's download.

    Problems a user can fix (no network and no local file, a wrong file) raise OSError with a
    one-line message, which the scripts print as their error.
    """
    path = local_ranks_file()
    if path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' connection and HTTP errors, a proxy, a read-only cache...
            raise OSError(f"cannot download GPT-2's vocabulary for tiktoken ({type(e).__name__}); without a "
                          f"network, `pip install --no-deps openai-whisper==20250625` (it ships the file) "
                          f"or set GPT2_TIKTOKEN_FILE to a gpt2.tiktoken file") from None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise OSError(f"{path} is not GPT-2's vocabulary (sha256 {digest[:12]}...); "
                      f"unset GPT2_TIKTOKEN_FILE or point it at a gpt2.tiktoken file")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(path, expected_hash=GPT2_RANKS_SHA256),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )
