"""Train GPT-2 (124M) on FineWeb-Edu shards, the way GPT-2 / GPT-3 small were trained.

    python train_gpt2.py --demo                    # no GPU, no internet: a small GPT in a few minutes
    python fineweb.py                              # once: tokenize FineWeb-Edu 10B into edu_fineweb10B/
    python train_gpt2.py                           # one device (cuda, else mps, else cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py          # 8 GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=gpt2 train_gpt2.py     # the same on each of 2 machines
    python train_gpt2.py --config configs/gpt2-124m-1gpu-24gb.toml  # settings from a file (flags win)

The defaults are the GPT-3 small recipe on 10B tokens: 524,288 tokens per step, AdamW (0.9, 0.95),
weight decay 0.1, lr 6e-4 warmed up over 715 steps, cosine-decayed to 6e-5 at step 19,073, gradients
clipped at 1.0; dtype, compile and micro batch suit the machine. A log directory holds one run:
relaunching continues it, and each step goes into <log dir>/metrics.jsonl, which play.ipynb plots.
"""

import math
import os
import re
import signal
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from common import (AllRanks, Launch, OnOffOrAuto, UserError, agree, all_reduce_sum, autocast_and_scaler,
                    autocast_dtype_for, compile_by_default, duration, free_memory, int_or_auto, keep_freed_memory,
                    memory_budget, parse_settings, peak_flops_of, pick_device, print0, resolve_dtype, setting,
                    start_distributed, synchronize, write_settings)
from loader import ShardLoader, find_shards
from logdir import (RunLog, choose_checkpoint, claim_log_dir, list_checkpoints, load_checkpoint, run_header,
                    save_checkpoint)
from model import GPT, GPT2_SIZES, GPTConfig, read_checkpoint
from tokenizer import get_tokenizer

TrainError = UserError  # this script's one error type (exit_code 2: settings, 1: at run time)

