"""fineweb.py: shards equal an independent re-tokenization, inputs agree, resuming is exact, errors are clean.

The reference everywhere is a plain re-computation with the tokenizer: for each document
[EOT] + encode_ordinary(text), all concatenated, cut every shard_size tokens.
"""

import glob
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from tokenizer import EOT

FINEWEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fineweb.py")
SHARD = 5_000


# -----------------------------------------------------------------------------
# Helpers


def reference_tokens(documents, tokenizer):
    """The whole token stream, computed independently of fineweb.py."""
    stream = []
    for text in documents:
        stream.append(EOT)
        stream.extend(tokenizer.encode_ordinary(text))
    return np.array(stream, dtype=np.int64)


def reference_shards(tokens, shard_size, prefix):
    """{file name: .npy bytes} of `tokens` cut every shard_size tokens: what fineweb.py must write."""
    shards = {}
    for index, start in enumerate(range(0, len(tokens), shard_size)):
        buffer = io.BytesIO()
        np.save(buffer, tokens[start:start + shard_size].astype(np.uint16))
        shards[expected_names(prefix, index + 1)[-1]] = buffer.getvalue()
    return shards


def shard_files(directory):
    return sorted(glob.glob(os.path.join(directory, "*.npy")))


def shard_bytes(directory):
    """{file name: bytes} of the shards in a directory."""
    return {os.path.basename(p): open(p, "rb").read() for p in shard_files(directory)}


def differences(shards, expected):
    """The file names whose bytes differ between two shard_bytes() dicts ([] when identical).

    Asserting on this short list, not on the dicts, keeps pytest from diffing megabytes on failure.
    """
    return sorted(name for name in set(shards) | set(expected) if shards.get(name) != expected.get(name))


def expected_names(prefix, count):
    return [f"{prefix}_val_000000.npy"] + [f"{prefix}_train_{i:06d}.npy" for i in range(1, count)]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, FINEWEB, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def write_jsonl(path, documents, replace=None):
    """JSON Lines with an extra key and a trailing blank line (both ignored by fineweb.py).

    replace=(line_number, raw_text) writes raw_text instead of that line (a malformed line).
    """
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(documents, start=1):
            f.write(replace[1] if replace and replace[0] == i else json.dumps({"id": i, "text": text}) + "\n")
        f.write("\n")


@pytest.fixture(scope="module")
def reference(corpus_documents, tokenizer):
    return reference_tokens(corpus_documents, tokenizer)


@pytest.fixture(scope="module")
def straight_run(reference):
    """The corpus's shards as an uninterrupted run must write them, byte for byte (built independently)."""
    return reference_shards(reference, SHARD, "pydocs")


# -----------------------------------------------------------------------------
# One document


def test_tokenize_document_is_eot_then_ordinary_tokens(tokenizer):
    texts = ["Hello, I'm a language model,", "", "naïve café — 東京 🙂\r\n\ttabs",
             "a literal <|endoftext|> in a document is plain text"]
    for text in texts:
        tokens = fineweb.tokenize_document(text)
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == [EOT] + tokenizer.encode_ordinary(text)
    assert EOT not in fineweb.tokenize_document(texts[-1]).tolist()[1:]


def test_token_ids_are_checked_before_the_uint16_cast():
    assert fineweb.to_uint16([0, 50256, 65535]).tolist() == [0, 50256, 65535]
    for ids in ([1, 65536], [-1, 2]):
        with pytest.raises(ValueError, match="uint16"):
            fineweb.to_uint16(ids)


# -----------------------------------------------------------------------------
# Shards


