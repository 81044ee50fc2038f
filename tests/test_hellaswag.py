"""hellaswag.py: scores equal a one-example-at-a-time re-computation with transformers' GPT-2.

The data is a small HellaSwag-format file of real English sentences written here, with endings
of very different lengths (so summed and mean losses pick different endings) and one context
longer than the test model's 64 positions (so left truncation is exercised). The model is the
random GPT-2 of the `hf_gpt2_dir` fixture.
"""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import hellaswag
from common import UserError
from export import save_folder, to_hf
from model import GPT
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "hellaswag.py")

EXAMPLES = [
    (
        "A man is sitting on a roof. He",
        [
            "is using wrap to wrap a pair of skis.",
            "starts pulling up the old shingles one by one.",
            "sings.",
            "is holding a cup of coffee and watching the sunset over the quiet lake below the hills.",
        ],
        1,
    ),
    (
        "The chef cracks two eggs into a bowl. She",
        [
            "whisks them with a fork until they are smooth.",
            "paints the bowl blue.",
            "throws the bowl at the window, then sweeps the kitchen floor for a very long time.",
            "sleeps.",
        ],
        0,
    ),
    (
        "A girl kneels next to her bicycle on the sidewalk. She",
        [
            "flies.",
            "reads a newspaper about the weather in another country and then calls her grandmother.",
            "pumps air into the flat back tire.",
            "eats the tire.",
        ],
        2,
    ),
    (
        "The students open their textbooks to chapter three. The teacher",
        [
            "dances on the desk.",
            "swims.",
            "writes the first equation on the board and asks a question.",
            "drives a truck across the field towards the barn while the farmer waves at him from the gate.",
        ],
        2,
    ),
    (
        "To make a paper airplane, fold the sheet in half lengthwise. Then",
        [
            "fold the top corners down to the center line.",
            "burn it.",
            "put the sheet in the washing machine with your shirts and wait for an hour.",
            "cry.",
        ],
        0,
    ),
    (
        "A woman is standing at a bus stop in the rain. She",
        [
            "opens her umbrella and checks the timetable.",
            "melts.",
            "plants a tree in the middle of the road and then leaves.",
            "becomes a bus.",
        ],
        0,
    ),
    (
        "Two boys are playing chess in the park. One of them",
        [
            "moves his knight and says check.",
            "eats the board.",
            "jumps into the fountain with his clothes on.",
            "flies a kite.",
        ],
        0,
    ),
    (
        "The dog runs to the door when the bell rings. It",
        ["barks loudly and wags its tail.", "opens a bank account.", "writes a letter.", "turns into a cat."],
        0,
    ),
    (
        "A gardener kneels beside a row of tomato plants. He",
        ["ties the tall stems to wooden stakes with string.", "sells the garden.", "launches a rocket.", "reads."],
        0,
    ),
    (
        "The orchestra takes its seats and the lights dim. The conductor",
        [
            "raises the baton and the music begins.",
            "leaves to buy groceries.",
            "starts painting the ceiling of the concert hall in bright colours.",
            "sleeps.",
        ],
        0,
    ),
    (
        "A toddler is stacking colourful wooden blocks on the carpet. The tower",
        ["wobbles and falls over.", "sings a song.", "becomes a real castle with a king and a queen.", "drives away."],
        0,
    ),
    (
        "The mechanic lifts the hood of the old car. He",
        [
            "checks the oil level with the dipstick.",
            "plays the violin.",
            "orders a pizza for everyone in the garage and then goes home early.",
            "paints it.",
        ],
        0,
    ),
    # Its rows straddle 32 tokens (9 to 36): the batch is as long as its longest row, not its shortest. And an
    # ending of a single token (" sleeps"): its mean is its one loss.
    (
        "A cat sits by the window. It",
        [
            "sleeps",
            "watches the birds in the garden, the leaves falling from the old oak tree, and the neighbour walking "
            "his small brown dog along the street.",
            "eats the curtains.",
            "sings opera.",
        ],
        0,
    ),
    # Longer than the test model's 64 positions with any ending: rows keep their last 64 tokens.
    (
        "It was a cold morning in the small mountain village, and the baker had been awake since four "
        "o'clock, kneading dough, heating the old stone oven, and arranging loaves on the wooden shelves "
        "by the window while the first customers gathered outside the shop in the snow. When the door "
        "finally opened, the baker",
        [
            "greeted them with a warm smile and fresh bread.",
            "flew to the moon.",
            "closed the shop, locked the door and went back to bed without selling a single loaf all day.",
            "laughed.",
        ],
        0,
    ),
]


