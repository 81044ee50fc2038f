"""Export a train_gpt2.py checkpoint as a Hugging Face folder that transformers, vLLM and lm_eval load:
weights and configs, GPT-2's tokenizer, and a model card with the run's steps, val loss and HellaSwag.

    python export.py log my-gpt2 [--dtype bfloat16]   # the run's latest checkpoint; bfloat16 halves the size"""

import contextlib
import glob
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import tokenizer
from common import UserError, fsync_directory, parse_settings, setting
from logdir import model_from_checkpoint, read_checkpoint
from model import GPT2_VOCAB_SIZE, copy_weights


@dataclass
class ExportConfig:
    checkpoint: str = setting(None, "a train_gpt2.py checkpoint, or a log directory (its latest)", positional=True)
    output_dir: str = setting(None, "the folder to write; it must be new or empty", positional=True)
    dtype: str = setting("float32", "how the weights are stored", choices=["float32", "bfloat16"])

    def problems(self):
        return [problem for problem in [occupied(self.output_dir)] if problem]


def main(argv=None):
    try:
        config = parse_settings(ExportConfig, argv, "Export a train_gpt2.py checkpoint as a Hugging Face folder.")
        checkpoint = read_checkpoint(config.checkpoint)
        hf_model = to_hf(model_from_checkpoint(checkpoint), getattr(torch, config.dtype))
        save_folder(hf_model, config.output_dir, training_section(checkpoint))
    except (UserError, OSError, ValueError) as e:  # no checkpoint, no vocabulary, a full disk: nothing half written
        print(f"export.py: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    print(f"exported step {checkpoint.get('step')} of {config.checkpoint} to {config.output_dir} ({config.dtype})")
    return 0


def to_hf(model, dtype=torch.float32):
    """Our GPT as transformers' GPT2LMHeadModel in dtype, padding rows dropped, sampling as GPT.generate by default."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    c, eot = model.config, GPT2_VOCAB_SIZE - 1
    sizes = dict(n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head)
    tokens = dict(vocab_size=min(c.vocab_size, GPT2_VOCAB_SIZE), bos_token_id=eot, eos_token_id=eot)
    # GPT2Config's defaults are GPT-2's (gelu_new, layer_norm_epsilon 1e-5), but for dropout, which ours has not
    hf_model = GPT2LMHeadModel(GPT2Config(**sizes, **tokens, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    copy_weights(model.state_dict(), hf_model.state_dict())
    # max_new_tokens, not max_length: a caller's own max_new_tokens then replaces it without a warning
    sampling = dict(do_sample=True, top_k=50, max_new_tokens=32)
    hf_model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, **sampling)
    return hf_model.to(dtype)


def save_folder(hf_model, directory, training=""):
    """hf_model (to_hf's), GPT-2's tokenizer and a model card -> `directory` (new or empty), all or nothing."""
    if problem := occupied(directory):
        raise ValueError(problem)
    parent, name = os.path.split(os.path.abspath(directory))
    host = socket.gethostname()
    for stale in glob.glob(os.path.join(glob.escape(parent), f".*.{glob.escape(host)}.*.tmp")):
        try:
            os.kill(int(stale.rsplit(".", 2)[-2]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:  # the staging folder of a killed export on this machine
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):  # not a pid, or another user's process: not ours to remove
            pass
    staging = os.path.join(parent, f".{name}.{host}.{os.getpid()}.tmp")  # this process's own
    os.makedirs(staging)
    try:
        hf_model.save_pretrained(staging)
        has_tokenizer = hf_model.config.vocab_size == GPT2_VOCAB_SIZE  # GPT-2's tokenizer needs all its ids
        if has_tokenizer:
            tokenizer.save_for_transformers(staging, model_max_length=hf_model.config.n_positions)
        Path(staging, "README.md").write_text(model_card(hf_model, directory, has_tokenizer, training))
        umask = os.umask(0)
        os.umask(umask)
        for file in os.listdir(staging):  # on disk before the rename makes the folder visible
            with open(os.path.join(staging, file), "rb") as f:
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o666 & ~umask)  # safetensors writes 0600: the umask decides, as for the rest
        os.replace(staging, directory)  # takes the place of an empty directory, never of a full one
        fsync_directory(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_card(hf_model, directory, has_tokenizer, training):
    c, size = hf_model.config, hf_model.num_parameters()  # the tied wte / lm_head weight counted once
    vocabulary = "GPT-2's tokenizer (50,257 tokens)" if has_tokenizer else f"{c.vocab_size} token ids (no tokenizer)"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# {os.path.basename(os.path.abspath(directory))}

A GPT-2 model with {size:,} parameters ({size / 1e6:.1f}M): {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide,
a context of {c.n_positions} tokens, {vocabulary}; weights in {str(hf_model.dtype).removeprefix("torch.")}.

## Training
{training or "Not recorded."}

## Use
```python
from transformers import pipeline
print(pipeline("text-generation", model="{directory}")("Once upon a time", max_new_tokens=32)[0]["generated_text"])
```
"""


def training_section(checkpoint):
    """The card's training section (read_checkpoint's dict): steps, tokens, the last evaluations logged up to it."""
    step, batch = checkpoint.get("step"), (checkpoint.get("config") or {}).get("total_batch_size")
    if step is None:
        return ""
    tokens = f" of {batch:,} tokens: {step * batch:,} tokens in all." if batch else "."
    lines = [f"Trained with train_gpt2.py for {step:,} steps{tokens}"]
    path, events = Path(checkpoint["path"]).absolute(), []  # <log dir>/checkpoints/step_N.pt
    metrics = path.parent.parent / "metrics.jsonl"
    if path.parent.name == "checkpoints" and metrics.is_file():  # not for a checkpoint copied away from its log
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by a crash
                events.append(json.loads(line))
    for key, label in (("val_loss", "val loss"), ("hellaswag_acc", "HellaSwag acc_norm")):
        logged = sorted((e["step"], e[key]) for e in events if e.get(key) is not None and e["step"] <= step)
        lines += [f"- {label}: {value:.4f} at step {at:,}" for at, value in logged[-1:]]  # the last one
    return "\n".join(lines)


def occupied(directory):
    """Why `directory` cannot take an export, or None: it must be new or empty, so exports never mix."""
    if os.path.exists(directory) and not (os.path.isdir(directory) and not os.listdir(directory)):
        return f"{directory} already exists and is not an empty directory; choose a new one or remove it"


if __name__ == "__main__":
    sys.exit(main())
