"""Train GPT-2 (124M) on FineWeb-Edu shards, the way GPT-2 / GPT-3 small were trained.

    python train_gpt2.py --demo                    # no GPU, no internet: a small GPT in a few minutes
    python fineweb.py                              # once: tokenize FineWeb-Edu 10B into edu_fineweb10B/
    python train_gpt2.py                           # one device (cuda, else mps, else cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py          # 8 GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=gpt2 train_gpt2.py     # the same on each of 2 machines
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train_gpt2.py   # survive a crashed worker

Relaunching the same command continues the run: `--resume auto` (the default) loads the latest
readable checkpoint in `<log dir>/checkpoints/` (a shared directory for multi-node runs), or starts
fresh when there is none. `--resume never` always starts fresh; `--resume PATH` loads that file.

The defaults are the GPT-3 small recipe on 10B tokens: 524,288 tokens per step (micro batches of
up to 64 x 1024, gradient accumulation over the rest), AdamW (0.9, 0.95) with weight decay 0.1, lr
6e-4 warmed up over 715 steps then cosine-decayed to 6e-5 at step 19,073, gradients clipped at 1.0,
vocab padded to 50304, TF32 matmuls. The dtype (bf16 autocast on recent GPUs), torch.compile and the
micro batch default to `auto`: what suits the machine (see "what `auto` picks" below). Every setting
is a flag (`python train_gpt2.py --help`); `--demo` only changes the defaults, explicit flags still win.

Each step prints one line (loss, lr, grad norm, ms, tokens/s, MFU) and appends the same to
`<log dir>/metrics.jsonl`; evaluations (val loss, HellaSwag, samples) go there too, and a text
copy with a header per launch goes to `<log dir>/log.txt`. play.ipynb plots them.
"""

import argparse
import ctypes
import datetime
import gc
import glob
import json
import math
import os
import platform
import random
import shutil
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from common import DirectoryLock, UserError, atomic_write, autocast_dtype_for, resolve_dtype
from model import GPT, GPT2_SIZES, GPTConfig, read_checkpoint
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Config: one dataclass, one flag per field (kebab-case), validated once


def duration(text):
    """Seconds from '3h50m', '90m', '45s' or a plain number of seconds (an argparse type)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 3h50m, 90m or 600")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def setting(default, help, **argparse_kwargs):
    """A config field whose metadata becomes its command-line flag."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


def add_flags(parser, config_class):
    """One --flag per field of a dataclass made of setting()s (train_gpt2.py's and bench.py's)."""
    for f in fields(config_class):
        kwargs = dict(f.metadata)
        if f.type is bool:
            kwargs.setdefault("action", argparse.BooleanOptionalAction)  # --shuffle / --no-shuffle
        elif "action" not in kwargs:
            kwargs.setdefault("type", type(f.default))
        if f.default is not None and "default:" not in kwargs["help"]:
            kwargs["help"] += f" (default: {f.default})"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


