"""The shard loader: (x, y) windows of T+1 tokens over a split's shards, for every rank, resumable.

A split's shards, in the epoch's order, form one stream; row i is stream[i*T : i*T + T + 1], which may span shards.
Rows are counted from the start of training and run on into the next epoch, with its own shard and row order (seeded
by (seed, epoch): the same on every rank). Rank r of W reads micro batch g = (step * accum + micro_step) * W + r,
rows [g*B, (g+1)*B): the ranks' rows are what one process reads with W times the accumulation, and the state (the
next row) holds for any B and W. A background thread reads the next micro batch while the GPU works on this one.

    loader = ShardLoader("edu_fineweb10B", "train", B=16, T=1024, rank=rank, world_size=8, seed=1337)
    x, y = loader.next_batch()   # (16, 1024) int64 each; y is x shifted by one
    state = loader.state_dict()  # goes into the checkpoint; load_state_dict resumes"""

import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common import UserError

READER = ThreadPoolExecutor(1, thread_name_prefix="loader")  # reads the next micro batch while this one trains
SHARD_NAME = re.compile(r"(.+)_(val|train)_\d{6}\.npy")  # [1]: the dataset's prefix, [2]: the split


def find_shards(data_dir, split):
    """The split's shard paths in order, from a directory that holds one dataset (one file-name prefix)."""
    if os.path.isfile(data_dir):
        raise UserError(f"--data-dir {data_dir} is a file; give the directory of shards that fineweb.py wrote")
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist; make it with `python fineweb.py` (or try --demo)")
    shards = [match for name in sorted(os.listdir(data_dir)) if (match := SHARD_NAME.fullmatch(name))]
    if len(prefixes := sorted({match[1] for match in shards})) > 1:
        why = f"{data_dir} holds shards of {len(prefixes)} datasets ({', '.join(prefixes)})"
        raise UserError(f"{why}; keep one prefix a directory: move the others into a directory of their own")
    paths = [os.path.join(data_dir, match[0]) for match in shards if match[2] == split]
    if not paths:
        raise UserError(f"no {split} shards (*_{split}_NNNNNN.npy) in {data_dir}; make them with `python fineweb.py`")
    return paths


