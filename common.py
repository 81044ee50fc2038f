"""What every script shares and no chapter is about: settings as flags, one error type, files written
whole, a lock per directory, the device and its dtype, torchrun's ranks (errors they agree on, clean stops).
torch is imported inside the functions that need it: fineweb.py imports this file and does without torch.

    config = parse_settings(MyConfig, argv)                        # a dataclass of setting()s -> its flags
    atomic_write("out/shard.npy", lambda f: np.save(f, tokens))   # whole file or none, even after a crash
    with AllRanks():                                               # an error on any rank ends every rank
        device = pick_device("auto")                               # cuda > mps > cpu
"""

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import signal
import socket
import sys
import threading
import tomllib
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import field, fields


class UserError(Exception):
    """A problem the user can fix: printed as one line, no traceback; exit_code 2 for settings, 1 at run time.
    Under torchrun, every_rank=False: only this rank met it (so it prints it); reported: already printed."""

    def __init__(self, message, exit_code=1, every_rank=True, reported=False):
        super().__init__(message)
        self.exit_code, self.every_rank, self.reported = exit_code, every_rank, reported


# -----------------------------------------------------------------------------
# Settings: one dataclass per script, one --flag per field


def setting(default, help, **argparse_kwargs):
    """A dataclass field that is also a command-line flag (see parse_settings)."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


class SettingsParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own checks end the same way as problems() do
        raise UserError(f"{message} (see --help)", exit_code=2)


def parse_settings(config_class, argv=None, description=None, defaults=None):
    """The command line -> a config_class, a dataclass of setting()s: max_lr is --max-lr, a bool --x/--no-x,
    the metadata goes to argparse, plus flags=("-m", "--model") for other names and positional=True.
    --config FILE reads the same settings from TOML (max_lr = 6e-4); flags given win. defaults(given) may
    change the defaults (a preset). Bad values: one UserError (exit 2) listing every config.problems()."""
    parser = SettingsParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="a TOML file of these settings (max_lr = 6e-4 for "
                        "--max-lr); flags on the command line win")
    for f in fields(config_class):
        kwargs, names = dict(f.metadata), ["--" + f.name.replace("_", "-")]
        names = [f.name] if kwargs.pop("positional", False) else list(kwargs.pop("flags", names))
        if f.type is bool:
            kwargs.setdefault("action", argparse.BooleanOptionalAction)
        elif "action" not in kwargs:  # the default's type, or the annotation's for a default of None
            kwargs.setdefault("type", type(f.default) if f.default is not None else
                              f.type if f.type in (int, float) else str)
        if f.default is not None:
            kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(*names, **kwargs, **({} if names == [f.name] else {"dest": f.name}))
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(parser.parse_args(argv))
    if "config" in given:
        given = vars(parser.parse_args(config_file_flags(given["config"], config_class) + argv))
    given.pop("config", None)
    config = config_class(**{**(defaults(given) if defaults else {}), **given})
    problems = config.problems()
    if problems:
        raise UserError("invalid settings: " + "; ".join(problems), exit_code=2)
    return config


def config_file_flags(path, config_class):
    """A TOML settings file as the flags that say the same: one way in for every value."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read --config {path} ({e})", exit_code=2) from None
    names = {f.name: f for f in fields(config_class)}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see --help", exit_code=2)
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if not isinstance(value, bool):
            flags += [flag, *map(str, value if isinstance(value, list) else [value])]
        elif value or names[key].metadata.get("action") != "store_true":  # store_true flags have no --no- form
            flags.append(flag if value else "--no-" + flag[2:])
    return flags