# -----------------------------------------------------------------------------
# Settings: one dataclass, one flag per field (`python train_gpt2.py --help`)


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = setting("edu_fineweb10B", "directory of uint16 token shards made by fineweb.py")
    log_dir: str = setting("log", "the run's directory: metrics.jsonl, log.txt, config.toml, checkpoints/")
    overwrite: bool = setting(False, "start a new run in a used --log-dir, deleting the old run", action="store_true")
    shuffle: bool = setting(True, "shuffle train shard order and window order each epoch")
    # model
    model: str = setting("gpt2", "GPT-2 size to train from scratch", choices=list(GPT2_SIZES))
    n_layer: int = setting(None, "override the size's number of layers")
    n_head: int = setting(None, "override the size's number of attention heads")
    n_embd: int = setting(None, "override the size's embedding width")
    block_size: int = setting(1024, "longest sequence the model can see (learned positions)")
    vocab_size: int = setting(50304, "vocabulary size; 50304 pads GPT-2's 50257 to a multiple of 128 for speed")
    init_from: str = setting("scratch", "'scratch', or a Hugging Face GPT-2 name or local directory to fine-tune")
    # batch: total_batch_size tokens per step = batch_size * seq_len * devices * micro steps
    batch_size: int | str = setting("auto", "micro batch per device; auto: the largest of 64, 32, ... that fits",
                                    type=int_or_auto)
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
    max_skipped_steps: int = setting(5, "stop after this many steps in a row skipped for a non-finite loss")
    # evaluation, sampling and checkpoints (an interval of 0 turns that event off)
    eval_interval: int = setting(250, "steps between validation losses")
    val_tokens: int = setting(10485760, "validation tokens per evaluation, whatever the number of devices")
    hellaswag_interval: int = setting(250, "steps between HellaSwag evaluations")
    hellaswag_file: str = setting(None, "local HellaSwag val .jsonl (default: hellaswag.py downloads it)")
    sample_interval: int = setting(250, "steps between printed samples")
    sample_prompt: str = setting("Hello, I'm a language model,", "prompt the samples continue")
    num_samples: int = setting(4, "samples per sampling event")
    sample_tokens: int = setting(32, "new tokens per sample")
    checkpoint_interval: int = setting(1000, "steps between checkpoints (the last step always writes one)")
    keep_checkpoints: int = setting(3, "how many of the latest checkpoints to keep")
    # launches
    resume: str = setting("auto", "'auto' (the log dir's latest checkpoint), 'never' (a new run), or a checkpoint "
                          "path (an earlier one rolls back)")
    stop_at_step: int = setting(0, "end this launch with a checkpoint after this step (0: go on to max_steps)")
    time_limit: int = setting(0, "end this launch cleanly within this time, e.g. 3h50m (0: none)", type=duration)
    dist_timeout: int = setting(600, "under torchrun, how long a rank waits for the others, e.g. 10m", type=duration)
    wandb: str = setting(None, "also log to this Weights & Biases project (pip install wandb)")
    tensorboard: bool = setting(False, "also write TensorBoard events to <log dir>/tensorboard")
    # system
    device: str = setting("auto", "'auto' (cuda, else mps, else cpu), or e.g. cpu, cuda, mps")
    dtype: str = setting("auto", "autocast dtype; auto: bfloat16 on GPUs from Ampere on, float16 with a gradient "
                         "scaler before, float32 on MPS and CPU", choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool | str = setting("auto", "torch.compile the model; auto: on for CUDA with Triton", action=OnOffOrAuto)
    peak_flops: float = setting(None, "device peak FLOP/s for MFU (default: a table of GPUs)")
    seed: int = setting(1337, "seed of the initial weights and the data shuffle")
    demo: bool = setting(False, "a small CPU run on Python's docs: DEMO_DEFAULTS", action="store_true")

    def problems(self):
        return config_problems(self, int(os.environ.get("WORLD_SIZE", 1)))


# --demo changes defaults only: a 4-layer, 128-wide GPT (7.3M parameters, 6.4M of them the embedding)
# on Python's reference manual (139k tokens, ~2 epochs), 150 steps of 2,048 tokens: minutes on 2
# cores; float32 without compile, which cost more than they save there.
DEMO_DEFAULTS = dict(data_dir="demo_data", log_dir="log_demo", n_layer=4, n_head=4, n_embd=128, block_size=256,
                     batch_size=8, seq_len=128, total_batch_size=2048, max_steps=150, warmup_steps=15, max_lr=2e-3,
                     min_lr=2e-4, eval_interval=25, val_tokens=8192, hellaswag_interval=0, sample_interval=50,
                     checkpoint_interval=50, compile=False, dtype="float32")


def parse_args(argv=None):
    """The settings: the defaults (or --demo's), then a --config file's, then the flags given."""
    def demo_defaults(given):  # --demo with a --hellaswag-file evaluates it too
        hellaswag_interval = DEMO_DEFAULTS["eval_interval"] if given.get("hellaswag_file") else 0
        return {**DEMO_DEFAULTS, "hellaswag_interval": hellaswag_interval} if given.get("demo") else {}
    return parse_settings(TrainConfig, argv, "Train GPT-2 on token shards.", demo_defaults)


def model_config(config):
    """The GPTConfig of a from-scratch model: the named size, with any size flags applied."""
    sizes = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) is not None}
    return GPTConfig.from_name(config.model, block_size=config.block_size, vocab_size=config.vocab_size, **sizes)


# -----------------------------------------------------------------------------
# The learning-rate schedule: linear warmup, then cosine decay to min_lr at max_steps


def get_lr(step, config):
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps  # step 0 already learns a little
    if step >= config.max_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / (config.max_steps - config.warmup_steps)  # 0 -> 1
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.max_lr - config.min_lr)


# -----------------------------------------------------------------------------
# One step, and the loop


