"""logdir.py, a run's log directory: checkpoints written, read back, chosen, pruned and set aside; one run per
directory and one launch at a time; one metrics history however often the run resumes; the dashboards.

The settings are train_gpt2.parse_args' of a tiny model; the model is a real GPT of 1 layer; the shards are a
few hundred random tokens. Expectations are literals, numpy, json and torch.load reading the files back.
"""

import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import threading
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch

from common import UserError
from loader import ShardLoader
from logdir import (
    RunLog,
    choose_checkpoint,
    claim_log_dir,
    list_checkpoints,
    load_checkpoint,
    run_header,
    save_checkpoint,
)
from model import GPT, GPTConfig
from train_gpt2 import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a run writes into its log directory, and so what --overwrite removes: the README's list.
RUN_FILES = ["checkpoints", "metrics.jsonl", "log.txt", "config.toml", "abandoned", "tensorboard", "wandb_run_id"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three train shards and a val shard of random tokens below 64."""
    path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for index, length in enumerate([120, 200, 90, 150]):
        split = "val" if index == 0 else "train"
        np.save(path / f"tiny_{split}_{index:06d}.npy", rng.integers(0, 64, length, dtype=np.uint16))
    return str(path)


# A tiny model on the CPU, nothing downloaded (no HellaSwag, no samples).
TINY_RUN = (
    "--n-layer 1 --n-head 2 --n-embd 8 --block-size 16 --vocab-size 64 --seq-len 8 --batch-size 2 "
    "--total-batch-size 16 --max-steps 10 --warmup-steps 1 --device cpu --dtype float32 --no-compile "
    "--hellaswag-interval 0 --sample-interval 0"
).split()


def settings(log_dir, *flags, data_dir="data"):
    return parse_args(["--data-dir", data_dir, "--log-dir", str(log_dir), *TINY_RUN, *map(str, flags)])


def tiny_model(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8))


def write_checkpoint(log_dir, step, contents=None):
    """A file that read_checkpoint accepts (or, with contents, any bytes) at the step's name."""
    path = os.path.join(log_dir, "checkpoints", f"step_{step:08d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if contents is None:
        torch.save({"model": {}, "model_config": {}, "step": step}, path)
    else:
        with open(path, "wb") as f:
            f.write(contents)
    return path


def listing(directory):
    """Every path under directory with its bytes (None for directories)."""
    found = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(parent, name), directory)] = None
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                found[os.path.relpath(os.path.join(parent, name), directory)] = f.read()
    return found


# -----------------------------------------------------------------------------
# Checkpoints: written, read back, pruned


