"""train_gpt2.py end to end on tiny GPTs and real text (Python's reference manual), on CPU.

The reference run ("straight") trains 8 steps in one go; resumed, killed-and-relaunched, DDP,
other micro batch, compiled and bf16 runs are compared with it. Runs call main(argv) in-process
where they can; exit codes, killed runs and torchrun use subprocesses.
"""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

import fineweb
import hellaswag
import train_gpt2
from model import GPT
from train_gpt2 import ShardLoader, TrainError, get_lr, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt2.py")
STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and other tests may share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_documents):
    path = tmp_path_factory.mktemp("data")
    fineweb.write_shards(corpus_documents, str(path), "pydocs", shard_size=4096, num_proc=1, progress=False)
    return str(path)


def args(data_dir, log_dir, *extra):
    """A tiny GPT (2 layers, 2 heads, 32 wide), 256 tokens per step = 4 x 32 x 2 micro steps."""
    return ["--data-dir", data_dir, "--log-dir", str(log_dir), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
            "--block-size", "64", "--vocab-size", "50257", "--seq-len", "32", "--batch-size", "4",
            "--total-batch-size", "256", "--max-steps", str(STEPS), "--warmup-steps", "2", "--max-lr", "1e-2",
            "--min-lr", "1e-3", "--eval-interval", "4", "--val-tokens", "512", "--hellaswag-interval", "0",
            "--sample-interval", "0", "--checkpoint-interval", "2", "--no-compile", "--dtype", "float32",
            "--device", "cpu", *extra]


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


def run_subprocess(argv, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=env, timeout=300,
                          **kwargs)