def train_step(model, optimizer, loader, accum, lr, config, device, autocast, scaler=None, stop=False):
    """One optimizer step over accum micro batches -> (loss, grad norm, skipped, stop).

    Gradients are all-reduced on the last micro step only. One small all-reduce then tells every rank
    what the others saw: a loss or gradient norm that is not finite anywhere skips the update on
    every rank, and a rank that wants to stop (a signal, the time limit) stops all after this step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum, pin = torch.zeros((), device=device), device.type == "cuda"
    for micro_step in range(accum):
        x, y = (t.pin_memory().to(device, non_blocking=True) if pin else t.to(device) for t in loader.next_batch())
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro_step == accum - 1
        with autocast:
            _, loss = model(x, y)
        # The step's mean loss is the mean of the micro-batch means: each is divided by accum.
        (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        loss_sum += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)  # the true gradients, for their norm and the clipping
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
    # With float16's scaler, a non-finite norm under a finite loss is an overflow at the current scale:
    # scaler.step skips that update and scaler.update lowers the scale. It is not a skipped step.
    bad_norm = torch.zeros((), device=device) if scaler else (~torch.isfinite(norm)).float()
    flags = torch.stack([loss_sum, bad_norm, torch.tensor(float(stop), device=device)])
    loss_sum, bad_norm, stop = all_reduce_sum(flags).tolist()
    loss = loss_sum / (accum * (dist.get_world_size() if dist.is_initialized() else 1))  # over ranks too
    skipped = not math.isfinite(loss) or bad_norm > 0
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer) if scaler else optimizer.step()
    if scaler:
        scaler.update()  # after a skipped step too: it matches unscale_
    return loss, norm.item(), skipped, stop > 0


def train(config, launch):
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    master, started = rank == 0, clock()
    # The set-up runs in blocks that every rank runs and then agrees on (AllRanks): an error on any
    # rank (a file missing on one node, say) ends every rank with its message, never a hang.
    with AllRanks():
        device = pick_device(config.device)
        if config.demo or config.sample_interval or config.hellaswag_interval:
            try:  # the demo data, samples and HellaSwag need GPT-2's vocabulary: fail now, not mid-run
                get_tokenizer()
            except OSError as e:
                raise TrainError(str(e))
        if master:
            launch.enter_context(claim_log_dir(config))  # one run per log directory, one launch at a time
            if config.demo:
                import fineweb  # only the demo needs it: Python's reference manual, tokenized once
                fineweb.write_shards(fineweb.python_docs_documents(), config.data_dir, "pydocs", shard_size=16384,
                                     num_proc=1, progress=False, source="python-docs")
    with AllRanks():  # data first: a missing data dir fails in seconds, before a trial step of minutes
        find_shards(config.data_dir, "train")
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul left outside autocast
    settings, config = config, resolve_auto(config, device, world_size)  # dtype, compile, batch size for here
    autocast, scaler = autocast_and_scaler(config.dtype, device)
    accum = config.total_batch_size // (config.batch_size * config.seq_len * world_size)

    with AllRanks() as choice:
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
            start.value = load_checkpoint(checkpoint, raw_model, optimizer, train_loader, scaler)
            del checkpoint  # the optimizer state is large; let it go
    if len(set(start.values)) > 1:
        raise TrainError(f"the ranks read checkpoints of different steps ({start.values}) from {resume_path}; does "
                         f"every node see the same --log-dir?")
    step = start.values[0]
    if step >= min(config.max_steps, config.stop_at_step or config.max_steps):
        print0(f"nothing to do: {config.log_dir} holds a run at step {step}, "
               + (f"complete (--max-steps {config.max_steps})" if step >= config.max_steps else
                  f"and --stop-at-step is {config.stop_at_step}: raise it, or leave it out to go on")
               + "; --overwrite or another --log-dir starts a new run")
        return 0
    with AllRanks():  # rank 0: the history from here on (RunLog), the dashboards, the settings file
        log = launch.enter_context(closing(RunLog(config, step, enabled=master)))
        if master:
            write_settings(settings, os.path.join(config.log_dir, "config.toml"), leave_out=("overwrite", "resume"))

    # One compiled module serves training (inside DDP), the val loss and HellaSwag; sampling runs the
    # plain module's KV-cache loop, whose shapes change every token. Same weights throughout.
    model = torch.compile(raw_model) if config.compile else raw_model
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    log.text(run_header(config, device, world_size))
    print0(f"{raw_model.num_parameters():,} parameters, {config.total_batch_size:,} tokens per step = "
           f"{config.batch_size} x {config.seq_len} x {world_size} devices x {accum} micro steps; {device}; "
           f"{'resuming at step %d' % step if step else 'starting at step 0'}")
    print0(f"AdamW: {info['num_decay_params']:,} parameters with weight decay, {info['num_nodecay_params']:,} "
           f"without; fused {info['fused']}")
    flops_per_token, peak = raw_model.flops_per_token(config.seq_len), device_peak_flops(config, device)
    # For --time-limit: the slowest step and evaluation so far, and a checkpoint's time (until one is
    # timed: the weights and AdamW's two moments at 100 MB/s).
    slowest_step, slowest_eval, checkpoint_seconds = 0.0, 0.0, 12 * raw_model.num_parameters() / 100e6
    skipped_in_a_row = 0
    while True:
        last, eval_start = step == config.max_steps, clock()
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
            for i, text in enumerate(samples):
                print0(f"sample {i}: {text!r}")
            log.event({"step": step, "samples": samples},
                      "\n".join(f"step {step} sample {i}: {t!r}" for i, t in enumerate(samples)))
        if last:
            return 0
        slowest_eval = max(slowest_eval, clock() - eval_start)

        # The step proper, timed alone: evaluations and checkpoints stay out of ms/step and MFU.
        lr = get_lr(step, config)
        # Going on past this step needs time for it, the next evaluations and step, and a checkpoint.
        out_of_time = master and config.time_limit > 0 and (
            clock() - started + 2 * slowest_step + slowest_eval + checkpoint_seconds > config.time_limit)
        synchronize(device)
        t0 = clock()
        try:
            loss, norm, skipped, stop = train_step(train_model, optimizer, train_loader, accum, lr, config, device,
                                                   autocast, scaler, stop=launch.signal is not None or out_of_time)
        except torch.OutOfMemoryError:
            raise TrainError(out_of_memory(config, device, step), every_rank=False) from None
        synchronize(device)
        dt = clock() - t0
        slowest_step, tokens_per_sec = max(slowest_step, dt), config.total_batch_size / dt
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
        if master and (due(config.checkpoint_interval, step, False) or step == config.max_steps or stop):
            t0 = clock()
            path = save_checkpoint(config, step, raw_model, optimizer, train_loader, scaler)
            log.text(f"step {step} checkpoint {path}")
            checkpoint_seconds = clock() - t0
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


def due(interval, step, last):
    """Whether an every-`interval`-steps event happens at this step (0 turns it off)."""
    return interval > 0 and (step % interval == 0 or last)


def build_model(config, device):
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    if config.init_from == "scratch":
        return GPT(model_config(config)).to(device)
    try:
        model = GPT.from_pretrained(config.init_from, vocab_size=config.vocab_size)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load --init-from {config.init_from} ({str(e).splitlines()[0]}); give a GPT-2 "
                         f"name (gpt2, gpt2-medium, ...) or a local Hugging Face directory")
    if config.seq_len > model.config.block_size:
        raise TrainError(f"invalid settings: seq_len={config.seq_len} is over {config.init_from}'s "
                         f"block_size={model.config.block_size}", exit_code=2)
    return model.to(device)


clock = time.perf_counter  # steps, evaluations and --time-limit are timed with it (a test may replace it)


# -----------------------------------------------------------------------------
# Evaluation: val loss, HellaSwag and samples


@torch.no_grad()
def evaluate_val(model, val_loader, num_rows, rank, world_size, device, autocast):
    """Mean loss over the first num_rows val windows. Rank r takes rows r::W in batches of the
    training shape (the last one padded with ignored targets: one shape for compile); the summed
    losses and token counts are all-reduced, so the result does not depend on W."""
    rows, B, totals = list(range(rank, num_rows, world_size)), val_loader.B, torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(rows), B):
        x, y = val_loader.read_rows(rows[i:i + B])
        x = torch.cat([x, x.new_zeros(B - len(x), x.size(1))])
        y = torch.cat([y, y.new_full((B - len(y), y.size(1)), -1)])  # -1: ignored by the loss
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        n = (y != -1).sum().item()
        totals += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    return mean_over_ranks(totals, device)


def evaluate_hellaswag(model, examples, rank, world_size, device, config):
    """acc_norm over all examples, split over ranks by hellaswag.py and reduced here."""
    # batch_size // 4 examples = batch_size rows (4 endings each), no longer than training rows
    result = hellaswag.evaluate(model, examples, device, batch_size=max(1, config.batch_size // 4), rank=rank,
                                world_size=world_size, autocast_dtype=autocast_dtype_for(config.dtype, device))
    return mean_over_ranks(torch.tensor([result["correct_norm"], result["total"]], dtype=torch.float64), device)


def mean_over_ranks(totals, device):
    """totals[0] / totals[1], each summed over ranks (float64: CPU and CUDA have it, MPS runs alone)."""
    if dist.is_initialized():
        totals = all_reduce_sum(totals.to(device)).cpu()
    return (totals[0] / totals[1]).item()


def sample(raw_model, config, device, autocast):
    """Continuations of the prompt, with a fixed seed so samples of different steps compare."""
    enc = get_tokenizer()
    prompt = torch.tensor(enc.encode_ordinary(config.sample_prompt), dtype=torch.long, device=device)
    with autocast:
        out = raw_model.generate(prompt.repeat(config.num_samples, 1), config.sample_tokens, top_k=50,
                                 generator=torch.Generator(device=device).manual_seed(42))
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# What `auto` picks: precision, compile and the micro batch
#
#                    --dtype                 --compile  --batch-size (micro batch per device)
#   CUDA, Ampere on  bfloat16 autocast       on         the largest of 64, 32, ..., 1 that fits a trial step
#   CUDA, older      float16 + grad scaler   on         the same
#   MPS, CPU         float32                 off        estimated from the free memory
# compile needs Triton: CUDA GPUs from Volta on, not Windows. The resolved values are printed and
# go into log.txt and the checkpoints.


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


def batch_size_candidates(config, world_size):
    """Powers of two up to 64 that divide the rows each rank reads per step, largest first."""
    rows = config.total_batch_size // (config.seq_len * world_size)
    return [b for b in (64, 32, 16, 8, 4, 2, 1) if rows % b == 0]


def auto_batch_size(config, device, world_size):
    """-> (batch size, how it was chosen). Under torchrun every rank takes the smallest that fit on
    any rank, so that all run the same number of micro steps."""
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
        batch_size = (fitting or candidates[-1:])[0]
        how = (f" (auto: {per_row / 1e9:.2f} GB per row, within {budget / 1e9:.1f} GB: half the free memory)"
               if budget else " (auto: the free memory is unknown here)")
    if dist.is_initialized():
        smallest = torch.tensor([batch_size or 0], device=device)  # 0: none fit on some rank
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        batch_size = int(smallest.item())
    if not batch_size:
        raise TrainError(f"out of {device.type} memory at --batch-size 1 (one row of --seq-len {config.seq_len}); "
                         f"use a shorter --seq-len or a smaller model")
    return batch_size, how


def first_that_fits(batch_sizes, try_step, device):
    """(B, try_step(B)) for the first B that runs without running out of memory, or (None, None);
    a failed try's memory is given back before the next."""
    for batch_size in batch_sizes:
        try:
            return batch_size, try_step(batch_size)
        except torch.OutOfMemoryError:
            pass  # leaving the except block drops the traceback, and with it the failed try's tensors
        free_memory(device)
    return None, None


