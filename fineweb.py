"""FineWeb-Edu, tokenized once into the uint16 shards that train_gpt2.py reads.

    python fineweb.py                                  # sample-10BT from the hub -> edu_fineweb10B/ (~20 GB)
    python fineweb.py --subset sample-100BT --output-dir edu_fineweb100B
    python fineweb.py --input a.jsonl b.parquet notes.txt --output-dir my_shards   # local files, no hub
    python fineweb.py --dataset python-docs --output-dir pydocs --shard-size 100000   # offline demo

Every document becomes [<|endoftext|>] + its GPT-2 tokens (the text "<|endoftext|>" is plain text), in
input order, cut every --shard-size tokens into `<prefix>_{val|train}_{i:06d}.npy` (shard 0: validation).
Inputs: a Hugging Face dataset streamed with `datasets` (a hub name or a local copy), or --input files:
.jsonl/.json (a "text" field per line), .parquet (a "text" column), .txt (one document). A rerun of the
same command after Ctrl-C, SIGTERM, a kill or a lost connection keeps the finished shards (each fsync'd,
then recorded in `<prefix>_progress.jsonl`) and goes on where they end, byte-identical to a straight run:
a hub stream from its recorded state_dict, local files by reading past their documents untokenized.
"""

import argparse
import ctypes
import glob
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from common import DirectoryLock, UserError, atomic_write
from tokenizer import EOT, get_tokenizer

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
PYTHON_DOCS = "python-docs"  # --dataset value of the offline demo corpus
SUBSET_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9}  # "around", says the card
CHUNK_DOCS = 16  # documents per task sent to a worker: fewer, larger messages between processes
BLOCK_CHUNKS = 32  # chunks per worker in one block; two blocks are in flight at a time
INPUT_FORMATS = (".jsonl", ".json", ".parquet", ".txt")
HUB_BATCH = 1000  # rows read from the hub at a time (columns: 4x faster than row dicts), a resume point each


class UsageError(UserError):
    """Arguments that cannot work (exit code 2)."""

    def __init__(self, message):
        super().__init__(message, exit_code=2)


class DataError(UserError):
    """Input that cannot be read, or a hub out of reach, found at run time (exit code 1)."""


