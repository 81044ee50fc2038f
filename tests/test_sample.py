"""sample.py on a real tiny checkpoint (conftest's trained_log) and its export, against transformers'
own greedy generate."""

import io
import os
import subprocess
import sys

import pytest
import torch

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The following identifiers are used as reserved words"


def test_greedy_equals_transformers_greedy_generate(trained_log, exported_run, tokenizer, run_main):
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_pretrained(exported_run).eval()
    prompt_ids = tokenizer.encode_ordinary(PROMPT)
    out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24)[0, len(prompt_ids):]
    new_ids = [t for t in out.tolist() if t != 50256]  # transformers stops at <|endoftext|> and keeps it
    expected = PROMPT + tokenizer.decode(new_ids) + "\n"
    # The export, and the run's latest checkpoint it came from (vocab padded to 50304).
    for model in (exported_run, trained_log):
        code, out, err = run_main(sample.main, "-m", model, "--prompt", PROMPT, "--top-k", "1",
                                  "--max-new-tokens", "24", "--device", "cpu")
        assert code == 0, err
        assert out == expected


def test_one_sample_is_streamed_token_by_token(trained_log, run_main, monkeypatch):
    code, expected, _ = run_main(sample.main, "-m", trained_log, "--prompt", PROMPT, "--max-new-tokens", "24")
    assert code == 0
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            if text:
                writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert sample.main(["-m", str(trained_log), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    assert "".join(writes) == expected
    assert len(writes) >= 12  # the prompt, then a piece per token or two: not one print at the end


def test_same_seed_same_text_other_seed_other_text(trained_log, run_main):
    def samples(seed):
        code, out, err = run_main(sample.main, "-m", trained_log, "--prompt", "Hello", "--num-samples", "3",
                                  "--max-new-tokens", "16", "--seed", seed)
        assert code == 0, err
        return out.rstrip("\n").split("\n" + sample.SEPARATOR + "\n")

    first = samples(1)
    assert len(first) == 3 and all(s.startswith("Hello") for s in first) and len(set(first)) == 3
    assert samples(1) == first
    assert samples(2) != first


def test_prompt_from_stdin(trained_log, run_main):
    code, expected, _ = run_main(sample.main, "-m", trained_log, "--prompt", "Once upon a time", "--top-k", "1",
                                 "--max-new-tokens", "8")
    assert code == 0 and expected.startswith("Once upon a time")
    command = [sys.executable, "sample.py", "-m", str(trained_log), "--top-k", "1", "--max-new-tokens", "8"]
    proc = subprocess.run(command, input="Once upon a time\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["--temperature", "nan"], "--temperature must be a positive number, got nan"),
    (["--top-k", "-1", "--num-samples", "0"], "--num-samples must be at least 1, got 0; --top-k must be at least 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 0, got -5"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--device", "toaster"], "--device toaster is not a device"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_exit_2(flags, message, trained_log, run_main):
    code, out, err = run_main(sample.main, "-m", trained_log, "--prompt", "Hi", *flags)
    assert code == 2 and out == ""
    assert err.startswith("sample.py: error: ") and err.count("\n") == 1 and message in err, err


def test_models_that_cannot_be_loaded_are_one_line_exit_1(tmp_path, run_main, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=101,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "small_vocab")
    (tmp_path / "empty_log").mkdir()
    capsys.readouterr()
    for model, message in [(tmp_path / "small_vocab", "has vocab_size 101; GPT-2's tokenizer needs 50257"),
                           (tmp_path / "empty_log", "holds no readable checkpoint"),
                           (tmp_path / "missing" / "step_1.pt", "not a local path, and the Hugging Face hub did not")]:
        code, out, err = run_main(sample.main, "-m", model, "--prompt", "Hi")
        assert code == 1 and out == ""
        # One error line, the last; transformers' loading bar may come before it.
        *before, error = err.splitlines()
        assert error.startswith("sample.py: error: ") and message in error, err
        assert all(not line or line.startswith("Loading weights") for line in before) and "Traceback" not in err
