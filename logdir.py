"""A run's log directory: one run, its checkpoints and its history, safe against crashes and relaunches.

    log/.lock              held by the launch that writes here (a second one stops at once)
    log/checkpoints/       step_00001000.pt ...: model, AdamW and loader states (the latest --keep-checkpoints)
    log/metrics.jsonl      one JSON object per event, one history: a resumed run lists each step once
    log/log.txt            the same as text, with a header per launch (config, versions, device)
    log/config.toml        the run's settings, as given (train_gpt2.py --config reads it back)
    log/abandoned/<time>/  checkpoints of a branch a rollback left

Only rank 0 writes here (every rank loads the checkpoint it chose); each file is whole or absent (atomic_write).
"""

import glob
import json
import math
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch

from common import UserError, atomic_write, directory_lock, print0
from model import read_checkpoint

# What train_gpt2.py writes into a log directory: --overwrite removes these and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "log.txt", "config.toml", "abandoned", "tensorboard", "wandb_run_id")


def list_checkpoints(log_dir):
    """Checkpoint paths, oldest first (the zero-padded step makes name order step order)."""
    return sorted(glob.glob(os.path.join(glob.escape(log_dir), "checkpoints", "step_[0-9]*.pt")))


def save_checkpoint(config, step, raw_model, optimizer, loader, scaler=None):
    """Write log_dir/checkpoints/step_<step>.pt whole (atomic_write), then prune old ones."""
    path = os.path.join(config.log_dir, "checkpoints", f"step_{step:08d}.pt")
    checkpoint = {"model": raw_model.state_dict(), "model_config": asdict(raw_model.config),
                  "optimizer": optimizer.state_dict(), "step": step, "config": asdict(config),
                  "loader": loader.state_dict(), "scaler": scaler and scaler.state_dict()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:  # a full disk, a vanished mount: the older checkpoints stay as they are
        raise UserError(f"cannot write checkpoint {path} ({e}); free some space and relaunch to resume",
                        every_rank=False)
    for old in list_checkpoints(config.log_dir)[:-config.keep_checkpoints]:
        os.remove(old)
    return path


def load_checkpoint(checkpoint, raw_model, optimizer, loader, scaler=None):
    """Put back what save_checkpoint saved -> the step to go on from."""
    raw_model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    loader.load_state_dict(checkpoint["loader"])
    if scaler:
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["step"]


@contextmanager
def claim_log_dir(config):
    """Rank 0, for the whole launch: the log directory's lock; the directory holds one run (see --overwrite)."""
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(config.log_dir, name))]
    holds_run = list_checkpoints(config.log_dir) or os.path.exists(os.path.join(config.log_dir, "metrics.jsonl"))
    if holds_run and config.resume == "never" and not config.overwrite:  # refused before anything is touched
        raise UserError(f"{config.log_dir} holds a run ({', '.join(earlier)}); continue it with --resume auto, "
                        f"start a new run there with --overwrite (deletes those), or use another --log-dir",
                        exit_code=2)
    try:
        os.makedirs(config.log_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --log-dir {config.log_dir} ({e.strerror})", exit_code=2)
    with directory_lock(config.log_dir, "train_gpt2.py run"):
        if earlier and config.overwrite:
            for path in (os.path.join(config.log_dir, name) for name in earlier):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print0(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {config.log_dir}")
        for stale in glob.glob(os.path.join(glob.escape(config.log_dir), "checkpoints", ".*.tmp")):
            os.remove(stale)  # a launch killed mid-write left it; the lock says no one else writes here
        yield


def choose_checkpoint(config):
    """Rank 0: (path, contents) of the checkpoint to resume from, or (None, None) for a new run.
    With --resume auto an unreadable latest file (a crash mid-write) is skipped for the one before."""
    if config.resume == "never" or config.overwrite:
        return None, None
    if config.resume != "auto":
        try:
            return config.resume, read_checkpoint(config.resume)
        except ValueError as e:
            raise UserError(f"--resume {e}; pass a checkpoint path, or --resume auto")
    for path in reversed(list_checkpoints(config.log_dir)):
        try:
            return path, read_checkpoint(path)
        except ValueError as e:
            print0(f"note: skipping unreadable checkpoint ({e})")
    return None, None


class RunLog:
    """Rank 0's metrics.jsonl, log.txt and dashboards (on other ranks it writes nothing). A launch that starts at
    step S tells one history: it drops the events of steps >= S (metrics.jsonl, TensorBoard) and moves checkpoints
    past S to abandoned/. W&B continues one run over every launch (its id in wandb_run_id) but keeps both branches."""

    def __init__(self, config, start_step, enabled):
        self.enabled, self.tensorboard, self.wandb = enabled, None, None
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
                self.wandb = wandb.init(project=config.wandb, dir=config.log_dir, resume="allow",
                                        id=open(id_path).read().strip() if os.path.exists(id_path) else None,
                                        config=asdict(config), allow_val_change=True)  # a resumed run may change some
                atomic_write(id_path, lambda f: f.write(self.wandb.id.encode()))
                self.wandb.define_metric("step")
                self.wandb.define_metric("*", step_metric="step")  # charted against our step, not W&B's count
        except ImportError as e:
            raise UserError(f"--tensorboard and --wandb need their packages: pip install -r requirements-tracking.txt "
                            f"({e})", exit_code=2)
        # Checkpoints past S belong to a branch this launch abandons (a rollback, an unreadable latest one):
        # moved aside, so that --resume auto and pruning never mix them in.
        later = [p for p in list_checkpoints(config.log_dir) if int(os.path.basename(p)[5:-3]) > start_step]
        if later:
            aside = os.path.join(config.log_dir, "abandoned", time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(aside, exist_ok=True)
            for path in later:
                os.replace(path, os.path.join(aside, os.path.basename(path)))
            print0(f"resuming at step {start_step}: moved {len(later)} later checkpoint(s) to {aside}")
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, "rb") as f:
                kept = [line.rstrip(b"\n") + b"\n" for line in f if event_step(line) < start_step]
            atomic_write(self.metrics_path, lambda f: f.writelines(kept))

    def text(self, line):
        if self.enabled:
            with open(self.text_path, "a") as f:
                f.write(line + "\n")

    def event(self, record, line):
        """One event (a dict with a "step"; non-finite values as null) to metrics.jsonl, the dashboards, log.txt."""
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
                numbers["samples"] = wandb.Table(columns=["step", "sample"],
                                                 data=[[step, text] for text in record["samples"]])
            self.wandb.log({"step": step, **numbers})
        self.text(line)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def event_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a crash: dropped


def run_header(config, device, world_size):
    """The top of each launch in log.txt: enough to tell runs apart and reproduce them."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"=== launch {time.strftime('%Y-%m-%d %H:%M:%S')} ===\nconfig: {json.dumps(asdict(config))}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, git {commit}\n"
            f"device: {name}, world size {world_size}")