def default_num_proc():
    """The cores this process may run on (a container or `taskset` may allow fewer than exist)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -----------------------------------------------------------------------------
# The writer


def write_shards(documents, output_dir, prefix="edufineweb", shard_size=100_000_000, num_proc=None,
                 max_tokens=None, progress=True, source=None, expected_tokens=None):
    """Tokenize `documents` (strings, or a HubDocuments) into shards in `output_dir`, which it locks;
    return every shard's path. A rerun with the same arguments keeps the earlier run's verified shards
    and goes on where they end. `source` (any JSON value) says where the documents come from and must
    match on a rerun; `expected_tokens` is the bar's total. Raises UsageError (other arguments than the
    earlier run) or DataError (unreadable or no documents); the finished shards stay."""
    num_proc = default_num_proc() if num_proc is None else num_proc
    if problems := _bad_settings(prefix, shard_size, num_proc, max_tokens):
        raise UsageError("; ".join(problems))
    get_tokenizer()  # loaded once here; forked workers inherit it
    with DirectoryLock(output_dir, "fineweb.py run"):
        shards = Progress(output_dir, prefix, dict(prefix=prefix, shard_size=shard_size, max_tokens=max_tokens,
                                                   source=source))
        if not shards.complete:
            _write(documents, shards, shard_size, num_proc, max_tokens, progress, expected_tokens)
        return [os.path.join(output_dir, shard["file"]) for shard in shards]


def _bad_settings(prefix, shard_size, num_proc, max_tokens):
    """What cannot work, named for the library and the command line alike."""
    sizes = {"shard_size": shard_size, "num_proc": num_proc, "max_tokens": max_tokens}
    found = [f"{name}={value} (--{name.replace('_', '-')} {value}) must be at least 1"
             for name, value in sizes.items() if value is not None and value < 1]
    if not prefix or prefix[0] == "." or prefix != prefix.strip() or set("/\\*?[]") & set(prefix):
        found.append(f"--prefix {prefix!r} must be a plain file-name start (no path separators, wildcards, leading "
                     f"dot or surrounding spaces), e.g. edufineweb")
    return found


def _write(documents, shards, shard_size, num_proc, max_tokens, progress, expected_tokens):
    # Where the finished shards leave the stream: the next document, and how many of its tokens to drop.
    last = (shards or [{"next_document": 0, "next_offset": 0, "stream": None}])[-1]
    start_document, start_offset = last["next_document"], last["next_offset"]
    hub = documents if isinstance(documents, HubDocuments) else None
    if hub and last["stream"]:
        hub.positions = deque([last["stream"]])  # the stream goes on from there, not from its first row
    first = hub.positions[0]["document"] if hub else 0  # the first document that will be read
    total, filled, buffer = sum(shard["tokens"] for shard in shards), 0, np.empty(shard_size, np.uint16)
    pool = _worker_pool(num_proc)
    try:
        with tqdm(total=expected_tokens or max_tokens, initial=total, unit="tok", unit_scale=True, desc="tokenizing",
                  disable=not progress, smoothing=0.1) as bar:
            documents = iter(documents)
            bar.set_postfix_str(f"reading past the {start_document - first:,} documents of finished shards")
            if sum(1 for _ in itertools.islice(documents, start_document - first)) < start_document - first:
                raise DataError(f"the input has fewer documents than the {start_document} of the finished shards in "
                                f"{shards.output_dir}: it changed; delete {shards.output_dir} and start over")
            bar.set_postfix_str(f"shard {len(shards)}")
            document = start_document  # the document whose tokens come next
            for tokens in _tokenize_in_order(documents, pool, num_proc):
                offset = start_offset if document == start_document else 0  # its tokens already in shards
                while offset < tokens.size and total != max_tokens:
                    take = min(tokens.size - offset, shard_size - filled, (max_tokens or np.inf) - total)
                    buffer[filled:filled + take] = tokens[offset:offset + take]
                    filled, offset, total = filled + take, offset + take, total + take
                    bar.update(take)
                    if filled == shard_size or total == max_tokens:  # a full shard, or the last one
                        after = (document + 1, 0) if offset == tokens.size else (document, offset)
                        shards.write(buffer[:filled], *after, hub and hub.position(after[0]))
                        filled = 0
                        bar.set_postfix_str(f"shard {len(shards)}")
                if total == max_tokens:
                    break
                document += 1
            if filled:  # the documents ran out: what is left is the last, shorter shard
                shards.write(buffer[:filled], document, 0, hub and hub.position(document))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C, queued chunks are dropped
    if not shards:
        raise DataError("the input holds no documents (it is empty, or only blank lines); check the input")
    shards.log({"complete": True})


class Progress(list):
    """The verified finished shards of an output directory, and `<prefix>_progress.jsonl`, appended to so
    that each shard costs the same: {"arguments"}, per shard {"file", "tokens", "next_document",
    "next_offset", "stream"}, then {"complete": true}. (next_document, next_offset): the next document and
    how many of its tokens (EOT included) are in shards; "stream": a HubDocuments position or null. Each
    line is fsync'd; a last line cut short by a crash is ignored."""

    def __init__(self, output_dir, prefix, arguments):
        self.output_dir, self.prefix, self.arguments = output_dir, prefix, json.loads(json.dumps(arguments))
        self.path, self.complete = os.path.join(output_dir, f"{prefix}_progress.jsonl"), False
        if not os.path.exists(self.path):
            strays = sorted(glob.glob(os.path.join(glob.escape(output_dir), f"{glob.escape(prefix)}_*_[0-9]*.npy")))
            if strays:
                raise UsageError(f"{output_dir} already holds {prefix} shards ({os.path.basename(strays[0])}, ...) but "
                                 f"no {os.path.basename(self.path)}, so they cannot be resumed; delete them or choose "
                                 f"another --output-dir")
            return
        try:
            with open(self.path, "rb") as f:
                header, *records = [json.loads(line) for line in f.read().split(b"\n")[:-1]]  # [-1]: "" or torn
            earlier = header["arguments"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.path} is unreadable ({e}); delete {output_dir} and start over") from None
        if earlier != self.arguments:
            changed = [key for key in sorted(earlier | self.arguments) if earlier.get(key) != self.arguments.get(key)]
            changes = ", ".join(f"{key} {json.dumps(earlier.get(key))} then, {json.dumps(self.arguments.get(key))} now"
                                for key in changed)
            raise UsageError(f"{output_dir} holds shards made with other arguments ({changes}); rerun with the same "
                             f"arguments to resume, or choose another --output-dir")
        finished = [record for record in records if "file" in record]
        self.extend(itertools.takewhile(lambda shard: _is_whole(os.path.join(output_dir, shard["file"]),
                                                                shard["tokens"]), finished))
        self.complete = {"complete": True} in records and len(self) == len(finished)  # else a damaged one is redone
        if not self.complete:  # go on from a clean directory: what a killed run left half-written goes
            for path in glob.glob(os.path.join(glob.escape(output_dir), f".{glob.escape(prefix)}_*.tmp")):
                os.remove(path)
            self._rewrite()  # once a run: the verified shards only, ending in a whole line

    def _rewrite(self):
        lines = "".join(json.dumps(record) + "\n" for record in [{"arguments": self.arguments}, *self])
        atomic_write(self.path, lambda f: f.write(lines.encode()))

    def log(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, tokens, next_document, next_offset, stream):
        if not os.path.exists(self.path):
            self._rewrite()  # first, so that no shard ever exists without a progress file
        name = f"{self.prefix}_{'train' if self else 'val'}_{len(self):06d}.npy"
        atomic_write(os.path.join(self.output_dir, name), lambda f: np.save(f, tokens))
        self.append(dict(file=name, tokens=int(tokens.size), next_document=next_document, next_offset=next_offset,
                         stream=stream))
        self.log(self[-1])