class OnOffOrAuto(argparse.Action):
    """--compile / --no-compile force a setting on or off; --compile auto leaves it to the machine."""

    def __init__(self, option_strings, dest, **kwargs):
        negatives = ["--no-" + option[2:] for option in option_strings]
        super().__init__(option_strings + negatives, dest, nargs="?", choices=["auto"], metavar="auto", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        on = not option_string.startswith("--no-")
        if value is not None and not on:
            parser.error(f"{option_string} takes no value")
        setattr(namespace, self.dest, "auto" if value == "auto" else on)


def int_or_auto(text):
    return text if text == "auto" else int(text)


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = setting("edu_fineweb10B", "directory of uint16 token shards made by fineweb.py")
    log_dir: str = setting("log", "the run's directory: metrics.jsonl, log.txt, config.toml, checkpoints/ (one run each)")
    overwrite: bool = setting(False, "start a new run in a --log-dir that holds one, deleting what train_gpt2.py "
                                     "wrote there (checkpoints, metrics.jsonl, log.txt)", action="store_true")
    shuffle: bool = setting(True, "shuffle train shard order and window order each epoch")
    # model
    model: str = setting("gpt2", "GPT-2 size to train from scratch", choices=list(GPT2_SIZES))
    n_layer: int = setting(None, "override the size's number of layers", type=int)
    n_head: int = setting(None, "override the size's number of attention heads", type=int)
    n_embd: int = setting(None, "override the size's embedding width", type=int)
    block_size: int = setting(1024, "longest sequence the model can see (learned positions)")
    vocab_size: int = setting(50304, "vocabulary size; 50304 pads GPT-2's 50257 to a multiple of 128 for speed")
    init_from: str = setting("scratch", "'scratch', or a Hugging Face GPT-2 name or local directory to fine-tune")
    # batch: total_batch_size tokens per optimizer step = batch_size * seq_len * world size * accumulation
    batch_size: int | str = setting("auto", "micro batch size B per device; auto: the largest power of two up to 64 "
                                            "that divides the step and fits in memory (a trial step on CUDA, an "
                                            "estimate on CPU and MPS)", type=int_or_auto)
    seq_len: int = setting(1024, "sequence length T")
    total_batch_size: int = setting(524288, "tokens per optimizer step, over all devices and micro steps")
    # optimization
    max_steps: int = setting(19073, "optimizer steps; 19073 * 524288 tokens = one pass over 10B tokens")
    warmup_steps: int = setting(715, "steps of linear lr warmup")
    max_lr: float = setting(6e-4, "peak learning rate, reached at the end of warmup")
    min_lr: float = setting(6e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = setting(0.1, "AdamW weight decay (matmul weights and embeddings only)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)")
    # evaluation, sampling and checkpoints (an interval of 0 turns that event off)
    eval_interval: int = setting(250, "steps between validation losses")
    val_tokens: int = setting(10485760, "validation tokens per evaluation, whatever the number of devices")
    hellaswag_interval: int = setting(250, "steps between HellaSwag evaluations")
    hellaswag_file: str = setting(None, "local HellaSwag val .jsonl (default: hellaswag.py downloads it)", type=str)
    sample_interval: int = setting(250, "steps between printed samples")
    sample_prompt: str = setting("Hello, I'm a language model,", "prompt the samples continue")
    num_samples: int = setting(4, "samples per sampling event")
    sample_tokens: int = setting(32, "new tokens per sample")
    checkpoint_interval: int = setting(1000, "steps between checkpoints (the final step always writes one)")
    keep_checkpoints: int = setting(3, "how many of the latest checkpoints to keep")
    stop_at_step: int = setting(0, "end this launch with a checkpoint after this step (0: run to max_steps); "
                                   "relaunch with a larger value (or 0) to go on")
    time_limit: int = setting(0, "end this launch cleanly (checkpoint, exit 0) before this much wall-clock time, "
                                 "e.g. 3h50m, allowing for a step and a checkpoint (0: no limit)", type=duration)
    max_skipped_steps: int = setting(5, "steps whose loss or gradient is not finite are skipped (no update); "
                                        "stop after this many in a row")
    # tracking (each an opt-in: the package is imported only when asked for)
    wandb: str = setting(None, "also log to this Weights & Biases project (pip install wandb)", type=str)
    tensorboard: bool = setting(False, "also write TensorBoard event files to <log dir>/tensorboard "
                                       "(pip install tensorboard)")
    # system
    device: str = setting("auto", "'auto' (cuda, else mps, else cpu), or e.g. cpu, cuda, mps")
    dtype: str = setting("auto", "autocast dtype of the forward pass; auto: bfloat16 on CUDA GPUs from Ampere on, "
                                 "float16 with a gradient scaler on older ones, float32 on MPS and CPU",
                         choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool | str = setting("auto", "torch.compile the model (training, val loss and HellaSwag); auto: on for "
                                          "CUDA where Triton works, off on MPS, Windows and CPU; --compile and "
                                          "--no-compile force it", action=OnOffOrAuto)
    peak_flops: float = setting(None, "device peak FLOP/s for MFU (default: a table of dense peaks by GPU and "
                                      "dtype)", type=float)
    seed: int = setting(1337, "seed of the initial weights and the data shuffle")
    resume: str = setting("auto", "'auto' (latest checkpoint in the log dir, if any), 'never' (a new run), "
                                  "or a checkpoint path (e.g. an earlier one, to roll back)")
    dist_timeout: int = setting(600, "under torchrun, how long a rank waits for the others before the job ends "
                                     "(a rank that stalled or died), e.g. 10m", type=duration)
    demo: bool = setting(False, "defaults for a small CPU run on the Python docs (builds demo_data/ on first use)",
                         action="store_true")


# --demo changes defaults only: a 4-layer, 128-wide GPT (7.3M parameters, 6.4M of them the 50304 x 128
# embedding) on Python's reference manual (pydoc_data: 139k tokens, so ~2 epochs), 150 steps of
# 2,048 tokens: 2 to 4 minutes on 2 CPU cores. float32 without compile, as measured on 2 cores:
# compile spent ~30 s compiling and then ran a step only ~10% faster, and bf16 autocast depends on
# the CPU: 2x faster per step with AVX512-BF16 on one machine, 5% on another, and slower than
# float32 on CPUs without bf16 instructions. float32 is the default that is fine everywhere.
DEMO_DEFAULTS = dict(
    data_dir="demo_data", log_dir="log_demo", n_layer=4, n_head=4, n_embd=128, block_size=256,
    batch_size=8, seq_len=128, total_batch_size=2048, max_steps=150, warmup_steps=15, max_lr=2e-3,
    min_lr=2e-4, eval_interval=25, val_tokens=8192, hellaswag_interval=0, sample_interval=50,
    checkpoint_interval=50, compile=False, dtype="float32",
)
# Settings that may change when a run resumes: where and how it runs and reports, not what it
# learns. The micro batch and the number of devices may change too (same total batch: the loader
# state counts rows, not batches). max_steps may not: it sets the cosine schedule's length.
RESUMABLE = {"data_dir", "log_dir", "overwrite", "batch_size", "eval_interval", "val_tokens", "hellaswag_interval",
             "hellaswag_file", "sample_interval", "sample_prompt", "num_samples", "sample_tokens",
             "checkpoint_interval", "keep_checkpoints", "stop_at_step", "time_limit", "max_skipped_steps", "wandb",
             "tensorboard", "device", "compile", "peak_flops", "resume", "dist_timeout", "demo"}


class TrainError(UserError):
    """A problem the user can fix: printed as one line, no traceback. exit_code 2 = usage."""

    def __init__(self, message, exit_code=1, every_rank=True, reported=False):
        super().__init__(message, exit_code)
        self.every_rank = every_rank  # False: only this rank saw it, so this rank must print it
        self.reported = reported  # already printed (see agree)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # A TrainError rather than argparse's exit: under torchrun it is printed once, like any other.
        raise TrainError(f"{message} (see --help)", exit_code=2)


def parse_args(argv=None):
    """The settings: the defaults (or --demo's), then a --config file's, then the flags given."""
    parser = ArgumentParser(description="Train GPT-2 on token shards. --demo changes the defaults shown here to "
                            "DEMO_DEFAULTS in this file.", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="a TOML file of settings (flag names with _ for -, e.g. "
                        "max_lr = 6e-4); flags on the command line win. Every run writes its own to "
                        "<log dir>/config.toml, so `--config log/config.toml` repeats it")
    add_flags(parser, TrainConfig)
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(parser.parse_args(argv))
    if "config" in given:  # the file's settings become flags in front of the command line's: those win
        given = vars(parser.parse_args(config_file_flags(given.pop("config")) + argv))
        given.pop("config")
    defaults = {}
    if given.get("demo"):
        defaults = dict(DEMO_DEFAULTS)
        if given.get("hellaswag_file"):
            defaults["hellaswag_interval"] = defaults["eval_interval"]
    return TrainConfig(**{**defaults, **given})


def config_file_flags(path):
    """A TOML settings file as the flags that say the same: one way in for every value."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainError(f"cannot read --config {path} ({e})", exit_code=2)
    names = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise TrainError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see --help", exit_code=2)
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if not isinstance(value, bool):
            flags += [flag, str(value)]
        elif value or names[key].metadata.get("action") != "store_true":  # store_true flags have no --no- form
            flags.append(flag if value else "--no-" + flag[2:])
    return flags


def write_config_file(config, path):
    """The run's effective settings as TOML (None, meaning "not set", is left out)."""
    lines = [f"# train_gpt2.py settings of this run; repeat it with: python train_gpt2.py --config {path}"]
    for key, value in asdict(config).items():
        if value is not None and key not in ("overwrite", "resume"):  # how this launch began, not the recipe
            lines.append(f"{key} = {json.dumps(value)}")  # a JSON string, number or true/false is TOML too
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def model_config(config):
    """The GPTConfig of a from-scratch model: the named size, with any size flags applied."""
    sizes = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) is not None}
    return GPTConfig.from_name(config.model, block_size=config.block_size, vocab_size=config.vocab_size, **sizes)


def config_problems(config, world_size):
    """Every setting that cannot work, as readable strings (empty when all is well)."""
    found = list(model_config(config).problems())
    floats = [f.name for f in fields(config) if f.type is float and getattr(config, f.name) is not None]
    not_finite = [k for k in floats if not math.isfinite(getattr(config, k))]  # nan and inf pass every comparison below
    found += [f"{k}={getattr(config, k)} must be a finite number" for k in not_finite]
    # An 'auto' batch size is a power of two that divides the rows of a step: 1 when any does.
    batch_size = 1 if config.batch_size == "auto" else config.batch_size
    positive = ["seq_len", "total_batch_size", "max_steps", "max_lr", "adam_eps", "keep_checkpoints",
                "num_samples", "sample_tokens", "max_skipped_steps", "dist_timeout", "peak_flops"]
    found += [f"{k}={getattr(config, k)} must be positive" for k in positive
              if k not in not_finite and getattr(config, k) is not None and getattr(config, k) <= 0]
    if batch_size <= 0:
        found.append(f"batch_size={batch_size} must be positive")
    non_negative = ["warmup_steps", "min_lr", "weight_decay", "grad_clip", "eval_interval", "val_tokens",
                    "hellaswag_interval", "sample_interval", "checkpoint_interval", "stop_at_step", "time_limit", "seed"]
    found += [f"{k}={getattr(config, k)} must not be negative" for k in non_negative
              if k not in not_finite and getattr(config, k) < 0]
    found += [f"{k}={getattr(config, k)} must be in [0, 1)" for k in ("beta1", "beta2")
              if k not in not_finite and not 0 <= getattr(config, k) < 1]
    if config.sample_interval and not config.sample_prompt:
        found.append("sample_prompt is empty; give a prompt, or turn samples off with --sample-interval 0")
    if os.path.exists(config.log_dir) and not os.path.isdir(config.log_dir):
        found.append(f"log_dir={config.log_dir} is a file, not a directory")
    if os.path.isfile(config.init_from):
        found.append(f"init_from={config.init_from} is a file, not a Hugging Face GPT-2: continue a train_gpt2.py "
                     f"checkpoint with --resume {config.init_from}, or fine-tune from one after `python export.py "
                     f"{config.init_from} DIR` with --init-from DIR")
    elif config.init_from.startswith(("/", "./", "../", "~")) and not os.path.exists(config.init_from):
        found.append(f"init_from={config.init_from} does not exist (give a local Hugging Face directory or a "
                     f"hub name such as gpt2)")
    if config.overwrite and config.resume not in ("auto", "never"):
        found.append(f"--overwrite starts a new run, so it cannot resume from {config.resume}")
    if config.init_from == "scratch" and config.seq_len > config.block_size:
        found.append(f"seq_len={config.seq_len} is over block_size={config.block_size}")
    if config.warmup_steps > config.max_steps:
        found.append(f"warmup_steps={config.warmup_steps} is over max_steps={config.max_steps}")
    if not not_finite and config.min_lr > config.max_lr:
        found.append(f"min_lr={config.min_lr} is over max_lr={config.max_lr}")
    if config.eval_interval and 0 <= config.val_tokens < config.seq_len:
        found.append(f"val_tokens={config.val_tokens} is less than one sequence of seq_len={config.seq_len}")
    tokens_per_micro_step = batch_size * config.seq_len * world_size
    if tokens_per_micro_step > 0 and config.total_batch_size % tokens_per_micro_step:
        found.append(f"total_batch_size={config.total_batch_size} is not divisible by batch_size * seq_len * "
                     f"world_size = {batch_size} * {config.seq_len} * {world_size} = {tokens_per_micro_step}")
    return found


# -----------------------------------------------------------------------------
# Distributed helpers: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is rank 0 of 1


def is_master():
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def pick_device(name):
    """The device to run on: --device, or under torchrun this process's GPU (cuda:LOCAL_RANK)."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise TrainError(f"unknown --device {name}; use auto, cpu, cuda, cuda:N or mps", exit_code=2)
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise TrainError(f"--device {name}: no such device on this machine; use --device auto", exit_code=2)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        if "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device.index or 0)  # its RNG state, pinned memory and kernels
    return device


def start_distributed(timeout):
    """Under torchrun, join the other processes (RANK, LOCAL_RANK and WORLD_SIZE say where we are).

    With GPUs the group holds NCCL for CUDA tensors (DDP's gradients) and gloo for CPU tensors (the
    few small messages that coordinate the ranks: errors, the checkpoint to resume); without, gloo.
    A collective that waits more than `timeout` seconds for another rank fails, so a rank that
    stalls or dies ends the job instead of hanging it."""
    if "RANK" not in os.environ:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before NCCL starts on this GPU
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


class AllRanks:
    """A block of the set-up that every rank runs, and after which they agree on how it went.

        with AllRanks() as block:     # a TrainError in here, on any rank, ends every rank
            block.value = ...         # optional: this rank's contribution
        block.values                  # every rank's value, in rank order

    A rank that fails skips the rest of its block, straight to the agreement: no rank is ever left
    waiting in a collective that another rank will not reach (the classic silent hang).
    """

    def __enter__(self):
        self.value = None
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, UserError):
            self.values = agree(error, self.value)  # raises on every rank if any rank failed
        return False


def agree(error=None, value=None):
    """Every rank says whether it failed (and shares a value); returns the values in rank order.

    If any rank failed, rank 0 prints each message once (with the failing rank's number when not
    every rank met it), the ranks wait until it is printed, and every rank raises a TrainError that
    is already reported, with the exit code of the first failure.
    """
    if not dist.is_initialized():
        if error is not None:
            raise error
        return [value]
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (None if error is None else (str(error), error.exit_code), value))
    failures = [(rank, failure) for rank, (failure, _) in enumerate(outcomes) if failure is not None]
    if not failures:
        return [value for _, value in outcomes]
    if dist.get_rank() == 0:
        ranks_by_message = {}
        for rank, (message, _) in failures:
            ranks_by_message.setdefault(message, []).append(rank)
        for message, ranks in ranks_by_message.items():
            who = "" if len(ranks) == len(outcomes) else f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: "
            print(f"error: {who}{message}", file=sys.stderr, flush=True)
    dist.barrier()  # a gloo barrier: no rank exits (and has torchrun stop the others) before the print
    raise TrainError("reported", exit_code=failures[0][1][1], reported=True)


def all_reduce_sum(tensor):
    """Sum over ranks in place (gloo has no AVG, so averages divide the sum themselves)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# -----------------------------------------------------------------------------
# Precision, compile and batch size: what `auto` picks
#
#                    --dtype                 --compile  --batch-size (micro batch per device)
#   CUDA, Ampere on  bfloat16 autocast       on         the largest of 64, 32, ..., 1 that fits a trial step
#   CUDA, older      float16 + grad scaler   on         the same
#   MPS              float32                 off        estimated from the free memory
#   CPU              float32                 off        estimated from the free memory
# compile needs Triton, which works on CUDA GPUs from Volta on, and not on Windows. --demo keeps
# float32, no compile and 8 rows. The resolved values go into log.txt and the checkpoints.


def resolve_auto(config, device, world_size):
    """The config with each 'auto' replaced by what this machine runs, said in one printed line."""
    how = {k: " (auto)" for k in ("dtype", "compile", "batch_size") if getattr(config, k) == "auto"}
    config = replace(config, dtype=resolve_dtype(config.dtype, device),
                     compile=compile_by_default(device) if config.compile == "auto" else config.compile)
    if config.batch_size == "auto":
        batch_size, how["batch_size"] = auto_batch_size(config, device, world_size)
        config = replace(config, batch_size=batch_size)
    print0(f"dtype {config.dtype}{how.get('dtype', '')}, compile {'on' if config.compile else 'off'}"
           f"{how.get('compile', '')}, batch size {config.batch_size}{how.get('batch_size', '')}")
    return config


def compile_by_default(device):
    """torch.compile's GPU kernels are Triton's: on for CUDA where Triton runs (the package is
    there and the GPU is Volta or newer: has_triton checks both); off on MPS (unreliable there),
    on Windows (no official Triton) and on CPU (see DEMO_DEFAULTS: compiling costs more than it saves)."""
    from torch.utils._triton import has_triton  # private, but what inductor itself asks
    return device.type == "cuda" and platform.system() != "Windows" and has_triton()


def autocast_and_scaler(dtype, device):
    """The forward pass's autocast context and, for float16, the gradient scaler: float16 ends at
    65504 and below 6e-8, so small gradients would round to zero; the scaler multiplies the loss up
    before backward and the gradients back down before the step. bfloat16 has float32's range and
    needs none."""
    dtype = autocast_dtype_for(dtype, device)
    if dtype is None:
        return nullcontext(), None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def batch_size_candidates(config, world_size):
    """Powers of two up to 64 that divide the rows each rank reads per optimizer step, largest first."""
    rows = config.total_batch_size // (config.seq_len * world_size)
    return [b for b in (64, 32, 16, 8, 4, 2, 1) if rows % b == 0]


def auto_batch_size(config, device, world_size):
    """-> (batch size, how it was chosen). Under torchrun every rank takes the smallest that fit
    on any rank, so that all ranks run the same number of micro steps."""
    candidates = batch_size_candidates(config, world_size)
    if device.type == "cuda":
        batch_size, _ = first_that_fits(candidates, lambda b: trial_step(config, device, b), device)
        free_memory(device)  # the trial model and its compiled graphs
        how = " (auto: the largest that fit a trial step)"
    else:
        model = build_model(config, torch.device("meta"))  # its shape only: no memory, no weights
        per_row = activation_bytes(model.config, config.seq_len)
        budget = memory_budget(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        fitting = [b for b in candidates if budget and 16 * model.num_parameters() + b * per_row <= budget]
        batch_size = (fitting or candidates[-1:])[0]  # none: the smallest, 1
        how = (f" (auto: {per_row / 1e9:.2f} GB per row, within {budget / 1e9:.1f} GB: half the free memory)"
               if budget else " (auto: the free memory is unknown here)")
    if dist.is_initialized():  # 0: none fit on some rank
        smallest = torch.tensor([batch_size or 0], device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        batch_size = int(smallest.item())
    if not batch_size:
        raise TrainError(f"out of {device.type} memory at --batch-size 1 (one row of --seq-len {config.seq_len}); "
                         f"use a shorter --seq-len or a smaller model")
    return batch_size, how


def first_that_fits(batch_sizes, try_step, device):
    """(B, try_step(B)) for the first B of batch_sizes (largest first) that runs without
    torch.OutOfMemoryError, or (None, None). A failed try's memory is given back before the next."""
    for batch_size in batch_sizes:
        try:
            return batch_size, try_step(batch_size)
        except torch.OutOfMemoryError:
            pass  # leaving the except block drops the traceback, and with it the failed try's tensors
        free_memory(device)
    return None, None


def trial_step(config, device, batch_size):
    """One training step of a throwaway model at this micro batch, as the run will take it (dtype,
    compile, fused AdamW) but without train_step's all-reduces: ranks whose tries differ must not
    meet in a collective. Raises torch.OutOfMemoryError where it does not fit. The run's own model
    is built afterwards, from the same seed, so the trial changes nothing the run computes."""
    raw_model = build_model(config, device)
    optimizer, _ = raw_model.configure_optimizers(config.weight_decay, config.max_lr, device_type=device.type)
    model = torch.compile(raw_model) if config.compile else raw_model
    autocast, scaler = autocast_and_scaler(config.dtype, device)
    tokens = torch.zeros(batch_size, config.seq_len, dtype=torch.long, device=device)
    with autocast:
        _, loss = model(tokens, tokens)
    (scaler.scale(loss) if scaler else loss).backward()
    optimizer.step()  # allocates AdamW's two moments


def free_memory(device):
    """Forget compiled graphs (they hold their model) and hand cached GPU memory back."""
    torch._dynamo.reset()  # also: the next model or batch size compiles afresh, not as a dynamic shape
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def activation_bytes(model_config, seq_len):
    """Estimated bytes a training step holds per row of seq_len tokens, in float32 (4 bytes a value):
    per token, about 17 * n_embd values per layer kept for backward (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models": 34 * h bytes in 16 bits, without
    dropout), plus 4 * vocab_size for the logits, their log-softmax and the gradients of both:
        4 * T * (17 * n_layer * n_embd + 4 * vocab_size)
    Add 16 bytes per parameter (weights, gradients, AdamW's two moments) for a whole step. On CPU
    the sum came within 10% of the measured peak memory of a step (GPT-2 124M and the demo GPT)."""
    return 4 * seq_len * (17 * model_config.n_layer * model_config.n_embd + 4 * model_config.vocab_size)


def memory_budget(processes):
    """Half the memory this machine has free, shared by `processes`; the other half is room for the
    OS, the page cache of the shards and the estimate's error. Free means Linux's MemAvailable, or a
    container's own limit (cgroup v2) when lower; elsewhere (macOS, where MPS shares the RAM) half
    the RAM, the only figure there without psutil; None where neither can be read (Windows)."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        if not hasattr(os, "sysconf"):
            return None
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass  # no cgroup v2 limit
    return free // 2 // processes


def out_of_memory(config, device, step):
    """The one line for an out-of-memory error in the middle of training."""
    fix = (f"relaunch with --batch-size {config.batch_size // 2} (same total batch, more micro steps; it resumes "
           f"from the last checkpoint)" if config.batch_size > 1 else "use a shorter --seq-len or a smaller model")
    return f"out of {device.type} memory at step {step} with --batch-size {config.batch_size}; {fix}"


# -----------------------------------------------------------------------------
# The loader: windows of T+1 tokens over the concatenated shards of a split
#
# A split's shards, in this epoch's order, form one long token stream; row i is the window
# stream[i*T : i*T + T + 1] (x = its first T tokens, y = its last T). A window may span two
# shards, so no tokens are lost at shard ends: an epoch leaves out less than one window at its
# end. The loader counts rows from the start of training; at the end of the split the count runs
# on into the next epoch, with its own shuffled shard and row order (seeded by (seed, epoch), the
# same on every rank). Micro batch g is rows [g*B, (g+1)*B); at step s, micro step k, rank r of W
# reads g = (s * accum + k) * W + r. So the ranks read disjoint rows, and their union is exactly
# what one process reads with W times the accumulation: both runs train on the same tokens, and
# the state (the next row) is the same on every rank and holds for any B and W.


def find_shards(data_dir, split):
    if os.path.isfile(data_dir):
        raise TrainError(f"--data-dir {data_dir} is a file; give the directory of shards that fineweb.py wrote")
    if not os.path.isdir(data_dir):
        raise TrainError(f"data directory {data_dir} does not exist; make it with `python fineweb.py` "
                         f"(or try `python train_gpt2.py --demo`, which needs no download)")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].npy")))
    if not paths:
        raise TrainError(f"no {split} shards (*_{split}_NNNNNN.npy) in {data_dir}; make them with `python fineweb.py`")
    return paths


def open_shard(path):
    """A shard as a read-only memory map (nothing is read until a window needs it)."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # truncated, not .npy, unreadable
        raise TrainError(f"{path} is not a readable token shard ({e}); delete it and rerun `python fineweb.py`")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise TrainError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}, not uint16 tokens; "
                         f"delete it and rerun `python fineweb.py`")
    return tokens


class ShardLoader:
    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, vocab_size=None,
                 seed=0, shuffle=False, min_rows=None):
        self.paths = find_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.split, self.B, self.T = split, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.vocab_size, self.seed, self.shuffle = vocab_size, seed, shuffle
        self.num_tokens = sum(len(s) for s in self.shards)
        self.rows_per_epoch = max(0, (self.num_tokens - 1) // seq_len)  # each window needs T+1 tokens
        min_rows = batch_size * world_size if min_rows is None else min_rows  # one micro step on all ranks
        if self.rows_per_epoch < min_rows:
            raise TrainError(f"the {split} split of {data_dir} holds {self.num_tokens} tokens, fewer than one batch "
                             f"of {min_rows} windows of {seq_len}+1 tokens; use more data or a smaller "
                             f"--batch-size/--seq-len")
        self.row = 0  # the next row to read, counted over epochs; the same on every rank
        self._epoch = None  # the epoch whose order is cached below

    def _order(self, epoch):
        """This epoch's shard order, each shard's start in the stream, and row order (or None)."""
        if self._epoch != epoch:
            shard_order, self._rows = np.arange(len(self.shards)), None
            if self.shuffle:
                rng = np.random.default_rng((self.seed, epoch))
                shard_order = rng.permutation(len(self.shards))
                self._rows = rng.permutation(self.rows_per_epoch)
            self._shard_order = shard_order
            self._starts = np.cumsum([0] + [len(self.shards[i]) for i in shard_order])
            self._epoch = epoch
        return self._shard_order, self._starts, self._rows

    def _window(self, epoch, row):
        """Tokens stream[row*T : row*T + T + 1] of an epoch, read across shard ends."""
        shard_order, starts, _ = self._order(epoch)
        start, pieces, need = row * self.T, [], self.T + 1
        i = int(np.searchsorted(starts, start, side="right")) - 1  # the shard holding `start`
        while need:
            shard = shard_order[i]
            piece = self.shards[shard][start - starts[i]:start - starts[i] + need]
            # Token ids are checked on every window read: a max over T+1 tokens costs nothing next
            # to the forward pass, and it catches bad ids anywhere without a scan of every shard.
            if self.vocab_size is not None and len(piece) and int(piece.max()) >= self.vocab_size:
                raise TrainError(f"{self.paths[shard]} holds token id {int(piece.max())}, beyond the model's "
                                 f"vocab_size={self.vocab_size}; raise --vocab-size or re-tokenize with "
                                 f"GPT-2's tokenizer",
                                 every_rank=False)
            pieces.append(piece)
            start, need, i = start + len(piece), need - len(piece), i + 1
        return np.concatenate(pieces)

    def read_rows(self, rows):
        """(x, y) int64 tensors of shape (len(rows), T) for rows counted over epochs."""
        windows = np.empty((len(rows), self.T + 1), dtype=np.int64)
        for j, row in enumerate(rows):
            epoch, index = divmod(int(row), self.rows_per_epoch)
            order = self._order(epoch)[2]
            windows[j] = self._window(epoch, index if order is None else int(order[index]))
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def next_batch(self):
        """This rank's next micro batch (x, y), each (B, T); all ranks move on by W*B rows."""
        first = self.row + self.rank * self.B
        self.row += self.B * self.world_size
        return self.read_rows(range(first, first + self.B))

    def state_dict(self):
        epoch, row = divmod(self.row, self.rows_per_epoch)
        return {"epoch": epoch, "row": row, "num_tokens": self.num_tokens, "seq_len": self.T}

    def load_state_dict(self, state):
        if (state["num_tokens"], state["seq_len"]) != (self.num_tokens, self.T):
            raise TrainError(f"the checkpoint's loader read {state['num_tokens']} {self.split} tokens as windows of "
                             f"{state['seq_len']}, but the data holds {self.num_tokens} tokens and --seq-len is "
                             f"{self.T}; resume with the same data, or start fresh with --resume never")
        self.row = state["epoch"] * self.rows_per_epoch + state["row"]


# -----------------------------------------------------------------------------
# The learning-rate schedule: linear warmup, then cosine decay to min_lr at max_steps


def get_lr(step, config):
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps  # step 0 already learns a little
    if step >= config.max_steps:
        return config.min_lr  # the floor, for any step past the schedule
    progress = (step - config.warmup_steps) / (config.max_steps - config.warmup_steps)  # 0 -> 1
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.max_lr - config.min_lr)