def test_shards_equal_an_independent_retokenization(corpus_documents, reference, straight_run, tmp_path):
    paths = fineweb.write_shards(corpus_documents, str(tmp_path), "pydocs", SHARD, num_proc=2, progress=False)
    count = -(-len(reference) // SHARD)
    assert [os.path.basename(p) for p in paths] == expected_names("pydocs", count)  # val first
    shards = [np.load(p) for p in paths]
    assert all(s.dtype == np.uint16 for s in shards)
    assert [s.size for s in shards] == [SHARD] * (count - 1) + [len(reference) - SHARD * (count - 1)]
    assert np.array_equal(np.concatenate(shards), reference)
    assert int((np.concatenate(shards) == EOT).sum()) == len(corpus_documents)
    # Nothing else is left in the directory: no temporary files, one progress file.
    assert sorted(os.listdir(tmp_path)) == sorted(expected_names("pydocs", count) + ["pydocs_progress.json"])
    # The order is the input order whatever the pool size.
    one = tmp_path / "one"
    fineweb.write_shards(corpus_documents, str(one), "pydocs", SHARD, num_proc=1, progress=False)
    assert differences(shard_bytes(one), straight_run) == differences(shard_bytes(tmp_path), straight_run) == []


def test_input_formats_give_the_same_shards(corpus_documents, straight_run, tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents)
    write_jsonl(tmp_path / "corpus.json", corpus_documents)  # .json is read as JSON Lines too
    half = len(corpus_documents) // 2  # parquet split over two files, small row groups, an extra column
    for name, part in (("a.parquet", corpus_documents[:half]), ("b.parquet", corpus_documents[half:])):
        pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), tmp_path / name, row_group_size=7)
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, text in enumerate(corpus_documents):
        (txt_dir / f"doc_{i:03d}.txt").write_bytes(text.encode("utf-8"))
    txt_files = sorted(glob.glob(str(txt_dir / "*.txt")))

    runs = {"jsonl": ["--input", "corpus.jsonl"], "json": ["--input", "corpus.json"],
            "parquet": ["--input", "a.parquet", "b.parquet"], "txt": ["--input", *txt_files],
            "python-docs": ["--dataset", "python-docs"]}
    for name, args in runs.items():
        result = run_cli(*args, "--output-dir", f"out_{name}", "--prefix", "pydocs", "--shard-size", SHARD,
                         "--num-proc", 2, "--no-progress", cwd=tmp_path)
        assert result.returncode == 0, (name, result.stderr)
        assert differences(shard_bytes(tmp_path / f"out_{name}"), straight_run) == [], name
        assert f"{len(straight_run)} shards (1 val, {len(straight_run) - 1} train)" in result.stdout