def _is_whole(path, tokens):
    """True when `path` is a readable uint16 .npy of exactly `tokens` tokens (a finished shard)."""
    try:
        shard = np.load(path, mmap_mode="r")  # reads the header only; a truncated file fails here
    except (OSError, ValueError, EOFError):
        return False
    return shard.dtype == np.uint16 and shard.shape == (tokens,)


# -----------------------------------------------------------------------------
# Tokenizing, in a pool of processes that keeps the input order


def tokenize_document(text):
    """[EOT] + the GPT-2 tokens of one document, uint16. encode_to_numpy, no special tokens allowed, is
    encode_ordinary handing back a numpy buffer: no conversion per token."""
    ids = get_tokenizer().encode_to_numpy(text, disallowed_special=())  # (n,) uint32
    return to_uint16(np.concatenate([np.array([EOT], dtype=np.uint32), ids]))


def to_uint16(ids):
    """Token ids as uint16, the shard dtype, after checking that every id fits in 16 bits."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**16):
        raise ValueError(f"token ids outside 0..65535 ({ids.min()}..{ids.max()}) do not fit the uint16 shards")
    return ids.astype(np.uint16)


def _tokenize_in_order(documents, pool, num_proc):
    """Yield tokenize_document(text) for each document, in order, reading one block of documents ahead
    (pool.map alone would read the whole input into its queue). A DataError while reading (a malformed
    line) comes after the documents before it, so their shards still get written."""
    pending, error = deque(), None  # result iterators of the blocks in the pool, oldest first
    while error is None:
        block = []
        try:
            block.extend(itertools.islice(documents, CHUNK_DOCS * BLOCK_CHUNKS * num_proc))
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


def _worker_pool(num_proc):
    """ProcessPoolExecutor, not multiprocessing.Pool, whose handler thread wakes on every result (a fifth
    of the writer's speed on 2 cores) and which waits forever when a worker dies (out of memory, say)
    where this raises BrokenProcessPool. Forked on Linux: the workers inherit the tokenizer."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    pool = ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))
    pool.submit(int).result()  # start the workers now: forking once threads run (datasets, tqdm) is unsafe
    return pool


def _init_worker(parent):
    # Never outlive the run, however the main process ends: Linux kills a worker with its parent
    # (prctl 1 = PR_SET_PDEATHSIG); elsewhere, or if the parent was already gone, the watch does.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    # A process group of its own: Ctrl-C and `kill -TERM -<group>` reach the main process alone, which
    # stops the pool and says so in one line. The SIGTERM handler inherited from it is undone.
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    get_tokenizer()  # built once per worker, before the first document arrives


def _exit_when_orphaned(parent):
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


# -----------------------------------------------------------------------------
# Documents: the offline demo corpus, local files, a Hugging Face dataset


def python_docs_documents():
    """The topics of Python's reference manual, sorted by name: real English text that ships with Python."""
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def local_documents(paths):
    """The documents of local files, in the order given, a line or a batch of rows at a time (flat memory)."""
    for path in paths:
        yield from {".txt": _text, ".parquet": _parquet}.get(os.path.splitext(path)[1].lower(), _json_lines)(path)


def _text(path):
    try:
        yield open(path, encoding="utf-8-sig", newline="").read()  # as stored, \r\n and all; -sig: a BOM is no text
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None


def _json_lines(path):
    number = 0
    try:
        for number, line in enumerate(open(path, encoding="utf-8-sig"), start=1):
            if number == 1 and line.lstrip().startswith("["):
                raise DataError(f"{path} holds a JSON array; fineweb.py reads JSON Lines (one object per line) to "
                                f"keep memory flat: convert it with `jq -c '.[]' {path} > out.jsonl`")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number}: malformed JSON ({e.msg}, column {e.colno}); fix or remove "
                                f"that line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path} line {number}: no \"text\" string; every line must be a JSON object with a "
                                f"\"text\" field holding the document")
            yield record["text"]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text after line {number}; re-encode the file as UTF-8") from None


