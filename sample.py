"""Sample text from a GPT-2: one of our checkpoints, a run's log directory, or a Hugging Face model.

    python sample.py -m log --prompt "Hello, I'm a language model,"        # the run's latest checkpoint
    python sample.py -m my-gpt2 --top-k 1 --prompt "The capital of France"  # export.py's folder, greedy
    python sample.py -m gpt2 --num-samples 4 --temperature 0.8 --seed 7     # OpenAI's GPT-2 (from the hub)
    echo "Once upon a time" | python sample.py -m log                       # the prompt from stdin

The same seed, device and dtype give the same text. Without a prompt a sample starts a new document."""

import sys
from dataclasses import dataclass

import torch

from common import DTYPES, UserError, parse_settings, pick_device, resolve_dtype, setting
from logdir import load_model
from tokenizer import EOT, get_tokenizer

SEPARATOR = "-" * 40


@dataclass
class SampleConfig:
    model: str = setting(None, "a checkpoint, log dir, HF folder or hub name", flags=("-m", "--model"), required=True)
    prompt: str = setting(None, "the text to continue (default: stdin when it is not a terminal, else none)")
    num_samples: int = setting(1, "how many samples", must="be positive")
    max_new_tokens: int = setting(100, "the most tokens each sample adds to the prompt", must="not be negative")
    temperature: float = setting(1.0, "divides the logits: below 1 the likely tokens gain", must="be positive")
    top_k: int = setting(50, "sample among the k most likely tokens; 1 is greedy, 0 all", must="not be negative")
    seed: int = setting(42, "the same seed gives the same text")
    device: str = setting("auto", "cpu, cuda, cuda:N, mps, or auto: cuda > mps > cpu")
    dtype: str = setting("auto", "the weights' dtype (auto: as in training)", choices=["auto", *DTYPES])


def sample(model, enc, prompt, config, device):
    """Print config.num_samples continuations of prompt, each up to <|endoftext|>; a single one streams."""
    idx = torch.tensor([enc.encode_ordinary(prompt) or [EOT]] * config.num_samples, device=device)  # (B, T)
    generator = torch.Generator(device).manual_seed(config.seed)
    rows, streaming, shown = [[] for _ in range(config.num_samples)], config.num_samples == 1, ""
    if streaming:
        print(prompt, end="", flush=True)
    for tokens in model.stream(idx, config.max_new_tokens, config.temperature, config.top_k, generator):
        for row, token in zip(rows, tokens[:, 0].tolist()):
            row.append(token)  # in place: a copy of every row each token would grow with the sample
        text = decode(enc, rows[0])
        if streaming and not text.endswith("\ufffd"):  # else wait for the rest of a multi-byte character
            print(text[len(shown) :], end="", flush=True)
            shown = text
        if all(EOT in row for row in rows):  # every sample has ended its document
            break
    if streaming:
        print(decode(enc, rows[0])[len(shown) :])
    else:
        print(f"\n{SEPARATOR}\n".join(prompt + decode(enc, row) for row in rows))


def main(argv=None):
    try:
        config = parse_settings(SampleConfig, argv, "Sample text from a GPT-2.")
        device = pick_device(config.device)
        prompt = config.prompt
        if prompt is None:  # a prompt piped in, else none: a new document
            prompt = "" if sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
        try:
            enc, model = get_tokenizer(), load_model(config.model)
        except (OSError, ValueError) as e:  # tokenizer.py's and load_model's one line
            raise UserError(str(e)) from None
        model.to(device=device, dtype=getattr(torch, resolve_dtype(config.dtype, device))).eval()
        sample(model, enc, prompt, config, device)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C while sampling: stop where it is
        print()
        return 130
    return 0


def decode(enc, row):  # a sample's text: its new tokens up to the <|endoftext|> that ends it
    return enc.decode(row[: row.index(EOT)] if EOT in row else row)


if __name__ == "__main__":
    sys.exit(main())
