"""FineWeb-Edu, tokenized once into the uint16 shards that train_gpt2.py reads.

    python fineweb.py                                  # sample-10BT from the hub -> edu_fineweb10B/
    python fineweb.py --subset sample-100BT --output-dir edu_fineweb100B
    python fineweb.py --input a.jsonl b.parquet --output-dir my_shards    # local files, no hub
    python fineweb.py --dataset python-docs --output-dir pydocs --shard-size 100000   # offline demo
    python fineweb.py --benchmark                      # tokens/s against tiktoken's ceiling here

    from fineweb import write_shards, python_docs_documents       # what train_gpt2.py's demo does
    paths = write_shards(python_docs_documents(), "pydocs", "pydocs", shard_size=16384)

What a shard holds: every document becomes [<|endoftext|>] + its GPT-2 tokens (tokenizer.py;
text that happens to read "<|endoftext|>" is tokenized as plain text), the documents are joined
into one stream in input order, and the stream is cut every --shard-size tokens (100M by
default) into `<prefix>_{val|train}_{index:06d}.npy`, uint16. Shard 0 is the validation shard,
the rest are training shards. A document may run on from one shard into the next; nothing is
dropped; the last shard is usually shorter. --max-tokens stops the stream after that many tokens.

Inputs: by default FineWeb-Edu streamed from the Hugging Face hub with `datasets` (nothing is
downloaded ahead, memory stays flat); --dataset also takes a local copy of a dataset repository
(a directory, e.g. a git clone of HuggingFaceFW/fineweb-edu). With --input, local files in the
order given:
  .jsonl, .json   JSON Lines: one object per line with a "text" string (other keys ignored; blank
                  lines skipped). A .json holding one big JSON array is refused, because it cannot
                  be read without loading it whole: convert it with `jq -c '.[]' in.json > in.jsonl`.
  .parquet        a "text" string column, read a batch of rows at a time.
  .txt            the whole file is one document (UTF-8).

Speed: documents are tokenized by a pool of --num-proc processes (default: every core) in input
order, one block of documents ahead of the writer, so the output is the same for any pool size and
only a few blocks of text are ever in memory. --benchmark times it against tiktoken alone in as
many processes (no reading, writing or messages between processes). sample-10BT is about 10B
tokens, ~20 GB of shards; at R tokens/s the tokenizing takes 10B / R seconds, and streaming the
data from the hub may well set the pace instead.

Safety and resuming: a shard is written under a hidden temporary name and renamed when complete,
and `<prefix>_progress.json` (rewritten the same way after every shard) records the arguments and,
for every finished shard, where in the document stream it ends. A rerun with the same arguments
after an interruption (Ctrl-C, a kill, a lost connection, a bad input line fixed in place) checks
the finished shards, reads past the documents they hold without tokenizing them again, and
produces the same bytes as a run that was never interrupted; a rerun with different arguments is
refused. Resuming assumes the documents before the stopping point did not change.

Errors a user can cause end with one line on stderr and exit code 2 (bad arguments, an output
directory made with other arguments) or 1 (a malformed input, the hub out of reach, a full disk, a
tokenizing process killed).
"""

import argparse
import glob
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from tokenizer import EOT, get_tokenizer

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
PYTHON_DOCS = "python-docs"  # --dataset value of the offline demo corpus
CHUNK_DOCS = 16  # documents per task sent to a worker: fewer, larger messages between processes
BLOCK_CHUNKS = 32  # chunks per worker in one block; two blocks are in flight at a time


def default_num_proc():
    """The cores this process may run on (a container or `taskset` may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class UsageError(ValueError):
    """Arguments that cannot work; the message says which and how to fix them (exit code 2)."""


class DataError(RuntimeError):
    """Input that cannot be read, or a hub that cannot be reached, found at run time (exit code 1)."""


# -----------------------------------------------------------------------------
# Tokenizing one document


def to_uint16(ids):
    """Token ids as uint16, the shard dtype, after checking that every id fits in 16 bits."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**16):
        raise ValueError(f"token ids outside 0..65535 ({ids.min()}..{ids.max()}) do not fit the uint16 shards")
    return ids.astype(np.uint16)


