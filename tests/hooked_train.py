"""train_gpt2.py with interruptions at points a test chooses, so that no test races a clock.

    python tests/hooked_train.py HOOK [HOOK ...] -- TRAIN_GPT2_FLAGS...

A HOOK is RANK:STEP:ACTION (RANK * for every rank). The action happens on that rank just before
step STEP trains (after that step's evaluations):
    SIGTERM, SIGUSR1, SIGINT    the process sends itself the signal
    SIGINT2                     two Ctrl-C in a row
    nan                         the loss of that step is NaN
    infgrad                     the loss of that step stays finite, one weight's gradient is inf
    oom                         that step's first forward runs out of memory (torch.OutOfMemoryError)
    wait=PATH                   block until someone opens PATH (a FIFO) to write and closes it: a stalled
                                rank (SIGALRM ends the process after WAIT_LIMIT seconds, so it never hangs)
    kill-in-checkpoint          SIGKILL while the checkpoint after step STEP is half written
and RANK:argv:FLAG=VALUE replaces a flag's value on that rank before anything runs,
RANK:setup:blind makes every checkpoint unreadable on that rank (a node that does not see them),
RANK:setup:older makes that rank read the checkpoint before the newest (a stale view of them), and
RANK:setup:hellaswag=URL,SIZE,SHA256 makes hellaswag.download() fetch URL pinned to SIZE and SHA256 on that rank
(a local server's file, not the real one) and say on stderr, at each call, whether the rank has passed the barrier
after set-up: `hooked_train.py: hellaswag.download() on rank R, local rank L, before|after the barrier`.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import hellaswag  # noqa: E402
import logdir  # noqa: E402
import train_gpt2  # noqa: E402
from model import GPT  # noqa: E402

split = sys.argv.index("--")
hooks = [hook.split(":", 2) for hook in sys.argv[1:split]]
argv = sys.argv[split + 1 :]
rank = os.environ.get("RANK", "0")
mine = [(step, action) for who, step, action in hooks if who in ("*", rank)]

for step, action in mine:
    if step == "argv":
        flag, value = action.split("=", 1)
        argv[argv.index(flag) + 1] = value
    elif action == "blind":  # logdir.resume reads the checkpoint through logdir.read_checkpoint

        def read_checkpoint(path):
            raise ValueError(f"{path} does not exist")

        logdir.read_checkpoint = read_checkpoint
    elif action == "older":

        def read_older_checkpoint(path, read=logdir.read_checkpoint):
            if not os.path.isdir(path):
                return read(path)  # read(a log dir) reads each candidate file through this function
            newest = read(path)["path"]
            saved = logdir.list_checkpoints(path)
            return read(saved[saved.index(newest) - 1])

        logdir.read_checkpoint = read_older_checkpoint
    elif action.startswith("hellaswag="):
        url, size, sha256 = action[len("hellaswag=") :].rsplit(",", 2)
        where = f"rank {rank}, local rank {os.environ.get('LOCAL_RANK', '0')}"
        barriers_passed = []  # the dist.barrier() calls this rank has come out of

        def download_from_url(download=hellaswag.download):  # train_gpt2.py calls hellaswag.download()
            when = "after" if barriers_passed else "before"
            print(f"hooked_train.py: hellaswag.download() on {where}, {when} the barrier", file=sys.stderr)
            return download(url, size=int(size), sha256=sha256)

        def counted_barrier(*args, barrier=dist.barrier, **kwargs):
            barrier(*args, **kwargs)
            barriers_passed.append(True)

        hellaswag.download, dist.barrier = download_from_url, counted_barrier

actions = {int(step): action for step, action in mine if step not in ("argv", "setup")}
nan_now = infgrad_now = oom_now = False
WAIT_LIMIT = 120  # a test that dies before releasing a waiting rank must not leave it behind forever
get_lr, forward, atomic_write = train_gpt2.get_lr, GPT.forward, logdir.atomic_write


def hooked_get_lr(step, config):  # train() calls it right before each step trains
    global nan_now, infgrad_now, oom_now
    action = actions.get(step, "")
    nan_now, infgrad_now, oom_now = action == "nan", action == "infgrad", action == "oom"
    if action in ("SIGTERM", "SIGUSR1", "SIGINT"):
        os.kill(os.getpid(), getattr(signal, action))
    elif action == "SIGINT2":
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    elif action.startswith("wait="):
        signal.alarm(WAIT_LIMIT)  # its default action ends the process
        with open(action[len("wait=") :]) as f:
            f.read()
        signal.alarm(0)
    return get_lr(step, config)


def hooked_forward(self, *args, **kwargs):
    global infgrad_now
    if oom_now and torch.is_grad_enabled():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by hooked_train.py)")
    logits, loss = forward(self, *args, **kwargs)
    if nan_now and loss is not None:
        loss = loss * float("nan")
    if infgrad_now and torch.is_grad_enabled():  # the step's first training forward: its backward poisons
        infgrad_now = False

        def poison(grad):
            handle.remove()  # once: later micro steps add finite gradients to the inf
            return grad + float("inf")

        handle = self.transformer.h[0].mlp.c_fc.weight.register_hook(poison)
    return logits, loss


def hooked_atomic_write(path, write):
    kill_at = [step + 1 for step, action in actions.items() if action == "kill-in-checkpoint"]
    if not any(path.endswith(f"step_{step:08d}.pt") for step in kill_at):
        return atomic_write(path, write)

    def write_half_then_die(f):
        write(f)
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    return atomic_write(path, write_half_then_die)


train_gpt2.get_lr, GPT.forward, logdir.atomic_write = hooked_get_lr, hooked_forward, hooked_atomic_write
sys.argv = [train_gpt2.__file__, *argv]
train_gpt2.cli()
