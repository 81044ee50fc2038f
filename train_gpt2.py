"""Train GPT-2 (124M) on FineWeb-Edu shards, the way GPT-2 / GPT-3 small were trained.

    python train_gpt2.py --demo                    # no GPU, no internet: a small GPT in a few minutes
    python fineweb.py                              # once: tokenize FineWeb-Edu 10B into edu_fineweb10B/
    python train_gpt2.py                           # one device (cuda, else mps, else cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py          # 8 GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=gpt2 train_gpt2.py     # the same on each of 2 machines
    python train_gpt2.py --config configs/gpt2-124m-1gpu-24gb.toml  # settings from a file (flags win)

The defaults are the GPT-3 small recipe on 10B tokens (TrainConfig). A log directory holds one run: relaunching
continues it. The file reads in the order a run happens: settings, processes and device, set-up, the loop."""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load (torch takes seconds) ends quietly too
    signal.signal(signal.SIGINT, lambda number, frame: sys.exit(130))

import collections
import contextlib
import datetime
import math
import os
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import fineweb
import hellaswag
from common import DTYPES, UserError, duration, print0, setting
from loader import ShardLoader, find_shards
from logdir import RunLog, claim_log_dir, hms, list_checkpoints, resume, run_header, save_checkpoint
from model import GPT, GPT2_SIZES, GPTConfig
from tokenizer import get_tokenizer

# --- Settings: one dataclass, one flag per field (`python train_gpt2.py --help`) ----------------------------
POSITIVE, NOT_NEGATIVE = "be positive", "not be negative"


