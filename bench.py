"""What GPT-2 costs to train and to run here: measured figures anyone can re-run.

    python bench.py                                   # GPT-2 124M, T=1024, every section
    python bench.py --sections train --dtypes bfloat16 --modes compiled   # the GPU headline
    python bench.py --preset demo                     # train_gpt2.py --demo's small GPT
    python bench.py --json > bench.json               # one JSON object, for scripts
    python bench.py --preset test --json              # a few seconds: what tests/test_bench.py runs
    torchrun --nproc-per-node 8 bench.py --sections ddp   # the ddp section on 8 GPUs

The sections (--sections, default all of them, in this order):
  matmul     the device's own ceiling: a large square matmul in each dtype, FLOP/s.
  train      one training micro step exactly as train_gpt2.py runs it (its train_step: forward
             under autocast, backward, clip_grad_norm_, fused AdamW step; float16 with its gradient
             scaler), for every --dtypes x --modes. Warm-up steps (compilation included) are left
             out; the timed steps are synchronized and their median is reported as ms/step and
             tokens/s. Achieved FLOP/s = model.flops_per_token(T) x tokens/s. MFU divides it by the
             device's dense peak in that dtype (common.py's table, or --peak-flops; none on CPU). The
             ceiling ratio divides it by the median of matmuls in the same dtype timed between the
             training steps, so both saw the same machine at the same moment.
  optimizer  optimizer.step() alone (after a training step: its gradients in place) for AdamW alone and
             for Muon + AdamW (train_gpt2.py --optimizer muon's split), as a fraction of the whole step,
             in the dtype and mode train_gpt2.py picks here (--dtype auto, --compile by default). Also
             the arithmetic: Newton-Schulz FLOPs of a Muon step against a 524,288-token step, for the
             model measured and for GPT-2 124M. Muon runs Newton-Schulz in bfloat16 whatever the run's
             dtype: on a CPU without bf16 units (AVX512-BF16, AMX) that is a slow path (0.5 GFLOP/s on
             an AVX2 EPYC) and a 124M Muon step takes most of an hour; use --preset demo there.
  ddp        DistributedDataParallel's gradient_as_bucket_view (False, True) and bucket_cap_mb
             (--ddp-bucket-mb) for every --modes: ms/step and peak memory of train_gpt2.py's step on
             --ddp-processes ranks. bench.py starts itself under torch.distributed.run for it (gloo on
             CPU; on CUDA one GPU a rank, so it needs that many GPUs); under torchrun it runs this alone.
  data       how long a step waits for its next micro batch (--data-batch-size x --data-seq-len tokens)
             from shards on disk, read by loader.ShardLoader as train_gpt2.py reads them (the next batch
             on a background thread) against a synchronous read of the same rows, while a simulated
             step (--data-step-ms) runs between batches; with a warm page cache, and a cold one (the
             shards evicted before the first batch and read without read-ahead, as in a first epoch over
             shards far larger than the page cache: Linux). The shards: Python's manual, repeated,
             written by fineweb.write_shards into a temporary directory.
  sample     model.generate with its KV cache against a reference loop without one (the whole
             window through the model for every new token), greedy, tokens/s and the speed-up.
  hellaswag  hellaswag.evaluate batched against one example at a time, examples/s and speed-up.
  fineweb    fineweb.write_shards: tokens/s of writing shards from the Python docs against tiktoken
             alone over the same texts in the same number of processes (the ceiling), fastest of 3.

Why a ratio to the ceiling: a tokens/s figure says as much about the machine as about the code,
and shared or throttled machines drift from minute to minute. Achieved FLOP/s over the FLOP/s
the same device reaches in a plain matmul, measured in the same run, compares across machines.

The model's weights are a fresh initialisation (speed does not depend on them), and the tokens
are real text: Python's reference manual (pydoc_data), tokenized with GPT-2's tokenizer. Without
--hellaswag-file, HellaSwag-format examples are built from the same manual's sentences (the
output says which). float32 matmuls run as TF32 on CUDA, as in train_gpt2.py; sampling and
HellaSwag run under the autocast dtype that train_gpt2.py's --dtype auto picks. Peak memory is
torch.cuda.max_memory_allocated on CUDA and the process's peak resident set size (RSS) elsewhere.
"""

import ctypes
import datetime
import gc
import itertools
import json
import mmap
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import fineweb
import hellaswag
import train_gpt2
from common import (
    UserError,
    autocast_and_scaler,
    autocast_dtype_for,
    check_compile,
    parse_settings,
    pick_device,
    setting,
)
from loader import ShardLoader
from model import GPT, GPT2_SIZES, sample_next_token
from tokenizer import get_tokenizer

SECTIONS = ("matmul", "train", "optimizer", "ddp", "data", "sample", "hellaswag", "fineweb")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("eager", "compiled")
PROMPT = "Hello, I'm a language model,"  # the prompt train_gpt2.py samples from
RECIPE_TOKENS = train_gpt2.TrainConfig.total_batch_size  # 524,288 tokens a step: the recipe's batch
POSITIVE, NOT_NEGATIVE = "be positive", "not be negative"

# -----------------------------------------------------------------------------
# Config: one dataclass, one kebab-case flag per field; a preset changes defaults only


def int_or_auto(text):
    return text if text == "auto" else int(text)


