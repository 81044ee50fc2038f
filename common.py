"""What two or more scripts share and no chapter is about: settings as flags, one error type, files written
whole, a lock per directory, the device and its dtype, and the ranks agreeing on errors under torchrun.
torch is imported inside the functions that need it: fineweb.py imports this file and does without torch."""

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import socket
import sys
import tomllib
from dataclasses import field, fields

DTYPES = ("float32", "bfloat16", "float16")  # what a run computes in: float32, or autocast to a 16-bit type


class UserError(Exception):
    """A problem the user can fix, said in one line (no traceback): exit_code 2 for settings, 1 at run time."""

    def __init__(self, message, exit_code=1, reported=False):
        super().__init__(message)
        self.exit_code, self.reported = exit_code, reported


# --- Settings: one dataclass per script, one --flag per field -----------------------------------------------
def setting(default, help, must=None, section=None, **argparse_kwargs):
    """A dataclass field that is also a --flag (see parse_settings); must: one of RULES; section: a --help heading."""
    return field(default=default, metadata=dict(help=help, must=must, section=section, **argparse_kwargs))


RULES = {"be positive": lambda v: v > 0, "not be negative": lambda v: v >= 0, "be in [0, 1)": lambda v: 0 <= v < 1}


def problems_of(config):
    """What cannot work in config, as readable strings: a float not finite, a value against its rule, problems()."""
    found = []
    for f in fields(config):
        value, rule = getattr(config, f.name), f.metadata.get("must")
        if type(value) is float and not math.isfinite(value):
            found.append(f"{f.name}={value} must be a finite number")
        elif rule and value is not None and not RULES[rule](value):
            found.append(f"{f.name}={value} must {rule}")
    return found + (config.problems() if hasattr(config, "problems") else [])


class SettingsParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own checks end the same way as problems() do
        raise UserError(f"{message} (see --help)", exit_code=2)


def parse_settings(config_class, argv=None, description=None, preset=None):
    """The command line -> a config_class, a dataclass of setting()s: max_lr is --max-lr, a bool --x/--no-x,
    the metadata goes to argparse, plus flags=("-m", "--model") for other names and positional=True.
    --config FILE reads the same settings from TOML (max_lr = 6e-4); flags given win. preset(given) may give
    flags that come first (defaults of its own). Bad values: one UserError (exit 2)."""
    parser = SettingsParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="a TOML file of these settings; flags given here win")
    group = parser
    for f in fields(config_class):
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("must", "section")}
        names = list(kwargs.pop("flags", ["--" + f.name.replace("_", "-")]))
        if kwargs.pop("positional", False):
            names = [f.name]
        kind = f.type if f.default is None else type(f.default)  # a default of None: the annotation's type
        if kind is bool:
            kwargs.setdefault("action", argparse.BooleanOptionalAction)
        elif "action" not in kwargs:
            kwargs.setdefault("type", kind if kind in (int, float) else str)
        if f.default is not None:
            kwargs["help"] += f" (default: {f.default})"
        if f.metadata.get("section"):
            group = parser.add_argument_group(f.metadata["section"])
        group.add_argument(*names, **kwargs, **({} if names == [f.name] else {"dest": f.name}))
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(parser.parse_args(argv))
    flags = preset(given) if preset else []  # a preset's and a file's settings as flags: one way in for every value
    if "config" in given:
        flags += config_file_flags(given["config"], config_class)
    given = vars(parser.parse_args(flags + argv))
    given.pop("config", None)
    config = config_class(**given)
    if problems := problems_of(config):
        raise UserError("invalid settings: " + "; ".join(problems), exit_code=2)
    return config