def trial_step(config, device, batch_size):
    """One step of a throwaway model at this micro batch, as the run takes it (dtype, compile, AdamW)
    but without train_step's all-reduces: ranks whose tries differ must not meet in a collective."""
    raw_model = build_model(config, device)
    optimizer, _ = raw_model.configure_optimizers(config.weight_decay, config.max_lr, device_type=device.type)
    model = torch.compile(raw_model) if config.compile else raw_model
    autocast, scaler = autocast_and_scaler(config.dtype, device)
    tokens = torch.zeros(batch_size, config.seq_len, dtype=torch.long, device=device)
    with autocast:
        _, loss = model(tokens, tokens)
    (scaler.scale(loss) if scaler else loss).backward()
    optimizer.step()  # allocates AdamW's two moments


def activation_bytes(model_config, seq_len):
    """Bytes a training step holds per row of seq_len tokens in float32: per token about 17 * n_embd
    values per layer kept for backward (Korthikanti et al. 2022, without dropout), plus 4 * vocab for
    the logits, their log-softmax and both gradients. With 16 bytes per parameter (weights, gradients,
    AdamW's moments) it came within 10% of a step's measured peak memory on CPU."""
    return 4 * seq_len * (17 * model_config.n_layer * model_config.n_embd + 4 * model_config.vocab_size)