def tokenize_document(text):
    """[EOT] + the GPT-2 tokens of one document, as a uint16 array.

    encode_to_numpy with no special tokens allowed or disallowed tokenizes exactly like
    encode_ordinary ("<|endoftext|>" in the text is plain text), but hands back a numpy buffer
    instead of a Python list, which saves a conversion per token.
    """
    ids = get_tokenizer().encode_to_numpy(text, disallowed_special=())  # (n,) uint32
    return to_uint16(np.concatenate([np.array([EOT], dtype=np.uint32), ids]))


def _init_worker():
    # Ctrl-C goes to the whole process group: let the parent alone handle it (it stops the pool)
    # rather than have every worker print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tokenizer()  # built once per worker, before the first document arrives


@contextmanager
def _worker_pool(num_proc):
    """num_proc tokenizing processes. ProcessPoolExecutor rather than multiprocessing.Pool: Pool's
    worker-handler thread wakes up on every result that arrives, and that busy thread cost the
    writer a fifth of its speed on 2 cores; and a worker that dies (out of memory, say) raises
    BrokenProcessPool here where Pool would wait forever."""
    pool = ProcessPoolExecutor(num_proc, initializer=_init_worker)
    try:
        # Start the workers now: forking once threads run (datasets, pyarrow, tqdm's monitor) is
        # unsafe, and with the fork start method the first task forks them all.
        pool.submit(int).result()
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C, queued chunks are dropped


def _tokenize_in_order(documents, pool, num_proc):
    """Yield tokenize_document(text) for each document, in order, tokenized in `pool`.

    Documents are read one block ahead: while the caller writes the tokens of one block, the pool
    tokenizes the next. pool.map alone would read the whole input into its task queue as fast
    as it could; blocks keep memory flat. A DataError while reading (a malformed line) is raised
    only after the documents before it have been yielded, so their shards still get written.
    """
    block_docs = CHUNK_DOCS * BLOCK_CHUNKS * num_proc
    documents = iter(documents)
    pending = deque()  # imap iterators of blocks being tokenized, oldest first
    error = None
    while error is None:
        block = []
        try:
            for text in itertools.islice(documents, block_docs):
                block.append(text)
        except DataError as e:
            error = e
        if not block:
            break
        pending.append(pool.map(tokenize_document, block, chunksize=CHUNK_DOCS))
        if len(pending) == 2:
            yield from pending.popleft()
    while pending:
        yield from pending.popleft()
    if error is not None:
        raise error


# -----------------------------------------------------------------------------
# Documents: the offline demo corpus, local files, the Hugging Face hub


def python_docs_documents():
    """The topics of Python's reference manual (pydoc_data.topics), sorted by topic name.

    Real English text that ships with every Python: the offline corpus for demos and tests.
    """
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


INPUT_FORMATS = (".jsonl", ".json", ".parquet", ".txt")


def _json_lines_documents(path):
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark, if any, is not text
        line_number = 0
        try:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if line_number == 1 and line.lstrip().startswith("["):
                    raise DataError(f"{path} holds a JSON array; fineweb.py reads JSON Lines (one object per "
                                    f"line) to keep memory flat: convert it with `jq -c '.[]' {path} > out.jsonl`")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    reason = f"{e.msg.removesuffix(' at')}, column {e.colno}"
                    raise DataError(f"{path} line {line_number}: malformed JSON ({reason}); "
                                    f"fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path} line {line_number}: no \"text\" string; every line must be a JSON "
                                    f"object with a \"text\" field holding the document")
                yield record["text"]
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text after line {line_number}; re-encode the file as UTF-8") from None


def _parquet_documents(path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{path} has no \"text\" column (columns: {', '.join(schema.names)}); "
                        f"the documents must be in a string column named text")
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise DataError(f"{path}: column \"text\" is {schema.field('text').type}, not strings")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):  # a batch at a time: flat memory
        texts = batch.column(0).to_pylist()
        if None in texts:
            raise DataError(f"{path} row {row + texts.index(None)}: \"text\" is null; drop or fill empty rows")
        row += len(texts)
        yield from texts


