"""tokenizer.py: GPT-2's tokenizer offline, and a clear error for a wrong vocabulary file."""

import os
import shutil

import pytest
import tiktoken

import tokenizer
from tokenizer import EOT, get_tokenizer


def test_offline_tokenizer_is_gpt2s():
    enc = get_tokenizer()
    # GPT-2's published ids for the prompt of its samples, and its <|endoftext|>
    assert enc.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256] == [EOT] and enc.n_vocab == 50257
    assert enc.decode(enc.encode_ordinary(" naïve café, 1984!")) == " naïve café, 1984!"


def test_a_wrong_vocabulary_file_is_refused_with_one_line(tmp_path, corpus_documents, run_main, fresh_tokenizer):
    import train_gpt2

    wrong = tmp_path / "gpt2.tiktoken"
    wrong.write_text(corpus_documents[0])
    # The training script's error path, in this process: fresh_tokenizer empties get_tokenizer()'s cache before (the
    # wrong file is read, as in a new process) and after (the right one again).
    fresh_tokenizer.setenv("GPT2_TIKTOKEN_FILE", str(wrong))
    code, _, err = run_main(train_gpt2.main, "--demo", "--data-dir", tmp_path / "d", "--log-dir", tmp_path / "l")
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "is not GPT-2's vocabulary" in err and "GPT2_TIKTOKEN_FILE" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "l").exists()  # nothing written


@pytest.fixture
def fresh_tokenizer(monkeypatch):
    """get_tokenizer() loads afresh in this test (it is cached), with the environment the test sets."""
    get_tokenizer.cache_clear()
    yield monkeypatch
    get_tokenizer.cache_clear()


def test_a_ranks_file_that_parses_but_is_not_gpt2s_is_refused(tmp_path, fresh_tokenizer):
    # GPT-2's own ranks with the last merge left out: a well-formed file that only its sha256 tells apart.
    lines = open(tokenizer.local_ranks_file(), "rb").read().splitlines(keepends=True)
    (tmp_path / "gpt2.tiktoken").write_bytes(b"".join(lines[:-1]))
    fresh_tokenizer.setenv("GPT2_TIKTOKEN_FILE", str(tmp_path / "gpt2.tiktoken"))
    with pytest.raises(OSError, match="gpt2.tiktoken is not GPT-2's vocabulary; unset GPT2_TIKTOKEN_FILE"):
        get_tokenizer()
    with pytest.raises(OSError, match="is not GPT-2's vocabulary"):  # before anything is written
        tokenizer.save_for_transformers(str(tmp_path), model_max_length=64)
    assert sorted(os.listdir(tmp_path)) == ["gpt2.tiktoken"]


def test_without_a_local_file_or_the_network_the_error_says_how_to_get_one(fresh_tokenizer):
    def offline(name):
        raise ConnectionError("no network")

    fresh_tokenizer.setattr(tokenizer, "local_ranks_file", lambda: None)
    fresh_tokenizer.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(OSError, match=r"cannot download GPT-2's vocabulary \(ConnectionError\); offline, `pip"):
        get_tokenizer()


def test_the_ranks_file_named_by_gpt2_tiktoken_file_is_used(tmp_path, fresh_tokenizer):
    shutil.copy(tokenizer.local_ranks_file(), tmp_path / "mine.tiktoken")
    fresh_tokenizer.setenv("GPT2_TIKTOKEN_FILE", str(tmp_path / "mine.tiktoken"))
    assert tokenizer.local_ranks_file() == str(tmp_path / "mine.tiktoken")
    assert get_tokenizer().encode_ordinary("Hello, I'm a language model,")[:3] == [15496, 11, 314]


TEXTS = [
    "Hello, I'm a language model,",
    "it's I'LL they've we'd YOU'RE",
    "12345678 3.14159 1,000,000",
    "  two leading, two trailing  ",
    "tabs\tand\r\nwindows\r\n",
    "naïve café — “quotes” 日本語 🤖👍🏽",
    "def f(x):\n    return x  # comment\n",
    "a <|endoftext|> in the text",
    "?!?!... ----\n\n\n",
]


def test_transformers_reads_the_saved_tokenizer_as_tiktoken_encodes(tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_for_transformers(str(tmp_path), model_max_length=64)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    enc = get_tokenizer()
    for text in TEXTS:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == enc.encode(text, allowed_special="all"), text
        assert hf_tokenizer.decode(ids) == text, text
    assert hf_tokenizer.decode([15496, 11, 220, 220, 995, 13]) == "Hello,   world."  # spaces as they are
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (50256,) * 3
    assert len(hf_tokenizer) == 50257 and hf_tokenizer.model_max_length == 64
    assert type(hf_tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
