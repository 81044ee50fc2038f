"""loader.py, the shard loader: windows, shards, epochs, DDP ranks, shuffling, resume, errors.

Shards are real (conftest.py's data_dir): Python's reference manual tokenized by fineweb.write_shards
into shards of 4,096 tokens, and windows of T = 48 so that many windows span two shards. The
reference is the plain concatenation of the shard files read back with numpy (shuffled: in the
order a numpy generator seeded with (seed, epoch) gives, written out in `shuffled_windows`).
Small hand-made shards test the edges: lengths, an empty shard, an id beyond the vocabulary.
"""

import os
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from common import UserError
from loader import ShardLoader

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
    assert torch.equal(x.flatten(), torch.from_numpy(stream[: rows * T]))  # nothing skipped at shard ends
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1 : rows * T + 1]))  # y is x shifted by one
    # next_batch walks the same rows, B at a time
    for i, (bx, by) in enumerate(batches(loader, 5)):
        assert torch.equal(bx, x[i * B : (i + 1) * B]) and torch.equal(by, y[i * B : (i + 1) * B])


def test_a_new_epoch_starts_at_the_end_of_the_split(data_dir, stream):
    loader = ShardLoader(data_dir, "train", B, T)
    rows = loader.rows_per_epoch
    loader.row = rows - 2  # two rows before the end: this batch runs into the next epoch
    x, _ = loader.next_batch()
    expected = np.concatenate([stream[(rows - 2) * T : rows * T], stream[: 2 * T]])
    assert torch.equal(x.flatten(), torch.from_numpy(expected))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["row"] == 2


def test_ddp_ranks_read_disjoint_windows_whose_union_is_gradient_accumulation(data_dir):
    W, accum, steps = 2, 3, 4
    single = ShardLoader(data_dir, "train", B, T, seed=5)  # one process, W * accum micro steps
    ranks = [ShardLoader(data_dir, "train", B, T, rank=r, world_size=W, seed=5) for r in range(W)]
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
    shuffled = ShardLoader(data_dir, "train", B, T, seed=7)
    rows = shuffled.rows_per_epoch
    epochs = [shuffled.read_rows(range(e * rows, (e + 1) * rows))[0] for e in range(2)]
    for x in epochs:
        # every token of the split once, except a remainder shorter than one window
        missing = Counter(stream.tolist()) - Counter(x.flatten().tolist())
        assert sum(missing.values()) == len(stream) - rows * T < T + 1
        assert not Counter(x.flatten().tolist()) - Counter(stream.tolist())
    assert not torch.equal(epochs[0], plain.read_rows(range(rows))[0])  # a new order ...
    assert not torch.equal(epochs[0], epochs[1])  # ... each epoch
    again = ShardLoader(data_dir, "train", B, T, seed=7)  # another rank, same seed
    assert torch.equal(again.read_rows(range(rows, 2 * rows))[0], epochs[1])
    other = ShardLoader(data_dir, "train", B, T, seed=8)
    assert not torch.equal(other.read_rows(range(rows))[0], epochs[0])


def shuffled_windows(data_dir, seed, epoch):
    """An epoch's windows (rows, T + 1) as the module docstring says: the shards in the order of a permutation
    drawn from np.random.default_rng((seed, epoch)), then the rows in the order of its next permutation."""
    names = sorted(n for n in os.listdir(data_dir) if "_train_" in n)
    rng = np.random.default_rng((seed, epoch))
    shard_order = rng.permutation(len(names))
    stream = np.concatenate([np.load(os.path.join(data_dir, names[i])) for i in shard_order]).astype(np.int64)
    rows = (len(stream) - 1) // T
    return np.stack([stream[r * T : r * T + T + 1] for r in rng.permutation(rows)])


