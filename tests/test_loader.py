"""loader.py, the shard loader: windows, shards, epochs, DDP ranks, shuffling, resume, errors.

Shards are real (conftest.py's data_dir): Python's reference manual tokenized by fineweb.write_shards
into shards of 4,096 tokens, and windows of T = 48 so that many windows span two shards. The
reference is the plain concatenation of the shard files read back with numpy.
"""

import os
from collections import Counter

import numpy as np
import pytest
import torch

from loader import ShardLoader
from common import UserError as TrainError

B, T = 4, 48


@pytest.fixture(scope="module")
def stream(data_dir):
    """The train split as one array: its shards in name order, concatenated."""
    names = sorted(n for n in os.listdir(data_dir) if "_train_" in n)
    assert len(names) > 20  # many shard boundaries to cross
    return np.concatenate([np.load(os.path.join(data_dir, n)) for n in names]).astype(np.int64)


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_windows_cover_the_split_across_shard_ends(data_dir, stream):
    loader = ShardLoader(data_dir, "train", B, T)
    rows = (len(stream) - 1) // T
    assert loader.rows_per_epoch == rows
    x, y = loader.read_rows(range(rows))  # one whole epoch, in order
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (rows, T)
    assert torch.equal(x.flatten(), torch.from_numpy(stream[:rows * T]))  # nothing skipped at shard ends
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1:rows * T + 1]))  # y is x shifted by one
    # next_batch walks the same rows, B at a time
    for i, (bx, by) in enumerate(batches(loader, 5)):
        assert torch.equal(bx, x[i * B:(i + 1) * B]) and torch.equal(by, y[i * B:(i + 1) * B])


def test_a_new_epoch_starts_at_the_end_of_the_split(data_dir, stream):
    loader = ShardLoader(data_dir, "train", B, T)
    rows = loader.rows_per_epoch
    loader.row = rows - 2  # two rows before the end: this batch runs into the next epoch
    x, _ = loader.next_batch()
    expected = np.concatenate([stream[(rows - 2) * T:rows * T], stream[:2 * T]])
    assert torch.equal(x.flatten(), torch.from_numpy(expected))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["row"] == 2


def test_ddp_ranks_read_disjoint_windows_whose_union_is_gradient_accumulation(data_dir):
    W, accum, steps = 2, 3, 4
    single = ShardLoader(data_dir, "train", B, T, seed=5, shuffle=True)  # one process, W * accum micro steps
    ranks = [ShardLoader(data_dir, "train", B, T, rank=r, world_size=W, seed=5, shuffle=True) for r in range(W)]
    for _ in range(steps):
        reference = batches(single, W * accum)
        seen = set()
        for k in range(accum):
            for r, loader in enumerate(ranks):
                x, y = loader.next_batch()
                # micro step k of rank r is micro step k * W + r of the single process
                assert torch.equal(x, reference[k * W + r][0]) and torch.equal(y, reference[k * W + r][1])
                rows = {tuple(row.tolist()) for row in x}
                assert not rows & seen
                seen |= rows
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)  # one state for all ranks