@dataclass
class BenchConfig:
    preset: str = setting(
        None, "tiny settings: 'demo' (train_gpt2.py --demo's model) or 'test' (seconds)", choices=["demo", "test"]
    )
    model: str = setting("gpt2", "GPT-2 size", choices=list(GPT2_SIZES), section="the model and the training step")
    n_layer: int = setting(None, "override the size's number of layers")
    n_head: int = setting(None, "override the size's number of attention heads")
    n_embd: int = setting(None, "override the size's embedding width")
    block_size: int = setting(1024, "the model's longest sequence (learned positions)")
    vocab_size: int = setting(50304, "vocabulary size, padded as train_gpt2.py pads it")
    batch_size: int | str = setting(
        "auto",
        "micro batch size B; auto: the largest power of two up to 64 that fits on a GPU, 1 on CPU",
        type=int_or_auto,
    )
    seq_len: int = setting(1024, "sequence length T of a training step", must=POSITIVE)
    steps: int = setting(None, "timed training steps (default: 20 on a GPU, 3 on CPU)", must=POSITIVE)
    warmup_steps: int = setting(
        None, "untimed steps first, compilation included (default: 5 on a GPU, 1 on CPU)", must=POSITIVE
    )
    dtypes: str = setting(
        "float32,bfloat16",
        "comma-separated: float32, bfloat16 and/or float16 (autocast; float16 with a gradient scaler)",
    )
    modes: str = setting("eager,compiled", "comma-separated: eager and/or compiled (torch.compile)")
    sections: str = setting(",".join(SECTIONS), "comma-separated sections to run", section="what else to measure")
    matmul_size: int = setting(
        None, "side of the ceiling's square matmul (default: 8192 on a GPU, 3072 on CPU)", must=POSITIVE
    )
    ddp_processes: int = setting(2, "ranks of the ddp section (gloo on CPU, one GPU each on CUDA)")
    ddp_bucket_mb: str = setting("25,100", "comma-separated DDP bucket_cap_mb values to compare (25: DDP's own)")
    data_tokens: int = setting(4_194_304, "tokens of the data section's shards (Python's manual, repeated)")
    data_shard_tokens: int = setting(524_288, "tokens per shard of the data section", must=POSITIVE)
    data_batch_size: int = setting(64, "micro batch of the data section (64 x 1024: a rank's step on 8 H100s)")
    data_seq_len: int = setting(1024, "sequence length of the data section", must=POSITIVE)
    data_batches: int = setting(20, "micro batches timed each way in the data section", must=POSITIVE)
    data_step_ms: float = setting(
        170.0, "the step simulated between micro batches (124M on 8 H100s)", must=NOT_NEGATIVE
    )
    max_new_tokens: int = setting(
        512,
        "tokens sampled with and without the KV cache (without it, every token "
        "runs the whole window: minutes for 124M on a CPU)",
        must=POSITIVE,
    )
    hellaswag_file: str = setting(
        None, "local HellaSwag .jsonl (default: examples built from the Python docs' sentences)"
    )
    hellaswag_examples: int = setting(
        None, "HellaSwag examples to score each way (default: 512 on a GPU, 64 on CPU)", must=POSITIVE
    )
    hellaswag_batch_size: int = setting(
        None,
        "examples per forward pass of the batched HellaSwag run (default: "
        "64 on a GPU, which one small batch leaves idle; 16 on CPU)",
        must=POSITIVE,
    )
    fineweb_documents: int = setting(
        0,
        "documents to tokenize in the fineweb section (0: the Python docs, 15 x --num-proc times)",
        must=NOT_NEGATIVE,
    )
    num_proc: int = setting(None, "tokenizer processes of the fineweb section (default: every core)", must=POSITIVE)
    device: str = setting("auto", "cpu, cuda, cuda:N, mps, or auto for cuda > mps > cpu", section="the machine")
    peak_flops: float = setting(
        None,
        "the device's peak FLOP/s for MFU (default: common.py's table of dense peaks by GPU and dtype; none on CPU)",
        must=POSITIVE,
    )
    profile: bool = setting(True, "after timing, profile one step: which attention kernels ran")
    json: bool = setting(False, "print one JSON object instead of tables")

    def problems(self):
        """The settings that cannot work together, as readable strings (problems_of checks each one alone)."""
        found = [
            f"--{name.replace('_', '-')} {value} must be one of {', '.join(allowed)}"
            for name, allowed in (("dtypes", DTYPES), ("modes", MODES), ("sections", SECTIONS))
            for value in split(getattr(self, name))
            if value not in allowed
        ]
        found += [
            f"--{name.replace('_', '-')} must name at least one value"
            for name in ("dtypes", "modes", "sections")
            if not split(getattr(self, name))
        ]
        found += [
            f"{problem} (--n-layer/--n-head/--n-embd/--block-size/--vocab-size)"
            for problem in train_gpt2.model_config(self).problems()
        ]
        if self.batch_size != "auto" and self.batch_size <= 0:
            found.append(f"--batch-size {self.batch_size} must be positive (or auto)")
        if self.seq_len > self.block_size:
            found.append(f"--seq-len {self.seq_len} is over --block-size {self.block_size}")
        prompt_len = len(get_tokenizer().encode_ordinary(PROMPT))
        if "sample" in split(self.sections) and prompt_len + self.max_new_tokens > self.block_size:
            found.append(
                f"--max-new-tokens {self.max_new_tokens} plus the {prompt_len}-token prompt is over "
                f"--block-size {self.block_size}; past it the cache is not used, "
                "so there is nothing to compare"
            )
        if self.ddp_processes < 2:
            found.append(f"--ddp-processes {self.ddp_processes} must be at least 2: DDP needs ranks to talk to")
        if not all(value.isdigit() and int(value) > 0 for value in split(self.ddp_bucket_mb) or ["none"]):
            found.append(f"--ddp-bucket-mb {self.ddp_bucket_mb} must be positive whole megabytes, e.g. 25,100")
        train_tokens = self.data_tokens - self.data_shard_tokens  # the first shard is the val split
        if "data" in split(self.sections) and train_tokens <= self.data_batch_size * self.data_seq_len:
            found.append(
                f"--data-tokens {self.data_tokens} leaves {train_tokens} tokens after the val shard of "
                f"--data-shard-tokens {self.data_shard_tokens}: fewer than one micro batch of "
                f"--data-batch-size {self.data_batch_size} x --data-seq-len {self.data_seq_len} (+1)"
            )
        if self.data_batch_size <= 0:
            found.append(f"--data-batch-size {self.data_batch_size} must be positive")
        if self.hellaswag_file is not None and not os.path.isfile(self.hellaswag_file):
            found.append(
                f"--hellaswag-file {self.hellaswag_file} is not a file; give a HellaSwag .jsonl "
                f"or leave the flag out to use examples built from the Python docs"
            )
        try:
            pick_device(self.device)  # the same devices as training, the same messages
        except UserError as e:
            found.append(str(e))
        return found


def demo_preset():
    """train_gpt2.py --demo's model at its batch shape, from the file --demo reads."""
    with open(train_gpt2.DEMO_CONFIG, "rb") as f:
        demo = tomllib.load(f)
    return {k: demo[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "seq_len")}


# Presets change defaults; flags given on the command line still win.
PRESETS = {
    "demo": lambda: demo_preset() | dict(max_new_tokens=128),
    # Seconds on 2 CPU cores: a 2-layer GPT, 2 steps, small matmuls, few tokens, examples, documents, shards.
    "test": lambda: dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        batch_size=2,
        seq_len=64,
        steps=2,
        warmup_steps=1,
        matmul_size=256,
        max_new_tokens=24,
        hellaswag_examples=8,
        hellaswag_batch_size=4,
        fineweb_documents=40,
        num_proc=1,
        data_tokens=20_000,
        data_shard_tokens=4096,
        data_batch_size=4,
        data_seq_len=64,
        data_batches=3,
        data_step_ms=5.0,
    ),
}


def preset_flags(given):
    """A preset's settings as the flags that say the same: they come before the flags given, which win."""
    if given.get("preset") is None:
        return []
    return [f"--{key.replace('_', '-')}={value}" for key, value in PRESETS[given["preset"]]().items()]


def split(values):
    return [v.strip() for v in values.split(",") if v.strip()]


def parse_args(argv=None):
    description = "Measure GPT-2 training, its optimizer, DDP, data, sampling, HellaSwag and tokenizing speed."
    return parse_settings(BenchConfig, argv, description, preset_flags)


def log(message):
    print(message, file=sys.stderr, flush=True)  # progress on stderr: stdout stays clean for --json


# -----------------------------------------------------------------------------
# Measuring: time on a synchronized device, peak memory, the matmul ceiling


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device):
    """Seconds fn() takes, the device's queued work included (GPU kernels run asynchronously)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS


def peak_memory(device):
    """(bytes, what they are) since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    if os.path.exists("/proc/self/status"):
        return proc_status_bytes("VmHWM"), "process peak RSS"
    import resource  # not on Linux: the lifetime peak, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "process peak RSS (lifetime)"


