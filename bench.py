"""What GPT-2 costs to train and to run here: measured figures anyone can re-run.

    python bench.py                                   # GPT-2 124M, T=1024, every section
    python bench.py --sections train --dtypes bfloat16 --modes compiled   # the GPU headline
    python bench.py --preset demo                     # train_gpt2.py --demo's small GPT
    python bench.py --json > bench.json               # one JSON object, for scripts
    python bench.py --preset test --json              # a few seconds: what tests/test_bench.py runs

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

import datetime
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

import fineweb
import hellaswag
import train_gpt2
from common import (
    UserError,
    autocast_and_scaler,
    autocast_dtype_for,
    free_memory,
    int_or_auto,
    keep_freed_memory,
    parse_settings,
    pick_device,
    setting,
    synchronize,
)
from model import GPT, GPT2_SIZES, sample_next_token
from tokenizer import get_tokenizer

SECTIONS = ("matmul", "train", "sample", "hellaswag", "fineweb")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("eager", "compiled")
PROMPT = "Hello, I'm a language model,"  # the prompt train_gpt2.py samples from

# -----------------------------------------------------------------------------
# Config: one dataclass, one kebab-case flag per field; a preset changes defaults only


@dataclass
class BenchConfig:
    preset: str = setting(
        None,
        "tiny settings: 'demo' (train_gpt2.py --demo's model) or 'test' (seconds)",
        type=str,
        choices=["demo", "test"],
    )
    # the model and the training step
    model: str = setting("gpt2", "GPT-2 size", choices=list(GPT2_SIZES))
    n_layer: int = setting(None, "override the size's number of layers", type=int)
    n_head: int = setting(None, "override the size's number of attention heads", type=int)
    n_embd: int = setting(None, "override the size's embedding width", type=int)
    block_size: int = setting(1024, "the model's longest sequence (learned positions)")
    vocab_size: int = setting(50304, "vocabulary size, padded as train_gpt2.py pads it")
    batch_size: int | str = setting(
        "auto",
        "micro batch size B; auto: the largest power of two up to 64 that fits on a GPU, 1 on CPU",
        type=int_or_auto,
    )
    seq_len: int = setting(1024, "sequence length T of a training step")
    steps: int = setting(None, "timed training steps (default: 20 on a GPU, 3 on CPU)", type=int)
    warmup_steps: int = setting(
        None, "untimed steps first, compilation included (default: 5 on a GPU, 1 on CPU)", type=int
    )
    dtypes: str = setting(
        "float32,bfloat16",
        "comma-separated: float32, bfloat16 and/or float16 (autocast; float16 with a gradient scaler)",
    )
    modes: str = setting("eager,compiled", "comma-separated: eager and/or compiled (torch.compile)")
    # what else to measure
    sections: str = setting(",".join(SECTIONS), "comma-separated sections to run")
    matmul_size: int = setting(
        None, "side of the ceiling's square matmul (default: 8192 on a GPU, 3072 on CPU)", type=int
    )
    max_new_tokens: int = setting(
        512,
        "tokens sampled with and without the KV cache (without it, every token "
        "runs the whole window: minutes for 124M on a CPU)",
    )
    hellaswag_file: str = setting(
        None, "local HellaSwag .jsonl (default: examples built from the Python docs' sentences)", type=str
    )
    hellaswag_examples: int = setting(
        None, "HellaSwag examples to score each way (default: 512 on a GPU, 64 on CPU)", type=int
    )
    hellaswag_batch_size: int = setting(
        None,
        "examples per forward pass of the batched HellaSwag run (default: "
        "64 on a GPU, which one small batch leaves idle; 16 on CPU)",
        type=int,
    )
    fineweb_documents: int = setting(
        0, "documents to tokenize in the fineweb section (0: the Python docs, 15 x --num-proc times)"
    )
    num_proc: int = setting(None, "tokenizer processes of the fineweb section (default: every core)", type=int)
    # the machine and the output
    device: str = setting("auto", "cpu, cuda, cuda:N, mps, or auto for cuda > mps > cpu")
    peak_flops: float = setting(
        None,
        "the device's peak FLOP/s for MFU (default: train_gpt2.py's "
        "table of dense peaks by GPU and dtype; none on CPU)",
        type=float,
    )
    profile: bool = setting(True, "after timing, profile one step: which attention kernels ran")
    json: bool = setting(False, "print one JSON object instead of tables")

    def problems(self):
        """Every value that cannot work, as readable strings (empty when the config is fine)."""
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
        positive = ["seq_len", "max_new_tokens"]
        optional_positive = [
            "steps",
            "matmul_size",
            "hellaswag_examples",
            "hellaswag_batch_size",
            "num_proc",
            "peak_flops",
        ] + ["batch_size"] * (self.batch_size != "auto")
        found += [
            f"--{k.replace('_', '-')} {getattr(self, k)} must be positive" for k in positive if getattr(self, k) <= 0
        ]
        found += [
            f"--{k.replace('_', '-')} {getattr(self, k)} must be positive"
            for k in optional_positive
            if getattr(self, k) is not None and getattr(self, k) <= 0
        ]
        found += [
            f"--{k.replace('_', '-')} {getattr(self, k)} must not be negative"
            for k in ("fineweb_documents",)
            if getattr(self, k) < 0
        ]
        if self.warmup_steps is not None and self.warmup_steps < 1:
            found.append(f"--warmup-steps {self.warmup_steps} must be at least 1 (the first step compiles)")
        if self.seq_len > self.block_size:
            found.append(f"--seq-len {self.seq_len} is over --block-size {self.block_size}")
        prompt_len = len(get_tokenizer().encode_ordinary(PROMPT))
        if "sample" in split(self.sections) and prompt_len + self.max_new_tokens > self.block_size:
            found.append(
                f"--max-new-tokens {self.max_new_tokens} plus the {prompt_len}-token prompt is over "
                f"--block-size {self.block_size}; past it the cache is not used, "
                "so there is nothing to compare"
            )
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


# Presets change defaults; flags given on the command line still win.
PRESETS = {
    # The small GPT that `train_gpt2.py --demo` trains on CPU, at its batch shape.
    "demo": {
        k: train_gpt2.DEMO_DEFAULTS[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "seq_len")
    }
    | dict(max_new_tokens=128),
    # Seconds on 2 CPU cores: a 2-layer GPT, 2 steps, small matmuls, few tokens, examples, documents.
    "test": dict(
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
    ),
}


def split(values):
    return [v.strip() for v in values.split(",") if v.strip()]


def parse_args(argv=None):
    return parse_settings(
        BenchConfig,
        argv,
        "Measure GPT-2 training, sampling, HellaSwag and tokenizing speed.",
        lambda given: PRESETS.get(given.get("preset"), {}),
    )  # a preset: defaults only


def log(message):
    print(message, file=sys.stderr, flush=True)  # progress on stderr: stdout stays clean for --json


# -----------------------------------------------------------------------------
# Measuring: time on a synchronized device, peak memory, the matmul ceiling


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
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib * 1024, "process peak RSS"
    import resource  # not on Linux: the lifetime peak, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "process peak RSS (lifetime)"


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
    """Stands in for loader.py's ShardLoader: the same real (x, y) batch every micro step, so
    no disk read is in the measurement (the loader's reads are a memory map, minor at any size)."""

    def __init__(self, tokens, batch_size, seq_len):
        window = tokens[: batch_size * seq_len + 1]
        self.x = window[:-1].view(batch_size, seq_len)  # (B, T)
        self.y = window[1:].view(batch_size, seq_len)  # (B, T): the next token of each position

    def next_batch(self):
        return self.x, self.y


def train_config(config, batch_size, dtype_name, mode):
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
    )


