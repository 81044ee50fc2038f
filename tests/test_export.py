"""export.py on a real tiny checkpoint (conftest's trained_log, vocab padded to 50304): the folder
loads in transformers as it is, and is checked against our model, tiktoken and metrics.jsonl."""

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open

import export
import tokenizer
from logdir import model_from_checkpoint
from model import GPT, GPTConfig

PROMPT = "Hello, I'm a language model,"


def last_evaluation(log_dir, key, step):
    """(step, value) of the last `key` in metrics.jsonl at or before `step`, read here independently."""
    with open(log_dir / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    return max((e["step"], e[key]) for e in events if key in e and e["step"] <= step)


def test_pipeline_loads_the_export_as_it_is_and_generates(exported_run):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(exported_run))
    text = generator(PROMPT)[0]["generated_text"]  # the folder's own generation config: top-k sampling
    ids, prompt_ids = generator.tokenizer(text)["input_ids"], generator.tokenizer(PROMPT)["input_ids"]
    assert text.startswith(PROMPT) and len(prompt_ids) < len(ids) <= len(prompt_ids) + 32  # max_new_tokens 32


def greedy_continuation(model, prompt_ids, max_new_tokens):
    """The reference: argmax over GPT-2's 50,257 logits, a full forward per token, up to <|endoftext|>."""
    idx = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx)[0][0, -1, :50257]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > 1e-4  # no near tie that rounding could turn either way
            next_id = logits.argmax().item()
            if next_id == 50256:
                break
            idx = torch.cat([idx, torch.tensor([[next_id]])], dim=1)
    return idx[0, len(prompt_ids) :].tolist()


def test_greedy_pipeline_output_equals_the_checkpoints_greedy_continuation(tokenizer, tmp_path):
    # A random GPT, perturbed so that greedy decoding does not repeat one token (the 6-step run does), saved as a
    # train_gpt2.py checkpoint with a padded vocabulary.
    from transformers import pipeline

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "wte" not in name and ".ln_" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    checkpoint = tmp_path / "step_00000010.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "step": 10}, checkpoint)
    assert export.main([str(checkpoint), str(tmp_path / "export")]) == 0
    new_ids = greedy_continuation(model, tokenizer.encode_ordinary(PROMPT), 24)
    assert len(set(new_ids)) > 5  # varied tokens: the comparison shows the order of the logits
    generator = pipeline("text-generation", model=str(tmp_path / "export"))
    text = generator(PROMPT, do_sample=False, max_new_tokens=24)[0]["generated_text"]
    assert text == PROMPT + tokenizer.decode(new_ids)


def test_export_logits_equal_the_checkpoints_and_bfloat16_stores_bfloat16(
    trained_log, exported_run, tmp_path, run_main
):
    from transformers import AutoModelForCausalLM

    model = model_from_checkpoint(trained_log / "checkpoints" / "step_00000006.pt").eval()
    assert model.config.vocab_size == 50304
    hf_model = AutoModelForCausalLM.from_pretrained(exported_run).eval()
    assert hf_model.config.vocab_size == 50257 and hf_model.dtype == torch.float32
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx)[0][..., :50257], atol=1e-5, rtol=0)

    bf16 = tmp_path / "bf16"
    bf16.mkdir()  # an empty directory is a fine place to export to
    assert run_main(export.main, trained_log, bf16, "--dtype", "bfloat16")[0] == 0
    with (
        safe_open(bf16 / "model.safetensors", "pt") as half,
        safe_open(exported_run / "model.safetensors", "pt") as full,
    ):
        assert set(half.keys()) == set(full.keys())
        for key in full.keys():
            assert half.get_tensor(key).dtype == torch.bfloat16, key
            assert torch.equal(half.get_tensor(key), full.get_tensor(key).to(torch.bfloat16)), key
    assert "weights in bfloat16" in (bf16 / "README.md").read_text()


ODD_TEXTS = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "  two leading, two trailing  ",
    "tabs\tand\r\nwindows\r\nlines\r\n",
    "trailing space ",
    "naïve café — “quotes” ‘single’ … ½ ©",
    "日本語のテキストと한국어",
    "emoji 🤖👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "zero\u200bwidth\u00a0nbsp\u2028line\u3000ideographic",
    "combining e\u0301 and precomposed é",
    "it's I'LL they've we'd YOU'RE",
    "12345678 3.14159 1,000,000 0x1F",
    "def f(x):\n    return x  # comment\n",
    "  \n \n\t\n",
    "a  \n b",
    "?!?!... ---- ====",
    "ŁÓDŹ Ελληνικά русский עברית العربية",
]