def write_settings(config, path, leave_out=()):
    """config's settings as a TOML file that --config reads back (None, "not set", is left out)."""
    lines = [f"{f.name} = {json.dumps(getattr(config, f.name))}" for f in fields(config)  # JSON values are TOML
             if getattr(config, f.name) is not None and f.name not in leave_out]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def duration(text):
    """Seconds from '3h50m', '90m', '45s' or a number of seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 3h50m, 90m or 600")
    return sum(int(n or 0) * s for n, s in zip(match.groups(), (3600, 60, 1)))


def int_or_auto(text):
    return text if text == "auto" else int(text)


class OnOffOrAuto(argparse.Action):
    """--compile / --no-compile force it on or off; --compile auto leaves it to the machine."""

    def __init__(self, option_strings, dest, **kwargs):
        option_strings += ["--no-" + option[2:] for option in option_strings]
        super().__init__(option_strings, dest, nargs="?", choices=["auto"], metavar="auto", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if value is not None and option_string.startswith("--no-"):
            parser.error(f"{option_string} takes no value")
        setattr(namespace, self.dest, value or not option_string.startswith("--no-"))


# -----------------------------------------------------------------------------
# Files: written whole or not at all, and one process per directory


def atomic_write(path, write):
    """write(f) on a hidden temporary file beside `path` (opened "wb"), fsync'd, then renamed to `path`: after
    a crash or a power loss `path` is the old file or the whole new one. On failure `path` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    # Host and pid in the name: ranks and nodes writing into one shared directory never collide.
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        fsync_directory(directory)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def fsync_directory(directory):
    """Make a rename or a removal in `directory` durable (a no-op on Windows)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def directory_lock(directory, what="run"):
    """An fcntl lock on `<directory>/.lock`, which names its owner: a second process stops at once. The OS drops
    it when the process ends, however it ends; it works on NFS; forked workers do not inherit it. None on Windows."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:  # closing the file releases the lock; the file stays
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES: another process holds it
            owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{directory} is in use by another {what} ({owner}); wait for it to end, "
                            f"or use another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# The device: which one, the dtype it computes in, compile, memory and peak FLOP/s


def pick_device(name="auto"):
    """A torch.device: 'auto' is cuda, else mps, else cpu. Under torchrun a GPU is this process's own,
    cuda:LOCAL_RANK, and the process makes it current (its RNG, pinned memory and kernels)."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps", exit_code=2) from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type):
        raise UserError(f"--device {name}: no such device on this machine; use --device auto", exit_code=2)
    if device.type == "cuda":
        if "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device.index or 0)
    return device


def resolve_dtype(dtype, device):
    """The name of the dtype to autocast to on `device` ("float32": none). 'auto' is bfloat16 on CUDA GPUs from
    Ampere on (compute capability 8.0: A100, L4, H100), float16 before (T4, V100; training adds a gradient
    scaler), float32 on MPS and CPU (bf16 autocast is slow on CPUs without bf16, and unreliable on MPS)."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        import torch
        return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
    return "float32"


def autocast_dtype_for(dtype, device):
    """resolve_dtype's pick as the torch dtype to give torch.autocast, or None for float32 (no autocast)."""
    import torch
    name = resolve_dtype(dtype, device)
    return None if name == "float32" else getattr(torch, name)


def compile_by_default(device):
    """Whether --compile auto turns torch.compile on: it needs Triton (CUDA GPUs from Volta on, not Windows)."""
    from torch.utils._triton import has_triton  # private, but what inductor itself asks
    return device.type == "cuda" and platform.system() != "Windows" and has_triton()


def autocast_and_scaler(dtype, device):
    """The forward's autocast and, for float16 (small gradients would round to zero), a gradient scaler."""
    import torch
    dtype = autocast_dtype_for(dtype, device)
    if dtype is None:
        return nullcontext(), None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory(device):
    """Forget compiled graphs (they hold their model) and hand cached GPU memory back."""
    import torch
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_budget(processes):
    """Half the memory free here (MemAvailable, or a cgroup v2 limit if lower; else half the RAM) shared by
    `processes`: the other half is room for the OS, the page cache and the estimate's error. None: unknown."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        if not hasattr(os, "sysconf"):
            return None
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            free = min(free, int(f.read()) - int(g.read()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit (or "max")
    return free // 2 // processes


# Dense peak FLOP/s (float32 as TF32 where the GPU has it, float16, bfloat16; None: no bf16 before Ampere)
# from NVIDIA's datasheets. The first key in the device name wins: a longer name before one it contains.
PEAK_FLOPS = {
    "H100 PCIe": (378e12, 756e12, 756e12), "H100 NVL": (417.5e12, 835e12, 835e12),
    "H100": (494.5e12, 989e12, 989e12), "H200 NVL": (417.5e12, 835e12, 835e12), "H200": (494.5e12, 989e12, 989e12),
    "H800 PCIe": (378e12, 756e12, 756e12), "H800": (494.5e12, 989e12, 989e12),
    "A100": (156e12, 312e12, 312e12), "A800": (156e12, 312e12, 312e12),
    "L40S": (183e12, 362e12, 362e12), "L40": (90.5e12, 181e12, 181e12), "L4": (60e12, 121e12, 121e12),
    "V100S": (16.4e12, 130e12, None), "V100-PCIE": (14e12, 112e12, None), "V100": (15.7e12, 125e12, None),
    "Tesla T4": (8.1e12, 65e12, None),
}


def peak_flops_of(device_name, dtype):
    """The table's figure, or None: unknown GPUs and MIG slices (that still say H100) get no MFU, not a wrong one."""
    if "MIG" in device_name:
        return None
    column = ("float32", "float16", "bfloat16").index(dtype)
    return next((peaks[column] for key, peaks in PEAK_FLOPS.items() if key in device_name), None)


