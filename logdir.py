"""A run's log directory: one run, its checkpoints and its history, safe against crashes and relaunches.

    log/.lock              held by the launch that writes here (a second one stops at once)
    log/checkpoints/       step_00001000.pt ...: model, optimizer and loader states (the latest --keep-checkpoints)
    log/metrics.jsonl      one JSON object per event, one history: a resumed run lists each step once
    log/log.txt            the same as text, with a header per launch (config, versions, device)
    log/config.toml        the run's settings, as given (train_gpt2.py --config reads it back)
    log/abandoned/<time>/  checkpoints of a branch a rollback left

Only rank 0 writes here; every rank reads the checkpoint it resumes from. Each file is whole or absent
(atomic_write). Also here: reading a checkpoint as a model (load_model), for sample.py, hellaswag.py, export.py."""

import glob
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch

from common import UserError, ancestry, atomic_write, directory_lock, print0
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig

# What train_gpt2.py writes into a log directory: --overwrite removes these and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "log.txt", "config.toml", "abandoned", "tensorboard", "wandb_run_id")


def list_checkpoints(log_dir):
    """Checkpoint paths, oldest first (the zero-padded step makes name order step order)."""
    return sorted(glob.glob(os.path.join(glob.escape(log_dir), "checkpoints", "step_[0-9]*.pt")))


def save_checkpoint(config, step, state):
    """Write log_dir/checkpoints/step_<step>.pt whole (atomic_write), then prune old ones. state: the run's
    stateful objects by name (model, optimizer, loader, scaler), each saved by its state_dict()."""
    path = os.path.join(config.log_dir, "checkpoints", f"step_{step:08d}.pt")
    checkpoint = {name: thing.state_dict() for name, thing in state.items() if thing is not None}
    checkpoint.update(step=step, config=asdict(config), model_config=asdict(state["model"].config))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:  # a full disk, a vanished mount: the older checkpoints stay as they are
        raise UserError(f"cannot write checkpoint {path} ({e}); free some space and relaunch to resume") from None
    for old in list_checkpoints(config.log_dir)[: -config.keep_checkpoints]:
        os.remove(old)
    return path


def resume(config, state, check_settings):
    """Put the run's state back from the checkpoint to continue -> (its step, its path), or (0, None) for a new run.
    Every rank chooses alike: --resume's file, else read_checkpoint's latest. check_settings(saved, config) may veto."""
    if config.resume == "never" or config.overwrite:
        return 0, None
    try:
        checkpoint = read_checkpoint(config.log_dir if config.resume == "auto" else config.resume)
    except ValueError as e:
        if config.resume == "auto":
            return 0, None  # no checkpoint yet (or none readable: each cut short by a crash)
        raise UserError(f"--resume {e}; pass a checkpoint path, or --resume auto")
    check_settings(checkpoint["config"], config)
    for name, thing in state.items():
        if thing is not None:
            thing.load_state_dict(checkpoint[name])
    return checkpoint["step"], checkpoint["path"]


def read_checkpoint(path):
    """A train_gpt2.py checkpoint file, or a log directory's newest readable one, as a plain dict (weights_only:
    no code in the file can run). Anything else raises a one-line ValueError."""
    if os.path.isdir(path):
        for candidate in reversed(list_checkpoints(path)):
            try:
                return read_checkpoint(candidate)
            except ValueError as e:
                print0(f"note: skipping unreadable checkpoint ({e})", file=sys.stderr)
        holds = f"{os.path.join(path, 'checkpoints')} holds no readable checkpoint"
        raise ValueError(f"{path} is not a checkpoint file, and {holds} (train_gpt2.py --log-dir {path} writes them)")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    try:
        with warnings.catch_warnings(action="ignore"):  # torch's notes on pickle protocols: not for the user
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and format errors each have their own type
        why = f"{type(e).__name__}: another kind of file, or a write cut short"
        raise ValueError(f"{path} is not a readable checkpoint ({why})") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config"} <= set(checkpoint):
        raise ValueError(f"{path} is not a train_gpt2.py checkpoint (it holds no model and model_config)")
    return checkpoint | {"path": path}


def model_from_checkpoint(checkpoint):
    """The GPT of a checkpoint: read_checkpoint's dict, a checkpoint file or a log directory (its latest)."""
    checkpoint = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model