def _text_file_documents(path):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # the text exactly as stored, \r\n and all
            yield f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None


def local_documents(paths):
    """The documents of local files, in the order given (formats: see the module docstring)."""
    readers = {".jsonl": _json_lines_documents, ".json": _json_lines_documents,
               ".parquet": _parquet_documents, ".txt": _text_file_documents}
    for path in paths:
        yield from readers[os.path.splitext(path)[1].lower()](path)


def hub_documents(dataset=DEFAULT_DATASET, subset="sample-10BT"):
    """The "text" of every row of a Hugging Face dataset's train split, streamed (nothing downloaded ahead)."""
    import logging

    import datasets
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    try:
        # Quiet while connecting: without a network its retry warnings would bury the one-line
        # error below. Mid-stream they are useful (a long run rides out a flaky connection).
        hub_logger.setLevel(logging.ERROR)
        try:
            rows = datasets.load_dataset(dataset, name=subset, split="train", streaming=True).select_columns(["text"])
        finally:
            hub_logger.setLevel(level)
        for batch in rows.iter(batch_size=1000):  # columns of 1000 rows: 4x faster than row dicts
            yield from batch["text"]
    except Exception as e:  # network, hub, or name errors from datasets/huggingface_hub: all say the same fix
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not stream {dataset} ({subset}) from the Hugging Face hub: {type(e).__name__}: "
                        f"{reason}; check the network and the names, or tokenize local files with --input") from None


# -----------------------------------------------------------------------------
# Shards: the output directory, its progress file, and the writer


def shard_name(prefix, index):
    """`<prefix>_val_000000.npy` for shard 0, `<prefix>_train_{index:06d}.npy` for the others."""
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def _atomic_write(path, write):
    """Call write(file) on a hidden temporary file next to `path`, then rename it to `path`.

    A reader (or a rerun) sees either the old file or the complete new one, never a half-written
    one. If writing fails or is interrupted, the temporary file is removed.
    """
    temporary = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _shard_is_whole(path, tokens):
    """True when `path` is a readable uint16 .npy of exactly `tokens` tokens (a finished shard)."""
    try:
        shard = np.load(path, mmap_mode="r")  # reads the header only; a truncated file fails here
    except (OSError, ValueError, EOFError):
        return False
    return shard.dtype == np.uint16 and shard.shape == (tokens,)