def out_of_memory(config, device, step):
    """The one line for running out of memory in the middle of training."""
    fix = (f"relaunch with --batch-size {config.batch_size // 2} (same total batch, more micro steps; it resumes "
           f"from the last checkpoint)" if config.batch_size > 1 else "use a shorter --seq-len or a smaller model")
    return f"out of {device.type} memory at step {step} with --batch-size {config.batch_size}; {fix}"


def device_peak_flops(config, device):
    if config.peak_flops or device.type != "cuda":
        return config.peak_flops  # none on cpu and mps: no reliable number, so no MFU
    return peak_flops_of(torch.cuda.get_device_name(device), config.dtype)


# -----------------------------------------------------------------------------
# Settings that cannot work, and what a resumed run must keep


# A resumed run keeps what it learns (LEARNING); where and how it runs and reports may change, the
# micro batch and device count too (the loader counts rows), and the lr schedule (RETUNABLE: a
# rollback after a loss spike may lower it; the change is printed).
LEARNING = {"model", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "init_from", "seq_len", "shuffle",
            "total_batch_size", "max_steps", "weight_decay", "beta1", "beta2", "adam_eps", "dtype", "seed"}
RETUNABLE = {"max_lr", "min_lr", "warmup_steps", "grad_clip"}
CHECKS = [  # (settings, what each must be, the test)
    ("seq_len total_batch_size max_steps max_lr adam_eps keep_checkpoints num_samples sample_tokens "
     "max_skipped_steps dist_timeout peak_flops", "be positive", lambda v: v > 0),
    ("warmup_steps min_lr weight_decay grad_clip eval_interval val_tokens hellaswag_interval sample_interval "
     "checkpoint_interval stop_at_step time_limit seed", "not be negative", lambda v: v >= 0),
    ("beta1 beta2", "be in [0, 1)", lambda v: 0 <= v < 1),
]


