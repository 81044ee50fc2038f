"""FineWeb-Edu, tokenized once into the uint16 shards that train_gpt2.py reads.

    python fineweb.py                                  # sample-10BT from the hub -> edu_fineweb10B/ (~20 GB)
    python fineweb.py --input a.jsonl b.parquet notes.txt --output-dir my_shards   # local files, no hub
    python fineweb.py --dataset python-docs --output-dir pydocs --shard-size 100000   # offline demo

Each document becomes [<|endoftext|>] + its GPT-2 tokens, cut in input order every --shard-size tokens into
<prefix>_{val|train}_{i:06d}.npy (shard 0: val). Rerun after Ctrl-C, a kill or a lost network: it resumes, and the
shards are byte-identical."""

import errno
import glob
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from dataclasses import dataclass
from pydoc_data.topics import topics

import numpy as np
from tqdm import tqdm

from common import UserError, ancestry, atomic_write, directory_lock, parse_settings, problems_of, setting
from tokenizer import EOT, get_tokenizer

SUBSET_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9}  # "around", says the card
CHUNK_DOCS = 16  # documents per task sent to a worker: fewer, larger messages between processes
BLOCK_CHUNKS = 32  # chunks per worker in a block read ahead; two blocks are in the pool at a time
HUB_BATCH = 1000  # rows read from the hub at a time (columns: 4x faster than row dicts), a resume point each
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # taskset: fewer
DATASET_FILE = re.compile(r"(.+)_((val|train)_\d{6}\.npy|progress\.jsonl)")  # a dataset's files; [1]: its prefix


@dataclass
class FinewebConfig:
    dataset: str = setting("HuggingFaceFW/fineweb-edu", "Hugging Face dataset, or python-docs: Python's manual")
    subset: str = setting("sample-10BT", "the dataset's configuration")
    input: list = setting(None, "local .jsonl/.json/.parquet/.txt files instead", nargs="+", metavar="FILE")
    max_tokens: int = setting(None, "stop after this many tokens in all", must="be positive")
    output_dir: str = setting("edu_fineweb10B", "shard directory")
    prefix: str = setting("edufineweb", "shard names: PREFIX_val_000000.npy, PREFIX_train_...")
    shard_size: int = setting(100_000_000, "tokens per shard", must="be positive")
    num_proc: int = setting(CORES, "tokenizer processes", must="be positive")
    progress: bool = setting(True, "a progress bar")
    disk_check: bool = setting(True, "refuse to start when the tokens will not fit on the output disk")

    def problems(self):  # with the rules above, by common.problems_of (write_shards checks its arguments too)
        found = []
        if not self.prefix or self.prefix != self.prefix.strip().lstrip(".") or set("/\\*?[]") & set(self.prefix):
            found.append(f"--prefix {self.prefix!r} must be a plain file-name start (no /, wildcards, dot or spaces)")
        parent = ancestry(self.output_dir)[-1]
        if not self.output_dir or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            found.append(f"--output-dir {self.output_dir!r} must be a directory you can write in")
        for path in self.input or []:
            if os.path.isdir(path):
                found.append(f"--input {path} is not a file (pass the files inside a directory, e.g. DIR/*.parquet)")
            elif not os.path.exists(path):  # a named pipe is fine
                found.append(f"--input {path} does not exist")
            elif (extension := os.path.splitext(path)[1].lower()) not in (".jsonl", ".json", ".parquet", ".txt"):
                found.append(f"--input {path}: unknown format {extension or '(none)'}; use .jsonl/.json/.parquet/.txt")
        return found


def tokenize_document(text):
    """[EOT] + the GPT-2 tokens of one document ("<|endoftext|>" in the text is plain text), uint16: ids < 50257."""
    return np.concatenate(([EOT], get_tokenizer().encode_to_numpy(text, disallowed_special=()))).astype(np.uint16)


def write_shards(documents, output_dir, prefix, shard_size, num_proc=1, max_tokens=None, progress=True, source=None):
    """Tokenize `documents` (strings, or a HubDocuments) into shards in `output_dir`; return their paths. Raises
    UserError; a rerun with the same arguments (`source`: where the documents come from, as JSON) resumes."""
    arguments = dict(prefix=prefix, shard_size=shard_size, max_tokens=max_tokens)
    if problems := problems_of(FinewebConfig(output_dir=output_dir, num_proc=num_proc, **arguments)):
        raise UserError("; ".join(problems), exit_code=2)
    get_tokenizer()  # loaded once here; forked workers inherit it
    try:  # a failed run leaves no lock or directory it made, only the shards it finished
        with directory_lock(output_dir, "fineweb.py run", made=ancestry(output_dir)[:-1]):
            shards = Progress(output_dir, dict(arguments, source=source))
            if not shards.complete:
                _write(documents, shards, shard_size, num_proc, max_tokens, progress)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"the disk of {output_dir} is full: free space, or use another --output-dir") from None
        raise
    return [os.path.join(output_dir, shard["file"]) for shard in shards]