def load_model(name):
    """A GPT by name, as the scripts take it: a train_gpt2.py checkpoint or log directory, else a Hugging
    Face folder or hub name, with GPT-2's vocabulary. What cannot be loaded raises a one-line ValueError."""
    local = os.path.exists(name)
    try:
        ours = local and not os.path.isfile(os.path.join(name, "config.json"))  # not a Hugging Face folder
        model = model_from_checkpoint(name) if ours else GPT.from_pretrained(name)
    except (OSError, ValueError) as e:  # read_checkpoint's one line; the hub's or transformers' many
        message = (str(e).strip() or type(e).__name__).splitlines()[0]
        where = message if local else f"not a local path, and the Hugging Face hub did not give it ({message})"
        raise ValueError(f"cannot load model {name}: {where}") from None
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"{name} has vocab_size {model.config.vocab_size}; GPT-2's tokenizer needs {GPT2_VOCAB_SIZE}")
    return model


@contextmanager
def claim_log_dir(config):
    """Rank 0, for the whole launch: the log directory's lock; the directory holds one run (see --overwrite)."""
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(config.log_dir, name))]
    holds_run = list_checkpoints(config.log_dir) or os.path.exists(os.path.join(config.log_dir, "metrics.jsonl"))
    if holds_run and config.resume == "never" and not config.overwrite:  # refused before anything is touched
        fix = "continue it with --resume auto, start a new run there with --overwrite (deletes those)"
        raise UserError(f"{config.log_dir} holds a run ({', '.join(earlier)}); {fix}, or use another --log-dir", 2)
    made = ancestry(config.log_dir)[:-1]  # a launch that fails removes them again (directory_lock)
    try:
        os.makedirs(config.log_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --log-dir {config.log_dir} ({e.strerror})", exit_code=2)
    with directory_lock(config.log_dir, "train_gpt2.py run", made):
        if earlier and config.overwrite:
            for path in (os.path.join(config.log_dir, name) for name in earlier):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print0(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {config.log_dir}")
        for stale in glob.glob(os.path.join(glob.escape(config.log_dir), "checkpoints", ".*.tmp")):
            os.remove(stale)  # a launch killed mid-write left it; the lock says no one else writes here
        yield


class RunLog:
    """Rank 0's metrics.jsonl, log.txt and dashboards (on other ranks it writes nothing), from a launch that starts
    at step S from checkpoint `source`: one history (keep_one_history), TensorBoard's too. W&B continues one run over
    every launch (its id in wandb_run_id) but shows both branches of a rollback."""

    def __init__(self, config, start_step, source, enabled):
        self.config, self.enabled, self.tensorboard, self.wandb = config, enabled, None, None
        self.metrics_path, self.text_path = (os.path.join(config.log_dir, n) for n in ("metrics.jsonl", "log.txt"))
        if not enabled:
            return
        try:
            if config.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(config.log_dir, "tensorboard"), purge_step=start_step)
            if config.wandb:
                import wandb

                id_path = os.path.join(config.log_dir, "wandb_run_id")
                run_id = open(id_path).read().strip() if os.path.exists(id_path) else None  # one W&B run, every launch
                settings = dict(config=asdict(config), allow_val_change=True)  # a resumed run may change some
                self.wandb = wandb.init(project=config.wandb, dir=config.log_dir, resume="allow", id=run_id, **settings)
                atomic_write(id_path, lambda f: f.write(self.wandb.id.encode()))
                self.wandb.define_metric("step")
                self.wandb.define_metric("*", step_metric="step")  # charted against our step, not W&B's count
        except ImportError as e:
            fix = "pip install -r requirements-tracking.txt"
            raise UserError(f"--tensorboard and --wandb need their packages: {fix} ({e})", exit_code=2) from None
        keep_one_history(config, start_step, source)

    def text(self, line):
        if self.enabled:
            with open(self.text_path, "a") as f:
                f.write(line + "\n")

    def line(self, text):
        """A line printed and written to log.txt."""
        if self.enabled:
            print(text, flush=True)
            self.text(text)

    def event(self, record, line):
        """One event (a dict with a "step"; non-finite values as null) to metrics.jsonl, the dashboards and log.txt."""
        if not self.enabled:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        step, numbers = record["step"], {k: v for k, v in record.items() if k != "step" and type(v) in (int, float)}
        if self.tensorboard:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            if "samples" in record:
                self.tensorboard.add_text("samples", "\n\n".join(record["samples"]), step)
            self.tensorboard.flush()
        if self.wandb:
            import wandb

            if "samples" in record:
                rows = [[step, text] for text in record["samples"]]
                numbers["samples"] = wandb.Table(columns=["step", "sample"], data=rows)
            self.wandb.log({"step": step, **numbers})
        self.line(line)

    def summary(self, step, seconds, last_eval):
        """What a finished run did, where it is, and what to do with it."""
        evals = ", ".join(f"{name} {value:.4f}" for name, value in last_eval.items()) or "none"
        checkpoints, log_dir = list_checkpoints(self.config.log_dir), self.config.log_dir
        done = f"done: {step} steps, {step * self.config.total_batch_size:,} tokens, {hms(seconds)} this launch"
        done += f"; last evaluation {evals}; latest checkpoint {checkpoints[-1] if checkpoints else 'none'}"
        play = f"PLAY_LOG_DIR={log_dir} jupyter notebook play.ipynb"
        return f"{done}\nnext: python sample.py -m {log_dir} | python export.py {log_dir} my-gpt2 | {play}"

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def keep_one_history(config, step, source):
    """Before a launch at `step` from checkpoint `source` (None: a new run) writes anything, the log directory is
    made to tell the history of the branch it continues, each step once. Checkpoints past the fork go with a copy
    of their metrics.jsonl to abandoned/<time>-after-step-<fork>/, so that --resume auto and pruning never mix them
    in; resuming from a checkpoint there brings its branch back (and moves the current one aside)."""
    log_dir, branch = config.log_dir, os.path.dirname(os.path.abspath(source or "."))
    from_aside = os.path.dirname(branch) == os.path.abspath(os.path.join(log_dir, "abandoned"))
    fork = re.fullmatch(r".*-after-step-(\d+)", branch) if from_aside else None
    fork = int(fork[1]) if fork else step  # the last step that the branch left and the branch taken share
    metrics = os.path.join(log_dir, "metrics.jsonl")
    history = os.path.join(branch, "metrics.jsonl") if from_aside else metrics
    if source and not from_aside and os.path.dirname(branch) != os.path.abspath(log_dir):
        print0(f"note: {log_dir} starts at step {step} from another run's {source}; its history before stays there")
    if later := [path for path in list_checkpoints(log_dir) if checkpoint_step(path) > fork]:
        aside = os.path.join(log_dir, "abandoned", f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{fork}")
        os.makedirs(aside, exist_ok=True)
        for path in later:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        if os.path.exists(metrics):
            shutil.copy(metrics, os.path.join(aside, "metrics.jsonl"))  # the history of the branch set aside
        print0(f"resuming at step {step}: moved {len(later)} later checkpoint(s) to {aside}")
    if from_aside:  # the branch taken gets its checkpoints up to `step` back
        for path in glob.glob(os.path.join(glob.escape(branch), "step_*.pt")):
            if checkpoint_step(path) <= step:
                os.replace(path, os.path.join(log_dir, "checkpoints", os.path.basename(path)))
    if os.path.exists(history):
        with open(history, "rb") as f:
            kept = [line.rstrip(b"\n") + b"\n" for line in f if event_step(line) < step]
        atomic_write(metrics, lambda f: f.writelines(kept))


def checkpoint_step(path):
    return int(os.path.basename(path)[len("step_") : -len(".pt")])


def hms(seconds):
    """3h05m, 4m07s or 9s: a duration as people read it."""
    hours, minutes, seconds = int(seconds // 3600), int(seconds % 3600 // 60), int(seconds % 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def event_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a crash: dropped


def run_header(config, device, world_size):
    """The top of each launch in log.txt: enough to tell runs apart and reproduce them."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    versions = f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, git {commit}"
    launch = f"=== launch {time.strftime('%Y-%m-%d %H:%M:%S')} ==="
    return f"{launch}\nconfig: {json.dumps(asdict(config))}\n{versions}\ndevice: {name}, world size {world_size}"
