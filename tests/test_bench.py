"""bench.py runs end to end on a tiny preset and reports sane figures.

These tests check that the benchmark works, never how fast anything is: figures live in the
benchmark's output, not in timed tests, and no test compares one measured time with another.
What they do check could fail: the JSON's fields, the model's size and FLOPs counted by hand, which
parameters each optimizer updates and the Newton-Schulz FLOPs of a Muon step recomputed from the
matrices' shapes, the data section's token counts and that the prefetched batches are the rows a
synchronous read gives, that DDP's ranks end with the same weights and that gradient_as_bucket_view
saves one copy of the gradients, that the KV cache and the reference loop sample the same greedy
tokens, that batched and one-at-a-time HellaSwag give the same losses, that SDPA's fused kernel ran,
that a compiled step does not recompile, and that bad flags end with one line and exit code 2.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test preset's GPT, counted by hand: token embeddings (the tied lm_head) + positions +
# 2 blocks (2 LayerNorms, q/k/v, attention projection, MLP in and out, each with a bias) + ln_f.
C, V, T, L, B = 32, 50304, 64, 2, 2
BLOCK_PARAMETERS = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
PARAMETERS = V * C + T * C + L * BLOCK_PARAMETERS + 2 * C
# Muon's share (--optimizer muon): the four weight matrices of each block, (out, in) as nn.Linear holds them.
MUON_SHAPES = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L
RECIPE_TOKENS = 524288  # train_gpt2.py's default tokens per step


def ns_flops(shapes, steps=5):
    """Newton-Schulz on X (m x n, m <= n; a tall matrix is transposed): X X^T is 2mmn, (X X^T)^2 is 2mmm and
    that times X is 2mmn, an iteration; the adds and scalings are left out, as bench.py says."""
    return sum(steps * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n) for m, n in (sorted(s) for s in shapes))


def run_bench(call_main, *args):
    """`python bench.py ARGS` as bench.main in this process (conftest's call_main): its exit code, stdout and stderr.
    The ddp section's ranks are processes of their own, as they are from the command line."""
    import bench

    return subprocess.CompletedProcess(["bench.py", *args], *call_main(bench.main, *args))


@pytest.fixture(scope="module")
def eager_result(call_main):
    """Every single-process section, eager, float32 and bf16 autocast, on the test preset (a 2-layer GPT)."""
    sections = "matmul,train,optimizer,data,sample,hellaswag,fineweb"
    proc = run_bench(call_main, "--preset", "test", "--modes", "eager", "--sections", sections, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_meta_names_the_machine_and_the_model(eager_result):
    meta = eager_result["meta"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["model_config"] == dict(block_size=T, vocab_size=V, n_layer=L, n_head=2, n_embd=C)
    assert meta["parameters"] == PARAMETERS


def test_matmul_ceiling_per_dtype(eager_result):
    rows = eager_result["matmul"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["size"] == 256 and r["reps"] == 5
        assert all(math.isfinite(r[k]) for k in ("flops_median", "flops_best"))  # numbers, not None


def test_train_rows(eager_result):
    rows = eager_result["train"]
    assert [(r["mode"], r["dtype"]) for r in rows] == [("eager", "float32"), ("eager", "bfloat16")]
    for r in rows:
        assert (r["batch_size"], r["seq_len"]) == (B, T)
        assert all(math.isfinite(r[k]) for k in ("ms_per_step", "tokens_per_sec", "achieved_flops", "ceiling_ratio"))
        assert r["mfu"] is None and r["peak_flops"] is None  # no peak-FLOP/s table entry for a CPU
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"] == "process peak RSS"
        # SDPA's fused CPU kernel ran, forward and backward (not the unfused math fallback).
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["attention_kernels"]
        assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in r["attention_kernels"]


def test_flops_per_token_counted_by_hand(eager_result):
    # PaLM's estimate: 6 FLOPs per weight in a matmul (all but the position table), 12 * L * C * T for attention
    assert eager_result["train"][0]["flops_per_token"] == 6 * (PARAMETERS - T * C) + 12 * L * C * T


def test_optimizer_rows_split_the_parameters_as_train_gpt2_does(eager_result):
    adamw, muon = eager_result["optimizer"]
    for r in (adamw, muon):  # what train_gpt2.py picks on a CPU: no autocast, no compile
        assert (r["dtype"], r["mode"], r["batch_size"], r["seq_len"]) == ("float32", "eager", B, T)
        assert 0 < r["optimizer_ms"] < r["step_ms"] and 0 < r["step_fraction"] < 1
    assert adamw["optimizer"] == "adamw" and adamw["parameters"] == {"optimizer": PARAMETERS}
    assert list(adamw["optimizer_ms_by_name"]) == ["optimizer"]
    assert (adamw["muon_matrices"], adamw["newton_schulz_flops"]) == (0, 0)
    muon_parameters = sum(rows * cols for rows, cols in MUON_SHAPES)
    assert muon["optimizer"] == "muon"
    assert muon["parameters"] == {"optimizer": PARAMETERS - muon_parameters, "muon": muon_parameters}
    assert sorted(muon["optimizer_ms_by_name"]) == ["muon", "optimizer"]
    assert muon["muon_matrices"] == 4 * L and muon["newton_schulz_flops"] == ns_flops(MUON_SHAPES)
    assert muon["optimizer_ms"] == pytest.approx(sum(muon["optimizer_ms_by_name"].values()))
    # The recipe's step: 524,288 tokens = 4,096 micro steps of 2 x 64 on one device, 512 on each of 8.
    for devices, key in ((1, "recipe_fraction_1_device"), (8, "recipe_fraction_8_devices")):
        micro_steps = RECIPE_TOKENS // (B * T) // devices
        step = micro_steps * (muon["step_ms"] - muon["optimizer_ms"]) + muon["optimizer_ms"]
        assert muon[key] == pytest.approx(muon["optimizer_ms"] / step)


def test_muon_arithmetic_for_the_model_and_for_gpt2_124m(eager_result):
    tiny, gpt2 = eager_result["muon_arithmetic"]
    assert (tiny["matrices"], tiny["ns_steps"], tiny["parameters"]) == (4 * L, 5, PARAMETERS)
    assert tiny["newton_schulz_flops"] == ns_flops(MUON_SHAPES)
    assert tiny["step_flops"] == 6 * PARAMETERS * RECIPE_TOKENS
    # GPT-2 124M: 12 blocks of 768, 48 matrices; #27's "about 1.5 TFLOP a step: 0.3% of a full 524,288-token
    # step on one device, but about 3% of a rank's share on 8 GPUs" (0.39% and 3.1% with 6 * params * tokens).
    width = 768
    shapes = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * 12
    assert (gpt2["matrices"], gpt2["parameters"]) == (48, 124_475_904)
    assert gpt2["newton_schulz_flops"] == ns_flops(shapes) == 1_522_029_035_520
    assert gpt2["step_flops"] == 6 * 124_475_904 * RECIPE_TOKENS
    assert gpt2["share_1_device"] == pytest.approx(0.003887, rel=1e-3)
    assert gpt2["share_8_devices"] == pytest.approx(8 * 0.003887, rel=1e-3)


def test_data_rows_count_the_tokens_and_prefetch_the_rows_read_directly(eager_result):
    rows = eager_result["data"]
    assert [(r["cache"], r["read"]) for r in rows] == [
        ("warm", "prefetch"),
        ("warm", "sync"),
        ("cold", "prefetch"),  # Linux: madvise and posix_fadvise evict the shards
        ("cold", "sync"),
    ]
    for r in rows:
        assert (r["batch_size"], r["seq_len"], r["batches"], r["step_ms"]) == (4, 64, 3, 5.0)
        # 20,000 tokens in shards of 4,096: the val shard, then 15,904 train tokens in 4 shards (3 full, 1 not).
        assert (r["data_tokens"], r["train_tokens"], r["train_shards"]) == (20_000, 20_000 - 4096, 4)
        assert r["same_batches"]  # the prefetched batches are the rows read_rows gives, warm or cold
        assert 2 * r["train_tokens"] < r["train_bytes"] < 2 * r["train_tokens"] + 4096 * 4  # uint16 + .npy headers
        if r["cache"] == "warm":  # every page of the shards is in the page cache before each read...
            assert r["cached_bytes_min"] == r["train_bytes"]
        else:  # ...not when cold (evicted before the first batch; then read, and read ahead, a window at a time)
            assert r["cached_bytes_min"] < r["train_bytes"]
        assert 0 <= r["wait_ms_median"] <= r["wait_ms_max"] and r["wait_ms_mean"] <= r["wait_ms_max"]


def resident_pages(path):
    """Pages of the file in the page cache, by mincore(2) on a mapping of our own (Linux)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    try:
        assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
    finally:
        libc.munmap(address, size)
    return sum(page & 1 for page in pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and mincore: Linux")
def test_evict_drops_the_shards_the_loader_has_read_from_the_page_cache(data_dir):
    import bench
    from loader import ShardLoader

    with open("/proc/mounts") as f:  # tmpfs holds its files in the page cache: nothing to evict there
        mounts = [line.split() for line in f]
    filesystem = max((m for m in mounts if data_dir.startswith(m[1])), key=lambda m: len(m[1]))[2]
    if filesystem == "tmpfs":
        pytest.skip(f"{data_dir} is on tmpfs")
    loader = ShardLoader(data_dir, "train", 2, 32)
    loader.read_rows(range(loader.rows_per_epoch))  # every window: every page of every shard, through the map
    assert all(resident_pages(path) > 0 for path in loader.paths)
    bench.evict(loader)
    assert [resident_pages(path) for path in loader.paths] == [0] * len(loader.paths)


def test_sampling_with_and_without_cache_agree(eager_result):
    (r,) = eager_result["sample"]
    assert r["new_tokens"] == 24 and r["prompt_tokens"] == 8
    assert r["matching_tokens"] == r["new_tokens"]  # greedy, float32: the KV cache changes the speed, not the tokens


def test_hellaswag_batched_and_single_agree(eager_result):
    (r,) = eager_result["hellaswag"]
    assert r["examples"] == 8 and r["batch_size"] == 4
    assert r["source"] == "built from the Python docs' sentences"
    assert r["max_loss_difference"] < 1e-3  # same scores, whatever the batch


def test_fineweb_section_counts_the_tokens_of_a_plain_retokenization(eager_result, corpus_documents, tokenizer):
    # fineweb.py's shards and tiktoken alone (bench.py checks that both count the same) against an
    # independent count of the same 40 documents: [EOT] + their tokens.
    (r,) = eager_result["fineweb"]
    assert (r["documents"], r["num_proc"]) == (40, 1)
    assert r["tokens"] == sum(1 + len(tokenizer.encode_ordinary(text)) for text in corpus_documents[:40])


def test_examples_from_text_are_hellaswag_shaped(corpus_documents, tmp_path):
    import bench
    import hellaswag

    examples = bench.examples_from_text(12)
    assert len(examples) == 12
    assert [e["label"] for e in examples] == [0, 1, 2, 3] * 3
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    assert hellaswag.load_examples(str(path)) == examples  # hellaswag.py's own format check takes them
    manual = " ".join(" ".join(doc.split()) for doc in corpus_documents)  # whitespace as the builder sees it
    for e in examples:
        assert len(set(e["endings"])) == 4
        # Real text: context + the right ending is a sentence of the manual; every ending is in it.
        assert e["ctx"] + " " + e["endings"][e["label"]] in manual
        assert all(ending in manual for ending in e["endings"])


def test_table_has_a_row_per_measurement(eager_result, capsys):
    import bench

    bench.print_tables(eager_result)
    lines = capsys.readouterr().out.splitlines()
    for section in ("matmul", "train", "optimizer", "muon_arithmetic", "data", "sample", "hellaswag", "fineweb"):
        assert section in lines
    rows = [line.split()[:2] for line in lines]
    assert rows.count(["eager", "float32"]) == 1 and rows.count(["eager", "bfloat16"]) == 1
    assert rows.count(["adamw", "float32"]) == 1 and rows.count(["muon", "float32"]) == 1
    for cache in ("warm", "cold"):
        assert rows.count([cache, "prefetch"]) == 1 and rows.count([cache, "sync"]) == 1


@pytest.mark.multiprocess
def test_ddp_section_runs_train_step_on_two_ranks(eager_result, call_main):
    """bench.py starts itself under torch.distributed.run: 2 gloo ranks, a row for each setting."""
    proc = run_bench(call_main, "--preset", "test", "--sections", "ddp", "--modes", "eager", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["ddp"]
    assert [(r["gradient_as_bucket_view"], r["bucket_cap_mb"]) for r in rows] == [
        (False, 25),
        (False, 100),
        (True, 25),
        (True, 100),
    ]
    single = eager_result["train"][0]  # the same fresh weights and batch, float32, in one process
    for r in rows:
        assert (r["mode"], r["dtype"], r["world_size"], r["backend"]) == ("eager", "float32", 2, "gloo")
        assert (r["batch_size"], r["seq_len"]) == (B, T)
        assert r["ranks_agree"]  # every rank ends with the same weights
        assert r["first_loss"] == pytest.approx(single["first_loss"], abs=1e-5)  # each rank's batch is that batch
        assert r["gradient_bytes"] == 4 * PARAMETERS  # float32 gradients
        # Between steps a rank holds float32 copies of the parameters: the weights, AdamW's two moments, DDP's
        # buckets and the gradients, which gradient_as_bucket_view makes views of the buckets: one copy fewer.
        copies = 4 if r["gradient_as_bucket_view"] else 5
        assert r["held_memory_bytes"] == pytest.approx(copies * 4 * PARAMETERS, rel=0.1)


def test_compiled_step_does_not_recompile(call_main):
    """One compiled float32 step after the compiling one (CPU inductor takes ~20-30 s)."""
    proc = run_bench(
        call_main,
        "--preset",
        "test",
        "--sections",
        "train",
        "--modes",
        "compiled",
        "--dtypes",
        "float32",
        "--steps",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)["train"]
    assert (r["mode"], r["dtype"]) == ("compiled", "float32")
    assert r["recompiles"] == 0  # no graph compiled after the warm-up step, i.e. in the timed steps
    assert r["first_step_s"] > r["ms_per_step"] / 1000  # the first step compiles: seconds, against milliseconds
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["attention_kernels"]


def test_bad_flags_exit_2_with_one_line(call_main):
    proc = run_bench(
        call_main, "--preset", "test", "--dtypes", "float64", "--seq-len", "128", "--sections", "train,nope,data",
        "--data-tokens", "4200", "--ddp-processes", "1", "--ddp-bucket-mb", "25,0",
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in proc.stderr
    # Every offending value in the one line, each with what would work.
    assert "--dtypes float64 must be one of float32, bfloat16, float16" in line
    assert "--sections nope must be one of" in line
    assert "--seq-len 128 is over --block-size 64" in line
    assert "--data-tokens 4200 leaves 104 tokens after the val shard" in line  # 4 x 64 + 1 are needed
    assert "--ddp-processes 1 must be at least 2" in line
    assert "--ddp-bucket-mb 25,0 must be positive whole megabytes" in line


def test_demo_preset_is_train_gpt2_demo_model_and_flags_win():
    import tomllib

    import bench

    with open(os.path.join(ROOT, "configs", "demo.toml"), "rb") as f:
        demo = tomllib.load(f)  # what train_gpt2.py --demo trains
    config = bench.parse_args(["--preset", "demo", "--n-layer", "3"])
    assert (config.n_layer, config.max_new_tokens) == (3, 128)  # a flag given wins over the preset
    for key in ("n_head", "n_embd", "block_size", "batch_size", "seq_len"):
        assert getattr(config, key) == demo[key], key


def test_missing_hellaswag_file_is_a_usage_error(tmp_path, call_main):
    proc = run_bench(
        call_main, "--preset", "test", "--sections", "hellaswag", "--hellaswag-file", str(tmp_path / "none.jsonl")
    )
    assert proc.returncode == 2 and "--hellaswag-file" in proc.stderr and "Traceback" not in proc.stderr


def test_float16_steps_with_the_gradient_scaler_and_mfu_uses_the_given_peak(call_main):
    proc = run_bench(
        call_main, "--preset", "test", "--sections", "matmul,train", "--modes", "eager", "--dtypes", "float16,float32",
        "--peak-flops", "1e12", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [r["dtype"] for r in result["matmul"]] == ["float16", "float32"]
    float16, float32 = result["train"]
    assert (float16["dtype"], float32["dtype"]) == ("float16", "float32")
    assert float16["grad_scale"] == 2.0**16 and float32["grad_scale"] is None  # the scaler ran, as in training
    # The same fresh weights and batch in both: the first step's loss agrees, near ln(vocab) (uniform guesses).
    assert float16["first_loss"] == pytest.approx(float32["first_loss"], abs=0.01)
    assert float32["first_loss"] == pytest.approx(math.log(50304), rel=0.02)
    for r in result["train"]:
        assert r["peak_flops"] == 1e12 and r["mfu"] == pytest.approx(r["achieved_flops"] / 1e12)


def test_synchronize_waits_for_the_devices_own_queue(monkeypatch):
    import bench

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    bench.synchronize(torch.device("cuda", 1))
    bench.synchronize(torch.device("mps"))
    bench.synchronize(torch.device("cpu"))  # nothing to wait for on a CPU, and no error
    assert calls == [("cuda", torch.device("cuda", 1)), ("mps", None)]