def test_a_checkpoint_restores_the_model_optimizer_loader_scaler_and_rngs(tmp_path, shards):
    config = settings(tmp_path / "log", "--keep-checkpoints", 2, data_dir=shards)
    model, loader = tiny_model(0), ShardLoader(shards, "train", 2, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):  # the optimizer has moments, the loader has moved
        x, y = loader.next_batch()
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    # an odd number of normal draws leaves numpy's cached second gauss in its state
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.standard_normal()
    path = save_checkpoint(config, 7, model, optimizer, loader, scaler)
    assert path == str(tmp_path / "log" / "checkpoints" / "step_00000007.pt")
    draws = torch.rand(3), random.random(), np.random.standard_normal(3)
    batches = [loader.next_batch() for _ in range(3)]

    checkpoint = torch.load(path, weights_only=True)  # plain tensors and values, no pickled code
    assert set(checkpoint) == {"model", "model_config", "optimizer", "step", "config", "loader", "rng", "scaler"}
    assert checkpoint["step"] == 7
    assert checkpoint["model_config"] == {"block_size": 16, "vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 8}
    assert checkpoint["config"] == asdict(config) and checkpoint["config"]["log_dir"] == str(tmp_path / "log")
    assert checkpoint["loader"] == {"epoch": 0, "row": 6, "num_tokens": 440, "seq_len": 8}
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])

    fresh_model, fresh_loader = tiny_model(1), ShardLoader(shards, "train", 2, 8)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=5.0)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    assert load_checkpoint(checkpoint, fresh_model, fresh_optimizer, fresh_loader, fresh_scaler) == 7
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]  # lr 1e-3, not 5.0
    assert len(restored["state"]) == len(saved["state"]) > 0
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    assert fresh_scaler.get_scale() == 1024.0
    again = torch.rand(3), random.random(), np.random.standard_normal(3)
    assert torch.equal(again[0], draws[0]) and again[1] == draws[1] and np.array_equal(again[2], draws[2])
    for (x1, y1), (x2, y2) in zip(batches, (fresh_loader.next_batch() for _ in range(3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)

    # Without a gradient scaler (float32, bfloat16) there is none to save or load.
    path = save_checkpoint(config, 8, model, optimizer, loader)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["scaler"] is None
    assert load_checkpoint(checkpoint, fresh_model, fresh_optimizer, fresh_loader) == 8


def test_only_the_latest_checkpoints_are_kept(tmp_path, shards):
    config = settings(tmp_path, "--keep-checkpoints", 3, data_dir=shards)
    model, loader = tiny_model(0), ShardLoader(shards, "train", 2, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"the user's own file")
    steps = [3, 40, 500, 6000, 70000, 800000, 9000000]
    for i, step in enumerate(steps):
        save_checkpoint(config, step, model, optimizer, loader)
        kept = [f"step_{s:08d}.pt" for s in steps[max(0, i - 2) : i + 1]]
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best.pt"] + kept
        assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoints" / name) for name in kept]
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == b"the user's own file"


def test_a_checkpoint_that_cannot_be_written(tmp_path, shards):
    config = settings(tmp_path, data_dir=shards)
    (tmp_path / "checkpoints").write_text("a file where the directory should be")
    model = tiny_model(0)
    with pytest.raises(UserError) as error:
        save_checkpoint(config, 5, model, torch.optim.AdamW(model.parameters()), ShardLoader(shards, "train", 2, 8))
    message = str(error.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'checkpoints' / 'step_00000005.pt'} (")
    assert message.endswith("); free some space and relaunch to resume")
    assert error.value.exit_code == 1 and error.value.every_rank is False  # rank 0's own problem: it prints it


# -----------------------------------------------------------------------------
# claim_log_dir: one run per directory, one launch at a time


def test_a_new_directory_is_made_and_locked(tmp_path, lock_in_another_process):
    log_dir = tmp_path / "runs" / "first"
    with claim_log_dir(settings(log_dir, "--resume", "never")):
        assert os.listdir(log_dir) == [".lock"]
        assert lock_in_another_process(log_dir) == (
            f"refused: {log_dir} is in use by another test run "
            f"(pid {os.getpid()} on {socket.gethostname()}); wait for it to end, "
            f"or use another directory (exit code 1)"
        )
    assert lock_in_another_process(log_dir) == "locked"


@pytest.mark.parametrize("run", [["metrics.jsonl"], ["checkpoints/step_00000004.pt"]])
def test_a_directory_holding_a_run_is_refused_with_resume_never(tmp_path, run):
    for name in run + ["notes.txt"]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("kept")
    before = listing(tmp_path)
    with pytest.raises(UserError) as error, claim_log_dir(settings(tmp_path, "--resume", "never")):
        pass
    assert str(error.value) == (
        f"{tmp_path} holds a run ({run[0].split('/')[0]}); continue it with --resume auto, "
        f"start a new run there with --overwrite (deletes those), or use another --log-dir"
    )
    assert error.value.exit_code == 2
    assert listing(tmp_path) == before  # refused before anything is touched: not even a lock file


def test_a_directory_without_a_run_is_used_as_it_is(tmp_path):
    (tmp_path / "log.txt").write_text("an old text log, but no metrics and no checkpoint")
    (tmp_path / "config.toml").write_text("seed = 1\n")
    with claim_log_dir(settings(tmp_path, "--resume", "never")):
        pass
    assert sorted(os.listdir(tmp_path)) == [".lock", "config.toml", "log.txt"]


@pytest.mark.parametrize("resume", ["auto", "checkpoint"])
def test_resuming_a_run_keeps_it_and_clears_half_written_checkpoints(tmp_path, resume):
    checkpoint = write_checkpoint(tmp_path, 4)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 4.2}\n')
    stale = tmp_path / "checkpoints" / ".step_00000008.pt.host.1234.tmp"  # a launch killed while writing it
    stale.write_bytes(b"half")
    (tmp_path / ".metrics.jsonl.host.99.tmp").write_bytes(b"not ours to remove")
    with claim_log_dir(settings(tmp_path, "--resume", checkpoint if resume == "checkpoint" else "auto")):
        pass
    assert sorted(listing(tmp_path)) == [
        ".lock",
        ".metrics.jsonl.host.99.tmp",
        "checkpoints",
        "checkpoints/step_00000004.pt",
        "metrics.jsonl",
    ]


def test_overwrite_removes_the_run_files_and_nothing_else(tmp_path, capsys):
    for name in [
        "checkpoints/step_00000004.pt",
        "abandoned/20240101-000000/step_00000008.pt",
        "tensorboard/events.out.tfevents.1",
        "metrics.jsonl",
        "log.txt",
        "config.toml",
        "wandb_run_id",
        "notes.txt",
        "data/tiny_train_000001.npy",
    ]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(name)
    with claim_log_dir(settings(tmp_path, "--overwrite", "--resume", "never")):
        pass
    assert sorted(listing(tmp_path)) == [".lock", "data", "data/tiny_train_000001.npy", "notes.txt"]
    assert capsys.readouterr().out == f"--overwrite: removed the earlier run's {', '.join(RUN_FILES)} from {tmp_path}\n"


def test_a_log_dir_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    refused = r"^cannot create --log-dir .*file/log \(Not a directory\)$"
    with pytest.raises(UserError, match=refused) as error, claim_log_dir(settings(tmp_path / "file" / "log")):
        pass
    assert error.value.exit_code == 2


# -----------------------------------------------------------------------------
# choose_checkpoint: which one a launch resumes from


def test_resume_auto_takes_the_latest_readable_checkpoint(tmp_path, capsys):
    assert choose_checkpoint(settings(tmp_path)) == (None, None)  # a new run
    paths = [write_checkpoint(tmp_path, step) for step in (3, 6, 12)]
    path, checkpoint = choose_checkpoint(settings(tmp_path))
    assert path == paths[2] and checkpoint["step"] == 12
    write_checkpoint(tmp_path, 12, b"PK\x03\x04 cut short by a crash")
    write_checkpoint(tmp_path, 6, b"")
    path, checkpoint = choose_checkpoint(settings(tmp_path))
    assert path == paths[0] and checkpoint["step"] == 3
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 2 and all(n.startswith("note: skipping unreadable checkpoint (") for n in notes)
    assert paths[2] in notes[0] and paths[1] in notes[1]


def test_resume_never_and_overwrite_start_a_new_run(tmp_path):
    write_checkpoint(tmp_path, 3)
    assert choose_checkpoint(settings(tmp_path, "--resume", "never")) == (None, None)
    assert choose_checkpoint(settings(tmp_path, "--overwrite")) == (None, None)


def test_resume_from_a_given_checkpoint(tmp_path):
    early, _ = write_checkpoint(tmp_path, 3), write_checkpoint(tmp_path, 6)
    path, checkpoint = choose_checkpoint(settings(tmp_path, "--resume", early))  # a rollback
    assert path == early and checkpoint["step"] == 3
    missing = str(tmp_path / "checkpoints" / "step_00000009.pt")
    with pytest.raises(UserError) as error:
        choose_checkpoint(settings(tmp_path, "--resume", missing))
    assert str(error.value) == f"--resume {missing} does not exist; pass a checkpoint path, or --resume auto"
    assert error.value.exit_code == 1


def test_a_log_dir_named_with_glob_characters(tmp_path, shards):
    log_dir = tmp_path / "lr[6e-4]"  # the checkpoints must still be found, or a relaunch starts over
    paths = [write_checkpoint(log_dir, step) for step in (3, 6)]
    stale = log_dir / "checkpoints" / ".step_00000009.pt.host.1.tmp"
    stale.write_bytes(b"half")
    assert list_checkpoints(str(log_dir)) == paths
    with claim_log_dir(settings(log_dir)):
        pass
    assert not stale.exists()
    path, checkpoint = choose_checkpoint(settings(log_dir))
    assert path == paths[1] and checkpoint["step"] == 6
    model = tiny_model(0)
    save_checkpoint(
        settings(log_dir, "--keep-checkpoints", 2, data_dir=shards),
        9,
        model,
        torch.optim.AdamW(model.parameters()),
        ShardLoader(shards, "train", 2, 8),
    )
    assert sorted(os.listdir(log_dir / "checkpoints")) == ["step_00000006.pt", "step_00000009.pt"]


# -----------------------------------------------------------------------------
# RunLog: one history, whole lines, null for what is not finite, the dashboards


TRAIN = (
    '{{"step": {}, "train_loss": 5.5, "lr": 0.0006, "grad_norm": 1.25, "dt_ms": 10.0, "tokens_per_sec": 1600.0, '
    '"mfu": null}}\n'
)


def metrics_lines(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return f.read().splitlines(keepends=True)


def test_a_launch_at_step_s_drops_later_events_and_sets_later_checkpoints_aside(tmp_path, capsys):
    lines = [TRAIN.format(s) for s in range(8)]
    lines[4:4] = ['{"step": 4, "val_loss": 4.5}\n']
    lines[:0] = ['{"step": 0, "val_loss": 6.0}\n']
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 8, "train_lo')  # cut short by a crash
    paths = [write_checkpoint(tmp_path, step) for step in (2, 4, 6, 8)]
    log = RunLog(settings(tmp_path), 4, enabled=True)
    assert metrics_lines(tmp_path) == lines[:5]  # the events of steps 0-3, as they were
    assert list_checkpoints(str(tmp_path)) == paths[:2]  # step 4 is where the run goes on from
    (stamp,) = os.listdir(tmp_path / "abandoned")
    assert re.fullmatch(r"\d{8}-\d{6}", stamp)
    assert sorted(os.listdir(tmp_path / "abandoned" / stamp)) == ["step_00000006.pt", "step_00000008.pt"]
    assert torch.load(tmp_path / "abandoned" / stamp / "step_00000008.pt")["step"] == 8  # moved whole
    assert (
        f"resuming at step 4: moved 2 later checkpoint(s) to {tmp_path / 'abandoned' / stamp}"
        in capsys.readouterr().out
    )
    log.event({"step": 4, "val_loss": 4.25}, "step 4 val_loss 4.250000")
    log.close()
    assert metrics_lines(tmp_path) == lines[:5] + ['{"step": 4, "val_loss": 4.25}\n']
    assert (tmp_path / "log.txt").read_text() == "step 4 val_loss 4.250000\n"


def test_lines_that_are_not_events_are_dropped_and_a_last_line_is_ended(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "val_loss": 6.0}\n\n{"val_loss": 1.0}\nnull\n{"step": 1, "train_loss": 5.0}'
    )  # whole, but its newline was lost
    log = RunLog(settings(tmp_path), 3, enabled=True)
    log.event({"step": 3, "train_loss": 4.0}, "step 3")
    assert metrics_lines(tmp_path) == [
        '{"step": 0, "val_loss": 6.0}\n',
        '{"step": 1, "train_loss": 5.0}\n',
        '{"step": 3, "train_loss": 4.0}\n',
    ]


def test_values_that_are_not_finite_are_written_as_null(tmp_path):
    log = RunLog(settings(tmp_path), 0, enabled=True)
    log.text("=== header ===")
    log.event(
        {
            "step": 1,
            "train_loss": float("nan"),
            "lr": 6e-4,
            "grad_norm": float("inf"),
            "dt_ms": -float("inf"),
            "tokens_per_sec": 1600.0,
            "mfu": None,
            "skipped": True,
        },
        "step 1 | skipped",
    )
    log.event({"step": 2, "val_loss": 3.5}, "step 2 val")
    log.close()
    first, second = metrics_lines(tmp_path)
    assert json.loads(first) == {
        "step": 1,
        "train_loss": None,
        "lr": 6e-4,
        "grad_norm": None,
        "dt_ms": None,
        "tokens_per_sec": 1600.0,
        "mfu": None,
        "skipped": True,
    }
    assert "NaN" not in first and "Infinity" not in first  # strict JSON, which every reader takes
    assert json.loads(second) == {"step": 2, "val_loss": 3.5}
    assert (tmp_path / "log.txt").read_text() == "=== header ===\nstep 1 | skipped\nstep 2 val\n"


def test_other_ranks_write_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(TRAIN.format(s) for s in range(6)))
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 5)
    before = listing(tmp_path)
    log = RunLog(settings(tmp_path, "--tensorboard"), 3, enabled=False)
    log.text("header")
    log.event({"step": 3, "train_loss": 1.0}, "step 3")
    log.close()
    assert listing(tmp_path) == before


