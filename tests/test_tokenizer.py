"""tokenizer.py: GPT-2's tokenizer offline, and a clear error for a wrong vocabulary file."""

import os
import subprocess
import sys

from tokenizer import EOT, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_offline_tokenizer_is_gpt2s():
    enc = get_tokenizer()
    # GPT-2's published ids for the prompt of its samples, and its <|endoftext|>
    assert enc.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT] and enc.n_vocab == 50257
    assert enc.decode(enc.encode_ordinary(" naïve café, 1984!")) == " naïve café, 1984!"


def test_a_wrong_vocabulary_file_is_refused_with_one_line(tmp_path, corpus_documents):
    wrong = tmp_path / "gpt2.tiktoken"
    wrong.write_text(corpus_documents[0])
    # In a fresh process, since get_tokenizer() is cached: the training script's error path.
    result = subprocess.run([sys.executable, "train_gpt2.py", "--demo", "--data-dir", str(tmp_path / "d"),
                             "--log-dir", str(tmp_path / "l")], cwd=ROOT,
                            env={**os.environ, "GPT2_TIKTOKEN_FILE": str(wrong)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "is not GPT-2's vocabulary" in result.stderr and "GPT2_TIKTOKEN_FILE" in result.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "l").exists()  # nothing written