def batch_sizes(config, device):
    """The micro batch sizes to try, largest first."""
    if config.batch_size != "auto":
        return [config.batch_size]
    if device.type == "cuda":
        return [64, 32, 16, 8, 4, 2, 1]
    return [1]  # CPU and MPS: one row of 1024 tokens already keeps the cores busy for seconds


def bench_train(config, device, dtype_name, mode, tokens):
    sizes = batch_sizes(config, device)
    batch_size, row = train_gpt2.first_that_fits(
        sizes, lambda b: bench_train_at(config, device, dtype_name, mode, tokens, b), device
    )
    if row is None:
        raise UserError(
            f"out of {device.type} memory at batch size {sizes[-1]} ({dtype_name}, {mode}); "
            f"pass a smaller --batch-size or --seq-len"
        )
    if batch_size != sizes[0]:
        log(f"  batch size {batch_size * 2} does not fit; measured at {batch_size}")
    return row


def bench_train_at(config, device, dtype_name, mode, tokens, batch_size):
    tc = train_config(config, batch_size, dtype_name, mode)
    raw_model = train_gpt2.build_model(tc, device)
    optimizer, _ = raw_model.configure_optimizers(
        tc.weight_decay, tc.max_lr, (tc.beta1, tc.beta2), tc.adam_eps, device.type
    )
    model = torch.compile(raw_model) if tc.compile else raw_model
    autocast, scaler = autocast_and_scaler(dtype_name, device)
    loader = RepeatedBatch(tokens, batch_size, config.seq_len)
    matmul = Matmul(config.matmul_size, DTYPES[dtype_name], device)
    losses = []

    def step():  # exactly one optimizer step of train_gpt2.py with one micro step
        losses.append(train_gpt2.train_step(model, optimizer, loader, 1, tc.max_lr, tc, device, autocast, scaler)[0])

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
    peak = train_gpt2.device_peak_flops(tc, device)
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
    if device.type == "cpu":
        keep_freed_memory()  # as train_gpt2.py does on CPU
    sections, dtypes, modes = split(config.sections), split(config.dtypes), split(config.modes)

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

    if "matmul" in sections:
        result["matmul"] = []
        for dtype_name in dtypes:
            log(f"matmul {dtype_name} {config.matmul_size}^2 ...")
            result["matmul"].append(bench_matmul(config, device, dtype_name))
    if "train" in sections:
        result["train"] = []
        tokens = text_tokens(max(batch_sizes(config, device)) * config.seq_len + 1)
        for mode in modes:
            for dtype_name in dtypes:
                log(f"train {mode} {dtype_name} ...")
                row = bench_train(config, device, dtype_name, mode, tokens)
                log(
                    f"  {row['ms_per_step']:.1f} ms/step, {row['tokens_per_sec']:,.0f} tokens/s, "
                    f"{percent(row['ceiling_ratio'])} of the matmul ceiling, MFU {percent(row['mfu'])}"
                )
                result["train"].append(row)
                free_memory(device)  # the next row starts from an empty device
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
    if config.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
