"""play.ipynb runs headlessly on the log of a short real training run (conftest's trained_log), draws
its figures and samples: from the run's latest checkpoint, or from a Hugging Face folder (PLAY_MODEL)."""

import json
import os

import nbformat
import torch
from nbclient import NotebookClient

from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(log_dir, monkeypatch, model=""):
    """Execute play.ipynb on log_dir (PLAY_MODEL=model); returns everything it printed."""
    with open(os.path.join(ROOT, "play.ipynb")) as f:
        notebook = nbformat.read(f, as_version=4)
    # Committed without outputs, so a diff shows code only.
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    monkeypatch.setenv("PLAY_LOG_DIR", str(log_dir))
    monkeypatch.setenv("PLAY_MODEL", model)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for name in ("loss.png", "hellaswag.png"):
        with open(os.path.join(log_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name  # a real PNG file
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def expected_samples(model, tokenizer):
    """The notebook's four samples, made here from a model loaded by the test (same prompt and seed)."""
    prompt = torch.tensor([tokenizer.encode_ordinary("Hello, I'm a language model,")] * 4)
    out = model.eval().generate(prompt, 32, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(42))
    return [f"sample {i}: {tokenizer.decode(row)!r}" for i, row in enumerate(out.tolist())]


def printed_samples(text):
    return [line for line in text.splitlines() if line.startswith("sample ")]


def test_notebook_plots_a_real_run_and_samples_its_latest_checkpoint(trained_log, tokenizer, monkeypatch):
    text = run_notebook(trained_log, monkeypatch)
    assert "6 train steps, 3 val evaluations, 3 HellaSwag evaluations" in text  # evals at steps 0, 3 and 6
    assert "128 tokens per step: 768 tokens seen by step 6" in text  # --total-batch-size 128, from log.txt
    assert f"sampling from {trained_log} (its latest checkpoint)" in text
    # The samples are those of step 6's checkpoint, not step 3's.
    checkpoints = trained_log / "checkpoints"
    samples = printed_samples(text)
    assert samples == expected_samples(GPT.from_checkpoint(checkpoints / "step_00000006.pt"), tokenizer)
    assert samples != expected_samples(GPT.from_checkpoint(checkpoints / "step_00000003.pt"), tokenizer)
    assert all("m a language model," in s for s in samples)


def test_notebook_without_hellaswag_samples_play_model(trained_log, exported_run, tokenizer, tmp_path, monkeypatch):
    # A log with no HellaSwag evaluations and no log.txt (so no tokens per step), and a model to
    # sample from given as PLAY_MODEL: export.py's Hugging Face folder.
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    with open(trained_log / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    with open(log_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events if "hellaswag_acc" not in e)
    text = run_notebook(log_dir, monkeypatch, model=str(exported_run))
    assert "6 train steps, 3 val evaluations, 0 HellaSwag evaluations" in text
    assert "tokens per step" not in text
    assert f"sampling from {exported_run}: " in text
    assert printed_samples(text) == expected_samples(GPT.from_pretrained(str(exported_run)), tokenizer)
