"""What every script shares and no chapter is about: one error type, files written safely, a
lock that keeps two runs out of one directory, and the dtype each device computes in.

    from common import UserError, atomic_write, DirectoryLock, resolve_dtype, autocast_dtype_for
    atomic_write("out/shard.npy", lambda f: np.save(f, tokens))   # whole file or none, even after a crash
    with DirectoryLock("log"):                                     # a second run on log/ stops at once
        ...
    resolve_dtype("auto", torch.device("cuda"))                   # "bfloat16" on an A100 or H100
    autocast_dtype_for("auto", torch.device("cpu"))                # None: float32, no autocast
"""

import os
import socket


class UserError(Exception):
    """A problem the user can fix. Scripts print it as one line (no traceback) and exit with
    exit_code: 2 for settings that cannot work, 1 for what went wrong at run time."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# -----------------------------------------------------------------------------
# Files that are whole or absent


def atomic_write(path, write):
    """Call write(f) on a hidden temporary file beside `path` (opened "wb"), then make it `path`.

    The file is flushed and fsync'd before the rename, and its directory after, so that after a
    crash, a kill or a power loss `path` is either the old file or the complete new one, never
    empty or short. On any failure the temporary file is removed and `path` is left as it was.
    """
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
    """Make a rename (or a removal) in `directory` durable; a no-op where directories cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# One process per directory


class DirectoryLock:
    """An exclusive lock on a directory, held while a run writes into it.

    The lock is an fcntl (POSIX) lock on `<directory>/.lock`, which holds the owner's pid and host.
    The operating system drops it when the process ends, however it ends, so a crash never leaves a
    stale lock; POSIX locks also work on NFS, where the log directory of a multi-node run lives,
    and forked children (tokenizer workers) do not inherit them. Where fcntl is missing (Windows)
    there is no lock. A second process stops at once with UserError naming the owner.
    """

    def __init__(self, directory, what="run"):
        self.directory, self.what = directory, what
        self.path = os.path.join(directory, ".lock")
        self.fd = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES: another process holds it
            owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.directory} is in use by another {self.what} ({owner}); wait for it to end, "
                            f"or use another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock; the file stays (harmless)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# -----------------------------------------------------------------------------
# The dtype a device computes in


def resolve_dtype(dtype, device):
    """The name of the dtype to autocast to on `device` ("float32": no autocast). 'auto' picks:
    bfloat16 on CUDA GPUs of compute capability 8.0 and up (Ampere on: A100, L4, H100), float16 on
    older ones (T4, V100: no bf16 compute; training adds a gradient scaler), and float32 on MPS and
    CPU (bf16 autocast is slow on CPUs without bf16 instructions, and unreliable on MPS). Other
    names are returned as given. train_gpt2.py, hellaswag.py and bench.py all pick this way."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        import torch  # here, not at the top: scripts without torch (fineweb.py) import this file too
        return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
    return "float32"


def autocast_dtype_for(dtype, device):
    """resolve_dtype's pick as the torch dtype to give torch.autocast, or None for float32 (no autocast)."""
    import torch
    name = resolve_dtype(dtype, device)
    return None if name == "float32" else getattr(torch, name)