def config_problems(c, world_size):
    """Every setting that cannot work, as readable strings."""
    values = {f.name: getattr(c, f.name) for f in fields(c)}
    bad = [f"{k}={v} must be a finite number" for k, v in values.items() if type(v) is float and not math.isfinite(v)]
    batch_size = 1 if c.batch_size == "auto" else c.batch_size  # auto divides the step
    bad += [f"{k}={values[k]} must {what}" for names, what, test in CHECKS for k in names.split()
            if values[k] is not None and math.isfinite(values[k]) and not test(values[k])]
    per_micro_step = batch_size * c.seq_len * world_size
    checks = [
        (batch_size <= 0, f"batch_size={batch_size} must be positive"),
        (c.sample_interval and not c.sample_prompt, "sample_prompt is empty; give one, or --sample-interval 0"),
        (os.path.exists(c.log_dir) and not os.path.isdir(c.log_dir), f"log_dir={c.log_dir} is a file, not a directory"),
        (os.path.isfile(c.init_from), f"init_from={c.init_from} is a file, not a Hugging Face GPT-2: continue a "
         f"train_gpt2.py checkpoint with --resume {c.init_from}, or fine-tune from one after `python export.py "
         f"{c.init_from} DIR` with --init-from DIR"),
        (c.init_from.startswith(("/", "./", "../", "~")) and not os.path.exists(c.init_from),
         f"init_from={c.init_from} does not exist (give a local Hugging Face directory or a hub name such as gpt2)"),
        (c.overwrite and c.resume not in ("auto", "never"), f"--overwrite starts a new run: no --resume {c.resume}"),
        (c.init_from == "scratch" and c.seq_len > c.block_size,
         f"seq_len={c.seq_len} is over block_size={c.block_size}"),
        (c.warmup_steps > c.max_steps, f"warmup_steps={c.warmup_steps} is over max_steps={c.max_steps}"),
        (c.min_lr > c.max_lr, f"min_lr={c.min_lr} is over max_lr={c.max_lr}"),
        (c.eval_interval and 0 <= c.val_tokens < c.seq_len,
         f"val_tokens={c.val_tokens} is less than one sequence of seq_len={c.seq_len}"),
        (per_micro_step > 0 and c.total_batch_size % per_micro_step,
         f"total_batch_size={c.total_batch_size} is not divisible by batch_size * seq_len * world_size = "
         f"{batch_size} * {c.seq_len} * {world_size} = {per_micro_step}"),
    ]
    return list(model_config(c).problems()) + bad + [message for failed, message in checks if failed]