@dataclass
class TrainConfig:
    data_dir: str = setting("edu_fineweb10B", "directory of uint16 token shards made by fineweb.py", section="data")
    log_dir: str = setting("log", "the run's directory: metrics.jsonl, log.txt, config.toml, checkpoints/")
    overwrite: bool = setting(False, "start a new run in a used --log-dir, deleting the old run", action="store_true")
    shuffle: bool = setting(True, "shuffle train shard order and window order each epoch")
    model: str = setting("gpt2", "GPT-2 size to train from scratch", choices=list(GPT2_SIZES), section="model")
    n_layer: int = setting(None, "override the size's number of layers")
    n_head: int = setting(None, "override the size's number of attention heads")
    n_embd: int = setting(None, "override the size's embedding width")
    block_size: int = setting(1024, "longest sequence the model can see (learned positions)")
    vocab_size: int = setting(50304, "vocabulary; 50304 pads GPT-2's 50257 to a multiple of 128 for speed")
    init_from: str = setting("scratch", "'scratch', or a Hugging Face GPT-2 name or local directory to fine-tune")
    # batch: total_batch_size tokens per step = batch_size * seq_len * devices * micro steps
    batch_size: int = setting(64, "micro batch per device; out of memory? 32, 16, 8", must=POSITIVE, section="batch")
    seq_len: int = setting(1024, "sequence length T", must=POSITIVE)
    total_batch_size: int = setting(524288, "tokens per optimizer step, over all devices", must=POSITIVE)
    max_steps: int = setting(19073, "optimizer steps (x 524288 = 10B tokens)", must=POSITIVE, section="optimization")
    warmup_steps: int = setting(715, "steps of linear lr warmup", must=NOT_NEGATIVE)
    max_lr: float = setting(6e-4, "peak learning rate, reached at the end of warmup", must=POSITIVE)
    min_lr: float = setting(6e-5, "learning rate at the end of the cosine decay", must=NOT_NEGATIVE)
    weight_decay: float = setting(0.1, "AdamW weight decay (of matmul weights and embeddings)", must=NOT_NEGATIVE)
    beta1: float = setting(0.9, "AdamW beta1", must="be in [0, 1)")
    beta2: float = setting(0.95, "AdamW beta2", must="be in [0, 1)")
    adam_eps: float = setting(1e-8, "AdamW epsilon", must=POSITIVE)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)", must=NOT_NEGATIVE)
    max_skipped_steps: int = setting(5, "stop after this many non-finite steps in a row", must=POSITIVE)
    optimizer: str = setting("adamw", "adamw, or muon for the blocks' matrices", choices=["adamw", "muon"])
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum", must="be in [0, 1)")
    muon_weight_decay: float = setting(0.1, "Muon's weight decay (decoupled, as AdamW's)", must=NOT_NEGATIVE)
    muon_ns_steps: int = setting(5, "Muon's Newton-Schulz iterations", must=POSITIVE)
    # evaluation, sampling and checkpoints (an interval of 0 turns that event off)
    eval_interval: int = setting(250, "steps between validation losses", must=NOT_NEGATIVE, section="evaluation")
    val_tokens: int = setting(10485760, "tokens of each validation, whatever the device count", must=NOT_NEGATIVE)
    hellaswag_interval: int = setting(250, "steps between HellaSwag evaluations", must=NOT_NEGATIVE)
    hellaswag_file: str = setting(None, "local HellaSwag val .jsonl (default: hellaswag.py downloads it)")
    sample_interval: int = setting(250, "steps between printed samples", must=NOT_NEGATIVE)
    sample_prompt: str = setting("Hello, I'm a language model,", "prompt the samples continue")
    num_samples: int = setting(4, "samples per sampling event", must=POSITIVE)
    sample_tokens: int = setting(32, "new tokens per sample", must=POSITIVE)
    checkpoint_interval: int = setting(1000, "steps between checkpoints (and one at the end)", must=NOT_NEGATIVE)
    keep_checkpoints: int = setting(3, "how many of the latest checkpoints to keep", must=POSITIVE)
    resume: str = setting("auto", "auto (latest checkpoint), never (a new run), or a checkpoint", section="launches")
    stop_at_step: int = setting(0, "end this launch with a checkpoint after this step (0: don't)", must=NOT_NEGATIVE)
    time_limit: int = setting(0, "end this launch cleanly within this time, e.g. 3h50m (0: none)", type=duration)
    dist_timeout: int = setting(600, "under torchrun, how long a rank waits for another", type=duration, must=POSITIVE)
    wandb: str = setting(None, "also log to this Weights & Biases project (pip install -r requirements-tracking.txt)")
    tensorboard: bool = setting(False, "also write TensorBoard events to <log dir>/tensorboard (the same install)")
    device: str = setting("auto", "auto (cuda, else mps, else cpu), or cpu, cuda, cuda:N, mps", section="system")
    dtype: str = setting("auto", "autocast dtype (auto: see resolve_dtype)", choices=["auto", *DTYPES])
    compile: bool = setting(None, "torch.compile the model (default: on for CUDA with Triton)")
    peak_flops: float = setting(None, "device peak FLOP/s for MFU (default: a table of GPUs)", must=POSITIVE)
    seed: int = setting(1337, "seed of the initial weights and the data shuffle", must=NOT_NEGATIVE)
    demo: bool = setting(False, "a small CPU run on Python's docs: configs/demo.toml", action="store_true")

    def problems(self):
        return config_problems(self, int(os.environ.get("WORLD_SIZE", 1)))


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.toml")


def parse_args(argv=None):
    """The settings: the defaults (--demo: configs/demo.toml's), then a --config file's, then the flags given."""
    return common.parse_settings(TrainConfig, argv, "Train GPT-2 on token shards.", demo_settings)


def demo_settings(given):
    """--demo's settings as flags: configs/demo.toml's, its warmup a tenth of a --max-steps given (as it is there)."""
    if not given.get("demo"):
        return []
    flags = common.config_file_flags(DEMO_CONFIG, TrainConfig)
    if "max_steps" in given and "warmup_steps" not in given:
        flags.append(f"--warmup-steps={given['max_steps'] // 10}")
    return flags


def model_config(config):
    """The GPTConfig of a from-scratch model: the named size, with any size flags applied."""
    sizes = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) is not None}
    return GPTConfig.from_name(config.model, block_size=config.block_size, vocab_size=config.vocab_size, **sizes)


# --- The learning-rate schedule: linear warmup, then cosine decay to min_lr at max_steps --------------------
def get_lr(step, config):
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps  # step 0 already learns a little
    if step >= config.max_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / (config.max_steps - config.warmup_steps)  # 0 -> 1
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.max_lr - config.min_lr)