def random_texts(count, seed=0):
    """Seeded strings mixing scripts, digits, punctuation, emoji and every kind of whitespace."""
    pieces = list("aZé日本ü ß\u00a0\t\n\r  '0123.,!?-_()") + [
        "'s",
        "'ll",
        "🤖",
        "👍🏽",
        "\u200b",
        "\u2028",
        " the",
        "  ",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def test_autotokenizer_of_the_export_equals_tiktoken(exported_run, corpus_documents):
    from transformers import AutoTokenizer

    enc = tokenizer.get_tokenizer()
    hf_tokenizer = AutoTokenizer.from_pretrained(exported_run)
    for text in corpus_documents + ODD_TEXTS + random_texts(300):
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == enc.encode_ordinary(text), repr(text[:80])
        assert hf_tokenizer.decode(ids) == text, repr(text[:80])
    assert hf_tokenizer.bos_token_id == hf_tokenizer.eos_token_id == hf_tokenizer.pad_token_id == 50256
    assert hf_tokenizer("<|endoftext|>")["input_ids"] == [50256] and len(hf_tokenizer) == 50257
    assert hf_tokenizer.model_max_length == 64  # the model's block_size


def test_model_card_reports_the_run_up_to_the_exported_checkpoint(trained_log, exported_run, tmp_path, run_main):
    from transformers import AutoModelForCausalLM

    model = model_from_checkpoint(trained_log / "checkpoints" / "step_00000006.pt")
    exported_size = model.num_parameters() - (50304 - 50257) * model.config.n_embd  # padding rows dropped
    assert AutoModelForCausalLM.from_pretrained(exported_run).num_parameters() == exported_size
    card = (exported_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n# tiny-gpt2\n")
    assert (
        f"A GPT-2 model with {exported_size:,} parameters ({exported_size / 1e6:.1f}M): 2 layers, 2 heads, 32 "
        f"wide,\na context of 64 tokens, GPT-2's tokenizer (50,257 tokens); weights in float32."
    ) in card
    assert "6 steps of 128 tokens: 768 tokens in all" in card  # --max-steps 6, --total-batch-size 128
    val_step, val_loss = last_evaluation(trained_log, "val_loss", 6)
    hellaswag_step, hellaswag = last_evaluation(trained_log, "hellaswag_acc", 6)
    assert f"val loss: {val_loss:.4f} at step {val_step}" in card and val_step == 6
    assert f"HellaSwag acc_norm: {hellaswag:.4f} at step {hellaswag_step}" in card and hellaswag_step == 6
    assert f'pipeline("text-generation", model="{exported_run}")' in card

    # Step 3's checkpoint: the evaluations up to step 3, not the later ones of the same log.
    assert run_main(export.main, trained_log / "checkpoints" / "step_00000003.pt", tmp_path / "step3")[0] == 0
    card = (tmp_path / "step3" / "README.md").read_text()
    val_step, val_loss = last_evaluation(trained_log, "val_loss", 3)
    assert "3 steps of 128 tokens: 384 tokens in all" in card
    assert (
        f"val loss: {val_loss:.4f} at step 3" in card
        and f"{last_evaluation(trained_log, 'val_loss', 6)[1]:.4f}" not in card
    )

    # A checkpoint outside a log directory: no metrics to report, even with a metrics.jsonl two levels up.
    (tmp_path / "saved").mkdir()
    shutil.copy(trained_log / "checkpoints" / "step_00000006.pt", tmp_path / "saved" / "alone.pt")
    shutil.copy(trained_log / "metrics.jsonl", tmp_path / "metrics.jsonl")
    assert run_main(export.main, tmp_path / "saved" / "alone.pt", tmp_path / "alone")[0] == 0
    card = (tmp_path / "alone" / "README.md").read_text()
    assert "6 steps of 128 tokens" in card and "val loss" not in card and "HellaSwag" not in card

    # A log whose metrics.jsonl ends in a line cut short by a crash: the whole lines are reported.
    log = tmp_path / "crashed"
    shutil.copytree(trained_log / "checkpoints", log / "checkpoints")
    with open(log / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "val_loss": 7.25}) + "\n" + '{"step": 3, "val_lo')
    assert run_main(export.main, log, tmp_path / "crashed-export")[0] == 0
    assert "val loss: 7.2500 at step 2" in (tmp_path / "crashed-export" / "README.md").read_text()