def run_torchrun(argv):
    """train_gpt2.py under torchrun, 2 processes on CPU (gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


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
    config = parse_args(args("d", "l"))
    assert series(straight, "lr") == {s: pytest.approx(get_lr(s, config)) for s in range(STEPS)}
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
    assert {"model", "model_config", "optimizer", "step", "config", "loader", "rng"} <= set(ckpt)
    assert ckpt["step"] == STEPS and ckpt["config"]["max_lr"] == 1e-2
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    # the model of the checkpoint reproduces the logged val loss
    model = GPT.from_checkpoint(os.path.join(straight, "checkpoints", f"step_{STEPS:08d}.pt"))
    loader = ShardLoader(data_dir, "val", 4, 32, min_rows=1)
    with torch.no_grad():
        losses = [model(*loader.read_rows(range(i, i + 4)))[1].item() for i in range(0, 16, 4)]
    assert sum(losses) / 4 == pytest.approx(series(straight, "val_loss")[STEPS], rel=1e-5)


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


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H800 PCIe", 756e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),  # "L4" is inside "L40S": longer names match first
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),  # a slice of an H100 has a fraction of its FLOP/s
    ("NVIDIA GeForce RTX 4090", None),  # unknown: no MFU rather than a wrong one (--peak-flops gives one)
])
def test_peak_flops_by_gpu_name(name, flops):
    assert train_gpt2.peak_flops_of(name, "bfloat16") == flops


# -----------------------------------------------------------------------------
# Resume: stopped, corrupt checkpoint, killed


def test_a_stopped_run_resumed_with_the_same_arguments_matches_bitwise(straight, data_dir, tmp_path):
    assert main(args(data_dir, tmp_path, "--stop-at-step", "4")) == 0
    assert sorted(series(tmp_path, "train_loss")) == [0, 1, 2, 3]
    assert main(args(data_dir, tmp_path)) == 0  # relaunch: --resume auto
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")  # fp32 on CPU: bitwise
    assert series(tmp_path, "val_loss") == series(straight, "val_loss")
    final, reference = checkpoint(tmp_path, STEPS), checkpoint(straight, STEPS)
    assert all(torch.equal(final["model"][k], reference["model"][k]) for k in reference["model"])
    with open(tmp_path / "log.txt") as f:
        assert f.read().count("=== launch") == 2  # appended, one header per launch


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(straight, data_dir, tmp_path, capsys):
    assert main(args(data_dir, tmp_path, "--stop-at-step", "6")) == 0
    latest = tmp_path / "checkpoints" / "step_00000006.pt"
    os.truncate(latest, os.path.getsize(latest) // 2)  # a write cut short
    capsys.readouterr()
    assert main(args(data_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "resuming at step 4" in out
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")
    final, reference = checkpoint(tmp_path, STEPS)["model"], checkpoint(straight, STEPS)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.mark.multiprocess
def test_a_killed_run_relaunched_finishes_like_one_never_killed(straight, data_dir, tmp_path):
    argv = args(data_dir, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    first = tmp_path / "checkpoints" / "step_00000002.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "checkpoints" / f"step_{STEPS:08d}.pt").exists()
    result = run_subprocess(argv)
    assert result.returncode == 0, result.stderr
    assert series(tmp_path, "train_loss") == series(straight, "train_loss")  # also: no step twice
    assert series(tmp_path, "val_loss") == series(straight, "val_loss")


# -----------------------------------------------------------------------------
# Same tokens, same gradients: DDP, micro batch size


@pytest.mark.multiprocess
def test_ddp_on_two_processes_matches_one_process_with_accumulation(straight, data_dir, tmp_path):
    # 2 ranks x 1 micro step of 4 x 32 vs the straight run's 1 rank x 2 micro steps: same 256 tokens
    result = run_torchrun(args(data_dir, tmp_path, "--stop-at-step", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices x 1 micro steps" in result.stdout
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in checkpoint(tmp_path, 4)["model"])
    # the DDP checkpoint resumes in one process (another world size, same total batch)
    assert main(args(data_dir, tmp_path)) == 0
    assert_close_runs(tmp_path, straight, atol=1e-5)  # steps 0-3 on 2 ranks, 4-7 on one


@pytest.mark.multiprocess
def test_under_torchrun_only_rank_0_prints_and_every_rank_fails(data_dir, tmp_path):
    result = run_torchrun(args(data_dir, tmp_path, "--total-batch-size", "384"))  # 384 tokens over 2 x 4 x 32
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: invalid settings: total_batch_size=384 is not divisible by batch_size * seq_len * "
                      "world_size = 4 * 32 * 2 = 256"]
    assert "exitcode  : 2" in result.stderr  # torchrun's report (a rank still running is then stopped)


@pytest.mark.multiprocess
def test_under_torchrun_a_non_finite_loss_stops_every_rank_with_one_line(data_dir, tmp_path):
    # lr 1e30 as in the one-process test: step 1's loss is NaN on both ranks, found by the
    # all-reduced flag; no rank may step, hang in a collective, or print twice.
    result = run_torchrun(args(data_dir, tmp_path, "--batch-size", "4", "--max-lr", "1e30", "--warmup-steps", "0",
                               "--checkpoint-interval", "1"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss/grad norm at step 1"), result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001.pt"]
    assert all(torch.isfinite(v).all() for v in checkpoint(tmp_path, 1)["model"].values())
    assert sorted(series(tmp_path, "train_loss")) == [0]


def test_another_micro_batch_with_the_same_total_batch_gives_the_same_run(straight, data_dir, tmp_path):
    assert main(args(data_dir, tmp_path, "--batch-size", "8")) == 0  # 1 micro step of 8 x 32
    assert_close_runs(tmp_path, straight, atol=1e-5)


def test_gradients_do_not_depend_on_the_micro_batch(data_dir):
    grads = []
    for batch_size in (2, 4, 8):  # 4, 2 and 1 micro steps of the same 256 tokens
        config = parse_args(args(data_dir, "unused", "--batch-size", str(batch_size), "--grad-clip", "0"))
        model = train_gpt2.build_model(config, torch.device("cpu"))
        optimizer, _ = model.configure_optimizers(0.0, 0.0, device_type="cpu")
        loader = ShardLoader(data_dir, "train", batch_size, 32)
        loss, norm = train_gpt2.train_step(model, optimizer, loader, 256 // (batch_size * 32), 0.0, config,
                                           torch.device("cpu"), nullcontext(), 0)
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
    ("The chef cracked two eggs into the bowl and", ["whisked them with a fork.", "parked the car outside.",
                                                     "sang to the audience.", "climbed the ladder to the roof."], 0),
    ("To open the file, the program first", ["barks at the mailman.", "calls the open function with its name.",
                                             "melts in the sun.", "plants a tree."], 1),
    ("She put on her running shoes and", ["ate the shoes.", "read the newspaper upside down.",
                                          "went for a jog around the park.", "turned into a bird."], 2),
    ("A for loop in Python repeats its body", ["once for every item of the sequence.", "only on Tuesdays.",
                                               "until the cat wakes up.", "in a different language."], 0),
    ("The function returns None when it", ["is hungry.", "is painted red.",
                                           "reaches the end without a return statement.", "sleeps."], 2),
    # Longer than 32 tokens: HellaSwag batches come in two lengths, 64 and 32, under compile too.
    ("When the interpreter imports a module for the first time, it compiles the source to byte code, "
     "stores that byte code in a cache directory next to the file, and on every later import it",
     ["loads the cached byte code instead of compiling again.", "forgets the module.", "prints the file.",
      "deletes the directory."], 0),
]


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    with open(path, "w") as f:
        for ctx, endings, label in HELLASWAG:
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": label}) + "\n")
    return str(path)


def test_compiled_training_evaluates_and_samples_without_recompiling(straight, data_dir, hellaswag_file, tmp_path,
                                                                     monkeypatch):
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    graphs = []  # compiled graphs so far, after each training step (and the evals before it)

    def counting_train_step(*a, **k):
        result = train_step(*a, **k)
        graphs.append(counters["stats"]["unique_graphs"])
        return result

    train_step = train_gpt2.train_step
    monkeypatch.setattr(train_gpt2, "train_step", counting_train_step)
    argv = args(data_dir, tmp_path, "--compile", "--stop-at-step", "4", "--eval-interval", "1",
                "--hellaswag-interval", "1", "--hellaswag-file", hellaswag_file,
                "--sample-interval", "1", "--sample-tokens", "6", "--num-samples", "2")
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
    model = GPT.from_checkpoint(os.path.join(tmp_path, "checkpoints", "step_00000002.pt"))
    result = hellaswag.evaluate(model, hellaswag.load_examples(hellaswag_file), "cpu")
    assert series(tmp_path, "hellaswag_acc")[2] == result["correct_norm"] / result["total"]


@pytest.mark.multiprocess
def test_compiled_model_inside_ddp_trains_like_the_plain_run_and_scores_hellaswag_over_ranks(
        straight, data_dir, hellaswag_file, tmp_path):
    # The 8-GPU set-up in small: torch.compile inside DDP (2 gloo ranks), val loss, HellaSwag split
    # over the ranks and all-reduced, samples on rank 0.
    result = run_torchrun(args(data_dir, tmp_path, "--compile", "--stop-at-step", "4", "--hellaswag-interval", "2",
                               "--hellaswag-file", hellaswag_file, "--sample-interval", "4", "--sample-tokens", "6"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sample 0: ") == 1  # step 0, printed once (rank 0)
    for key in ("train_loss", "grad_norm"):
        got, want = series(tmp_path, key), series(straight, key)
        assert sorted(got) == [0, 1, 2, 3]
        for step in got:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (key, step)
    assert series(tmp_path, "val_loss")[0] == pytest.approx(series(straight, "val_loss")[0], abs=1e-4)
    assert sorted(series(tmp_path, "hellaswag_acc")) == [0, 2]
    # The all-reduced accuracy = one process scoring every example with the weights of step 2.
    model = GPT.from_checkpoint(os.path.join(tmp_path, "checkpoints", "step_00000002.pt"))
    reference = hellaswag.evaluate(model, hellaswag.load_examples(hellaswag_file), "cpu")
    assert series(tmp_path, "hellaswag_acc")[2] == reference["correct_norm"] / reference["total"]


def test_bf16_autocast_trains_close_to_float32(straight, data_dir, tmp_path):
    assert main(args(data_dir, tmp_path, "--dtype", "bfloat16", "--stop-at-step", "4")) == 0
    reference = series(straight, "train_loss")
    losses = series(tmp_path, "train_loss")
    assert sorted(losses) == [0, 1, 2, 3]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=0.05) and loss != reference[step]  # bf16, not fp32
    assert series(tmp_path, "val_loss")[0] == pytest.approx(series(straight, "val_loss")[0], abs=0.05)


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
    err = error_of(capsys, args(data_dir, tmp_path, "--n-embd", "50", "--n-head", "3", "--seq-len", "128",
                                "--warmup-steps", "20", "--max-steps", "10", "--max-lr", "1e-3", "--min-lr", "1e-2"), 2)
    for problem in ("n_embd=50 is not divisible by n_head=3", "seq_len=128 is over block_size=64",
                    "warmup_steps=20 is over max_steps=10", "min_lr=0.01 is over max_lr=0.001"):
        assert problem in err


def test_a_checkpoint_whose_settings_differ_from_the_flags(straight, data_dir, tmp_path, capsys):
    log_dir = tmp_path / "run"
    shutil.copytree(straight, log_dir)

    def snapshot():
        return {name: hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
                for root, _, names in os.walk(log_dir) for name in names}

    before = snapshot()
    err = error_of(capsys, args(data_dir, log_dir, "--max-lr", "1e-3", "--seed", "7"), 2)
    assert "max_lr=0.01 in the checkpoint but 0.001 now" in err and "seed=1337 in the checkpoint but 7 now" in err
    assert snapshot() == before  # nothing written, nothing removed


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path, capsys):
    # lr 1e30: step 0 is fine, its update blows the weights up and step 1's loss is NaN
    err = error_of(capsys, args(data_dir, tmp_path, "--max-lr", "1e30", "--warmup-steps", "0",
                                "--checkpoint-interval", "1"), 1)
    assert "non-finite loss/grad norm at step 1" in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001.pt"]
    ckpt = checkpoint(tmp_path, 1)  # the last good one stays, readable
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert sorted(series(tmp_path, "train_loss")) == [0]


def test_a_non_finite_loss_leaves_parameters_and_optimizer_untouched(data_dir):
    config = parse_args(args(data_dir, "unused"))
    model = train_gpt2.build_model(config, torch.device("cpu"))
    optimizer, _ = model.configure_optimizers(0.1, 1e-3, device_type="cpu")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = ShardLoader(data_dir, "train", 4, 32)
    with pytest.raises(TrainError, match="non-finite loss/grad norm at step 5"):
        train_gpt2.train_step(model, optimizer, loader, 2, 1e-3, config, torch.device("cpu"), nullcontext(), 5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state  # AdamW never stepped


# -----------------------------------------------------------------------------
# The newcomer's first command


def test_demo_builds_its_data_and_trains_end_to_end(tmp_path, capsys):
    data, log = tmp_path / "demo_data", tmp_path / "log_demo"
    assert main(["--demo", "--data-dir", str(data), "--log-dir", str(log), "--max-steps", "4", "--warmup-steps", "1",
                 "--eval-interval", "4", "--val-tokens", "2048", "--sample-interval", "4", "--sample-tokens", "8"]) == 0
    assert sorted(os.listdir(data))[-1].startswith("pydocs_val_") and len(os.listdir(data)) > 5
    out = capsys.readouterr().out
    assert "val loss" in out and "sample 0: \"Hello, I'm a language model," in out
    assert sorted(series(log, "train_loss")) == [0, 1, 2, 3] and sorted(series(log, "val_loss")) == [0, 4]
    config = checkpoint(log, 4)["config"]
    assert (config["n_layer"], config["n_embd"], config["seq_len"], config["demo"]) == (4, 128, 128, True)


# -----------------------------------------------------------------------------
# What `auto` picks (dtype, compile, batch size), float16's scaler, out of memory, per-dtype peaks


@pytest.mark.parametrize("kind, capability, triton, system, dtype, compiled", [
    ("cuda", (9, 0), True, "Linux", "bfloat16", True),  # H100
    ("cuda", (8, 0), True, "Linux", "bfloat16", True),  # A100: the first with bf16
    ("cuda", (7, 5), True, "Linux", "float16", True),  # T4: no bf16, so float16 (and a scaler)
    ("cuda", (8, 6), True, "Windows", "bfloat16", False),  # no official Triton on Windows
    ("cuda", (9, 0), False, "Linux", "bfloat16", False),  # Triton missing (or a GPU older than Volta)
    ("mps", None, True, "Darwin", "float32", False),
    ("cpu", None, True, "Linux", "float32", False),
])
def test_auto_dtype_and_compile_for_each_device(kind, capability, triton, system, dtype, compiled, monkeypatch,
                                                 capsys):
    import platform

    import torch.utils._triton
    from common import autocast_dtype_for
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
    monkeypatch.setattr(platform, "system", lambda: system)
    device = torch.device(kind)
    config = train_gpt2.resolve_auto(parse_args(["--batch-size", "8"]), device, 1)
    assert (config.dtype, config.compile, config.batch_size) == (dtype, compiled, 8)
    printed = f"dtype {dtype} (auto), compile {'on' if compiled else 'off'} (auto), batch size 8\n"
    assert capsys.readouterr().out == printed
    # hellaswag.py and bench.py autocast to the same dtype; explicit flags are kept as given
    assert autocast_dtype_for("auto", device) == (None if dtype == "float32" else getattr(torch, dtype))
    forced = train_gpt2.resolve_auto(parse_args(["--batch-size", "8", "--dtype", "float16", "--no-compile"]), device, 1)
    assert (forced.dtype, forced.compile) == ("float16", False)


def test_compile_flag_takes_auto_on_and_off(capsys):
    assert parse_args([]).compile == "auto" and parse_args(["--compile", "auto"]).compile == "auto"
    assert parse_args(["--compile"]).compile is True and parse_args(["--no-compile"]).compile is False
    assert parse_args(["--compile", "--seed", "3"]).compile is True  # no value swallowed from the next flag
    with pytest.raises(SystemExit):
        parse_args(["--no-compile", "auto"])
    assert "--no-compile takes no value" in capsys.readouterr().err


@pytest.mark.parametrize("total, seq_len, world_size, candidates", [
    (524288, 1024, 1, [64, 32, 16, 8, 4, 2, 1]),  # 512 rows a step: every power of two up to 64
    (524288, 1024, 16, [32, 16, 8, 4, 2, 1]),  # 32 rows per rank
    (48 * 1024, 1024, 1, [16, 8, 4, 2, 1]),  # 48 rows: 32 and 64 do not divide it
    (3 * 1024, 1024, 1, [1]),
])
def test_batch_size_candidates_divide_the_rows_of_a_step(total, seq_len, world_size, candidates):
    config = parse_args(["--total-batch-size", str(total), "--seq-len", str(seq_len)])
    assert train_gpt2.batch_size_candidates(config, world_size) == candidates


def test_batch_size_search_on_a_fake_memory_limit(monkeypatch):
    events = []
    monkeypatch.setattr(train_gpt2, "free_memory", lambda device: events.append("free"))

    def step(batch_size):  # 12 rows of memory: more raise as CUDA does
        events.append(batch_size)
        if batch_size > 12:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} rows")
        return f"ran {batch_size}"

    assert train_gpt2.first_that_fits([64, 32, 16, 8, 4], step, torch.device("cpu")) == (8, "ran 8")
    assert events == [64, "free", 32, "free", 16, "free", 8]  # each failed try's memory freed before the next
    assert train_gpt2.first_that_fits([64, 32, 16], step, torch.device("cpu")) == (None, None)


def test_auto_batch_size_on_cuda_is_the_largest_trial_step_that_fits(monkeypatch):
    tried = []

    def trial_step(config, device, batch_size):
        tried.append(batch_size)
        if batch_size * config.seq_len > 20 * 1024:  # a GPU that holds 20 rows of 1024
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_gpt2, "trial_step", trial_step)
    monkeypatch.setattr(train_gpt2, "free_memory", lambda device: None)
    config = parse_args(["--dtype", "bfloat16", "--compile"])
    batch_size, how = train_gpt2.auto_batch_size(config, torch.device("cuda"), 1)
    assert (batch_size, how) == (16, " (auto: the largest that fit a trial step)")
    assert tried == [64, 32, 16]
    tried.clear()
    with pytest.raises(TrainError, match="out of cuda memory at --batch-size 1 .* use a shorter --seq-len"):
        train_gpt2.auto_batch_size(replace(config, seq_len=32768, block_size=32768), torch.device("cuda"), 1)
    assert tried == [16, 8, 4, 2, 1]  # 16 rows of 32768 per step: candidates from 16 down


@pytest.mark.multiprocess
def test_under_torchrun_every_rank_takes_the_smallest_batch_size_that_fit(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text("""if True:
        import os, sys, torch, train_gpt2
        config = train_gpt2.parse_args(sys.argv[1:])
        model = train_gpt2.build_model(config, torch.device("meta"))
        per_row, fixed = train_gpt2.activation_bytes(model.config, config.seq_len), 16 * model.num_parameters()
        rows = 64 if os.environ["RANK"] == "0" else 4.5  # the memory of rank 0 holds 64 rows, rank 1's 4
        train_gpt2.memory_budget = lambda processes: fixed + rows * per_row
        rank, _, world_size, device = train_gpt2.setup_distributed("cpu")
        print(f"rank {rank}: batch size {train_gpt2.auto_batch_size(config, device, world_size)[0]}")
        train_gpt2.cleanup()""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "256", "--total-batch-size", "32768"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    # Both ranks print to one pipe, and a line's text and its newline may be written apart: find the pairs.
    assert sorted(re.findall(r"rank (\d): batch size (\d+)", result.stdout)) == [("0", "4"), ("1", "4")]


