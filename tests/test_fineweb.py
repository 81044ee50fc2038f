"""fineweb.py: shards equal an independent re-tokenization, inputs agree, resuming is exact, errors are clean.

The reference everywhere is a plain re-computation with the tokenizer: for each document
[EOT] + encode_ordinary(text), all concatenated, cut every shard_size tokens. A test that stops a
run feeds its input through a named pipe: the run cannot finish while the pipe is open, so where it
is stopped does not depend on how fast the machine is.
"""

import errno
import glob
import io
import itertools
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import namedtuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from common import UserError
from tokenizer import EOT

FINEWEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fineweb.py")
SHARD = 5_000
WAIT = 120  # the longest any wait on a run or its pipe may last: past it the test fails, it never hangs


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
        np.save(buffer, tokens[start : start + shard_size].astype(np.uint16))
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


def progress(path):
    """(finished shard records, complete) from a progress file, read independently of fineweb.py."""
    try:
        lines = open(path).read().split("\n")[:-1]  # the part after the last newline is not a whole line
    except FileNotFoundError:
        return [], False
    records = [json.loads(line) for line in lines[1:]]
    return [r for r in records if "file" in r], {"complete": True} in records


def leftovers(directory):
    """Hidden files other than the directory's lock file: what a run left half-written."""
    return [p for p in glob.glob(os.path.join(directory, ".*")) if os.path.basename(p) != ".lock"]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, FINEWEB, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=WAIT
    )


def write_jsonl(path, documents, replace=None):
    """JSON Lines with an extra key and a trailing blank line (both ignored by fineweb.py).

    replace=(line_number, raw_text) writes raw_text instead of that line (a malformed line).
    """
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(documents, start=1):
            f.write(replace[1] if replace and replace[0] == i else json.dumps({"id": i, "text": text}) + "\n")
        f.write("\n")


def fineweb_edu_copy(directory, documents, files=2):
    """A local dataset repository in FineWeb-Edu's layout: a README whose YAML names the config
    sample-10BT and its parquet files (sample/10BT/*), which carry more columns than text."""
    (directory / "sample" / "10BT").mkdir(parents=True)
    (directory / "README.md").write_text(
        "---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n"
    )
    for i, part in enumerate(np.array_split(np.array(documents, dtype=object), files)):
        table = pa.table(
            {"text": list(part), "id": [f"<urn:{j}>" for j in range(len(part))], "score": [3.5] * len(part)}
        )
        pq.write_table(table, directory / "sample" / "10BT" / f"{i:03d}_00000.parquet", row_group_size=10)
    return directory