def test_tensorboard_tells_one_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    config, threads = settings(tmp_path, "--tensorboard"), set(threading.enumerate())
    log = RunLog(config, 0, enabled=True)
    for step in range(6):
        log.event({"step": step, "train_loss": float(step), "mfu": None, "skipped": True}, f"step {step}")
    log.event({"step": 5, "samples": ["Hello, I'm", "a language model"]}, "samples")
    log.close()
    log = RunLog(config, 3, enabled=True)  # a relaunch from step 3
    for step in (3, 4):
        log.event({"step": step, "train_loss": 100.0 + step, "lr": 1e-3}, f"step {step}")
    log.close()
    assert set(threading.enumerate()) <= threads  # each launch's close() ended its writer's thread
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["lr", "train_loss"]  # no step, None, True or text
    assert [(e.step, e.value) for e in accumulator.Scalars("train_loss")] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 103.0),
        (4, 104.0),
    ]
    assert accumulator.Tags()["tensors"] == ["samples/text_summary"]
    (sample,) = accumulator.Tensors("samples/text_summary")
    assert sample.step == 5 and b"a language model" in sample.tensor_proto.string_val[0]
    # Each launch's file starts by telling readers to drop the steps from its start on.
    starts = []
    for name in os.listdir(tmp_path / "tensorboard"):
        for event in EventFileLoader(str(tmp_path / "tensorboard" / name)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                starts.append(event.step)
    assert sorted(starts) == [0, 3]


class FakeWandb(types.ModuleType):
    """What RunLog asks of wandb, recorded (the real one starts a service and wants an account)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.runs = [], []

    def init(self, **kwargs):
        run = types.SimpleNamespace(id=kwargs["id"] or f"run{len(self.inits)}", logged=[], metrics=[], finished=False)
        run.define_metric = lambda *args, **kw: run.metrics.append((args, kw))
        run.log = run.logged.append
        run.finish = lambda: setattr(run, "finished", True)
        self.inits.append(kwargs)
        self.runs.append(run)
        return run

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data


def test_wandb_continues_one_run_over_launches(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    config = settings(tmp_path, "--wandb", "gpt2-repro")
    log = RunLog(config, 0, enabled=True)
    assert wandb.inits == [
        {
            "project": "gpt2-repro",
            "dir": str(tmp_path),
            "resume": "allow",
            "id": None,
            "config": asdict(config),
            "allow_val_change": True,
        }
    ]
    assert (tmp_path / "wandb_run_id").read_text() == "run0"
    log.event({"step": 2, "train_loss": 1.5, "dt_ms": 3, "mfu": None, "skipped": True}, "step 2")
    log.event({"step": 4, "samples": ["a", "b"]}, "samples")
    log.close()
    run = wandb.runs[0]
    assert run.metrics == [(("step",), {}), (("*",), {"step_metric": "step"})]  # charted against our step
    assert run.logged[0] == {"step": 2, "train_loss": 1.5, "dt_ms": 3}
    assert set(run.logged[1]) == {"step", "samples"} and run.logged[1]["step"] == 4
    table = run.logged[1]["samples"]
    assert table.columns == ["step", "sample"] and table.data == [[4, "a"], [4, "b"]]
    assert run.finished
    RunLog(config, 3, enabled=True).close()  # the next launch
    assert wandb.inits[1]["id"] == "run0" and (tmp_path / "wandb_run_id").read_text() == "run0"


def test_run_header(tmp_path, monkeypatch):
    config = settings(tmp_path)
    monkeypatch.chdir(tmp_path)  # the commit is the code's, wherever the run is started from
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    lines = run_header(config, torch.device("cpu"), 4).split("\n")
    assert len(lines) == 4 and re.fullmatch(r"=== launch \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ===", lines[0])
    assert lines[1].startswith("config: {") and json.loads(lines[1][len("config: ") :]) == asdict(config)
    assert lines[2] == (
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, git {commit}"
    )
    assert lines[3] == "device: cpu, world size 4"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert run_header(config, torch.device("cuda", 0), 8).endswith("\ndevice: NVIDIA H100 80GB HBM3, world size 8")