def test_the_trial_step_changes_nothing_the_run_computes(straight, data_dir, tmp_path, monkeypatch):
    # The CUDA search on CPU: real trial steps (8 rows "out of memory", then 4) before the run.
    def search(config, device, world_size):
        def trial(batch_size):
            if batch_size > 4:
                raise torch.OutOfMemoryError("fake")
            train_gpt2.trial_step(config, device, batch_size)
        return train_gpt2.first_that_fits([8, 4, 2, 1], trial, device)[0], " (trial)"

    monkeypatch.setattr(train_gpt2, "auto_batch_size", search)
    assert main(args(data_dir, tmp_path, "--batch-size", "auto", "--stop-at-step", "4")) == 0
    assert checkpoint(tmp_path, 4)["config"]["batch_size"] == 4  # what ran, not "auto"
    straight_losses = series(straight, "train_loss")
    assert series(tmp_path, "train_loss") == {s: straight_losses[s] for s in range(4)}  # bitwise


@pytest.mark.parametrize("budget_rows, expected", [(100, 8), (5.5, 4), (2.5, 2), (0.5, 1), (None, 1)])
def test_cpu_batch_size_from_the_free_memory(budget_rows, expected, monkeypatch):
    config = parse_args(args("d", "l", "--batch-size", "auto"))  # 256 tokens a step: 8 rows of 32
    model = train_gpt2.build_model(config, torch.device("meta"))
    per_row, fixed = train_gpt2.activation_bytes(model.config, 32), 16 * model.num_parameters()
    budget = None if budget_rows is None else fixed + budget_rows * per_row
    monkeypatch.setattr(train_gpt2, "memory_budget", lambda processes: budget)
    batch_size, how = train_gpt2.auto_batch_size(config, torch.device("cpu"), 1)
    assert batch_size == expected
    assert ("free memory is unknown" in how) == (budget is None)