def check_resumable(saved, config):
    """Refuse to continue a run with settings that change what it learns, listing them all."""
    differ = [f"{k}={saved.get(k)!r} in the checkpoint but {v!r} now" for k, v in asdict(config).items()
              if k in LEARNING and saved.get(k) != v]
    retuned = [f"{k}={saved.get(k)!r} in the checkpoint, {getattr(config, k)!r} now" for k in sorted(RETUNABLE)
               if saved.get(k) != getattr(config, k)]
    if retuned and not differ:
        print0(f"note: {'; '.join(retuned)}: the lr schedule goes on with the new values")
    if differ:
        raise TrainError(f"the checkpoint's settings differ from the flags: {'; '.join(differ)}; relaunch with the "
                         f"checkpoint's settings, or another --log-dir / --overwrite for a new run", exit_code=2)


# -----------------------------------------------------------------------------
# The launch: ranks, signals, errors


def main(argv=None):
    """Run training -> the exit code: 0, 1 for a run-time problem, 2 for bad settings, 130 after Ctrl-C."""
    with Launch() as launch:
        config, rank = None, int(os.environ.get("RANK", 0))
        try:
            try:
                config, error = parse_args(argv), None
            except UserError as e:  # every rank has the same flags: agree() prints it once
                error = e
            start_distributed(config.dist_timeout if config else TrainConfig.dist_timeout)
            agree(error)
            return train(config, launch)
        except UserError as e:
            # An error every rank met is printed by rank 0 alone, and the ranks wait for it; one rank's
            # own error is printed by that rank, which then exits (torchrun stops the others).
            if not e.reported and (rank == 0 or not e.every_rank):
                print(f"error: {f'rank {rank}: ' if rank else ''}{e}", file=sys.stderr, flush=True)
            if not e.reported and e.every_rank and dist.is_initialized():
                dist.barrier()
            return e.exit_code
        except KeyboardInterrupt:
            saved = list_checkpoints(config.log_dir) if config else []
            print0(f"interrupted; {'the last checkpoint is ' + saved[-1] if saved else 'no checkpoint was saved'}; "
                   f"relaunch the same command to resume", file=sys.stderr)
            return 130
        except RuntimeError as e:
            lost = re.search(r"timed out|closed by peer|connection reset|NCCL", str(e), re.IGNORECASE)
            if not (dist.is_initialized() and lost):
                raise  # a bug, not a lost rank
            print(f"error: rank {rank}: lost contact with another rank ({str(e).strip().splitlines()[0]}); its own "
                  f"message, if any, is above; relaunch to resume from the last checkpoint", file=sys.stderr,
                  flush=True)
            return 1
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def cli():
    exit_code = main()
    if "RANK" in os.environ:
        # Under torchrun, leave without the interpreter's clean-up: DDP keeps gloo's threads alive to the
        # end, and one that frees a tensor during shutdown aborts the process (pytorch/pytorch#190489).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