def test_the_shuffled_order_is_the_seeded_permutation_of_shards_then_rows(data_dir):
    # The order is part of a checkpoint: the loader's state is only (epoch, row), so a resumed run (or
    # a new version of this file) must draw the same order from (seed, epoch).
    loader = ShardLoader(data_dir, "train", B, T, seed=7)
    rows = loader.rows_per_epoch
    for epoch in (0, 1, 2):
        windows = torch.from_numpy(shuffled_windows(data_dir, 7, epoch))
        x, y = loader.read_rows(range(epoch * rows, (epoch + 1) * rows))
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])
    # rank 1 of 2 from the start of epoch 1: each step, the second B of the 2B rows the ranks read together
    rank1 = ShardLoader(data_dir, "train", B, T, rank=1, world_size=2, seed=7)
    rank1.load_state_dict({"epoch": 1, "row": 0, "num_tokens": loader.num_tokens, "seq_len": T})
    windows = torch.from_numpy(shuffled_windows(data_dir, 7, 1))
    for step in range(3):
        x, y = rank1.next_batch()
        first = step * 2 * B + B
        assert torch.equal(x, windows[first : first + B, :-1]) and torch.equal(y, windows[first : first + B, 1:])


def test_the_state_is_the_next_row_for_any_batch_size_and_rank_count(data_dir, stream):
    loader = ShardLoader(data_dir, "train", B, T, seed=3)
    rows = loader.rows_per_epoch
    steps = rows // B + 3  # into the second epoch
    batches(loader, steps)
    state = loader.state_dict()
    assert state == {"epoch": 1, "row": steps * B - rows, "num_tokens": len(stream), "seq_len": T}
    # Resumed with half the micro batch on 2 ranks: rank 1 reads rows [B/2, B) past the saved row.
    rank1 = ShardLoader(data_dir, "train", B // 2, T, rank=1, world_size=2, seed=3)
    rank1.load_state_dict(state)
    windows = torch.from_numpy(shuffled_windows(data_dir, 3, 1))
    x, y = rank1.next_batch()
    first = state["row"] + B // 2
    assert torch.equal(x, windows[first : first + B // 2, :-1]) and torch.equal(y, windows[first : first + B // 2, 1:])
    assert rank1.state_dict() == {**state, "row": state["row"] + B}  # every rank moves on by both ranks' rows


def test_a_state_from_other_data_of_the_same_seq_len_is_refused(data_dir, tmp_path):
    state = ShardLoader(data_dir, "train", B, T).state_dict()
    names = sorted(n for n in os.listdir(data_dir) if "_train_" in n)
    for name in names[:-1]:  # the same data less its last shard
        np.save(tmp_path / name, np.load(os.path.join(data_dir, name)))
    fewer = ShardLoader(str(tmp_path), "train", B, T)
    with pytest.raises(UserError) as error:
        fewer.load_state_dict(state)
    assert str(error.value) == (
        f"the checkpoint's loader read {state['num_tokens']} train tokens as windows of {T}, "
        f"but the data holds {fewer.num_tokens} tokens and --seq-len is {T}; resume with the "
        f"same data, or start a new run with --overwrite"
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_restored_loader_continues_exactly(data_dir, tmp_path, shuffle):
    original = ShardLoader(data_dir, "train", B, T, seed=3 if shuffle else None)
    steps_per_epoch = original.rows_per_epoch // B
    batches(original, steps_per_epoch - 2)  # mid-shard, two batches before the epoch ends
    torch.save(original.state_dict(), tmp_path / "state.pt")  # as inside a checkpoint
    restored = ShardLoader(data_dir, "train", B, T, seed=3 if shuffle else None)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for (x1, y1), (x2, y2) in zip(batches(original, 6), batches(restored, 6)):  # into the next epoch
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert original.state_dict()["epoch"] == 1


def test_a_state_from_other_data_is_refused(data_dir):
    loader = ShardLoader(data_dir, "train", B, T)
    state = loader.state_dict()
    with pytest.raises(UserError, match="--seq-len"):
        ShardLoader(data_dir, "train", B, T + 1).load_state_dict(state)


# -----------------------------------------------------------------------------
# Errors: each names the problem and the fix


def copy_split(src, dst, split):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if f"_{split}_" in name:
            np.save(os.path.join(dst, name), np.load(os.path.join(src, name)))


def test_missing_directory_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; make it with `python fineweb.py`.*--demo"):
        ShardLoader(str(tmp_path / "nowhere"), "train", B, T)


def test_a_split_without_shards(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "val")  # val only
    with pytest.raises(UserError, match=r"no train shards .* in .*python fineweb.py"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_split_shorter_than_one_batch(data_dir, tmp_path):
    np.save(tmp_path / "pydocs_train_000001.npy", np.load(os.path.join(data_dir, "pydocs_train_000001.npy"))[: B * T])
    with pytest.raises(UserError, match=f"holds {B * T} tokens, fewer than one batch of {B} windows"):
        ShardLoader(str(tmp_path), "train", B, T)
    with pytest.raises(UserError, match="fewer than one batch of 8 windows"):  # 4 ranks x 2 rows
        ShardLoader(str(tmp_path), "train", B // 2, T, rank=1, world_size=4)


def test_a_shard_that_is_not_uint16(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    np.save(tmp_path / "pydocs_train_000002.npy", np.load(tmp_path / "pydocs_train_000002.npy").astype(np.int32))
    with pytest.raises(UserError, match=r"pydocs_train_000002.npy holds a int32 array .* not uint16"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_truncated_shard(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    path = tmp_path / "pydocs_train_000003.npy"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(UserError, match=r"pydocs_train_000003.npy is not a readable token shard"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_file_that_is_not_npy(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    (tmp_path / "pydocs_train_000004.npy").write_text("these are not tokens")
    with pytest.raises(UserError, match=r"pydocs_train_000004.npy is not a readable token shard"):
        ShardLoader(str(tmp_path), "train", B, T)


def test_token_ids_beyond_the_vocabulary(data_dir, stream):
    # every document starts with <|endoftext|> = 50256: a model of 50,000 tokens cannot read it
    loader = ShardLoader(data_dir, "train", B, T, vocab_size=50000)
    with pytest.raises(UserError, match=r"pydocs_train_\d+.npy holds token id \d+, beyond .*vocab_size=50000"):
        for _ in range(loader.rows_per_epoch // B):
            loader.next_batch()
    fine = ShardLoader(data_dir, "train", B, T, vocab_size=int(stream.max()) + 1)
    assert len(batches(fine, 3)) == 3


def small_shards(directory, lengths, split="train", bad=None):
    """Shards of the given lengths holding 0, 1, 2, ... (ids below 50); bad=(shard, position, id) plants an id."""
    os.makedirs(directory, exist_ok=True)
    stream = np.arange(sum(lengths), dtype=np.uint16) % 50
    arrays = np.split(stream, np.cumsum(lengths)[:-1])
    if bad is not None:
        shard, position, token = bad
        arrays[shard][position] = token
    for index, array in enumerate(arrays, start=1):
        np.save(os.path.join(directory, f"tiny_{split}_{index:06d}.npy"), array)
    return np.concatenate(arrays).astype(np.int64)


def test_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "shards.npy").write_bytes(b"")
    with pytest.raises(UserError, match=r"--data-dir .*shards.npy is a file; give the directory of shards"):
        ShardLoader(str(tmp_path / "shards.npy"), "train", B, T)


def test_only_files_named_as_shards_of_the_split_are_read(tmp_path):
    stream = small_shards(tmp_path, [40, 30, 20])
    np.save(tmp_path / "tiny_train_1.npy", np.arange(7, dtype=np.uint16))  # not six digits
    np.save(tmp_path / "tiny_train_000004.npy.npy", np.arange(7, dtype=np.uint16))
    np.save(tmp_path / "tiny_val_000000.npy", np.arange(5, dtype=np.uint16))
    loader = ShardLoader(str(tmp_path), "train", 2, 8)
    assert loader.num_tokens == 90 == len(stream)
    assert [os.path.basename(p) for p in loader.paths] == [f"tiny_train_{i:06d}.npy" for i in (1, 2, 3)]


def test_a_data_dir_named_with_glob_characters(tmp_path):
    stream = small_shards(tmp_path / "tokens[gpt2]", [40, 30])
    loader = ShardLoader(str(tmp_path / "tokens[gpt2]"), "train", 2, 8)
    x, _ = loader.read_rows(range(loader.rows_per_epoch))
    assert loader.num_tokens == 70 and torch.equal(x.flatten(), torch.from_numpy(stream[:64]))


def test_a_split_of_a_multiple_of_t_tokens(tmp_path):
    # 8 * T tokens hold 7 windows of T + 1 (an 8th would need token 8T as its last target)
    stream = small_shards(tmp_path, [5 * 8, 3 * 8])
    loader = ShardLoader(str(tmp_path), "train", 2, 8)
    assert loader.rows_per_epoch == 7
    x, y = loader.read_rows(range(7))
    assert torch.equal(x.flatten(), torch.from_numpy(stream[:56]))
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1:57]))


def test_a_split_of_exactly_one_batch_and_a_smaller_minimum(tmp_path):
    small_shards(tmp_path / "one", [B * T + 1])  # B windows: one micro batch, and no more
    assert ShardLoader(str(tmp_path / "one"), "train", B, T).rows_per_epoch == B
    assert ShardLoader(str(tmp_path / "one"), "train", B // 2, T, rank=1, world_size=2).rows_per_epoch == B
    with pytest.raises(UserError, match=f"fewer than one batch of {2 * B} windows"):
        ShardLoader(str(tmp_path / "one"), "train", B, T, rank=1, world_size=2)
    # the val loader needs one window, whatever the batch (evaluate_val pads its batch)
    small_shards(tmp_path / "val", [2 * T + 1], split="val")
    val = ShardLoader(str(tmp_path / "val"), "val", B, T, world_size=2)
    assert val.rows_per_epoch == 2 and val.read_rows(range(2))[0].shape == (2, T)


def test_a_shard_of_the_wrong_shape(data_dir, tmp_path):
    copy_split(data_dir, tmp_path, "train")
    tokens = np.load(tmp_path / "pydocs_train_000002.npy")
    np.save(tmp_path / "pydocs_train_000002.npy", tokens[: len(tokens) // 2 * 2].reshape(2, -1))
    with pytest.raises(UserError, match=r"pydocs_train_000002.npy holds a uint16 array of shape \(2, \d+\), not "):
        ShardLoader(str(tmp_path), "train", B, T)


def test_a_short_shard_and_an_empty_one_are_crossed(tmp_path):
    # the first window starts in a shard shorter than itself and runs through an empty one
    stream = small_shards(tmp_path, [3, 0, 30])
    loader = ShardLoader(str(tmp_path), "train", 2, 4, vocab_size=50)
    x, y = loader.read_rows(range(loader.rows_per_epoch))
    assert loader.rows_per_epoch == 8 and torch.equal(x.flatten(), torch.from_numpy(stream[:32]))
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1:33]))


def test_an_id_beyond_the_vocabulary_is_found_wherever_it_is(tmp_path):
    # The id opens shard 2 at stream position 8: row 1 (positions 4..8) has it as its last target only.
    small_shards(tmp_path, [8, 7, 9], bad=(1, 0, 99))
    loader = ShardLoader(str(tmp_path), "train", 2, 4, vocab_size=99)
    loader.read_rows([0])
    with pytest.raises(UserError) as error:
        loader.read_rows([1])
    assert str(error.value) == (
        f"{tmp_path / 'tiny_train_000002.npy'} holds token id 99, beyond the model's "
        f"vocab_size=99; raise --vocab-size or re-tokenize with GPT-2's tokenizer"
    )
    assert len(ShardLoader(str(tmp_path), "train", 2, 4, vocab_size=100).read_rows(range(5))[0]) == 5
    for seed in range(4):  # shuffled, the message still names the shard that holds the id
        shuffled = ShardLoader(str(tmp_path), "train", 2, 4, vocab_size=99, seed=seed)
        with pytest.raises(UserError, match="tiny_train_000002.npy holds token id 99"):
            shuffled.read_rows(range(shuffled.rows_per_epoch))


# -----------------------------------------------------------------------------
# One dataset a directory, and the shard list the ranks compare


def test_a_directory_of_two_datasets_is_refused_in_one_line(tmp_path):
    small_shards(tmp_path, [40, 30])  # tiny_train_*
    np.save(tmp_path / "other_val_000000.npy", np.arange(20, dtype=np.uint16))  # another dataset's val shard
    np.save(tmp_path / "notes.npy", np.arange(5, dtype=np.uint16))  # not a shard: no dataset
    for split in ("train", "val"):
        with pytest.raises(UserError) as error:
            ShardLoader(str(tmp_path), split, 2, 8)
        assert str(error.value) == (
            f"{tmp_path} holds shards of 2 datasets (other, tiny); keep one prefix a directory: move the others "
            f"into a directory of their own"
        )
    os.remove(tmp_path / "other_val_000000.npy")
    assert ShardLoader(str(tmp_path), "train", 2, 8).num_tokens == 70


def test_shard_list_names_each_shard_of_the_split_and_its_tokens(data_dir):
    for split in ("train", "val"):
        names = sorted(n for n in os.listdir(data_dir) if f"_{split}_" in n)
        expected = [(name, len(np.load(os.path.join(data_dir, name)))) for name in names]
        assert ShardLoader(data_dir, split, 1, T).shard_list() == expected
    assert len(expected) == 1 and expected[0][0] == "pydocs_val_000000.npy"


# -----------------------------------------------------------------------------
# The read-ahead: the next micro batch read on a thread, exactly what read_rows gives, also after a resume


def recorded(monkeypatch, loader):
    """loader.read_rows, recording (the thread that called it, the rows) of each call."""
    calls, read_rows = [], loader.read_rows

    def record(rows):
        calls.append((threading.current_thread() is threading.main_thread(), list(rows)))
        return read_rows(rows)

    monkeypatch.setattr(loader, "read_rows", record)
    return calls


def test_next_batch_reads_the_following_batch_on_a_thread(data_dir, monkeypatch):
    reference = ShardLoader(data_dir, "train", B, T, seed=2)
    loader = ShardLoader(data_dir, "train", B, T, rank=1, world_size=2, seed=2)
    calls = recorded(monkeypatch, loader)
    for step in range(4):
        x, y = loader.next_batch()
        first = step * 2 * B + B  # rank 1's rows of the step
        expected = reference.read_rows(range(first, first + B))
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])  # bitwise
    rows = [list(range(first, first + B)) for first in range(B, 10 * B, 2 * B)]
    # the first batch read when asked for, each one after it while the one before was in use, on another thread
    expected = [(True, rows[0])] + [(False, r) for r in rows[1:]]
    assert calls[:4] == expected[:4] and calls[4:] in ([], expected[4:])  # the last may not have started yet


def test_a_resume_in_place_reads_from_the_state_loaded_not_the_batch_read_ahead(data_dir):
    loader = ShardLoader(data_dir, "train", B, T, seed=4)
    reference = ShardLoader(data_dir, "train", B, T, seed=4)
    rows = loader.rows_per_epoch
    per_epoch = rows // B
    batches(loader, per_epoch - 2)  # two batches before the end of epoch 0
    state = loader.state_dict()
    ahead = batches(loader, 5)  # on into epoch 1
    for target in (state, {**state, "epoch": 2}, state):  # back, then on to epoch 2, then back again
        loader.load_state_dict(target)
        first = target["epoch"] * rows + target["row"]
        for i, (x, y) in enumerate(batches(loader, 5)):
            expected = reference.read_rows(range(first + i * B, first + (i + 1) * B))
            assert torch.equal(x, expected[0]) and torch.equal(y, expected[1]), (target, i)
    # a fresh loader from the state reads what the first one read after it, to the bit
    restored = ShardLoader(data_dir, "train", B, T, seed=4)
    restored.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(ahead, batches(restored, 5)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the state reached by reading, and loaded back, reads the batch already read ahead: the same rows
    reached = loader.state_dict()
    loader.load_state_dict(reached)
    first = reached["epoch"] * rows + reached["row"]
    assert torch.equal(loader.next_batch()[0], reference.read_rows(range(first, first + B))[0])


@pytest.fixture
def pinning_recorded(monkeypatch):
    """torch.Tensor.pin_memory replaced by a recorder: the tensors it returned (pinning needs a GPU's driver)."""
    pinned = []

    def pin_memory(tensor, device=None):
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return pinned


def test_pin_memory_pins_every_batch_and_only_then(data_dir, pinning_recorded):
    reference = batches(ShardLoader(data_dir, "train", B, T), 3)
    assert pinning_recorded == []  # pin_memory=False: nothing pinned
    loader = ShardLoader(data_dir, "train", B, T, pin_memory=True)
    for x, y in reference:
        pinned_x, pinned_y = loader.next_batch()
        assert any(pinned_x is p for p in pinning_recorded) and any(pinned_y is p for p in pinning_recorded)
        assert torch.equal(pinned_x, x) and torch.equal(pinned_y, y)
    x, y = ShardLoader(data_dir, "train", B, T, pin_memory=True).read_rows([5, 6])
    assert any(x is p for p in pinning_recorded) and any(y is p for p in pinning_recorded)


def can_pin():
    try:
        torch.empty(1).pin_memory()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not can_pin(), reason="torch cannot pin memory here (no GPU driver): see the recorded test")
def test_pin_memory_gives_pinned_tensors(data_dir):
    loader = ShardLoader(data_dir, "train", B, T, pin_memory=True)
    for _ in range(3):
        x, y = loader.next_batch()
        assert x.is_pinned() and y.is_pinned()
    assert not ShardLoader(data_dir, "train", B, T).next_batch()[0].is_pinned()


@pytest.mark.parametrize("bad_shard", [0, 1, 2])
def test_the_vocabulary_check_names_the_shard_of_each_piece_of_a_window(tmp_path, bad_shard):
    # Row 0 (stream[0:9]) spans all three shards: 6 tokens of the first, the 2 of the second, 1 of the third.
    small_shards(tmp_path, [6, 2, 17], bad=(bad_shard, 0, 77))
    loader = ShardLoader(str(tmp_path), "train", 1, 8, vocab_size=77)
    with pytest.raises(UserError) as error:
        loader.read_rows([0])
    assert str(error.value).startswith(f"{tmp_path / f'tiny_train_{bad_shard + 1:06d}.npy'} holds token id 77, ")
    # the batch read ahead meets it on the thread; next_batch raises it when that batch is asked for
    loader = ShardLoader(str(tmp_path), "train", 1, 8, vocab_size=77)
    loader.load_state_dict({"epoch": 1, "row": loader.rows_per_epoch - 1, "num_tokens": 25, "seq_len": 8})
    loader.next_batch()  # the last row of epoch 1, inside the third shard; it reads row 0 of epoch 2 ahead
    with pytest.raises(UserError, match=f"tiny_train_{bad_shard + 1:06d}.npy holds token id 77"):
        loader.next_batch()


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_an_id_in_a_window_inside_one_shard_names_that_shard(tmp_path, seed):
    # Shards of 3, 2 and 40 tokens, the id at position 20 of the third: every window of T + 1 = 5 that holds it
    # lies inside the third shard, wherever the (shuffled) order puts it
    small_shards(tmp_path, [3, 2, 40], bad=(2, 20, 60))
    shuffle = dict(seed=seed) if seed is not None else {}
    loader = ShardLoader(str(tmp_path), "train", 2, 4, vocab_size=60, **shuffle)
    with pytest.raises(UserError, match=r"tiny_train_000003.npy holds token id 60, beyond the model's vocab_size=60;"):
        loader.read_rows(range(loader.rows_per_epoch))