class ShardDirectory:
    """The output directory: finished shards, the progress file, and writing the next shard.

    progress.json: {"arguments": {...}, "complete": bool, "shards": [{"file", "tokens",
    "next_document", "next_offset"}, ...]}, where (next_document, next_offset) is the stream
    position right after the shard: the index of the next document and how many of its tokens
    (counting its leading EOT) are already in this or earlier shards.
    """

    def __init__(self, output_dir, prefix, arguments):
        self.output_dir = output_dir
        self.prefix = prefix
        self.arguments = json.loads(json.dumps(arguments))  # as it reads back from JSON: lists, not tuples
        self.progress_path = os.path.join(output_dir, f"{prefix}_progress.json")
        self.shards, self.complete = self._finished_shards()

    def _finished_shards(self):
        """The verified finished shards of an earlier run with the same arguments, and whether it completed."""
        if not os.path.exists(self.progress_path):
            strays = glob.glob(os.path.join(glob.escape(self.output_dir), f"{glob.escape(self.prefix)}_*_[0-9]*.npy"))
            if strays:
                raise UsageError(f"{self.output_dir} already holds {self.prefix} shards "
                                 f"({os.path.basename(sorted(strays)[0])}, ...) but no "
                                 f"{os.path.basename(self.progress_path)}, so they cannot be resumed; "
                                 f"delete them or choose another --output-dir")
            return [], False
        try:
            with open(self.progress_path) as f:
                progress = json.load(f)
            earlier, shards, complete = progress["arguments"], progress["shards"], progress["complete"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.progress_path} is unreadable ({e}); delete {self.output_dir} "
                            f"and start over") from None
        if earlier != self.arguments:
            changed = [key for key in sorted(set(earlier) | set(self.arguments))
                       if earlier.get(key) != self.arguments.get(key)]
            changes = ", ".join(f"{key} {json.dumps(earlier.get(key))} then, {json.dumps(self.arguments.get(key))} now"
                                for key in changed)
            raise UsageError(f"{self.output_dir} holds shards made with other arguments ({changes}); rerun with the "
                             f"same arguments to resume, or choose another --output-dir")
        whole = list(itertools.takewhile(
            lambda shard: _shard_is_whole(os.path.join(self.output_dir, shard["file"]), shard["tokens"]), shards))
        return whole, complete and len(whole) == len(shards)  # a missing or damaged shard is made again

    def remove_temporary_files(self):
        """Remove the half-written files an interrupted run may have left (SIGKILL skips the clean-up)."""
        for path in glob.glob(os.path.join(glob.escape(self.output_dir), f".{glob.escape(self.prefix)}_*.tmp")):
            os.remove(path)

    def paths(self):
        return [os.path.join(self.output_dir, shard["file"]) for shard in self.shards]

    def _save_progress(self):
        state = {"arguments": self.arguments, "complete": self.complete, "shards": self.shards}
        _atomic_write(self.progress_path, lambda f: f.write(json.dumps(state, indent=1).encode()))

    def write_shard(self, tokens, next_document, next_offset):
        """Write the next shard (tokens: (n,) uint16), then record it and where the stream goes on."""
        os.makedirs(self.output_dir, exist_ok=True)
        if not os.path.exists(self.progress_path):
            self._save_progress()  # first, so that no shard ever exists without a progress file
        name = shard_name(self.prefix, len(self.shards))
        _atomic_write(os.path.join(self.output_dir, name), lambda f: np.save(f, tokens))
        self.shards.append({"file": name, "tokens": int(tokens.size),
                            "next_document": next_document, "next_offset": next_offset})
        self._save_progress()

    def mark_complete(self):
        self.complete = True
        if self.shards:
            self._save_progress()


