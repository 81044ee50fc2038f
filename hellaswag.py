"""HellaSwag: how our GPT-2 compares with OpenAI's GPT-2 and GPT-3 on common-sense sentence endings.

    python hellaswag.py -m gpt2                        # OpenAI's 124M from the Hugging Face hub
    python hellaswag.py -m log/checkpoints/step_00019073.pt --predictions preds.jsonl
    python hellaswag.py -m ./my-gpt2 --data hellaswag_val.jsonl --limit 500   # offline
    torchrun --standalone --nproc_per_node 8 hellaswag.py -m gpt2-xl         # examples over 8 GPUs

    from hellaswag import load_examples, evaluate      # what train_gpt2.py does every eval interval
    result = evaluate(model, load_examples(path), "cuda", rank=rank, world_size=world_size,
                      autocast_dtype=torch.bfloat16)  # counts over this rank's share; all-reduce them

Each HellaSwag example is a context ("A man is sitting on a roof. he") and four endings, one of
them right. The data is the validation set of the original repo, 10,042 examples, downloaded
once into $HELLASWAG_CACHE (default ~/.cache/gpt2-repro/hellaswag); `--data FILE` reads a local
copy instead. A line needs "ctx" (text), "endings" (4 texts) and "label" (0-3); other keys are
ignored.

Scoring is completion style, the way a base model like GPT-2 is scored: each ending follows the
context as plain text (tokens of ctx, then tokens of " " + ending), and the model's cross-entropy
is taken over the ending tokens only.
  - acc      picks the ending with the lowest summed loss (the most likely continuation),
  - acc_norm picks the ending with the lowest mean loss per ending token (length-normalised),
and the last line printed is `acc: X acc_norm: Y n: N`. The reference values on the full
validation set, completion style as here:
    OpenAI GPT-2 124M   acc 0.2859  acc_norm 0.2955
    OpenAI GPT-2 1.5B   acc 0.3842  acc_norm 0.4893   (gpt2-xl)
    GPT-3 small 125M             acc_norm 0.337     (GPT-3 paper, zero-shot; not released)
EleutherAI's lm-evaluation-harness reports higher acc_norm for the same models (GPT-2 124M:
acc 0.2892, acc_norm 0.3114) because its `hellaswag` task is scored differently: it rewrites the
text first (activity label prefix, capitalised ctx_b, "[title]"-style markup removed) and its
acc_norm divides the summed log-likelihood by the ending's length in characters, not tokens.
Compare numbers from this file with each other and with the completion-style column above.

Speed: many examples go through the model per forward pass, longest first, so the examples of a
batch have about one length. Every row (context + ending) of a batch is right-padded to the
batch's longest row rounded up to a multiple of 32, and the last batch is filled up with dummy
rows: few shapes (a torch.compile'd model compiles a dynamic-length graph once they differ) and
little padding. A row longer than the model's block size keeps its last block_size tokens (the
start of the context is dropped). On GPU the forward runs under bf16 autocast (fp16 before
Ampere). Only the positions that predict an ending token go through the lm_head (our GPT's logit_positions; a
transformers model computes every position's logits and we pick). That is less time (the
lm_head is a 50304-wide matmul) and much less memory: with the default 16 examples (64 rows),
T = 192 and, say, 20 ending tokens per row, the logits are 64 * 20 * 50304 * 2 bytes = 0.13 GB in
bf16 instead of 1.2 GB.
Under torchrun each rank scores examples[rank::world_size] and the counts are summed.

A model whose vocabulary is padded (50304 rows for speed) is scored over GPT-2's 50,257 real
tokens only, so a checkpoint and its Hugging Face export (which drops the padding) agree.
"""

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import atomic_write, autocast_dtype_for
from model import GPT, GPT2_VOCAB_SIZE  # scored over GPT-2's real tokens only; more rows are padding
from tokenizer import get_tokenizer

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DATA_FILE = "hellaswag_val.jsonl"
# The file as Hugging Face's `hellaswag` dataset script pinned it (its dataset_infos.json, download_checksums).
DATA_BYTES, DATA_SHA256 = 12_246_618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
PAD_MULTIPLE = 32  # a batch's row length is a multiple of this (friendlier kernels, few shapes)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class HellaSwagConfig:
    model: str = "gpt2"  # HF hub name, local HF directory, or train_gpt2.py checkpoint (.pt)
    data: str | None = None  # local HellaSwag jsonl; None downloads the validation set once
    device: str = "auto"  # auto picks cuda > mps > cpu
    batch_size: int = 16  # examples per forward pass (4 rows each)
    limit: int | None = None  # score only the first N examples
    predictions: str | None = None  # write one JSON line per example here

    def problems(self):
        """Every value that cannot work, as readable strings (empty when the config is fine)."""
        found = []
        if self.batch_size < 1:
            found.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.limit is not None and self.limit < 1:
            found.append(f"--limit {self.limit} must be at least 1")
        if self.data is not None and not os.path.isfile(self.data):
            found.append(f"--data {self.data} is not a file; give the path of a HellaSwag .jsonl "
                         f"or leave --data out to download the validation set")
        if not os.path.exists(self.model) and (self.model.endswith(".pt") or self.model.startswith((".", "/", "~"))):
            found.append(f"--model {self.model} does not exist; give a train_gpt2.py checkpoint (.pt), "
                         f"a Hugging Face directory, or a hub name such as gpt2")
        if self.predictions is not None:
            directory = os.path.dirname(os.path.abspath(self.predictions))
            if os.path.isdir(self.predictions):
                found.append(f"--predictions {self.predictions} is a directory; give the path of a file to write")
            elif not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                found.append(f"--predictions {self.predictions}: {directory} is not a directory you can write in")
        device_type = self.device.split(":")[0]
        if device_type not in ("auto", "cpu", "cuda", "mps"):
            found.append(f"--device {self.device} is not one of auto, cpu, cuda, cuda:N, mps")
        elif device_type == "cuda" and not torch.cuda.is_available():
            found.append(f"--device {self.device} but this torch sees no CUDA GPU; use --device cpu")
        elif device_type == "mps" and not torch.backends.mps.is_available():
            found.append(f"--device {self.device} but MPS is not available here; use --device cpu")
        return found


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Score a GPT-2 on HellaSwag (completion style).")
    parser.add_argument("-m", "--model", default=HellaSwagConfig.model,
                        help="Hugging Face name (gpt2, gpt2-medium, ...), local HF directory, "
                             "or a train_gpt2.py checkpoint .pt (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="local HellaSwag .jsonl; default: download the validation set into "
                             "$HELLASWAG_CACHE or ~/.cache/gpt2-repro/hellaswag")
    parser.add_argument("--device", default=HellaSwagConfig.device,
                        help="cpu, cuda, cuda:N, mps, or auto for cuda > mps > cpu (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=HellaSwagConfig.batch_size,
                        help="examples per forward pass, 4 rows each (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--predictions", default=None,
                        help="write one JSON line per example: index, label, pred, pred_norm, losses")
    config = HellaSwagConfig(**vars(parser.parse_args(argv)))
    problems = config.problems()
    if problems:
        parser.exit(2, f"{parser.prog}: error: {'; '.join(problems)}\n")
    return config