def tiny_checkpoint(path, vocab_size, **extra):
    """A train_gpt2.py-style checkpoint of a random 1-layer GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), **extra}, path)
    return model


def test_a_checkpoint_without_a_step_or_gpt2s_vocabulary_exports_without_them(tmp_path, run_main):
    from transformers import AutoModelForCausalLM

    model = tiny_checkpoint(tmp_path / "small.pt", vocab_size=101)
    code, out, err = run_main(export.main, tmp_path / "small.pt", tmp_path / "small")
    assert code == 0, err
    assert out == f"exported step None of {tmp_path / 'small.pt'} to {tmp_path / 'small'} (float32)\n"
    # 101 token ids: GPT-2's tokenizer would name ids the model does not have, so the folder has none.
    assert sorted(os.listdir(tmp_path / "small")) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    card = (tmp_path / "small" / "README.md").read_text()
    assert "a context of 16 tokens, 101 token ids (no tokenizer); weights in float32." in card
    assert "## Training\nNot recorded.\n" in card
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model.eval()(idx)[0], atol=1e-5, rtol=0)


def test_save_folder_never_writes_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    hf_model = export.to_hf(tiny_checkpoint(tmp_path / "small.pt", vocab_size=101))
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        export.save_folder(hf_model, str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["mine.txt"]


def test_a_failed_export_leaves_nothing_behind(trained_log, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(tokenizer, "save_for_transformers", broken)  # after the weights are written
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="caught fire"):
        export.main([str(trained_log), str(tmp_path / "out")])
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []  # no staging folder left


@pytest.mark.parametrize(
    "case, exit_code, message",
    [
        ("not a checkpoint", 1, "is not a readable checkpoint"),
        ("no such file", 1, "does not exist"),
        ("log dir without checkpoints", 1, "holds no readable checkpoint"),
        ("output dir not empty", 2, "already exists and is not an empty directory"),
        ("output is a file", 2, "already exists and is not an empty directory"),
        ("no output dir", 2, "required: output_dir"),
        ("bad dtype", 2, "invalid choice: 'int8'"),
    ],
)
def test_errors_are_one_line(case, exit_code, message, trained_log, tmp_path, run_main):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    argv = {
        "not a checkpoint": [tmp_path / "notes.txt", tmp_path / "out"],
        "no such file": [tmp_path / "missing.pt", tmp_path / "out"],
        "log dir without checkpoints": [tmp_path / "full", tmp_path / "out"],
        "output dir not empty": [trained_log, tmp_path / "full"],
        "output is a file": [trained_log, tmp_path / "notes.txt"],
        "no output dir": [trained_log],
        "bad dtype": [trained_log, tmp_path / "out", "--dtype", "int8"],
    }[case]
    code, _, err = run_main(export.main, *argv)
    assert code == exit_code
    assert err.startswith("export.py: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path / "full") == ["keep.txt"]
    assert (tmp_path / "notes.txt").read_text() == "not a checkpoint\n"


def test_the_model_cards_example_runs_without_a_warning(exported_run, capsys):
    # The card's own example, run as a user would, then with a max_new_tokens of the user's: transformers says
    # nothing (it warns when a folder's max_length meets a caller's max_new_tokens, through its logger)
    import logging
    import logging.handlers
    import re

    from transformers import pipeline
    from transformers.utils import logging as transformers_logging

    example = re.search(r"```python\n(.*?)```", (exported_run / "README.md").read_text(), re.DOTALL).group(1)
    example = example.replace(f'model="{exported_run}"', f"model={str(exported_run)!r}")
    said = logging.handlers.BufferingHandler(capacity=1000)
    transformers_logging.get_logger().addHandler(said)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exec(example, {})
            pipeline("text-generation", model=str(exported_run))("Once upon a time", max_new_tokens=5)
    finally:
        transformers_logging.get_logger().removeHandler(said)
    assert capsys.readouterr().out.startswith("Once upon a time")
    assert [record.getMessage() for record in said.buffer if record.levelno >= logging.WARNING] == []


def test_the_next_export_removes_a_killed_exports_staging_folder(tmp_path):
    # A staging folder named as save_folder names them, by a process that is gone (killed mid-export), one by a
    # live process (an export running now) and one from another machine (its process cannot be asked)
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed, running = tmp_path / f".a.{host}.{gone.stdout.strip()}.tmp", tmp_path / f".b.{host}.{os.getpid()}.tmp"
    elsewhere = tmp_path / f".c.another-host.{gone.stdout.strip()}.tmp"
    for staging in (killed, running, elsewhere):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half written")
    export.save_folder(export.to_hf(tiny_checkpoint(tmp_path / "small.pt", vocab_size=101)), str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == sorted([running.name, elsewhere.name, "new", "small.pt"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_exported_file_has_the_permissions_the_umask_gives(tmp_path, umask):
    hf_model = export.to_hf(tiny_checkpoint(tmp_path / "small.pt", vocab_size=50257))
    previous = os.umask(umask)
    try:
        export.save_folder(hf_model, str(tmp_path / "out"))
    finally:
        os.umask(previous)
    modes = {name: os.stat(tmp_path / "out" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "out")}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_to_hf_round_trips_into_transformers_without_dropout_and_samples_as_generate(tmp_path):
    # A random GPT, perturbed so that a transposed or misplaced weight shows; its export in transformers gives the
    # same logits, in eval and in train mode (ours has no dropout, nor has its export), and samples as generate()
    from transformers import GenerationConfig, GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=40, vocab_size=101, n_layer=3, n_head=3, n_embd=48)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    export.save_folder(export.to_hf(model), str(tmp_path / "export"))
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded.train()(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    generation = GenerationConfig.from_pretrained(tmp_path / "export")
    assert (generation.do_sample, generation.top_k, generation.max_new_tokens) == (True, 50, 32)
    assert generation.eos_token_id == generation.pad_token_id == generation.bos_token_id == 50256