def memory_in_use(device):
    """Bytes in use now, the baseline of a peak: CUDA's allocated memory, else the RSS (Linux; 0 elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return proc_status_bytes("VmRSS") if os.path.exists("/proc/self/status") else 0


def proc_status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def release_memory(device):
    """Forget compiled graphs (they hold their model) and hand freed memory back: the next measurement starts
    from an empty device (and, with glibc, from a process whose RSS is what it holds)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def return_freed_memory():
    """With glibc, give every block of 64 KiB or more its own memory map, returned when freed: the process's
    RSS then follows the tensors alive, and its peak is the peak of what a step holds (the ddp section's)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD, fixed (glibc raises it by itself)
    except (OSError, AttributeError):
        pass  # not glibc


class OtherLoad:
    """How many cores other processes kept busy while we measured (Linux; None elsewhere).

    A shared machine's neighbours take cores from the measurement: with this figure next to
    each row, a slow row on a busy machine is told apart from slow code."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        if not os.path.exists("/proc/stat"):
            return None
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
        ours = sum(os.times()[:4])  # this process and its finished children, user + system
        return busy / os.sysconf("SC_CLK_TCK"), ours, time.perf_counter()

    def cores(self):
        end = self._read()
        if end is None or self.start is None:
            return None
        busy, ours, wall = (b - a for a, b in zip(self.start, end))
        return max(0.0, (busy - ours) / wall)


class Matmul:
    """The ceiling: a square matmul of side n in the device's fastest path for that dtype."""

    def __init__(self, n, dtype, device):
        generator = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
        self.b = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
        self.out = torch.empty(n, n, dtype=dtype, device=device)
        self.flops = 2 * n**3
        self.nbytes = 3 * self.a.nbytes
        self.device = device
        # A GPU finishes one in about a millisecond: time several so the clock's overhead is noise.
        self.repeat = 1 if device.type == "cpu" else 10
        self.rep()  # warm-up: library initialisation and kernel selection stay out of the figures

    def rep(self):
        """FLOP/s of one timed repetition."""

        def run():
            for _ in range(self.repeat):
                torch.matmul(self.a, self.b, out=self.out)

        return self.repeat * self.flops / timed(run, self.device)


def bench_matmul(config, device, dtype_name, reps=5):
    n = config.matmul_size
    matmul = Matmul(n, DTYPES[dtype_name], device)
    load = OtherLoad()
    flops = [matmul.rep() for _ in range(reps)]
    return dict(
        dtype=dtype_name,
        size=n,
        reps=reps,
        flops_median=statistics.median(flops),
        flops_best=max(flops),
        other_load=load.cores(),
    )


# -----------------------------------------------------------------------------
# The training step


def text_tokens(count):
    """At least `count` GPT-2 tokens of real text: Python's reference manual, documents led by EOT."""
    pieces, total = [], 0
    for doc in itertools.cycle(fineweb.python_docs_documents()):  # a long batch cycles through the manual again
        if total >= count:
            break
        pieces.append(fineweb.tokenize_document(doc))  # [EOT] + tokens, as in the shards
        total += len(pieces[-1])
    return torch.from_numpy(np.concatenate(pieces)[:count].astype(np.int64))


class RepeatedBatch:
    """Stands in for loader.py's ShardLoader: the same real (x, y) batch every micro step, so no disk read is
    in the measurement (the data section measures the loader's)."""

    def __init__(self, tokens, batch_size, seq_len):
        window = tokens[: batch_size * seq_len + 1]
        self.x = window[:-1].view(batch_size, seq_len)  # (B, T)
        self.y = window[1:].view(batch_size, seq_len)  # (B, T): the next token of each position

    def next_batch(self):
        return self.x, self.y


def train_config(config, batch_size, dtype_name, mode, optimizer="adamw"):
    """train_gpt2.py's config for this measurement: the settings its train_step and model read."""
    sizes = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd")}
    return train_gpt2.TrainConfig(
        model=config.model,
        **sizes,
        block_size=config.block_size,
        vocab_size=config.vocab_size,
        batch_size=batch_size,
        seq_len=config.seq_len,
        total_batch_size=batch_size * config.seq_len,
        dtype=dtype_name,
        compile=mode == "compiled",
        device=config.device,
        peak_flops=config.peak_flops,
        optimizer=optimizer,
    )


def build_optimizers(raw_model, tc):
    """The optimizers by name, as train_gpt2.py builds them from its settings: AdamW, and Muon with --optimizer muon."""
    adamw = dict(weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps)
    muon = dict(momentum=tc.muon_momentum, weight_decay=tc.muon_weight_decay, ns_steps=tc.muon_ns_steps)
    optimizers, _ = raw_model.configure_optimizers(tc.max_lr, adamw, muon if tc.optimizer == "muon" else None)
    return optimizers


def device_peak_flops(config, device, dtype_name):
    """--peak-flops, or common.py's table on CUDA: none on CPU and MPS (no reliable number, so no MFU)."""
    if config.peak_flops or device.type != "cuda":
        return config.peak_flops
    return common.peak_flops_of(torch.cuda.get_device_name(device), dtype_name)


def batch_sizes(config, device):
    """The micro batch sizes to try, largest first."""
    if config.batch_size != "auto":
        return [config.batch_size]
    if device.type == "cuda":
        return [64, 32, 16, 8, 4, 2, 1]
    return [1]  # CPU and MPS: one row of 1024 tokens already keeps the cores busy for seconds


def largest_that_fits(config, device, what, measure):
    """measure(B) at the first of batch_sizes that does not run out of memory; a failed try's memory is given
    back before the next."""
    sizes = batch_sizes(config, device)
    for batch_size in sizes:
        try:
            row = measure(batch_size)
        except torch.OutOfMemoryError:
            row = None  # leaving the except block drops the traceback, and with it the failed try's tensors
        release_memory(device)
        if row is not None:
            if batch_size != sizes[0]:
                log(f"  batch size {batch_size * 2} does not fit; measured at {batch_size}")
            return row
    raise UserError(
        f"out of {device.type} memory at batch size {sizes[-1]} ({what}); pass a smaller --batch-size or --seq-len"
    )


def bench_train(config, device, dtype_name, mode, tokens):
    def measure(batch_size):
        return bench_train_at(config, device, dtype_name, mode, tokens, batch_size)

    return largest_that_fits(config, device, f"{dtype_name}, {mode}", measure)