def test_memory_estimate_is_near_a_measured_training_step():
    # Peak resident memory of one real training step of the demo GPT (8 x 128 tokens), measured in
    # a fresh process, against 16 bytes per parameter + activation_bytes per row.
    code = """if True:
        import torch, train_gpt2
        from types import SimpleNamespace
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
        config, device = train_gpt2.parse_args(["--demo"]), torch.device("cpu")
        train_gpt2.keep_freed_memory()
        before = status("VmRSS")
        model = train_gpt2.build_model(config, device)
        optimizer, _ = model.configure_optimizers(0.1, 1e-3, device_type="cpu")
        tokens = torch.randint(0, 50257, (config.batch_size, config.seq_len))
        loader = SimpleNamespace(next_batch=lambda: (tokens, tokens))
        train_gpt2.train_step(model, optimizer, loader, 1, 1e-3, config, device, torch.autocast("cpu", enabled=False), 0)
        per_row = train_gpt2.activation_bytes(model.config, config.seq_len)
        estimate = 16 * model.num_parameters() + config.batch_size * per_row
        print(estimate / (status("VmHWM") - before))"""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from Linux's /proc")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert 0.8 < float(result.stdout) < 1.25


def test_auto_settings_are_resolved_in_the_checkpoint_and_resume(straight, data_dir, tmp_path, capsys):
    auto = ("--dtype", "auto", "--compile", "auto", "--batch-size", "auto")
    assert main(args(data_dir, tmp_path, *auto, "--stop-at-step", "4")) == 0
    assert "dtype float32 (auto), compile off (auto), batch size 8 (auto: " in capsys.readouterr().out
    config = checkpoint(tmp_path, 4)["config"]
    assert (config["dtype"], config["compile"], config["batch_size"]) == ("float32", False, 8)  # 8 rows = 1 micro step
    assert main(args(data_dir, tmp_path, *auto)) == 0  # the resume check compares resolved settings
    assert_close_runs(tmp_path, straight, atol=1e-5)  # 1 x 8 rows instead of 2 x 4: the same tokens