def test_shuffle_covers_the_split_once_per_epoch_in_a_new_order(data_dir, stream):
    plain = ShardLoader(data_dir, "train", B, T)
    shuffled = ShardLoader(data_dir, "train", B, T, seed=7, shuffle=True)
    rows = shuffled.rows_per_epoch
    epochs = [shuffled.read_rows(range(e * rows, (e + 1) * rows))[0] for e in range(2)]
    for x in epochs:
        # every token of the split once, except a remainder shorter than one window
        missing = Counter(stream.tolist()) - Counter(x.flatten().tolist())
        assert sum(missing.values()) == len(stream) - rows * T < T + 1
        assert not Counter(x.flatten().tolist()) - Counter(stream.tolist())
    assert not torch.equal(epochs[0], plain.read_rows(range(rows))[0])  # a new order ...
    assert not torch.equal(epochs[0], epochs[1])  # ... each epoch
    again = ShardLoader(data_dir, "train", B, T, seed=7, shuffle=True)  # another rank, same seed
    assert torch.equal(again.read_rows(range(rows, 2 * rows))[0], epochs[1])
    other = ShardLoader(data_dir, "train", B, T, seed=8, shuffle=True)
    assert not torch.equal(other.read_rows(range(rows))[0], epochs[0])


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_restored_loader_continues_exactly(data_dir, tmp_path, shuffle):
    original = ShardLoader(data_dir, "train", B, T, seed=3, shuffle=shuffle)
    steps_per_epoch = original.rows_per_epoch // B
    batches(original, steps_per_epoch - 2)  # mid-shard, two batches before the epoch ends
    torch.save(original.state_dict(), tmp_path / "state.pt")  # as inside a checkpoint
    restored = ShardLoader(data_dir, "train", B, T, seed=3, shuffle=shuffle)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for (x1, y1), (x2, y2) in zip(batches(original, 6), batches(restored, 6)):  # into the next epoch
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert original.state_dict()["epoch"] == 1


def test_a_state_from_other_data_is_refused(data_dir):
    loader = ShardLoader(data_dir, "train", B, T)
    state = loader.state_dict()
    with pytest.raises(TrainError, match="--seq-len"):
        ShardLoader(data_dir, "train", B, T + 1).load_state_dict(state)


# -----------------------------------------------------------------------------
# Errors: each names the problem and the fix


def copy_split(src, dst, split):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if f"_{split}_" in name:
            np.save(os.path.join(dst, name), np.load(os.path.join(src, name)))


def test_missing_directory_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(TrainError, match=r"does not exist; make it with `python fineweb.py`.*--demo"):
        ShardLoader(str(tmp_path / "nowhere"), "train", B, T)


def test_a_split_without_shards(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "val")  # val only
    with pytest.raises(TrainError, match=r"no train shards .* in .*python fineweb.py"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_split_shorter_than_one_batch(data_dir, tmp_path):
    np.save(tmp_path / "pydocs_train_000001.npy", np.load(os.path.join(data_dir, "pydocs_train_000001.npy"))[:B * T])
    with pytest.raises(TrainError, match=f"holds {B * T} tokens, fewer than one batch of {B} windows"):
        ShardLoader(str(tmp_path), "train", B, T)
    with pytest.raises(TrainError, match="fewer than one batch of 8 windows"):  # 4 ranks x 2 rows
        ShardLoader(str(tmp_path), "train", B // 2, T, rank=1, world_size=4)


def test_a_shard_that_is_not_uint16(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    np.save(tmp_path / "pydocs_train_000002.npy", np.load(tmp_path / "pydocs_train_000002.npy").astype(np.int32))
    with pytest.raises(TrainError, match=r"pydocs_train_000002.npy holds a int32 array .* not uint16"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_truncated_shard(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    path = tmp_path / "pydocs_train_000003.npy"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(TrainError, match=r"pydocs_train_000003.npy is not a readable token shard"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_file_that_is_not_npy(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    (tmp_path / "pydocs_train_000004.npy").write_text("these are not tokens")
    with pytest.raises(TrainError, match=r"pydocs_train_000004.npy is not a readable token shard"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_token_ids_beyond_the_vocabulary(data_dir, stream):
    # every document starts with <|endoftext|> = 50256: a model of 50,000 tokens cannot read it
    loader = ShardLoader(data_dir, "train", B, T, vocab_size=50000)
    with pytest.raises(TrainError, match=r"pydocs_train_\d+.npy holds token id \d+, beyond .*vocab_size=50000"):
        for _ in range(loader.rows_per_epoch // B):
            loader.next_batch()
    fine = ShardLoader(data_dir, "train", B, T, vocab_size=int(stream.max()) + 1)
    assert len(batches(fine, 3)) == 3
