"""train_gpt2.py end to end on tiny GPTs and real text (Python's reference manual), on CPU.

The reference run ("straight") trains 8 steps in one go; resumed, killed-and-relaunched, DDP,
other micro batch, compiled and bf16 runs are compared with it, and it is itself compared with an
independent loop: the same recipe written plainly on transformers' GPT-2. Runs call main(argv) in-process
where they can; exit codes, killed runs and torchrun use subprocesses.
"""

import copy
import errno
import glob
import hashlib
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from transformers import GPT2Config, GPT2LMHeadModel

import common
import hellaswag
import train_gpt2
from common import UserError
from loader import ShardLoader
from logdir import model_from_checkpoint
from train_gpt2 import get_lr, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt2.py")
HOOKED = os.path.join(ROOT, "tests", "hooked_train.py")
STEPS = 8


def main(argv, seconds=180):
    """train_gpt2.main(argv) in this process, failing after `seconds` (SIGALRM) rather than running forever when a
    broken stop condition never ends the loop."""

    def expire(signum, frame):
        raise TimeoutError(f"train_gpt2.main ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return train_gpt2.main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and other tests may share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args(data_dir, log_dir, *extra):
    """A tiny GPT (2 layers, 2 heads, 32 wide), 256 tokens per step = 4 x 32 x 2 micro steps. The val loss
    covers 10 windows: not a multiple of the micro batch (4), nor of 2 ranks x 4, so its padding is real."""
    return [
        "--data-dir",
        data_dir,
        "--log-dir",
        str(log_dir),
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "64",
        "--vocab-size",
        "50257",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--total-batch-size",
        "256",
        "--max-steps",
        str(STEPS),
        "--warmup-steps",
        "2",
        "--max-lr",
        "1e-2",
        "--min-lr",
        "1e-3",
        "--eval-interval",
        "4",
        "--val-tokens",
        "320",
        "--hellaswag-interval",
        "0",
        "--sample-interval",
        "0",
        "--checkpoint-interval",
        "2",
        "--no-compile",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        *extra,
    ]


def metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def series(log_dir, key):
    """{step: value} of one metric; fails if a step is logged twice."""
    records = [r for r in metrics(log_dir) if key in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps for {key}: {steps}"
    return {r["step"]: r[key] for r in records}


def checkpoint(log_dir, step):
    return torch.load(os.path.join(log_dir, "checkpoints", f"step_{step:08d}.pt"), weights_only=True)


def assert_close_runs(log_dir, reference, atol):
    for key in ("train_loss", "grad_norm", "val_loss"):
        got, want = series(log_dir, key), series(reference, key)
        assert got.keys() == want.keys()
        for step in want:
            assert abs(got[step] - want[step]) <= atol * max(1.0, abs(want[step])), (key, step, got[step], want[step])


# Every wait on another process below has a deadline: a run that dies early or hangs fails its test
# within minutes, and what a test started (torchrun's ranks too: one process group) is killed.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_process(command, timeout=300, env=(), **kwargs):
    """subprocess.run(command) with OMP_NUM_THREADS=1 and env added; past the timeout its whole process group
    is killed (torchrun's ranks included) and the test fails."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
        **kwargs,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"{' '.join(command)} ran over {timeout} s; its stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_subprocess(argv, **kwargs):
    return run_process([sys.executable, SCRIPT, *argv], **kwargs)


def run_torchrun(argv):
    """train_gpt2.py under torchrun, 2 processes on CPU (gloo)."""
    return run_process([*TORCHRUN, SCRIPT, *argv])


class Background:
    """A run in the background (its own process group) whose stderr lines the test reads as they come, each
    wait with a deadline; leaving the `with` block kills whatever is left of it."""

    def __init__(self, command, env=()):
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
        )
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)  # the end of the pipe

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stderr_until(self, prefix=None, timeout=120):
        """The stderr so far, read up to a line starting with prefix (None: to its end)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line {prefix!r} on stderr within {timeout} s:\n{''.join(self.seen)[-3000:]}")
            if line is None:
                if prefix is None:
                    return "".join(self.seen)
                pytest.fail(f"the run ended without a line {prefix!r}:\n{''.join(self.seen)[-3000:]}")
            self.seen.append(line)
            if prefix is not None and line.startswith(prefix):
                return "".join(self.seen)

    def wait(self, timeout=300):
        """The exit code and the whole stderr."""
        stderr = self.stderr_until(None, timeout)
        return self.proc.wait(timeout=60), stderr


def fifo_writer(path, proc, timeout=120):
    """The write end of the FIFO at path once a process of the run proc opened it to read (it then waits
    until this end is closed), or None if proc ended first. Opening it plainly would block forever when the
    run dies before it gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    pytest.fail(f"no process opened {path} within {timeout} s")


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("straight")
    assert main(args(data_dir, log_dir)) == 0
    return str(log_dir)


# -----------------------------------------------------------------------------
# The reference run: logs, checkpoints, schedule


def test_a_run_logs_every_step_once_and_learns(straight):
    train = series(straight, "train_loss")
    assert sorted(train) == list(range(STEPS))
    assert train[STEPS - 1] < train[0] - 0.5  # real text: the loss falls
    assert sorted(series(straight, "val_loss")) == [0, 4, 8]
    assert series(straight, "val_loss")[8] < series(straight, "val_loss")[0] - 0.5
    assert math.isclose(series(straight, "val_loss")[0], math.log(50257), rel_tol=0.02)  # untrained: uniform
    record = next(r for r in metrics(straight) if "train_loss" in r)
    assert set(record) == {"step", "train_loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec", "mfu"}
    assert record["mfu"] is None  # no known peak for a CPU
    with open(os.path.join(straight, "log.txt")) as f:
        log = f.read()
    assert log.count("=== launch") == 1 and f"torch {torch.__version__}" in log and "world size 1" in log
    assert '"max_lr": 0.01' in log  # the config heads the log


def test_checkpoints_keep_the_last_k_and_load_as_a_model(straight, data_dir):
    names = sorted(os.listdir(os.path.join(straight, "checkpoints")))
    assert names == ["step_00000004.pt", "step_00000006.pt", "step_00000008.pt"]  # keep 3 of 2, 4, 6, 8
    ckpt = checkpoint(straight, STEPS)
    # only the state the run depends on: no RNG states (nothing draws from them), no scaler (float32), no Muon
    assert set(ckpt) == {"model", "model_config", "optimizer", "step", "config", "loader"}
    assert ckpt["step"] == STEPS and ckpt["config"]["max_lr"] == 1e-2
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    # the model of the checkpoint reproduces the logged val loss: the mean over the tokens of the first 10 windows
    model = model_from_checkpoint(os.path.join(straight, "checkpoints", f"step_{STEPS:08d}.pt"))
    windows = torch.from_numpy(epoch_windows(data_dir, "val", 32)[:10])
    with torch.no_grad():
        loss = model(windows[:, :-1], windows[:, 1:].contiguous())[1].item()
    assert loss == pytest.approx(series(straight, "val_loss")[STEPS], rel=1e-5)


def test_lr_schedule_warmup_peak_decay_and_floor():
    config = parse_args(["--max-lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "10", "--max-steps", "110"])
    assert get_lr(0, config) == pytest.approx(1e-4)  # warmup: linear, (step + 1) / warmup
    assert get_lr(4, config) == pytest.approx(5e-4)
    assert get_lr(9, config) == pytest.approx(1e-3)  # the peak at the end of warmup ...
    assert get_lr(10, config) == pytest.approx(1e-3)  # ... where the cosine starts
    assert get_lr(60, config) == pytest.approx(5.5e-4)  # half way: the mean of max and min
    assert get_lr(35, config) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    decay = [get_lr(s, config) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert get_lr(110, config) == pytest.approx(1e-4) and get_lr(500, config) == pytest.approx(1e-4)  # the floor


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),  # "L4" is inside "L40S": longer names match first
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),  # a slice of an H100 has a fraction of its FLOP/s
        ("NVIDIA GeForce RTX 4090", None),  # unknown: no MFU rather than a wrong one (--peak-flops gives one)
    ],
)
def test_peak_flops_by_gpu_name(name, flops):
    assert common.peak_flops_of(name, "bfloat16") == flops


# -----------------------------------------------------------------------------
# An independent reference: the recipe written plainly on transformers' GPT-2
#
# Nothing here runs train_gpt2.py's loop, loader, schedule or optimizer set-up, nor model.py's
# forward: transformers' GPT2LMHeadModel, torch.optim.AdamW, clip_grad_norm_ and numpy reads of
# the shards. Only the initial weights are train_gpt2.build_model's (step 0 of every run), copied
# into transformers' model by the key mapping below. The resume, DDP and micro-batch tests
# compare with `straight`; `straight` is compared with this.

# The Linear weights that transformers' GPT-2 keeps in Conv1D modules, stored (in, out)
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def epoch_windows(data_dir, split, seq_len, rng=None):
    """One epoch of a split as (rows, T+1) int64 windows, in the order ShardLoader documents: the
    split's shards (in name order, or permuted by rng) concatenated into one stream, window i =
    stream[i*T : i*T + T + 1]; with rng the windows are then permuted by the same rng."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    if rng is not None:
        paths = [paths[i] for i in rng.permutation(len(paths))]
    stream = np.concatenate([np.load(p) for p in paths]).astype(np.int64)
    windows = np.array(sliding_window_view(stream, seq_len + 1)[::seq_len])  # (len - 1) // T of them
    return windows if rng is None else windows[rng.permutation(len(windows))]


def transformers_gpt2(config):
    """transformers' GPT-2 of a TrainConfig's shape: embeddings tied, no dropout (ours has none)."""
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    assert hf.lm_head.weight is hf.transformer.wte.weight
    return hf


def lm_loss(hf, windows):
    """transformers' GPT-2's mean next-token loss over (B, T+1) windows."""
    windows = torch.from_numpy(windows)
    logits = hf(windows[:, :-1], use_cache=False).logits  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def recipe_lr(step, c):
    """Linear warmup to max_lr (step s at (s + 1) / warmup_steps of it), then half a cosine from
    max_lr down to min_lr at max_steps."""
    if step < c.warmup_steps:
        return c.max_lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / (c.max_steps - c.warmup_steps)
    return c.min_lr + (c.max_lr - c.min_lr) * (1 + math.cos(math.pi * progress)) / 2


def reference_run(data_dir, argv):
    """What train_gpt2.py should log for the flags argv on one fp32 CPU process, computed plainly:
    {metric: {step: value}} for train_loss, grad_norm, lr and val_loss."""
    c = parse_args(argv)
    B, T = c.batch_size, c.seq_len
    accum = c.total_batch_size // (B * T)
    hf = transformers_gpt2(c)
    initial = train_gpt2.build_model(c, torch.device("cpu")).state_dict()  # our names are transformers'
    hf.load_state_dict({k: v.t() if k.endswith(HF_TRANSPOSED) else v for k, v in initial.items()})
    params = list(hf.parameters())  # the tied embedding once
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        betas=(c.beta1, c.beta2),
        eps=c.adam_eps,
    )
    train = epoch_windows(data_dir, "train", T, np.random.default_rng((c.seed, 0)) if c.shuffle else None)
    assert len(train) >= c.max_steps * accum * B  # every row read lies in epoch 0
    val = epoch_windows(data_dir, "val", T)[: c.val_tokens // T]
    logged = {"train_loss": {}, "grad_norm": {}, "lr": {}, "val_loss": {}}
    for step in range(c.max_steps + 1):
        if step % c.eval_interval == 0 or step == c.max_steps:
            with torch.no_grad():
                logged["val_loss"][step] = lm_loss(hf, val).item()
        if step == c.max_steps:
            break
        optimizer.zero_grad()
        loss = 0.0
        for micro_step in range(accum):
            first = (step * accum + micro_step) * B  # micro batches take the epoch's rows in turn
            micro_loss = lm_loss(hf, train[first : first + B])
            (micro_loss / accum).backward()  # the step's gradient: of the mean over its micro batches
            loss += micro_loss.item() / accum
        norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or math.inf)  # the norm before clipping
        lr = recipe_lr(step, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        logged["train_loss"][step], logged["grad_norm"][step], logged["lr"][step] = loss, norm.item(), lr
    return logged


def assert_matches_reference(log_dir, reference):
    for key, want in reference.items():
        got = series(log_dir, key)
        assert got.keys() == want.keys(), key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (key, step, got[step], want[step])


def test_the_straight_run_is_the_recipe_computed_on_transformers_gpt2(straight, data_dir):
    # Shuffled windows (default_rng((seed, epoch))), AdamW's default betas, clipping at 1.0
    # (which step 0's norm exceeds), accumulation over 2 micro steps.
    assert series(straight, "grad_norm")[0] > 1.0
    assert_matches_reference(straight, reference_run(data_dir, args(data_dir, straight)))


# Optimizer settings away from the defaults, each of which moves the losses far beyond 1e-5 when
# it does not reach AdamW as given (betas swapped: 2e-2; eps 1e-8: 1e-1; weight decay 0.1: 1e-3),
# a clip that the norm exceeds on some steps and not others, windows in order, and a peak for MFU.
TUNED = [
    "--beta1",
    "0.8",
    "--beta2",
    "0.99",
    "--adam-eps",
    "1e-3",
    "--weight-decay",
    "0.5",
    "--grad-clip",
    "1.1",
    "--no-shuffle",
    "--peak-flops",
    "1e9",
]


def every_3_steps(hellaswag_file):
    """Evaluations, samples and checkpoints every 3 steps: the last step (8) is not one of them, so each must
    happen there because it is the last."""
    return [
        "--eval-interval",
        "3",
        "--hellaswag-interval",
        "3",
        "--hellaswag-file",
        hellaswag_file,
        "--sample-interval",
        "3",
        "--num-samples",
        "2",
        "--sample-tokens",
        "5",
        "--checkpoint-interval",
        "3",
    ]


@pytest.fixture(scope="module")
def tuned(data_dir, hellaswag_file, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tuned")
    assert main(args(data_dir, log_dir, *TUNED, *every_3_steps(hellaswag_file))) == 0
    return str(log_dir)


def test_betas_eps_weight_decay_and_clipping_reach_the_optimizer_step(tuned, data_dir, hellaswag_file):
    norms = series(tuned, "grad_norm")
    clipped = [step for step in range(STEPS - 1) if norms[step] > 1.1]  # a later loss sees the clipped update
    assert clipped and len(clipped) < STEPS - 1
    assert_matches_reference(
        tuned, reference_run(data_dir, args(data_dir, tuned, *TUNED, *every_3_steps(hellaswag_file)))
    )


MUON = ["--optimizer", "muon", "--muon-momentum", "0.9", "--muon-weight-decay", "0.05", "--muon-ns-steps", "3"]
MUON += ["--max-steps", "3", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def muon_straight(data_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("muon-straight")
    assert main(args(data_dir, log_dir, *MUON)) == 0
    return log_dir


def test_a_muon_run_takes_its_settings_and_resumes_exactly(muon_straight, data_dir, tmp_path):
    # Muon for the matrices inside the blocks (its momentum, weight decay and Newton-Schulz steps as given, the lr
    # of the schedule), AdamW for the rest; Muon's momentum buffers are saved and come back on a resume.
    muon, straight, resumed = MUON, muon_straight, tmp_path / "resumed"
    assert main(args(data_dir, resumed, *muon, "--stop-at-step", "1")) == 0  # its own checkpoint, after step 0
    assert main(args(data_dir, resumed, *muon)) == 0
    for key in ("train_loss", "grad_norm", "val_loss"):
        assert series(resumed, key) == series(straight, key), key  # fp32 on CPU: bitwise
    assert same_model(resumed, straight, step=3)
    losses = series(straight, "train_loss")
    assert losses[2] < losses[0] - 0.3
    ckpt = checkpoint(straight, 3)
    assert set(ckpt) == {"model", "model_config", "optimizer", "muon", "step", "config", "loader"}
    (group,) = ckpt["muon"]["param_groups"]
    assert (group["momentum"], group["weight_decay"], group["ns_steps"], group["nesterov"]) == (0.9, 0.05, 3, True)
    assert group["lr"] == series(straight, "lr")[2]  # the schedule's lr of the last step, AdamW's too
    assert all(g["lr"] == group["lr"] for g in ckpt["optimizer"]["param_groups"])
    # Which tensors each one updates, by their sizes: Muon the 2-D weights of the blocks, AdamW all the others
    named = list(transformers_gpt2(parse_args(args(data_dir, straight))).named_parameters())  # tied embedding once
    blocks = sorted(p.numel() for name, p in named if name.startswith("transformer.h.") and p.dim() == 2)
    others = sorted(p.numel() for name, p in named if not (name.startswith("transformer.h.") and p.dim() == 2))
    assert sorted(ckpt["muon"]["state"][i]["momentum_buffer"].numel() for i in group["params"]) == blocks
    adamw = ckpt["optimizer"]
    assert sorted(adamw["state"][i]["exp_avg"].numel() for g in adamw["param_groups"] for i in g["params"]) == others


def test_events_every_3_steps_and_at_the_last_step(tuned, tokenizer):
    # (the val losses of steps 0, 3, 6 and 8: test_betas_eps_...)
    assert sorted(os.listdir(os.path.join(tuned, "checkpoints"))) == [
        "step_00000003.pt",
        "step_00000006.pt",
        "step_00000008.pt",
    ]
    assert sorted(series(tuned, "hellaswag_acc")) == [0, 3, 6, 8]
    samples = series(tuned, "samples")
    assert sorted(samples) == [0, 3, 6, 8]
    # 2 samples of 5 tokens after the default prompt, top-50 sampling from a generator seeded 42 (the same
    # draws at every step, so that samples of different steps compare), by the weights of that step
    prompt = torch.tensor([tokenizer.encode_ordinary("Hello, I'm a language model,")] * 2)
    for step in (3, 6, 8):
        model = model_from_checkpoint(os.path.join(tuned, "checkpoints", f"step_{step:08d}.pt"))
        tokens = model.generate(prompt, 5, top_k=50, generator=torch.Generator().manual_seed(42))
        assert samples[step] == [tokenizer.decode(row) for row in tokens.tolist()], step


def model_flops_per_token(config):
    """PaLM's estimate: 6 FLOPs per weight in a matmul (all but the position table) + 12 * L * C * T for attention."""
    parameters = sum(p.numel() for p in transformers_gpt2(config).parameters())  # the tied embedding once
    return 6 * (parameters - config.block_size * config.n_embd) + 12 * config.n_layer * config.n_embd * config.seq_len


def test_mfu_is_the_model_flops_of_the_logged_tokens_per_second_over_the_peak(tuned):
    config = parse_args(args("unused", "unused"))
    mfu, tokens_per_sec, dt_ms = series(tuned, "mfu"), series(tuned, "tokens_per_sec"), series(tuned, "dt_ms")
    assert sorted(mfu) == list(range(STEPS))
    for step in mfu:
        assert tokens_per_sec[step] == pytest.approx(256 / (dt_ms[step] / 1000), rel=1e-9)  # a step's tokens
        assert mfu[step] == pytest.approx(model_flops_per_token(config) * tokens_per_sec[step] / 1e9, rel=1e-12)


@pytest.mark.parametrize("vocab_size, seq_len", [(50257, 32), (50304, 64)])  # 64: all of its n_positions
def test_init_from_a_local_gpt2_starts_from_its_loss(hf_gpt2_dir, data_dir, tmp_path, vocab_size, seq_len):
    assert (
        main(
            args(
                data_dir,
                tmp_path,
                "--init-from",
                hf_gpt2_dir,
                "--vocab-size",
                str(vocab_size),
                "--seq-len",
                str(seq_len),
                "--stop-at-step",
                "1",
            )
        )
        == 0
    )
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()

    @torch.no_grad()
    def loss(windows):
        windows = torch.from_numpy(windows)
        out = hf(windows[:, :-1], output_hidden_states=True, use_cache=False)
        logits, padding = out.logits, vocab_size - out.logits.size(-1)
        if padding:  # model.py pads with rows equal to the mean embedding: each pad logit is h . mean
            pad_logit = out.hidden_states[-1] @ hf.transformer.wte.weight.mean(0)  # (B, T)
            logits = torch.cat([logits, pad_logit[..., None].expand(-1, -1, padding)], dim=-1)
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()

    val = epoch_windows(data_dir, "val", seq_len)[: 320 // seq_len]  # --val-tokens 320
    train = epoch_windows(data_dir, "train", seq_len, np.random.default_rng((1337, 0)))  # --seed 1337, epoch 0
    assert series(tmp_path, "val_loss") == {0: pytest.approx(loss(val), rel=1e-5)}
    accum = 256 // (4 * seq_len)  # micro steps of 4 rows
    step_0 = sum(loss(train[4 * i : 4 * i + 4]) for i in range(accum)) / accum
    assert series(tmp_path, "train_loss") == {0: pytest.approx(step_0, rel=1e-5)}


# -----------------------------------------------------------------------------
# Resume and run management: one run per directory, one history, clean stops, no hangs


def hooked(hooks, argv, torchrun=False, timeout=300, env=()):
    """train_gpt2.py through tests/hooked_train.py: interruptions at steps the test chooses."""
    command = [HOOKED, *hooks, "--", *argv]
    return run_process([*TORCHRUN, *command] if torchrun else [sys.executable, *command], timeout=timeout, env=env)


def traceback_of_ours(stderr):
    return re.search(r'File ".*(train_gpt2|hooked_train)\.py", line', stderr)


def same_model(log_dir, reference, step=STEPS):
    final, want = checkpoint(log_dir, step)["model"], checkpoint(reference, step)["model"]
    return all(torch.equal(final[k], want[k]) for k in want)


def snapshot(directory):
    """{relative path: sha256} of every file under directory."""
    return {
        os.path.relpath(os.path.join(root, name), directory): hashlib.sha256(
            open(os.path.join(root, name), "rb").read()
        ).hexdigest()
        for root, _, names in os.walk(directory)
        for name in names
    }


def test_a_stopped_run_resumed_with_the_same_arguments_matches_bitwise(straight, data_dir, tmp_path, capsys):
    # Stopped after an odd step, between two checkpoints of --checkpoint-interval 2: the stop writes its own.
    assert main(args(data_dir, tmp_path, "--stop-at-step", "3")) == 0
    assert (
        "stopped after step 2 (--stop-at-step); checkpoint step_00000003.pt saved; raise --stop-at-step or "
        "leave it out and relaunch to continue" in capsys.readouterr().out
    )
    assert sorted(series(tmp_path, "train_loss")) == [0, 1, 2]
    assert main(args(data_dir, tmp_path, "--stop-at-step", "3")) == 0  # the same command says so, truthfully
    assert "nothing to do: " in capsys.readouterr().out
    # Checkpoints hold no RNG states: the run draws nothing from the global generators, so the resume
    # gives the same run whatever they hold now.
    torch.manual_seed(271828)
    np.random.seed(271828)
    random.seed(271828)
    assert main(args(data_dir, tmp_path)) == 0  # relaunch without it: --resume auto
    assert "resuming at step 3" in capsys.readouterr().out
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")  # fp32 on CPU: bitwise
    assert series(tmp_path, "val_loss") == series(straight, "val_loss")
    assert same_model(tmp_path, straight)
    with open(tmp_path / "log.txt") as f:
        assert f.read().count("=== launch") == 2  # appended, one header per launch


def test_a_stop_on_the_last_step_still_runs_the_final_evaluations(straight, data_dir, tmp_path):
    assert main(args(data_dir, tmp_path, "--stop-at-step", str(STEPS))) == 0
    assert series(tmp_path, "val_loss") == series(straight, "val_loss")  # step 8's included


def test_a_corrupt_latest_checkpoint_falls_back_and_is_set_aside(straight, data_dir, tmp_path, capsys):
    assert main(args(data_dir, tmp_path, "--stop-at-step", "6")) == 0
    latest = tmp_path / "checkpoints" / "step_00000006.pt"
    os.truncate(latest, os.path.getsize(latest) // 2)  # a write cut short
    capsys.readouterr()
    assert main(args(data_dir, tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "note: skipping unreadable checkpoint" in err and "resuming at step 4" in out
    assert "moved 1 later checkpoint(s)" in out  # the cut-short file, kept aside, never pruned among new ones
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / "abandoned" / "*" / "*.pt"))] == ["step_00000006.pt"]
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")
    assert same_model(tmp_path, straight)


@pytest.mark.multiprocess
def test_a_run_killed_mid_checkpoint_relaunched_finishes_like_one_never_killed(straight, data_dir, tmp_path, run_main):
    argv = args(data_dir, tmp_path)
    result = hooked(["0:3:kill-in-checkpoint"], argv)  # SIGKILL with step 4's checkpoint half written
    assert result.returncode == -signal.SIGKILL
    assert [name for name in os.listdir(tmp_path / "checkpoints") if name.endswith(".tmp")]  # what the kill left
    assert sorted(series(tmp_path, "train_loss")) == [0, 1, 2, 3]
    code, out, err = run_main(main, *argv)  # the relaunch, in this process
    assert code == 0, err
    assert "resuming at step 2" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004.pt", "step_00000006.pt", "step_00000008.pt"]
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")  # also: no step twice
    assert series(tmp_path, "val_loss") == series(straight, "val_loss")


def test_a_new_run_in_a_used_log_dir_is_refused_and_changes_nothing(straight, data_dir, tmp_path, run_main):
    log_dir = tmp_path / "run"
    shutil.copytree(straight, log_dir)
    before = snapshot(log_dir)
    code, _, err = run_main(main, *args(data_dir, log_dir, "--resume", "never", "--seed", "2"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{log_dir} holds a run (checkpoints, metrics.jsonl, log.txt" in err
    assert "--resume auto" in err and "--overwrite" in err and "another --log-dir" in err
    assert snapshot(log_dir) == before


@pytest.mark.parametrize("flags", [["--overwrite"], ["--overwrite", "--resume", "never"]])
def test_overwrite_equals_a_run_in_an_empty_directory_and_keeps_other_files(straight, data_dir, tmp_path, flags):
    log_dir = tmp_path / "run"
    assert main(args(data_dir, log_dir, "--seed", "2", "--max-lr", "3e-3")) == 0  # another run was here
    (log_dir / "notes.txt").write_text("mine")
    assert main(args(data_dir, log_dir, *flags)) == 0
    for key in ("train_loss", "val_loss", "lr"):
        assert series(log_dir, key) == series(straight, key)
    assert sorted(os.listdir(log_dir / "checkpoints")) == sorted(os.listdir(os.path.join(straight, "checkpoints")))
    assert same_model(log_dir, straight)
    assert (log_dir / "notes.txt").read_text() == "mine"
    with open(log_dir / "log.txt") as f:
        assert f.read().count("=== launch") == 1


def test_rolling_back_to_a_perturbed_checkpoint_keeps_one_history(straight, data_dir, tmp_path):
    # After a loss spike a user relaunches from an earlier checkpoint; here it is perturbed so the
    # new branch's numbers differ from the old one's at every step.
    log_dir = tmp_path / "run"
    shutil.copytree(straight, log_dir)
    ckpt = checkpoint(log_dir, 4)
    ckpt["model"] = {k: v * 1.01 for k, v in ckpt["model"].items()}
    perturbed = str(tmp_path / "perturbed.pt")
    torch.save(ckpt, perturbed)
    assert main(args(data_dir, log_dir, "--resume", perturbed)) == 0
    reference = tmp_path / "reference"  # the same branch in a directory of its own
    assert main(args(data_dir, reference, "--resume", perturbed)) == 0
    for key in ("train_loss", "val_loss"):
        got, old, new = series(log_dir, key), series(straight, key), series(reference, key)  # no step twice
        assert got == {s: (old[s] if s < 4 else new[s]) for s in old}, key
        assert all(old[s] != new[s] for s in new)  # the branches really differ
    aside = glob.glob(str(log_dir / "abandoned" / "*-after-step-4"))
    assert len(aside) == 1 and sorted(os.listdir(aside[0])) == ["metrics.jsonl", "step_00000006.pt", "step_00000008.pt"]
    assert series(aside[0], "train_loss") == series(straight, "train_loss")  # the history of the branch left
    assert torch.equal(
        checkpoint(log_dir, 8)["model"]["lm_head.weight"], checkpoint(reference, 8)["model"]["lm_head.weight"]
    )


def test_a_rollback_may_lower_the_learning_rate(straight, data_dir, tmp_path, capsys):
    log_dir = tmp_path / "run"
    shutil.copytree(straight, log_dir)
    capsys.readouterr()
    assert (
        main(
            args(
                data_dir,
                log_dir,
                "--resume",
                str(log_dir / "checkpoints" / "step_00000004.pt"),
                "--max-lr",
                "5e-3",
                "--warmup-steps",
                "1",
            )
        )
        == 0
    )
    assert (
        "note: max_lr=0.01 in the checkpoint, 0.005 now; warmup_steps=2 in the checkpoint, 1 now"
        in capsys.readouterr().out
    )
    old, new = (
        parse_args(args(data_dir, log_dir)),
        parse_args(args(data_dir, log_dir, "--max-lr", "5e-3", "--warmup-steps", "1")),
    )
    assert series(log_dir, "lr") == {s: pytest.approx(get_lr(s, old if s < 4 else new)) for s in range(STEPS)}
    assert series(log_dir, "train_loss")[4] == series(straight, "train_loss")[4]  # same weights, same batch
    # config.toml repeats the run as it now goes: the new lr, and no --resume of step 4 (that would roll back again)
    written = parse_args(["--config", str(log_dir / "config.toml")])
    assert (written.max_lr, written.resume) == (5e-3, "auto")


def test_sigterm_mid_run_checkpoints_exits_0_and_the_relaunch_continues_exactly(straight, data_dir, tmp_path):
    argv = args(data_dir, tmp_path)
    result = hooked(["0:3:SIGTERM"], argv)  # arrives while step 3 is about to train
    assert result.returncode == 0, result.stderr
    assert (
        "stopped after step 3 (SIGTERM); checkpoint step_00000004.pt saved; relaunch the same command to "
        "continue" in result.stdout
    )
    assert sorted(series(tmp_path, "train_loss")) == [0, 1, 2, 3]
    assert main(argv) == 0  # the relaunch, in this process
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")
    assert same_model(tmp_path, straight)


def test_ctrl_c_stops_cleanly_with_130_and_twice_quits_at_once(straight, data_dir, tmp_path):
    result = hooked(["0:3:SIGINT"], args(data_dir, tmp_path / "once"))
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr == "SIGINT: stopping after this step, with a checkpoint (Ctrl-C again to quit at once)\n"
    assert (
        "stopped after step 3 (SIGINT); checkpoint step_00000004.pt saved; relaunch the same command" in result.stdout
    )
    assert checkpoint(tmp_path / "once", 4)["step"] == 4
    result = hooked(["0:3:SIGINT2"], args(data_dir, tmp_path / "twice"))
    assert result.returncode == 130 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert (
        len(lines) == 2
        and lines[1].startswith("interrupted; the last checkpoint is ")
        and lines[1].endswith("step_00000002.pt; relaunch the same command to resume")
    )
    assert sorted(series(tmp_path / "twice", "train_loss")) == [0, 1, 2]  # step 3 never ran
    assert main(args(data_dir, tmp_path / "twice")) == 0  # the relaunch, in this process
    assert series(tmp_path / "twice", "train_loss") == series(straight, "train_loss")


def test_time_limit_stops_before_the_limit_with_room_for_a_step_and_a_checkpoint(
    straight, data_dir, tmp_path, monkeypatch, capsys
):
    # A clock the test drives: each step "takes" 100 s, a val loss (steps 0, 4, 8) 30 s, a checkpoint 20 s.
    now = [0.0]

    def taking(seconds, function):
        def slow(*a, **k):
            now[0] += seconds
            return function(*a, **k)

        return slow

    monkeypatch.setattr(train_gpt2, "clock", lambda: now[0])
    for name, seconds in (("train_step", 100.0), ("evaluate_val", 30.0), ("save_checkpoint", 20.0)):
        monkeypatch.setattr(train_gpt2, name, taking(seconds, getattr(train_gpt2, name)))
    assert main(args(data_dir, tmp_path, "--time-limit", "9m50s")) == 0
    # Going on past step s needs twice the slowest step (step s and the next), the slowest evaluation and a
    # checkpoint: before step 2, 250 s gone + 200 + 30 + 20 = 500 s <= 590 s: on; before step 3, 350 s gone:
    # 600 s > 590 s. So step 3 is the last: it ends at 450 s, its checkpoint at 470 s, within the limit.
    assert "stopped after step 3 (--time-limit); checkpoint step_00000004.pt saved" in capsys.readouterr().out
    assert sorted(series(tmp_path, "train_loss")) == [0, 1, 2, 3]
    monkeypatch.undo()
    assert main(args(data_dir, tmp_path, "--time-limit", "9m50s")) == 0  # a new launch, a new clock
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")


@pytest.fixture(scope="module")
def non_finite(data_dir, tmp_path_factory):
    """One process, 8 steps: a NaN loss at step 2; at step 3 a finite loss, but an inf in one weight's gradient
    (float32, no scaler). The hooked run's result and its log directory."""
    log_dir = tmp_path_factory.mktemp("non-finite")
    return hooked(["0:2:nan", "0:3:infgrad"], args(data_dir, log_dir, "--keep-checkpoints", "4")), log_dir


def test_an_injected_non_finite_loss_or_gradient_is_skipped_and_training_goes_on(non_finite, data_dir):
    result, tmp_path = non_finite
    assert result.returncode == 0, result.stderr
    train = [r for r in metrics(tmp_path) if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(STEPS))
    assert [r["step"] for r in train if r.get("skipped")] == [2, 3]
    assert all(r["grad_norm"] is None for r in train if r.get("skipped"))
    assert all(math.isfinite(r["train_loss"]) for r in train if r["step"] != 2)
    # step 3's loss: the weights after step 1 (step 2 was skipped) on step 3's 8 rows of the shuffled epoch
    model = model_from_checkpoint(os.path.join(tmp_path, "checkpoints", "step_00000002.pt"))
    rows = torch.from_numpy(epoch_windows(data_dir, "train", 32, np.random.default_rng((1337, 0)))[3 * 8 : 4 * 8])
    with torch.no_grad():
        loss = model(rows[:, :-1], rows[:, 1:].contiguous())[1].item()
    assert train[3]["train_loss"] == pytest.approx(loss, rel=1e-5)
    # Skipped: the weights and AdamW's state after steps 2 and 3 are those after step 1.
    before, after = checkpoint(tmp_path, 2), checkpoint(tmp_path, 4)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"] == 2
    assert result.stdout.count("skipped: not finite") == 2


def test_too_many_non_finite_steps_stop_with_a_checkpoint_and_a_relaunch_goes_on(data_dir, tmp_path, capsys):
    # lr 1e30: step 0 is fine, its update blows the weights up and every later loss is NaN.
    argv = args(
        data_dir, tmp_path, "--max-lr", "1e30", "--warmup-steps", "0", "--max-skipped-steps", "3", "--max-steps", "20"
    )
    err = error_of(capsys, argv, 1)
    assert "3 steps in a row (to step 3) had a non-finite loss or gradient and were skipped" in err
    assert [r["step"] for r in metrics(tmp_path) if r.get("skipped")] == [1, 2, 3]
    ckpt = checkpoint(tmp_path, 4)  # saved after them: a relaunch starts with new batches
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    with open(tmp_path / "metrics.jsonl") as f:
        assert "NaN" not in f.read()  # valid JSON: null, never NaN
    err = error_of(capsys, argv, 1)
    assert "3 steps in a row (to step 6)" in err  # the relaunch went on from step 4, not step 1
    assert [r["step"] for r in metrics(tmp_path) if r.get("skipped")] == [1, 2, 3, 4, 5, 6]


# -----------------------------------------------------------------------------
# Same tokens, same gradients: DDP, micro batch size


@pytest.mark.multiprocess
def test_ddp_with_accumulation_on_two_processes_matches_one_process(straight, data_dir, tmp_path):
    # 2 ranks x 2 micro steps of 2 x 32 vs the straight run's 1 rank x 2 micro steps of 4 x 32: the same 256
    # tokens a step. The gradients must be all-reduced once the last micro step's are in: a sync after the
    # first misses the second's on the other rank.
    result = run_torchrun(args(data_dir, tmp_path, "--batch-size", "2", "--stop-at-step", "5", "--peak-flops", "1e9"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices x 2 micro steps" in result.stdout
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in checkpoint(tmp_path, 4)["model"])
    # The val loss of step 4 (10 windows: 5 a rank, in micro batches of 2, the last padded) is the mean over the
    # tokens of the first 10 val windows, by the weights of step 4.
    model = model_from_checkpoint(os.path.join(tmp_path, "checkpoints", "step_00000004.pt"))
    windows = torch.from_numpy(epoch_windows(data_dir, "val", 32)[:10])
    with torch.no_grad():
        loss = model(windows[:, :-1], windows[:, 1:].contiguous())[1].item()
    assert series(tmp_path, "val_loss")[4] == pytest.approx(loss, rel=1e-5)
    # MFU: the tokens of every rank over the peak of every device
    config = parse_args(args(data_dir, tmp_path))
    mfu, tokens_per_sec = series(tmp_path, "mfu"), series(tmp_path, "tokens_per_sec")
    assert all(
        mfu[s] == pytest.approx(model_flops_per_token(config) * tokens_per_sec[s] / 2e9, rel=1e-12) for s in range(5)
    )
    # the DDP checkpoint resumes in one process (another world size and micro batch, same total batch)
    assert main(args(data_dir, tmp_path)) == 0
    assert_close_runs(tmp_path, straight, atol=1e-5)  # steps 0-4 on 2 ranks, 5-7 on one


@pytest.mark.multiprocess
def test_ddp_with_accumulation_and_muon_matches_one_process(muon_straight, data_dir, tmp_path):
    # Muon orthogonalises the all-reduced gradient's momentum: 2 ranks x 2 micro steps of 2 x 32 give the one-process
    # run's 2 micro steps of 4 x 32. (Newton-Schulz runs in bfloat16: sums in another order round a little apart.)
    result = run_torchrun(args(data_dir, tmp_path, *MUON, "--batch-size", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices x 2 micro steps" in result.stdout
    for key in ("train_loss", "grad_norm", "val_loss"):
        ours, theirs = series(tmp_path, key), series(muon_straight, key)
        assert ours.keys() == theirs.keys() and all(ours[s] == pytest.approx(theirs[s], abs=1e-4) for s in theirs), (
            key
        )  # 1e-5 measured


@pytest.mark.multiprocess
def test_under_torchrun_only_rank_0_prints_and_every_rank_fails(data_dir, tmp_path):
    result = run_torchrun(args(data_dir, tmp_path, "--total-batch-size", "384"))  # 384 tokens over 2 x 4 x 32
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: invalid settings: total_batch_size=384 is not divisible by batch_size * seq_len * "
        "world_size = 4 * 32 * 2 = 256"
    ]
    assert "exitcode  : 2" in result.stderr  # torchrun's report (a rank still running is then stopped)


@pytest.mark.multiprocess
def test_under_torchrun_a_non_finite_loss_or_gradient_on_one_rank_skips_the_step_on_every_rank(
    non_finite, data_dir, tmp_path
):
    # Rank 1 alone sees a NaN loss at step 2 and, under a finite loss, an inf gradient at step 3: both ranks
    # skip both updates (else their weights would part: step 4 shows it), as one process does with the same faults
    # (the `non_finite` run).
    result = hooked(
        ["1:2:nan", "1:3:infgrad"], args(data_dir, tmp_path / "ddp", "--keep-checkpoints", "4"), torchrun=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one_result, one_dir = non_finite
    assert one_result.returncode == 0, one_result.stderr
    assert [r["step"] for r in metrics(tmp_path / "ddp") if r.get("skipped")] == [2, 3]
    ddp, one = series(tmp_path / "ddp", "grad_norm"), series(one_dir, "grad_norm")
    assert ddp.keys() == one.keys() == set(range(STEPS)) and ddp[2] is ddp[3] is one[2] is one[3] is None
    assert all(ddp[s] == pytest.approx(one[s], abs=1e-5) for s in (0, 1, 4, 5, 6, 7))
    ddp, one = series(tmp_path / "ddp", "train_loss"), series(one_dir, "train_loss")
    assert ddp[2] is one[2] is None and all(ddp[s] == pytest.approx(one[s], abs=1e-5) for s in (0, 1, 3, 4, 5, 6, 7))
    # both ranks skipped both steps: the weights after step 3 are those after step 1, as in one process
    before, after = checkpoint(tmp_path / "ddp", 2)["model"], checkpoint(tmp_path / "ddp", 4)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    ddp, one = checkpoint(tmp_path / "ddp", STEPS)["model"], checkpoint(one_dir, STEPS)["model"]
    assert all(torch.allclose(ddp[k], one[k], atol=1e-5) for k in one)


@pytest.mark.multiprocess
def test_under_torchrun_sigusr1_on_one_rank_stops_both_after_the_same_step(straight, data_dir, tmp_path):
    result = hooked(["1:3:SIGUSR1"], args(data_dir, tmp_path), torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped after step 3 (a stop signal on another rank); checkpoint step_00000004.pt saved" in result.stdout
    assert sorted(series(tmp_path, "train_loss")) == [0, 1, 2, 3]
    assert main(args(data_dir, tmp_path)) == 0  # resumed in one process
    assert_close_runs(tmp_path, straight, atol=1e-5)


@pytest.mark.multiprocess
def test_under_torchrun_a_setup_fault_on_rank_1_ends_both_ranks_with_its_message(data_dir, hellaswag_file, tmp_path):
    missing = str(tmp_path / "not-on-this-node" / "hellaswag_val.jsonl")
    result = hooked(
        [f"1:argv:--hellaswag-file={missing}"],
        args(data_dir, tmp_path / "log", "--hellaswag-interval", "4", "--hellaswag-file", hellaswag_file),
        torchrun=True,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") and missing in errors[0], result.stderr[-3000:]
    assert not traceback_of_ours(result.stderr)  # torchrun's own report of failed workers is a traceback


@pytest.mark.multiprocess
def test_under_torchrun_every_rank_falls_back_to_the_same_checkpoint(straight, data_dir, tmp_path):
    log_dir = tmp_path / "run"
    assert main(args(data_dir, log_dir, "--stop-at-step", "6")) == 0
    latest = log_dir / "checkpoints" / "step_00000006.pt"
    os.truncate(latest, os.path.getsize(latest) // 2)
    result = run_torchrun(args(data_dir, log_dir))  # rank 0 falls back to step 4; so does rank 1
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("skipping unreadable checkpoint") == 1 and "resuming at step 4" in result.stdout
    assert_close_runs(log_dir, straight, atol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("view, rank_1_step", [("older", 6), ("blind", 0)])
def test_under_torchrun_ranks_that_would_resume_from_different_steps_end_the_job(
    straight, data_dir, tmp_path, view, rank_1_step
):
    # Rank 1 reads the checkpoint before the newest (a stale view of the log dir), or none at all (another node's
    # view): it would resume at another step than rank 0 (8). The ranks agree once after set-up: every rank ends,
    # with one line, and the log dir is left as it was. (With nothing to resume, rank 1 reads nothing: every
    # torchrun test in a new log dir shows that a new run is not refused.)
    log_dir = tmp_path / "run"
    shutil.copytree(straight, log_dir)  # checkpoints of steps 4, 6 and 8
    before = snapshot(log_dir)
    result = hooked([f"1:setup:{view}"], args(data_dir, log_dir), torchrun=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == [
        f"error: rank 1 would resume at step {rank_1_step}, rank 0 at 8: does every node see the same --log-dir?"
    ], result.stderr[-3000:]
    assert not traceback_of_ours(result.stderr)
    after = snapshot(log_dir)
    assert after.pop(".lock") and before.pop(".lock")  # it names the launch that last held it: another pid
    assert after == before


@pytest.mark.multiprocess
def test_under_torchrun_a_stalled_rank_ends_the_job_after_the_timeout(data_dir, tmp_path):
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    command = [*TORCHRUN, HOOKED, f"1:3:wait={fifo}", "--", *args(data_dir, tmp_path / "log", "--dist-timeout", "3")]
    with Background(command) as run:
        # rank 1 stalls before step 3; rank 0 waits for it 3 s, then gives up (gloo: "Timed out waiting ...")
        lost = run.stderr_until("error: rank 0: lost contact with another rank").splitlines()[-1]
        assert re.search(r"timed out", lost, re.IGNORECASE), lost  # a timeout, not a rank that died
        writer = fifo_writer(fifo, run.proc)
        if writer is not None:
            os.close(writer)  # let the stalled rank go on (if torchrun has not ended it): it finds rank 0 gone
        code, stderr = run.wait()
    assert code != 0
    assert not traceback_of_ours(stderr), stderr[-3000:]


def test_another_micro_batch_with_the_same_total_batch_gives_the_same_run(straight, data_dir, tmp_path):
    assert main(args(data_dir, tmp_path, "--batch-size", "8")) == 0  # 1 micro step of 8 x 32
    assert_close_runs(tmp_path, straight, atol=1e-5)


def adamw_of(model, lr, weight_decay):
    """train_gpt2's optimizers of a model with the recipe's AdamW alone ({"optimizer": AdamW}), at this lr."""
    return model.configure_optimizers(lr, dict(weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8))[0]


def test_gradients_do_not_depend_on_the_micro_batch(data_dir):
    grads = []
    for batch_size in (2, 4, 8):  # 4, 2 and 1 micro steps of the same 256 tokens
        config = parse_args(args(data_dir, "unused", "--batch-size", str(batch_size), "--grad-clip", "0"))
        model = train_gpt2.build_model(config, torch.device("cpu"))
        optimizers = adamw_of(model, lr=0.0, weight_decay=0.0)
        loader = ShardLoader(data_dir, "train", batch_size, 32)
        loss, norm, skipped, stop = train_gpt2.train_step(
            model, optimizers, loader, 256 // (batch_size * 32), 0.0, config, torch.device("cpu"), nullcontext()
        )
        assert not skipped and not stop
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    # the reference: one forward over all 8 rows
    config = parse_args(args(data_dir, "unused"))
    model = train_gpt2.build_model(config, torch.device("cpu"))
    x, y = ShardLoader(data_dir, "train", 8, 32).next_batch()
    _, loss = model(x, y)
    loss.backward()
    for got_loss, got in grads:
        assert got_loss == pytest.approx(loss.item(), rel=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7)


# -----------------------------------------------------------------------------
# compile, bf16 autocast, HellaSwag and samples

HELLASWAG = [
    (
        "The chef cracked two eggs into the bowl and",
        [
            "whisked them with a fork.",
            "parked the car outside.",
            "sang to the audience.",
            "climbed the ladder to the roof.",
        ],
        0,
    ),
    (
        "To open the file, the program first",
        ["barks at the mailman.", "calls the open function with its name.", "melts in the sun.", "plants a tree."],
        1,
    ),
    (
        "She put on her running shoes and",
        ["ate the shoes.", "read the newspaper upside down.", "went for a jog around the park.", "turned into a bird."],
        2,
    ),
    (
        "A for loop in Python repeats its body",
        [
            "once for every item of the sequence.",
            "only on Tuesdays.",
            "until the cat wakes up.",
            "in a different language.",
        ],
        0,
    ),
    (
        "The function returns None when it",
        ["is hungry.", "is painted red.", "reaches the end without a return statement.", "sleeps."],
        2,
    ),
    # Longer than 32 tokens: HellaSwag batches come in two lengths, 64 and 32, under compile too.
    (
        "When the interpreter imports a module for the first time, it compiles the source to byte code, "
        "stores that byte code in a cache directory next to the file, and on every later import it",
        [
            "loads the cached byte code instead of compiling again.",
            "forgets the module.",
            "prints the file.",
            "deletes the directory.",
        ],
        0,
    ),
]


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    with open(path, "w") as f:
        for ctx, endings, label in HELLASWAG:
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": label}) + "\n")
    return str(path)


def test_compiled_training_evaluates_and_samples_without_recompiling(
    straight, data_dir, hellaswag_file, tmp_path, monkeypatch
):
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    graphs = []  # compiled graphs so far, after each training step (and the evals before it)

    def counting_train_step(*a, **k):
        result = train_step(*a, **k)
        graphs.append(counters["stats"]["unique_graphs"])
        return result

    train_step = train_gpt2.train_step
    monkeypatch.setattr(train_gpt2, "train_step", counting_train_step)
    argv = args(
        data_dir,
        tmp_path,
        "--compile",
        "--stop-at-step",
        "4",
        "--eval-interval",
        "1",
        "--hellaswag-interval",
        "1",
        "--hellaswag-file",
        hellaswag_file,
        "--sample-interval",
        "1",
        "--sample-tokens",
        "6",
        "--num-samples",
        "2",
    )
    assert main(argv) == 0
    assert graphs[0] > 0 and graphs == [graphs[0]] * 4  # train, val and HellaSwag compiled once, in step 0
    # the compiled model trains like the plain one (val: at the steps both runs evaluated)
    for key, steps in (("train_loss", {0, 1, 2, 3}), ("val_loss", {0})):
        values, reference = series(tmp_path, key), series(straight, key)
        assert set(values) & set(reference) == steps
        for step in steps:
            assert values[step] == pytest.approx(reference[step], abs=1e-4)
    assert sorted(series(tmp_path, "hellaswag_acc")) == [0, 1, 2, 3]
    samples = series(tmp_path, "samples")
    assert sorted(samples) == [0, 1, 2, 3] and all(len(s) == 2 for s in samples.values())
    assert all(text.startswith("Hello, I'm a language model,") for s in samples.values() for text in s)
    # HellaSwag through the compiled model = HellaSwag on the plain model of the same weights
    ckpt = checkpoint(tmp_path, 2)
    assert all(not k.startswith("_orig_mod.") for k in ckpt["model"])
    model = model_from_checkpoint(os.path.join(tmp_path, "checkpoints", "step_00000002.pt"))
    result = hellaswag.evaluate(model, hellaswag.load_examples(hellaswag_file), "cpu")
    assert series(tmp_path, "hellaswag_acc")[2] == result["correct_norm"] / result["total"]


def hellaswag_hook(server):
    """tests/hooked_train.py's hook that makes every rank's hellaswag.download() fetch what server serves, pinned
    to its size and sha256."""
    return f"*:setup:hellaswag={server.url},{len(server.body)},{hashlib.sha256(server.body).hexdigest()}"


def hellaswag_downloads(stderr, when):
    """(rank, local rank) of each hellaswag.download() call that tests/hooked_train.py saw `when` ("before" or
    "after") the rank passed the barrier after set-up, sorted."""
    pattern = rf"hooked_train\.py: hellaswag\.download\(\) on rank (\d+), local rank (\d+), {when} the barrier"
    return sorted((int(rank), int(local_rank)) for rank, local_rank in re.findall(pattern, stderr))


@pytest.mark.multiprocess
def test_compiled_model_inside_ddp_trains_like_the_plain_run_and_scores_hellaswag_over_ranks(
    straight, data_dir, hellaswag_file, tmp_path, flaky_server
):
    # The 8-GPU set-up in small: torch.compile inside DDP (2 gloo ranks), val loss, HellaSwag downloaded once for
    # the node (local rank 0 fetches it before the barrier, rank 1 reads that copy), split over the ranks and
    # all-reduced, samples on rank 0.
    log_dir = tmp_path / "log"
    with flaky_server(open(hellaswag_file, "rb").read()) as server:
        result = hooked(
            [hellaswag_hook(server)],
            args(
                data_dir,
                log_dir,
                "--compile",
                "--stop-at-step",
                "4",
                "--hellaswag-interval",
                "2",
                "--sample-interval",
                "4",
                "--sample-tokens",
                "6",
            ),
            torchrun=True,
            env={"HELLASWAG_CACHE": str(tmp_path / "cache")},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.requests == 1 and hellaswag_downloads(result.stderr, "before") == [(0, 0)], result.stderr[-3000:]
    assert {rank for rank, _ in hellaswag_downloads(result.stderr, "after")} == {0, 1}  # both read the cached copy
    assert result.stdout.count("sample 0: ") == 1  # step 0, printed once (rank 0)
    for key in ("train_loss", "grad_norm"):
        got, want = series(log_dir, key), series(straight, key)
        assert sorted(got) == [0, 1, 2, 3]
        for step in got:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (key, step)
    assert series(log_dir, "val_loss")[0] == pytest.approx(series(straight, "val_loss")[0], abs=1e-4)
    assert sorted(series(log_dir, "hellaswag_acc")) == [0, 2]
    # The all-reduced accuracy = one process scoring every example (of the served file) with the weights of step 2.
    model = model_from_checkpoint(os.path.join(log_dir, "checkpoints", "step_00000002.pt"))
    reference = hellaswag.evaluate(model, hellaswag.load_examples(hellaswag_file), "cpu")
    assert series(log_dir, "hellaswag_acc")[2] == reference["correct_norm"] / reference["total"]


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now, for a rendezvous the test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_on_two_nodes_each_node_downloads_hellaswag_once_before_the_barrier(
    data_dir, hellaswag_file, tmp_path, flaky_server
):
    # Two torchrun agents, one process each, meet at a c10d rendezvous on 127.0.0.1: two nodes, each with its own
    # HellaSwag cache. Each node's local rank 0 (one of them global rank 1) fetches the file before the barrier.
    endpoint = f"127.0.0.1:{free_port()}"
    argv = args(data_dir, tmp_path / "log", "--stop-at-step", "1", "--eval-interval", "0", "--hellaswag-interval", "4")

    def node(n, hook):  # node n's torchrun agent; node 0's hosts the rendezvous
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-conf=is_host={n == 0}"]
        command = [*torchrun, *rendezvous, HOOKED, hook, "--", *argv]
        return Background(command, env={"HELLASWAG_CACHE": str(tmp_path / f"cache{n}")})

    with flaky_server(open(hellaswag_file, "rb").read()) as server:
        with node(0, hellaswag_hook(server)) as first, node(1, hellaswag_hook(server)) as second:
            (code_0, stderr_0), (code_1, stderr_1) = first.wait(), second.wait()
    assert code_0 == code_1 == 0, (stderr_0 + stderr_1)[-3000:]
    assert server.requests == 2 and hellaswag_downloads(stderr_0 + stderr_1, "before") == [(0, 0), (1, 0)]
    assert all(os.path.isfile(tmp_path / f"cache{n}" / hellaswag.DATA_FILE) for n in (0, 1))
    assert sorted(series(tmp_path / "log", "hellaswag_acc")) == [0]


def test_bf16_autocast_trains_close_to_float32(straight, data_dir, tmp_path):
    # Measured on this tiny run (torch 2.13 CPU), bf16 autocast against float32: losses within 8.1e-5
    # (relative), grad norms within 6.5e-4, the val loss within 4e-6. Wrong paths measured the same way:
    # float16 autocast without a scaler, losses 2.3e-3 and norms 3.8e-2 away; the weights themselves in
    # bf16, norms 5.5e-3 away.
    assert main(args(data_dir, tmp_path, "--dtype", "bfloat16", "--stop-at-step", "4")) == 0
    for key, rel in (("train_loss", 5e-4), ("grad_norm", 3e-3)):
        reference, values = series(straight, key), series(tmp_path, key)
        assert sorted(values) == [0, 1, 2, 3]
        for step, value in values.items():
            assert value == pytest.approx(reference[step], rel=rel) and value != reference[step], (key, step)
    val, reference = series(tmp_path, "val_loss")[0], series(straight, "val_loss")[0]
    assert val == pytest.approx(reference, rel=1e-4) and val != reference  # bf16, not fp32


# -----------------------------------------------------------------------------
# Settings files and dashboards


def test_the_written_config_repeats_the_run_and_flags_win(straight, data_dir, tmp_path):
    written = os.path.join(straight, "config.toml")
    config = parse_args(["--config", written])
    assert config == parse_args(args(data_dir, straight))  # every setting of the run, read back
    assert parse_args(["--config", written, "--max-lr", "3e-3", "--no-shuffle"]).max_lr == 3e-3  # flags win
    assert not parse_args(["--config", written, "--no-shuffle"]).shuffle
    assert main(["--config", written, "--log-dir", str(tmp_path)]) == 0  # the same run again
    for key in ("train_loss", "val_loss"):
        assert series(tmp_path, key) == series(straight, key)


def test_config_files_with_mistakes_are_one_line(tmp_path, capsys):
    cases = {
        "unknown.toml": ("max_lr = 1e-3\nlearning_rate = 1e-3\n", "unknown setting(s) learning_rate"),
        "type.toml": ('max_steps = "many"\n', "argument --max-steps: invalid int value: 'many'"),
        "syntax.toml": ("max_lr = \n", "cannot read --config"),
    }
    for name, (text, phrase) in cases.items():
        (tmp_path / name).write_text(text)
        err = error_of(capsys, ["--config", str(tmp_path / name)], 2)
        assert phrase in err, err


# GPT-2 124M by the GPT-3 small recipe, as build-nanogpt trains it on FineWeb-Edu 10B: 2^19 tokens a step,
# 19,073 steps (one pass over 10B tokens), AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, lr 6e-4 after 715
# warmup steps, cosine to 6e-5, clip 1.0, GPT-2's vocabulary padded to 50,304, 1,024 tokens of context,
# the val loss every 250 steps.
RECIPE = {
    "model": "gpt2",
    "init_from": "scratch",
    "total_batch_size": 524288,
    "max_steps": 19073,
    "max_lr": 6e-4,
    "warmup_steps": 715,
    "min_lr": 6e-5,
    "beta1": 0.9,
    "beta2": 0.95,
    "adam_eps": 1e-8,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "vocab_size": 50304,
    "block_size": 1024,
    "seq_len": 1024,
    "eval_interval": 250,
}


def recipe_of(config):
    return {name: getattr(config, name) for name in RECIPE}


def test_the_defaults_are_the_gpt3_small_recipe(straight, data_dir):
    config = parse_args([])
    assert recipe_of(config) == RECIPE
    # 10,485,760 val tokens (20 x 512 x 1024), HellaSwag and samples every 250 steps, seed 1337
    assert (config.val_tokens, config.hellaswag_interval, config.sample_interval, config.seed) == (
        10485760,
        250,
        250,
        1337,
    )
    assert (config.checkpoint_interval, config.keep_checkpoints, config.max_skipped_steps) == (1000, 3, 5)
    # build-nanogpt's micro batch of 64 x 1024; AdamW alone, Muon (when chosen) at its usual settings
    assert config.batch_size == 64 and config.optimizer == "adamw"
    assert (config.muon_momentum, config.muon_weight_decay, config.muon_ns_steps) == (0.95, 0.1, 5)
    # A run's AdamW (straight leaves it at the defaults): weight decay 0.1 on exactly the 2-D tensors (matmul
    # weights, embeddings), none on biases and LayerNorm gains; the groups' shapes read from AdamW's moments.
    ckpt = checkpoint(straight, STEPS)
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all((g["betas"], g["eps"]) == ((0.9, 0.95), 1e-8) for g in (decay, no_decay))
    state = ckpt["optimizer"]["state"]
    assert all(state[i]["exp_avg"].dim() >= 2 for i in decay["params"])
    assert all(state[i]["exp_avg"].dim() < 2 for i in no_decay["params"])
    weights = list(transformers_gpt2(parse_args(args(data_dir, straight))).parameters())  # the tied embedding once
    assert sorted(state[i]["exp_avg"].numel() for i in decay["params"]) == sorted(
        w.numel() for w in weights if w.dim() >= 2
    )
    assert sorted(state[i]["exp_avg"].numel() for i in no_decay["params"]) == sorted(
        w.numel() for w in weights if w.dim() < 2
    )


def test_shipped_configs_are_the_recipes_they_say(data_dir):
    configs = {
        os.path.basename(path): parse_args(["--config", path])
        for path in glob.glob(os.path.join(ROOT, "configs", "*.toml"))
    }
    assert set(configs) == {
        "gpt2-124m-8gpu.toml",
        "gpt2-124m-1gpu-24gb.toml",
        "gpt2-124m-1gpu-40gb.toml",
        "gpt2-124m-muon-8gpu.toml",
        "finetune-gpt2.toml",
        "demo.toml",
    }
    eight, one, one_40gb = (configs[f"gpt2-124m-{name}.toml"] for name in ("8gpu", "1gpu-24gb", "1gpu-40gb"))
    assert recipe_of(eight) == recipe_of(one) == recipe_of(one_40gb) == RECIPE
    assert eight.optimizer == one.optimizer == one_40gb.optimizer == "adamw"
    assert (eight.val_tokens, eight.hellaswag_interval) == (10485760, 250)
    assert (one.val_tokens, one.hellaswag_interval) == (2097152, 1000)  # a fifth of the val tokens, said so
    assert (one_40gb.val_tokens, one_40gb.hellaswag_interval) == (2097152, 1000)
    # 64 x 1024 tokens on each of 8 GPUs: no accumulation; 16 (32) x 1024 on one GPU: 32 (16) micro steps
    assert (eight.batch_size, one.batch_size, one_40gb.batch_size) == (64, 16, 32)
    assert eight.total_batch_size // (64 * 1024 * 8) == 1 and one.total_batch_size // (16 * 1024) == 32
    assert train_gpt2.config_problems(eight, 8) == [] and train_gpt2.config_problems(one, 1) == []
    assert train_gpt2.config_problems(one_40gb, 1) == []
    # Muon on 8 GPUs: the recipe in 11,500 steps (0.6 of AdamW's), Muon at momentum 0.95, weight decay 0.1, 5
    # Newton-Schulz steps
    muon = configs["gpt2-124m-muon-8gpu.toml"]
    assert recipe_of(muon) == RECIPE | {"max_steps": 11500} and muon.optimizer == "muon"
    assert (muon.muon_momentum, muon.muon_weight_decay, muon.muon_ns_steps, muon.batch_size) == (0.95, 0.1, 5, 64)
    assert train_gpt2.config_problems(muon, 8) == []
    assert configs["finetune-gpt2.toml"].init_from == "gpt2"
    assert configs["demo.toml"] == parse_args(["--demo"])
    # --demo with a shorter --max-steps warms up for a tenth of it, as demo.toml does (15 of 150 steps)
    assert (configs["demo.toml"].max_steps, configs["demo.toml"].warmup_steps) == (150, 15)
    assert parse_args(["--demo", "--max-steps", "40"]).warmup_steps == 4
    assert parse_args(["--demo", "--max-steps", "40", "--warmup-steps", "1"]).warmup_steps == 1  # given: kept


@pytest.mark.parametrize(
    "flags",
    [
        ["--warmup-steps", "10", "--max-steps", "10"],  # all warmup: the cosine never starts
        ["--min-lr", "6e-4"],  # a constant lr after warmup
        ["--seq-len", "64", "--block-size", "64"],
        ["--val-tokens", "1024"],  # one sequence
        ["--beta1", "0", "--beta2", "0"],
        [
            "--warmup-steps",
            "0",
            "--min-lr",
            "0",
            "--weight-decay",
            "0",
            "--grad-clip",
            "0",
            "--seed",
            "0",
            "--eval-interval",
            "0",
            "--hellaswag-interval",
            "0",
            "--sample-interval",
            "0",
            "--checkpoint-interval",
            "0",
            "--val-tokens",
            "0",
            "--stop-at-step",
            "0",
            "--time-limit",
            "0",
        ],
    ],
)
def test_settings_on_the_edge_of_valid_are_accepted(flags):
    parse_args(flags)  # raises UserError (exit 2) for a setting it refuses


def tensorboard_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(log_dir, "tensorboard"))
    events.Reload()  # purges what a later launch's purge_step dropped, as TensorBoard shows it
    return {event.step: event.value for event in events.Scalars(tag)}


def wandb_history(log_dir):
    """{W&B run id: [logged dicts]} from the offline .wandb files (LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data, pos, pending, block = open(path, "rb").read(), 7, b"", 32768  # 7: the file's header
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # no room for a record header: the rest of the block is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "run":
                    run_id = record.run.run_id
                elif record.WhichOneof("record_type") == "history":
                    runs.setdefault(run_id, []).append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    )
    return runs


def test_tensorboard_and_wandb_get_the_events_and_a_resume_continues_them(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dashboards = ["--tensorboard", "--wandb", "gpt2-test", "--sample-interval", "4", "--sample-tokens", "4"]
    assert main(args(data_dir, tmp_path, *dashboards, "--stop-at-step", "6")) == 0
    assert (
        main(
            args(
                data_dir,
                tmp_path,
                *dashboards,
                "--resume",
                str(tmp_path / "checkpoints" / "step_00000004.pt"),
                "--max-lr",
                "1e-2",
            )
        )
        == 0
    )  # a rollback from 6 to 4, then on to the end
    for key in ("train_loss", "val_loss", "lr"):
        assert tensorboard_scalars(tmp_path, key) == pytest.approx(series(tmp_path, key)), key  # one history
    run_id = (tmp_path / "wandb_run_id").read_text()
    runs = wandb_history(tmp_path)
    assert list(runs) == [run_id]  # both launches logged to the same W&B run
    logged = [event for event in runs[run_id] if "train_loss" in event]
    assert [e["step"] for e in logged] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]  # W&B keeps both branches of 4 and 5
    final = {e["step"]: e["train_loss"] for e in logged[6:]} | {e["step"]: e["train_loss"] for e in logged[:4]}
    assert final == pytest.approx(series(tmp_path, "train_loss"))
    samples = [e for e in runs[run_id] if "samples/_type" in e]
    assert [e["step"] for e in samples] == [0, 4, 4, 8] and samples[0]["samples/nrows"] == 4


# -----------------------------------------------------------------------------
# Errors: one line, exit code, nothing damaged


def error_of(capsys, argv, code):
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_missing_data_dir_names_the_command_that_makes_it(tmp_path):
    result = run_subprocess(args(str(tmp_path / "nowhere"), tmp_path / "log"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "does not exist; make it with `python fineweb.py`" in result.stderr and "--demo" in result.stderr


def test_batch_sizes_that_do_not_divide(data_dir, tmp_path, capsys):
    err = error_of(capsys, args(data_dir, tmp_path, "--total-batch-size", "320"), 2)
    assert "total_batch_size=320 is not divisible by batch_size * seq_len * world_size = 4 * 32 * 1 = 128" in err
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_every_impossible_setting_is_listed_at_once(data_dir, tmp_path, capsys):
    err = error_of(
        capsys,
        args(
            data_dir,
            tmp_path,
            "--n-embd",
            "50",
            "--n-head",
            "3",
            "--seq-len",
            "128",
            "--warmup-steps",
            "20",
            "--max-steps",
            "10",
            "--max-lr",
            "1e-3",
            "--min-lr",
            "1e-2",
        ),
        2,
    )
    for problem in (
        "n_embd=50 is not divisible by n_head=3",
        "seq_len=128 is over block_size=64",
        "warmup_steps=20 is over max_steps=10",
        "min_lr=0.01 is over max_lr=0.001",
    ):
        assert problem in err


def finished_run(straight, directory):
    """A log directory holding the straight run at its end: its last checkpoint, metrics, log and settings."""
    os.makedirs(directory / "checkpoints")
    for name in (f"checkpoints/step_{STEPS:08d}.pt", "metrics.jsonl", "log.txt", "config.toml"):
        shutil.copyfile(os.path.join(straight, name), directory / name)
    return directory


# Every setting that shapes what a run learns, changed alone to a valid value, and how a resume refuses it
# (the flags of args() otherwise). A setting dropped from this list in train_gpt2.py must fail here.
KEPT_BY_A_RESUME = {
    "model": (["--model", "gpt2-medium"], "model='gpt2' in the checkpoint but 'gpt2-medium' now"),
    "n_layer": (["--n-layer", "3"], "n_layer=2 in the checkpoint but 3 now"),
    "n_head": (["--n-head", "4"], "n_head=2 in the checkpoint but 4 now"),
    "n_embd": (["--n-embd", "64"], "n_embd=32 in the checkpoint but 64 now"),
    "block_size": (["--block-size", "128"], "block_size=64 in the checkpoint but 128 now"),
    "vocab_size": (["--vocab-size", "50304"], "vocab_size=50257 in the checkpoint but 50304 now"),
    "init_from": (["--init-from", "HF_GPT2_DIR"], "init_from='scratch' in the checkpoint but 'HF_GPT2_DIR' now"),
    "seq_len": (["--seq-len", "16"], "seq_len=32 in the checkpoint but 16 now"),
    "shuffle": (["--no-shuffle"], "shuffle=True in the checkpoint but False now"),
    "total_batch_size": (["--total-batch-size", "512"], "total_batch_size=256 in the checkpoint but 512 now"),
    "max_steps": (["--max-steps", "10"], "max_steps=8 in the checkpoint but 10 now"),
    "weight_decay": (["--weight-decay", "0.5"], "weight_decay=0.1 in the checkpoint but 0.5 now"),
    "beta1": (["--beta1", "0.8"], "beta1=0.9 in the checkpoint but 0.8 now"),
    "beta2": (["--beta2", "0.99"], "beta2=0.95 in the checkpoint but 0.99 now"),
    "adam_eps": (["--adam-eps", "1e-6"], "adam_eps=1e-08 in the checkpoint but 1e-06 now"),
    "dtype": (["--dtype", "bfloat16"], "dtype='float32' in the checkpoint but 'bfloat16' now"),
    "seed": (["--seed", "7"], "seed=1337 in the checkpoint but 7 now"),
    "optimizer": (["--optimizer", "muon"], "optimizer='adamw' in the checkpoint but 'muon' now"),
    "muon_momentum": (["--muon-momentum", "0.9"], "muon_momentum=0.95 in the checkpoint but 0.9 now"),
    "muon_weight_decay": (["--muon-weight-decay", "0"], "muon_weight_decay=0.1 in the checkpoint but 0.0 now"),
    "muon_ns_steps": (["--muon-ns-steps", "3"], "muon_ns_steps=5 in the checkpoint but 3 now"),
}
# The lr schedule and clipping may change on a resume (a rollback lowers the lr; the change is printed); the
# other settings say where and how the run goes and reports, and may change freely.
RETUNED_BY_A_RESUME = ["max_lr", "min_lr", "warmup_steps", "grad_clip"]
FREE_ON_A_RESUME = [
    "data_dir",
    "log_dir",
    "overwrite",
    "batch_size",
    "max_skipped_steps",
    "eval_interval",
    "val_tokens",
    "hellaswag_interval",
    "hellaswag_file",
    "sample_interval",
    "sample_prompt",
    "num_samples",
    "sample_tokens",
    "checkpoint_interval",
    "keep_checkpoints",
    "resume",
    "stop_at_step",
    "time_limit",
    "dist_timeout",
    "wandb",
    "tensorboard",
    "device",
    "compile",
    "peak_flops",
    "demo",
]


def test_every_setting_is_kept_retuned_or_free_on_a_resume():
    # A new setting must be put in one of the three (and, if kept, be refused below when it changes).
    kinds = [set(KEPT_BY_A_RESUME), set(RETUNED_BY_A_RESUME), set(FREE_ON_A_RESUME)]
    assert sum(map(len, kinds)) == len(set.union(*kinds))  # each in one kind only
    assert set.union(*kinds) == {f.name for f in fields(train_gpt2.TrainConfig)}


@pytest.mark.parametrize("setting", [*KEPT_BY_A_RESUME, "two at once"])
def test_a_resume_refuses_each_setting_that_changes_what_the_run_learns(
    setting, straight, data_dir, hf_gpt2_dir, tmp_path, capsys
):
    log_dir = finished_run(straight, tmp_path / "run")
    before = snapshot(log_dir)
    names = ["weight_decay", "seed"] if setting == "two at once" else [setting]  # two: both are listed
    flags = [flag.replace("HF_GPT2_DIR", hf_gpt2_dir) for name in names for flag in KEPT_BY_A_RESUME[name][0]]
    says = [KEPT_BY_A_RESUME[name][1].replace("HF_GPT2_DIR", hf_gpt2_dir) for name in names]
    capsys.readouterr()
    assert main(args(data_dir, log_dir, *flags)) == 2
    err = capsys.readouterr().err
    err = err[err.find("error: ") :]  # after the progress bar of transformers loading --init-from's weights
    assert err.startswith("error: the checkpoint's settings differ from the flags: ") and err.count("\n") == 1
    assert all(phrase in err for phrase in says) and err.count(" in the checkpoint but ") == len(says), err
    assert snapshot(log_dir) == before  # nothing written (not even the lock it held), nothing removed


def test_a_resume_goes_on_with_a_new_lr_schedule_and_new_run_only_settings(
    straight, data_dir, hellaswag_file, tmp_path, capsys
):
    log_dir = finished_run(straight, tmp_path / "run")
    retuned = ["--max-lr", "5e-3", "--min-lr", "5e-4", "--warmup-steps", "1", "--grad-clip", "0.5"]
    run_only = [
        "--batch-size",
        "2",
        "--eval-interval",
        "3",
        "--val-tokens",
        "640",
        "--hellaswag-interval",
        "2",
        "--hellaswag-file",
        hellaswag_file,
        "--sample-interval",
        "5",
        "--sample-prompt",
        "Once",
        "--num-samples",
        "2",
        "--sample-tokens",
        "3",
        "--checkpoint-interval",
        "3",
        "--keep-checkpoints",
        "2",
        "--max-skipped-steps",
        "2",
        "--stop-at-step",
        "20",
        "--time-limit",
        "1h",
        "--dist-timeout",
        "60",
        "--tensorboard",
        "--compile",
        "--peak-flops",
        "1e12",
    ]
    capsys.readouterr()
    assert main(args(data_dir, log_dir, *retuned, *run_only)) == 0
    out = capsys.readouterr().out
    assert (
        "note: max_lr=0.01 in the checkpoint, 0.005 now; min_lr=0.001 in the checkpoint, 0.0005 now; "
        "warmup_steps=2 in the checkpoint, 1 now; grad_clip=1.0 in the checkpoint, 0.5 now: the lr schedule "
        "goes on with the new values" in out
    )
    assert (
        f"nothing to do: {log_dir} holds a run at step 8 (--max-steps 8, --stop-at-step 20); --overwrite starts "
        "a new one" in out
    )


def test_a_non_finite_step_leaves_parameters_and_optimizer_untouched(data_dir):
    config = parse_args(args(data_dir, "unused"))
    model = train_gpt2.build_model(config, torch.device("cpu"))
    optimizers = adamw_of(model, lr=1e-3, weight_decay=0.1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = ShardLoader(data_dir, "train", 4, 32)
    loss, norm, skipped, stop = train_gpt2.train_step(
        model, optimizers, loader, 2, 1e-3, config, torch.device("cpu"), nullcontext()
    )
    assert skipped and not stop and not math.isfinite(loss)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizers["optimizer"].state  # AdamW never stepped
    assert loader.row == 8  # the batches are consumed: the next step reads new ones


NOT_FINITE = {  # flags -> what the one error line must say
    "inf lr": (["--max-lr", "inf", "--warmup-steps", "1"], ["max_lr=inf must be a finite number"]),
    "nan lr": (["--max-lr", "nan"], ["max_lr=nan must be a finite number"]),
    "nan min lr": (["--min-lr", "nan"], ["min_lr=nan must be a finite number"]),
    "nan decay": (["--weight-decay", "nan"], ["weight_decay=nan must be a finite number"]),
    "nan clip": (["--grad-clip", "nan"], ["grad_clip=nan must be a finite number"]),
    "nan eps": (["--adam-eps", "nan"], ["adam_eps=nan must be a finite number"]),
    "zero eps": (["--adam-eps", "0"], ["adam_eps=0.0 must be positive"]),
    "beta1": (["--beta1", "1.5"], ["beta1=1.5 must be in [0, 1)"]),
    "beta2": (["--beta2", "-0.1"], ["beta2=-0.1 must be in [0, 1)"]),
    "negative decay": (["--weight-decay", "-1"], ["weight_decay=-1.0 must not be negative"]),
    "all at once": (
        ["--max-lr", "inf", "--beta1", "1", "--adam-eps", "nan", "--grad-clip=-inf"],
        [
            "max_lr=inf must be a finite",
            "beta1=1.0 must be in [0, 1)",
            "adam_eps=nan must be a finite",
            "grad_clip=-inf must be a finite",
        ],
    ),
}


@pytest.mark.parametrize("case", NOT_FINITE)
def test_non_finite_and_out_of_range_settings_are_refused_before_anything_runs(case, data_dir, tmp_path, capsys):
    flags, phrases = NOT_FINITE[case]
    err = error_of(capsys, args(data_dir, tmp_path / "log", *flags), 2)
    assert all(phrase in err for phrase in phrases), err
    assert not os.path.exists(tmp_path / "log")  # nothing written


def test_mistaken_paths_get_one_line_naming_the_fix(straight, data_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    step = os.path.join(straight, "checkpoints", f"step_{STEPS:08d}.pt")
    cases = [
        (["--log-dir", str(tmp_path / "notes.txt")], 2, "notes.txt is a file, not a directory"),
        (["--log-dir", str(tmp_path / "notes.txt" / "log")], 2, "cannot create --log-dir"),
        (["--sample-interval", "4", "--sample-prompt", ""], 2, "sample_prompt is empty"),
        (["--resume", str(tmp_path / "notes.txt")], 1, "notes.txt is not a readable checkpoint"),
        (["--init-from", "/nonexistent/gpt2"], 2, "init_from=/nonexistent/gpt2 does not exist"),
        (["--init-from", step], 2, f"init_from={step} is a file: --resume a checkpoint, or fine-tune its export"),
        (["--overwrite", "--resume", step], 2, f"--overwrite starts a new run: no --resume {step}"),
        (["--data-dir", str(tmp_path / "notes.txt")], 1, "notes.txt is a file; give the directory of shards"),
    ]
    for flags, code, phrase in cases:
        err = error_of(capsys, args(data_dir, tmp_path / "log", *flags), code)  # the last --log-dir wins
        assert phrase in err, (flags, err)
        assert "weights_only" not in err and "Traceback" not in err


@pytest.mark.multiprocess
def test_a_second_run_on_a_log_dir_in_use_is_refused_and_the_first_finishes_untouched(
    straight, data_dir, tmp_path, run_main
):
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    argv = args(data_dir, tmp_path / "log")
    with Background([sys.executable, HOOKED, f"0:0:wait={fifo}", "--", *argv]) as first:
        writer = fifo_writer(fifo, first.proc)  # once the first run waits at step 0, holding the log dir's lock
        assert writer is not None, first.wait()
        try:
            second_code, _, second_err = run_main(main, *argv)  # this process: another one than the first's
        finally:
            os.close(writer)  # the first run goes on
        code, stderr = first.wait()
    assert second_code == 1 and second_err.count("\n") == 1 and "Traceback" not in second_err
    assert f"is in use by another train_gpt2.py run (pid {first.proc.pid} on {socket.gethostname()})" in second_err
    assert code == 0, stderr[-3000:]
    assert series(tmp_path / "log", "train_loss") == series(straight, "train_loss")
    assert same_model(tmp_path / "log", straight)


# -----------------------------------------------------------------------------
# The newcomer's first command


def test_demo_builds_its_data_and_trains_end_to_end(cpu_demo):
    # conftest's cpu_demo: the demo's settings from a copy of configs/demo.toml without its dtype and compile lines,
    # 8 steps on the CPU, val loss over 2,048 tokens (test_gpu checks the run further). `--demo` with the same flags
    # is that run on a CPU: the same settings, once dtype and compile are resolved.
    data, log, out = cpu_demo["data"], cpu_demo["log"], cpu_demo["out"]
    assert cpu_demo["code"] == 0
    assert sorted(os.listdir(data))[-1].startswith("pydocs_val_") and len(os.listdir(data)) > 5
    assert "val loss" in out and "sample 0: \"Hello, I'm a language model," in out
    assert sorted(series(log, "train_loss")) == list(range(8))
    val = series(log, "val_loss")
    assert sorted(val) == [0, 4, 8] and val[8] < val[0] - 1.0  # it learns (10.75 -> 9.08 measured)
    config = checkpoint(log, 8)["config"]
    assert (config["n_layer"], config["n_embd"], config["seq_len"], config["demo"]) == (4, 128, 128, True)
    flags = cpu_demo["argv"]
    assert flags[:2] == ["--config", str(log.parent / "demo-auto.toml")]
    assert asdict(parse_args(["--demo", *flags[2:]])) == config


# -----------------------------------------------------------------------------
# What `auto` picks (dtype, compile), a model too big to fit, out of memory, float16's scaler, per-dtype peaks


@pytest.mark.parametrize(
    "kind, capability, triton, platform, dtype, compiled",
    [
        ("cuda", (9, 0), True, "linux", "bfloat16", True),  # H100
        ("cuda", (8, 0), True, "linux", "bfloat16", True),  # A100: the first with bf16
        ("cuda", (7, 5), True, "linux", "float16", True),  # T4: no bf16, so float16 (and a scaler)
        ("cuda", (8, 6), True, "win32", "bfloat16", False),  # no official Triton on Windows
        ("cuda", (9, 0), False, "linux", "bfloat16", False),  # Triton missing (or a GPU older than Volta)
        ("mps", None, True, "darwin", "float32", False),
        ("cpu", None, True, "linux", "float32", False),
    ],
)
def test_auto_dtype_and_compile_for_each_device(kind, capability, triton, platform, dtype, compiled, monkeypatch):
    import torch.utils._triton

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
    monkeypatch.setattr(sys, "platform", platform)
    device = torch.device(kind)
    assert (common.resolve_dtype("auto", device), common.compile_by_default(device)) == (dtype, compiled)
    # hellaswag.py and bench.py autocast to the same dtype; an explicit dtype is kept as given
    assert common.autocast_dtype_for("auto", device) == (None if dtype == "float32" else getattr(torch, dtype))
    assert common.resolve_dtype("float16", device) == "float16" and common.resolve_dtype("float32", device) == "float32"


def test_compile_flag_is_on_off_or_left_to_the_device():
    assert parse_args([]).compile is None  # None: on where Triton runs (test_auto_dtype_and_compile_for_each_device)
    assert parse_args(["--compile"]).compile is True and parse_args(["--no-compile"]).compile is False
    assert parse_args(["--compile", "--seed", "3"]).compile is True  # no value swallowed from the next flag
    for flags in (["--no-compile", "auto"], ["--compile", "auto"]):  # no third value: leave the flag out
        with pytest.raises(UserError, match="unrecognized arguments: auto") as refused:
            parse_args(flags)
        assert refused.value.exit_code == 2


def test_a_model_too_big_for_the_free_memory_is_refused_before_it_is_built(data_dir, tmp_path, capsys, monkeypatch):
    # 16 bytes a parameter (float32 weights and gradients, AdamW's two moments) against the memory free
    config = parse_args(args(data_dir, tmp_path / "log"))
    needed = 16 * sum(p.numel() for p in transformers_gpt2(config).parameters())  # the tied embedding once
    monkeypatch.setattr(train_gpt2, "free_memory", lambda device: needed - 1)
    with pytest.raises(UserError, match=f"too big for the cpu: it needs {needed / 1e9:.1f} GB for weights") as e:
        train_gpt2.build_model(config, torch.device("cpu"))
    assert e.value.exit_code == 2 and "choose a smaller one" in str(e.value)
    err = error_of(capsys, args(data_dir, tmp_path / "log"), 2)
    assert "the model is too big for the cpu" in err
    assert not os.path.exists(tmp_path / "log")  # a refused launch leaves nothing it made
    monkeypatch.setattr(train_gpt2, "free_memory", lambda device: needed)  # just fits
    assert train_gpt2.build_model(config, torch.device("cpu")).num_parameters() == needed // 16


def test_auto_settings_are_resolved_in_the_checkpoint_and_resume(straight, data_dir, tmp_path, capsys):
    auto = [flag for flag in args(data_dir, tmp_path) if flag != "--no-compile"]  # compile: the device's choice
    auto[auto.index("--dtype") + 1] = "auto"
    assert main([*auto, "--stop-at-step", "4"]) == 0
    assert "dtype float32 (auto), compile off (auto); " in capsys.readouterr().out
    config = checkpoint(tmp_path, 4)["config"]
    assert (config["dtype"], config["compile"]) == ("float32", False)  # what ran, not "auto"
    written = parse_args(["--config", str(tmp_path / "config.toml")])  # as given: it repeats on another machine
    assert (written.dtype, written.compile) == ("auto", None)
    assert main([*auto, "--batch-size", "8"]) == 0  # the resume check compares resolved settings
    assert_close_runs(tmp_path, straight, atol=1e-5)  # steps 4-7 in 1 x 8 rows instead of 2 x 4: the same tokens


def test_out_of_memory_mid_run_is_one_line_naming_a_smaller_batch_size(data_dir, tmp_path, capsys, monkeypatch):
    steps = []

    def train_step(*a, **k):
        steps.append(len(steps))
        if len(steps) == 3:  # step 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train_step(*a, **k)

    real_train_step = train_gpt2.train_step
    monkeypatch.setattr(train_gpt2, "train_step", train_step)
    err = error_of(capsys, args(data_dir, tmp_path), 1)
    assert (
        err == "error: out of memory with --batch-size 4; relaunch with --batch-size 2 (the same total batch in "
        "more micro steps)\n"
    )
    assert sorted(series(tmp_path, "train_loss")) == [0, 1]
    assert "--seq-len" in train_gpt2.out_of_memory(replace(parse_args([]), batch_size=1))


def test_float16_overflow_is_the_scalers_to_handle_not_an_error(data_dir):
    config = parse_args(args(data_dir, "unused", "--dtype", "float16"))
    device = torch.device("cpu")
    model = train_gpt2.build_model(config, device)
    optimizers = adamw_of(model, lr=1e-3, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The gradient norm of the loader's first 8 windows (2 micro batches of 4), computed in float32
    reference = copy.deepcopy(model)
    windows = torch.from_numpy(epoch_windows(data_dir, "train", 32)[:8])
    reference(windows[:, :-1], windows[:, 1:].contiguous())[1].backward()
    norm_float32 = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
    autocast, _ = common.autocast_and_scaler("float16", device)
    # A scale of 2^40 overflows float16 gradients (max 65504): the norm is inf, the loss finite.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    loader = ShardLoader(data_dir, "train", 4, 32)
    loss, norm, skipped, _ = train_gpt2.train_step(model, optimizers, loader, 2, 1e-3, config, device, autocast, scaler)
    assert math.isfinite(loss) and not math.isfinite(norm) and not skipped  # the scaler's, not a skipped step
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the step was skipped
    assert scaler.get_scale() == 2.0**39  # and the scale halved
    # At a scale that fits, the step is taken, and the norm logged (and clipped) is the true one, not the scaled
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss, norm, skipped, _ = train_gpt2.train_step(
        model, optimizers, ShardLoader(data_dir, "train", 4, 32), 2, 1e-3, config, device, autocast, scaler
    )
    assert not skipped and norm == pytest.approx(norm_float32, rel=1e-2) and scaler.get_scale() == 2.0**10
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A non-finite loss is a skipped step, scaler or not.
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    loss, _, skipped, _ = train_gpt2.train_step(model, optimizers, loader, 2, 1e-3, config, device, autocast, scaler)
    assert skipped and not math.isfinite(loss)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "c_fc.weight" not in k)


def test_a_float16_resume_goes_on_with_the_loss_scale_of_its_checkpoint(straight, data_dir, tmp_path):
    # straight's step 6 as a float16 run's checkpoint whose loss scale, 2^40, overflows any gradient
    ckpt = checkpoint(straight, 6)
    ckpt["config"]["dtype"] = "float16"
    ckpt["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**40).state_dict()
    path = str(tmp_path / "float16.pt")
    torch.save(ckpt, path)
    assert main(args(data_dir, tmp_path / "run", "--dtype", "float16", "--resume", path, "--stop-at-step", "7")) == 0
    step_6 = next(r for r in metrics(tmp_path / "run") if "train_loss" in r)
    assert step_6["step"] == 6 and math.isfinite(step_6["train_loss"]) and step_6["grad_norm"] is None
    assert "skipped" not in step_6  # an overflow at this scale: the scaler's to handle
    after = checkpoint(tmp_path / "run", 7)
    assert after["scaler"]["scale"] == 2.0**39  # halved from the checkpoint's scale, not float16's default 2^16
    assert all(torch.equal(after["model"][k], ckpt["model"][k]) for k in ckpt["model"])  # the update was skipped


@pytest.mark.parametrize(
    "name, dtype, flops",
    [
        ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),
        ("NVIDIA H100 80GB HBM3", "float16", 989e12),
        ("NVIDIA H100 PCIe", "float32", 378e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA H200 NVL", "bfloat16", 835e12),
        ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
        ("NVIDIA L4", "float32", 60e12),
        ("NVIDIA L40S", "float16", 362e12),
        ("Tesla V100-SXM2-16GB", "float16", 125e12),
        ("Tesla V100-PCIE-32GB", "float16", 112e12),
        ("Tesla V100S-PCIE-32GB", "float16", 130e12),
        ("Tesla V100-SXM2-16GB", "float32", 15.7e12),
        ("Tesla V100-SXM2-16GB", "bfloat16", None),  # no bf16 compute before Ampere: no MFU
        ("Tesla T4", "float16", 65e12),
        ("Tesla T4", "float32", 8.1e12),
    ],
)
def test_peak_flops_by_gpu_name_and_dtype(name, dtype, flops):
    assert common.peak_flops_of(name, dtype) == flops


# -----------------------------------------------------------------------------
# Issue #25 and #26: ranks that see other data, the step line and summary, Ctrl-C in the imports, out of memory


@pytest.mark.multiprocess
@pytest.mark.parametrize("difference", ["a shard missing", "a shard of another size"])
def test_under_torchrun_ranks_that_see_other_shards_end_the_job_before_the_first_step(data_dir, tmp_path, difference):
    # Rank 1's node holds another copy of the data: one train shard short, or one of them cut (the same names). The
    # ranks compare their shard lists (names and sizes) at the one agreement after set-up: every rank ends, one line
    # names the difference, and nothing trains (the log directory this launch made is gone).
    other = tmp_path / "other-node-data"
    shutil.copytree(data_dir, other)
    shards = sorted(glob.glob(str(other / "*_train_*.npy")))
    if difference == "a shard missing":
        os.remove(shards[-1])
    else:
        np.save(shards[1], np.load(shards[1])[:-100])
    result = hooked([f"1:argv:--data-dir={other}"], args(data_dir, tmp_path / "log"), torchrun=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    name = os.path.basename(shards[-1] if difference == "a shard missing" else shards[1])
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: rank 1 sees other train shards than rank 0 (") and name in errors[0]
    assert errors[0].endswith(", on one and not the other): give every node the same data")
    assert not traceback_of_ours(result.stderr) and not (tmp_path / "log").exists()


def test_each_step_line_says_where_the_run_is_and_the_run_ends_with_a_summary(straight):
    # The straight run: 8 steps, val at 0, 4 and 8, checkpoints every 2
    with open(os.path.join(straight, "log.txt")) as f:
        lines = f.read().splitlines()
    steps = [line for line in lines if re.match(r"step +\d+/", line)]
    assert len(steps) == STEPS
    for step, line in enumerate(steps):
        fraction = f"{(step + 1) / STEPS:.1%}"
        assert line.startswith(f"step {step:5d}/{STEPS} ({fraction}) | loss "), line
        assert re.search(r"\| ETA (\d+h\d\dm|\d+m\d\ds|\d+s)$", line), line
    assert steps[-1].endswith("| ETA 0s")  # nothing left after the last step
    assert all(re.fullmatch(r"step +\d+ \| val loss \d+\.\d{4} \| \d+\.\d s", s) for s in lines if "| val loss" in s)
    assert all(
        re.fullmatch(r"step +\d+ \| checkpoint .*step_\d{8}\.pt \| \d+\.\d s", s) for s in lines if "| checkpoint" in s
    )
    done = [line for line in lines if line.startswith("done: ")]
    latest = os.path.join(straight, "checkpoints", f"step_{STEPS:08d}.pt")
    val_8 = f"{series(straight, 'val_loss')[STEPS]:.4f}"
    summary = rf"done: {STEPS} steps, {STEPS * 256:,} tokens, (\d+m\d\ds|\d+s) this launch; "
    summary += rf"last evaluation val loss {val_8}; "
    assert len(done) == 1 and re.fullmatch(summary + rf"latest checkpoint {re.escape(latest)}", done[0]), done
    assert lines[-1] == (
        f"next: python sample.py -m {straight} | python export.py {straight} my-gpt2 | PLAY_LOG_DIR={straight} "
        "jupyter notebook play.ipynb"
    )


def test_the_demos_warmup_is_a_tenth_of_the_steps_given():
    assert parse_args(["--demo"]).warmup_steps == 15  # configs/demo.toml: 150 steps, 15 of warmup
    assert parse_args(["--demo", "--max-steps", "20"]).warmup_steps == 2
    assert parse_args(["--demo", "--max-steps", "20", "--warmup-steps", "5"]).warmup_steps == 5  # given: kept
    assert parse_args(["--max-steps", "1000"]).warmup_steps == 715  # not the demo: the recipe's


def test_ctrl_c_while_the_imports_load_ends_quietly_with_130(tmp_path):
    # A torch that sends Ctrl-C while it loads (the real one takes seconds): what a user's early Ctrl-C meets
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n"
    )
    result = run_process([sys.executable, SCRIPT, "--demo"], timeout=60, env={"PYTHONPATH": str(tmp_path)})
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "")


@pytest.mark.parametrize("where", ["val", "hellaswag", "sample"])
def test_out_of_memory_in_an_evaluation_is_the_same_one_line(
    where, data_dir, hellaswag_file, tmp_path, capsys, monkeypatch
):
    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(
        train_gpt2, {"val": "evaluate_val", "hellaswag": "evaluate_hellaswag", "sample": "sample"}[where], out_of_memory
    )
    flags = ["--hellaswag-file", hellaswag_file, "--hellaswag-interval", "4", "--sample-interval", "4"]
    err = error_of(capsys, args(data_dir, tmp_path, *flags), 1)
    fix = "relaunch with --batch-size 2 (the same total batch in more micro steps)"
    assert err == f"error: out of memory with --batch-size 4; {fix}\n"


@pytest.mark.multiprocess
def test_under_torchrun_a_rank_out_of_memory_ends_the_job_within_a_minute_with_one_line(data_dir, tmp_path):
    # Rank 1 runs out of memory in its 4th step (step 3) while rank 0 waits in that step's all-reduce: rank 1 leaves
    # at once with one line, torchrun ends rank 0, and nobody waits out --dist-timeout (600 s here)
    result = hooked(["1:3:oom"], args(data_dir, tmp_path / "log", "--dist-timeout", "600"), torchrun=True, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == [
        "error: out of memory with --batch-size 4; relaunch with --batch-size 2 (the same total batch in more micro "
        "steps)"
    ], result.stderr[-3000:]
    assert not traceback_of_ours(result.stderr)


def test_hellaswag_offline_names_train_gpt2s_flags(data_dir, tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise UserError(
            "could not download HellaSwag from https://example in 4 tries (no network); nothing was kept in X"
        )

    monkeypatch.setattr(hellaswag, "download", offline)
    err = error_of(capsys, args(data_dir, tmp_path, "--hellaswag-interval", "4"), 1)
    assert err.startswith("error: could not download HellaSwag") and err.endswith(
        "; pass --hellaswag-file FILE, or turn HellaSwag off with --hellaswag-interval 0\n"
    )
    assert not tmp_path.exists() or os.listdir(tmp_path) == []  # the failed launch left nothing


def test_a_run_started_from_another_runs_checkpoint_says_so_and_continues_it(straight, data_dir, tmp_path, capsys):
    # Into an empty log directory, --resume another run's log directory (its latest: step 8 of 8) has nothing to do
    # and says whose checkpoint that is; from its step-4 checkpoint it goes on exactly as that run went on
    latest, middle = (os.path.join(straight, "checkpoints", f"step_{step:08d}.pt") for step in (STEPS, 4))
    assert main(args(data_dir, tmp_path / "new", "--resume", straight)) == 0
    assert capsys.readouterr().out.endswith(
        f"nothing to do: {latest}, another run's checkpoint, is at step 8 (--max-steps 8, --stop-at-step 0); "
        "--overwrite starts a new one\n"
    )
    assert main(args(data_dir, tmp_path / "branch", "--resume", middle)) == 0
    out = capsys.readouterr().out
    assert (
        f"note: {tmp_path / 'branch'} starts at step 4 from another run's {middle}; its history before stays there"
        in out
    )
    assert sorted(series(tmp_path / "branch", "train_loss")) == [4, 5, 6, 7]
    assert {s: v for s, v in series(straight, "train_loss").items() if s >= 4} == series(
        tmp_path / "branch", "train_loss"
    )
    assert same_model(tmp_path / "branch", straight)


def test_a_cpu_run_keeps_its_freed_memory(data_dir, tmp_path, monkeypatch):
    # glibc would map each large tensor afresh and unmap it when freed: every CPU step would page-fault its memory
    # in again (the demo's step: 2.0 s instead of 0.9 s on 2 cores). The policy is set once, at set-up, on CPU only.
    calls = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: calls.append("kept"))
    assert main(args(data_dir, tmp_path, "--max-steps", "1", "--warmup-steps", "0")) == 0
    assert calls == ["kept"]