@pytest.fixture(scope="module")
def examples():
    return [{"ctx": ctx, "endings": endings, "label": label} for ctx, endings, label in EXAMPLES]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("hellaswag") / "val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def hf_model(hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()


@pytest.fixture(scope="module")
def reference(hf_model, examples):
    return reference_scores(hf_model, examples)


def reference_scores(hf_model, examples):
    """Per example: the four summed and mean losses, one forward of ctx + ending at a time."""
    enc = get_tokenizer()
    block_size = hf_model.config.n_positions
    out = []
    for example in examples:
        ctx = enc.encode_ordinary(example["ctx"])
        sums, means = [], []
        for ending in example["endings"]:
            end = enc.encode_ordinary(" " + ending)
            row = (ctx + end)[-block_size:]  # too long: drop the start of the context
            with torch.no_grad():
                logprobs = hf_model(torch.tensor([row])).logits[0].float().log_softmax(-1)
            first = len(row) - len(end)  # where the ending starts in row (negative: its start is cut off too)
            scored = [-logprobs[p - 1, row[p]].item() for p in range(max(first, 1), len(row))]
            sums.append(sum(scored))
            means.append(sum(scored) / len(scored))
        out.append(
            {
                "sums": sums,
                "means": means,
                "label": example["label"],
                "pred": sums.index(min(sums)),
                "pred_norm": means.index(min(means)),
            }
        )
    return out


def assert_matches_reference(result, reference, indices=None):
    indices = range(len(reference)) if indices is None else indices
    predictions = result["predictions"]
    assert [p["index"] for p in predictions] == list(indices)  # in the examples' order
    for p, i in zip(predictions, indices):
        ref = reference[i]
        assert (p["label"], p["pred"], p["pred_norm"]) == (ref["label"], ref["pred"], ref["pred_norm"]), i
        torch.testing.assert_close(torch.tensor(p["losses"]), torch.tensor(ref["means"]), atol=1e-4, rtol=0)
    assert result["total"] == len(indices)
    assert result["correct"] == sum(reference[i]["pred"] == reference[i]["label"] for i in indices)
    assert result["correct_norm"] == sum(reference[i]["pred_norm"] == reference[i]["label"] for i in indices)


def test_test_data_separates_acc_from_acc_norm(reference, hf_model, examples):
    # Otherwise a swap of the two metrics would go unnoticed; and the long example must be longer
    # than the model's context, so truncation is really tested.
    assert any(r["pred"] != r["pred_norm"] for r in reference)
    enc = get_tokenizer()
    assert len(enc.encode_ordinary(examples[-1]["ctx"])) > hf_model.config.n_positions


def test_our_gpt_matches_reference(hf_gpt2_dir, examples, reference):
    model = GPT.from_pretrained(hf_gpt2_dir).train()
    result = hellaswag.evaluate(model, examples, "cpu", batch_size=4)
    assert_matches_reference(result, reference)
    assert model.training  # the caller's mode is restored


def test_transformers_model_matches_reference(hf_model, examples, reference):
    assert_matches_reference(hellaswag.evaluate(hf_model, examples, "cpu", batch_size=5), reference)
    assert not hf_model.training  # the caller's mode is restored: eval stays eval


def test_an_ending_longer_than_the_model_loses_only_its_first_token(hf_model):
    # 66 tokens: the row is the ending's last 64, its context gone; the row's first token has no prediction.
    ending = (
        "recites, word for word and without a single pause, the whole of a very long poem about the sea, the "
        "ships that sail across it, the storms that toss them, the sailors who dream of home, the harbours "
        "that wait for them, and the lighthouses that guide them safely back to shore at night."
    )
    example = {"ctx": "A cat sits by the window. It", "endings": [ending, "naps.", "purrs.", "eats."], "label": 1}
    assert len(get_tokenizer().encode_ordinary(" " + ending)) > hf_model.config.n_positions
    result = hellaswag.evaluate(hf_model, [example], "cpu", batch_size=2)
    assert_matches_reference(result, reference_scores(hf_model, [example]))