def config_file_flags(path, config_class):
    """A TOML settings file as the flags that say the same."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read --config {path} ({e}); give a TOML file of settings", exit_code=2) from None
    names = {f.name: f for f in fields(config_class)}
    if unknown := sorted(set(settings) - set(names)):
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see --help", exit_code=2)
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif not isinstance(value, bool):
            flags.append(f"{flag}={value}")  # one argument: the value may start with "-"
        elif value or names[key].metadata.get("action") != "store_true":  # store_true flags have no --no- form
            flags.append(flag if value else "--no-" + flag[2:])
    return flags


def write_settings(config, path, leave_out=()):
    """config's settings as a TOML file that --config reads back (None, "not set", is left out)."""
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in leave_out}
    text = "".join(f"{k} = {json.dumps(v, ensure_ascii=False)}\n" for k, v in values.items() if v is not None)
    # A JSON value is a TOML value, but for DEL, which TOML wants escaped and JSON leaves as it is
    atomic_write(path, lambda f: f.write(text.replace("\x7f", "\\u007f").encode()))


def duration(text):
    """Seconds from '3h50m', '90m', '45s' or a plain number of seconds ('1h30' is refused: 30 what?)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?|(\d+)", text.strip())  # the last group: plain seconds
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 3h50m, 90m, 45s or 600")
    return sum(int(n or 0) * s for n, s in zip(match.groups(), (3600, 60, 1, 1)))


# --- Files: written whole or not at all, and one process per directory --------------------------------------
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


def ancestry(path):  # `path` and its parents up to the first that exists: [:-1] are the ones a run creates
    path = os.path.abspath(path)
    return [path] if os.path.exists(path) else [path, *ancestry(os.path.dirname(path))]


@contextlib.contextmanager
def directory_lock(directory, what="run", made=()):
    """An fcntl lock on `<directory>/.lock`, which names its owner: a second process stops at once. The OS drops
    it when the process ends, however it ends; it works on NFS; forked workers do not inherit it. None on Windows.
    A run that fails leaves behind nothing it made: a new .lock, the directories `made` for it (ancestry's [:-1])."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = os.path.join(directory, ".lock")
    lock_was_there = os.path.exists(lock)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # 0o666: the umask decides
    try:  # closing the file releases the lock; the file stays
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES: another process holds it
            owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            message = f"{directory} is in use by another {what} ({owner}); wait for it to end, or use another directory"
            raise UserError(message) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    except BaseException:
        if not lock_was_there:
            os.remove(lock)
        for new in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                os.rmdir(new)
        raise
    finally:
        os.close(fd)


# --- The device: which one, the dtype it computes in, compile and peak FLOP/s -------------------------------
def pick_device(name="auto"):
    """A torch.device: 'auto' is cuda, else mps, else cpu; a device this machine lacks is a UserError."""
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps", exit_code=2) from None
    if not available.get(device.type):
        raise UserError(f"--device {name}: no such device on this machine; use --device auto", exit_code=2)
    return device


def resolve_dtype(dtype, device):
    """The name of the dtype to autocast to on `device` ("float32": none). 'auto' is bfloat16 on CUDA GPUs from
    Ampere on (compute capability 8.0: A100, L4, H100), float16 before (T4, V100; training adds a gradient
    scaler), float32 on MPS and CPU (bf16 autocast is slow on CPUs without bf16, and unreliable on MPS)."""
    import torch

    if dtype == "auto" and device.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
    return "float32" if dtype == "auto" else dtype


def autocast_dtype_for(dtype, device):
    """resolve_dtype's pick as the torch dtype to give torch.autocast, or None for float32 (no autocast)."""
    import torch

    name = resolve_dtype(dtype, device)
    return None if name == "float32" else getattr(torch, name)


def compile_by_default(device):
    """Whether torch.compile is on unless a flag says: it needs Triton (CUDA GPUs from Volta on, not Windows)."""
    from torch.utils._triton import has_triton  # private, but what inductor itself asks

    return device.type == "cuda" and sys.platform != "win32" and has_triton()


def autocast_and_scaler(dtype, device):
    """The forward's autocast and, for float16 (small gradients would round to zero), a gradient scaler."""
    import torch

    dtype = autocast_dtype_for(dtype, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), scaler


def check_compile(device):
    """torch.compile needs a C compiler and Python's headers at run time, not only Triton: a UserError naming
    what to install, found by compiling a two-op function (seconds), not at a run's first evaluation."""
    import torch

    try:
        torch.compile(lambda x: (x * 2).sin())(torch.ones(2, device=device))
    except Exception as e:  # inductor's errors have many types; each ends here as one line
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        fix = "install a C compiler and Python's headers (apt install build-essential python3-dev), or --no-compile"
        raise UserError(f"torch.compile does not work here ({why}); {fix}", exit_code=2) from None


def keep_freed_memory():
    """With glibc, keep freed memory in the process: glibc maps each large tensor afresh and unmaps it when freed,
    so each CPU step page-faults it in again (the demo's step on 2 cores: 2.0 s, not 0.9 s; 124M: ~6.1 s, not ~5.0)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks come from the heap, which is reused...
        libc.mallopt(-1, 2**31 - 1)  # ...and M_TRIM_THRESHOLD: not trimmed back after each step (a C int)


# Dense peak FLOP/s (float32 as TF32 where the GPU has it, float16, bfloat16; None: no bf16 before Ampere)
# from NVIDIA's datasheets. The first key in the device name wins: a longer name before one it contains.
PEAK_FLOPS = {
    "H100 PCIe": (378e12, 756e12, 756e12),
    "H100 NVL": (417.5e12, 835e12, 835e12),
    "H100": (494.5e12, 989e12, 989e12),
    "H200 NVL": (417.5e12, 835e12, 835e12),
    "H200": (494.5e12, 989e12, 989e12),
    "H800 PCIe": (378e12, 756e12, 756e12),
    "H800": (494.5e12, 989e12, 989e12),
    "A100": (156e12, 312e12, 312e12),
    "L40S": (183e12, 362e12, 362e12),
    "L40": (90.5e12, 181e12, 181e12),
    "L4": (60e12, 121e12, 121e12),
    "V100S": (16.4e12, 130e12, None),
    "V100-PCIE": (14e12, 112e12, None),
    "V100": (15.7e12, 125e12, None),
    "Tesla T4": (8.1e12, 65e12, None),
}


def peak_flops_of(device_name, dtype):
    """The table's figure, or None: unknown GPUs and MIG slices (that still say H100) get no MFU, not a wrong one."""
    if "MIG" in device_name:
        return None
    column = ("float32", "float16", "bfloat16").index(dtype)
    return next((peaks[column] for key, peaks in PEAK_FLOPS.items() if key in device_name), None)


# --- torchrun's ranks: errors they agree on, and who prints -------------------------------------------------
def agree(error=None, value=None, prefix="error: "):
    """Every rank says whether it failed and shares a value -> the values in rank order. If any rank failed,
    rank 0 prints each message once (with the ranks that met it, unless all did), the ranks wait for that
    print, and each raises a UserError already reported."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if error is not None:
            raise error
        return [value]
    outcomes = [None] * dist.get_world_size()
    failure = None if error is None else (str(error), getattr(error, "exit_code", 1))  # a UserError or an OSError
    dist.all_gather_object(outcomes, (failure, value))
    failures = {}  # (message, exit code) -> the ranks that met it
    for rank, (failure, _) in enumerate(outcomes):
        if failure is not None:
            failures.setdefault(failure, []).append(rank)
    if not failures:
        return [value for _, value in outcomes]
    if dist.get_rank() == 0:
        for (message, _), ranks in failures.items():
            who = "" if len(ranks) == len(outcomes) else f"rank {', '.join(map(str, ranks))}: "
            print(f"{prefix}{who}{message}", file=sys.stderr, flush=True)
    dist.barrier()  # gloo: no rank exits (and has torchrun stop the others) before the print
    raise UserError("reported", exit_code=next(iter(failures))[1], reported=True)


def print0(*args, **kwargs):
    """print on rank 0 only (torchrun's RANK), flushed: one copy of each line however many processes run."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)