def bench_train_at(config, device, dtype_name, mode, tokens, batch_size):
    tc = train_config(config, batch_size, dtype_name, mode)
    raw_model = train_gpt2.build_model(tc, device)
    optimizers = build_optimizers(raw_model, tc)
    model = torch.compile(raw_model) if tc.compile else raw_model
    autocast, scaler = autocast_and_scaler(dtype_name, device)
    loader = RepeatedBatch(tokens, batch_size, config.seq_len)
    matmul = Matmul(config.matmul_size, DTYPES[dtype_name], device)
    losses = []

    def step():  # exactly one optimizer step of train_gpt2.py with one micro step
        loss, *_ = train_gpt2.train_step(model, optimizers, loader, 1, tc.max_lr, tc, device, autocast, scaler)
        losses.append(loss)

    reset_peak_memory(device)
    first_step = timed(step, device)  # compiles, when compiled
    for _ in range(config.warmup_steps - 1):
        step()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    step_seconds, ceiling, load = [], [], OtherLoad()
    for _ in range(config.steps):
        step_seconds.append(timed(step, device))
        ceiling.append(matmul.rep())  # between the steps: the ceiling of this very moment
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    other_load = load.cores()
    memory, memory_kind = peak_memory(device)
    if device.type == "cuda":
        memory -= matmul.nbytes  # the ceiling's matrices are not the step's
    kernels = attention_kernels(step, device) if config.profile else None

    seconds = statistics.median(step_seconds)
    tokens_per_sec = batch_size * config.seq_len / seconds
    flops_per_token = raw_model.flops_per_token(config.seq_len)
    achieved = flops_per_token * tokens_per_sec
    peak = device_peak_flops(config, device, dtype_name)
    return dict(
        mode=mode,
        dtype=dtype_name,
        batch_size=batch_size,
        seq_len=config.seq_len,
        parameters=raw_model.num_parameters(),
        ms_per_step=1000 * seconds,
        ms_per_step_best=1000 * min(step_seconds),
        tokens_per_sec=tokens_per_sec,
        flops_per_token=flops_per_token,
        achieved_flops=achieved,
        peak_flops=peak,
        mfu=achieved / peak if peak else None,
        ceiling_flops=statistics.median(ceiling),
        ceiling_ratio=achieved / statistics.median(ceiling),
        first_step_s=first_step,
        recompiles=recompiles,
        peak_memory_bytes=memory,
        memory_kind=memory_kind,
        other_load=other_load,
        attention_kernels=kernels,
        first_loss=losses[0],
        grad_scale=scaler.get_scale() if scaler else None,
    )


def attention_kernels(step, device):
    """Names of the attention ops and GPU kernels one profiled step ran. The op names the backend
    SDPA picked (aten::_scaled_dot_product_flash_attention, ..._efficient_attention, ..._cudnn_attention,
    or the unfused ..._attention_math); on a GPU the kernel names show the flash kernel itself."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    pattern = re.compile(r"^aten::_scaled_dot_product|flash|fmha", re.IGNORECASE)
    return sorted(
        {
            event.key
            for event in profiler.key_averages()
            if pattern.search(event.key)
            and not event.key.startswith("autograd::")
            and not event.key.endswith("Backward0")
        }
    )


# -----------------------------------------------------------------------------
# The optimizer step: AdamW alone, and Muon + AdamW


def bench_optimizer(config, device, tokens):
    """A row for each of train_gpt2.py's --optimizer choices, in the dtype and mode a run here takes."""
    dtype_name = common.resolve_dtype("auto", device)
    mode = "compiled" if common.compile_by_default(device) else "eager"
    rows = []
    for optimizer in ("adamw", "muon"):
        log(f"optimizer {optimizer} ({dtype_name}, {mode}) ...")

        def measure(batch_size):
            return bench_optimizer_at(config, device, dtype_name, mode, tokens, batch_size, optimizer)

        rows.append(largest_that_fits(config, device, f"{optimizer}, {dtype_name}, {mode}", measure))
        log(f"  optimizer.step() {rows[-1]['optimizer_ms']:.1f} ms, {percent(rows[-1]['step_fraction'])} of a step")
    return rows


def bench_optimizer_at(config, device, dtype_name, mode, tokens, batch_size, optimizer):
    tc = train_config(config, batch_size, dtype_name, mode, optimizer)
    raw_model = train_gpt2.build_model(tc, device)
    optimizers = build_optimizers(raw_model, tc)
    model = torch.compile(raw_model) if tc.compile else raw_model
    autocast, scaler = autocast_and_scaler(dtype_name, device)
    loader = RepeatedBatch(tokens, batch_size, config.seq_len)

    def step():
        train_gpt2.train_step(model, optimizers, loader, 1, tc.max_lr, tc, device, autocast, scaler)

    for _ in range(config.warmup_steps):
        step()
    step_seconds = [timed(step, device) for _ in range(config.steps)]
    # train_step leaves this step's gradients in place (it clears them at the start of the next): step on them
    alone = {name: [timed(opt.step, device) for _ in range(config.steps)] for name, opt in optimizers.items()}
    optimizer_ms = {name: 1000 * statistics.median(seconds) for name, seconds in alone.items()}
    step_ms = 1000 * statistics.median(step_seconds)
    total_ms = sum(optimizer_ms.values())
    # The recipe's step is RECIPE_TOKENS / (B * T) micro steps over the ranks, and one optimizer step on each
    # rank (torch.optim.Muon runs the whole update on every rank): what share of it is the optimizer's?
    micro_steps = RECIPE_TOKENS / (batch_size * config.seq_len)
    recipe_fraction = {
        devices: total_ms / (max(micro_steps / devices, 1) * (step_ms - total_ms) + total_ms) for devices in (1, 8)
    }
    muon = optimizers.get("muon")
    muon_shapes = [tuple(p.shape) for group in muon.param_groups for p in group["params"]] if muon else []
    ns_flops = newton_schulz_flops(muon_shapes, tc.muon_ns_steps)
    parameters = {
        name: sum(p.numel() for g in opt.param_groups for p in g["params"]) for name, opt in optimizers.items()
    }
    return dict(
        optimizer=optimizer,
        dtype=dtype_name,
        mode=mode,
        batch_size=batch_size,
        seq_len=config.seq_len,
        parameters=parameters,
        step_ms=step_ms,
        optimizer_ms=total_ms,
        optimizer_ms_by_name=optimizer_ms,
        step_fraction=total_ms / step_ms,
        recipe_fraction_1_device=recipe_fraction[1],
        recipe_fraction_8_devices=recipe_fraction[8],
        muon_matrices=len(muon_shapes),
        newton_schulz_flops=ns_flops,
        # Muon runs Newton-Schulz in bfloat16, whatever the run's dtype: CPUs without bf16 units crawl
        newton_schulz_flops_per_sec=ns_flops / optimizer_ms["muon"] * 1000 if muon else None,
    )


def newton_schulz_flops(shapes, ns_steps):
    """Matmul FLOPs of ns_steps Newton-Schulz iterations on each matrix, as torch.optim._muon's
    _zeropower_via_newtonschulz computes them on X, m x n with m <= n (it transposes a tall matrix):
    A = X @ X.T is 2*m*m*n, addmm(A, A, A) multiplies A @ A, 2*m*m*m, and addmm(X, B, X) multiplies B @ X,
    2*m*m*n: 4*m*m*n + 2*m*m*m an iteration. Left out: the adds and scalings inside the addmms (m*m + m*n an
    iteration), the norm and the division before them, a fraction 1/m of the rest (0.1% at m = 768)."""
    total = 0
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += ns_steps * (4 * m * m * n + 2 * m * m * m)
    return total


def muon_arithmetic(model_config):
    """Newton-Schulz FLOPs of a Muon step on a model (its matrices as train_gpt2.py --optimizer muon splits
    them, found on the meta device: no memory) against a RECIPE_TOKENS step's 6 * parameters * tokens, on 1
    device and on 8, where a rank computes an eighth of the step but the whole Newton-Schulz."""
    tc = train_gpt2.TrainConfig(optimizer="muon")
    with torch.device("meta"):
        model = GPT(model_config)
        optimizers = build_optimizers(model, tc)
    shapes = [tuple(p.shape) for group in optimizers["muon"].param_groups for p in group["params"]]
    flops = newton_schulz_flops(shapes, tc.muon_ns_steps)
    step_flops = 6 * model.num_parameters() * RECIPE_TOKENS
    return dict(
        model=f"{model_config.n_layer} layers x {model_config.n_embd}",
        parameters=model.num_parameters(),
        matrices=len(shapes),
        ns_steps=tc.muon_ns_steps,
        newton_schulz_flops=flops,
        tokens=RECIPE_TOKENS,
        step_flops=step_flops,
        share_1_device=flops / step_flops,
        share_8_devices=flops / (step_flops / 8),
    )