def write_shards(documents, output_dir, prefix="edufineweb", shard_size=100_000_000, num_proc=None,
                 max_tokens=None, progress=True, source=None):
    """Tokenize `documents` (an iterable of str) into uint16 shards in `output_dir`; return all shard paths.

    Shard contents and names: see the module docstring. A rerun with the same arguments resumes:
    the shards of an earlier run are verified and kept, that many documents are read past without
    tokenizing them, and the output is byte-identical to an uninterrupted run. `source` describes
    where the documents come from (any JSON value); it is recorded with the other arguments so a
    rerun on other documents is refused. Raises UsageError (other arguments than the earlier run)
    or DataError (from reading the documents); finished shards stay so a rerun can resume.
    """
    num_proc = num_proc or default_num_proc()
    too_small = [f"{name}={value} must be at least 1" for name, value in
                 (("shard_size", shard_size), ("num_proc", num_proc), ("max_tokens", max_tokens))
                 if value is not None and value < 1]
    if too_small:
        raise UsageError("; ".join(too_small))
    get_tokenizer()  # loaded once here; forked workers inherit it
    arguments = {"prefix": prefix, "shard_size": shard_size, "max_tokens": max_tokens, "source": source}
    directory = ShardDirectory(output_dir, prefix, arguments)
    if directory.complete:
        return directory.paths()
    directory.remove_temporary_files()
    # Where the finished shards leave the stream: skip that many documents, drop that many tokens.
    start_document, start_offset = 0, 0
    if directory.shards:
        start_document, start_offset = directory.shards[-1]["next_document"], directory.shards[-1]["next_offset"]
    total = sum(shard["tokens"] for shard in directory.shards)

    buffer = np.empty(shard_size, dtype=np.uint16)  # the shard being filled
    filled = 0
    with _worker_pool(num_proc) as pool, \
            tqdm(total=max_tokens, initial=total, unit="tok", unit_scale=True, desc="tokenizing",
                 disable=not progress, smoothing=0.1) as bar:
        documents = iter(documents)
        if start_document:
            bar.set_postfix_str(f"reading past the {start_document:,} documents of finished shards")
            skipped = sum(1 for _ in itertools.islice(documents, start_document))  # read, not tokenized
            if skipped < start_document:
                raise DataError(f"the input has only {skipped} documents, fewer than the {start_document} that the "
                                f"finished shards in {output_dir} hold: it changed since they were made; delete "
                                f"{output_dir} and start over")
        bar.set_postfix_str(f"shard {len(directory.shards)}")
        document = start_document  # index of the document whose tokens come next
        for tokens in _tokenize_in_order(documents, pool, num_proc):
            offset = start_offset if document == start_document else 0  # its tokens already in shards
            while offset < tokens.size and total != max_tokens:
                take = min(tokens.size - offset, shard_size - filled)
                if max_tokens is not None:
                    take = min(take, max_tokens - total)
                buffer[filled:filled + take] = tokens[offset:offset + take]
                filled, offset, total = filled + take, offset + take, total + take
                bar.update(take)
                if filled == shard_size or total == max_tokens:  # a full shard, or the last one
                    next_document, next_offset = (document + 1, 0) if offset == tokens.size else (document, offset)
                    directory.write_shard(buffer[:filled], next_document, next_offset)
                    filled = 0
                    bar.set_postfix_str(f"shard {len(directory.shards)}")
            if total == max_tokens:
                break
            document += 1
        if filled:  # the documents ran out: what is left is the last, shorter shard
            directory.write_shard(buffer[:filled], document, 0)
    directory.mark_complete()
    return directory.paths()


# -----------------------------------------------------------------------------
# Benchmark: fineweb.py's tokens/s against the ceiling of tokenizing alone

_ceiling_texts = None  # the benchmark texts, inside each ceiling worker


def _ceiling_init(texts):
    global _ceiling_texts
    _ceiling_texts = texts
    get_tokenizer()


def _ceiling_count(span):
    encode = get_tokenizer().encode_to_numpy  # tiktoken's fastest call, the one tokenize_document makes
    return sum(len(encode(text, disallowed_special=())) for text in _ceiling_texts[span[0]:span[1]])


def _time_write_shards(documents, num_proc, shard_size):
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        paths = write_shards(documents, output_dir, "benchmark", shard_size, num_proc, progress=False)
        seconds = time.perf_counter() - start
        return seconds, sum(np.load(path, mmap_mode="r").size for path in paths)


def _time_ceiling(documents, num_proc):
    with ProcessPoolExecutor(num_proc, initializer=_ceiling_init, initargs=(documents,)) as pool:
        list(pool.map(_ceiling_count, [(0, 0)] * num_proc))  # workers up, tokenizer loaded
        spans = [(i, i + CHUNK_DOCS) for i in range(0, len(documents), CHUNK_DOCS)]
        start = time.perf_counter()
        tokens = sum(pool.map(_ceiling_count, spans)) + len(documents)  # + one EOT each
        return time.perf_counter() - start, tokens