# --- One optimizer step -------------------------------------------------------------------------------------
def train_step(model, optimizers, loader, accum, lr, config, device, autocast, scaler=None, wants_stop=bool):
    """One optimizer step over accum micro batches -> (loss, grad norm, skipped, stop). One all-reduce at the end: a
    loss or norm not finite on any rank skips the update on all; wants_stop() on any (a signal, time up) stops all."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        if isinstance(model, DDP):
            # DDP all-reduces gradients in every backward, but only the last micro step's sum is needed.
            # Setting this flag does what its no_sync() context manager does, without indenting the loop.
            model.require_backward_grad_sync = micro_step == accum - 1
        with autocast:
            _, loss = model(x, y)
        loss = loss / accum  # the step's loss is the mean of the micro batches' mean losses
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
    if scaler:
        for optimizer in optimizers.values():
            scaler.unscale_(optimizer)  # the true gradients, for their norm and the clipping
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
    # With float16's scaler, a non-finite norm under a finite loss is an overflow at the current scale:
    # scaler.step skips that update and scaler.update lowers the scale. It is not a skipped step.
    bad_norm = torch.zeros((), device=device) if scaler else (~torch.isfinite(norm)).float()
    flags = torch.stack([loss_sum, bad_norm, torch.tensor(float(wants_stop()), device=device)])
    if dist.is_initialized():
        dist.all_reduce(flags)  # a sum: gloo has no average
    loss_sum, bad_norm, stop = flags.tolist()
    loss = loss_sum / (dist.get_world_size() if dist.is_initialized() else 1)
    skipped = not math.isfinite(loss) or bad_norm > 0
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = lr  # one schedule for both: Muon's updates are scaled to AdamW's size
        if not skipped:
            scaler.step(optimizer) if scaler else optimizer.step()
    if scaler:
        scaler.update()  # after a skipped step too: it matches unscale_
    return loss, norm.item(), skipped, stop > 0


# --- The run: processes and device, set-up, then the loop ---------------------------------------------------
def train(argv, launch):
    # Processes and device, as in build-nanogpt: torchrun runs a process per GPU with RANK, LOCAL_RANK, WORLD_SIZE set;
    # rank 0 alone prints and writes. A rank holds its first error until all meet, so none waits on one that gave up.
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size, master = int(os.environ.get("WORLD_SIZE", 1)), rank == 0
    config, error = TrainConfig(), None
    try:
        config = parse_args(argv)
        launch.config = config  # for the messages of main()
        device = common.pick_device(config.device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)  # this process's own GPU: its kernels, RNG, memory
            torch.cuda.set_device(device)
        if master:
            launch.enter_context(claim_log_dir(config))  # one run per log directory, one launch at a time
            if config.demo:  # the demo's data, made once: Python's reference manual, which ships with Python
                fineweb.write_python_docs(config.data_dir)
        find_shards(config.data_dir, "train")  # a missing data directory fails in seconds, not after a download
        if local_rank == 0 and config.hellaswag_interval:
            load_hellaswag(config)  # downloads it the first time: one process a machine, the others after the barrier
    except (UserError, OSError) as e:  # OSError: a file unreadable, GPT-2's vocabulary not found
        error = e
    if world_size > 1:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"  # gloo for CPU tensors
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.dist_timeout))
        dist.barrier()  # the other ranks wait for rank 0's log directory and demo data, and HellaSwag's download

    # Set-up on every rank: device settings, data, model, optimizer, checkpoint to resume. Then the ranks agree once:
    # an error on any rank (a file missing on one node) ends all with its message; so do different data or checkpoints.
    given, step, shards = config, 0, None
    try:
        if error:
            raise error
        # Device differences, settled once: bf16 on GPUs from Ampere on, float16 and a scaler before, float32 elsewhere
        compiled = common.compile_by_default(device) if config.compile is None else config.compile
        config = launch.config = replace(config, dtype=common.resolve_dtype(config.dtype, device), compile=compiled)
        if config.compile:
            common.check_compile(device)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul left outside autocast
        else:
            common.keep_freed_memory()  # a CPU step reuses its memory instead of page-faulting it in afresh
        autocast, scaler = common.autocast_and_scaler(config.dtype, device)
        if config.demo or config.sample_interval or config.hellaswag_interval:
            get_tokenizer()  # samples and HellaSwag need GPT-2's vocabulary: fail now, not mid-run
        B, T, V, pinned = config.batch_size, config.seq_len, config.vocab_size, device.type == "cuda"
        seed = config.seed if config.shuffle else None  # None: the shards and rows in order
        train_loader = ShardLoader(config.data_dir, "train", B, T, rank, world_size, V, seed, pin_memory=pinned)
        if config.eval_interval:
            val_loader = ShardLoader(config.data_dir, "val", B, T, vocab_size=V)
        examples = load_hellaswag(config) if config.hellaswag_interval else []
        raw_model = build_model(config, device)
        adamw = dict(weight_decay=config.weight_decay, betas=(config.beta1, config.beta2), eps=config.adam_eps)
        muon = dict(momentum=config.muon_momentum, weight_decay=config.muon_weight_decay, ns_steps=config.muon_ns_steps)
        muon = muon if config.optimizer == "muon" else None  # None: AdamW alone, the recipe
        optimizers, info = raw_model.configure_optimizers(config.max_lr, adamw, muon)
        # What a checkpoint holds and a resume puts back, each by its state_dict()
        state = {"model": raw_model, "loader": train_loader, "scaler": scaler, **optimizers}
        step, source = resume(config, state, check_resumable)  # the checkpoint's step and path, or 0 and None
        shards = train_loader.shard_list()
    except (UserError, OSError) as e:
        error = e
    check_same_everywhere(common.agree(error, (step, shards)))
    if step >= min(config.stop_at_step or config.max_steps, config.max_steps):
        limits = f"--max-steps {config.max_steps}, --stop-at-step {config.stop_at_step}"
        held = f"{config.log_dir} holds a run at step {step}"
        if os.path.dirname(os.path.dirname(os.path.abspath(source))) != os.path.abspath(config.log_dir):
            held = f"{source}, another run's checkpoint, is at step {step}"  # --resume PATH, into a new log dir
        print0(f"nothing to do: {held} ({limits}); --overwrite starts a new one")
        return 0
    log = launch.enter_context(contextlib.closing(RunLog(config, step, source, enabled=master)))  # one history
    if master:
        common.write_settings(given, os.path.join(config.log_dir, "config.toml"), leave_out=("overwrite", "resume"))
    log.text(run_header(config, device, world_size))

    # One compiled module for training (in DDP) and evaluations; sampling (new shapes every token) runs the plain one.
    model = torch.compile(raw_model) if config.compile else raw_model
    device_ids = [device.index] if device.type == "cuda" else None  # gradients as views of DDP's buckets: a copy
    train_model = DDP(model, device_ids, gradient_as_bucket_view=True) if world_size > 1 else model  # of them fewer
    accum = config.total_batch_size // (B * T * world_size)
    val_rows = min(config.val_tokens // T, val_loader.rows_per_epoch) if config.eval_interval else 0
    auto = {name: " (auto)" if getattr(given, name) in ("auto", None) else "" for name in ("dtype", "compile")}
    print0(
        f"dtype {config.dtype}{auto['dtype']}, compile {'on' if config.compile else 'off'}{auto['compile']}; "
        f"{raw_model.num_parameters():,} parameters; {config.total_batch_size:,} tokens per step = {B} x {T} x "
        f"{world_size} devices x {accum} micro steps; {info}; {'resuming at' if step else 'starting at'} step {step}"
    )
    if config.eval_interval and val_rows < config.val_tokens // T:
        print0(f"note: the val split holds {val_loader.num_tokens} tokens: validating on {val_rows * T}")
    flops_per_token, peak = raw_model.flops_per_token(T), config.peak_flops  # no peak, no MFU: CPU, MPS, unknown GPUs
    if peak is None and device.type == "cuda":
        peak = common.peak_flops_of(torch.cuda.get_device_name(device), config.dtype)
    # For --time-limit: the slowest step and evaluation so far, and a checkpoint's time (until one is timed: the
    # weights and AdamW's two moments at 100 MB/s). For the ETA: the latest step times.
    started, slowest_step, slowest_eval, recent = clock(), 0.0, 0.0, collections.deque(maxlen=50)
    checkpoint_seconds, skipped_in_a_row, last_eval = 12 * raw_model.num_parameters() / 100e6, 0, {}
    while True:
        last, eval_start = step == config.max_steps, clock()
        if due(config.eval_interval, step, last):
            last_eval["val loss"] = evaluate_val(model, val_loader, val_rows, rank, world_size, device, autocast)
            line = f"step {step:5d} | val loss {last_eval['val loss']:.4f} | {clock() - eval_start:.1f} s"
            log.event({"step": step, "val_loss": last_eval["val loss"]}, line)
        if due(config.hellaswag_interval, step, last):
            t0 = clock()
            last_eval["HellaSwag"] = evaluate_hellaswag(model, examples, rank, world_size, device, config)
            line = f"step {step:5d} | hellaswag acc_norm {last_eval['HellaSwag']:.4f} | {clock() - t0:.1f} s"
            log.event({"step": step, "hellaswag_acc": last_eval["HellaSwag"]}, line)
        if due(config.sample_interval, step, last) and master:
            samples = sample(raw_model, config, device, autocast)
            lines = "\n".join(f"step {step:5d} | sample {i}: {text!r}" for i, text in enumerate(samples))
            log.event({"step": step, "samples": samples}, lines)
        if last:
            log.line(log.summary(step, clock() - started, last_eval))
            return 0
        slowest_eval = max(slowest_eval, clock() - eval_start)

        # The step proper, timed alone: evaluations and checkpoints stay out of ms/step, MFU and the ETA.
        # Going on past it needs time for it, the next evaluations and step, and a checkpoint.
        lr, elapsed = get_lr(step, config), clock() - started
        out_of_time = 0 < config.time_limit < elapsed + 2 * slowest_step + slowest_eval + checkpoint_seconds

        def wants_stop():  # asked at the end of the step: a signal during it stops the run after it
            return launch.signal is not None or (master and out_of_time)

        seconds = stopwatch(device)
        loss, norm, skipped, stop = train_step(
            train_model, optimizers, train_loader, accum, lr, config, device, autocast, scaler, wants_stop
        )
        dt = seconds()
        slowest_step, tokens_per_sec = max(slowest_step, dt), config.total_batch_size / dt
        recent.append(dt)
        mfu = flops_per_token * tokens_per_sec / (peak * world_size) if peak else None
        eta = hms(statistics.median(recent) * (config.max_steps - step - 1))
        line = f"step {step:5d}/{config.max_steps} ({(step + 1) / config.max_steps:.1%}) | loss {loss:.6f} | "
        line += f"lr {lr:.4e} | norm {norm:.4f} | {dt * 1000:.2f} ms | {tokens_per_sec:,.0f} tok/s | "
        line += f"mfu {'-' if mfu is None else f'{mfu * 100:.1f}%'} | ETA {eta}"
        record = dict(step=step, train_loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000, tokens_per_sec=tokens_per_sec)
        record["mfu"] = mfu
        if skipped:
            record["skipped"], line = True, line + " | skipped: not finite"
        log.event(record, line)
        step += 1
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        too_many_skipped = skipped_in_a_row == config.max_skipped_steps
        # A stop that lands on the last step does not stop: the final evaluations run first.
        stop = (stop or too_many_skipped or step == config.stop_at_step) and step < config.max_steps
        if master and (due(config.checkpoint_interval, step, False) or step == config.max_steps or stop):
            t0 = clock()
            path = save_checkpoint(config, step, state)
            checkpoint_seconds = clock() - t0
            log.line(f"step {step:5d} | checkpoint {path} | {checkpoint_seconds:.1f} s")
        if too_many_skipped:
            why = f"{skipped_in_a_row} steps in a row (to step {step - 1}) had a non-finite loss or gradient"
            fix = "relaunch to go on with new batches, or roll back: --resume <an earlier checkpoint> and a lower lr"
            raise UserError(f"{why} and were skipped; {fix}")
        if stop:
            print0(stopped(config, step, launch, out_of_time))
            return 130 if launch.signal == signal.SIGINT else 0


def check_same_everywhere(values):
    """Every rank's (resume step, train shards), known to all: one unlike rank 0's ends all, rank 0 saying why."""
    for rank, (step, shards) in enumerate(values):
        if step != values[0][0]:
            where = f"rank {rank} would resume at step {step}, rank 0 at {values[0][0]}"
            common.agree(UserError(f"{where}: does every node see the same --log-dir?"))
        if shards != values[0][1]:
            differ = ", ".join(f"{name} of {n:,} tokens" for name, n in sorted(set(shards) ^ set(values[0][1]))[:2])
            why = f"rank {rank} sees other train shards than rank 0 ({differ}, on one and not the other)"
            common.agree(UserError(f"{why}: give every node the same data"))


def due(interval, step, last):
    """Whether an every-`interval`-steps event happens at this step (0 turns it off)."""
    return interval > 0 and (step % interval == 0 or last)


def stopped(config, step, launch, out_of_time):
    """The line that ends a launch stopped before max_steps: why, and how to go on."""
    why, go_on = "a stop signal on another rank", "relaunch the same command to continue"
    if step == config.stop_at_step:
        why, go_on = "--stop-at-step", "raise --stop-at-step or leave it out and relaunch to continue"
    elif launch.signal or out_of_time:
        why = signal.Signals(launch.signal).name if launch.signal else "--time-limit"
    return f"stopped after step {step - 1} ({why}); checkpoint step_{step:08d}.pt saved; {go_on}"


clock = time.perf_counter  # steps, evaluations and --time-limit are timed with it (a test may replace it)


def stopwatch(device):
    """-> a function giving the seconds since this call: CUDA events on a GPU (no device synchronize), else clock()."""
    if device.type != "cuda":
        start = clock()
        return lambda: clock() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def seconds():
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    return seconds


# --- Set-up: the model, the demo's data, HellaSwag's examples, compile --------------------------------------
def build_model(config, device):
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    if config.init_from == "scratch":
        with torch.device("meta"):  # its shape only: no memory, no time
            needed, free = 16 * GPT(model_config(config)).num_parameters(), free_memory(device)
        if free is not None and needed > free:  # a clear refusal now, not an allocator's failure (or a swapping host)
            sizes = f"{needed / 1e9:.1f} GB for weights, gradients and AdamW's moments; {free / 1e9:.1f} GB are free"
            raise UserError(f"the model is too big for the {device.type}: it needs {sizes}; choose a smaller one", 2)
        return GPT(model_config(config)).to(device)
    try:
        model = GPT.from_pretrained(config.init_from, vocab_size=config.vocab_size)
    except (OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0]
        raise UserError(f"cannot load --init-from {config.init_from} ({why}); give a GPT-2 name or a local HF folder")
    if config.seq_len > model.config.block_size:
        longest = model.config.block_size
        raise UserError(f"seq_len={config.seq_len} is over {config.init_from}'s block_size={longest}", exit_code=2)
    return model.to(device)


def free_memory(device):
    """Bytes free on the device: CUDA's count, Linux's MemAvailable for the CPU, None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def load_hellaswag(config):
    try:  # without --hellaswag-file, hellaswag.py downloads the val set once into its cache
        return hellaswag.load_examples(config.hellaswag_file or hellaswag.download())
    except UserError as e:
        raise UserError(f"{e}; pass --hellaswag-file FILE, or turn HellaSwag off with --hellaswag-interval 0")


