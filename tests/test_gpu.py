"""What a machine with a CUDA GPU runs first: the checks that the CPU tests cannot make.

    GPT2_TIKTOKEN_FILE=$PWD/gpt2.tiktoken python -m pytest -q -m gpu tests

Each check is one helper taking a device. The test marked `gpu` runs it on "cuda" with what a GPU
gets by default (`--dtype auto`: bf16 autocast from Ampere on; compile on where Triton runs) and is
skipped where CUDA is absent; its CPU twin runs the same helper on "cpu" with CPU settings, so the
checking code itself runs in every test run, not only on the rare machine with a GPU. Offline,
GPT-2's vocabulary comes from GPT2_TIKTOKEN_FILE (tokenizer.py); nothing here needs `datasets`.
"""

import gc
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace

import pytest
import torch
from test_train import HELLASWAG, SCRIPT, args, checkpoint, model_flops_per_token, series

import bench
import common
import fineweb
import train_gpt2
from common import resolve_dtype
from train_gpt2 import main, parse_args

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing, as a new process would: earlier tests' graphs do not count
    against torch.compile's per-function limit of recompiles."""
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps({"ctx": c, "endings": e, "label": label}) + "\n" for c, e, label in HELLASWAG))
    return str(path)


# -----------------------------------------------------------------------------
# The demo with the auto defaults: loss falls; val loss, HellaSwag and samples; no recompiles


