"""bench.py runs end to end on a tiny preset and reports sane figures.

These tests check that the benchmark works, never how fast anything is: figures live in the
benchmark's output, not in timed tests, and no test compares one measured figure with another
(bench.py derives tokens/s, FLOP/s and ratios from its timings; re-deriving them here would only
repeat its code). What they do check could fail: the JSON's fields, the model's size and FLOPs
counted by hand, that the KV cache and the reference loop sample the same greedy tokens, that
batched and one-at-a-time HellaSwag give the same losses, that SDPA's fused kernel ran, that a
compiled step does not recompile, and that bad flags end with one line and exit code 2.
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
C, V, T, L = 32, 50304, 64, 2
BLOCK_PARAMETERS = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
PARAMETERS = V * C + T * C + L * BLOCK_PARAMETERS + 2 * C


def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eager_result():
    """Every section, eager, float32 and bf16 autocast, on the test preset (a 2-layer GPT)."""
    proc = run_bench("--preset", "test", "--modes", "eager", "--json")
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
        assert (r["batch_size"], r["seq_len"]) == (2, T)
        assert all(math.isfinite(r[k]) for k in ("ms_per_step", "tokens_per_sec", "achieved_flops", "ceiling_ratio"))
        assert r["mfu"] is None and r["peak_flops"] is None  # no peak-FLOP/s table entry for a CPU
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"] == "process peak RSS"
        # SDPA's fused CPU kernel ran, forward and backward (not the unfused math fallback).
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["attention_kernels"]
        assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in r["attention_kernels"]


def test_flops_per_token_counted_by_hand(eager_result):
    # PaLM's estimate: 6 FLOPs per weight in a matmul (all but the position table), 12 * L * C * T for attention
    assert eager_result["train"][0]["flops_per_token"] == 6 * (PARAMETERS - T * C) + 12 * L * C * T


def test_sampling_with_and_without_cache_agree(eager_result):
    (r,) = eager_result["sample"]
    assert r["new_tokens"] == 24 and r["prompt_tokens"] == 8
    assert r["matching_tokens"] == r["new_tokens"]  # greedy, float32: the KV cache changes the speed, not the tokens


def test_hellaswag_batched_and_single_agree(eager_result):
    (r,) = eager_result["hellaswag"]
    assert r["examples"] == 8 and r["batch_size"] == 4
    assert r["source"] == "built from the Python docs' sentences"
    assert r["max_loss_difference"] < 1e-3  # same scores, whatever the batch


def test_fineweb_section_counts_the_tokens_of_a_plain_retokenization(corpus_documents, tokenizer):
    # fineweb.py's shards and tiktoken alone (bench.py checks that both count the same) against an
    # independent count of the same 40 documents: [EOT] + their tokens.
    proc = run_bench("--sections", "fineweb", "--preset", "test", "--num-proc", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)["fineweb"]
    assert (r["documents"], r["num_proc"]) == (40, 2)
    assert r["tokens"] == sum(1 + len(tokenizer.encode_ordinary(text)) for text in corpus_documents[:40])


def test_examples_from_text_are_hellaswag_shaped(corpus_documents):
    import bench
    import hellaswag
    examples = bench.examples_from_text(12)
    assert len(examples) == 12
    assert [e["label"] for e in examples] == [0, 1, 2, 3] * 3
    manual = " ".join(" ".join(doc.split()) for doc in corpus_documents)  # whitespace as the builder sees it
    for e in examples:
        hellaswag._parse_line(json.dumps(e), "example")  # hellaswag.py's own format check
        assert len(set(e["endings"])) == 4
        # Real text: context + the right ending is a sentence of the manual; every ending is in it.
        assert e["ctx"] + " " + e["endings"][e["label"]] in manual
        assert all(ending in manual for ending in e["endings"])


def test_table_has_a_row_per_measurement(eager_result, capsys):
    import bench
    bench.print_tables(eager_result)
    lines = capsys.readouterr().out.splitlines()
    for section in ("matmul", "train", "sample", "hellaswag", "fineweb"):
        assert section in lines
    assert sum(line.split()[:2] == ["eager", "float32"] for line in lines) == 1
    assert sum(line.split()[:2] == ["eager", "bfloat16"] for line in lines) == 1


def test_compiled_step_does_not_recompile():
    """One compiled float32 step after the compiling one (CPU inductor takes ~20-30 s)."""
    proc = run_bench("--preset", "test", "--sections", "train", "--modes", "compiled", "--dtypes", "float32",
                     "--steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)["train"]
    assert (r["mode"], r["dtype"]) == ("compiled", "float32")
    assert r["recompiles"] == 0  # no graph compiled after the warm-up step, i.e. in the timed steps
    assert r["first_step_s"] > r["ms_per_step"] / 1000  # the first step compiles: seconds, against milliseconds
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["attention_kernels"]


def test_bad_flags_exit_2_with_one_line():
    proc = run_bench("--preset", "test", "--dtypes", "float64", "--seq-len", "128", "--sections", "train,nope")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in proc.stderr
    # Every offending value in the one line, each with what would work.
    assert "--dtypes float64 must be one of float32, bfloat16, float16" in line
    assert "--sections nope must be one of" in line
    assert "--seq-len 128 is over --block-size 64" in line


def test_missing_hellaswag_file_is_a_usage_error(tmp_path):
    proc = run_bench("--preset", "test", "--sections", "hellaswag", "--hellaswag-file", str(tmp_path / "none.jsonl"))
    assert proc.returncode == 2 and "--hellaswag-file" in proc.stderr and "Traceback" not in proc.stderr


def test_float16_steps_with_the_gradient_scaler_and_mfu_uses_the_given_peak():
    proc = run_bench("--preset", "test", "--sections", "matmul,train", "--modes", "eager",
                     "--dtypes", "float16,float32", "--peak-flops", "1e12", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [r["dtype"] for r in result["matmul"]] == ["float16", "float32"]
    float16, float32 = result["train"]
    assert (float16["dtype"], float32["dtype"]) == ("float16", "float32")
    assert float16["grad_scale"] == 2.0 ** 16 and float32["grad_scale"] is None  # the scaler ran, as in training
    # The same fresh weights and batch in both: the first step's loss agrees, near ln(vocab) (uniform guesses).
    assert float16["first_loss"] == pytest.approx(float32["first_loss"], abs=0.01)
    assert float32["first_loss"] == pytest.approx(math.log(50304), rel=0.02)
    for r in result["train"]:
        assert r["peak_flops"] == 1e12 and r["mfu"] == pytest.approx(r["achieved_flops"] / 1e12)
