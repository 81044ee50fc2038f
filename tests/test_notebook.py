"""play.ipynb runs headlessly on the log of a short real training run and draws its figures."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

import fineweb
import train_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_log(tmp_path_factory, corpus_documents):
    """A 6-step training run of a tiny GPT on Python's reference manual, with val and HellaSwag evals at steps 0, 3 and 6."""
    tmp = tmp_path_factory.mktemp("run")
    data_dir, log_dir = tmp / "data", tmp / "log"
    fineweb.write_shards(corpus_documents, str(data_dir), "pydocs", shard_size=8192, num_proc=1, progress=False)
    # A few real HellaSwag-format examples so the run logs hellaswag_acc too.
    hellaswag_file = tmp / "hellaswag.jsonl"
    with open(hellaswag_file, "w") as f:
        for ctx, endings, label in [
            ("The chef cracked two eggs into the bowl and", [" whisked them with a fork.", " painted the ceiling.",
                                                             " drove to the airport.", " sang to the moon."], 0),
            ("She tied her running shoes, stepped outside and", [" fell asleep on the sofa.", " started to jog.",
                                                                 " baked a cake.", " read the newspaper."], 1),
        ]:
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": label}) + "\n")
    train_gpt2.main([
        "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--n-layer", "2", "--n-head", "2",
        "--n-embd", "32", "--block-size", "64", "--vocab-size", "50304", "--seq-len", "32", "--batch-size", "4",
        "--total-batch-size", "128", "--max-steps", "6", "--warmup-steps", "2", "--max-lr", "1e-2",
        "--min-lr", "1e-3", "--eval-interval", "3", "--val-tokens", "256", "--hellaswag-interval", "3",
        "--hellaswag-file", str(hellaswag_file), "--sample-interval", "0", "--checkpoint-interval", "3",
        "--no-compile", "--dtype", "float32", "--device", "cpu",
    ])
    return log_dir


def test_notebook_plots_a_real_run_and_samples(trained_log, monkeypatch):
    with open(os.path.join(ROOT, "play.ipynb")) as f:
        notebook = nbformat.read(f, as_version=4)
    # Committed without outputs, so a diff shows code only.
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    monkeypatch.setenv("PLAY_LOG_DIR", str(trained_log))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()

    for name in ("loss.png", "hellaswag.png"):
        with open(trained_log / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name  # a real PNG file
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "6 train steps, 3 val evaluations, 3 HellaSwag evaluations"  # steps 0, 3 and 6 in text
    # The samples come from the run's latest checkpoint and continue the prompt.
    assert "step_00000006.pt" in text
    samples = [line for line in text.splitlines() if line.startswith("sample ")]
    assert len(samples) == 4 and all("m a language model," in s for s in samples)
