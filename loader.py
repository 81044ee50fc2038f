"""The shard loader: (x, y) windows of T+1 tokens over a split's shards, for every rank, resumable.

A split's shards, in the epoch's order, form one stream; row i is stream[i*T : i*T + T + 1], which
may span shards. Rows are counted from the start of training and run on into the next epoch, with
its own shard and row order (seeded by (seed, epoch): the same on every rank). Rank r of W reads
micro batch g = (step * accum + micro_step) * W + r, rows [g*B, (g+1)*B): the ranks' rows are what one
process reads with W times the accumulation, and the state (the next row) holds for any B and W.

    loader = ShardLoader("edu_fineweb10B", "train", batch_size=16, seq_len=1024, rank=rank, world_size=8)
    x, y = loader.next_batch()   # (16, 1024) int64 each; y is x shifted by one
    state = loader.state_dict()  # goes into the checkpoint; load_state_dict resumes
"""

import glob
import os

import numpy as np
import torch

from common import UserError


def find_shards(data_dir, split):
    if os.path.isfile(data_dir):
        raise UserError(f"--data-dir {data_dir} is a file; give the directory of shards that fineweb.py wrote")
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist; make it with `python fineweb.py` (or try --demo)")
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].npy")))
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
        raise UserError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}, not uint16 tokens; "
                        f"delete it and rerun `python fineweb.py`")
    return tokens


class ShardLoader:
    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, vocab_size=None,
                 seed=0, shuffle=False, min_rows=None):
        self.paths = find_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.split, self.B, self.T, self.rank, self.world_size = split, batch_size, seq_len, rank, world_size
        self.vocab_size, self.seed, self.shuffle = vocab_size, seed, shuffle
        self.num_tokens = sum(len(s) for s in self.shards)
        self.rows_per_epoch = max(0, (self.num_tokens - 1) // seq_len)  # each window needs T+1 tokens
        min_rows = batch_size * world_size if min_rows is None else min_rows  # one micro step on all ranks
        if self.rows_per_epoch < min_rows:
            raise UserError(f"the {split} split of {data_dir} holds {self.num_tokens} tokens, fewer than one batch "
                            f"of {min_rows} windows of {seq_len}+1 tokens; use more data or a smaller "
                            f"--batch-size/--seq-len")
        self.row, self._epoch = 0, None  # the next row to read (counted over epochs), the epoch _order holds

    def _order(self, epoch):
        """The epoch's shard order, each shard's start in its stream, and its row order (None: in order)."""
        if self._epoch != epoch:  # once an epoch: a permutation of every row is not free
            shard_order, rows = np.arange(len(self.shards)), None
            if self.shuffle:
                rng = np.random.default_rng((self.seed, epoch))
                shard_order, rows = rng.permutation(len(self.shards)), rng.permutation(self.rows_per_epoch)
            starts = np.cumsum([0] + [len(self.shards[i]) for i in shard_order])
            self._epoch, self._cached = epoch, (shard_order, starts, rows)
        return self._cached

    def _window(self, epoch, row):
        """Tokens stream[row*T : row*T + T + 1] of an epoch, read across shard ends."""
        shard_order, starts, _ = self._order(epoch)
        start, pieces, need = row * self.T, [], self.T + 1
        i = int(np.searchsorted(starts, start, side="right")) - 1  # the shard holding `start`
        while need:
            shard = shard_order[i]
            piece = self.shards[shard][start - starts[i]:start - starts[i] + need]
            # Ids are checked on every read: a max over T+1 tokens costs nothing next to the forward.
            if self.vocab_size is not None and len(piece) and int(piece.max()) >= self.vocab_size:
                raise UserError(f"{self.paths[shard]} holds token id {int(piece.max())}, beyond the model's "
                                f"vocab_size={self.vocab_size}; raise --vocab-size or re-tokenize with GPT-2's "
                                f"tokenizer", every_rank=False)
            pieces.append(piece)
            start, need, i = start + len(piece), need - len(piece), i + 1
        return np.concatenate(pieces)

    def read_rows(self, rows):
        """(x, y) int64 tensors of shape (len(rows), T) for rows counted over epochs."""
        windows = np.empty((len(rows), self.T + 1), dtype=np.int64)
        for j, row in enumerate(rows):
            epoch, index = divmod(int(row), self.rows_per_epoch)
            row_order = self._order(epoch)[2]
            windows[j] = self._window(epoch, index if row_order is None else int(row_order[index]))
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def next_batch(self):
        """This rank's next micro batch (x, y), each (B, T); all ranks move on by W*B rows."""
        first = self.row + self.rank * self.B
        self.row += self.B * self.world_size
        return self.read_rows(range(first, first + self.B))

    def state_dict(self):
        epoch, row = divmod(self.row, self.rows_per_epoch)
        return {"epoch": epoch, "row": row, "num_tokens": self.num_tokens, "seq_len": self.T}

    def load_state_dict(self, state):
        if (state["num_tokens"], state["seq_len"]) != (self.num_tokens, self.T):
            raise UserError(f"the checkpoint's loader read {state['num_tokens']} {self.split} tokens as windows of "
                            f"{state['seq_len']}, but the data holds {self.num_tokens} tokens and --seq-len is "
                            f"{self.T}; resume with the same data, or start a new run with --overwrite")
        self.row = state["epoch"] * self.rows_per_epoch + state["row"]