def test_out_of_memory_mid_run_is_one_line_naming_a_smaller_batch_size(data_dir, tmp_path, capsys, monkeypatch):
    def train_step(model, optimizer, loader, accum, lr, config, device, autocast, step, scaler=None):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train_step(model, optimizer, loader, accum, lr, config, device, autocast, step, scaler)

    real_train_step = train_gpt2.train_step
    monkeypatch.setattr(train_gpt2, "train_step", train_step)
    err = error_of(capsys, args(data_dir, tmp_path), 1)
    assert err == ("error: out of cpu memory at step 2 with --batch-size 4; relaunch with --batch-size 2 (same total "
                   "batch, more micro steps; it resumes from the last checkpoint)\n")
    assert sorted(series(tmp_path, "train_loss")) == [0, 1]
    assert "--seq-len" in train_gpt2.out_of_memory(replace(parse_args([]), batch_size=1), torch.device("cuda"), 5)


def test_float16_overflow_is_the_scalers_to_handle_not_an_error(data_dir):
    config = parse_args(args(data_dir, "unused", "--dtype", "float16"))
    device = torch.device("cpu")
    model = train_gpt2.build_model(config, device)
    optimizer, _ = model.configure_optimizers(0.1, 1e-3, device_type="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autocast, _ = train_gpt2.autocast_and_scaler("float16", device)
    # A scale of 2^40 overflows float16 gradients (max 65504): the norm is inf, the loss finite.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    loader = ShardLoader(data_dir, "train", 4, 32)
    loss, norm = train_gpt2.train_step(model, optimizer, loader, 2, 1e-3, config, device, autocast, 0, scaler)
    assert math.isfinite(loss) and not math.isfinite(norm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the step was skipped
    assert scaler.get_scale() == 2.0 ** 39  # and the scale halved
    # A non-finite loss is still an error, scaler or not.
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(TrainError, match="non-finite loss/grad norm at step 1"):
        train_gpt2.train_step(model, optimizer, loader, 2, 1e-3, config, device, autocast, 1, scaler)


@pytest.mark.parametrize("name, dtype, flops", [
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12), ("NVIDIA H100 80GB HBM3", "float16", 989e12),
    ("NVIDIA H100 PCIe", "float32", 378e12), ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12), ("NVIDIA L4", "float32", 60e12), ("NVIDIA L40S", "float16", 362e12),
    ("Tesla V100-SXM2-16GB", "float16", 125e12), ("Tesla V100-PCIE-32GB", "float16", 112e12),
    ("Tesla V100S-PCIE-32GB", "float16", 130e12), ("Tesla V100-SXM2-16GB", "float32", 15.7e12),
    ("Tesla V100-SXM2-16GB", "bfloat16", None),  # no bf16 compute before Ampere: no MFU
    ("Tesla T4", "float16", 65e12), ("Tesla T4", "float32", 8.1e12),
])
def test_peak_flops_by_gpu_name_and_dtype(name, dtype, flops):
    assert train_gpt2.peak_flops_of(name, dtype) == flops


def test_mfu_divides_by_the_peak_of_the_run_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    for dtype, peak in (("float32", 156e12), ("bfloat16", 312e12), ("float16", 312e12)):
        assert train_gpt2.device_peak_flops(parse_args(["--dtype", dtype]), torch.device("cuda")) == peak
    assert train_gpt2.device_peak_flops(parse_args(["--peak-flops", "1e15"]), torch.device("cuda")) == 1e15
