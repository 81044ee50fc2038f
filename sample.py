"""Sample text from a GPT-2: one of our checkpoints, a run's log directory, or a Hugging Face model.

    python sample.py -m log --prompt "Hello, I'm a language model,"        # the run's latest checkpoint
    python sample.py -m log/checkpoints/step_00019073.pt --num-samples 4   # four samples of one checkpoint
    python sample.py -m my-gpt2 --top-k 1 --prompt "The capital of France"  # export.py's folder, greedy
    python sample.py -m gpt2 --temperature 0.8 --seed 7                     # OpenAI's GPT-2 (from the hub)
    echo "Once upon a time" | python sample.py -m log                       # the prompt from stdin

Each sample is printed as the prompt followed by its continuation, token by token as they come
when one sample is asked for; several samples are separated by a line of dashes. A sample ends at
<|endoftext|> (the end of a document, as in transformers) or after --max-new-tokens. The same seed
gives the same text (on the same device and dtype). An empty prompt (no --prompt, stdin a terminal)
starts a new document: unconditional samples.
"""

import argparse
import math
import os
import sys

import torch

from common import UserError
from model import GPT, GPT2_VOCAB_SIZE
from tokenizer import EOT, get_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEPARATOR = "-" * 40


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sample.py", description="Sample text from a GPT-2.")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    parser.add_argument("-m", "--model", required=True,
                        help="a train_gpt2.py checkpoint, a log directory (its latest checkpoint), a Hugging "
                             "Face folder (export.py writes one) or hub name (gpt2 ... gpt2-xl)")
    parser.add_argument("--prompt", default=None,
                        help="the text to continue (default: stdin when it is not a terminal, else none)")
    parser.add_argument("--num-samples", type=int, default=1, help="how many samples (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="the most tokens each sample adds to the prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the logits: below 1 the likely tokens gain, above 1 they lose (default: "
                             "%(default)s)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k most likely tokens; 1 is greedy, 0 all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="the same seed gives the same text (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: cuda > mps > cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="the weights' dtype; auto: bfloat16 on cuda, else float32")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be at least {low}, got {getattr(args, name.replace('-', '_'))}"
                for name, low in (("num-samples", 1), ("max-new-tokens", 0), ("top-k", 0))
                if getattr(args, name.replace("-", "_")) < low]
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        problems.append(f"--temperature must be a positive number, got {args.temperature}")
    if problems:
        parser.error("; ".join(problems))
    return args


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu, cuda, cuda:N, mps or auto", exit_code=2) from None
    if device.type == "cuda" and not torch.cuda.is_available() or device.type == "mps" and not \
            torch.backends.mps.is_available():
        raise UserError(f"--device {name} is not available here; use --device cpu", exit_code=2)
    return device


def load_model(name):
    """Our GPT from a checkpoint file or a log directory, else from a Hugging Face folder or the hub."""
    local = os.path.exists(name)
    try:
        if local and not os.path.isfile(os.path.join(name, "config.json")):
            model = GPT.from_checkpoint(name)
        else:
            model = GPT.from_pretrained(name)
    except (OSError, ValueError) as e:  # read_checkpoint's one line; the hub's or transformers' many
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local:
            message = f"not a local path, and the Hugging Face hub did not give it ({message})"
        raise UserError(f"cannot load {name}: {message}") from None
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{name} has vocab_size {model.config.vocab_size}; GPT-2's tokenizer needs {GPT2_VOCAB_SIZE}")
    return model


def sample(model, enc, prompt, args, device):
    """Print args.num_samples continuations of prompt, streaming when there is one."""
    ids = enc.encode_ordinary(prompt) or [EOT]  # no prompt: start a new document
    idx = torch.tensor([ids] * args.num_samples, device=device)
    generator = torch.Generator(device).manual_seed(args.seed)
    rows = [[] for _ in range(args.num_samples)]  # the new tokens of each sample, up to its <|endoftext|>

    def continuation(row):
        return enc.decode(row[:-1] if row[-1:] == [EOT] else row)

    streaming, shown = args.num_samples == 1, ""
    if streaming:
        print(prompt, end="", flush=True)
    for tokens in model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, generator):
        for row, token in zip(rows, tokens[:, 0].tolist()):
            if row[-1:] != [EOT]:
                row.append(token)
        text = continuation(rows[0])
        if streaming and not text.endswith("\ufffd"):  # else wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
        if all(row[-1:] == [EOT] for row in rows):
            break
    if streaming:
        print(continuation(rows[0])[len(shown):])
    else:
        print(f"\n{SEPARATOR}\n".join(prompt + continuation(row) for row in rows))


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        prompt = args.prompt
        if prompt is None:
            prompt = "" if sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
        try:
            enc = get_tokenizer()
        except OSError as e:  # tokenizer.py's one line: no GPT-2 vocabulary here
            raise UserError(str(e)) from None
        model = load_model(args.model).to(device=device, dtype=dtype).eval()
        sample(model, enc, prompt, args, device)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C while sampling: stop where it is
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