def run_demo_with_auto_defaults(device, directory, hellaswag_file, steps, val_tokens):
    """train_gpt2.py on the demo's settings in `directory` (its data made there by the run), dtype and compile left to
    the device, `steps` steps with val (over val_tokens), HellaSwag and samples at 0, steps/2 and the end -> its argv,
    exit code, what it printed, its log and data directories, and the graphs compiled after each training step."""
    torch._dynamo.reset()  # compiles from nothing, as a new process does
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]  # the count runs over the whole process
    graphs = []  # graphs compiled by this run, after each training step (and the evaluations before it)

    def counting_train_step(*a, **k):
        result = train_step(*a, **k)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        return result

    train_step = train_gpt2.train_step
    log, half = directory / "log", steps // 2
    # demo.toml pins float32 and no compile (the CPU demo), and no flag gives either back to the device: its copy
    # without those two lines (demo = true in it: the same data and preset otherwise)
    settings = directory / "demo-auto.toml"
    with open(train_gpt2.DEMO_CONFIG) as f:
        settings.write_text("".join(line for line in f if not line.startswith(("dtype ", "compile "))))
    argv = [
        "--config",
        str(settings),
        "--device",
        device,
        "--data-dir",
        str(directory / "demo_data"),
        "--log-dir",
        str(log),
        "--hellaswag-file",
        hellaswag_file,
        "--max-steps",
        str(steps),
        "--warmup-steps",
        str(steps // 5),
        "--eval-interval",
        str(half),
        "--val-tokens",
        str(val_tokens),
        "--hellaswag-interval",
        str(half),
        "--sample-interval",
        str(half),
        "--sample-tokens",
        "16",
    ]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, redirect_stdout(out):
        monkeypatch.setattr(train_gpt2, "train_step", counting_train_step)
        code = main(argv)
    return dict(argv=argv, code=code, out=out.getvalue(), log=log, data=directory / "demo_data", graphs=graphs)


def check_demo_with_auto_defaults(device, run, steps):
    """The demo's run with the auto defaults (run_demo_with_auto_defaults): loss falls; val loss, HellaSwag and
    samples; no recompiles -> the dtype and compile it resolved."""
    assert run["code"] == 0
    log, half, graphs = run["log"], steps // 2, run["graphs"]
    dtype, compiled = resolve_dtype("auto", torch.device(device)), common.compile_by_default(torch.device(device))
    out = run["out"]
    assert f"dtype {dtype} (auto), compile {'on' if compiled else 'off'} (auto); " in out
    assert "tokens per step = 8 x 128 x 1 devices x 2 micro steps; " in out  # demo.toml's micro batch
    config = checkpoint(log, steps)["config"]
    assert (config["dtype"], config["compile"]) == (dtype, compiled)  # what ran, not "auto"
    losses = series(log, "train_loss")
    assert sorted(losses) == list(range(steps)) and all(math.isfinite(v) for v in losses.values())
    assert losses[steps - 1] < losses[0] - 1.0
    val = series(log, "val_loss")
    assert sorted(val) == [0, half, steps] and val[steps] < val[0] - 1.0
    accuracy = series(log, "hellaswag_acc")  # through the compiled model where compile is on
    assert sorted(accuracy) == [0, half, steps] and all(0 <= a <= 1 for a in accuracy.values())
    samples = series(log, "samples")
    assert sorted(samples) == [0, half, steps]
    assert all(len(s) == 4 and all(t.startswith("Hello, I'm a language model,") for t in s) for s in samples.values())
    # Train, val and HellaSwag (two row lengths) all compiled before step 0's update, never again.
    assert graphs == [graphs[0]] * steps and (graphs[0] > 0) == compiled
    return dtype, compiled


@pytest.mark.gpu
@needs_cuda
def test_demo_on_cuda_with_bf16_and_compile(tmp_path, hellaswag_file):
    run = run_demo_with_auto_defaults("cuda", tmp_path, hellaswag_file, steps=150, val_tokens=8192)  # demo.toml's
    dtype, compiled = check_demo_with_auto_defaults("cuda", run, steps=150)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert dtype == "bfloat16"
    assert compiled  # Triton works on this GPU: torch.compile is on


def test_demo_on_cpu_with_the_auto_defaults(cpu_demo):
    # conftest's cpu_demo: run_demo_with_auto_defaults on "cpu", 8 steps, val loss over 2,048 tokens (test_train's
    # demo test reads the same run)
    assert check_demo_with_auto_defaults("cpu", cpu_demo, steps=8) == ("float32", False)


# -----------------------------------------------------------------------------
# The attention kernel that training runs


def attention_ops(device, compiled):
    """The SDPA ops (and, on a GPU, kernels) of one training step of the demo GPT, as train runs it."""
    device = torch.device(device)
    config = train_gpt2.parse_args(["--demo", "--device", device.type])
    config = replace(config, dtype=resolve_dtype("auto", device), compile=compiled)
    raw_model = train_gpt2.build_model(config, device)
    adamw = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    optimizers, _ = raw_model.configure_optimizers(1e-3, adamw)
    model = torch.compile(raw_model) if compiled else raw_model
    autocast, scaler = common.autocast_and_scaler(config.dtype, device)
    tokens = torch.randint(0, 50257, (config.batch_size * config.seq_len + 1,))
    loader = bench.RepeatedBatch(tokens, config.batch_size, config.seq_len)

    def step():
        train_gpt2.train_step(model, optimizers, loader, 1, 1e-3, config, device, autocast, scaler)

    step()  # compiles, when compiled
    return set(bench.attention_kernels(step, device))


@pytest.mark.gpu
@needs_cuda
def test_attention_runs_a_fused_sdpa_kernel_on_cuda():
    fused = {
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
    }  # cuDNN's is a flash-style kernel too (H100)
    for compiled in (True, False):  # the default on a GPU, and --no-compile
        ops = attention_ops("cuda", compiled)
        assert ops & fused and "aten::_scaled_dot_product_attention_math" not in ops, (compiled, ops)


def test_attention_runs_the_fused_sdpa_kernel_on_cpu():
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in attention_ops("cpu", compiled=False)


# -----------------------------------------------------------------------------
# Stop and resume; float16 with its gradient scaler


def device_args(data_dir, log_dir, device, *flags):
    """test_train's tiny run on `device`, with compile left to the device (on where Triton runs)."""
    return [flag for flag in args(data_dir, log_dir, "--device", device, *flags) if flag != "--no-compile"]


def check_stop_and_resume(device, data_dir, tmp_path, tolerance, *flags, steps=8):
    """A run stopped half way and relaunched against one straight run of `steps` steps (tiny GPT)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    length = ("--max-steps", str(steps))
    for log_dir, stop in ((straight, ()), (resumed, ("--stop-at-step", str(steps // 2))), (resumed, ())):
        torch._dynamo.reset()  # each launch compiles afresh, as a new process does
        assert main(device_args(data_dir, log_dir, device, *flags, *length, *stop)) == 0
    for key in ("train_loss", "grad_norm", "val_loss"):
        got, want = series(resumed, key), series(straight, key)
        assert got.keys() == want.keys()
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=tolerance, abs=0), (key, step)
    losses = series(straight, "train_loss")
    assert all(math.isfinite(v) for v in losses.values()) and losses[steps - 1] < losses[0] - 0.5
    # float16's loss scale and its count of good steps continue across the relaunch
    assert checkpoint(resumed, steps).get("scaler") == checkpoint(straight, steps).get("scaler")  # None: no scaler
    return checkpoint(straight, steps)


@pytest.mark.gpu
@needs_cuda
def test_stop_and_resume_on_cuda_continues_within_a_small_tolerance(data_dir, tmp_path):
    # bf16 on a GPU is not bitwise from run to run (atomic adds in some backward kernels): within 1e-3, which
    # a lost piece of state (the loader's position, the optimizer's moments, the schedule) exceeds many times
    final = check_stop_and_resume("cuda", data_dir, tmp_path, 1e-3, "--dtype", "auto")  # compile: on (Triton)
    assert final["config"]["dtype"] == resolve_dtype("auto", torch.device("cuda")) and final["config"]["compile"]


@pytest.mark.gpu
@needs_cuda
def test_float16_with_the_scaler_trains_and_resumes_on_cuda(data_dir, tmp_path):
    final = check_stop_and_resume("cuda", data_dir, tmp_path, 1e-3, "--dtype", "float16")
    assert final["config"]["dtype"] == "float16" and final["scaler"]["scale"] > 0


def test_stop_and_resume_on_cpu_with_the_auto_defaults_is_bitwise(data_dir, tmp_path):
    final = check_stop_and_resume("cpu", data_dir, tmp_path, 0, "--dtype", "auto")
    assert final["config"]["dtype"] == "float32" and not final["config"]["compile"] and "scaler" not in final


def test_float16_with_the_scaler_trains_and_resumes_bitwise_on_cpu(data_dir, tmp_path):
    # 4 steps, stopped after 2: float16's matmuls are emulated on a CPU (about 1 s a step here); the loss falls
    # 10.81 -> 10.18 (0.5 asked)
    final = check_stop_and_resume("cpu", data_dir, tmp_path, 0, "--dtype", "float16", steps=4)
    # 4 good steps in a row: the resumed run counted on from the checkpoint's 2, not from 0
    assert final["scaler"]["scale"] == 2.0**16 and final["scaler"]["_growth_tracker"] == 4


# -----------------------------------------------------------------------------
# torchrun with one process per GPU (NCCL)


def check_torchrun_one_process(device, data_dir, tmp_path, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_DEBUG="INFO")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        SCRIPT,
        *device_args(data_dir, tmp_path, device, *flags, "--stop-at-step", "4"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 devices x 2 micro steps" in result.stdout
    losses = series(tmp_path, "train_loss")
    assert sorted(losses) == [0, 1, 2, 3] and losses[3] < losses[0]
    final = checkpoint(tmp_path, 4)
    assert final["step"] == 4 and all(not k.startswith(("module.", "_orig_mod.")) for k in final["model"])
    return result.stdout + result.stderr


@pytest.mark.gpu
@needs_cuda
def test_torchrun_with_nccl_trains_and_checkpoints(data_dir, tmp_path):
    output = check_torchrun_one_process("cuda", data_dir, tmp_path, "--dtype", "auto")
    assert "NCCL INFO" in output  # the process group is NCCL's (setup_distributed picks it for cuda)


@pytest.mark.multiprocess
def test_torchrun_with_gloo_trains_and_checkpoints_on_cpu(data_dir, tmp_path):
    check_torchrun_one_process("cpu", data_dir, tmp_path)


# -----------------------------------------------------------------------------
# Out of memory on a real GPU: one line naming the --batch-size to relaunch with


@contextmanager
def gpu_memory_cap(gib):
    """This process may allocate at most `gib` GiB of the GPU: past it, torch.OutOfMemoryError."""
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.gpu
@needs_cuda
def test_out_of_memory_on_a_gpu_is_one_line_naming_a_smaller_batch_size(data_dir, tmp_path, capsys):
    gpt2 = [
        "--data-dir",
        data_dir,
        "--device",
        "cuda",
        "--no-compile",
        "--total-batch-size",
        "65536",
        "--max-steps",
        "1",
        "--warmup-steps",
        "0",
        "--eval-interval",
        "0",
        "--hellaswag-interval",
        "0",
        "--sample-interval",
        "0",
    ]
    with gpu_memory_cap(6):  # GPT-2 124M at 64 x 1024 tokens needs far more for its activations
        assert main([*gpt2, "--log-dir", str(tmp_path / "64"), "--batch-size", "64"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: out of memory with --batch-size 64; relaunch with --batch-size 32 (the same total "
        "batch in more micro steps)"
    ]
    assert not os.path.exists(tmp_path / "64" / "metrics.jsonl")


# -----------------------------------------------------------------------------
# The smoke run: GPT-2 124M as the real run trains it, 20 steps, and what a first run on a GPU needs to know


def smoke_run(device, tmp_path, hellaswag_file, monkeypatch, size_flags, batch_sizes, steps):
    """train_gpt2.py on the demo's data with the device's defaults (dtype, compile), val and HellaSwag at steps 0,
    steps/2 and the end, at the first of batch_sizes that fits -> what it saw, also written as JSON to
    $GPU_SMOKE_JSON (else into tmp_path): peak reserved memory against the device's, graphs compiled by the end
    of step 0 and after it, seconds to the end of step 0, and the median tokens/s and MFU of the later steps."""
    counters, graphs, ends = torch._dynamo.utils.counters, [], []
    before, started = counters["stats"]["unique_graphs"], time.perf_counter()

    def observed_train_step(*a, **k):
        result = train_step(*a, **k)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        ends.append(time.perf_counter() - started)
        return result

    train_step = train_gpt2.train_step
    monkeypatch.setattr(train_gpt2, "train_step", observed_train_step)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for batch_size in batch_sizes:  # the recipe's 64, or the largest the card holds
        log_dir = tmp_path / f"smoke-{batch_size}"
        flags = [
            "--data-dir",
            str(tmp_path / "data"),
            "--log-dir",
            str(log_dir),
            "--device",
            device,
            *size_flags,
            "--batch-size",
            str(batch_size),
            "--total-batch-size",
            str(batch_size * 1024 if cuda else batch_size * 32),
            "--max-steps",
            str(steps),
            "--warmup-steps",
            "2",
            "--eval-interval",
            str(steps // 2),
            "--val-tokens",
            "16384" if cuda else "512",
            "--hellaswag-interval",
            str(steps // 2),
            "--hellaswag-file",
            hellaswag_file,
            "--sample-interval",
            "0",
            "--checkpoint-interval",
            "0",
        ]
        graphs.clear()
        ends.clear()
        if main(flags) == 0:
            break
    records = [json.loads(line) for line in open(log_dir / "metrics.jsonl")]
    later = [r for r in records if "train_loss" in r and r["step"] >= 2]
    # MFU: the model's FLOPs of the logged tokens/s over the device's peak in the dtype the run computed in
    dtype, flops_per_token = resolve_dtype("auto", torch.device(device)), model_flops_per_token(parse_args(flags))
    peak = common.peak_flops_of(torch.cuda.get_device_name(), dtype) if cuda else None
    for r in later:
        if peak is None:  # a CPU, or a GPU not in the table: no MFU rather than a wrong one
            assert r["mfu"] is None, r
        else:
            assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_sec"] / peak, rel=1e-9), r
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    seen = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        batch_size=batch_size,
        steps=steps,
        graphs_after_step_0=graphs[0],
        recompiles=graphs[-1] - graphs[0],
        seconds_to_step_0=ends[0],
        tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in later),
        mfu=statistics.median(r["mfu"] for r in later) if later[0]["mfu"] is not None else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
        device_bytes=total,
        losses=[r["train_loss"] for r in records if "train_loss" in r],
        val_losses=[r["val_loss"] for r in records if "val_loss" in r],
        hellaswag=[r["hellaswag_acc"] for r in records if "hellaswag_acc" in r],
    )
    out = os.environ.get("GPU_SMOKE_JSON") or str(tmp_path / "smoke.json")
    with open(out, "w") as f:
        json.dump(seen, f, indent=1)
    print(json.dumps(seen))
    return seen


def check_smoke(seen, steps):
    assert len(seen["losses"]) == steps and all(math.isfinite(v) for v in seen["losses"])
    assert seen["losses"][-1] < seen["losses"][0] - 0.5  # it learns, from the first steps on
    assert len(seen["val_losses"]) == len(seen["hellaswag"]) == 3 and seen["val_losses"][-1] < seen["val_losses"][0]
    assert seen["recompiles"] == 0  # train, val and HellaSwag compiled before step 0's update, never again
    assert seen["tokens_per_sec"] > 0


@pytest.mark.gpu
@needs_cuda
def test_a_124m_smoke_run_fits_compiles_once_and_says_how_fast(tmp_path, hellaswag_file, monkeypatch):
    fineweb.write_python_docs(str(tmp_path / "data"))
    seen = smoke_run(
        "cuda",
        tmp_path,
        hellaswag_file,
        monkeypatch,
        [
            "--model",
            "gpt2",
            "--n-layer",
            "12",
            "--n-head",
            "12",
            "--n-embd",
            "768",
            "--block-size",
            "1024",
            "--seq-len",
            "1024",
            "--vocab-size",
            "50304",
        ],
        (64, 32, 16, 8),
        steps=20,
    )
    check_smoke(seen, 20)
    assert seen["graphs_after_step_0"] > 0  # compile is on by default on a GPU with Triton
    assert seen["peak_reserved_bytes"] < 0.9 * seen["device_bytes"]
    if seen["mfu"] is not None:  # a GPU of PEAK_FLOPS' table
        assert 0 < seen["mfu"] < 1


def test_the_smoke_run_on_cpu(tmp_path, hellaswag_file, monkeypatch):
    fineweb.write_python_docs(str(tmp_path / "data"))
    tiny = [
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "64",
        "--seq-len",
        "32",
        "--max-lr",
        "1e-2",
        "--min-lr",
        "1e-3",
    ]
    seen = smoke_run("cpu", tmp_path, hellaswag_file, monkeypatch, tiny, (8,), steps=8)
    check_smoke(seen, 8)
    assert seen["graphs_after_step_0"] == 0 and seen["mfu"] is None  # no compile, no peak on a CPU