def test_batch_size_and_rank_split_change_nothing(hf_gpt2_dir, examples, reference):
    model = GPT.from_pretrained(hf_gpt2_dir)
    for batch_size in (1, 3, 7):
        assert_matches_reference(hellaswag.evaluate(model, examples, "cpu", batch_size=batch_size), reference)
    # Three ranks each score examples[rank::3]; together they are the whole set.
    for rank in range(3):
        result = hellaswag.evaluate(model, examples, "cpu", batch_size=2, rank=rank, world_size=3)
        assert_matches_reference(result, reference, indices=range(rank, len(examples), 3))


def test_batches_hold_examples_of_one_length_and_keep_their_row_count(hf_gpt2_dir, examples):
    # Longest first, each batch padded to its own longest row rounded up to 32 (capped by the
    # model's 64 positions); a short last batch is filled with dummy rows, so the row count stays.
    model = GPT.from_pretrained(hf_gpt2_dir)
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    enc = get_tokenizer()
    longest = [max(len(enc.encode_ordinary(e["ctx"] + " " + ending)) for ending in e["endings"]) for e in examples]
    for batch_size, rank, world_size in ((3, 1, 2), (5, 0, 1)):  # the second: the long example, then short ones
        shapes.clear()
        hellaswag.evaluate(model, examples, "cpu", batch_size=batch_size, rank=rank, world_size=world_size)
        mine = sorted(longest[rank::world_size], reverse=True)
        expected = [
            (4 * batch_size, min(-(-max(mine[start : start + batch_size]) // 32) * 32, 64))
            for start in range(0, len(mine), batch_size)
        ]
        assert shapes == expected
    assert shapes == [(20, 64), (20, 32), (20, 32)]  # the long example's batch is the first


def test_padded_vocabulary_scores_like_gpt2s(hf_gpt2_dir, examples, reference):
    # The 47 padding rows start at the mean embedding, so their logits are ordinary: counting
    # them in the softmax would change every loss.
    model = GPT.from_pretrained(hf_gpt2_dir, vocab_size=50304)
    assert_matches_reference(hellaswag.evaluate(model, examples, "cpu", batch_size=4), reference)


def test_compiled_model_matches_reference(hf_gpt2_dir, examples, reference):
    model = torch.compile(GPT.from_pretrained(hf_gpt2_dir))
    assert_matches_reference(hellaswag.evaluate(model, examples, "cpu", batch_size=7), reference)


def test_load_examples_reads_what_was_written(data_file, examples, tmp_path):
    assert hellaswag.load_examples(data_file) == examples
    with_extras = tmp_path / "extras.jsonl"  # the real file's other keys are ignored; blank lines too
    record = {"ind": 24, "activity_label": "Roof shingle removal", **examples[0], "split": "val"}
    last = {**examples[1], "label": 3}  # each of the four endings can be the right one
    with_extras.write_text(json.dumps(record) + "\n\n" + json.dumps(last) + "\n", encoding="utf-8")
    assert hellaswag.load_examples(str(with_extras)) == [examples[0], last]


NOT_AN_EXAMPLE = "not a HellaSwag example (ctx: a non-empty string, endings: 4 strings, label: 0-3)"


@pytest.mark.parametrize(
    "record",
    [
        {"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0},
        {"ctx": "A man", "endings": ["a", "b", "c", "d", "e"], "label": 0},
        {"ctx": "A man", "endings": ["a", "b", "c", 4], "label": 0},
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": True},
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": -1},
        ["A man", ["a", "b", "c", "d"], 0],
    ],
)
def test_load_examples_refuses_a_bad_record_naming_its_line(record, examples, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(examples[0]) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        hellaswag.load_examples(str(path))
    assert str(error.value).startswith(f"{path} line 2: {NOT_AN_EXAMPLE}")


def test_load_examples_refuses_an_empty_or_undecodable_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.jsonl holds no examples"):
        hellaswag.load_examples(str(tmp_path / "empty.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"ctx": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="cannot read .*latin1.jsonl"):
        hellaswag.load_examples(str(tmp_path / "latin1.jsonl"))


def pins(path):
    """download()'s size and sha256 arguments for a local file: the tests' stand-in for the real pins."""
    data = open(path, "rb").read()
    return dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_download_copies_the_file_once_and_atomically(data_file, tmp_path):
    # A file:// URL goes through the same urllib code as the real https download.
    cache = tmp_path / "cache"
    path = hellaswag.download(f"file://{data_file}", str(cache), **pins(data_file))
    assert path == str(cache / hellaswag.DATA_FILE)
    with open(path, "rb") as a, open(data_file, "rb") as b:
        assert a.read() == b.read()
    assert os.listdir(cache) == [hellaswag.DATA_FILE]
    # Cached: a second call does not fetch again, even from a URL that would fail.
    assert hellaswag.download(f"file://{tmp_path}/missing.jsonl", str(cache), **pins(data_file)) == path

    with pytest.raises(UserError, match="nothing was kept") as error:
        hellaswag.download(f"file://{tmp_path}/missing.jsonl", str(tmp_path / "other"), tries=2, wait=0)
    assert "missing.jsonl" in str(error.value) and "--" not in str(error.value)  # each caller names its own flag
    assert os.listdir(tmp_path / "other") == []  # no partial file left behind


def test_download_caches_in_hellaswag_cache_when_no_directory_is_given(data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path / "from-env"))
    path = hellaswag.download(f"file://{data_file}", **pins(data_file))
    assert path == str(tmp_path / "from-env" / hellaswag.DATA_FILE)
    assert open(path, "rb").read() == open(data_file, "rb").read()


def test_download_retries_with_a_growing_wait(data_file, tmp_path, capsys, monkeypatch, flaky_server):
    body = open(data_file, "rb").read()
    waits = []
    monkeypatch.setattr(hellaswag.time, "sleep", waits.append)  # the waits it makes, not the clock's
    with flaky_server(body, failures=2) as server:
        path = hellaswag.download(server.url, str(tmp_path), **pins(data_file), tries=4, wait=0.01)
    assert open(path, "rb").read() == body and server.requests == 3 and waits == [0.01, 0.02]
    retries = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert len(retries) == 2 and all("503" in line for line in retries)
    assert "try 2 of 4 in 0.01 s" in retries[0] and "try 3 of 4 in 0.02 s" in retries[1]


@pytest.mark.parametrize("damage", ["one byte changed", "cut short"])
def test_a_download_that_fails_its_check_is_never_kept(damage, data_file, tmp_path, flaky_server):
    body = open(data_file, "rb").read()
    bad = body[:100] + bytes([body[100] ^ 1]) + body[101:] if damage == "one byte changed" else body[:-10]
    with flaky_server(bad) as server, pytest.raises(UserError) as error:
        hellaswag.download(server.url, str(tmp_path / "cache"), **pins(data_file), tries=3, wait=0)
    assert server.requests == 3  # each try fetched it again
    message = str(error.value)
    assert ("sha256" if damage == "one byte changed" else f"has {len(bad):,} bytes") in message
    assert "nothing was kept" in message
    assert os.listdir(tmp_path / "cache") == []


def test_a_cached_file_that_fails_its_check_is_fetched_again(data_file, tmp_path, capsys, flaky_server):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hellaswag.DATA_FILE).write_bytes(b"{}\n")  # say, from before the file was pinned
    with flaky_server(b"", failures=1) as server, pytest.raises(UserError, match="nothing was kept"):
        hellaswag.download(server.url, str(cache), **pins(data_file), tries=1)
    assert os.listdir(cache) == []  # the bad file is gone, even when the new download fails
    assert f"{cache / hellaswag.DATA_FILE} fails its check: downloading it again" in capsys.readouterr().err
    (cache / hellaswag.DATA_FILE).write_bytes(b"{}\n")
    with flaky_server(open(data_file, "rb").read()) as server:
        path = hellaswag.download(server.url, str(cache), **pins(data_file), wait=0)
    assert server.requests == 1 and open(path, "rb").read() == open(data_file, "rb").read()


# The validation file as Hugging Face's `hellaswag` dataset pinned it (dataset_infos.json, download_checksums).
PINNED_BYTES, PINNED_SHA256 = 12_246_618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


def sha256_pinning(body):
    """hashlib.sha256 as hellaswag.py calls it, except that `body` hashes to the pinned digest: the stand-in
    for the real file, which is not here offline."""
    sha256 = hashlib.sha256

    class Digest:
        def __init__(self, data):
            self.data = data

        def hexdigest(self):
            return PINNED_SHA256 if self.data == body else sha256(self.data).hexdigest()

    return Digest


def test_a_plain_download_is_checked_against_the_pinned_size_and_sha256(tmp_path, monkeypatch, flaky_server):
    # download()'s own defaults, not the tests' pins: the file's size and sha256 as literals.
    assert (hellaswag.DATA_BYTES, hellaswag.DATA_SHA256) == (PINNED_BYTES, PINNED_SHA256)
    body = bytes(range(256)) * (PINNED_BYTES // 256) + b"x" * (PINNED_BYTES % 256)  # the pinned size
    for bad, problem in (
        (body[:-1], "has 12,246,617 bytes, not the pinned 12,246,618"),
        (body + b"\n", "has 12,246,619 bytes, not the pinned 12,246,618"),
        (body, "sha256 is " + hashlib.sha256(body).hexdigest()[:16] + "..., not the pinned " + PINNED_SHA256[:16]),
    ):
        with flaky_server(bad) as server, pytest.raises(UserError, match="nothing was kept") as error:
            hellaswag.download(server.url, str(tmp_path / "cache"), tries=1)
        assert problem in str(error.value)
        assert os.listdir(tmp_path / "cache") == []
    # The right size and the pinned digest: kept, and then read from the cache. One changed byte is refused.
    monkeypatch.setattr(hellaswag.hashlib, "sha256", sha256_pinning(body))
    with flaky_server(body) as server:
        path = hellaswag.download(server.url, str(tmp_path / "cache"), tries=1)
        assert hellaswag.download(server.url, str(tmp_path / "cache"), tries=1) == path and server.requests == 1
    assert open(path, "rb").read() == body
    changed = body[:1000] + bytes([body[1000] ^ 1]) + body[1001:]
    with flaky_server(changed) as server, pytest.raises(UserError, match="sha256 is"):
        hellaswag.download(server.url, str(tmp_path / "other"), tries=1)


# -----------------------------------------------------------------------------
# The command line


def read_predictions(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_checkpoint_and_its_hf_export_score_identically(hf_gpt2_dir, data_file, reference, tmp_path, run_main):
    # A train_gpt2.py-style checkpoint with a padded vocabulary, and its export to HF format.
    model = GPT.from_pretrained(hf_gpt2_dir, vocab_size=50304)
    checkpoint = tmp_path / "step_00000010.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "step": 10}, checkpoint)
    export = tmp_path / "export"
    save_folder(to_hf(model), str(export))

    outputs = {}
    for name, path in (("checkpoint", checkpoint), ("export", export)):
        predictions = tmp_path / f"{name}.jsonl"
        code, out, err = run_main(
            hellaswag.main,
            "-m",
            str(path),
            "--data",
            data_file,
            "--device",
            "cpu",
            "--batch-size",
            "3",
            "--limit",
            "10",
            "--predictions",
            str(predictions),
        )
        assert code is None, err  # main returned: exit code 0
        outputs[name] = (out.strip().splitlines()[-1], read_predictions(predictions))

    line, predictions = outputs["checkpoint"]
    assert outputs["export"][0] == line
    ref = reference[:10]
    acc = sum(r["pred"] == r["label"] for r in ref) / 10
    acc_norm = sum(r["pred_norm"] == r["label"] for r in ref) / 10
    assert line == f"acc: {acc:.4f} acc_norm: {acc_norm:.4f} n: 10"
    for ours, theirs, r in zip(predictions, outputs["export"][1], ref, strict=True):
        assert set(ours) == {"index", "label", "pred", "pred_norm", "losses"}
        assert (ours["pred"], ours["pred_norm"]) == (theirs["pred"], theirs["pred_norm"]) == (r["pred"], r["pred_norm"])
        torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), atol=1e-5, rtol=0)
    assert [p["index"] for p in predictions] == list(range(10))


def bad_lines(examples):
    good = json.dumps(examples[0])
    return {
        "not JSON": ('{"ctx": "A man is sitting', "line 3: not valid JSON"),
        "missing key": (json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"]}), f"line 3: {NOT_AN_EXAMPLE}"),
        "three endings": (
            json.dumps({**examples[0], "endings": ["a", "b", "c"]}),
            f"line 3: {NOT_AN_EXAMPLE}",
        ),
        "label out of range": (json.dumps({**examples[0], "label": 4}), f"line 3: {NOT_AN_EXAMPLE}"),
    }, good


@pytest.mark.parametrize("case", ["not JSON", "missing key", "three endings", "label out of range"])
def test_malformed_line_stops_with_its_line_number(case, examples, hf_gpt2_dir, tmp_path, run_main):
    cases, good = bad_lines(examples)
    bad, message = cases[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{good}\n{bad}\n{good}\n", encoding="utf-8")
    predictions = tmp_path / "predictions.jsonl"
    code, _, err = run_main(
        hellaswag.main, "-m", hf_gpt2_dir, "--data", data, "--device", "cpu", "--predictions", predictions
    )
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{data} {message}" in err
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # no predictions, not even a temp file


def test_usage_errors_are_listed_together(tmp_path, run_main):
    predictions = tmp_path / "predictions.jsonl"
    code, _, err = run_main(
        hellaswag.main,
        "-m",
        str(tmp_path / "nothing.pt"),
        "--data",
        str(tmp_path / "missing.jsonl"),
        "--batch-size",
        "0",
        "--predictions",
        str(predictions),
    )
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for flag in ("--model", "--data", "batch_size=0"):
        assert flag in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--limit", "0"], "limit=0 must be positive"),
        (["--batch-size", "-3"], "batch_size=-3 must be positive"),
        (["--data", "."], "--data . is not a file"),
        (["-m", "no-such-checkpoint.pt"], "--model no-such-checkpoint.pt does not exist"),
        (["-m", "./no-such-folder"], "--model ./no-such-folder does not exist"),
    ],
)
def test_each_usage_error_is_refused_before_anything_loads(flags, message, data_file, run_main):
    code, out, err = run_main(hellaswag.main, "-m", "gpt2", "--data", data_file, "--device", "cpu", *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_a_disk_error_while_writing_the_predictions_is_one_line_exit_1(
    hf_gpt2_dir, data_file, tmp_path, run_main, monkeypatch
):
    def full_disk(path, write):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(hellaswag, "atomic_write", full_disk)
    code, _, err = run_main(
        hellaswag.main,
        "-m",
        hf_gpt2_dir,
        "--data",
        data_file,
        "--device",
        "cpu",
        "--limit",
        "2",
        "--predictions",
        tmp_path / "predictions.jsonl",
    )
    last = err.splitlines()[-1]  # after the progress bars
    assert code == 1 and last.startswith("hellaswag.py: error: ") and "No space left on device" in last, err
    assert "Traceback" not in err and not (tmp_path / "predictions.jsonl").exists()


def test_predictions_path_is_checked_before_the_evaluation(data_file, hf_gpt2_dir, tmp_path, run_main):
    (tmp_path / "a_file").write_text("not a directory")
    for predictions, phrase in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "p.jsonl", "you can write in")):
        code, out, err = run_main(
            hellaswag.main, "-m", hf_gpt2_dir, "--data", data_file, "--device", "cpu", "--predictions", predictions
        )
        assert code == 2 and out == ""  # refused before the model was even loaded
        assert err.count("\n") == 1 and "--predictions" in err and phrase in err, err


def test_a_file_that_is_not_a_checkpoint_is_one_line(data_file, tmp_path, run_main):
    fake = tmp_path / "fake.pt"
    fake.write_text("these are notes, not weights")
    code, _, err = run_main(hellaswag.main, "-m", fake, "--data", data_file, "--device", "cpu")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot load model {fake}" in err and "is not a readable checkpoint" in err
    assert "weights_only" not in err


def test_unloadable_model_is_one_line(data_file, tmp_path, run_main):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    predictions = tmp_path / "predictions.jsonl"
    code, _, err = run_main(
        hellaswag.main, "-m", not_a_model, "--data", data_file, "--device", "cpu", "--predictions", predictions
    )
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"hellaswag.py: error: cannot load model {not_a_model}")
    assert "Traceback" not in err
    assert not predictions.exists()


def checkpoint_of(hf_gpt2_dir, path):
    """hf_gpt2_dir's GPT-2 as a train_gpt2.py-style checkpoint at path: the torchrun tests' model, which their ranks
    load without importing transformers (seconds of CPU in every process)."""
    model = GPT.from_pretrained(hf_gpt2_dir)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "step": 10}, path)
    return str(path)


@pytest.mark.multiprocess
def test_torchrun_splits_examples_and_reduces(hf_gpt2_dir, data_file, reference, tmp_path):
    # The ranks score hf_gpt2_dir's weights from a checkpoint of them (as test_checkpoint_and_its_hf_export_...
    # shows, a checkpoint and the Hugging Face folder score identically).
    model = checkpoint_of(hf_gpt2_dir, tmp_path / "step_00000010.pt")
    predictions = tmp_path / "predictions.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            SCRIPT,
            "-m",
            model,
            "--data",
            data_file,
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--predictions",
            str(predictions),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "over 2 process(es)" in proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2  # rank 0 prints; rank 1 stays quiet
    n = len(reference)
    acc = sum(r["pred"] == r["label"] for r in reference) / n
    acc_norm = sum(r["pred_norm"] == r["label"] for r in reference) / n
    assert lines[-1] == f"acc: {acc:.4f} acc_norm: {acc_norm:.4f} n: {n}"
    written = read_predictions(predictions)
    assert [p["index"] for p in written] == list(range(n))
    assert [(p["pred"], p["pred_norm"]) for p in written] == [(r["pred"], r["pred_norm"]) for r in reference]


@pytest.mark.multiprocess
def test_under_torchrun_a_file_missing_on_rank_1_ends_both_ranks_with_its_message(hf_gpt2_dir, data_file, tmp_path):
    # As when one node lacks the file: rank 1 is handed a path that does not exist, rank 0 the real one.
    missing, model = str(tmp_path / "not-on-this-node.jsonl"), checkpoint_of(hf_gpt2_dir, tmp_path / "model.pt")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport hellaswag\n"
        f"data = {missing!r} if os.environ['RANK'] == '1' else {data_file!r}\n"
        f"hellaswag.main(['-m', {model!r}, '--device', 'cpu', '--data', data])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hellaswag.py: error: ")]
    assert len(errors) == 1 and errors[0].startswith("hellaswag.py: error: rank 1: ") and missing in errors[0], (
        proc.stderr[-3000:]
    )


def test_each_example_is_tokenized_once_a_process_whatever_the_evaluations(
    hf_gpt2_dir, examples, reference, monkeypatch
):
    # train_gpt2.py scores HellaSwag every 250 steps: the examples' tokens are computed at the first evaluation
    # only (tiktoken's encode counted here), and later evaluations score the same
    calls = []
    encode = get_tokenizer().encode_ordinary
    monkeypatch.setattr(get_tokenizer(), "encode_ordinary", lambda text: calls.append(text) or encode(text))
    hellaswag.tokenize.cache_clear()
    model = GPT.from_pretrained(hf_gpt2_dir).eval()
    first = hellaswag.evaluate(model, examples, "cpu", batch_size=2)
    assert len(calls) == 5 * len({(e["ctx"], tuple(e["endings"])) for e in examples})  # context + 4 endings
    second = hellaswag.evaluate(model, examples, "cpu", batch_size=3, rank=0, world_size=1)
    assert len(calls) == 5 * len({(e["ctx"], tuple(e["endings"])) for e in examples})
    assert_matches_reference(first, reference)
    assert_matches_reference(second, reference)
