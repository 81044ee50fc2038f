"""GPT-2's tokenizer for every file of this project: get_tokenizer().encode_ordinary(text), EOT = 50256.

tiktoken's "gpt2" encoding downloads its vocabulary on first use; offline we build it from a local copy
of tiktoken's r50k_base ranks (gpt2's merges and split pattern, checked by sha256): GPT2_TIKTOKEN_FILE,
or the file `pip install --no-deps openai-whisper==20250625` ships. Exports carry it for transformers."""

import functools
import importlib.util
import json
import os

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

EOT = 50256  # <|endoftext|>: precedes every document in our shards
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer; what a user can fix (no network and no file, a wrong file) raises a one-line OSError."""
    if (path := local_ranks_file()) is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' connection and HTTP errors, a proxy, a read-only cache...
            fix = "`pip install --no-deps openai-whisper==20250625` or set GPT2_TIKTOKEN_FILE to a gpt2.tiktoken file"
            raise OSError(f"cannot download GPT-2's vocabulary ({type(e).__name__}); offline, {fix}") from None
    try:
        ranks = load_tiktoken_bpe(path, expected_hash=GPT2_RANKS_SHA256)
    except ValueError:  # the hash differs, or a line is not "<base64 token> <rank>"
        fix = "unset GPT2_TIKTOKEN_FILE or name a gpt2.tiktoken file"
        raise OSError(f"{path} is not GPT-2's vocabulary; {fix}") from None
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})


def save_for_transformers(directory, model_max_length):
    """Write GPT-2's tokenizer into `directory` for AutoTokenizer: tokenizer.json, converted by transformers from
    the same ranks and split pattern (so the same ids), and its config, <|endoftext|> as bos, eos and pad."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    get_tokenizer()  # the same checks and one-line errors as every other use
    eot = "<|endoftext|>"  # transformers 5 reads extra_special_tokens, 4 additional_special_tokens
    ranks_file = local_ranks_file() or "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    TikTokenConverter(
        vocab_file=ranks_file, pattern=r50k_pat_str, extra_special_tokens=[eot], additional_special_tokens=[eot]
    ).converted().save(os.path.join(directory, "tokenizer.json"))
    # PreTrainedTokenizerFast reads tokenizer.json as it is (transformers 4 and 5); no clean-up: decode is exact
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=eot, eos_token=eot, pad_token=eot)
    config.update(model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def local_ranks_file():
    """GPT2_TIKTOKEN_FILE, else whisper's copy of GPT-2's ranks when whisper is installed, else None."""
    spec = importlib.util.find_spec("whisper")  # not imported: whisper itself needs heavy dependencies
    whisper_file = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken")
    return os.environ.get("GPT2_TIKTOKEN_FILE") or (whisper_file if os.path.exists(whisper_file or "") else None)
