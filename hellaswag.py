"""HellaSwag: how our GPT-2 compares with OpenAI's GPT-2 and GPT-3 on common-sense sentence endings.

    python hellaswag.py -m gpt2                        # OpenAI's 124M from the Hugging Face hub
    python hellaswag.py -m log/checkpoints/step_00019073.pt --predictions preds.jsonl
    python hellaswag.py -m ./my-gpt2 --data hellaswag_val.jsonl --limit 500   # offline
    torchrun --standalone --nproc_per_node 8 hellaswag.py -m gpt2-xl         # examples over 8 GPUs
    evaluate(model, load_examples(download()), "cuda", rank=rank, world_size=world_size)  # in train_gpt2.py

An example is a context ("A man is sitting on a roof. he") and four endings, one of them right (the 10,042 of the
validation set, downloaded once into $HELLASWAG_CACHE or ~/.cache/gpt2-repro/hellaswag). Scored completion style, as
for a base model, by the loss of " " + ending after the context: acc picks the lowest sum, acc_norm the lowest mean
per token. The last line printed is `acc: X acc_norm: Y n: N`. On the full set OpenAI's GPT-2 124M scores acc 0.2859,
acc_norm 0.2955; gpt2-xl 0.3842 and 0.4893; GPT-3 small (paper, zero-shot) acc_norm 0.337. lm-evaluation-harness
rewrites the text and normalises by characters: acc 0.2892, acc_norm 0.3114 for 124M."""

import functools
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, agree, atomic_write, autocast_dtype_for, parse_settings, pick_device, print0, setting
from logdir import load_model
from model import GPT, GPT2_VOCAB_SIZE  # scored over GPT-2's real tokens only; more rows are padding
from tokenizer import get_tokenizer

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DATA_FILE = "hellaswag_val.jsonl"
# The file as Hugging Face's `hellaswag` dataset script pinned it (its dataset_infos.json, download_checksums).
DATA_BYTES, DATA_SHA256 = 12_246_618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