# -----------------------------------------------------------------------------
# DDP: gradient_as_bucket_view and the bucket size, on ranks of their own


def bench_ddp(config, device):
    """The ddp rows from --ddp-processes ranks that this process starts under torch.distributed.run, with these
    settings (in a file: --config) and the ddp section alone. Rank 0 prints the JSON; stderr passes through."""
    if device.type != "cpu" and torch.cuda.device_count() < config.ddp_processes:
        log(f"ddp: skipped: {config.ddp_processes} ranks need as many GPUs (try --device cpu, or torchrun)")
        return []
    with tempfile.TemporaryDirectory() as directory:
        settings = os.path.join(directory, "bench.toml")
        common.write_settings(replace(config, sections="ddp", json=True, preset=None), settings)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={config.ddp_processes}", os.path.abspath(__file__), "--config", settings]
        threads = max(1, torch.get_num_threads() // config.ddp_processes)  # the cores shared out, as torchrun does
        environment = os.environ | {"OMP_NUM_THREADS": str(threads)}
        try:
            ranks = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment, timeout=3600)
        except subprocess.TimeoutExpired:
            raise UserError("the ddp section's ranks did not finish within an hour") from None
    if ranks.returncode != 0:
        raise UserError(f"the ddp section's ranks failed (exit code {ranks.returncode}); their messages are above")
    return json.loads(ranks.stdout)["ddp"]


def ddp_rows(config):
    """Under torchrun: a row for each mode x gradient_as_bucket_view x bucket size, train_gpt2.py's step on its
    DDP wrapper. The dtype is the one --dtype auto picks (float32 on CPU). Rank 0 gets the rows, the others []."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        return_freed_memory()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    batch_size = batch_sizes(config, device)[0]
    tokens = text_tokens(batch_size * config.seq_len + 1)
    dtype_name = common.resolve_dtype("auto", device)
    rows = []
    for mode in split(config.modes):
        # The first row of a mode would pay what a process pays once (gloo's buffers, autograd's threads, inductor's
        # caches) in its memory: an untimed row first.
        ddp_row(config, device, dtype_name, mode, batch_size, tokens, dict(gradient_as_bucket_view=False))
        for bucket_view in (False, True):
            for bucket_mb in map(int, split(config.ddp_bucket_mb)):
                if rank == 0:
                    log(
                        f"ddp {mode} {dtype_name}, gradient_as_bucket_view={bucket_view}, bucket_cap_mb={bucket_mb} ..."
                    )
                ddp_settings = dict(gradient_as_bucket_view=bucket_view, bucket_cap_mb=bucket_mb)
                rows.append(ddp_row(config, device, dtype_name, mode, batch_size, tokens, ddp_settings))
    dist.destroy_process_group()
    return rows if rank == 0 else []


def ddp_row(config, device, dtype_name, mode, batch_size, tokens, ddp_settings):
    release_memory(device)
    baseline = memory_in_use(device)
    reset_peak_memory(device)
    tc = train_config(config, batch_size, dtype_name, mode)
    raw_model = train_gpt2.build_model(tc, device)
    optimizers = build_optimizers(raw_model, tc)
    model = torch.compile(raw_model) if tc.compile else raw_model  # compiled, then wrapped: as train_gpt2.py does
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_settings)
    autocast, scaler = autocast_and_scaler(dtype_name, device)
    loader = RepeatedBatch(tokens, batch_size, config.seq_len)
    losses = []

    def step():
        loss, *_ = train_gpt2.train_step(ddp_model, optimizers, loader, 1, tc.max_lr, tc, device, autocast, scaler)
        losses.append(loss)

    first_step = timed(step, device)
    for _ in range(config.warmup_steps - 1):
        step()
    step_seconds = [timed(step, device) for _ in range(config.steps)]
    memory, memory_kind = peak_memory(device)
    held = memory_in_use(device) - baseline  # between steps: weights, gradients, buckets, AdamW's moments
    # DDP's promise, checked: every rank ends with the same weights (a float64 sum of them, gathered)
    weights = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().item()
    mine = (statistics.median(step_seconds), memory - baseline, held, weights)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return dict(
        mode=mode,
        dtype=dtype_name,
        **ddp_settings,
        world_size=dist.get_world_size(),
        backend=dist.get_backend(),
        batch_size=batch_size,
        seq_len=config.seq_len,
        ms_per_step=1000 * max(seconds for seconds, *_ in everyone),  # the slowest rank sets the pace
        first_step_s=first_step,
        peak_memory_bytes=max(memory for _, memory, *_ in everyone),
        held_memory_bytes=max(held for _, _, held, _ in everyone),
        memory_kind=f"{memory_kind} above the row's start, the largest rank's",
        gradient_bytes=sum(p.numel() * p.element_size() for p in raw_model.parameters()),
        first_loss=losses[0],
        ranks_agree=all(weights == everyone[0][-1] for *_, weights in everyone),
    )


# -----------------------------------------------------------------------------
# Data: how long a step waits for its next micro batch


def bench_data(config, device):
    """Rows of the wait for each micro batch: warm and cold page cache, each with loader.py's prefetch and with
    a synchronous read of the same rows. Shards of --data-shard-tokens, written into a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        log(f"data: writing {config.data_tokens:,} tokens of shards ...")
        documents = itertools.cycle(fineweb.python_docs_documents())
        fineweb.write_shards(
            documents, directory, "bench", config.data_shard_tokens, 1, config.data_tokens, progress=False
        )
        rows, batches = [], {}
        for cache in ("warm", "cold"):
            if cache == "cold" and not hasattr(os, "posix_fadvise"):
                log("data: cold page cache skipped: it needs posix_fadvise (Linux)")
                continue
            for read in ("prefetch", "sync"):
                log(f"data: {cache} page cache, {read} ...")
                waits, batches[cache, read], cached = wait_for_batches(config, device, directory, read, cache == "cold")
                gc.collect()  # the loader and its prefetch refer to each other: its memory maps go now, not later
                rows.append(
                    dict(
                        cache=cache,
                        read=read,
                        batch_size=config.data_batch_size,
                        seq_len=config.data_seq_len,
                        batches=len(waits),
                        step_ms=config.data_step_ms,
                        wait_ms_mean=1000 * statistics.mean(waits),
                        wait_ms_median=1000 * statistics.median(waits),
                        wait_ms_max=1000 * max(waits),
                        same_batches=batches[cache, read] == batches["warm", "prefetch"],
                        # mincore's count, None where unknown: all of the shards when warm, none when cold
                        cached_bytes_min=None if None in cached else min(cached),
                        cached_bytes_max=None if None in cached else max(cached),
                    )
                )
        train = ShardLoader(directory, "train", config.data_batch_size, config.data_seq_len)
        for row in rows:
            row.update(train_shards=len(train.paths), train_tokens=train.num_tokens, data_tokens=config.data_tokens)
            row.update(train_bytes=sum(os.path.getsize(path) for path in train.paths))
    return rows