def _write(documents, shards, shard_size, num_proc, max_tokens, progress):
    last = shards[-1] if shards else {"next_document": 0, "next_offset": 0, "stream": None}
    document, skip = last["next_document"], last["next_offset"]
    hub = documents if isinstance(documents, HubDocuments) else None
    if hub and last["stream"]:
        hub.positions = [last["stream"]]  # the stream goes on from there, not from its first row
    behind = document - (hub.positions[0]["document"] if hub else 0)  # documents to read past, untokenized
    total, filled, buffer = sum(shard["tokens"] for shard in shards), 0, np.empty(shard_size, np.uint16)
    # Not multiprocessing.Pool: it wakes on every result (a fifth of the speed on 2 cores), hangs on a dead worker.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    pool = ProcessPoolExecutor(num_proc, context, initializer=_init_worker)
    pool.submit(int).result()  # forked now (on Linux: with the tokenizer), as forking once threads run is unsafe
    goal = max_tokens or (hub and SUBSET_TOKENS.get(hub.subset))  # or the subset's size, said the card
    bar = tqdm(total=goal, initial=total, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress)
    bar.set_postfix_str(f"reading past {behind:,} documents")
    try:
        documents = iter(documents)
        if sum(1 for _ in itertools.islice(documents, behind)) < behind:
            why = f"the input has fewer documents than the {document} of the finished shards in {shards.output_dir}"
            raise UserError(f"{why}: it is another input; use another --output-dir", exit_code=2)
        for document, tokens in enumerate(_tokenize_in_order(documents, pool, num_proc), start=document):
            offset, skip = skip, 0
            while offset < tokens.size and total != max_tokens:
                take = min(tokens.size - offset, shard_size - filled, (max_tokens or np.inf) - total)
                buffer[filled : filled + take] = tokens[offset : offset + take]
                filled, offset, total = filled + take, offset + take, total + take
                bar.update(take)
                if filled == shard_size:
                    shards.write(buffer[:filled], document, offset, hub and hub.position(document))
                    filled = 0
                    bar.set_postfix_str(f"shard {len(shards)}")
            if total == max_tokens:
                break
        if filled:  # the last, shorter shard: the documents or --max-tokens ran out
            shards.write(buffer[:filled], document, offset, hub and hub.position(document))
    except BrokenProcessPool:
        raise UserError("a tokenizing process died (killed, or out of memory: try a smaller --num-proc)") from None
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)  # queued chunks are dropped (an error, or --max-tokens reached)
    if not shards:
        raise UserError("the input holds no documents (it is empty, or only blank lines); check the input")
    shards.log({"complete": True})


def write_python_docs(output_dir):  # the demo's data: Python's reference manual in shards of 16,384 tokens
    return write_shards(python_docs_documents(), output_dir, "pydocs", 16384, 1, progress=False, source="python-docs")


def python_docs_documents():  # Python's reference manual: real English text that ships with Python
    return [topics[name] for name in sorted(topics)]


def local_documents(paths):
    for path in paths:  # in the order given, a line or a batch of rows at a time (flat memory)
        try:
            if path.lower().endswith(".txt"):
                yield open(path, encoding="utf-8-sig", newline="").read()  # one document, \r\n and all; no BOM
            elif path.lower().endswith(".parquet"):
                yield from _parquet(path)
            else:
                for number, line in enumerate(open(path, encoding="utf-8-sig"), start=1):
                    if line.strip():
                        yield _json_text(line, path, number)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None


def _json_text(line, path, number):
    if number == 1 and line.lstrip().startswith("["):
        raise UserError(f"{path} holds a JSON array, not JSON Lines: convert it with `jq -c '.[]' {path} > out.jsonl`")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number}: malformed JSON ({e.msg}, column {e.colno}); fix or remove it") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UserError(f'{path} line {number}: no "text" string; each line must be an object with a "text" field')
    return record["text"]


def _parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names or schema.field("text").type not in (pa.string(), pa.large_string()):
        raise UserError(f'{path} has no "text" column of strings (columns: {", ".join(schema.names)})')
    batches = parquet.iter_batches(batch_size=1024, columns=["text"])
    for row, text in enumerate(itertools.chain.from_iterable(batch.column(0).to_pylist() for batch in batches)):
        if text is None:
            raise UserError(f'{path} row {row}: "text" is null; drop or fill that row')
        yield text