# -----------------------------------------------------------------------------
# The data


class DataError(Exception):
    """A HellaSwag file that cannot be read or downloaded; the message says where and how to fix it."""


def cache_dir():
    default = os.path.join(os.path.expanduser("~"), ".cache", "gpt2-repro", "hellaswag")
    return os.environ.get("HELLASWAG_CACHE") or default


def download(url=DATA_URL, directory=None, size=DATA_BYTES, sha256=DATA_SHA256, tries=4, wait=2.0):
    """The validation set in the cache directory, fetched from url the first time; returns its path.

    The file must have `size` bytes and the `sha256` pinned above (None skips a check), in the cache
    as when it arrives: a file that fails is removed and fetched again. A failed try (no connection,
    an HTTP error, a file that fails the check) is retried after `wait` seconds, doubling, `tries`
    times in all; a file that fails never gets the cache name (common.atomic_write).
    """
    path = os.path.join(directory or cache_dir(), DATA_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            if not _failed_check(f.read(), size, sha256):
                return path
        print(f"{path} fails its check: downloading it again", file=sys.stderr)
        os.remove(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in range(1, tries + 1):
        try:
            atomic_write(path, lambda f: _fetch(url, f, size, sha256))
            return path
        except (OSError, http.client.HTTPException, DataError) as e:  # URLError and timeouts are OSErrors too
            if attempt == tries:
                raise DataError(f"could not download HellaSwag from {url} in {tries} tries ({e}); nothing was kept in "
                                f"{os.path.dirname(path)}; pass --data FILE with a local copy of {DATA_FILE}") from None
            print(f"download of {DATA_FILE} failed ({e}); try {attempt + 1} of {tries} in {wait:g} s",
                  file=sys.stderr)
            time.sleep(wait)
            wait *= 2


def _fetch(url, f, size, sha256):
    with urllib.request.urlopen(url, timeout=60) as response, \
            tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {DATA_FILE}") as bar:
        data = bytearray()
        while chunk := response.read(1 << 20):
            data += chunk
            bar.update(len(chunk))
    if problem := _failed_check(data, size, sha256):
        raise DataError(problem)
    f.write(data)


def _failed_check(data, size, sha256):
    """What is wrong with the file's bytes, or None when they are the pinned ones."""
    digest = hashlib.sha256(data).hexdigest()
    if size is not None and len(data) != size:
        return f"the file has {len(data):,} bytes, not the pinned {size:,}"
    if sha256 is not None and digest != sha256:
        return f"the file's sha256 is {digest[:16]}..., not the pinned {sha256[:16]}..."
    return None


def load_examples(path):
    """The examples of a HellaSwag .jsonl file as dicts with "ctx", "endings" (4) and "label".

    Every line is checked; the first bad one raises DataError naming the file and line number.
    """
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():  # tolerate blank lines, e.g. a trailing one
                    examples.append(_parse_line(line, f"{path} line {number}"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _parse_line(line, where):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with ctx, endings and label")
    missing = [key for key in ("ctx", "endings", "label") if key not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx:
        raise DataError(f"{where}: ctx must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        count = f"{len(endings)} items" if isinstance(endings, list) else type(endings).__name__
        raise DataError(f"{where}: endings must be a list of 4 strings, got {count}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise DataError(f"{where}: label must be an integer 0-3, got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


# -----------------------------------------------------------------------------
# Scoring


def tokenize(example, enc):
    """(context tokens, [tokens of each ending]); an ending is a continuation, so it gets a leading space."""
    return enc.encode_ordinary(example["ctx"]), [enc.encode_ordinary(" " + e) for e in example["endings"]]


def build_batch(rendered, batch_size, seq_len):
    """Rows ctx + ending for up to batch_size examples, and the positions to score.

    Returns tokens (4 * batch_size, seq_len) int64, right-padded, and three (n,) tensors, one
    entry per ending token that is scored: positions, the index of the position that predicts it
    in the flattened tokens (row r, position t is r * seq_len + t); targets, the token; rows, r.
    Rows longer than seq_len keep their last seq_len tokens. Missing examples (the last batch)
    are dummy rows with nothing scored, so the row count never changes.
    """
    tokens = torch.zeros(4 * batch_size, seq_len, dtype=torch.long)  # padding: token 0, never scored
    positions, rows = [], []
    for i, (ctx, endings) in enumerate(rendered):
        for j, ending in enumerate(endings):
            r = 4 * i + j
            row = (ctx + ending)[-seq_len:]
            tokens[r, :len(row)] = torch.tensor(row)
            # Position t predicts token t + 1. A row's first token has no prediction, so an ending
            # that starts the row (its context cut off entirely) loses its first token.
            first = max(len(row) - len(ending), 1)
            positions.extend(range(r * seq_len + first - 1, r * seq_len + len(row) - 1))
            rows.extend([r] * (len(row) - first))
    positions = torch.tensor(positions, dtype=torch.long)
    return tokens, positions, tokens.view(-1)[positions + 1], torch.tensor(rows, dtype=torch.long)


def ending_logits(model, tokens, positions):
    """Logits (n, vocab) at the scored positions only. Our GPT computes just those (a fraction of
    the (rows, T, vocab) logits: less memory and time); a transformers GPT-2 computes all of them
    and we pick."""
    if isinstance(_unwrapped(model), GPT):
        return model(tokens, logit_positions=positions)[0]
    return model(tokens).logits.flatten(0, 1)[positions]


def ending_losses(logits, targets, rows, n_rows):
    """Summed and mean cross-entropy over each row's ending tokens: two (n_rows,) float32 tensors."""
    logits = logits[:, :GPT2_VOCAB_SIZE]  # scored over real tokens only, not the padding rows
    losses = F.cross_entropy(logits.float(), targets, reduction="none")  # (n,)
    sums = torch.zeros(n_rows, device=losses.device).index_add_(0, rows, losses)
    means = sums / torch.bincount(rows, minlength=n_rows).clamp(min=1)
    return sums, means


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def _unwrapped(model):
    """The model inside a DistributedDataParallel wrapper (.module) and torch.compile's (._orig_mod)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _block_size(model):
    """The longest sequence the model takes: our GPTConfig.block_size or HF's n_positions."""
    config = _unwrapped(model).config
    return getattr(config, "block_size", None) or config.n_positions


def evaluate(model, examples, device, batch_size=16, rank=0, world_size=1, autocast_dtype=None,
             progress=False):
    """Score examples[rank::world_size]; returns counts for this rank's share and its predictions.

    model: our GPT (returns (logits, loss)), a transformers GPT-2 (returns .logits), or either
    wrapped by torch.compile, already on device. Under DDP pass the module inside the wrapper:
    ranks score different numbers of batches, so no forward may wait for the others.
    Returns {"correct", "correct_norm", "total", "predictions"}, predictions a list of
    {"index", "label", "pred", "pred_norm", "losses"} per example: index into examples, losses
    the four mean losses. The caller all-reduces the counts.
    """
    enc = get_tokenizer()
    device = torch.device(device)
    block_size = _block_size(model)
    rendered = [tokenize(example, enc) for example in examples]
    longest_row = [max(len(ctx) + len(ending) for ending in endings) for ctx, endings in rendered]
    # Longest first: a batch holds examples of about one length, so little of it is padding, and
    # the first batch is the biggest one (if it fits in memory, all do).
    indices = sorted(range(rank, len(examples), world_size), key=lambda i: (-longest_row[i], i))

    result = {"correct": 0, "correct_norm": 0, "total": 0, "predictions": []}
    was_training = model.training
    model.eval()
    # no_grad, not inference_mode: inference tensors would break a compiled model that trains next.
    try:
        with torch.no_grad(), tqdm(total=len(indices), unit="ex", desc="hellaswag", disable=not progress) as bar:
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                seq_len = min(round_up(max(longest_row[i] for i in batch), PAD_MULTIPLE), block_size)
                tensors = build_batch([rendered[i] for i in batch], batch_size, seq_len)
                tokens, positions, targets, rows = (t.to(device) for t in tensors)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = ending_logits(model, tokens, positions)  # (n, vocab)
                sums, means = ending_losses(logits, targets, rows, len(tokens))
                sums = sums.view(-1, 4).tolist()  # (batch_size, 4), dummy examples at the end
                means = means.view(-1, 4).tolist()
                for k, index in enumerate(batch):
                    label = examples[index]["label"]
                    pred = min(range(4), key=sums[k].__getitem__)  # most likely ending
                    pred_norm = min(range(4), key=means[k].__getitem__)  # most likely per token
                    result["correct"] += pred == label
                    result["correct_norm"] += pred_norm == label
                    result["total"] += 1
                    result["predictions"].append({"index": index, "label": label, "pred": pred,
                                                  "pred_norm": pred_norm, "losses": means[k]})
                bar.update(len(batch))
                bar.set_postfix(acc_norm=f"{result['correct_norm'] / result['total']:.4f}")
    finally:
        model.train(was_training)
    result["predictions"].sort(key=lambda p: p["index"])
    return result


# -----------------------------------------------------------------------------
# The command line


class ModelError(Exception):
    """A model that cannot be loaded or scored; the message says which and why."""


def pick_device(requested, local_rank):
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested.startswith("cuda") and local_rank is not None:
        requested = f"cuda:{local_rank}"  # torchrun: one GPU per process, even if cuda:N was asked
    return torch.device(requested)


def load_model(name_or_path, device):
    """Our GPT from a train_gpt2.py checkpoint (.pt file) or from a HF name / directory."""
    try:
        if os.path.isfile(name_or_path):
            model = GPT.from_checkpoint(name_or_path)
        else:
            model = GPT.from_pretrained(name_or_path)
    except Exception as e:  # torch.load, safetensors and the hub each raise their own kinds
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {name_or_path}: {message}") from None
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ModelError(f"model {name_or_path} has vocab_size {model.config.vocab_size}; "
                         f"HellaSwag text needs GPT-2's {GPT2_VOCAB_SIZE} tokens")
    return model.to(device)


def write_predictions(path, predictions):
    """One JSON line per example in index order, whole or not at all (common.atomic_write)."""
    lines = "".join(json.dumps(p) + "\n" for p in sorted(predictions, key=lambda p: p["index"]))
    atomic_write(path, lambda f: f.write(lines.encode("utf-8")))


def main(argv=None):
    config = parse_args(argv)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(config.device, int(os.environ["LOCAL_RANK"]) if distributed else None)
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    try:
        examples = load_examples(config.data or download())[:config.limit]
        model = load_model(config.model, device)
        if rank == 0:
            print(f"{config.model}: {model.num_parameters():,} parameters on {device}, "
                  f"{len(examples)} examples over {world_size} process(es)")
        result = evaluate(model, examples, device, batch_size=config.batch_size, rank=rank, world_size=world_size,
                          autocast_dtype=autocast_dtype_for("auto", device), progress=rank == 0)  # as training
        predictions = result["predictions"]
        counts = torch.tensor([result["correct"], result["correct_norm"], result["total"]], device=device)
        if distributed:
            dist.all_reduce(counts)
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(predictions, gathered, dst=0)
            if rank == 0:
                predictions = [p for part in gathered for p in part]
        correct, correct_norm, total = counts.tolist()
        if rank == 0:
            if config.predictions:
                write_predictions(config.predictions, predictions)
            print(f"acc: {correct / total:.4f} acc_norm: {correct_norm / total:.4f} n: {total}")
    except (DataError, ModelError, OSError) as e:
        if rank == 0:
            print(f"hellaswag.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
