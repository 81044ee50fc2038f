"""sample.py on a real tiny checkpoint (conftest's trained_log) and its export, against transformers'
own greedy generate."""

import io
import sys

import pytest
import torch

import sample
from logdir import model_from_checkpoint
from model import GPT

PROMPT = "The following identifiers are used as reserved words"


def test_greedy_equals_transformers_greedy_generate(trained_log, exported_run, tokenizer, run_main):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(exported_run).eval()
    prompt_ids = tokenizer.encode_ordinary(PROMPT)
    out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24)[0, len(prompt_ids) :]
    new_ids = [t for t in out.tolist() if t != 50256]  # transformers stops at <|endoftext|> and keeps it
    expected = PROMPT + tokenizer.decode(new_ids) + "\n"
    # The export, and the run's latest checkpoint it came from (vocab padded to 50304).
    for model in (exported_run, trained_log):
        code, out, err = run_main(
            sample.main, "-m", model, "--prompt", PROMPT, "--top-k", "1", "--max-new-tokens", "24", "--device", "cpu"
        )
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
        code, out, err = run_main(
            sample.main,
            "-m",
            trained_log,
            "--prompt",
            "Hello",
            "--num-samples",
            "3",
            "--max-new-tokens",
            "16",
            "--seed",
            seed,
        )
        assert code == 0, err
        return out.rstrip("\n").split("\n" + sample.SEPARATOR + "\n")

    first = samples(1)
    assert len(first) == 3 and all(s.startswith("Hello") for s in first) and len(set(first)) == 3
    assert samples(1) == first
    assert samples(2) != first


def latest_model(trained_log):
    return model_from_checkpoint(trained_log / "checkpoints" / "step_00000006.pt").eval()


def continuation(model, tokenizer, prompt_ids, *args, **kwargs):
    """The text model.generate adds after prompt_ids, up to its first <|endoftext|>: what sample.py must print."""
    new = model.generate(torch.tensor([prompt_ids]), *args, **kwargs)[0, len(prompt_ids) :].tolist()
    return tokenizer.decode(new[: new.index(50256)] if 50256 in new else new)


def test_the_defaults_and_each_sampling_flag_reach_the_sampler(trained_log, tokenizer, run_main):
    model, prompt_ids = latest_model(trained_log), tokenizer.encode_ordinary(PROMPT)
    # The defaults: 100 new tokens, temperature 1.0, top-k 50, seed 42.
    expected = continuation(
        model, tokenizer, prompt_ids, 100, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(42)
    )
    code, out, err = run_main(sample.main, "-m", trained_log, "--prompt", PROMPT)
    assert code == 0 and out == PROMPT + expected + "\n", err
    expected = continuation(
        model, tokenizer, prompt_ids, 20, temperature=0.5, top_k=0, generator=torch.Generator().manual_seed(3)
    )
    code, out, err = run_main(
        sample.main,
        "-m",
        trained_log,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "20",
        "--temperature",
        "0.5",
        "--top-k",
        "0",
        "--seed",
        "3",
    )
    assert code == 0 and out == PROMPT + expected + "\n", err


def test_no_prompt_starts_a_new_document(trained_log, tokenizer, run_main, monkeypatch):
    expected = continuation(latest_model(trained_log), tokenizer, [50256], 8, top_k=1)  # after <|endoftext|>
    code, out, err = run_main(sample.main, "-m", trained_log, "--prompt", "", "--top-k", "1", "--max-new-tokens", "8")
    assert code == 0 and out == expected + "\n", err
    # An empty --prompt is a prompt: stdin, piped (not a terminal), is not read.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n"))
    again = run_main(sample.main, "-m", trained_log, "--prompt", "", "--top-k", "1", "--max-new-tokens", "8")
    assert again == (code, out, err) and sys.stdin.read() == "Once upon a time\n"


