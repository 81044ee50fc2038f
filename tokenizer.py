"""The GPT-2 tokenizer, the one every file of this project uses.

    from tokenizer import get_tokenizer, EOT
    enc = get_tokenizer()
    ids = enc.encode_ordinary("Hello, I'm a language model,")

GPT-2's byte-level BPE is tiktoken's "gpt2" encoding. tiktoken downloads its vocabulary on first
use, so without a network we build the same encoding from a local ranks file instead:
  1. the file named by the environment variable GPT2_TIKTOKEN_FILE, or
  2. `whisper/assets/gpt2.tiktoken`, shipped by `pip install --no-deps openai-whisper==20250625`.
Both are checked against the sha256 of tiktoken's r50k_base ranks, which tokenize exactly like
gpt2 (same 50,256 merges, same split pattern, <|endoftext|> = 50256). Exported models carry the
same tokenizer in transformers' format, converted from the same ranks by transformers itself.
"""

import functools
import hashlib
import importlib.util
import json
import os

import tiktoken

EOT = 50256  # <|endoftext|>: precedes every document in our shards
R50K_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
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


def save_for_transformers(directory, model_max_length):
    """Write GPT-2's tokenizer into directory for transformers' AutoTokenizer: tokenizer.json, made by
    transformers' TikTokenConverter from the same ranks and split pattern as get_tokenizer() (so the
    same ids), and tokenizer_config.json with <|endoftext|> as bos, eos and pad token. export.py
    calls it on a staging directory that it renames when the whole folder is written."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers.convert_slow_tokenizer import TikTokenConverter
    get_tokenizer()  # the same checks, and one-line errors, as every other use
    special = ["<|endoftext|>"]  # transformers 5 calls them extra_special_tokens, 4 additional_special_tokens
    converter = TikTokenConverter(vocab_file=local_ranks_file() or R50K_RANKS_URL,  # a URL: tiktoken's cache
                                  pattern=r50k_pat_str, extra_special_tokens=special, additional_special_tokens=special)
    converter.converted().save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, in transformers 4 and 5
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode gives back the text exactly, as tiktoken does
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