def wait_for_batches(config, device, directory, read, cold):
    """-> (seconds each micro batch kept the step waiting, a checksum of each batch, the shards' bytes in the page
    cache before each read). The loader is train_gpt2.py's (shuffled, pinned memory on CUDA) on rank 0 of 1; a sync
    read takes read_rows of the rows next_batch takes."""
    B, T = config.data_batch_size, config.data_seq_len
    loader = ShardLoader(
        directory, "train", B, T, vocab_size=config.vocab_size, seed=0, pin_memory=device.type == "cuda"
    )
    if not cold:
        for path in loader.paths:  # every shard read once: in the page cache
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass

    def fetch(i):
        if read == "prefetch":
            return loader.next_batch()
        return loader.read_rows(range(i * B, (i + 1) * B))

    if cold:  # as in a run's first epoch over shards far larger than the kernel's read-ahead: every window cold
        evict(loader)
        for shard in loader.shards:
            shard.base.madvise(mmap.MADV_RANDOM)  # no read-ahead around a fault: each read finds only its own pages
    fetch(0)  # the first batch has nothing read ahead: a run waits for it once, not every step
    waits, checksums, cached = [], [], []
    for i in range(1, config.data_batches + 1):
        # What the next read finds in the page cache, probed before the step: its maps and unmaps of every shard
        # would otherwise land just before the timed read, and cost it a millisecond or two
        cached.append(page_cache_bytes(loader.paths))
        time.sleep(config.data_step_ms / 1000)  # the step, while the next batch is read on the loader's thread
        start = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in fetch(i))  # as train_step takes them
        waits.append(time.perf_counter() - start)
        checksums.append((x.sum().item(), y.sum().item()))
    return waits, checksums, cached


def page_cache_bytes(paths):
    """Bytes of the files in the page cache, by mincore(2) on a mapping of our own (None where there is none)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        with open(path, "rb") as f:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        try:
            if mincore(address, size, pages) != 0:
                return None
        finally:
            libc.munmap(address, size)
        total += min(size, sum(page & 1 for page in pages) * mmap.PAGESIZE)  # the last page may be partial
    return total


def evict(loader):
    """Drop the loader's shards from the page cache: first this process's mapping of their pages (the kernel
    keeps a page that a process maps), then the files' pages, as if never read."""
    for path, shard in zip(loader.paths, loader.shards):
        shard.base.madvise(mmap.MADV_DONTNEED)  # np.load's memory map: its base is the mmap
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------
# Sampling: the KV cache against the plain loop


@torch.no_grad()
def generate_without_cache(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
    """The reference for model.generate: the same sampling, but every new token runs the whole
    window (the last block_size tokens) through the model. Quadratic work; no cache to get wrong."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, sample_next_token(logits[:, -1, :], temperature, top_k, generator)), dim=1)
    return idx


def bench_sample(config, device, model):
    prompt = torch.tensor([get_tokenizer().encode_ordinary(PROMPT)], device=device)  # (1, T0)
    n = config.max_new_tokens
    outputs, seconds = {}, {}
    dtype = autocast_dtype_for("auto", device)  # as train_gpt2.py's --dtype auto samples
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model.generate(prompt, 2, top_k=1)  # warm-up
        for name, sample in (
            ("kv_cache", model.generate),
            ("no_cache", lambda *a, **k: generate_without_cache(model, *a, **k)),
        ):
            generator = torch.Generator(device=device).manual_seed(0)

            def run():
                outputs[name] = sample(prompt, n, top_k=1, generator=generator)

            seconds[name] = timed(run, device)
    # Greedy tokens agree exactly in float32 (tests/test_model.py checks it). Under bf16 autocast
    # the two paths run different kernels that round differently, and a random model's flat
    # logits have near-ties that may then go either way: so count how many tokens agree.
    differ = (outputs["kv_cache"][0] != outputs["no_cache"][0]).nonzero()
    matching = int(differ[0]) - prompt.size(1) if len(differ) else n
    return dict(
        batch_size=1,
        prompt_tokens=prompt.size(1),
        new_tokens=n,
        kv_cache_tokens_per_sec=n / seconds["kv_cache"],
        no_cache_tokens_per_sec=n / seconds["no_cache"],
        speedup=seconds["no_cache"] / seconds["kv_cache"],
        matching_tokens=matching,
    )


# -----------------------------------------------------------------------------
# HellaSwag: batched against one example at a time


def examples_from_text(count):
    """HellaSwag-format examples from the Python docs' sentences (offline, real text): the context
    is a sentence's first half, the right ending its second half, the wrong ones the second halves
    of the next three sentences; the label cycles 0-3."""
    sentences = []
    for doc in fineweb.python_docs_documents():
        for sentence in re.split(r"(?<=\.)\s+", " ".join(doc.split())):
            words = sentence.split()
            if 8 <= len(words) <= 30:
                sentences.append(words)
    halves = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])) for w in sentences]
    examples = []
    for i in range(min(count, len(halves) - 3)):
        endings = [halves[i + k][1] for k in (1, 2, 3)]
        label = i % 4
        endings.insert(label, halves[i][1])
        examples.append({"ctx": halves[i][0], "endings": endings, "label": label})
    return examples


def bench_hellaswag(config, device, model):
    if config.hellaswag_file:
        try:
            examples = hellaswag.load_examples(config.hellaswag_file)[: config.hellaswag_examples]
        except UserError as e:
            raise UserError(f"{e}; fix the file or leave --hellaswag-file out") from None
        source = config.hellaswag_file
    else:
        examples, source = examples_from_text(config.hellaswag_examples), "built from the Python docs' sentences"
    dtype = autocast_dtype_for("auto", device)  # as train_gpt2.py's --dtype auto scores
    batch_size = config.hellaswag_batch_size
    hellaswag.evaluate(model, examples[:batch_size], device, batch_size, autocast_dtype=dtype)  # warm-up
    results, seconds = {}, {}
    for name, size in (("batched", batch_size), ("single", 1)):

        def run():
            results[name] = hellaswag.evaluate(model, examples, device, size, autocast_dtype=dtype)

        seconds[name] = timed(run, device)
    losses = [torch.tensor([p["losses"] for p in results[name]["predictions"]]) for name in ("batched", "single")]
    return dict(
        source=source,
        examples=len(examples),
        batch_size=batch_size,
        batched_examples_per_sec=len(examples) / seconds["batched"],
        single_examples_per_sec=len(examples) / seconds["single"],
        speedup=seconds["single"] / seconds["batched"],
        max_loss_difference=(losses[0] - losses[1]).abs().max().item(),
    )


# -----------------------------------------------------------------------------
# Tokenizing: fineweb.py against tiktoken alone


def python_docs_repeated(num_proc):
    """Python's reference manual, repeated so the measurement takes several seconds on any machine
    (once through, process start-up would dominate)."""
    return fineweb.python_docs_documents() * (15 * num_proc)


_ceiling_texts = None  # the texts, inside each ceiling worker


def _ceiling_init(texts):
    global _ceiling_texts
    _ceiling_texts = texts
    get_tokenizer()


def _ceiling_count(span):
    encode = get_tokenizer().encode_to_numpy  # tiktoken's fastest call, the one fineweb.tokenize_document makes
    return sum(len(encode(text, disallowed_special=())) for text in _ceiling_texts[span[0] : span[1]])


def _time_write_shards(documents, num_proc):
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        paths = fineweb.write_shards(documents, output_dir, "bench", 100_000_000, num_proc, progress=False)
        seconds = time.perf_counter() - start
        return seconds, sum(np.load(path, mmap_mode="r").size for path in paths)


def _time_ceiling(documents, num_proc):
    with ProcessPoolExecutor(num_proc, initializer=_ceiling_init, initargs=(documents,)) as pool:
        list(pool.map(_ceiling_count, [(0, 0)] * num_proc))  # workers up, tokenizer loaded
        spans = [(i, i + fineweb.CHUNK_DOCS) for i in range(0, len(documents), fineweb.CHUNK_DOCS)]
        start = time.perf_counter()
        tokens = sum(pool.map(_ceiling_count, spans)) + len(documents)  # + one EOT each
        return time.perf_counter() - start, tokens


def bench_fineweb(config, repeats=3):
    """fineweb.write_shards on the documents (into a temporary directory) against the ceiling: tiktoken
    alone over the same texts in as many processes, which already hold them (no reading, no messages
    between processes, no writing). Each is timed `repeats` times, alternating, and the fastest run
    counts: other load on the machine only ever slows a run down."""
    num_proc = config.num_proc or fineweb.CORES
    documents = python_docs_repeated(num_proc)[: config.fineweb_documents or None]
    runs, ceiling_runs = [], []
    try:
        for _ in range(repeats):
            runs.append(_time_write_shards(documents, num_proc))
            ceiling_runs.append(_time_ceiling(documents, num_proc))
    except UserError as e:
        raise UserError(f"fineweb benchmark failed: {e}") from None
    (seconds, tokens), (ceiling_seconds, ceiling_tokens) = min(runs), min(ceiling_runs)
    if ceiling_tokens != tokens:
        raise UserError(f"fineweb wrote {tokens} tokens where tiktoken alone counts {ceiling_tokens}")
    return dict(
        source="Python docs",
        documents=len(documents),
        tokens=tokens,
        num_proc=num_proc,
        seconds=seconds,
        tokens_per_sec=tokens / seconds,
        ceiling_seconds=ceiling_seconds,
        ceiling_tokens_per_sec=tokens / ceiling_seconds,
        ratio=ceiling_seconds / seconds,
    )


# -----------------------------------------------------------------------------
# Output: tables for people, one JSON object for scripts


def si(value, unit=""):
    """1234567 -> '1.23M'; None -> '-'."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def load(cores):
    return "-" if cores is None else f"{cores:.2f}"


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}%"