def test_hub_streaming_path_reads_a_local_copy_in_fineweb_edu_layout(corpus_documents, straight_run, tmp_path):
    """The `datasets` streaming code users run against the hub, pointed at a dataset repository on disk.

    The layout is FineWeb-Edu's: a README whose YAML names the config sample-10BT and its parquet
    files (sample/10BT/*), which carry more columns than text.
    """
    repo = tmp_path / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                    "    path: sample/10BT/*\n---\n")
    half = len(corpus_documents) // 2
    for name, part in (("000_00000.parquet", corpus_documents[:half]), ("001_00000.parquet", corpus_documents[half:])):
        table = pa.table({"text": part, "id": [f"<urn:{i}>" for i in range(len(part))], "score": [3.5] * len(part)})
        pq.write_table(table, repo / "sample" / "10BT" / name, row_group_size=10)
    result = run_cli("--dataset", repo, "--subset", "sample-10BT", "--output-dir", "out", "--prefix", "pydocs",
                     "--shard-size", SHARD, "--num-proc", 2, "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []


def test_max_tokens_stops_the_stream_and_reads_lazily(corpus_documents, reference, tmp_path):
    # An endless input: only a writer that streams can finish.
    limit = 3 * len(reference) + 7
    paths = fineweb.write_shards(itertools.cycle(corpus_documents), str(tmp_path / "a"), "pydocs", 40_000,
                                 num_proc=2, max_tokens=limit, progress=False)
    sizes = [np.load(p).size for p in paths]
    assert sizes == [40_000] * (limit // 40_000) + [limit % 40_000]
    assert np.array_equal(np.concatenate([np.load(p) for p in paths]),
                          np.concatenate([reference, reference, reference, reference[:7]]))
    # A limit on a shard boundary leaves no empty shard behind.
    paths = fineweb.write_shards(corpus_documents, str(tmp_path / "b"), "pydocs", SHARD, num_proc=2,
                                 max_tokens=2 * SHARD, progress=False)
    assert [np.load(p).size for p in paths] == [SHARD, SHARD]
    assert np.array_equal(np.concatenate([np.load(p) for p in paths]), reference[:2 * SHARD])


# -----------------------------------------------------------------------------
# Resuming


def failing_after(documents, count):
    """The documents, until the connection 'drops' after `count` of them, the way a stream fails."""
    yield from documents[:count]
    raise fineweb.DataError("connection lost")


def test_resume_after_a_failure_mid_stream_is_byte_identical(corpus_documents, straight_run, tmp_path):
    out = str(tmp_path)
    with pytest.raises(fineweb.DataError, match="connection lost"):
        fineweb.write_shards(failing_after(corpus_documents, 40), out, "pydocs", SHARD, num_proc=2, progress=False)
    progress = json.load(open(tmp_path / "pydocs_progress.json"))
    finished = [shard["file"] for shard in progress["shards"]]
    assert not progress["complete"] and 1 < len(finished) < len(straight_run)
    assert progress["shards"][-1]["next_offset"] > 0  # it stopped inside a document: resume splits it
    assert sorted(os.listdir(tmp_path)) == sorted(finished + ["pydocs_progress.json"])  # nothing half-written
    assert differences(shard_bytes(tmp_path), {name: straight_run[name] for name in finished}) == []
    before = {name: os.stat(tmp_path / name).st_mtime_ns for name in finished}

    fineweb.write_shards(corpus_documents, out, "pydocs", SHARD, num_proc=2, progress=False)
    assert differences(shard_bytes(tmp_path), straight_run) == []
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in finished} == before  # kept, not redone
    assert json.load(open(tmp_path / "pydocs_progress.json"))["complete"]


def test_resume_remakes_damaged_shards_and_clears_leftovers(corpus_documents, straight_run, tmp_path):
    out = str(tmp_path)
    fineweb.write_shards(corpus_documents, out, "pydocs", SHARD, num_proc=2, progress=False)
    with open(tmp_path / "pydocs_train_000003.npy", "r+b") as f:
        f.truncate(1000)  # a shard cut short (say, a disk that filled up)
    os.remove(tmp_path / "pydocs_train_000005.npy")
    (tmp_path / ".pydocs_train_000001.npy.tmp").write_bytes(b"half a shard")  # left by a killed run
    untouched = os.stat(tmp_path / "pydocs_train_000002.npy").st_mtime_ns

    fineweb.write_shards(corpus_documents, out, "pydocs", SHARD, num_proc=2, progress=False)
    assert differences(shard_bytes(tmp_path), straight_run) == []
    assert not glob.glob(str(tmp_path / ".*"))
    assert os.stat(tmp_path / "pydocs_train_000002.npy").st_mtime_ns == untouched


BIG_ARGS = ["--input", "big.jsonl", "--output-dir", "out", "--shard-size", 20_000, "--num-proc", 2, "--no-progress"]


def big_input(corpus_documents, tmp_path):
    """big.jsonl: ~4M tokens, a couple of seconds of tokenizing, long enough to stop a run midway.
    Returns the progress file of a CLI run with BIG_ARGS."""
    write_jsonl(tmp_path / "big.jsonl", corpus_documents * 30)
    return tmp_path / "out" / "edufineweb_progress.json"


def stop_after_shards(args, cwd, progress_file, shards, stop):
    """Start the CLI, wait until `shards` shards are finished, call stop(process); return (exit code, stderr)."""
    # A session of its own: a signal to the group reaches every process, as Ctrl-C in a terminal does.
    process = subprocess.Popen([sys.executable, FINEWEB, *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if len(json.loads(progress_file.read_text())["shards"]) >= shards:
                break
        except (OSError, ValueError):
            pass  # not written yet
        time.sleep(0.005)
    stop(process)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def signal_group(signal_number):
    return lambda process: os.killpg(process.pid, signal_number)


def kill_one_worker(process):
    """What the out-of-memory killer does: SIGKILL one tokenizing process, not the CLI."""
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
        workers = [int(pid) for pid in f.read().split()]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)


def assert_big_run_finishes_like_a_straight_one(tmp_path, reference):
    result = run_cli(*BIG_ARGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = reference_shards(np.tile(reference, 30), 20_000, "edufineweb")
    assert differences(shard_bytes(tmp_path / "out"), expected) == []
    assert not glob.glob(str(tmp_path / "out" / ".*"))


@pytest.mark.multiprocess
def test_interrupted_and_killed_cli_runs_resume_to_identical_bytes(corpus_documents, reference, tmp_path):
    progress_file = big_input(corpus_documents, tmp_path)
    code, stderr = stop_after_shards(BIG_ARGS, tmp_path, progress_file, 3, signal_group(signal.SIGINT))  # Ctrl-C
    assert code == 130 and stderr.count("\n") == 1 and "Traceback" not in stderr and "rerun" in stderr, stderr
    interrupted = len(json.loads(progress_file.read_text())["shards"])
    code, _ = stop_after_shards(BIG_ARGS, tmp_path, progress_file, interrupted + 3,
                                signal_group(signal.SIGKILL))  # no clean-up at all
    assert code == -signal.SIGKILL
    killed = json.loads(progress_file.read_text())
    assert not killed["complete"] and len(killed["shards"]) >= interrupted + 3
    assert_big_run_finishes_like_a_straight_one(tmp_path, reference)


@pytest.mark.multiprocess
def test_a_dead_worker_is_one_line_and_the_rerun_resumes(corpus_documents, reference, tmp_path):
    # The out-of-memory killer picks a worker: the run must stop with a message, not wait forever.
    progress_file = big_input(corpus_documents, tmp_path)
    code, stderr = stop_after_shards(BIG_ARGS, tmp_path, progress_file, 1, kill_one_worker)
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "a tokenizing process died" in stderr and "rerun" in stderr
    assert_big_run_finishes_like_a_straight_one(tmp_path, reference)


def test_a_malformed_line_keeps_finished_shards_and_a_fixed_file_resumes(corpus_documents, straight_run, tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents, replace=(60, '{"text": "unfinished\n'))
    args = ["--input", "corpus.jsonl", "--output-dir", "out", "--prefix", "pydocs", "--shard-size", SHARD,
            "--num-proc", 2, "--no-progress"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "corpus.jsonl line 60" in result.stderr and "resume" in result.stderr
    finished = json.load(open(tmp_path / "out" / "pydocs_progress.json"))["shards"]
    assert len(finished) >= 2 and not glob.glob(str(tmp_path / "out" / ".*"))
    assert differences(shard_bytes(tmp_path / "out"), {s["file"]: straight_run[s["file"]] for s in finished}) == []

    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents)  # the line fixed in place
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []


def test_rerun_with_other_arguments_is_refused(corpus_documents, straight_run, tmp_path):
    args = ["--dataset", "python-docs", "--output-dir", "out", "--prefix", "pydocs", "--num-proc", 2, "--no-progress"]
    assert run_cli(*args, "--shard-size", SHARD, cwd=tmp_path).returncode == 0
    again = run_cli(*args, "--shard-size", SHARD, cwd=tmp_path)  # finished: nothing to do, nothing changes
    assert again.returncode == 0 and differences(shard_bytes(tmp_path / "out"), straight_run) == []
    result = run_cli(*args, "--shard-size", 6_000, "--max-tokens", 50_000, cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("fineweb.py: error:")
    assert "shard_size 5000 then, 6000 now" in line and "max_tokens null then, 50000 now" in line
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []


# -----------------------------------------------------------------------------
# Errors a user can cause: one line, the right exit code, no traceback, nothing written


def make_inputs(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n')
    (tmp_path / "notext.jsonl").write_text('{"content": "a document under the wrong key"}\n')
    (tmp_path / "array.json").write_text('[\n {"text": "one"},\n {"text": "two"}\n]\n')
    pq.write_table(pa.table({"content": ["a document under the wrong column"]}), tmp_path / "notext.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))


ERRORS = {
    "missing file": (["--input", "nope.jsonl"], 2, ["nope.jsonl does not exist"]),
    "unknown format": (["--input", "data.csv"], 2, ["data.csv", "unknown format .csv", ".jsonl"]),
    "directory": (["--input", "a_dir"], 2, ["a_dir is not a file"]),
    "bad flags": (["--dataset", "python-docs", "--shard-size", "0", "--num-proc", "0", "--max-tokens", "-5",
                   "--prefix", "a/b"], 2, ["--shard-size 0", "--num-proc 0", "--max-tokens -5", "--prefix 'a/b'"]),
    "malformed json": (["--input", "bad.jsonl"], 1, ["bad.jsonl line 3", "malformed JSON"]),
    "no text field": (["--input", "notext.jsonl"], 1, ["notext.jsonl line 1", '"text"']),
    "json array": (["--input", "array.json"], 1, ["array.json holds a JSON array", "jq"]),
    "no text column": (["--input", "notext.parquet"], 1, ['notext.parquet has no "text" column', "content"]),
    "not parquet": (["--input", "fake.parquet"], 1, ["fake.parquet is not a readable Parquet file"]),
    "not utf-8": (["--input", "latin1.txt"], 1, ["latin1.txt", "UTF-8"]),
    "hub unreachable": (["--dataset", "HuggingFaceFW/fineweb-edu"], 1, ["Hugging Face hub", "--input"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_clean_line(case, tmp_path):
    make_inputs(tmp_path)
    args, code, phrases = ERRORS[case]
    # conftest.py set HF_HUB_OFFLINE=1, which the subprocess inherits: the hub is "unreachable" at once.
    result = run_cli("--output-dir", "out", "--shard-size", SHARD, "--num-proc", 1, "--no-progress", *args,
                     cwd=tmp_path)
    assert result.returncode == code, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("fineweb.py: error:"), result.stderr
    for phrase in phrases:
        assert phrase in line
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_shards_without_a_progress_file_are_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    stray = tmp_path / "out" / "edufineweb_val_000000.npy"
    np.save(stray, np.arange(10, dtype=np.uint16))
    result = run_cli("--dataset", "python-docs", "--output-dir", "out", "--num-proc", 1, cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and "no edufineweb_progress.json" in line
    assert os.listdir(tmp_path / "out") == ["edufineweb_val_000000.npy"]
    assert np.load(stray).tolist() == list(range(10))


def test_write_shards_refuses_sizes_below_one(corpus_documents, tmp_path):
    with pytest.raises(fineweb.UsageError, match="shard_size=0 .*num_proc=-1 .*max_tokens=0"):
        fineweb.write_shards(corpus_documents, str(tmp_path / "out"), "pydocs", 0, num_proc=-1, max_tokens=0,
                             progress=False)
    assert not os.path.exists(tmp_path / "out")


# -----------------------------------------------------------------------------
# Benchmark


def test_benchmark_counts_the_same_tokens_as_the_ceiling(corpus_documents, reference):
    result = fineweb.benchmark(corpus_documents, num_proc=2)
    assert result["tokens"] == len(reference) and result["num_proc"] == 2
    assert result["tokens_per_sec"] > 0 and result["ceiling_tokens_per_sec"] > 0
    assert result["ratio"] == pytest.approx(result["tokens_per_sec"] / result["ceiling_tokens_per_sec"])
