"""Export a train_gpt2.py checkpoint as a Hugging Face model folder that transformers, vLLM and
lm-evaluation-harness load as it is.

    python export.py log my-gpt2                                # the run's latest checkpoint
    python export.py log/checkpoints/step_00019073.pt my-gpt2   # one checkpoint
    python export.py log my-gpt2 --dtype bfloat16               # weights stored in bfloat16: half the size
    python sample.py -m my-gpt2 --prompt "Hello, I'm a language model,"
    lm_eval --model hf --model_args pretrained=my-gpt2 --tasks hellaswag

The folder: config.json and model.safetensors (transformers' GPT2LMHeadModel, the padding rows of
a 50304 vocabulary dropped), generation_config.json (top-k 50 sampling up to the context length),
GPT-2's tokenizer (tokenizer.json, converted without a network from tokenizer.py's ranks) and a
model card, README.md: the model's size, the run's steps and tokens, its last val loss and
HellaSwag accuracy from <log dir>/metrics.jsonl, and how to load it. GPT.save_pretrained writes
the same folder through save_folder below, with what it knows of the training (nothing).
"""

import argparse
import json
import os
import shutil
import socket
import sys

import torch

import tokenizer
from common import UserError, fsync_directory
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig, read_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# -----------------------------------------------------------------------------
# The folder, whole or not at all


def check_new_directory(directory):
    """Raise ValueError unless `directory` is new or empty: an export never mixes with older files."""
    if os.path.exists(directory) and not (os.path.isdir(directory) and not os.listdir(directory)):
        raise ValueError(f"{directory} already exists and is not an empty directory; choose a new one or remove it")


def save_folder(hf_model, directory, training=""):
    """Write hf_model (a transformers GPT2LMHeadModel) into the new or empty `directory`, with its
    generation config, GPT-2's tokenizer and a model card whose training section is `training`.

    Everything goes into a hidden staging directory beside it, is fsync'd, and is then renamed to
    `directory` in one step: a failure or a crash never leaves a half-written folder there.
    """
    from transformers import GenerationConfig
    check_new_directory(directory)
    config, eot = hf_model.config, GPT2_VOCAB_SIZE - 1
    # Sampled like our generate() by default, and never past the positions the model learned.
    hf_model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                                                  do_sample=True, top_k=50, max_length=config.n_positions)
    parent, name = os.path.split(os.path.abspath(directory))
    staging = os.path.join(parent, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # only this process (host, pid) uses that name
    os.makedirs(staging)
    try:
        hf_model.save_pretrained(staging)
        has_tokenizer = config.vocab_size == GPT2_VOCAB_SIZE  # GPT-2's tokenizer needs all its 50,257 ids
        if has_tokenizer:
            tokenizer.save_for_transformers(staging, model_max_length=config.n_positions)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(hf_model, directory, has_tokenizer, training))
        for file in os.listdir(staging):  # on disk before the rename makes the folder visible
            with open(os.path.join(staging, file), "rb") as f:
                os.fsync(f.fileno())
        os.replace(staging, directory)  # takes the place of an empty directory, never of a full one
        fsync_directory(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_card(hf_model, directory, has_tokenizer, training):
    """README.md of the folder: what the model is, how it was trained, how to use it."""
    c = hf_model.config
    size = sum(p.numel() for p in hf_model.parameters())  # the tied wte / lm_head weight counted once
    vocabulary = "GPT-2's tokenizer (50,257 tokens)" if has_tokenizer else f"{c.vocab_size} token ids (no tokenizer)"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2]
---
# {os.path.basename(os.path.abspath(directory))}

A GPT-2 language model with {size:,} parameters ({size / 1e6:.1f}M): {c.n_layer} layers, {c.n_head} heads,
{c.n_embd} wide, a context of {c.n_positions} tokens and {vocabulary}, in Hugging Face's GPT-2
format (GPT2LMHeadModel), weights in {str(hf_model.dtype).removeprefix("torch.")}.

## Training
{training or "Not recorded: this folder was written by GPT.save_pretrained."}

## Use
```python
from transformers import pipeline
generator = pipeline("text-generation", model="{directory}")
print(generator("Hello, I'm a language model,", max_new_tokens=32)[0]["generated_text"])
```
Evaluate: `lm_eval --model hf --model_args pretrained={directory} --tasks hellaswag`.
Sample with this project: `python sample.py -m {directory} --prompt "Hello, I'm a language model,"`.
"""


# -----------------------------------------------------------------------------
# What the run knows: the checkpoint and its log directory's metrics.jsonl


def log_dir_of(source):
    """The run's log directory: `source` itself, or the one above <log dir>/checkpoints/step_N.pt."""
    if os.path.isdir(source):
        return source
    checkpoint_dir = os.path.dirname(os.path.abspath(source))
    return os.path.dirname(checkpoint_dir) if os.path.basename(checkpoint_dir) == "checkpoints" else None


def last_evaluations(log_dir, step):
    """{metric: (step, value)}: the last val_loss and hellaswag_acc logged at or before `step` (later
    ones are from training this checkpoint has not seen)."""
    found, path = {}, os.path.join(log_dir or "", "metrics.jsonl")
    if log_dir is None or not os.path.isfile(path):
        return found
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            for key in ("val_loss", "hellaswag_acc"):
                if event.get(key) is not None and found.get(key, (-1,))[0] <= event["step"] <= step:
                    found[key] = (event["step"], event[key])
    return found


def training_section(checkpoint, source):
    """The model card's training section, in markdown."""
    step, total_batch_size = checkpoint.get("step"), (checkpoint.get("config") or {}).get("total_batch_size")
    if step is None:
        return ""
    lines = [f"Trained with train_gpt2.py for {step:,} steps"
             + (f" of {total_batch_size:,} tokens: {step * total_batch_size:,} tokens in all." if total_batch_size
                else ".")]
    evaluations = last_evaluations(log_dir_of(source), step)
    for key, label in (("val_loss", "val loss"), ("hellaswag_acc", "HellaSwag acc_norm")):
        if key in evaluations:
            lines.append(f"- {label}: {evaluations[key][1]:.4f} at step {evaluations[key][0]:,}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="export.py", description="Export a train_gpt2.py checkpoint as a "
                                     "Hugging Face model folder (weights, tokenizer, generation config, model card).")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    parser.add_argument("checkpoint", help="a train_gpt2.py checkpoint file, or a log directory: its latest "
                                           "readable checkpoint in <dir>/checkpoints/")
    parser.add_argument("output_dir", help="the folder to write; must not exist yet, or be empty")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="how the weights are stored (default: %(default)s)")
    return parser.parse_args(argv)


def export(source, directory, dtype):
    """Write `directory` from the checkpoint `source`; returns the checkpoint's step."""
    try:
        check_new_directory(directory)  # before reading a checkpoint of gigabytes
    except ValueError as e:
        raise UserError(str(e), exit_code=2) from None
    try:
        tokenizer.get_tokenizer()  # GPT-2's vocabulary is here (or can be downloaded)
        checkpoint = read_checkpoint(source)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    try:
        model.save_pretrained(directory, dtype=dtype, training=training_section(checkpoint, source))
    except ValueError as e:  # another process filled the directory meanwhile
        raise UserError(str(e), exit_code=2) from None
    except OSError as e:  # a full disk, no permission; nothing is left half written
        raise UserError(f"cannot write {directory}: {e}") from None
    return checkpoint.get("step")


def main(argv=None):
    args = parse_args(argv)
    try:
        step = export(args.checkpoint, args.output_dir, DTYPES[args.dtype])
    except UserError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"exported step {step} of {args.checkpoint} to {args.output_dir} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