class HubDocuments:
    """The "text" of a Hugging Face dataset's train split, streamed; `positions` to resume from every HUB_BATCH rows."""

    def __init__(self, dataset, subset="sample-10BT"):
        self.dataset, self.subset, self.positions = dataset, subset, [{"document": 0, "state": None}]

    def position(self, document):  # the latest at or before `document`; the writer never asks for an earlier one
        while len(self.positions) > 1 and self.positions[1]["document"] <= document:
            del self.positions[0]
        return self.positions[0]

    def __iter__(self):
        import datasets
        from huggingface_hub.utils import logging

        verbosity, start = logging.get_verbosity(), self.positions[0]
        try:
            logging.set_verbosity_error()  # while connecting: retry warnings would bury the one-line error below
            try:
                rows = datasets.load_dataset(self.dataset, name=self.subset, split="train", streaming=True)
            finally:
                logging.set_verbosity(verbosity)  # mid-stream they help: a long run rides out a flaky network
            rows = rows.select_columns(["text"])
            if start["state"]:
                rows.load_state_dict(start["state"])
            for batch in rows.iter(batch_size=HUB_BATCH):
                document = self.positions[-1]["document"] + len(batch["text"])
                self.positions.append({"document": document, "state": rows.state_dict()})  # document: how many before
                yield from batch["text"]
        except Exception as e:  # network, hub or name errors from datasets and huggingface_hub: one fix
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            why = f"could not stream {self.dataset} ({self.subset}) from the Hugging Face hub: {error}"
            raise UserError(f"{why}; check the network and the names, or tokenize local files with --input") from None


