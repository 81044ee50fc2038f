"""play.ipynb runs headlessly on the log of a short real training run (conftest's trained_log), draws
its figures and samples: from the run's latest checkpoint, or from a Hugging Face folder (PLAY_MODEL)."""

import json
import os

import matplotlib.image
import nbformat
import numpy as np
import torch
from nbclient import NotebookClient

from logdir import model_from_checkpoint
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The notebook's figures: figsize=(8, 5) inches saved at dpi=120, matplotlib's default colour cycle.
FIGURE_WIDTH, FIGURE_HEIGHT = 8 * 120, 5 * 120
C0, C1, RED, GREEN = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0xFF, 0, 0), (0, 0x80, 0)


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
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def pixels_of(image, rgb, alpha=1.0):
    """How many pixels of image (H, W, 3 or 4 floats) show the colour rgb (0-255) drawn at alpha over white."""
    colour = alpha * np.array(rgb) / 255 + (1 - alpha)
    return int((np.abs(image[..., :3] - colour).max(axis=-1) < 0.03).sum())


def read_plot(path):
    """A saved figure, decoded: a real image of about the figure's size, not one colour."""
    image = matplotlib.image.imread(path)  # fails on anything but an image file
    height, width = image.shape[:2]
    # bbox_inches="tight" trims the empty margin and takes in labels that stick out: within 15% of figsize * dpi.
    assert 0.85 * FIGURE_WIDTH <= width <= 1.15 * FIGURE_WIDTH, (path, width)
    assert 0.85 * FIGURE_HEIGHT <= height <= 1.15 * FIGURE_HEIGHT, (path, height)
    assert image[..., :3].std() > 0.05, path  # not blank
    return image


def assert_loss_plot(log_dir):
    image = read_plot(log_dir / "loss.png")
    # The train loss (C0 at alpha 0.6), the val loss (C1) and GPT-2's val loss (red, dashed) are drawn.
    assert pixels_of(image, C0, alpha=0.6) > 100 and pixels_of(image, C1) > 100 and pixels_of(image, RED) > 100


def expected_samples(model, tokenizer):
    """The notebook's four samples, made here from a model loaded by the test (same prompt and seed)."""
    prompt = torch.tensor([tokenizer.encode_ordinary("Hello, I'm a language model,")] * 4)
    out = model.eval().generate(prompt, 32, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(42))
    return [f"sample {i}: {tokenizer.decode(row)!r}" for i, row in enumerate(out.tolist())]


def printed_samples(text):
    return [line for line in text.splitlines() if line.startswith("sample ")]


def test_notebook_plots_a_real_run_and_samples_its_latest_checkpoint(trained_log, tokenizer, monkeypatch):
    text = run_notebook(trained_log, monkeypatch)
    assert_loss_plot(trained_log)
    hellaswag = read_plot(trained_log / "hellaswag.png")  # this run's accuracy (C0), GPT-2 (red) and GPT-3 (green)
    assert pixels_of(hellaswag, C0) > 100 and pixels_of(hellaswag, RED) > 100 and pixels_of(hellaswag, GREEN) > 100
    assert "6 train steps, 3 val evaluations, 3 HellaSwag evaluations" in text  # evals at steps 0, 3 and 6
    assert "128 tokens per step: 768 tokens seen by step 6" in text  # --total-batch-size 128, from log.txt
    assert f"sampling from {trained_log} (its latest checkpoint)" in text
    # The samples are those of step 6's checkpoint, not step 3's.
    checkpoints = trained_log / "checkpoints"
    samples = printed_samples(text)
    assert samples == expected_samples(model_from_checkpoint(checkpoints / "step_00000006.pt"), tokenizer)
    assert samples != expected_samples(model_from_checkpoint(checkpoints / "step_00000003.pt"), tokenizer)
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
    assert_loss_plot(log_dir)
    hellaswag = read_plot(log_dir / "hellaswag.png")  # the reference lines, and no curve of this run
    assert pixels_of(hellaswag, C0) == 0 and pixels_of(hellaswag, RED) > 100 and pixels_of(hellaswag, GREEN) > 100
    assert "6 train steps, 3 val evaluations, 0 HellaSwag evaluations" in text
    assert "tokens per step" not in text
    assert f"sampling from {exported_run}: " in text
    assert printed_samples(text) == expected_samples(GPT.from_pretrained(str(exported_run)), tokenizer)