def open_shard(path):
    """A shard as a read-only memory map (nothing is read until a window needs it)."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # truncated, not .npy, unreadable
        raise UserError(f"{path} is not a readable token shard ({e}); delete it and rerun `python fineweb.py`")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        what = f"a {tokens.dtype} array of shape {tokens.shape}"
        raise UserError(f"{path} holds {what}, not uint16 tokens; delete it and rerun `python fineweb.py`")
    return tokens


class ShardLoader:
    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, vocab_size=None, seed=None, pin_memory=False):
        """B rows of T tokens a micro batch. seed: shuffle the shards and rows of each epoch with it (None: in order). A
        train split must hold a micro batch for every rank; a val split, one row (evaluate_val pads its batches)."""
        self.paths = find_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.split, self.B, self.T, self.rank, self.world_size = split, B, T, rank, world_size
        self.vocab_size, self.seed, self.pin_memory = vocab_size, seed, pin_memory
        self.num_tokens = sum(len(s) for s in self.shards)
        self.rows_per_epoch = max(0, (self.num_tokens - 1) // T)  # each window needs T+1 tokens
        min_rows = B * world_size if split == "train" else 1
        if self.rows_per_epoch < min_rows:
            why = f"the {split} split of {data_dir} holds {self.num_tokens} tokens, fewer than one batch of {min_rows}"
            raise UserError(f"{why} windows of {T}+1 tokens; use more data or a smaller --batch-size/--seq-len")
        self.row, self._order_of = 0, None  # the next row to read (counted over epochs); _order's last epoch
        self._ahead = {}  # {first row: the future of its micro batch}, read on READER
        # For read-ahead advice to the OS (POSIX only): the shards' files, open for as long as the loader lives
        self.files = [os.open(path, os.O_RDONLY) for path in self.paths] if hasattr(os, "posix_fadvise") else None
        weakref.finalize(self, lambda files: [os.close(fd) for fd in files or []], self.files)

    def _order(self, epoch):
        """The epoch's shard order, each shard's start in its stream, and its row order (None: in order)."""
        if self._order_of is None or self._order_of[0] != epoch:  # once an epoch: permuting every row is not free
            shard_order, rows = np.arange(len(self.shards)), None
            if self.seed is not None:
                rng = np.random.default_rng((self.seed, epoch))
                shard_order, rows = rng.permutation(len(self.shards)), rng.permutation(self.rows_per_epoch)
            starts = np.cumsum([0] + [len(self.shards[i]) for i in shard_order])
            self._order_of = (epoch, shard_order, starts, rows)  # one assignment: the reading thread may ask too
        return self._order_of[1:]

    def _places(self, rows):
        """Where the windows of rows (counted over epochs) start: (their indices in rows, the epoch's shard order,
        the shard's place in it, the offsets in that shard), a tuple per shard."""
        for epoch in np.unique(rows // self.rows_per_epoch):
            shard_order, starts, row_order = self._order(epoch)
            mine = np.flatnonzero(rows // self.rows_per_epoch == epoch)
            index = rows[mine] % self.rows_per_epoch
            begin = (index if row_order is None else row_order[index]) * self.T  # each window's place in the stream
            shard_at = np.searchsorted(starts, begin, side="right") - 1
            for i in np.unique(shard_at):
                yield mine[shard_at == i], shard_order, i, begin[shard_at == i] - starts[i]

    def read_rows(self, rows):
        """(x, y) int64 tensors of shape (len(rows), T) for rows counted over epochs: one gather per shard."""
        windows, rows = np.empty((len(rows), self.T + 1), dtype=np.int64), np.asarray(rows, dtype=np.int64)
        for here, shard_order, i, offsets in self._places(rows):
            shard = self.shards[shard_order[i]]
            inside = offsets + self.T + 1 <= len(shard)
            if inside.any():  # a view of every window of the shard; indexing it reads just these
                view = np.lib.stride_tricks.sliding_window_view(shard, self.T + 1)
                windows[here[inside]] = self._checked(shard_order[i], view[offsets[inside]])
            for j, offset in zip(here[~inside], offsets[~inside]):  # windows that run on into the next shards
                pieces, k = [self._checked(shard_order[i], shard[offset:])], i + 1
                while (need := self.T + 1 - sum(map(len, pieces))) > 0:
                    pieces.append(self._checked(shard_order[k], self.shards[shard_order[k]][:need]))
                    k += 1
                windows[j] = np.concatenate(pieces)
        x, y = torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def _checked(self, shard, tokens):
        """tokens of shard `shard`, refused if one is beyond the vocabulary: a max costs nothing next to a forward."""
        if self.vocab_size is not None and tokens.size and (largest := int(tokens.max())) >= self.vocab_size:
            why = f"{self.paths[shard]} holds token id {largest}, beyond the model's vocab_size={self.vocab_size}"
            raise UserError(f"{why}; raise --vocab-size or re-tokenize with GPT-2's tokenizer")
        return tokens

    def next_batch(self):
        """This rank's next micro batch (x, y), each (B, T); all ranks move on by W*B rows. The one after it is read
        meanwhile on a thread (_read_ahead; into pinned memory for a GPU: its copy can overlap the compute)."""
        first = self.row + self.rank * self.B
        self.row += self.B * self.world_size
        ahead = self._ahead.get(first)  # None: the first batch, or the first after load_state_dict
        batch = self.read_rows(range(first, first + self.B)) if ahead is None else ahead.result()
        following = self.row + self.rank * self.B
        self._ahead = {following: READER.submit(self._read_ahead, following)}
        return batch

    def _read_ahead(self, first):
        """The micro batch at row `first`, after asking the OS (POSIX_FADV_WILLNEED) to read the next one's windows
        in: a page fault in the gather would hold Python's lock, and the training loop waits for that lock."""
        if self.files is not None:
            for _, shard_order, i, offsets in self._places(np.arange(first, first + self.B) + self.B * self.world_size):
                for start in self.shards[shard_order[i]].offset + 2 * offsets:  # 2 bytes a token
                    os.posix_fadvise(self.files[shard_order[i]], int(start), 2 * (self.T + 1), os.POSIX_FADV_WILLNEED)
        return self.read_rows(range(first, first + self.B))

    def shard_list(self):
        """[(file name, tokens)] of the split's shards: what the ranks compare before they train."""
        return [(os.path.basename(path), len(shard)) for path, shard in zip(self.paths, self.shards)]

    def state_dict(self):
        epoch, row = divmod(self.row, self.rows_per_epoch)
        return {"epoch": epoch, "row": row, "num_tokens": self.num_tokens, "seq_len": self.T}

    def load_state_dict(self, state):
        if (state["num_tokens"], state["seq_len"]) != (self.num_tokens, self.T):
            then = f"{state['num_tokens']} {self.split} tokens as windows of {state['seq_len']}"
            now = f"the data holds {self.num_tokens} tokens and --seq-len is {self.T}"
            fix = "resume with the same data, or start a new run with --overwrite"
            raise UserError(f"the checkpoint's loader read {then}, but {now}; {fix}")
        self.row = state["epoch"] * self.rows_per_epoch + state["row"]