@pytest.fixture(autouse=True)
def time_limit():
    """A test still running after 4 * WAIT seconds fails (SIGALRM) instead of hanging the suite: a writer that
    loops without progress runs in this process, where no other timeout reaches it."""

    def expire(number, frame):
        raise TimeoutError(f"the test ran past {4 * WAIT} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(4 * WAIT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


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
    texts = [
        "Hello, I'm a language model,",
        "",
        "naïve café — 東京 🙂\r\n\ttabs",
        "a literal <|endoftext|> in a document is plain text",
    ]
    for text in texts:
        tokens = fineweb.tokenize_document(text)
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == [EOT] + tokenizer.encode_ordinary(text)
    assert EOT not in fineweb.tokenize_document(texts[-1]).tolist()[1:]
    assert tokenizer.n_vocab == EOT + 1 <= 2**16  # every id fits the shards' uint16: the cast loses nothing


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
    # Nothing else is left in the directory: no temporary files, one progress file, the lock file.
    assert sorted(os.listdir(tmp_path)) == sorted(expected_names("pydocs", count) + ["pydocs_progress.jsonl", ".lock"])
    # The order is the input order whatever the pool size.
    one = tmp_path / "one"
    fineweb.write_shards(corpus_documents, str(one), "pydocs", SHARD, num_proc=1, progress=False)
    assert differences(shard_bytes(one), straight_run) == differences(shard_bytes(tmp_path), straight_run) == []


def test_progress_bookkeeping_appends_one_line_per_shard(corpus_documents, monkeypatch, tmp_path):
    # O(1) per shard: the progress file is written whole once (its first line), then only appended to.
    written = []
    atomic_write = fineweb.atomic_write
    monkeypatch.setattr(fineweb, "atomic_write", lambda path, write: (written.append(path), atomic_write(path, write)))
    paths = fineweb.write_shards(corpus_documents, str(tmp_path), "pydocs", 2_000, num_proc=1, progress=False)
    assert len(paths) > 50
    assert written.count(str(tmp_path / "pydocs_progress.jsonl")) == 1 and len(written) == len(paths) + 1
    lines = (tmp_path / "pydocs_progress.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(paths) + 1 and json.loads(lines[-1]) == {"complete": True}


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

    runs = {
        "jsonl": ["--input", "corpus.jsonl"],
        "json": ["--input", "corpus.json"],
        "parquet": ["--input", "a.parquet", "b.parquet"],
        "txt": ["--input", *txt_files],
        "python-docs": ["--dataset", "python-docs"],
    }
    for name, args in runs.items():
        result = run_cli(
            *args,
            "--output-dir",
            f"out_{name}",
            "--prefix",
            "pydocs",
            "--shard-size",
            SHARD,
            "--num-proc",
            2,
            "--no-progress",
            cwd=tmp_path,
        )
        assert result.returncode == 0, (name, result.stderr)
        assert differences(shard_bytes(tmp_path / f"out_{name}"), straight_run) == [], name
        assert f"{len(straight_run)} shards (1 val, {len(straight_run) - 1} train)" in result.stdout


def test_hub_streaming_path_reads_a_local_copy_in_fineweb_edu_layout(corpus_documents, straight_run, tmp_path):
    """The `datasets` streaming code users run against the hub, pointed at a dataset repository on disk."""
    repo = fineweb_edu_copy(tmp_path / "fineweb-edu", corpus_documents)
    result = run_cli(
        "--dataset",
        repo,
        "--subset",
        "sample-10BT",
        "--output-dir",
        "out",
        "--prefix",
        "pydocs",
        "--shard-size",
        SHARD,
        "--num-proc",
        2,
        "--progress",
        "--no-disk-check",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []
    assert "/10.0G" in result.stderr  # sample-10BT: the bar's total is the card's ~10B tokens


def endless(documents, drawn, rounds=100):
    """The documents over and over, as an endless stream, counting in drawn[0] how many were read. Past `rounds`
    rounds it raises: a writer that does not stop, or reads everything first, fails instead of hanging."""
    for drawn[0], text in enumerate(itertools.cycle(documents), start=1):
        if drawn[0] > rounds * len(documents):
            raise RuntimeError(f"{rounds} rounds of the documents read: the writer does not stop")
        yield text


def test_max_tokens_stops_the_stream_and_reads_lazily(corpus_documents, reference, tmp_path):
    # An endless input: only a writer that streams, and stops, can finish.
    limit, drawn = 3 * len(reference) + 7, [0]
    paths = fineweb.write_shards(
        endless(corpus_documents, drawn),
        str(tmp_path / "a"),
        "pydocs",
        40_000,
        num_proc=2,
        max_tokens=limit,
        progress=False,
    )
    sizes = [np.load(p).size for p in paths]
    assert sizes == [40_000] * (limit // 40_000) + [limit % 40_000]
    assert np.array_equal(
        np.concatenate([np.load(p) for p in paths]), np.concatenate([reference, reference, reference, reference[:7]])
    )
    read_ahead = 2 * fineweb.CHUNK_DOCS * fineweb.BLOCK_CHUNKS * 2  # two blocks of 2 workers' chunks
    assert drawn[0] <= 4 * len(corpus_documents) + read_ahead
    # A limit on a shard boundary leaves no empty shard behind; one past it, a shard of one token.
    for extra in (0, 1):
        paths = fineweb.write_shards(
            corpus_documents,
            str(tmp_path / f"b{extra}"),
            "pydocs",
            SHARD,
            num_proc=2,
            max_tokens=2 * SHARD + extra,
            progress=False,
        )
        assert [np.load(p).size for p in paths] == [SHARD, SHARD, 1][: 2 + extra]
        assert np.array_equal(np.concatenate([np.load(p) for p in paths]), reference[: 2 * SHARD + extra])


def test_max_tokens_counts_the_finished_shards_of_a_resumed_run(corpus_documents, reference, tmp_path):
    whole_shards = len(reference) // SHARD - 1
    limit = whole_shards * SHARD + 123  # the stream's end is never reached
    with pytest.raises(UserError, match="connection lost"):
        fineweb.write_shards(
            failing_after(corpus_documents, 40),
            str(tmp_path),
            "pydocs",
            SHARD,
            num_proc=2,
            max_tokens=limit,
            progress=False,
        )
    assert 1 <= len(progress(tmp_path / "pydocs_progress.jsonl")[0]) < whole_shards
    paths = fineweb.write_shards(
        corpus_documents, str(tmp_path), "pydocs", SHARD, num_proc=2, max_tokens=limit, progress=False
    )
    assert [np.load(p).size for p in paths] == [SHARD] * whole_shards + [123]
    assert np.array_equal(np.concatenate([np.load(p) for p in paths]), reference[:limit])


def test_a_resumed_input_shorter_than_the_finished_shards_is_refused(corpus_documents, tmp_path):
    with pytest.raises(UserError, match="connection lost"):
        fineweb.write_shards(
            failing_after(corpus_documents, 40), str(tmp_path), "pydocs", SHARD, num_proc=2, progress=False
        )
    shards, _ = progress(tmp_path / "pydocs_progress.jsonl")
    before = shard_bytes(tmp_path)
    # One document fewer than the finished shards cover: the input changed.
    shorter = corpus_documents[: shards[-1]["next_document"] - 1]
    with pytest.raises(UserError, match=f"fewer documents than the {shards[-1]['next_document']} of the finished"):
        fineweb.write_shards(shorter, str(tmp_path), "pydocs", SHARD, num_proc=2, progress=False)
    assert differences(shard_bytes(tmp_path), before) == []


# -----------------------------------------------------------------------------
# Resuming


def failing_after(documents, count):
    """The documents, until the connection 'drops' after `count` of them, the way a stream fails."""
    yield from documents[:count]
    raise UserError("connection lost")


def test_resume_after_a_failure_mid_stream_is_byte_identical(corpus_documents, straight_run, tmp_path):
    out = str(tmp_path)
    with pytest.raises(UserError, match="connection lost"):
        fineweb.write_shards(failing_after(corpus_documents, 40), out, "pydocs", SHARD, num_proc=2, progress=False)
    shards, complete = progress(tmp_path / "pydocs_progress.jsonl")
    finished = [shard["file"] for shard in shards]
    assert not complete and 1 < len(finished) < len(straight_run)
    assert shards[-1]["next_offset"] > 0  # it stopped inside a document: resume splits it
    # Nothing half-written, and no lock: a failed run leaves only the shards it finished and their record.
    assert sorted(os.listdir(tmp_path)) == sorted(finished + ["pydocs_progress.jsonl"])
    assert differences(shard_bytes(tmp_path), {name: straight_run[name] for name in finished}) == []
    before = {name: os.stat(tmp_path / name).st_mtime_ns for name in finished}

    fineweb.write_shards(corpus_documents, out, "pydocs", SHARD, num_proc=2, progress=False)
    assert differences(shard_bytes(tmp_path), straight_run) == []
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in finished} == before  # kept, not redone
    assert progress(tmp_path / "pydocs_progress.jsonl")[1]


def test_a_hub_stream_resumes_from_its_own_position(corpus_documents, reference, monkeypatch, tmp_path):
    # A rerun restarts the `datasets` stream at its recorded state_dict: it reads the documents of the
    # unfinished shard and at most one batch before them, never the finished shards' documents again.
    monkeypatch.setattr(fineweb, "HUB_BATCH", 10)
    documents = corpus_documents * 6
    repo = str(fineweb_edu_copy(tmp_path / "repo", documents, files=3))
    rows_read, fail_after = [], [300]
    iterate = datasets.IterableDataset.iter

    def counted(self, *args, **kwargs):  # every batch of rows `datasets` hands to fineweb.py
        for batch in iterate(self, *args, **kwargs):
            if fail_after and sum(rows_read) + len(batch["text"]) > fail_after[0]:
                raise ConnectionError("connection lost")
            rows_read.append(len(batch["text"]))
            yield batch

    monkeypatch.setattr(datasets.IterableDataset, "iter", counted)

    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="ConnectionError: connection lost"):
        fineweb.write_shards(fineweb.HubDocuments(repo), out, "pydocs", SHARD, num_proc=1, progress=False)
    shards, _ = progress(os.path.join(out, "pydocs_progress.jsonl"))
    last = shards[-1]
    assert sum(rows_read) == 300 and last["next_document"] > 200 and last["next_offset"] > 0
    assert 0 <= last["next_document"] - last["stream"]["document"] < 10  # the position: within a batch before

    rows_read.clear(), fail_after.clear()
    fineweb.write_shards(fineweb.HubDocuments(repo), out, "pydocs", SHARD, num_proc=1, progress=False)
    expected = reference_shards(np.tile(reference, 6), SHARD, "pydocs")
    assert differences(shard_bytes(out), expected) == []
    assert sum(rows_read) == len(documents) - last["stream"]["document"]
    assert sum(rows_read) < len(documents) - last["next_document"] + 10  # the rest, and less than a batch more


def test_resume_remakes_damaged_shards_and_clears_leftovers(corpus_documents, straight_run, tmp_path):
    out = str(tmp_path)
    fineweb.write_shards(corpus_documents, out, "pydocs", SHARD, num_proc=2, progress=False)
    with open(tmp_path / "pydocs_train_000003.npy", "r+b") as f:
        f.truncate(1000)  # a shard cut short (say, a disk that filled up)
    os.remove(tmp_path / "pydocs_train_000005.npy")
    (tmp_path / ".pydocs_train_000001.npy.tmp").write_bytes(b"half a shard")  # left by a killed run
    with open(tmp_path / "pydocs_progress.jsonl", "a") as f:
        f.write('{"file": "pydocs_tra')  # a line cut short by a crash
    untouched = os.stat(tmp_path / "pydocs_train_000002.npy").st_mtime_ns

    fineweb.write_shards(corpus_documents, out, "pydocs", SHARD, num_proc=2, progress=False)
    assert differences(shard_bytes(tmp_path), straight_run) == []
    assert not leftovers(tmp_path)
    assert os.stat(tmp_path / "pydocs_train_000002.npy").st_mtime_ns == untouched
    shards, complete = progress(tmp_path / "pydocs_progress.jsonl")
    assert complete and [s["file"] for s in shards] == expected_names("pydocs", len(straight_run))  # each once


def paragraphs(corpus_documents):
    """Short documents (the manual's paragraphs): many shards, and many blocks, out of few tokens."""
    return [p for doc in corpus_documents for p in doc.split("\n\n") if p.strip()]


class Feeder(threading.Thread):
    """Writes JSON Lines documents into a named pipe that a run reads as its --input. `pause` stops the
    writing but keeps the pipe open, so the run cannot see the end of its input; `close` closes it, after
    the documents when set from the start. The pipe is opened and written without blocking, so a run that
    dies, or never opens its end, cannot hold the feeder: `finish` ends it within a second."""

    def __init__(self, fifo, documents, close=False):
        super().__init__(daemon=True)
        self.fifo, self.documents, self.pause, self.close = fifo, documents, threading.Event(), threading.Event()
        self.stop = threading.Event()  # finish(): give up at once, whatever is left to write
        if close:
            self.close.set()

    def run(self):
        fd = self.open()
        if fd is None:
            return
        try:
            for i, text in enumerate(self.documents):
                if self.pause.is_set() or not self.write(fd, (json.dumps({"id": i, "text": text}) + "\n").encode()):
                    break
            self.close.wait(timeout=WAIT)
        except BrokenPipeError:
            pass  # the run is gone
        finally:
            os.close(fd)

    def open(self):
        """The pipe's write end once the run has opened its read end, or None (finish(), or WAIT s went by)."""
        deadline = time.monotonic() + WAIT
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:  # ENXIO: no reader yet
                if e.errno != errno.ENXIO:
                    raise
            time.sleep(0.01)
        return None

    def write(self, fd, data):
        """All of data, waiting while the pipe is full; False if finish() came first."""
        while data and not self.stop.is_set():
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                select.select([], [fd], [], 0.1)
        return not data

    def finish(self):
        self.stop.set()
        self.close.set()
        self.join(timeout=10)
        assert not self.is_alive(), "the feeder did not end"


PIPE_ARGS = ["--input", "big.jsonl", "--output-dir", "out", "--shard-size", 2_000, "--num-proc", 2, "--no-progress"]


class PipedRuns:
    """CLI runs in `directory` reading big.jsonl, a named pipe that a Feeder fills. Each run has its own
    session: a signal to its process group reaches it as Ctrl-C in a terminal would. Every wait on a run is
    bounded; close() (the fixture's teardown, whatever the test's outcome) kills what still runs."""

    def __init__(self, directory):
        self.directory, self.started = directory, []
        os.mkfifo(directory / "big.jsonl")

    def start(self, documents, args=PIPE_ARGS, close=False):
        process = subprocess.Popen(
            [sys.executable, FINEWEB, *map(str, args)],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        feeder = Feeder(self.directory / "big.jsonl", documents, close)
        feeder.start()
        self.started.append((process, feeder))
        return process, feeder

    def close(self):
        for process, feeder in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate(timeout=60)
            feeder.finish()


@pytest.fixture
def piped(tmp_path):
    runs = PipedRuns(tmp_path)
    yield runs
    runs.close()


def outcome(process):
    """(exit code, stderr) of a run that is ending; one still running after WAIT seconds is killed, failing the test."""
    try:
        _, stderr = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"the run did not end within {WAIT} s; its stderr: {stderr[-2000:]}")
    return process.returncode, stderr


def wait_until(condition, process, what):
    """Wait for an event the test then acts on; a run that ends first fails the test at once, a hung one by WAIT."""
    deadline = time.monotonic() + WAIT
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition(), f"never happened: {what} (exit code {process.poll()})"


def finished_shards(tmp_path):
    return len(progress(tmp_path / "out" / "edufineweb_progress.jsonl")[0])


def stop_piped(piped, documents, shards, stop):
    """Run the CLI on the piped documents until `shards` shards are finished, then call stop(process)
    while the pipe is still open (the run cannot have ended); return (exit code, stderr)."""
    process, feeder = piped.start(documents)
    wait_until(lambda: finished_shards(piped.directory) >= shards, process, f"{shards} shards")
    feeder.pause.set()
    stop(process)
    code, stderr = outcome(process)
    feeder.finish()
    return code, stderr


def workers_of(process):
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def gone(pid):
    """True once the process has exited (a zombie left to an init that does not reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def piped_input(corpus_documents):
    """Enough paragraphs that three stops in a row each find shards to finish: a run holds two blocks of
    documents back before it writes their shards (read-ahead), and each stop may finish one more block."""
    block = fineweb.CHUNK_DOCS * fineweb.BLOCK_CHUNKS * 2
    docs = paragraphs(corpus_documents)
    return docs * -(-(4 * block + 200) // len(docs))


def assert_piped_run_finishes_like_a_straight_one(piped, documents, tokenizer):
    process, feeder = piped.start(documents, close=True)
    code, stderr = outcome(process)
    feeder.finish()
    assert code == 0, stderr
    expected = reference_shards(reference_tokens(documents, tokenizer), 2_000, "edufineweb")
    assert differences(shard_bytes(piped.directory / "out"), expected) == []
    assert not leftovers(piped.directory / "out")


@pytest.mark.multiprocess
def test_interrupted_terminated_and_killed_cli_runs_resume_to_identical_bytes(
    corpus_documents, tokenizer, tmp_path, piped
):
    documents = piped_input(corpus_documents)
    progress_file = tmp_path / "out" / "edufineweb_progress.jsonl"
    code, stderr = stop_piped(piped, documents, 3, lambda p: os.killpg(p.pid, signal.SIGINT))  # Ctrl-C
    assert code == 130 and stderr.count("\n") == 1 and "Traceback" not in stderr and "rerun" in stderr, stderr
    interrupted = finished_shards(tmp_path)
    code, stderr = stop_piped(piped, documents, interrupted + 3, lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == 143 and stderr.count("\n") == 1 and "SIGTERM" in stderr and "rerun" in stderr, stderr
    terminated, workers = finished_shards(tmp_path), []

    def kill(process):  # the main process alone, as the OOM killer does: no clean-up; its workers must go too
        workers.extend(workers_of(process))
        os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60  # they go at once; the bound is only for a very slow machine
        while not all(map(gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = [pid for pid in workers if not gone(pid)]
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)  # a failing test leaves nothing behind
        assert not orphans, f"workers {orphans} outlived the killed run"

    code, _ = stop_piped(piped, documents, terminated + 3, kill)
    assert code == -signal.SIGKILL and len(workers) == 2
    shards, complete = progress(progress_file)
    assert not complete and len(shards) >= terminated + 3
    assert_piped_run_finishes_like_a_straight_one(piped, documents, tokenizer)


@pytest.mark.multiprocess
def test_a_dead_worker_is_one_line_and_the_rerun_resumes(corpus_documents, tokenizer, tmp_path, piped):
    # The out-of-memory killer picks a worker: the run must stop with a message, not wait forever.
    documents = piped_input(corpus_documents)
    process, feeder = piped.start(documents)
    wait_until(lambda: finished_shards(tmp_path) >= 1, process, "a shard")
    feeder.pause.set()
    workers = workers_of(process)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: all(map(gone, workers)), process, "the pool noticed")  # it ends the other worker too
    feeder.close.set()  # the rest of the input must go to the broken pool
    code, stderr = outcome(process)
    feeder.finish()
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "a tokenizing process died" in stderr and "rerun" in stderr
    assert_piped_run_finishes_like_a_straight_one(piped, documents, tokenizer)


@pytest.mark.multiprocess
def test_a_second_run_on_one_directory_is_refused_and_the_first_finishes(
    corpus_documents, straight_run, tmp_path, piped
):
    args = ["--output-dir", "out", "--prefix", "pydocs", "--num-proc", 1, "--no-progress"]
    first, feeder = piped.start(corpus_documents, ["--input", "big.jsonl", "--shard-size", SHARD, *args])
    lock = tmp_path / "out" / ".lock"
    wait_until(lambda: lock.exists() and f"pid {first.pid} " in lock.read_text(), first, "the first run's lock")
    second = run_cli(
        "--input", "big.jsonl", "--shard-size", 6_000, *args, cwd=tmp_path
    )  # the first one waits on its pipe
    line = second.stderr.strip()
    assert second.returncode == 1 and "\n" not in line and "Traceback" not in line, second.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in line and "out is in use" in line
    feeder.close.set()
    code, stderr = outcome(first)
    feeder.finish()
    assert code == 0, stderr
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []


def test_a_malformed_line_keeps_finished_shards_and_a_fixed_file_resumes(corpus_documents, straight_run, tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents, replace=(60, '{"text": "unfinished\n'))
    args = [
        "--input",
        "corpus.jsonl",
        "--output-dir",
        "out",
        "--prefix",
        "pydocs",
        "--shard-size",
        SHARD,
        "--num-proc",
        2,
        "--no-progress",
    ]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "corpus.jsonl line 60" in result.stderr and "resume" in result.stderr
    finished, _ = progress(tmp_path / "out" / "pydocs_progress.jsonl")
    assert len(finished) >= 2 and not leftovers(tmp_path / "out")
    assert differences(shard_bytes(tmp_path / "out"), {s["file"]: straight_run[s["file"]] for s in finished}) == []

    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents)  # the line fixed in place
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []


def test_rerun_with_other_arguments_is_refused(corpus_documents, straight_run, tmp_path):
    args = ["--dataset", "python-docs", "--output-dir", "out", "--prefix", "pydocs", "--num-proc", 2, "--no-progress"]
    assert run_cli(*args, "--shard-size", SHARD, cwd=tmp_path).returncode == 0
    progress_file = (tmp_path / "out" / "pydocs_progress.jsonl").read_bytes()
    again = run_cli(*args, "--shard-size", SHARD, cwd=tmp_path)  # finished: nothing to do, nothing changes
    assert again.returncode == 0 and differences(shard_bytes(tmp_path / "out"), straight_run) == []
    assert (tmp_path / "out" / "pydocs_progress.jsonl").read_bytes() == progress_file
    result = run_cli(*args, "--shard-size", 6_000, "--max-tokens", 50_000, cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("fineweb.py: error:")
    assert "shard_size 5000 then, 6000 now" in line and "max_tokens null then, 50000 now" in line
    assert "kept" not in line and "resume" not in line  # a refusal, not a stop: one action, not "resume"
    assert line.endswith("choose another --output-dir")
    # Other documents into the same shards: refused too, naming the two sources.
    write_jsonl(tmp_path / "other.jsonl", corpus_documents[:3])
    args[:2] = ["--input", "other.jsonl"]
    result = run_cli(*args, "--shard-size", SHARD, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert 'source {"dataset": "python-docs"} then, {"input": ["' in result.stderr and "other.jsonl" in result.stderr
    assert differences(shard_bytes(tmp_path / "out"), straight_run) == []
    assert (tmp_path / "out" / "pydocs_progress.jsonl").read_bytes() == progress_file


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
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "a_file").write_text("not a directory")


ERRORS = {
    "missing file": (["--input", "nope.jsonl"], 2, ["nope.jsonl does not exist"]),
    "unknown format": (["--input", "data.csv"], 2, ["data.csv", "unknown format .csv", ".jsonl"]),
    "directory": (["--input", "a_dir"], 2, ["a_dir is not a file"]),
    "bad flags": (
        ["--dataset", "python-docs", "--shard-size", "0", "--num-proc", "0", "--max-tokens", "-5", "--prefix", "a/b"],
        2,
        ["shard_size=0 must be positive", "num_proc=0 must be positive", "max_tokens=-5 must be positive", "'a/b'"],
    ),
    "output under a file": (
        ["--dataset", "python-docs", "--output-dir", "a_file/out"],
        2,
        ["--output-dir 'a_file/out'", "directory"],
    ),
    "malformed json": (["--input", "bad.jsonl"], 1, ["bad.jsonl line 3", "malformed JSON"]),
    "no text field": (["--input", "notext.jsonl"], 1, ["notext.jsonl line 1", '"text"']),
    "json array": (["--input", "array.json"], 1, ["array.json holds a JSON array", "jq"]),
    "no text column": (["--input", "notext.parquet"], 1, ['notext.parquet has no "text" column', "content"]),
    "not parquet": (["--input", "fake.parquet"], 1, ["fake.parquet is not a readable Parquet file"]),
    "not utf-8": (["--input", "latin1.txt"], 1, ["latin1.txt", "UTF-8"]),
    "empty input": (["--input", "empty.jsonl"], 1, ["no documents"]),
    "blank lines": (["--input", "blank.jsonl"], 1, ["no documents"]),
    "hub unreachable": (
        ["--dataset", "HuggingFaceFW/fineweb-edu", "--no-disk-check"],
        1,
        ["Hugging Face hub", "--input"],
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_clean_line(case, tmp_path):
    make_inputs(tmp_path)
    args, code, phrases = ERRORS[case]
    # conftest.py set HF_HUB_OFFLINE=1, which the subprocess inherits: the hub is "unreachable" at once.
    result = run_cli(
        "--output-dir", "out", "--shard-size", SHARD, "--num-proc", 1, "--no-progress", *args, cwd=tmp_path
    )
    assert result.returncode == code, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("fineweb.py: error:"), result.stderr
    for phrase in phrases:
        assert phrase in line
    assert not os.path.exists(tmp_path / "out")  # a refused run leaves no directory it made, no lock


@pytest.mark.parametrize("prefix", [" pydocs", "pydocs ", ".pydocs", "py*docs", "py?docs", "py[docs", "py\\docs", ""])
def test_a_prefix_that_is_not_a_plain_file_name_start_is_refused(prefix, corpus_documents, tmp_path):
    with pytest.raises(UserError, match="--prefix .* must be a plain file-name start") as error:
        fineweb.write_shards(corpus_documents, str(tmp_path / "out"), prefix, SHARD, num_proc=1, progress=False)
    assert error.value.exit_code == 2 and not os.path.exists(tmp_path / "out")


def test_local_files_are_read_as_written(tokenizer, tmp_path, run_main):
    # Upper-case extensions; a .txt with a byte-order mark and Windows line ends: the mark goes, the \r\n stay.
    text = "First line\r\nsecond line\r\n\ttabbed \u00e9\r\n"
    (tmp_path / "NOTES.TXT").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    write_jsonl(tmp_path / "MORE.JSONL", ["a document", "another one"])
    code, _, err = run_main(
        fineweb.main,
        "--input",
        tmp_path / "NOTES.TXT",
        tmp_path / "MORE.JSONL",
        "--output-dir",
        tmp_path / "out",
        "--num-proc",
        1,
        "--no-progress",
        "--shard-size",
        10,
    )
    assert code is None, err  # main() returns nothing when it succeeds
    names = expected_names("edufineweb", len(shard_files(tmp_path / "out")))
    shards = [np.load(tmp_path / "out" / name) for name in names]
    expected = reference_tokens([text, "a document", "another one"], tokenizer)
    assert np.array_equal(np.concatenate(shards), expected)


def test_parquet_text_that_is_not_strings_or_is_null_is_refused_naming_the_row(tmp_path, run_main):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    texts = [f"document {i}" for i in range(1030)]
    texts[1027] = None  # in the second batch of 1,024 rows
    pq.write_table(pa.table({"text": texts}), tmp_path / "holes.parquet", row_group_size=100)
    for name, message in (
        ("numbers", 'numbers.parquet has no "text" column of strings'),
        ("holes", 'holes.parquet row 1027: "text" is null'),
    ):
        code, _, err = run_main(
            fineweb.main,
            "--input",
            tmp_path / f"{name}.parquet",
            "--output-dir",
            tmp_path / name,
            "--num-proc",
            1,
            "--no-progress",
        )
        assert code == 1 and err.count("\n") == 1 and message in err, err


def test_the_disk_check_of_a_hub_run_counts_max_tokens_not_the_subset(monkeypatch, tmp_path, run_main):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 20_000, 20_000))
    hub = ["--dataset", "HuggingFaceFW/fineweb-edu", "--output-dir", tmp_path / "out", "--num-proc", 1, "--no-progress"]
    code, _, err = run_main(fineweb.main, *hub)  # sample-10BT: about 10B tokens, 20 GB
    assert code == 1 and "needs 20.0 GB more, has 0.0 MB free" in err, err
    code, _, err = run_main(fineweb.main, *hub, "--max-tokens", 10_000)  # 20,000 bytes: it fits, and goes on
    assert code == 1 and "could not stream HuggingFaceFW/fineweb-edu" in err, err  # offline in the tests


def test_shards_without_a_progress_file_are_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    stray = tmp_path / "out" / "edufineweb_val_000000.npy"
    np.save(stray, np.arange(10, dtype=np.uint16))
    result = run_cli("--dataset", "python-docs", "--output-dir", "out", "--num-proc", 1, cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and "no edufineweb_progress.json" in line
    assert sorted(os.listdir(tmp_path / "out")) == ["edufineweb_val_000000.npy"]  # no lock left either
    assert np.load(stray).tolist() == list(range(10))


def test_write_shards_refuses_sizes_below_one(corpus_documents, tmp_path):
    with pytest.raises(UserError) as error:
        fineweb.write_shards(
            corpus_documents, str(tmp_path / "out"), "pydocs", 0, num_proc=-1, max_tokens=0, progress=False
        )
    assert error.value.exit_code == 2  # a usage error
    for problem in ("shard_size=0 must be positive", "num_proc=-1 must be positive", "max_tokens=0 must be positive"):
        assert problem in str(error.value)
    assert not os.path.exists(tmp_path / "out")


def test_an_input_that_fills_only_the_val_shard_warns_naming_shard_size(tmp_path):
    result = run_cli(
        "--dataset",
        "python-docs",
        "--output-dir",
        "out",
        "--shard-size",
        10**9,
        "--num-proc",
        1,
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "1 shards (1 val, 0 train)" in result.stdout
    assert result.stderr.count("\n") == 1 and "no train shard" in result.stderr and "--shard-size" in result.stderr


def test_a_run_that_will_not_fit_on_the_disk_is_refused_before_it_starts(monkeypatch, capsys, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 19_999, 19_999))
    handler = signal.getsignal(signal.SIGTERM)
    args = [
        "--dataset",
        "python-docs",
        "--max-tokens",
        10_000,
        "--shard-size",
        SHARD,
        "--output-dir",
        tmp_path / "out",
        "--num-proc",
        1,
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as exit:
        fineweb.main(list(map(str, args)))  # 10,000 tokens need 20,000 bytes
    line = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and "\n" not in line and "--no-disk-check" in line
    assert "needs 0.1 MB more, has 0.0 MB free" in line  # 20,000 bytes against 19,999: never "0.0 GB" against "0.0 GB"
    assert not os.path.exists(tmp_path / "out")
    fineweb.main(list(map(str, args + ["--no-disk-check"])))
    assert [np.load(p).size for p in shard_files(tmp_path / "out")] == [SHARD, SHARD]
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 20_000, 20_000))
    fineweb.main(list(map(str, args + ["--output-dir", tmp_path / "fits"])))  # exactly enough
    assert len(shard_files(tmp_path / "fits")) == 2
    assert signal.getsignal(signal.SIGTERM) == handler  # main() put back the handler it replaced


# -----------------------------------------------------------------------------
# One dataset a directory, a full disk, sizes that read apart, refusals that leave nothing, the user's umask


def snapshot(directory):
    """{name: (bytes, mtime)} of every file in a directory but the lock (its text names the last process to hold it)."""
    files = [os.path.join(directory, name) for name in sorted(os.listdir(directory)) if name != ".lock"]
    return {path: (open(path, "rb").read(), os.stat(path).st_mtime_ns) for path in files}


def test_a_directory_that_holds_another_dataset_is_refused_and_left_as_it_was(corpus_documents, tmp_path, run_main):
    out = tmp_path / "out"
    fineweb.write_shards(corpus_documents[:40], str(out), "pydocs", SHARD, num_proc=1, progress=False)
    listing, before = sorted(os.listdir(out)), snapshot(out)
    options = ["--output-dir", out, "--shard-size", SHARD, "--num-proc", 1, "--no-progress"]
    for prefix in ("edufineweb", "other"):  # another prefix: the default, or one of a user's own
        code, _, err = run_main(fineweb.main, "--dataset", "python-docs", "--prefix", prefix, *options)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "pydocs_" in err and "one dataset a directory" in err and err.strip().endswith("--output-dir")
        assert sorted(os.listdir(out)) == listing and snapshot(out) == before
    # The same prefix made from another input: its progress file names another source.
    write_jsonl(tmp_path / "same.jsonl", corpus_documents[:40])
    code, _, err = run_main(fineweb.main, "--input", tmp_path / "same.jsonl", "--prefix", "pydocs", *options)
    assert code == 2 and err.count("\n") == 1 and 'source null then, {"input": [' in err, err
    assert sorted(os.listdir(out)) == listing and snapshot(out) == before
    # The dataset itself, rerun, once another prefix's shard came in: the directory holds two now.
    (out / "other_val_000000.npy").write_bytes((out / "pydocs_val_000000.npy").read_bytes())
    listing, before = sorted(os.listdir(out)), snapshot(out)
    with pytest.raises(UserError, match="other_val_000000.npy.*one dataset a directory") as error:
        fineweb.write_shards(corpus_documents[:40], str(out), "pydocs", SHARD, num_proc=1, progress=False)
    assert error.value.exit_code == 2 and sorted(os.listdir(out)) == listing and snapshot(out) == before
    # Another dataset's progress file alone (its shards deleted): the directory is still that dataset's.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pydocs_progress.jsonl").write_bytes((out / "pydocs_progress.jsonl").read_bytes())
    code, _, err = run_main(fineweb.main, "--dataset", "python-docs", *options, "--output-dir", tmp_path / "other")
    assert code == 2 and "pydocs_progress.jsonl" in err, err
    assert os.listdir(tmp_path / "other") == ["pydocs_progress.jsonl"]  # and no lock left


def full_disk_at(monkeypatch, which):
    """fineweb.atomic_write on a disk that fills up: writing the file for which which(path) holds stops half-way
    with ENOSPC, inside the real atomic_write (which must leave no part of it under its name)."""
    atomic_write = fineweb.atomic_write

    def write(path, writer):
        def half(f):
            data = io.BytesIO()
            writer(data)
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        atomic_write(path, half if which(path) else writer)

    monkeypatch.setattr(fineweb, "atomic_write", write)


def test_a_full_disk_is_one_line_leaves_no_torn_shard_and_the_rerun_resumes(
    corpus_documents, straight_run, monkeypatch, tmp_path, run_main
):
    out = tmp_path / "out"
    args = ["--dataset", "python-docs", "--output-dir", out, "--prefix", "pydocs", "--shard-size", SHARD]
    args += ["--num-proc", 1, "--no-progress"]
    full_disk_at(monkeypatch, lambda path: path.endswith("pydocs_train_000003.npy"))
    code, _, err = run_main(fineweb.main, *args)
    line = err.strip()
    assert code == 1 and "\n" not in line and "Traceback" not in line, err
    assert f"the disk of {out} is full" in line and "free space" in line and "another --output-dir" in line
    finished, _ = progress(out / "pydocs_progress.jsonl")
    assert [shard["file"] for shard in finished] == expected_names("pydocs", 3)
    assert differences(shard_bytes(out), {name: straight_run[name] for name in expected_names("pydocs", 3)}) == []
    assert not leftovers(out)  # the half-written shard went with its temporary file
    monkeypatch.undo()
    code, _, err = run_main(fineweb.main, *args)
    assert code is None, err
    assert differences(shard_bytes(out), straight_run) == []


def test_a_full_disk_while_writing_the_progress_file(corpus_documents, straight_run, monkeypatch, tmp_path, run_main):
    out = tmp_path / "a" / "out"
    args = ["--dataset", "python-docs", "--output-dir", out, "--prefix", "pydocs", "--shard-size", SHARD]
    args += ["--num-proc", 1, "--no-progress"]
    # Its first write, before any shard: the run leaves nothing, not even the directories it made.
    full_disk_at(monkeypatch, lambda path: path.endswith("pydocs_progress.jsonl"))
    code, _, err = run_main(fineweb.main, *args)
    assert code == 1 and err.count("\n") == 1 and f"the disk of {out} is full" in err, err
    assert not os.path.exists(tmp_path / "a")
    monkeypatch.undo()
    # An append that stops inside its line (the third shard's record): the rerun resumes to the same bytes.
    log, records = fineweb.Progress.log, []

    def torn_third(self, record):
        records.append(record)
        if len(records) < 3:
            return log(self, record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fineweb.Progress, "log", torn_third)
    code, _, err = run_main(fineweb.main, *args)
    assert code == 1 and err.count("\n") == 1 and "is full" in err and "Traceback" not in err, err
    assert len(progress(out / "pydocs_progress.jsonl")[0]) == 2
    monkeypatch.undo()
    code, _, err = run_main(fineweb.main, *args)
    assert code is None, err
    assert differences(shard_bytes(out), straight_run) == [] and not leftovers(out)


@pytest.mark.parametrize(
    "max_tokens, free, sizes",
    [
        (10_000, 19_999, "needs 0.1 MB more, has 0.0 MB free"),  # a byte apart: rounded apart, never "0.0 GB" twice
        (600_000, 1_100_000, "needs 1.2 MB more, has 1.1 MB free"),
        (5 * 10**9, 10**10 - 1, "needs 10.0 GB more, has 9.9 GB free"),
        (5 * 10**9, 10**9 - 1, "needs 10.0 GB more, has 999.9 MB free"),
    ],
)
def test_the_disk_check_says_sizes_that_differ(max_tokens, free, sizes, monkeypatch, tmp_path, run_main):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))
    out = tmp_path / "out"
    code, _, err = run_main(fineweb.main, "--dataset", "python-docs", "--max-tokens", max_tokens, "--output-dir", out)
    assert code == 1 and err.count("\n") == 1 and sizes in err, err  # 2 bytes a token
    need, has = re.search(r"needs (.+) more, has (.+) free", err).groups()
    assert need != has and not os.path.exists(out)


def test_a_refused_run_leaves_no_directory_it_made_and_no_lock(monkeypatch, tmp_path, run_main):
    make_inputs(tmp_path)
    options = ["--num-proc", 1, "--no-progress"]
    for name in ("bad.jsonl", "empty.jsonl", "latin1.txt"):  # refused once it reads them: after the lock
        code, _, err = run_main(
            fineweb.main, "--input", tmp_path / name, "--output-dir", tmp_path / "a/b/out", *options
        )
        assert code == 1 and err.count("\n") == 1, err
        assert not os.path.exists(tmp_path / "a")
    (tmp_path / "mine").mkdir()  # a directory that was there stays as it was: no lock appears in it
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    code, _, err = run_main(
        fineweb.main, "--input", tmp_path / "bad.jsonl", "--output-dir", tmp_path / "mine", *options
    )
    assert code == 1 and os.listdir(tmp_path / "mine") == ["notes.txt"], err
    usage = namedtuple("usage", "total used free")  # the disk check refuses before anything is made
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 0))
    hub = ["--dataset", "HuggingFaceFW/fineweb-edu", "--output-dir", tmp_path / "a/b/out"]  # ~10B tokens: 20 GB
    code, _, err = run_main(fineweb.main, *hub, *options)
    assert code == 1 and "--no-disk-check" in err and not os.path.exists(tmp_path / "a"), err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_every_file_written_gets_the_users_umask(umask, mode, corpus_documents, tmp_path):
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        fineweb.write_shards(corpus_documents[:40], str(out), "pydocs", SHARD, num_proc=1, progress=False)
        fineweb.write_shards(corpus_documents[:40], str(out), "pydocs", SHARD, num_proc=1, progress=False)
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
    assert len(modes) > 3 and "pydocs_progress.jsonl" in modes and "pydocs_train_000001.npy" in modes
    assert modes == dict.fromkeys(modes, mode)  # shards, the progress file and the lock: 0o666 less the umask
    assert stat.S_IMODE(os.stat(out).st_mode) == mode | 0o111  # the directory: 0o777 less the umask


def test_an_input_that_changed_under_finished_shards_is_refused_with_one_action(corpus_documents, tmp_path, run_main):
    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents, replace=(60, '{"text": "unfinished\n'))
    args = ["--input", tmp_path / "corpus.jsonl", "--output-dir", tmp_path / "out", "--shard-size", SHARD]
    args += ["--num-proc", 1, "--no-progress"]
    code, _, err = run_main(fineweb.main, *args)
    assert code == 1 and "line 60" in err and "rerun" in err, err  # stopped with finished shards: resumable
    before = shard_bytes(tmp_path / "out")
    write_jsonl(tmp_path / "corpus.jsonl", corpus_documents[:10])  # another, shorter file under the same name
    code, _, err = run_main(fineweb.main, *args)
    line = err.strip()
    assert code == 2 and "\n" not in line and "fewer documents than the" in line, err
    assert "resume" not in line and "rerun" not in line and line.endswith("use another --output-dir")
    assert differences(shard_bytes(tmp_path / "out"), before) == []