def main(argv=None):
    """The command line: an error is one line on stderr; exit 2 for settings, 1 at run time, 130 Ctrl-C, 143 SIGTERM."""
    config = None

    def error_line(message, exit_code):
        line = f"fineweb.py: error: {' '.join(str(message).split())}"
        kept = exit_code != 2 and config and os.path.exists(f"{config.output_dir}/{config.prefix}_progress.jsonl")
        return f"{line}; finished shards in {config.output_dir} are kept: rerun the command to resume" if kept else line

    def stop(number, frame):  # at once: every finished shard is fsync'd and recorded; unwinding the pool could hang
        line = error_line(f"stopped by {signal.Signals(number).name}", 128 + number)
        os.write(sys.stderr.fileno(), f"{line}\n".encode())  # not print: it could land inside another print
        os._exit(128 + number)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = parse_settings(FinewebConfig, argv, "Tokenize FineWeb-Edu (or local text) into GPT-2 token shards.")
        if config.input:
            source, documents = {"input": list(map(os.path.abspath, config.input))}, local_documents(config.input)
        elif config.dataset == "python-docs":
            source, documents = {"dataset": config.dataset}, python_docs_documents()
        else:
            source = {"dataset": config.dataset, "subset": config.subset}
            documents = HubDocuments(config.dataset, config.subset)
        there = glob.glob(os.path.join(glob.escape(config.output_dir), f"{config.prefix}_*.npy"))
        expected = config.max_tokens or SUBSET_TOKENS.get(source.get("subset"), 0)  # a hub subset: its size
        needed = 2 * int(expected) - sum(map(os.path.getsize, there))  # 2 bytes a token, less the shards there
        free = shutil.disk_usage(ancestry(config.output_dir)[-1]).free
        if config.disk_check and needed > free:  # rounded up and down, the two numbers never read the same
            why = f"{config.output_dir} needs {readable(needed, math.ceil)} more, has {readable(free, math.floor)} free"
            raise UserError(f"{why}; free space, or use another --output-dir, a lower --max-tokens or --no-disk-check")
        settings = [config.prefix, config.shard_size, config.num_proc, config.max_tokens, config.progress, source]
        paths = write_shards(documents, config.output_dir, *settings)
    except (UserError, OSError) as e:
        print(error_line(e, getattr(e, "exit_code", 1)), file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    finally:
        for number, handler in previous.items():  # main() may run inside another program (the tests)
            signal.signal(number, handler)
    count, tokens = len(paths), sum(np.load(path, mmap_mode="r").size for path in paths)
    print(f"{config.output_dir}: {count} shards (1 val, {count - 1} train), {tokens:,} tokens")
    if count == 1:
        hint = f"no train shard: rerun into a new --output-dir with a smaller --shard-size, e.g. {max(tokens // 10, 1)}"
        print(f"fineweb.py: warning: all {tokens:,} tokens fit in the val shard, {hint}", file=sys.stderr)


def readable(size, rounding):  # bytes in GB, or MB under 1 GB, to 0.1 rounded up (a need) or down (free space)
    unit, scale = ("GB", 10**9) if size >= 10**9 else ("MB", 10**6)
    return f"{rounding(size * 10 / scale) / 10:,.1f} {unit}"


class Progress(list):
    """The finished shards, a line each in <prefix>_progress.jsonl between {"arguments"} and {"complete": true}: they
    hold the documents before next_document and next_offset of its tokens (EOT included); stream: a hub position."""

    def __init__(self, output_dir, arguments):
        self.output_dir, self.arguments, self.prefix, self.complete = output_dir, arguments, arguments["prefix"], False
        self.path = os.path.join(output_dir, f"{self.prefix}_progress.jsonl")
        ours = os.path.exists(self.path)  # made with the first shard: a run that fails before leaves none
        names = sorted(name for name in os.listdir(output_dir) if DATASET_FILE.fullmatch(name))
        if strays := [name for name in names if DATASET_FILE.fullmatch(name)[1] != self.prefix or not ours]:
            why = f"{output_dir} holds files that no {os.path.basename(self.path)} lists ({strays[0]}, ...)"
            raise UserError(f"{why}: one dataset a directory; choose another --output-dir", exit_code=2)
        if not ours:
            return
        try:
            with open(self.path, "rb") as f:  # [:-1]: a line torn by a crash is left out
                header, *records = [json.loads(line) for line in f.read().split(b"\n")[:-1]]
            then, now = header["arguments"], arguments
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path} is unreadable ({e}); delete {output_dir} and start over", 2) from None
        keys = [key for key in sorted(then | now) if then.get(key) != now.get(key)]
        if changes := [f"{key} {json.dumps(then.get(key))} then, {json.dumps(now.get(key))} now" for key in keys]:
            why = f"{output_dir} holds shards made with other arguments ({', '.join(changes)})"
            raise UserError(f"{why}: they are another dataset; choose another --output-dir", exit_code=2)
        finished = [record for record in records if "file" in record]
        self.extend(itertools.takewhile(self.is_whole, finished))  # up to the first damaged shard
        self.complete = {"complete": True} in records and len(self) == len(finished)
        if not self.complete:  # go on from a clean directory: what a killed run left half-written goes
            for path in glob.glob(os.path.join(glob.escape(output_dir), f".{glob.escape(self.prefix)}_*.tmp")):
                os.remove(path)
            self.rewrite()  # once a run: the verified shards only, ending in a whole line

    def is_whole(self, shard):
        try:  # a short file fails to load
            return np.load(os.path.join(self.output_dir, shard["file"]), mmap_mode="r").shape == (shard["tokens"],)
        except (OSError, ValueError, EOFError):
            return False

    def rewrite(self):
        lines = "".join(json.dumps(record) + "\n" for record in [{"arguments": self.arguments}, *self])
        atomic_write(self.path, lambda f: f.write(lines.encode()))

    def write(self, tokens, document, offset, stream):
        if not os.path.exists(self.path):
            self.rewrite()  # first, so that no shard ever exists without a progress file
        name = f"{self.prefix}_{'train' if self else 'val'}_{len(self):06d}.npy"
        atomic_write(os.path.join(self.output_dir, name), lambda f: np.save(f, tokens))
        self.append(dict(file=name, tokens=int(tokens.size), next_document=document, next_offset=offset, stream=stream))
        self.log(self[-1])

    def log(self, record):
        with open(self.path, "a") as f:
            print(json.dumps(record), file=f, flush=True)
            os.fsync(f.fileno())


def _tokenize_in_order(documents, pool, num_proc):
    """tokenize_document of each document, in order, a block read ahead (pool.map alone would queue the whole input)."""
    previous, error, more = [], None, True
    while more:
        block = []
        try:
            block.extend(itertools.islice(documents, CHUNK_DOCS * BLOCK_CHUNKS * num_proc))
        except UserError as e:  # a malformed line: raised after the documents before it, so that their shards stay
            error = e
        current = pool.map(tokenize_document, block, chunksize=CHUNK_DOCS)
        yield from previous  # while the pool works on the current block
        previous = current
        more = bool(block) and error is None  # an empty block: the input has ended
    yield from previous
    if error is not None:
        raise error


def _init_worker():
    if hasattr(os, "setpgid"):  # Ctrl-C and `kill -TERM -<group>` reach the main process alone (one line)
        os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not main()'s handler

    def exit_with_parent():  # a worker never outlives the run, however it ends (SIGKILL, the out-of-memory killer)
        multiprocessing.parent_process().join()  # returns once the main process is gone
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


if __name__ == "__main__":
    main()