def benchmark(documents, num_proc=None, shard_size=100_000_000, repeats=3):
    """Time write_shards on `documents` (into a temporary directory) against the ceiling.

    The ceiling is tiktoken alone (encode_to_numpy, its fastest call, the one tokenize_document
    makes) over the same texts in the same number of processes, which already hold the texts: no
    reading, no messages between processes, no writing. Each is
    timed `repeats` times, alternating, and the fastest run counts (other load on the machine
    only ever slows a run down). Returns {"tokens", "num_proc", "seconds", "tokens_per_sec",
    "ceiling_seconds", "ceiling_tokens_per_sec", "ratio"}; tokens count every document's EOT.
    """
    documents = list(documents)
    num_proc = num_proc or default_num_proc()
    runs, ceiling_runs = [], []
    for _ in range(repeats):
        runs.append(_time_write_shards(documents, num_proc, shard_size))
        ceiling_runs.append(_time_ceiling(documents, num_proc))
    (seconds, tokens), (ceiling_seconds, ceiling_tokens) = min(runs), min(ceiling_runs)
    assert ceiling_tokens == tokens, (ceiling_tokens, tokens)
    return {"tokens": tokens, "num_proc": num_proc,
            "seconds": seconds, "tokens_per_sec": tokens / seconds,
            "ceiling_seconds": ceiling_seconds, "ceiling_tokens_per_sec": tokens / ceiling_seconds,
            "ratio": ceiling_seconds / seconds}


# -----------------------------------------------------------------------------
# Command line