def _parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    names, row = parquet.schema_arrow.names, 0
    if "text" not in names or parquet.schema_arrow.field("text").type not in (pa.string(), pa.large_string()):
        raise DataError(f"{path} has no \"text\" column of strings (columns: {', '.join(names)}); put the "
                        f"documents in one")
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
        texts = batch.column(0).to_pylist()
        if None in texts:
            raise DataError(f"{path} row {row + texts.index(None)}: \"text\" is null; drop or fill that row")
        row += len(texts)
        yield from texts


class HubDocuments:
    """The "text" of a Hugging Face dataset's train split, streamed, with positions to resume from:
    {"document": how many documents come before it, "state": IterableDataset.state_dict()}, one per
    HUB_BATCH rows. write_shards keeps with each shard the last position before the shard's end."""

    def __init__(self, dataset=DEFAULT_DATASET, subset="sample-10BT"):
        self.dataset, self.subset = dataset, subset
        self.positions = deque([{"document": 0, "state": None}])  # the oldest one still needed first

    def position(self, document):
        """The latest position at or before `document` (the writer never goes back before it)."""
        while len(self.positions) > 1 and self.positions[1]["document"] <= document:
            self.positions.popleft()
        return self.positions[0]

    def __iter__(self):
        import datasets
        from huggingface_hub.utils import logging
        try:
            # Quiet while connecting: without a network the hub's retry warnings would bury the one-line
            # error below. Mid-stream they are useful (a long run rides out a flaky connection).
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()
            try:
                rows = datasets.load_dataset(self.dataset, name=self.subset, split="train", streaming=True)
            finally:
                logging.set_verbosity(verbosity)
            rows, start = rows.select_columns(["text"]), self.positions[0]
            if start["state"] is not None:
                rows.load_state_dict(start["state"])
            document = start["document"]
            for batch in rows.iter(batch_size=HUB_BATCH):
                document += len(batch["text"])
                self.positions.append({"document": document, "state": rows.state_dict()})
                yield from batch["text"]
        except Exception as e:  # network, hub or name errors from datasets and huggingface_hub: one fix
            raise DataError(f"could not stream {self.dataset} ({self.subset}) from the Hugging Face hub: "
                            f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}; check the network and "
                            f"the names, or tokenize local files with --input") from None