# -----------------------------------------------------------------------------
# Checkpoints and the run's history: one run per log directory, rank 0 writes, files whole or absent

# What train_gpt2.py writes into a log directory: --overwrite removes these and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "log.txt", "config.toml", "abandoned", "tensorboard", "wandb_run_id")


def list_checkpoints(log_dir):
    """Checkpoint paths, oldest first (the zero-padded step makes name order step order)."""
    return sorted(glob.glob(os.path.join(log_dir, "checkpoints", "step_[0-9]*.pt")))


def checkpoint_step(path):
    return int(os.path.basename(path)[len("step_"):-len(".pt")])


def rng_state():
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    numpy_state = {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state  # only tensors and plain values: torch.load(weights_only=True) reads it


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(config, step, raw_model, optimizer, loader, scaler=None):
    """Write log_dir/checkpoints/step_<step>.pt whole (atomic_write), then prune old ones."""
    path = os.path.join(config.log_dir, "checkpoints", f"step_{step:08d}.pt")
    checkpoint = {"model": raw_model.state_dict(), "model_config": asdict(raw_model.config),
                  "optimizer": optimizer.state_dict(), "step": step, "config": asdict(config),
                  "loader": loader.state_dict(), "rng": rng_state(),
                  "scaler": scaler.state_dict() if scaler else None}  # float16's loss scale: resume continues it
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:  # a full disk, a vanished mount: the older checkpoints stay as they are
        raise TrainError(f"cannot write checkpoint {path} ({e}); free some space and relaunch to resume",
                         every_rank=False)  # rank 0 alone writes checkpoints
    for old in list_checkpoints(config.log_dir)[:-config.keep_checkpoints]:
        os.remove(old)
    return path


def claim_log_dir(config):
    """Rank 0: this launch's lock on the log directory, which holds one run (see --overwrite)."""
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(config.log_dir, name))]
    holds_run = list_checkpoints(config.log_dir) or os.path.exists(os.path.join(config.log_dir, "metrics.jsonl"))
    if holds_run and config.resume == "never" and not config.overwrite:  # refused before anything is touched
        raise TrainError(f"{config.log_dir} holds a run ({', '.join(earlier)}); continue it with --resume auto, "
                         f"start a new run there with --overwrite (deletes those), or use another --log-dir",
                         exit_code=2)
    try:
        os.makedirs(config.log_dir, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create --log-dir {config.log_dir} ({e.strerror})", exit_code=2)
    lock = DirectoryLock(config.log_dir, "train_gpt2.py run").acquire()
    if earlier and config.overwrite:
        for name in earlier:
            path = os.path.join(config.log_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print0(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {config.log_dir}")
    for stale in glob.glob(os.path.join(config.log_dir, "checkpoints", ".*.tmp")):
        os.remove(stale)  # a launch killed mid-write left it; the lock says no one else writes here
    return lock


def choose_checkpoint(config):
    """Rank 0: (path, contents) of the checkpoint to resume from, or (None, None) for a new run.
    With --resume auto an unreadable latest file (a crash mid-write) is skipped for the one before."""
    if config.resume == "never" or config.overwrite:
        return None, None
    if config.resume != "auto":
        try:
            return config.resume, read_checkpoint(config.resume)
        except ValueError as e:
            raise TrainError(f"--resume {e}; pass a checkpoint path, or --resume auto")
    for path in reversed(list_checkpoints(config.log_dir)):
        try:
            return path, read_checkpoint(path)
        except ValueError as e:
            print0(f"note: skipping unreadable checkpoint ({e})")
    return None, None


def set_aside_later_checkpoints(config, start_step):
    """Rank 0: checkpoints past start_step belong to a branch this launch abandons (a rollback, or
    an unreadable latest one); moved aside, so that --resume auto and pruning never mix them in."""
    later = [path for path in list_checkpoints(config.log_dir) if checkpoint_step(path) > start_step]
    if later:
        aside = os.path.join(config.log_dir, "abandoned", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for path in later:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        print0(f"resuming at step {start_step}: moved {len(later)} later checkpoint(s) to {aside}")


def check_resumable(saved, config):
    """Refuse to continue a run with settings that change what it learns, listing them all."""
    current = asdict(config)
    differ = [f"{k}={saved.get(k)!r} in the checkpoint but {current[k]!r} now"
              for k in current if k not in RESUMABLE and saved.get(k) != current[k]]
    if differ:
        raise TrainError(f"the checkpoint's settings differ from the flags: {'; '.join(differ)}; relaunch with the "
                         f"checkpoint's settings, or another --log-dir / --overwrite for a new run", exit_code=2)


class RunLog:
    """The run's history, written by rank 0: metrics.jsonl (one JSON object per event), log.txt
    (the same as text, with a header per launch) and the dashboards asked for (W&B, TensorBoard).

    One history per run: a launch that starts at step S first keeps only the events of steps
    before S (metrics.jsonl is rewritten whole), so a resumed or rolled-back run lists each step
    once, from the branch it continues. Non-finite values are written as null: the file stays JSON.
    """

    def __init__(self, config, start_step, enabled):
        self.enabled = enabled
        self.metrics_path = os.path.join(config.log_dir, "metrics.jsonl")
        self.text_path = os.path.join(config.log_dir, "log.txt")
        self.dashboards = []
        if enabled:
            self._keep_events_before(start_step)
            self.dashboards = open_dashboards(config, start_step)

    def _keep_events_before(self, step):
        if not os.path.exists(self.metrics_path):
            return
        kept = []
        with open(self.metrics_path, "rb") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line.rstrip(b"\n") + b"\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a crash
        atomic_write(self.metrics_path, lambda f: f.writelines(kept))

    def text(self, line):
        if self.enabled:
            with open(self.text_path, "a") as f:
                f.write(line + "\n")

    def event(self, record, line=None):
        """Append one event (a dict with a "step") to metrics.jsonl and the dashboards."""
        if not self.enabled:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        for dashboard in self.dashboards:
            dashboard.log(record)
        if line is not None:
            self.text(line)

    def close(self):
        for dashboard in self.dashboards:
            dashboard.close()


def run_header(config, device, world_size):
    """The top of each launch in log.txt: enough to tell runs apart and reproduce them."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "\n".join([
        f"=== launch {time.strftime('%Y-%m-%d %H:%M:%S')} ===",
        f"config: {json.dumps(asdict(config))}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, git {commit}",
        f"device: {name}, world size {world_size}",
    ])


# Dense peak FLOP/s by GPU and by the dtype the matmuls run in, matched against
# torch.cuda.get_device_name: float32 (as TF32 on tensor cores where the GPU has them, as training
# sets it; plain FP32 on V100 and T4), float16 and bfloat16 (None: no bf16 compute before Ampere).
# From NVIDIA's datasheets (H100, H200, H800, A100, A800, L40S, L40, L4, V100, T4); where a sheet
# quotes "with sparsity" figures, the dense peak is half of them. The first match wins, so a longer
# name comes before a shorter one it contains ("L40S", "L40", then "L4").
PEAK_FLOPS = {  # name: (float32, float16, bfloat16)
    "H100 PCIe": (378e12, 756e12, 756e12), "H100 NVL": (417.5e12, 835e12, 835e12),
    "H100": (494.5e12, 989e12, 989e12), "H200 NVL": (417.5e12, 835e12, 835e12), "H200": (494.5e12, 989e12, 989e12),
    "H800 PCIe": (378e12, 756e12, 756e12), "H800": (494.5e12, 989e12, 989e12),
    "A100": (156e12, 312e12, 312e12), "A800": (156e12, 312e12, 312e12),
    "L40S": (183e12, 362e12, 362e12), "L40": (90.5e12, 181e12, 181e12), "L4": (60e12, 121e12, 121e12),
    "V100S": (16.4e12, 130e12, None), "V100-PCIE": (14e12, 112e12, None), "V100": (15.7e12, 125e12, None),
    "Tesla T4": (8.1e12, 65e12, None),
}


def peak_flops_of(device_name, dtype):
    """The table's figure for a GPU name and dtype, or None: unknown GPUs, and MIG slices (a
    fraction of the GPU whose name still says H100) get no MFU rather than a wrong one."""
    if "MIG" in device_name:
        return None
    column = ("float32", "float16", "bfloat16").index(dtype)
    return next((peaks[column] for key, peaks in PEAK_FLOPS.items() if key in device_name), None)


def device_peak_flops(config, device):
    if config.peak_flops:
        return config.peak_flops
    if device.type == "cuda":
        return peak_flops_of(torch.cuda.get_device_name(device), config.dtype)
    return None  # cpu, mps: no reliable number, so MFU is left out


# -----------------------------------------------------------------------------
# Evaluation: val loss, HellaSwag and samples


@torch.no_grad()
def evaluate_val(model, val_loader, num_rows, rank, world_size, device, autocast):
    """Mean loss over the first num_rows val windows. Rank r takes rows r::W in batches of the
    training shape (the last one padded with ignored targets, so compile sees one shape); summed
    losses and token counts are all-reduced, so the result does not depend on W."""
    rows, B = list(range(rank, num_rows, world_size)), val_loader.B
    loss_sum = count = 0.0
    for i in range(0, len(rows), B):
        x, y = val_loader.read_rows(rows[i:i + B])
        if len(x) < B:
            x = torch.cat([x, x.new_zeros(B - len(x), x.size(1))])
            y = torch.cat([y, y.new_full((B - len(y), y.size(1)), -1)])  # -1: ignored by the loss
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y)
        n = (y != -1).sum().item()
        loss_sum += loss.item() * n
        count += n
    totals = torch.tensor([loss_sum, count], dtype=torch.float64)
    if dist.is_initialized():
        totals = all_reduce_sum(totals.to(device)).cpu()
    return (totals[0] / totals[1]).item()


def evaluate_hellaswag(model, examples, rank, world_size, device, config):
    """acc_norm over all examples, split over ranks by hellaswag.py and reduced here."""
    autocast_dtype = autocast_dtype_for(config.dtype, device)
    # batch_size // 4 examples = batch_size rows (4 endings each), no longer than training rows.
    result = hellaswag.evaluate(model, examples, device, batch_size=max(1, config.batch_size // 4), rank=rank,
                                world_size=world_size, autocast_dtype=autocast_dtype)
    counts = all_reduce_sum(torch.tensor([result["correct_norm"], result["total"]], dtype=torch.float64, device=device))
    return (counts[0] / counts[1]).item()


def sample(raw_model, config, device, autocast):
    """Continuations of the prompt, with a fixed seed so samples of different steps compare."""
    enc = get_tokenizer()
    prompt = torch.tensor(enc.encode_ordinary(config.sample_prompt), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(42)
    with autocast:
        out = raw_model.generate(prompt.repeat(config.num_samples, 1), config.sample_tokens, top_k=50,
                                 generator=generator)  # (num_samples, prompt + sample_tokens)
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# The training loop


def train_step(model, optimizer, loader, accum, lr, config, device, autocast, scaler=None, stop=False):
    """One optimizer step over accum micro batches -> (loss, grad norm, skipped, stop).

    Gradients are all-reduced only on the last micro step. One more small all-reduce tells every
    rank what the others saw: a loss or gradient norm that is not finite on any rank skips the
    update on every rank (parameters and optimizer untouched), and a rank that wants to stop
    (`stop`: a signal, a time limit) stops them all after this same step. float16's gradient
    scaler (`scaler`) handles its own overflows (below).
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        x, y = loader.next_batch()
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro_step == accum - 1
        with autocast:
            _, loss = model(x, y)
        # Each micro batch holds B*T targets, so the mean over the whole step is the mean of the
        # micro-batch means: divide each by accum before backward (the gradients add up).
        (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        loss_sum += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)  # the true gradients, for their norm and the clipping
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
    # With a scaler, an inf/nan gradient norm under a finite loss is float16 overflowing at the
    # current scale: scaler.step skips that update and scaler.update lowers the scale, as designed
    # (not a skipped step). Otherwise a non-finite norm skips the step like a non-finite loss.
    bad_norm = torch.zeros((), device=device) if scaler else (~torch.isfinite(norm)).float()
    flags = torch.stack([loss_sum, bad_norm, torch.tensor(float(stop), device=device)])
    loss_sum, bad_norm, stop = all_reduce_sum(flags).tolist()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    loss = loss_sum / (accum * world_size)  # logged: the mean over micro steps and ranks
    skipped = not math.isfinite(loss) or bad_norm > 0
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer) if scaler else optimizer.step()
    if scaler:
        scaler.update()  # also after a skipped step: unscale_ above must be matched
    return loss, norm.item(), skipped, stop > 0


def due(interval, step, last):
    """Whether an every-`interval`-steps event happens at this step (0 turns it off)."""
    return interval > 0 and (step % interval == 0 or last)


def keep_freed_memory():
    """On Linux, keep freed memory inside the process instead of handing it back to the OS.

    glibc serves every large tensor (the logits and their gradient, the embedding gradient:
    hundreds of MB at T=1024) with a fresh mmap and unmaps it when freed, so each CPU training step
    page-faults that memory in again. Measured on 2 CPU cores, 124M at T=1024: the fp32 step went
    from ~6.1 s to ~5.0 s and the bf16 step from ~3.6 s to ~3.0 s. GPU runs allocate little host
    memory and do not need it; elsewhere (macOS, musl) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
        libc.mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap, which is reused...
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ...and not trimmed back to the OS after each step (an int: at most 2 GB)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def build_model(config, device):
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts them)
    if config.init_from == "scratch":
        model = GPT(model_config(config))
    else:
        try:
            model = GPT.from_pretrained(config.init_from, vocab_size=config.vocab_size)
        except (OSError, ValueError) as e:
            raise TrainError(f"cannot load --init-from {config.init_from} ({str(e).splitlines()[0]}); give a GPT-2 "
                             f"name (gpt2, gpt2-medium, ...) or a local Hugging Face directory")
        if config.seq_len > model.config.block_size:
            raise TrainError(f"invalid settings: seq_len={config.seq_len} is over {config.init_from}'s "
                             f"block_size={model.config.block_size}", exit_code=2)
    return model.to(device)


def prepare_demo_data(data_dir):
    """Tokenize Python's reference manual into data_dir (the first time; later calls find it done)."""
    import fineweb  # only the demo needs it
    try:
        fineweb.write_shards(fineweb.python_docs_documents(), data_dir, "pydocs", shard_size=16384, num_proc=1,
                             progress=False, source="python-docs")
    except UserError as e:
        raise TrainError(f"cannot build the demo data in {data_dir} ({e}); pass another --data-dir")


def train(config, launch):
    rank, world_size = dist.get_rank() if dist.is_initialized() else 0, dist.get_world_size() if dist.is_initialized() else 1
    master = rank == 0
    started = clock()

    # The set-up, in blocks that every rank runs and then agrees on: an error on any rank (a file
    # missing on one node, say) ends every rank with its message, never a rank left waiting.
    with AllRanks():
        device = pick_device(config.device)
        problems = config_problems(config, world_size)
        if problems:
            raise TrainError("invalid settings: " + "; ".join(problems), exit_code=2)
        if config.demo or config.sample_interval or config.hellaswag_interval:
            try:  # the demo data, samples and HellaSwag need GPT-2's vocabulary: fail now, not mid-run
                get_tokenizer()
            except OSError as e:
                raise TrainError(str(e))
        if master:
            launch.hold(claim_log_dir(config))  # one run per log directory, one launch at a time
        if config.demo and master:
            prepare_demo_data(config.data_dir)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    with AllRanks():  # data first: a missing data dir fails in seconds, before a trial step of minutes
        find_shards(config.data_dir, "train")
    config = resolve_auto(config, device, world_size)  # dtype, compile and batch size for this machine
    autocast, scaler = autocast_and_scaler(config.dtype, device)
    accum = config.total_batch_size // (config.batch_size * config.seq_len * world_size)

    with AllRanks() as choice:
        # Data first: a missing or broken data dir should fail in seconds, not after building the model.
        train_loader = ShardLoader(config.data_dir, "train", config.batch_size, config.seq_len, rank, world_size,
                                   config.vocab_size, config.seed, config.shuffle)
        if config.eval_interval:
            val_loader = ShardLoader(config.data_dir, "val", config.batch_size, config.seq_len,
                                     vocab_size=config.vocab_size, min_rows=1)
            val_rows = min(config.val_tokens // config.seq_len, val_loader.rows_per_epoch)
            if val_rows < config.val_tokens // config.seq_len:
                print0(f"note: the val split holds {val_loader.num_tokens} tokens; validating on "
                       f"{val_rows * config.seq_len}, not --val-tokens {config.val_tokens}")
        examples = []
        if config.hellaswag_interval:
            try:  # without --hellaswag-file, hellaswag.py downloads the val set once into its cache
                examples = hellaswag.load_examples(config.hellaswag_file or hellaswag.download())
            except UserError as e:
                raise TrainError(f"{e}; pass --hellaswag-file FILE, or turn HellaSwag off with --hellaswag-interval 0")
        raw_model = build_model(config, device)
        optimizer, info = raw_model.configure_optimizers(config.weight_decay, config.max_lr,
                                                         (config.beta1, config.beta2), config.adam_eps, device.type)
        if master:  # rank 0 decides which checkpoint every rank resumes from
            choice.value, checkpoint = choose_checkpoint(config)
    resume_path = choice.values[0]
    with AllRanks() as start:
        start.value = 0
        if resume_path is not None:
            if not master:
                try:
                    checkpoint = read_checkpoint(resume_path)
                except ValueError as e:
                    raise TrainError(f"cannot read the checkpoint rank 0 chose: {e}; does every node see the same "
                                     f"--log-dir?")
            check_resumable(checkpoint["config"], config)
            raw_model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            train_loader.load_state_dict(checkpoint["loader"])
            set_rng_state(checkpoint["rng"])
            if scaler:
                scaler.load_state_dict(checkpoint["scaler"])
            start.value = checkpoint["step"]
            del checkpoint  # the optimizer state is large; let it go
    if len(set(start.values)) > 1:
        raise TrainError(f"the ranks read checkpoints of different steps ({start.values}) from {resume_path}; does "
                         f"every node see the same --log-dir?")
    start_step = start.values[0]
    end_step = min(config.max_steps, config.stop_at_step or config.max_steps)
    if start_step >= end_step:
        print0(f"nothing to do: {config.log_dir} holds a run at step {start_step}, "
               + (f"complete (--max-steps {config.max_steps})" if start_step >= config.max_steps else
                  f"and --stop-at-step is {config.stop_at_step}: raise it, or leave it out to go on")
               + "; --overwrite or another --log-dir starts a new run")
        return 0

    with AllRanks():  # rank 0: the history from here on (see RunLog), the dashboards, the settings file
        log = RunLog(config, start_step, enabled=master)
        launch.hold(log)
        if master:
            set_aside_later_checkpoints(config, start_step)
            write_config_file(config, os.path.join(config.log_dir, "config.toml"))

    # One compiled module serves training (inside DDP), the val loss and HellaSwag; sampling runs the
    # plain module's KV-cache loop, whose shapes change every token. Same weights throughout.
    model = torch.compile(raw_model) if config.compile else raw_model
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    log.text(run_header(config, device, world_size))
    print0(f"{raw_model.num_parameters():,} parameters, {config.total_batch_size:,} tokens per step = "
           f"{config.batch_size} x {config.seq_len} x {world_size} devices x {accum} micro steps; {device}; "
           f"{'resuming at step %d' % start_step if start_step else 'starting at step 0'}")
    print0(f"AdamW: {info['num_decay_params']:,} parameters with weight decay, {info['num_nodecay_params']:,} "
           f"without; fused {info['fused']}")
    flops_per_token, peak = raw_model.flops_per_token(config.seq_len), device_peak_flops(config, device)
    # For --time-limit: the longest step and evaluation so far, and what a checkpoint takes (until one
    # is timed, guessed at 100 MB/s for the weights and AdamW's two moments).
    slowest_step = slowest_eval = 0.0
    checkpoint_seconds = 12 * raw_model.num_parameters() / 100e6

    step, skipped_in_a_row = start_step, 0
    while True:
        last = step == config.max_steps
        eval_start = clock()
        if due(config.eval_interval, step, last):
            val_loss = evaluate_val(model, val_loader, val_rows, rank, world_size, device, autocast)
            print0(f"step {step:5d} | val loss {val_loss:.4f}")
            log.event({"step": step, "val_loss": val_loss}, f"step {step} val_loss {val_loss:.6f}")
        if due(config.hellaswag_interval, step, last):
            acc = evaluate_hellaswag(model, examples, rank, world_size, device, config)
            print0(f"step {step:5d} | hellaswag acc_norm {acc:.4f} ({len(examples)} examples)")
            log.event({"step": step, "hellaswag_acc": acc}, f"step {step} hellaswag_acc {acc:.6f}")
        if due(config.sample_interval, step, last) and master:
            samples = sample(raw_model, config, device, autocast)
            for i, sample_text in enumerate(samples):
                print0(f"sample {i}: {sample_text!r}")
            text = "\n".join(f"step {step} sample {i}: {t!r}" for i, t in enumerate(samples))
            log.event({"step": step, "samples": samples}, text)
        if last:
            break
        slowest_eval = max(slowest_eval, clock() - eval_start)

        # The step proper, timed alone: evals and checkpoints stay out of ms/step and MFU.
        lr = get_lr(step, config)
        # Going on past this step needs time for it, the next evaluations and step, and a checkpoint.
        out_of_time = (master and config.time_limit > 0 and clock() - started + 2 * slowest_step + slowest_eval
                       + checkpoint_seconds > config.time_limit)
        synchronize(device)
        t0 = clock()
        try:
            loss, norm, skipped, stop = train_step(train_model, optimizer, train_loader, accum, lr, config, device,
                                                   autocast, scaler, stop=launch.signal is not None or out_of_time)
        except torch.OutOfMemoryError:
            raise TrainError(out_of_memory(config, device, step), every_rank=False) from None
        synchronize(device)
        dt = clock() - t0
        slowest_step = max(slowest_step, dt)
        tokens_per_sec = config.total_batch_size / dt
        mfu = flops_per_token * tokens_per_sec / (peak * world_size) if peak else None
        line = (f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | {dt * 1000:.2f} ms | "
                f"{tokens_per_sec:,.0f} tok/s | mfu {'-' if mfu is None else f'{mfu * 100:.1f}%'}"
                + (" | skipped: not finite" if skipped else ""))
        print0(line)
        log.event({"step": step, "train_loss": loss, "lr": lr, "grad_norm": norm, "dt_ms": dt * 1000,
                   "tokens_per_sec": tokens_per_sec, "mfu": mfu, **({"skipped": True} if skipped else {})}, line)
        step += 1
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        too_many_skipped = skipped_in_a_row == config.max_skipped_steps
        # A stop that lands on the last step does not stop: the final evaluations run first.
        stop = (stop or too_many_skipped or step == config.stop_at_step) and step < config.max_steps
        path = None
        if master and (due(config.checkpoint_interval, step, False) or step == config.max_steps or stop):
            t0 = clock()
            path = save_checkpoint(config, step, raw_model, optimizer, train_loader, scaler)
            checkpoint_seconds = clock() - t0
            log.text(f"step {step} checkpoint {path}")
        if too_many_skipped:
            raise TrainError(f"{skipped_in_a_row} steps in a row (to step {step - 1}) had a non-finite loss or "
                             f"gradient and were skipped; a checkpoint after them is saved, so a relaunch goes on "
                             f"with new batches; to roll back instead, relaunch with --resume <an earlier "
                             f"checkpoint> and a lower --max-lr or a longer --warmup-steps")
        if stop:
            reason = ("--stop-at-step" if step == config.stop_at_step else signal.Signals(launch.signal).name
                      if launch.signal else "--time-limit" if out_of_time else "a stop signal on another rank")
            go_on = ("raise --stop-at-step or leave it out and relaunch to continue" if reason == "--stop-at-step"
                     else "relaunch the same command to continue")
            print0(f"stopped after step {step - 1} ({reason}); checkpoint step_{step:08d}.pt saved; {go_on}")
            return 130 if launch.signal == signal.SIGINT else 0
    return 0


clock = time.perf_counter  # steps, evaluations and --time-limit are timed with it (a test may replace it)


# -----------------------------------------------------------------------------
# Dashboards: Weights & Biases and TensorBoard, each imported only when asked for


def open_dashboards(config, start_step):
    dashboards = []
    if config.tensorboard:
        dashboards.append(TensorBoard(config, start_step))
    if config.wandb:
        dashboards.append(WandB(config))
    return dashboards


class TensorBoard:
    """Every metrics.jsonl number as a scalar and samples as text, in <log dir>/tensorboard."""

    def __init__(self, config, start_step):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard", exit_code=2)
        # purge_step: what an earlier launch wrote from start_step on is dropped, as in metrics.jsonl
        self.writer = SummaryWriter(os.path.join(config.log_dir, "tensorboard"), purge_step=start_step)

    def log(self, record):
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])
        if "samples" in record:
            self.writer.add_text("samples", "\n\n".join(record["samples"]), record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """The same events in a Weights & Biases run, which a resumed launch continues (its id is kept
    in <log dir>/wandb_run_id). W&B cannot drop the steps a rolled-back run logs again: its charts
    then show both branches, while metrics.jsonl and TensorBoard keep one history."""

    def __init__(self, config):
        try:
            import wandb
        except ImportError:
            raise TrainError("--wandb needs the wandb package: pip install wandb", exit_code=2)
        self.wandb = wandb
        id_path, run_id = os.path.join(config.log_dir, "wandb_run_id"), None
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        self.run = wandb.init(project=config.wandb, id=run_id, resume="allow", dir=config.log_dir,
                              config=asdict(config), allow_val_change=True)  # a resume may change RESUMABLE ones
        atomic_write(id_path, lambda f: f.write(self.run.id.encode()))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # charts against our step, whatever W&B counts

    def log(self, record):
        data = {"step": record["step"], **numbers(record)}
        if "samples" in record:
            data["samples"] = self.wandb.Table(columns=["step", "sample"],
                                               data=[[record["step"], text] for text in record["samples"]])
        self.run.log(data)

    def close(self):
        self.run.finish()


def numbers(record):
    """The numeric values of an event, step left out (None, bools and text left out too)."""
    return {k: v for k, v in record.items() if k != "step" and type(v) in (int, float)}


# -----------------------------------------------------------------------------
# The launch: signals, errors, the exit code


class Launch:
    """What one launch holds until it ends: the handlers that stop it cleanly, and the log directory's
    lock and history, released and closed on the way out.

    SIGTERM and SIGUSR1 (what SLURM and spot instances send before a kill) and Ctrl-C end the run
    at the next step boundary: every rank finishes its step, they agree on it, a checkpoint is
    written. A second Ctrl-C quits at once.
    """

    def __enter__(self):
        self.signal, self.held, self.handlers = None, [], {}
        if threading.current_thread() is threading.main_thread():  # Python only lets it set handlers
            for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    self.handlers[number] = signal.signal(number, self._stop)
        return self

    def _stop(self, number, frame):
        if number == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signal is None:
            self.signal = number
            if is_master():  # os.write: a print here could land in the middle of another print
                os.write(sys.stderr.fileno(), f"{signal.Signals(number).name}: stopping after this step, with a "
                         f"checkpoint{' (Ctrl-C again to quit at once)' if number == signal.SIGINT else ''}\n".encode())

    def hold(self, resource):
        """Release (a lock) or close (the history) `resource` when the launch ends."""
        self.held.append(resource)

    def __exit__(self, *exc):
        for number, handler in self.handlers.items():
            signal.signal(number, handler)
        for resource in reversed(self.held):
            (getattr(resource, "release", None) or resource.close)()


def report(error):
    """Print a UserError as one line on stderr -> its exit code. Under torchrun an error that every
    rank met is printed by rank 0 alone, and the ranks wait for it; one rank's own error is
    printed by that rank, which then exits, and torchrun stops the others."""
    rank = int(os.environ.get("RANK", 0))
    every_rank = getattr(error, "every_rank", True)
    if not getattr(error, "reported", False) and (rank == 0 or not every_rank):
        print(f"error: {'' if rank == 0 else f'rank {rank}: '}{error}", file=sys.stderr, flush=True)
    if every_rank and dist.is_initialized() and not getattr(error, "reported", False):
        dist.barrier()
    return error.exit_code


def main(argv=None):
    """Run training -> the exit code: 0, 1 for a run-time problem, 2 for bad settings, 130 after Ctrl-C."""
    with Launch() as launch:
        try:
            try:
                config, error = parse_args(argv), None
            except TrainError as e:  # every rank has the same flags: agree() prints it once
                config, error = None, e
            start_distributed(config.dist_timeout if config else TrainConfig.dist_timeout)
            agree(error)
            return train(config, launch)
        except UserError as e:
            return report(e)
        except KeyboardInterrupt:
            saved = list_checkpoints(config.log_dir) if config else []
            print0(f"interrupted; {'the last checkpoint is ' + saved[-1] if saved else 'no checkpoint was saved'}"
                   f"; relaunch the same command to resume", file=sys.stderr)
            return 130
        except RuntimeError as e:
            if not (dist.is_initialized() and re.search(r"timed out|closed by peer|connection reset|NCCL",
                                                        str(e), re.IGNORECASE)):
                raise  # a bug, not a lost rank
            first_line = str(e).strip().splitlines()[0]
            print(f"error: rank {dist.get_rank()}: lost contact with another rank ({first_line}); its own "
                  f"message, if any, is above; relaunch to resume from the last checkpoint", file=sys.stderr,
                  flush=True)
            return 1
        finally:
            cleanup()


def cli():
    exit_code = main()
    if "RANK" in os.environ:
        # Under torchrun, leave without the interpreter's clean-up. DDP keeps gloo's worker
        # threads alive to the very end, and one that frees a tensor while the interpreter shuts
        # down aborts the process ("terminate called without an active exception"; about 1 run in
        # 15 on a busy 2-core machine). Every file is closed already; only the prints need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