def keep_freed_memory():
    """With glibc, keep freed memory in the process: glibc maps each large tensor afresh and unmaps it when
    freed, so each CPU step page-faults it in again (the 124M fp32 step on 2 cores: ~6.1 s, not ~5.0 s)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks come from the heap, which is reused...
        libc.mallopt(-1, 2**31 - 1)  # ...and M_TRIM_THRESHOLD: not trimmed back after each step (a C int)
    except (OSError, AttributeError):
        pass  # not glibc


# -----------------------------------------------------------------------------
# Processes: torchrun's ranks, errors they agree on, and clean stops


def start_distributed(timeout=600):
    """Under torchrun, join the other ranks (NCCL for CUDA tensors, gloo for CPU ones) -> (rank, world size);
    (0, 1) without. A collective that waits over `timeout` seconds fails: a stalled or dead rank ends the job."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before NCCL starts on this GPU
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


class AllRanks:
    """A block of set-up that every rank runs, then agrees on with agree(): a rank that fails skips the rest of
    its block, so no rank waits in a collective that another will not reach.

        with AllRanks() as block:     # a UserError in here, on any rank, ends every rank
            block.value = ...         # optional: this rank's contribution
        block.values                  # every rank's value, in rank order
    """

    def __init__(self, prefix="error: "):
        self.prefix, self.value = prefix, None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, UserError):
            self.values = agree(error, self.value, self.prefix)  # raises on every rank if any rank failed


def agree(error=None, value=None, prefix="error: "):
    """Every rank says whether it failed and shares a value -> the values in rank order. If any rank
    failed, rank 0 prints each message once (with the ranks that met it, unless all did), the ranks
    wait for that print, and each raises a UserError already reported."""
    import torch.distributed as dist
    if not dist.is_initialized():
        if error is not None:
            raise error
        return [value]
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (None if error is None else (str(error), error.exit_code), value))
    failures = {}  # message -> the ranks that met it
    for rank, (failure, _) in enumerate(outcomes):
        if failure is not None:
            failures.setdefault(failure, []).append(rank)
    if not failures:
        return [value for _, value in outcomes]
    if dist.get_rank() == 0:
        for (message, _), ranks in failures.items():
            who = "" if len(ranks) == len(outcomes) else f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: "
            print(f"{prefix}{who}{message}", file=sys.stderr, flush=True)
    dist.barrier()  # gloo: no rank exits (and has torchrun stop the others) before the print
    raise UserError("reported", exit_code=next(iter(failures))[1], reported=True)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor):
    """Sum over ranks in place (gloo has no AVG, so averages divide the sum themselves)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class Launch(ExitStack):
    """What one launch holds until it ends (the log directory's lock and history: launch.enter_context, .callback)
    and its signal handlers. SIGTERM, SIGUSR1 (what SLURM and spot instances send before a kill) and Ctrl-C end the
    run after this step, with a checkpoint, on every rank. A second Ctrl-C quits at once."""

    def __enter__(self):
        self.signal = None
        if threading.current_thread() is threading.main_thread():  # Python only lets it set handlers
            for number in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
                if number is not None:
                    self.callback(signal.signal, number, signal.signal(number, self._stop))  # put back at the end
        return super().__enter__()

    def _stop(self, number, frame):
        if number == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signal is None:
            self.signal = number
            if int(os.environ.get("RANK", 0)) == 0:  # os.write: a print here could cut into another print
                os.write(sys.stderr.fileno(), f"{signal.Signals(number).name}: stopping after this step, with a "
                         f"checkpoint{' (Ctrl-C again to quit at once)' if number == signal.SIGINT else ''}\n".encode())