# -----------------------------------------------------------------------------
# Command line. Errors are one line on stderr: exit 2 for arguments, 1 at run time, 130 Ctrl-C, 143 SIGTERM.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize FineWeb-Edu (or local text) into uint16 GPT-2 token "
                                     "shards.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help=f"Hugging Face dataset (a hub name or a local "
                        f"copy), or {PYTHON_DOCS}: Python's manual, offline")
    parser.add_argument("--subset", default="sample-10BT", help="the dataset's configuration")
    parser.add_argument("--input", nargs="+", metavar="FILE", help="local .jsonl/.json/.parquet/.txt files instead")
    parser.add_argument("--max-tokens", type=int, help="stop after this many tokens in all")
    parser.add_argument("--output-dir", default="edu_fineweb10B", help="shard directory")
    parser.add_argument("--prefix", default="edufineweb", help="shard names: PREFIX_val_000000.npy, PREFIX_train_...")
    parser.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--num-proc", type=int, default=default_num_proc(), help="tokenizer processes")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    parser.add_argument("--disk-check", action=argparse.BooleanOptionalAction, default=True,
                        help="refuse to start when a known subset or --max-tokens will not fit on the output disk")
    args = parser.parse_args(argv)
    writable = args.output_dir and os.path.isdir(nearest_existing(args.output_dir)) and os.access(
        nearest_existing(args.output_dir), os.W_OK)
    found = [] if writable else [f"--output-dir {args.output_dir!r} must be a directory you can write in"]
    for path in args.input or []:
        extension = os.path.splitext(path)[1].lower()
        if not os.path.exists(path) or os.path.isdir(path):
            found.append(f"--input {path} does not exist" if not os.path.exists(path) else f"--input {path} is not a "
                         f"file (pass the files inside a directory, e.g. DIR/*.parquet)")
        elif extension not in INPUT_FORMATS:
            found.append(f"--input {path}: unknown format {extension or '(no extension)'}; "
                         f"use {', '.join(INPUT_FORMATS)}")
    if found:
        parser.exit(2, f"{parser.prog}: error: {'; '.join(found)}\n")
    return args


def nearest_existing(path):
    """`path`, or its nearest parent that exists (where a run will create it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def main(argv=None):
    args, start = parse_args(argv), time.time()
    local, demo = args.input, args.dataset == PYTHON_DOCS
    known = None if local or demo else SUBSET_TOKENS.get(args.subset)
    expected = min(n for n in (known, args.max_tokens) if n) if known or args.max_tokens else None
    # 2 bytes a token, less what the shards of an interrupted run already hold
    written = sum(map(os.path.getsize, glob.glob(os.path.join(glob.escape(args.output_dir), f"{args.prefix}_*.npy"))))
    needed, free = 2 * (expected or 0) - written, shutil.disk_usage(nearest_existing(args.output_dir)).free
    if args.disk_check and needed > free:
        fail(1, f"{args.output_dir} needs about {needed / 1e9:.1f} GB more for {expected:,.0f} tokens but its disk has "
                f"{free / 1e9:.1f} GB free; free some space, choose another --output-dir or a smaller --max-tokens, "
                f"or pass --no-disk-check")
    documents = local_documents(local) if local else python_docs_documents() if demo else \
        HubDocuments(args.dataset, args.subset)
    source = {"input": [os.path.abspath(path) for path in local]} if local else \
        {"dataset": args.dataset} if demo else {"dataset": args.dataset, "subset": args.subset}
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM stops the run as Ctrl-C does
    try:
        paths = write_shards(documents, args.output_dir, args.prefix, args.shard_size, args.num_proc,
                             args.max_tokens, args.progress, source, expected)
    except KeyboardInterrupt as e:
        fail(128 + (e.args[0] if e.args else signal.SIGINT), f"stopped by {'SIGTERM' if e.args else 'SIGINT'}", args)
    except BrokenProcessPool:
        fail(1, "a tokenizing process died (killed, or out of memory: try a smaller --num-proc)", args)
    except (DataError, OSError) as e:
        fail(1, e, args)
    except UserError as e:  # arguments that do not fit this directory, or another run holding it
        fail(e.exit_code, e)
    finally:
        signal.signal(signal.SIGTERM, previous)
    tokens = sum(np.load(path, mmap_mode="r").size for path in paths)
    print(f"{args.output_dir}: {len(paths)} shards ({min(len(paths), 1)} val, {max(len(paths) - 1, 0)} train), "
          f"{tokens:,} tokens ({time.time() - start:.0f} s)")
    if len(paths) == 1:
        print(f"fineweb.py: warning: all {tokens:,} tokens fit in the val shard, leaving no train shard; rerun "
              f"into a new --output-dir with a smaller --shard-size, e.g. {max(tokens // 10, 1)}", file=sys.stderr)


def _terminate(signal_number, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
    raise KeyboardInterrupt(signal_number)


def fail(exit_code, message, args=None):
    """One line on stderr, then exit; after a run-time failure, the line says that a rerun resumes."""
    kept = args and os.path.exists(os.path.join(args.output_dir, f"{args.prefix}_progress.jsonl"))
    print(f"fineweb.py: error: {' '.join(str(message).split())}" + (
        f"; finished shards in {args.output_dir} are kept: rerun the same command to resume" if kept else ""),
        file=sys.stderr)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