def evaluate(model, examples, device, batch_size=16, rank=0, world_size=1, autocast_dtype=None, progress=False):
    """Score examples[rank::world_size] -> this rank's {"correct", "correct_norm", "total", "predictions"}, a prediction
    being {"index", "label", "pred", "pred_norm", "losses" (4 means)}. model: our GPT or transformers' GPT-2, maybe
    compiled, not DDP's wrapper (ranks run unequal batch counts). Longest examples first: little padding, few shapes."""
    ours = isinstance(getattr(model, "_orig_mod", model), GPT)  # maybe compiled
    block_size = model.config.block_size if ours else model.config.n_positions
    device = torch.device(device)
    rendered = [tokenize(e["ctx"], tuple(e["endings"])) for e in examples]  # each example once a process
    longest_row = [max(len(ctx) + len(ending) for ending in endings) for ctx, endings in rendered]
    indices = sorted(range(rank, len(examples), world_size), key=lambda i: (-longest_row[i], i))
    predictions, was_training = [], model.training
    model.eval()  # and no_grad, not inference_mode: inference tensors would break a compiled model that trains next
    with torch.no_grad(), tqdm(total=len(indices), unit="ex", desc="hellaswag", disable=not progress) as bar:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            seq_len = min(-(-max(longest_row[i] for i in batch) // 32) * 32, block_size)  # friendlier kernels
            tensors = build_batch([rendered[i] for i in batch], batch_size, seq_len)
            tokens, positions, targets, rows = (t.to(device) for t in tensors)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if ours:  # (n, vocab): ours computes just these logits
                    logits = model(tokens, logit_positions=positions)[0]
                else:
                    logits = model(tokens).logits.flatten(0, 1)[positions]
            # Over GPT-2's 50,257 tokens only: a checkpoint's padded vocabulary scores like its export.
            losses = F.cross_entropy(logits[:, :GPT2_VOCAB_SIZE].float(), targets, reduction="none")  # (n,)
            sums = torch.zeros(len(tokens), device=device).index_add_(0, rows, losses).view(-1, 4)
            means = sums / torch.bincount(rows, minlength=len(tokens)).clamp(min=1).view(-1, 4)
            picks = zip(batch, sums.argmin(1).tolist(), means.argmin(1).tolist(), means.tolist())  # no dummies
            for i, pred, norm, mean in picks:
                predictions.append(dict(index=i, label=examples[i]["label"], pred=pred, pred_norm=norm, losses=mean))
            bar.update(len(batch))
    model.train(was_training)
    predictions.sort(key=lambda p: p["index"])
    correct, correct_norm = (sum(p[key] == p["label"] for p in predictions) for key in ("pred", "pred_norm"))
    return dict(correct=correct, correct_norm=correct_norm, total=len(predictions), predictions=predictions)


@functools.cache
def tokenize(ctx, endings):
    """An example's context and endings as GPT-2 tokens; an ending is a continuation: it starts with a space."""
    enc = get_tokenizer()
    return enc.encode_ordinary(ctx), [enc.encode_ordinary(" " + ending) for ending in endings]


def build_batch(rendered, batch_size, seq_len):
    """Up to batch_size examples' rows ctx + ending -> tokens (4 * batch_size, seq_len), right-padded, cut to their last
    seq_len; per scored token: positions (flat r * seq_len + t of the one predicting it), targets and rows (r)."""
    tokens = torch.zeros(4 * batch_size, seq_len, dtype=torch.long)  # padding: token 0, never scored
    positions, rows = [], []
    for i, (ctx, endings) in enumerate(rendered):
        for j, ending in enumerate(endings):
            r, row = 4 * i + j, (ctx + ending)[-seq_len:]
            tokens[r, : len(row)] = torch.tensor(row)
            # Position t predicts token t + 1. A row's first token has no prediction, so an ending
            # that starts the row (its context cut off entirely) loses its first token.
            first = max(len(row) - len(ending), 1)
            positions.extend(range(r * seq_len + first - 1, r * seq_len + len(row) - 1))
            rows.extend([r] * (len(row) - first))
    positions = torch.tensor(positions, dtype=torch.long)
    return tokens, positions, tokens.view(-1)[positions + 1], torch.tensor(rows, dtype=torch.long)


# --- The data -----------------------------------------------------------------------------------------------
def download(url=DATA_URL, directory=None, size=DATA_BYTES, sha256=DATA_SHA256, tries=4, wait=2.0):
    """The validation set's path in the cache, downloaded the first time and checked against the pinned size
    and sha256. A failed try is retried after `wait` seconds, doubling; a file that fails its check is never kept."""
    directory = directory or os.environ.get("HELLASWAG_CACHE") or os.path.expanduser("~/.cache/gpt2-repro/hellaswag")
    path = os.path.join(directory, DATA_FILE)
    if os.path.exists(path):
        if not _failed_check(Path(path).read_bytes(), size, sha256):
            return path
        print(f"{path} fails its check: downloading it again", file=sys.stderr)
        os.remove(path)
    os.makedirs(directory, exist_ok=True)
    for attempt in range(1, tries + 1):
        try:
            with (
                urllib.request.urlopen(url, timeout=60) as response,
                tqdm.wrapattr(response, "read", total=size, desc=f"downloading {DATA_FILE}") as reader,
            ):
                data = b"".join(iter(lambda: reader.read(1 << 20), b""))
            if problem := _failed_check(data, size, sha256):
                raise UserError(problem)
            atomic_write(path, lambda f: f.write(data))
            return path
        except (OSError, http.client.HTTPException, UserError) as e:  # URLError and timeouts are OSErrors too
            if attempt == tries:
                kept = f"nothing was kept in {directory}"
                raise UserError(f"could not download HellaSwag from {url} in {tries} tries ({e}); {kept}") from None
            print(f"download of {DATA_FILE} failed ({e}); try {attempt + 1} of {tries} in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
            wait *= 2


def _failed_check(data, size, sha256):
    if len(data) != size:
        return f"the file has {len(data):,} bytes, not the pinned {size:,}"
    if (digest := hashlib.sha256(data).hexdigest()) != sha256:
        return f"the file's sha256 is {digest[:16]}..., not the pinned {sha256[:16]}..."


def load_examples(path):
    """A HellaSwag .jsonl file's examples: {"ctx", "endings" (4), "label" (0-3)}; a bad line raises UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            examples = [_parse_line(line, f"{path} line {n}") for n, line in enumerate(f, start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def _parse_line(line, where):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    record = record if isinstance(record, dict) else {}
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    four_strings = isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
    if not (isinstance(ctx, str) and ctx and four_strings and type(label) is int and 0 <= label <= 3):  # not a bool
        raise UserError(f"{where}: not a HellaSwag example (ctx: a non-empty string, endings: 4 strings, label: 0-3)")
    return {"ctx": ctx, "endings": endings, "label": label}


# --- The command line ---------------------------------------------------------------------------------------
@dataclass
class HellaSwagConfig:
    model: str = setting("gpt2", "a hub name, an HF folder, a checkpoint or log dir", flags=("-m", "--model"))
    data: str = setting(None, "local HellaSwag .jsonl (default: download the validation set once)")
    device: str = setting("auto", "cpu, cuda, cuda:N, mps, or auto for cuda > mps > cpu")
    batch_size: int = setting(16, "examples per forward pass, 4 rows each", must="be positive")
    limit: int = setting(None, "score only the first N examples", must="be positive")
    predictions: str = setting(None, "write one JSON line per example: index, label, pred, pred_norm, losses")

    def problems(self):
        found = []
        if self.data is not None and not os.path.isfile(self.data):
            found.append(f"--data {self.data} is not a file; give a HellaSwag .jsonl, or leave --data out to download")
        if not os.path.exists(self.model) and (self.model.endswith(".pt") or self.model.startswith((".", "/", "~"))):
            found.append(f"--model {self.model} does not exist; give a checkpoint, a Hugging Face folder or a hub name")
        directory = os.path.dirname(os.path.abspath(self.predictions or "."))  # checked now, not after the scoring
        if self.predictions and os.path.isdir(self.predictions):
            found.append(f"--predictions {self.predictions} is a directory; give the path of a file to write")
        elif self.predictions and (not os.path.isdir(directory) or not os.access(directory, os.W_OK)):
            found.append(f"--predictions {self.predictions}: {directory} is not a directory you can write in")
        return found


def main(argv=None):
    # Under torchrun each process scores its share on its own GPU; rank 0 alone prints. The ranks agree on errors first.
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size, error = int(os.environ.get("WORLD_SIZE", 1)), None
    try:
        config = parse_settings(HellaSwagConfig, argv, "Score a GPT-2 on HellaSwag, completion style.")
        device = pick_device(config.device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if local_rank == 0 and not config.data:  # one download a machine: the others read its copy after the barrier
            try:
                download()
            except UserError as e:
                raise UserError(f"{e}; pass --data FILE with a local copy of {DATA_FILE}") from None
    except UserError as e:
        error = e
    if world_size > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()
    try:
        if error is None:
            examples = load_examples(config.data or download())[: config.limit]
            model = load_model(config.model)
    except (UserError, ValueError) as e:  # ValueError: load_model's one line
        error = UserError(str(e), getattr(e, "exit_code", 1))
    try:
        agree(error, prefix="hellaswag.py: error: ")  # an error on one rank ends them all, printed once
        where = f"on {device}, {len(examples)} examples over {world_size} process(es)"
        print0(f"{config.model}: {model.num_parameters():,} parameters {where}")
        dtype = autocast_dtype_for("auto", device)  # the dtype training scores in
        result = evaluate(model.to(device), examples, device, config.batch_size, rank, world_size, dtype, rank == 0)
        results = agree(value=result)  # every rank's share, in rank order
        correct, correct_norm, total = (sum(r[key] for r in results) for key in ("correct", "correct_norm", "total"))
        if rank == 0:
            if config.predictions:
                predictions = sorted((p for r in results for p in r["predictions"]), key=lambda p: p["index"])
                lines = "".join(json.dumps(p) + "\n" for p in predictions)
                atomic_write(config.predictions, lambda f: f.write(lines.encode("utf-8")))
            print(f"acc: {correct / total:.4f} acc_norm: {correct_norm / total:.4f} n: {total}")
    except (UserError, OSError) as e:
        if rank == 0 and not getattr(e, "reported", False):
            print(f"hellaswag.py: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