def test_prompt_from_stdin(trained_log, run_main, monkeypatch):
    code, expected, _ = run_main(
        sample.main, "-m", trained_log, "--prompt", "  Once upon a time", "--top-k", "1", "--max-new-tokens", "8"
    )
    assert code == 0 and expected.startswith("  Once upon a time")
    monkeypatch.setattr(sys, "stdin", io.StringIO("  Once upon a time\n"))  # piped: not a terminal
    code, out, err = run_main(sample.main, "-m", trained_log, "--top-k", "1", "--max-new-tokens", "8")
    assert code == 0, err
    assert out == expected  # the line end that closes the input is not part of the prompt


def scripted_stream(rows, interrupt_after=None):
    """A GPT.stream that yields the given token ids column by column, (B, 1) each, as sampling would."""

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        for step, column in enumerate(zip(*rows)):
            if step == interrupt_after:
                raise KeyboardInterrupt
            yield torch.tensor(column).view(-1, 1)

    return stream


def test_a_character_split_over_tokens_is_streamed_whole(trained_log, tokenizer, run_main, monkeypatch):
    # 🤖 is three tokens and 日本 four, their first ones incomplete UTF-8: never printed as a replacement character.
    ids = tokenizer.encode_ordinary("🤖日本!")
    assert len(ids) == 8 and "\ufffd" in tokenizer.decode(ids[:1])
    monkeypatch.setattr(GPT, "stream", scripted_stream([ids + [50256, 11, 11]]))
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert sample.main(["-m", str(trained_log), "--prompt", "Hi"]) == 0
    assert "".join(writes) == "Hi🤖日本!\n"  # and it stopped at <|endoftext|>
    assert not any("\ufffd" in text for text in writes)


def test_each_sample_ends_at_its_own_end_of_text(trained_log, tokenizer, run_main, monkeypatch):
    a, b, c, d = (tokenizer.encode_ordinary(word) for word in (" one", " two", " three", " four"))
    rows = [a + [50256] + b + c, b + c + d + [50256]]  # the first ends early; what follows its end is not shown
    monkeypatch.setattr(GPT, "stream", scripted_stream(rows))
    code, out, err = run_main(sample.main, "-m", trained_log, "--prompt", "Hi", "--num-samples", "2")
    assert code == 0, err
    assert out == f"Hi one\n{sample.SEPARATOR}\nHi two three four\n"


def test_ctrl_c_while_sampling_stops_with_130(trained_log, tokenizer, run_main, monkeypatch):
    monkeypatch.setattr(GPT, "stream", scripted_stream([tokenizer.encode_ordinary(" one two three")], 2))
    code, out, _ = run_main(sample.main, "-m", trained_log, "--prompt", "Hi")
    assert code == 130 and out == "Hi one two\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0"], "temperature=0.0 must be positive"),
        (["--temperature", "nan"], "temperature=nan must be a finite number"),
        (["--temperature", "inf"], "temperature=inf must be a finite number"),
        (["--top-k", "-1", "--num-samples", "0"], "num_samples=0 must be positive; top_k=-1 must not be negative"),
        (["--max-new-tokens", "-5"], "max_new_tokens=-5 must not be negative"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--device", "toaster"], "--device toaster is not a device"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_exit_2(flags, message, trained_log, run_main):
    code, out, err = run_main(sample.main, "-m", trained_log, "--prompt", "Hi", *flags)
    assert code == 2 and out == ""
    assert err.startswith("sample.py: error: ") and err.count("\n") == 1 and message in err, err


def test_models_that_cannot_be_loaded_are_one_line_exit_1(tmp_path, run_main, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=101, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path / "small_vocab")
    (tmp_path / "empty_log").mkdir()
    capsys.readouterr()
    for model, message in [
        (tmp_path / "small_vocab", "has vocab_size 101; GPT-2's tokenizer needs 50257"),
        (tmp_path / "empty_log", "holds no readable checkpoint"),
        (tmp_path / "missing" / "step_1.pt", "not a local path, and the Hugging Face hub did not"),
    ]:
        code, out, err = run_main(sample.main, "-m", model, "--prompt", "Hi")
        assert code == 1 and out == ""
        # One error line, the last; transformers' loading bar may come before it.
        *before, error = err.splitlines()
        assert error.startswith("sample.py: error: ") and message in error, err
        assert all(not line or line.startswith("Loading weights") for line in before) and "Traceback" not in err
