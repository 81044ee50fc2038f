"""logdir.py, a run's log directory: checkpoints written, read back, chosen, pruned and set aside; one run per
directory, one launch at a time, and nothing left behind by a launch that fails; one metrics history however
often the run resumes or rolls back; the end-of-run summary; the dashboards; models loaded from checkpoints.

The settings are train_gpt2.parse_args' of a tiny model; the model is a real GPT of 1 layer; the shards are a
few hundred random tokens. Expectations are literals, json and torch.load reading the files back, and the same
training step taken by the saved objects and by the restored ones.
"""

import contextlib
import json
import os
import platform
import re
import socket
import stat
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
    claim_log_dir,
    hms,
    list_checkpoints,
    load_model,
    model_from_checkpoint,
    read_checkpoint,
    resume,
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


def tiny_model(seed, vocab_size=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=8))


def write_checkpoint(log_dir, step, contents=None):
    """A file that read_checkpoint accepts (or, with contents, any bytes) at the step's name."""
    path = os.path.join(log_dir, "checkpoints", f"step_{step:08d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if contents is None:
        torch.save({"model": {}, "model_config": {}, "step": step, "config": {"written_at": step}}, path)
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


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def never_called(saved, config):
    pytest.fail("check_settings was called")


# -----------------------------------------------------------------------------
# Checkpoints: written, read back, pruned


def run_state(seed, shards, lr, scaler_scale):
    """A run's stateful objects as train_gpt2.py names them: the model, AdamW for the embeddings, norms and biases,
    Muon for the blocks' matrices, the train loader and a gradient scaler."""
    model = tiny_model(seed)
    hidden = [p for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for name, p in model.named_parameters() if not (name.startswith("transformer.h.") and p.dim() == 2)]
    return {
        "model": model,
        "optimizer": torch.optim.AdamW(rest, lr=lr, weight_decay=0.1),
        "muon": torch.optim.Muon(hidden, lr=lr, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
        "loader": ShardLoader(shards, "train", 2, 8),
        "scaler": torch.amp.GradScaler("cpu", init_scale=scaler_scale),
    }


def train_step(state):
    x, y = state["loader"].next_batch()
    state["model"](x, y)[1].backward()
    for name in ("optimizer", "muon"):
        state[name].step()
        state[name].zero_grad()


def test_a_checkpoint_restores_the_model_both_optimizers_the_loader_and_the_scaler(tmp_path, shards):
    config = settings(tmp_path / "log", data_dir=shards)
    state = run_state(0, shards, 1e-2, 1024.0)
    for _ in range(3):  # both optimizers have moments, the loader has moved
        train_step(state)
    path = save_checkpoint(config, 7, state)
    assert path == str(tmp_path / "log" / "checkpoints" / "step_00000007.pt")

    checkpoint = torch.load(path, weights_only=True)  # plain tensors and values, no pickled code
    assert set(checkpoint) == {"model", "model_config", "optimizer", "muon", "loader", "scaler", "step", "config"}
    assert checkpoint["step"] == 7
    assert checkpoint["model_config"] == {"block_size": 16, "vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 8}
    assert checkpoint["config"] == asdict(config) and checkpoint["config"]["log_dir"] == str(tmp_path / "log")
    assert checkpoint["loader"] == {"epoch": 0, "row": 6, "num_tokens": 440, "seq_len": 8}
    assert checkpoint["scaler"]["scale"] == 1024.0
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])

    restored, checked = run_state(1, shards, 5.0, 2.0), []  # another init, lr and scale: all must be replaced
    assert resume(config, restored, lambda saved, now: checked.append((saved, now))) == (7, path)
    assert checked == [(asdict(config), config)]  # the checkpoint's settings and the launch's, before anything loads
    for (name, a), b in zip(state["model"].state_dict().items(), restored["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert restored["scaler"].get_scale() == 1024.0
    for name in ("optimizer", "muon"):
        saved, loaded = state[name].state_dict(), restored[name].state_dict()
        assert loaded["param_groups"] == saved["param_groups"]  # lr 1e-2, not 5.0
        assert len(loaded["state"]) == len(saved["state"]) > 0
    # The test of it all: the next steps are the same, to the bit (the data, the moments, the momentum buffers)
    for _ in range(2):
        train_step(state)
        train_step(restored)
    for (name, a), b in zip(state["model"].state_dict().items(), restored["model"].state_dict().values()):
        assert torch.equal(a, b), name

    # Without a gradient scaler (float32, bfloat16) there is none to save or load.
    path = save_checkpoint(config, 8, {**state, "scaler": None})
    assert "scaler" not in torch.load(path, weights_only=True)
    assert resume(config, {**restored, "scaler": None}, lambda saved, now: None) == (8, path)


def test_only_the_latest_checkpoints_are_kept(tmp_path, shards):
    config = settings(tmp_path, "--keep-checkpoints", 3, data_dir=shards)
    model = tiny_model(0)
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"the user's own file")
    steps = [3, 40, 500, 6000, 70000, 800000, 9000000]
    for i, step in enumerate(steps):
        save_checkpoint(config, step, state)
        kept = [f"step_{s:08d}.pt" for s in steps[max(0, i - 2) : i + 1]]
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best.pt"] + kept
        assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoints" / name) for name in kept]
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == b"the user's own file"
    assert torch.load(tmp_path / "checkpoints" / "step_09000000.pt", weights_only=True)["step"] == 9000000


def test_a_checkpoint_that_cannot_be_written(tmp_path, shards):
    config = settings(tmp_path, data_dir=shards)
    (tmp_path / "checkpoints").write_text("a file where the directory should be")
    model = tiny_model(0)
    with pytest.raises(UserError) as error:
        save_checkpoint(config, 5, {"model": model, "optimizer": torch.optim.AdamW(model.parameters())})
    message = str(error.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'checkpoints' / 'step_00000005.pt'} (")
    assert message.endswith("); free some space and relaunch to resume")
    assert error.value.exit_code == 1


def test_files_the_log_directory_gets_have_the_umasks_permissions(tmp_path):
    # A group sharing runs must be able to read them: not 0600 whatever the umask says (0o002 here).
    model = tiny_model(0)
    config = settings(tmp_path)
    with umask(0o002):
        log = RunLog(config, 0, None, enabled=True)
        log.event({"step": 0, "val_loss": 4.0}, "step 0")
        log.close()
        save_checkpoint(config, 2, {"model": model})
        save_checkpoint(config, 4, {"model": model})
        RunLog(config, 3, str(tmp_path / "checkpoints" / "step_00000002.pt"), enabled=True).close()  # a rollback
    (aside,) = (tmp_path / "abandoned").iterdir()
    paths = [
        "checkpoints/step_00000002.pt",
        "metrics.jsonl",
        "log.txt",
        f"abandoned/{aside.name}/step_00000004.pt",
        f"abandoned/{aside.name}/metrics.jsonl",
    ]
    assert {path: oct(mode(tmp_path / path)) for path in paths} == {path: oct(0o664) for path in paths}


# -----------------------------------------------------------------------------
# resume and read_checkpoint: which checkpoint a launch continues from


def test_resume_auto_takes_the_latest_readable_checkpoint(tmp_path, capsys):
    assert resume(settings(tmp_path), {}, never_called) == (0, None)  # a new run
    paths = [write_checkpoint(tmp_path, step) for step in (3, 6, 12)]
    checked = []
    assert resume(settings(tmp_path), {}, lambda saved, now: checked.append(saved)) == (12, paths[2])
    assert checked == [{"written_at": 12}]
    write_checkpoint(tmp_path, 12, b"PK\x03\x04 cut short by a crash")
    write_checkpoint(tmp_path, 6, b"")
    capsys.readouterr()
    assert resume(settings(tmp_path), {}, lambda saved, now: None) == (3, paths[0])
    captured = capsys.readouterr()
    notes = captured.err.splitlines()  # on stderr: stdout may be a pipe to a program reading the run's lines
    assert captured.out == "" and len(notes) == 2
    assert all(note.startswith("note: skipping unreadable checkpoint (") for note in notes)
    assert paths[2] in notes[0] and paths[1] in notes[1]
    write_checkpoint(tmp_path, 3, b"\x80\x02garbage")  # none readable: each cut short by a crash, a new run
    assert resume(settings(tmp_path), {}, never_called) == (0, None)


def test_resume_never_and_overwrite_start_a_new_run(tmp_path):
    write_checkpoint(tmp_path, 3)
    model = tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert resume(settings(tmp_path, "--resume", "never"), {"model": model}, never_called) == (0, None)
    assert resume(settings(tmp_path, "--overwrite"), {"model": model}, never_called) == (0, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_from_a_given_checkpoint_or_another_runs_directory(tmp_path):
    early, late = write_checkpoint(tmp_path / "log", 3), write_checkpoint(tmp_path / "log", 6)
    assert resume(settings(tmp_path / "log", "--resume", early), {}, lambda saved, now: None) == (3, early)
    other = write_checkpoint(tmp_path / "other", 9)
    assert resume(settings(tmp_path / "log", "--resume", tmp_path / "other"), {}, lambda s, n: None) == (9, other)
    missing = str(tmp_path / "log" / "checkpoints" / "step_00000009.pt")
    with pytest.raises(UserError) as error:
        resume(settings(tmp_path / "log", "--resume", missing), {}, never_called)
    assert str(error.value) == f"--resume {missing} does not exist; pass a checkpoint path, or --resume auto"
    assert error.value.exit_code == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"^--resume {empty} is not a checkpoint file, and .* holds no readable"):
        resume(settings(tmp_path / "log", "--resume", empty), {}, never_called)
    assert late  # (the latest of log/, which a given checkpoint overrides)


def test_settings_refused_by_the_check_leave_the_state_untouched(tmp_path, shards):
    config = settings(tmp_path, data_dir=shards)
    state = run_state(0, shards, 1e-2, 8.0)
    train_step(state)
    save_checkpoint(config, 1, state)
    fresh = run_state(1, shards, 1e-2, 8.0)
    before = {k: v.clone() for k, v in fresh["model"].state_dict().items()}

    def refuse(saved, now):
        raise UserError("the checkpoint's settings differ", exit_code=2)

    with pytest.raises(UserError, match="^the checkpoint's settings differ$"):
        resume(config, fresh, refuse)
    assert all(torch.equal(before[k], v) for k, v in fresh["model"].state_dict().items())
    assert fresh["optimizer"].state_dict()["state"] == {} and fresh["loader"].state_dict()["row"] == 0


def test_read_checkpoint_of_a_file_and_of_a_log_directory(tmp_path, capsys):
    paths = [write_checkpoint(tmp_path, step) for step in (1, 2, 3)]
    assert read_checkpoint(paths[1]) == {
        "model": {},
        "model_config": {},
        "step": 2,
        "config": {"written_at": 2},
        "path": paths[1],
    }
    assert read_checkpoint(str(tmp_path))["path"] == paths[2]  # the newest
    write_checkpoint(tmp_path, 3, b"")
    assert read_checkpoint(str(tmp_path))["path"] == paths[1]
    assert re.fullmatch(r"note: skipping unreadable checkpoint \(.*step_00000003.pt .*\)\n", capsys.readouterr().err)


class Code:
    """An object whose unpickling would run code: weights_only must refuse it."""


@pytest.mark.parametrize(
    "contents, message",
    [
        (None, "{path} does not exist"),
        (
            b"not a checkpoint",
            "{path} is not a readable checkpoint (UnpicklingError: another kind of file, or a write cut short)",
        ),
        ([1, 2], "{path} is not a train_gpt2.py checkpoint (it holds no model and model_config)"),
        ({"model": {}}, "{path} is not a train_gpt2.py checkpoint (it holds no model and model_config)"),
        ({"model": {}, "model_config": {}, "code": Code()}, "{path} is not a readable checkpoint (UnpicklingError: "),
    ],
)
def test_read_checkpoint_refuses_what_is_not_one_in_one_line(tmp_path, contents, message):
    path = tmp_path / "step_00000001.pt"
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    elif contents is not None:
        torch.save(contents, path)
    with pytest.raises(ValueError) as error:
        read_checkpoint(str(path))
    assert str(error.value).startswith(message.format(path=path)) and "\n" not in str(error.value)


def test_model_from_checkpoint_of_a_dict_a_file_and_a_log_directory(tmp_path):
    model = tiny_model(3)
    path = save_checkpoint(settings(tmp_path), 5, {"model": model})
    idx = torch.randint(0, 64, (2, 16))
    expected = model.eval()(idx)[0]
    for source in (read_checkpoint(path), path, str(tmp_path)):
        loaded = model_from_checkpoint(source).eval()
        assert isinstance(loaded, GPT) and asdict(loaded.config) == asdict(model.config)
        assert torch.equal(loaded(idx)[0], expected)


def test_load_model_of_a_checkpoint_a_log_directory_and_a_hugging_face_name(tmp_path, monkeypatch):
    model = tiny_model(4, vocab_size=50304)  # GPT-2's vocabulary, padded as train_gpt2.py pads it
    path = save_checkpoint(settings(tmp_path / "log"), 5, {"model": model})
    for name in (path, str(tmp_path / "log")):
        loaded = load_model(name)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # A folder with a config.json is transformers' format, and a name that is not a path is the hub's: both are
    # GPT.from_pretrained's (test_model.py tests it against transformers)
    asked, hf_model = [], tiny_model(5, vocab_size=50257)
    monkeypatch.setattr(GPT, "from_pretrained", lambda name: asked.append(name) or hf_model)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert load_model(str(tmp_path / "hf")) is hf_model and load_model("openai-community/gpt2") is hf_model
    assert asked == [str(tmp_path / "hf"), "openai-community/gpt2"]


def test_load_model_errors_are_one_line(tmp_path, monkeypatch):
    small = save_checkpoint(settings(tmp_path / "small"), 1, {"model": tiny_model(0)})  # vocab 64
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    hub_errors = {  # what transformers and the hub raise: many lines, or none
        "no-such-org/no-such-model": OSError("We couldn't connect to the hub.\nCheck your connection."),
        str(tmp_path / "hf"): ValueError(""),
    }

    def from_pretrained(name):
        raise hub_errors[name]

    monkeypatch.setattr(GPT, "from_pretrained", from_pretrained)
    expected = {
        small: f"{small} has vocab_size 64; GPT-2's tokenizer needs 50257",
        str(tmp_path / "empty"): f"cannot load model {tmp_path / 'empty'}: {tmp_path / 'empty'} is not a checkpoint "
        f"file, and {tmp_path / 'empty' / 'checkpoints'} holds no readable checkpoint (train_gpt2.py --log-dir "
        f"{tmp_path / 'empty'} writes them)",
        str(tmp_path / "junk.pt"): f"cannot load model {tmp_path / 'junk.pt'}: {tmp_path / 'junk.pt'} is not a "
        f"readable checkpoint (UnpicklingError: another kind of file, or a write cut short)",
        "no-such-org/no-such-model": "cannot load model no-such-org/no-such-model: not a local path, and the Hugging "
        "Face hub did not give it (We couldn't connect to the hub.)",
        str(tmp_path / "hf"): f"cannot load model {tmp_path / 'hf'}: ValueError",
    }
    for name, message in expected.items():
        with pytest.raises(ValueError) as error:
            load_model(name)
        assert str(error.value) == message


# -----------------------------------------------------------------------------
# claim_log_dir: one run per directory, one launch at a time, nothing left behind by a launch that fails


def test_a_new_directory_is_made_and_locked(tmp_path, lock_in_another_process):
    log_dir = tmp_path / "runs" / "first"
    with claim_log_dir(settings(log_dir, "--resume", "never")):
        assert os.listdir(log_dir) == [".lock"]
        assert lock_in_another_process(log_dir) == (
            f"refused: {log_dir} is in use by another test run "
            f"(pid {os.getpid()} on {socket.gethostname()}); wait for it to end, "
            f"or use another directory (exit code 1)"
        )
        (log_dir / "checkpoints").mkdir()  # what a run writes
    assert lock_in_another_process(log_dir) == "locked"
    assert sorted(listing(tmp_path)) == ["runs", "runs/first", "runs/first/.lock", "runs/first/checkpoints"]


@pytest.mark.parametrize("failure", [UserError("no data"), KeyboardInterrupt(), RuntimeError("a bug")])
def test_a_launch_that_fails_leaves_nothing_it_created(tmp_path, failure):
    (tmp_path / "runs").mkdir()
    log_dir = tmp_path / "runs" / "2024" / "june" / "first"  # 2024/, june/ and first/ are this launch's
    with pytest.raises(type(failure)) as raised, claim_log_dir(settings(log_dir)):
        assert (log_dir / ".lock").exists()
        raise failure
    assert raised.value is failure  # passed on as it was
    assert listing(tmp_path) == {"runs": None}


def test_a_launch_that_fails_leaves_what_was_there(tmp_path):
    empty, used, locked = tmp_path / "empty", tmp_path / "used", tmp_path / "locked"
    empty.mkdir()
    used.mkdir()
    (used / "notes.txt").write_text("the user's")
    locked.mkdir()
    (locked / ".lock").write_text("pid 1 on an-earlier-launch\n")  # a lock file stays once made
    for log_dir in (empty, used, locked):
        with pytest.raises(UserError), claim_log_dir(settings(log_dir)):
            raise UserError("no data")
    assert listing(tmp_path) == {
        "empty": None,
        "used": None,
        "used/notes.txt": b"the user's",
        "locked": None,
        "locked/.lock": f"pid {os.getpid()} on {socket.gethostname()}\n".encode(),
    }
    # A launch that wrote into a new directory before it failed: what it wrote stays, and so does the directory
    new = tmp_path / "new" / "log"
    with pytest.raises(UserError), claim_log_dir(settings(new)):
        (new / "log.txt").write_text("=== launch ===\n")
        raise UserError("out of memory")
    assert sorted(listing(tmp_path / "new")) == ["log", "log/log.txt"]


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


@pytest.mark.parametrize("resume_flag", ["auto", "checkpoint"])
def test_resuming_a_run_keeps_it_and_clears_half_written_checkpoints(tmp_path, resume_flag):
    checkpoint = write_checkpoint(tmp_path, 4)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 4.2}\n')
    stale = tmp_path / "checkpoints" / ".step_00000008.pt.host.1234.tmp"  # a launch killed while writing it
    stale.write_bytes(b"half")
    (tmp_path / ".metrics.jsonl.host.99.tmp").write_bytes(b"not ours to remove")
    with claim_log_dir(settings(tmp_path, "--resume", checkpoint if resume_flag == "checkpoint" else "auto")):
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
        "abandoned/20240101-000000-after-step-4/step_00000008.pt",
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
    assert listing(tmp_path) == {"file": b"not a directory"}


def test_a_log_dir_named_with_glob_characters(tmp_path):
    log_dir = tmp_path / "lr[6e-4]"  # the checkpoints must still be found, or a relaunch starts over
    paths = [write_checkpoint(log_dir, step) for step in (3, 6)]
    stale = log_dir / "checkpoints" / ".step_00000009.pt.host.1.tmp"
    stale.write_bytes(b"half")
    assert list_checkpoints(str(log_dir)) == paths
    with claim_log_dir(settings(log_dir)):
        pass
    assert not stale.exists()
    assert resume(settings(log_dir), {}, lambda saved, now: None) == (6, paths[1])
    save_checkpoint(settings(log_dir, "--keep-checkpoints", 2), 9, {"model": tiny_model(0)})
    assert sorted(os.listdir(log_dir / "checkpoints")) == ["step_00000006.pt", "step_00000009.pt"]


# -----------------------------------------------------------------------------
# One history: a relaunch, a rollback, a branch taken back, a start from another run


TRAIN = (
    '{{"step": {}, "train_loss": {}, "lr": 0.0006, "grad_norm": 1.25, "dt_ms": 10.0, "tokens_per_sec": 1600.0, '
    '"mfu": null}}\n'
)


def metrics_lines(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return f.read().splitlines(keepends=True)


def steps_of(log_dir, what="checkpoints"):
    """{step: the step_N.pt's "branch" mark} of a directory's checkpoints."""
    directory = os.path.join(log_dir, what)
    return {
        int(name[5:-3]): torch.load(os.path.join(directory, name), weights_only=True)["branch"]
        for name in sorted(os.listdir(directory))
        if name.endswith(".pt")
    }


def branch_checkpoint(log_dir, step, branch):
    path = write_checkpoint(log_dir, step)
    torch.save({"model": {}, "model_config": {}, "step": step, "branch": branch}, path)
    return path


def test_a_launch_at_step_s_drops_later_events_and_sets_later_checkpoints_aside(tmp_path, capsys):
    lines = [TRAIN.format(s, 5.5) for s in range(8)]
    lines[4:4] = ['{"step": 4, "val_loss": 4.5}\n']
    lines[:0] = ['{"step": 0, "val_loss": 6.0}\n']
    history = "".join(lines) + '{"step": 8, "train_lo'  # cut short by a crash
    (tmp_path / "metrics.jsonl").write_text(history)
    paths = [branch_checkpoint(tmp_path, step, "a") for step in (2, 4, 6, 8)]
    log = RunLog(settings(tmp_path), 4, paths[1], enabled=True)
    assert metrics_lines(tmp_path) == lines[:5]  # the events of steps 0-3, as they were
    assert list_checkpoints(str(tmp_path)) == paths[:2]  # step 4 is where the run goes on from
    (aside,) = os.listdir(tmp_path / "abandoned")
    assert re.fullmatch(r"\d{8}-\d{6}-after-step-4", aside)
    assert steps_of(tmp_path, f"abandoned/{aside}") == {6: "a", 8: "a"}  # moved whole
    assert (tmp_path / "abandoned" / aside / "metrics.jsonl").read_text() == history  # that branch's history
    out = capsys.readouterr().out
    assert f"resuming at step 4: moved 2 later checkpoint(s) to {tmp_path / 'abandoned' / aside}" in out
    assert "another run" not in out
    log.event({"step": 4, "val_loss": 4.25}, "step 4 val_loss 4.250000")
    log.close()
    assert metrics_lines(tmp_path) == lines[:5] + ['{"step": 4, "val_loss": 4.25}\n']
    assert (tmp_path / "log.txt").read_text() == "step 4 val_loss 4.250000\n"
    RunLog(settings(tmp_path), 5, None, enabled=True).close()  # nothing later to set aside: nothing moves
    assert os.listdir(tmp_path / "abandoned") == [aside] and list_checkpoints(str(tmp_path)) == paths[:2]


def test_resuming_from_a_branch_set_aside_takes_that_branch_back(tmp_path, capsys):
    # Branch a ran to step 8 (checkpoints 2, 4, 6, 8), was rolled back to step 4 a while ago, and branch b ran on
    # from there to step 7 (checkpoint 6). Now the user resumes from a's step 8.
    config = settings(tmp_path)
    history_a = [TRAIN.format(s, 10.0 - s) for s in range(9)]
    (tmp_path / "metrics.jsonl").write_text("".join(history_a))
    for step in (2, 4, 6, 8):
        branch_checkpoint(tmp_path, step, "a")
    RunLog(config, 4, str(tmp_path / "checkpoints" / "step_00000004.pt"), enabled=True).close()
    (aside,) = os.listdir(tmp_path / "abandoned")
    a = tmp_path / "abandoned" / "20240101-000000-after-step-4"  # set aside at another time than the next one
    os.rename(tmp_path / "abandoned" / aside, a)
    log = RunLog(config, 4, None, enabled=True)
    for step in range(4, 8):
        log.event(json.loads(TRAIN.format(step, 100.0 + step)), f"step {step}")
    log.close()
    branch_checkpoint(tmp_path, 6, "b")
    history_b = metrics_lines(tmp_path)
    capsys.readouterr()

    log = RunLog(config, 8, str(a / "step_00000008.pt"), enabled=True)
    # checkpoints/ holds branch a alone, up to the step it continues from; b's later one is set aside
    assert steps_of(tmp_path) == {2: "a", 4: "a", 6: "a", 8: "a"}
    assert os.listdir(a) == ["metrics.jsonl"]
    (b,) = [name for name in os.listdir(tmp_path / "abandoned") if name != a.name]
    assert re.fullmatch(r"\d{8}-\d{6}-after-step-4", b)  # b left a at step 4
    assert steps_of(tmp_path, f"abandoned/{b}") == {6: "b"}
    assert metrics_lines(tmp_path / "abandoned" / b) == history_b
    # one history, each step once, a's: b's events are gone from it
    assert metrics_lines(tmp_path) == history_a[:8]
    log.event(json.loads(TRAIN.format(8, 2.0)), "step 8")
    log.close()
    assert [json.loads(line)["step"] for line in metrics_lines(tmp_path)] == list(range(9))
    out = capsys.readouterr().out
    assert f"resuming at step 8: moved 1 later checkpoint(s) to {tmp_path / 'abandoned' / b}" in out
    assert "another run" not in out


def test_a_branch_set_aside_taken_back_from_an_earlier_checkpoint(tmp_path):
    # Resuming from step 6 of a branch set aside at step 4: its step 8 stays aside, with its history
    for step in (2, 4, 6, 8):
        branch_checkpoint(tmp_path, step, "a")
    (tmp_path / "metrics.jsonl").write_text("".join(TRAIN.format(s, 1.0) for s in range(9)))
    config = settings(tmp_path)
    RunLog(config, 4, str(tmp_path / "checkpoints" / "step_00000004.pt"), enabled=True).close()
    (aside,) = os.listdir(tmp_path / "abandoned")
    RunLog(config, 6, str(tmp_path / "abandoned" / aside / "step_00000006.pt"), enabled=True).close()
    assert steps_of(tmp_path) == {2: "a", 4: "a", 6: "a"}
    assert steps_of(tmp_path, f"abandoned/{aside}") == {8: "a"}
    assert [json.loads(line)["step"] for line in metrics_lines(tmp_path)] == list(range(6))


def test_a_start_from_another_runs_checkpoint_says_so(tmp_path, capsys):
    source = branch_checkpoint(tmp_path / "other", 4, "other")
    with open(source, "rb") as f:
        before = f.read()
    RunLog(settings(tmp_path / "new"), 4, source, enabled=True).close()
    assert capsys.readouterr().out == (
        f"note: {tmp_path / 'new'} starts at step 4 from another run's {source}; its history before stays there\n"
    )
    assert listing(tmp_path / "other") == {"checkpoints": None, "checkpoints/step_00000004.pt": before}
    RunLog(settings(tmp_path / "other"), 4, source, enabled=True).close()  # its own run: no note
    assert "another run" not in capsys.readouterr().out


def test_lines_that_are_not_events_are_dropped_and_a_last_line_is_ended(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "val_loss": 6.0}\n\n{"val_loss": 1.0}\nnull\n{"step": 1, "train_loss": 5.0}'
    )  # whole, but its newline was lost
    log = RunLog(settings(tmp_path), 3, None, enabled=True)
    log.event({"step": 3, "train_loss": 4.0}, "step 3")
    assert metrics_lines(tmp_path) == [
        '{"step": 0, "val_loss": 6.0}\n',
        '{"step": 1, "train_loss": 5.0}\n',
        '{"step": 3, "train_loss": 4.0}\n',
    ]


# -----------------------------------------------------------------------------
# RunLog: lines, events, the summary, the dashboards


def test_values_that_are_not_finite_are_written_as_null(tmp_path, capsys):
    log = RunLog(settings(tmp_path), 0, None, enabled=True)
    log.text("=== header ===")
    log.line("dtype float32, compile off")
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
    text = "=== header ===\ndtype float32, compile off\nstep 1 | skipped\nstep 2 val\n"
    assert (tmp_path / "log.txt").read_text() == text
    assert capsys.readouterr().out == "dtype float32, compile off\nstep 1 | skipped\nstep 2 val\n"  # not the header


def test_other_ranks_write_nothing(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(TRAIN.format(s, 1.0) for s in range(6)))
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 5)
    before = listing(tmp_path)
    log = RunLog(settings(tmp_path, "--tensorboard"), 3, None, enabled=False)
    log.text("header")
    log.line("a line")
    log.event({"step": 3, "train_loss": 1.0}, "step 3")
    log.close()
    assert listing(tmp_path) == before and capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (9.9, "9s"),
        (59, "59s"),
        (60, "1m00s"),
        (247, "4m07s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (11100, "3h05m"),
        (90061, "25h01m"),
    ],
)
def test_hms(seconds, text):
    assert hms(seconds) == text