TABLES = {  # section -> [(column title, how to show a row's value)]
    "matmul": [
        ("dtype", lambda r: r["dtype"]),
        ("size", lambda r: f"{r['size']}^2"),
        ("FLOP/s median", lambda r: si(r["flops_median"])),
        ("FLOP/s best", lambda r: si(r["flops_best"])),
        ("others' cores", lambda r: load(r["other_load"])),
    ],
    "train": [
        ("mode", lambda r: r["mode"]),
        ("dtype", lambda r: r["dtype"]),
        ("B x T", lambda r: f"{r['batch_size']} x {r['seq_len']}"),
        ("ms/step", lambda r: f"{r['ms_per_step']:.1f}"),
        ("tokens/s", lambda r: si(r["tokens_per_sec"])),
        ("FLOP/s", lambda r: si(r["achieved_flops"])),
        ("MFU", lambda r: percent(r["mfu"])),
        ("ceiling", lambda r: si(r["ceiling_flops"])),
        ("of ceiling", lambda r: percent(r["ceiling_ratio"])),
        ("1st step", lambda r: f"{r['first_step_s']:.1f}s"),
        ("recompiles", lambda r: str(r["recompiles"])),
        ("peak memory", lambda r: si(r["peak_memory_bytes"], "B")),
        ("others' cores", lambda r: load(r["other_load"])),
    ],
    "optimizer": [
        ("optimizer", lambda r: r["optimizer"]),
        ("dtype", lambda r: r["dtype"]),
        ("mode", lambda r: r["mode"]),
        ("B x T", lambda r: f"{r['batch_size']} x {r['seq_len']}"),
        ("ms/step", lambda r: f"{r['step_ms']:.1f}"),
        ("AdamW ms", lambda r: f"{r['optimizer_ms_by_name']['optimizer']:.1f}"),
        (
            "Muon ms",
            lambda r: f"{r['optimizer_ms_by_name']['muon']:.1f}" if "muon" in r["optimizer_ms_by_name"] else "-",
        ),
        ("NS FLOP/s", lambda r: si(r["newton_schulz_flops_per_sec"])),
        ("of the step", lambda r: percent(r["step_fraction"])),
        (f"of {RECIPE_TOKENS:,} tokens, 1 device", lambda r: percent(r["recipe_fraction_1_device"])),
        ("8 devices", lambda r: percent(r["recipe_fraction_8_devices"])),
    ],
    "muon_arithmetic": [
        ("model", lambda r: r["model"]),
        ("parameters", lambda r: f"{r['parameters']:,}"),
        ("Muon matrices", lambda r: str(r["matrices"])),
        ("NS iterations", lambda r: str(r["ns_steps"])),
        ("NS FLOP", lambda r: si(r["newton_schulz_flops"])),
        (f"6 x params x {RECIPE_TOKENS:,}", lambda r: si(r["step_flops"])),
        ("share, 1 device", lambda r: f"{100 * r['share_1_device']:.2f}%"),
        ("8 devices", lambda r: f"{100 * r['share_8_devices']:.2f}%"),
    ],
    "ddp": [
        ("mode", lambda r: r["mode"]),
        ("dtype", lambda r: r["dtype"]),
        ("bucket view", lambda r: str(r["gradient_as_bucket_view"])),
        ("bucket MB", lambda r: str(r["bucket_cap_mb"])),
        ("ranks", lambda r: f"{r['world_size']} {r['backend']}"),
        ("B x T", lambda r: f"{r['batch_size']} x {r['seq_len']}"),
        ("ms/step", lambda r: f"{r['ms_per_step']:.1f}"),
        ("peak memory", lambda r: si(r["peak_memory_bytes"], "B")),
        ("held between steps", lambda r: si(r["held_memory_bytes"], "B")),
        ("gradients", lambda r: si(r["gradient_bytes"], "B")),
        ("same weights", lambda r: "yes" if r["ranks_agree"] else "NO"),
    ],
    "data": [
        ("cache", lambda r: r["cache"]),
        ("read", lambda r: r["read"]),
        ("B x T", lambda r: f"{r['batch_size']} x {r['seq_len']}"),
        ("batches", lambda r: str(r["batches"])),
        ("step ms", lambda r: f"{r['step_ms']:.0f}"),
        ("wait ms mean", lambda r: f"{r['wait_ms_mean']:.3f}"),
        ("median", lambda r: f"{r['wait_ms_median']:.3f}"),
        ("max", lambda r: f"{r['wait_ms_max']:.3f}"),
        ("same batches", lambda r: "yes" if r["same_batches"] else "NO"),
        (
            "in page cache",
            lambda r: "-" if r["cached_bytes_max"] is None else percent(r["cached_bytes_max"] / r["train_bytes"]),
        ),
        ("train shards", lambda r: str(r["train_shards"])),
    ],
    "sample": [
        ("new tokens", lambda r: str(r["new_tokens"])),
        ("KV cache tok/s", lambda r: f"{r['kv_cache_tokens_per_sec']:.1f}"),
        ("no cache tok/s", lambda r: f"{r['no_cache_tokens_per_sec']:.1f}"),
        ("speed-up", lambda r: f"{r['speedup']:.1f}x"),
        ("same tokens", lambda r: f"{r['matching_tokens']}/{r['new_tokens']}"),
    ],
    "hellaswag": [
        ("examples", lambda r: str(r["examples"])),
        ("batch", lambda r: str(r["batch_size"])),
        ("batched ex/s", lambda r: f"{r['batched_examples_per_sec']:.2f}"),
        ("1 at a time ex/s", lambda r: f"{r['single_examples_per_sec']:.2f}"),
        ("speed-up", lambda r: f"{r['speedup']:.1f}x"),
        ("source", lambda r: r["source"]),
    ],
    "fineweb": [
        ("tokens", lambda r: str(r["tokens"])),
        ("processes", lambda r: str(r["num_proc"])),
        ("fineweb.py tok/s", lambda r: si(r["tokens_per_sec"])),
        ("tiktoken tok/s", lambda r: si(r["ceiling_tokens_per_sec"])),
        ("of ceiling", lambda r: percent(r["ratio"])),
    ],
}