# --- Evaluation: val loss, HellaSwag and samples ------------------------------------------------------------
@torch.no_grad()
def evaluate_val(model, val_loader, num_rows, rank, world_size, device, autocast):
    """Mean loss over the tokens of the first num_rows val windows, whatever the world size W: rank r sums rows r::W
    in batches of the training shape (the last padded with ignored targets: one shape for compile)."""
    rows, B = list(range(rank, num_rows, world_size)), val_loader.B
    totals = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(rows), B):
        x, y = val_loader.read_rows(rows[i : i + B])
        x = torch.cat([x, x.new_zeros(B - len(x), x.size(1))])
        y = torch.cat([y, y.new_full((B - len(y), y.size(1)), -1)])  # -1: ignored by the loss
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        n = (y != -1).sum().item()
        totals += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    return mean_over_ranks(totals, device)


def evaluate_hellaswag(model, examples, rank, world_size, device, config):
    """acc_norm over all examples, split over ranks by hellaswag.py and reduced here."""
    dtype = common.autocast_dtype_for(config.dtype, device)
    # batch_size // 4 examples = batch_size rows (4 endings each), no longer than training rows
    result = hellaswag.evaluate(model, examples, device, max(1, config.batch_size // 4), rank, world_size, dtype)
    return mean_over_ranks(torch.tensor([result["correct_norm"], result["total"]], dtype=torch.float64), device)


def mean_over_ranks(totals, device):
    """totals[0] / totals[1], each summed over ranks (float64: CPU and CUDA have it, MPS runs alone)."""
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def sample(raw_model, config, device, autocast):
    """Continuations of the prompt, with a fixed seed so samples of different steps compare."""
    enc = get_tokenizer()
    prompts = torch.tensor(enc.encode_ordinary(config.sample_prompt), device=device).repeat(config.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(42)
    with autocast:
        out = raw_model.generate(prompts, config.sample_tokens, top_k=50, generator=generator)
    return [enc.decode(row.tolist()) for row in out]


def out_of_memory(config):
    """The one line for running out of memory in the middle of training."""
    fix = "use a shorter --seq-len or a smaller model"
    if config.batch_size > 1:
        fix = f"relaunch with --batch-size {config.batch_size // 2} (the same total batch in more micro steps)"
    return f"out of memory with --batch-size {config.batch_size}; {fix}"


def first_to_say():
    """Whether this rank is the first to report an error (counted in torchrun's store, which outlives a failed rank;
    its handle is private, there is no public one): the others' errors follow from it (a lost peer), they stay quiet."""
    return not dist.is_initialized() or dist.distributed_c10d._get_default_store().add("error", 1) == 1


# --- Settings that cannot work together, and what a resumed run must keep -----------------------------------
# A resumed run keeps what it learns (LEARNING); how and where it runs may change, micro batch and device count too
# (the loader counts rows), and the lr schedule (RETUNABLE: a rollback after a loss spike may lower it; it is printed).
LEARNING = (
    "model n_layer n_head n_embd block_size vocab_size init_from seq_len shuffle total_batch_size max_steps "
    "weight_decay beta1 beta2 adam_eps optimizer muon_momentum muon_weight_decay muon_ns_steps dtype seed"
).split()
RETUNABLE = ["max_lr", "min_lr", "warmup_steps", "grad_clip"]


def config_problems(c, world_size):
    """Every combination of settings that cannot work, as readable strings (problems_of checks each one alone)."""
    found, micro_step = model_config(c).problems(), c.batch_size * c.seq_len * world_size
    if c.sample_interval and not c.sample_prompt:
        found.append("sample_prompt is empty; give one, or --sample-interval 0")
    if os.path.isfile(c.log_dir):
        found.append(f"log_dir={c.log_dir} is a file, not a directory")
    if os.path.isfile(c.init_from):
        found.append(f"init_from={c.init_from} is a file: --resume a checkpoint, or fine-tune its export.py folder")
    if c.init_from.startswith(("/", "./", "../", "~")) and not os.path.exists(c.init_from):
        found.append(f"init_from={c.init_from} does not exist (give a local Hugging Face folder or a hub name)")
    if c.overwrite and c.resume not in ("auto", "never"):
        found.append(f"--overwrite starts a new run: no --resume {c.resume}")
    if c.init_from == "scratch" and c.seq_len > c.block_size:
        found.append(f"seq_len={c.seq_len} is over block_size={c.block_size}")
    if c.warmup_steps > c.max_steps:
        found.append(f"warmup_steps={c.warmup_steps} is over max_steps={c.max_steps}")
    if c.min_lr > c.max_lr:
        found.append(f"min_lr={c.min_lr} is over max_lr={c.max_lr}")
    if c.eval_interval and 0 <= c.val_tokens < c.seq_len:
        found.append(f"val_tokens={c.val_tokens} is less than one sequence of seq_len={c.seq_len}")
    if micro_step > 0 and c.total_batch_size % micro_step:
        product = f"batch_size * seq_len * world_size = {c.batch_size} * {c.seq_len} * {world_size} = {micro_step}"
        found.append(f"total_batch_size={c.total_batch_size} is not divisible by {product}")
    return found


def check_resumable(saved, config):
    """Refuse to continue a run with settings that change what it learns, listing them all."""
    now = asdict(config)
    differ = [f"{k}={saved.get(k)!r} in the checkpoint but {now[k]!r} now" for k in LEARNING if saved.get(k) != now[k]]
    fix = "relaunch with the checkpoint's settings, or another --log-dir / --overwrite for a new run"
    if differ:
        raise UserError(f"the checkpoint's settings differ from the flags: {'; '.join(differ)}; {fix}", exit_code=2)
    retuned = [f"{k}={saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in RETUNABLE if saved.get(k) != now[k]]
    if retuned:
        print0(f"note: {'; '.join(retuned)}: the lr schedule goes on with the new values")


# --- The launch: signals, errors and exit codes -------------------------------------------------------------
class Launch(contextlib.ExitStack):
    """What one launch holds until it ends (the log directory's lock and history), and its signal handlers: SIGTERM,
    SIGUSR1 (SLURM's and spot instances' warning) and Ctrl-C stop every rank after this step, with a checkpoint."""

    signal = None  # the first stop signal that came
    config = None  # the run's settings, once they are known

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only lets it set handlers
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                self.callback(signal.signal, number, signal.signal(number, self.stop))  # put back at the end
        return super().__enter__()

    def stop(self, number, frame):
        if number == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signal is None and int(os.environ.get("RANK", 0)) == 0:
            again = " (Ctrl-C again to quit at once)" if number == signal.SIGINT else ""
            line = f"{signal.Signals(number).name}: stopping after this step, with a checkpoint{again}\n"
            os.write(sys.stderr.fileno(), line.encode())  # not print: it could cut into another print
        self.signal = self.signal or number


def main(argv=None):
    """Run training -> the exit code: 0, 1 for a run-time problem, 2 for bad settings, 130 after Ctrl-C."""
    rank, launch = int(os.environ.get("RANK", 0)), Launch()
    try:
        with launch:  # an error leaves it too: what the launch holds sees it (a failed launch leaves nothing behind)
            exit_code = train(argv, launch)
        if dist.is_initialized():
            dist.destroy_process_group()  # on a clean exit only: after an error another rank may never join it
        return exit_code
    except (UserError, OSError) as e:
        # common.agree() printed the errors all ranks met; a rank prints its own and exits (torchrun stops the rest)
        if not getattr(e, "reported", False) and first_to_say():
            print(f"error: {f'rank {rank}: ' if rank else ''}{e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        saved = list_checkpoints(launch.config.log_dir) if launch.config else []
        last = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was saved"
        print0(f"interrupted; {last}; relaunch the same command to resume", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:  # a training step, an evaluation, sampling
        if first_to_say():  # every rank may run out at once: one line for them all
            print(f"error: {out_of_memory(launch.config)}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        lost = re.search(r"timed out|closed by peer|connection reset|NCCL", str(e), re.IGNORECASE)
        if not (dist.is_initialized() and lost):
            raise  # a bug, not a lost rank
        why = str(e).strip().splitlines()[0]
        message = f"lost contact with another rank ({why}); its message, if any, is above; relaunch to resume"
        if first_to_say():  # else the rank that failed first has said why
            print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
        return 1


def cli():
    exit_code = main()
    if "RANK" in os.environ:
        # Skip the interpreter's clean-up: a gloo thread of DDP's freeing a tensor in it aborts (pytorch/pytorch#190489)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