def test_the_summary_says_what_was_done_where_it_is_and_what_next(tmp_path):
    config = settings(tmp_path, "--total-batch-size", 524288)
    log = RunLog(config, 0, None, enabled=True)
    assert log.summary(0, 5, {}) == (
        f"done: 0 steps, 0 tokens, 5s this launch; last evaluation none; latest checkpoint none\n"
        f"next: python sample.py -m {tmp_path} | python export.py {tmp_path} my-gpt2 | PLAY_LOG_DIR={tmp_path} "
        f"jupyter notebook play.ipynb"
    )
    write_checkpoint(tmp_path, 19000)
    latest = write_checkpoint(tmp_path, 19073)
    summary = log.summary(19073, 3 * 3600 + 5 * 60 + 9, {"val loss": 3.07123, "hellaswag": 0.30456})
    assert summary.split("\n")[0] == (
        "done: 19073 steps, 9,999,745,024 tokens, 3h05m this launch; "
        f"last evaluation val loss 3.0712, hellaswag 0.3046; latest checkpoint {latest}"
    )
    log.close()


def test_tensorboard_tells_one_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    config, threads = settings(tmp_path, "--tensorboard"), set(threading.enumerate())
    log = RunLog(config, 0, None, enabled=True)
    for step in range(6):
        log.event({"step": step, "train_loss": float(step), "mfu": None, "skipped": True}, f"step {step}")
    log.event({"step": 5, "samples": ["Hello, I'm", "a language model"]}, "samples")
    log.close()
    log = RunLog(config, 3, None, enabled=True)  # a relaunch from step 3
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
    assert sample.step == 5 and sample.tensor_proto.string_val[0] == b"Hello, I'm\n\na language model"
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
    log = RunLog(config, 0, None, enabled=True)
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
    RunLog(config, 3, None, enabled=True).close()  # the next launch
    assert wandb.inits[1]["id"] == "run0" and (tmp_path / "wandb_run_id").read_text() == "run0"


def test_a_dashboard_without_its_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb: ImportError
    with pytest.raises(UserError) as error:
        RunLog(settings(tmp_path, "--wandb", "gpt2-repro"), 0, None, enabled=True)
    assert str(error.value).startswith(
        "--tensorboard and --wandb need their packages: pip install -r requirements-tracking.txt ("
    )
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


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