def print_tables(result):
    meta = result["meta"]
    print(
        f"{meta['date']}  {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cores']} cores, load average {meta['load_average']}"
    )
    print(f"model {meta['model']}: {meta['parameters']:,} parameters, {meta['model_config']}")
    for section, columns in TABLES.items():
        rows = [[show(row) for _, show in columns] for row in result.get(section, [])]
        if not rows:
            continue
        titles = [title for title, _ in columns]
        widths = [max(len(cell) for cell in column) for column in zip(titles, *rows)]
        print(f"\n{section}")
        for cells in [titles, *rows]:
            print("  ".join(cell.rjust(width) for cell, width in zip(cells, widths)))
        if section == "train" and any(r["attention_kernels"] for r in result[section]):
            for r in result[section]:
                print(f"  attention ops, {r['mode']} {r['dtype']}: {', '.join(r['attention_kernels']) or '-'}")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# -----------------------------------------------------------------------------


def run(config):
    """The sections' rows by section, and "meta": the machine and the settings. Under torchrun: the ddp section
    alone, its rows on rank 0 (None on the others)."""
    device = pick_device(config.device)
    gpu = device.type == "cuda"
    # Device-dependent defaults, filled in once so the output says what ran.
    defaults = dict(
        steps=20 if gpu else 3,
        warmup_steps=5 if gpu else 1,
        matmul_size=8192 if gpu else 3072,
        hellaswag_examples=512 if gpu else 64,
        hellaswag_batch_size=64 if gpu else 16,
    )
    for key, value in defaults.items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if gpu:
        torch.set_float32_matmul_precision("high")  # TF32, as train_gpt2.py runs float32 matmuls
    under_torchrun = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if device.type == "cpu" and not under_torchrun:
        common.keep_freed_memory()  # as train_gpt2.py does on CPU: the sections measure the code, not glibc
    sections, dtypes, modes = split(config.sections), split(config.dtypes), split(config.modes)
    if "compiled" in modes:
        check_compile(device)  # one line naming what to install, not a traceback from the first compiled row

    result = {
        "meta": dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=str(device),
            device_name=device_name(device),
            torch=torch.__version__,
            python=platform.python_version(),
            threads=torch.get_num_threads(),
            cores=os.cpu_count(),
            load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            model=config.model,
            model_config=asdict(train_gpt2.model_config(config)),
            config=asdict(config),
        )
    }
    with torch.device("meta"):  # shapes only: counting parameters allocates nothing
        result["meta"]["parameters"] = GPT(train_gpt2.model_config(config)).num_parameters()
    if under_torchrun:
        rows = ddp_rows(config)
        return result | {"ddp": rows} if int(os.environ["RANK"]) == 0 else None

    if "matmul" in sections:
        result["matmul"] = []
        for dtype_name in dtypes:
            log(f"matmul {dtype_name} {config.matmul_size}^2 ...")
            result["matmul"].append(bench_matmul(config, device, dtype_name))
    tokens = None
    if "train" in sections or "optimizer" in sections:
        tokens = text_tokens(max(batch_sizes(config, device)) * config.seq_len + 1)
    if "train" in sections:
        result["train"] = []
        for mode in modes:
            for dtype_name in dtypes:
                log(f"train {mode} {dtype_name} ...")
                row = bench_train(config, device, dtype_name, mode, tokens)
                log(
                    f"  {row['ms_per_step']:.1f} ms/step, {row['tokens_per_sec']:,.0f} tokens/s, "
                    f"{percent(row['ceiling_ratio'])} of the matmul ceiling, MFU {percent(row['mfu'])}"
                )
                result["train"].append(row)
    if "optimizer" in sections:
        result["optimizer"] = bench_optimizer(config, device, tokens)
        measured, gpt2_124m = train_gpt2.model_config(config), train_gpt2.model_config(train_gpt2.TrainConfig())
        result["muon_arithmetic"] = [muon_arithmetic(measured)]
        if measured != gpt2_124m:  # and the model the issue asks about
            result["muon_arithmetic"].append(muon_arithmetic(gpt2_124m))
    if "ddp" in sections:
        log(f"ddp on {config.ddp_processes} ranks under torch.distributed.run ...")
        result["ddp"] = bench_ddp(config, device)
    if "data" in sections:
        result["data"] = bench_data(config, device)
    if "sample" in sections or "hellaswag" in sections:
        torch.manual_seed(0)
        model = GPT(train_gpt2.model_config(config)).to(device).eval()  # built after training: not in its peak memory
    if "sample" in sections:
        log(f"sample {config.max_new_tokens} tokens with and without the KV cache ...")
        result["sample"] = [bench_sample(config, device, model)]
        log(f"  KV cache {result['sample'][0]['speedup']:.1f}x faster")
    if "hellaswag" in sections:
        log(f"hellaswag {config.hellaswag_examples} examples, batched and one at a time ...")
        result["hellaswag"] = [bench_hellaswag(config, device, model)]
        log(f"  batched {result['hellaswag'][0]['speedup']:.1f}x faster")
    if "fineweb" in sections:
        log("fineweb tokenizing against tiktoken ...")
        result["fineweb"] = [bench_fineweb(config)]
    return result


def main(argv=None):
    try:
        config = parse_args(argv)
        result = run(config)
    except UserError as e:
        print(f"bench.py: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if result is None:  # a rank of the ddp section other than 0: rank 0 prints
        return 0
    if config.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    exit_code = main()
    if "RANK" in os.environ:
        # Under torchrun, leave without the interpreter's clean-up, as train_gpt2.py does: DDP keeps gloo's
        # threads alive to the end, and one that frees a tensor during shutdown aborts the process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