@dataclass
class FinewebConfig:
    dataset: str = DEFAULT_DATASET  # Hugging Face dataset, or "python-docs" for the offline demo corpus
    subset: str = "sample-10BT"  # the dataset's configuration: sample-10BT, sample-100BT, ...
    input: list[str] | None = None  # local .jsonl/.json/.parquet/.txt files instead of the hub
    output_dir: str = "edu_fineweb10B"
    prefix: str = "edufineweb"  # shard names: <prefix>_val_000000.npy, <prefix>_train_000001.npy, ...
    shard_size: int = 100_000_000  # tokens per shard (uint16: 200 MB)
    num_proc: int = field(default_factory=default_num_proc)  # tokenizer processes
    max_tokens: int | None = None  # stop after this many tokens in all
    progress: bool = True  # a tqdm bar on stderr
    benchmark: bool = False  # measure tokens/s on the python-docs corpus instead

    def problems(self):
        """Every value that cannot work, as readable strings (empty when the config is fine)."""
        found = []
        if self.shard_size < 1:
            found.append(f"--shard-size {self.shard_size} must be at least 1 token")
        if self.num_proc < 1:
            found.append(f"--num-proc {self.num_proc} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            found.append(f"--max-tokens {self.max_tokens} must be at least 1 (leave it out for no limit)")
        if (not self.prefix or self.prefix.startswith(".") or self.prefix != self.prefix.strip()
                or any(c in self.prefix for c in "/\\*?[]")):
            found.append(f"--prefix {self.prefix!r} must be a plain file-name start (no path separators, "
                         f"wildcards, leading dot or surrounding spaces), e.g. edufineweb")
        if not self.output_dir:
            found.append("--output-dir must not be empty")
        elif os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            found.append(f"--output-dir {self.output_dir} exists and is not a directory")
        for path in self.input or []:
            extension = os.path.splitext(path)[1].lower()
            if not os.path.exists(path):
                found.append(f"--input {path} does not exist")
            elif not os.path.isfile(path):
                found.append(f"--input {path} is not a file (pass the files inside a directory, e.g. DIR/*.parquet)")
            elif extension not in INPUT_FORMATS:
                found.append(f"--input {path}: unknown format {extension or '(no extension)'}; "
                             f"use {', '.join(INPUT_FORMATS)}")
        return found

    def source(self):
        """Where the documents come from, as recorded in the progress file (a rerun must match)."""
        if self.input:
            return {"input": [os.path.abspath(path) for path in self.input]}
        if self.dataset == PYTHON_DOCS:
            return {"dataset": PYTHON_DOCS}
        return {"dataset": self.dataset, "subset": self.subset}

    def documents(self):
        if self.input:
            return local_documents(self.input)
        if self.dataset == PYTHON_DOCS:
            return python_docs_documents()
        return hub_documents(self.dataset, self.subset)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize FineWeb-Edu (or local text) into uint16 GPT-2 token shards.")
    # What to tokenize
    parser.add_argument("--dataset", default=FinewebConfig.dataset,
                        help=f"Hugging Face dataset to stream (a hub name or a local copy of its repository), or "
                             f"{PYTHON_DOCS} for Python's reference manual, the offline demo (default: %(default)s)")
    parser.add_argument("--subset", default=FinewebConfig.subset,
                        help="the dataset's configuration, e.g. sample-10BT or sample-100BT (default: %(default)s)")
    parser.add_argument("--input", nargs="+", metavar="FILE", default=None,
                        help="tokenize these local files instead of the hub: .jsonl/.json (JSON Lines with a "
                             "\"text\" field), .parquet (a \"text\" column), .txt (one document per file)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop after this many tokens in all (default: the whole dataset)")
    # Where the shards go
    parser.add_argument("--output-dir", default=FinewebConfig.output_dir, help="shard directory (default: %(default)s)")
    parser.add_argument("--prefix", default=FinewebConfig.prefix,
                        help="shard names: PREFIX_val_000000.npy, PREFIX_train_000001.npy, ... (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=FinewebConfig.shard_size,
                        help="tokens per shard; the first shard is the validation shard (default: %(default)s)")
    # How
    parser.add_argument("--num-proc", type=int, default=None,
                        help="tokenizer processes (default: the cores available, here %d)" % default_num_proc())
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar with tokens/s on stderr (default: on)")
    parser.add_argument("--benchmark", action="store_true",
                        help="instead of writing shards, print tokens/s on the python-docs corpus beside the "
                             "ceiling (tiktoken alone in --num-proc processes)")
    args = vars(parser.parse_args(argv))
    if args["num_proc"] is None:
        del args["num_proc"]
    config = FinewebConfig(**args)
    problems = config.problems()
    if problems:
        parser.exit(2, f"{parser.prog}: error: {'; '.join(problems)}\n")
    return config


def benchmark_documents(num_proc):
    """Python's reference manual, repeated so the measurement takes several seconds on any machine
    (once through, process start-up would dominate)."""
    return python_docs_documents() * (15 * num_proc)


def run_benchmark(config):
    documents = benchmark_documents(config.num_proc)
    print(f"benchmark: {len(documents):,} documents (python-docs), {config.num_proc} processes ...", flush=True)
    result = benchmark(documents, config.num_proc)
    print(f"fineweb.py  {result['tokens_per_sec']:>13,.0f} tokens/s  "
          f"({result['tokens']:,} tokens in {result['seconds']:.1f} s, tokenized, sharded and written)")
    print(f"ceiling     {result['ceiling_tokens_per_sec']:>13,.0f} tokens/s  "
          f"({result['ceiling_seconds']:.1f} s of tiktoken alone in {config.num_proc} processes, no I/O)")
    print("(each the fastest of 3 alternating runs)")
    print(f"ratio       {result['ratio']:.2f}")


def resumable(config):
    """The hint after a failure at run time: what was finished is kept, a rerun goes on from there."""
    if os.path.exists(os.path.join(config.output_dir, f"{config.prefix}_progress.json")):
        return f"finished shards in {config.output_dir} are kept: rerun the same command to resume"
    return ""


def fail(exit_code, message, hint=""):
    """One line on stderr, then exit: no traceback for problems a user can fix."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"fineweb.py: error: {line}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    sys.exit(exit_code)


def main(argv=None):
    config = parse_args(argv)
    if config.benchmark:
        run_benchmark(config)
        return
    start = time.time()
    try:
        paths = write_shards(config.documents(), config.output_dir, config.prefix, config.shard_size, config.num_proc,
                             config.max_tokens, config.progress, source=config.source())
    except UsageError as e:
        fail(2, e)
    except (DataError, OSError) as e:
        fail(1, e, resumable(config))
    except BrokenProcessPool:
        fail(1, "a tokenizing process died (killed, or out of memory: try a smaller --num-proc)", resumable(config))
    except KeyboardInterrupt:
        fail(130, "interrupted", resumable(config))
    tokens = sum(np.load(path, mmap_mode="r").size for path in paths)
    print(f"{config.output_dir}: {len(paths)} shards ({min(len(paths), 1)} val, {max(len(paths) - 1, 0)} train), "
          f"{tokens:,} tokens ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
