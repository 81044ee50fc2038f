"""common.py: settings as flags (and TOML), durations, files written whole, the directory lock, the device and
its dtype, peak FLOP/s, the ranks' agreement on errors, and the signals that stop a launch.

Every expectation is a literal or a plain recomputation: tomllib reads what write_settings wrote, a second
Python process tries the lock, NVIDIA's datasheet figures are written out, and two real gloo ranks agree.
"""

import argparse
import os
import platform
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, replace

import pytest
import torch

import common
from common import (
    AllRanks,
    Launch,
    OnOffOrAuto,
    UserError,
    agree,
    all_reduce_sum,
    atomic_write,
    autocast_and_scaler,
    autocast_dtype_for,
    compile_by_default,
    directory_lock,
    duration,
    int_or_auto,
    memory_budget,
    parse_settings,
    peak_flops_of,
    pick_device,
    print0,
    resolve_dtype,
    setting,
    start_distributed,
    synchronize,
    write_settings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_error_defaults_to_a_run_time_error_every_rank_met():
    error = UserError("no data")
    assert (str(error), error.exit_code, error.every_rank, error.reported) == ("no data", 1, True, False)
    error = UserError("bad flag", exit_code=2, every_rank=False, reported=True)
    assert (error.exit_code, error.every_rank, error.reported) == (2, False, True)


# -----------------------------------------------------------------------------
# Settings: a dataclass of setting()s -> flags, a TOML file, problems


@dataclass
class Settings:
    name: str = setting("run", "a string")
    steps: int = setting(10, "an int")
    lr: float = setting(6e-4, "a float")
    limit: int = setting(None, "an int, unset by default")
    ratio: float = setting(None, "a float, unset by default")
    label: str = setting(None, "a string, unset by default")
    shuffle: bool = setting(True, "a bool that is on by default")
    overwrite: bool = setting(False, "a switch", action="store_true")
    sizes: list = setting(None, "a list", nargs="+", type=int)
    time_limit: int = setting(0, "a duration", type=duration)
    batch: int | str = setting("auto", "a number or auto", type=int_or_auto)
    compile: bool | str = setting("auto", "on, off or auto", action=OnOffOrAuto)
    model: str = setting("gpt2", "a choice with a short flag", flags=("-m", "--model"), choices=["gpt2", "gpt2-xl"])
    path: str = setting(None, "a positional argument", positional=True, nargs="?")

    def problems(self):
        return [f"{k}={getattr(self, k)} must be positive" for k in ("steps", "lr") if getattr(self, k) <= 0]


def parse(*argv, **kwargs):
    return parse_settings(Settings, [str(a) for a in argv], **kwargs)


def test_no_flags_give_the_defaults():
    assert parse() == Settings()


def test_flags_of_every_kind():
    config = parse(
        *"--name x --steps 5 --lr 1e-3 --limit 7 --ratio 0.5 --label y --no-shuffle --overwrite --sizes 1 2 "
        "--time-limit 1h30m --batch 16 --no-compile -m gpt2-xl ckpt.pt".split()
    )
    assert config == Settings(
        name="x",
        steps=5,
        lr=1e-3,
        limit=7,
        ratio=0.5,
        label="y",
        shuffle=False,
        overwrite=True,
        sizes=[1, 2],
        time_limit=5400,
        batch=16,
        compile=False,
        model="gpt2-xl",
        path="ckpt.pt",
    )
    # the types, not just equal values (5.0 == 5)
    types = [type(getattr(config, k)) for k in ("steps", "lr", "limit", "ratio", "batch")]
    assert types == [int, float, int, float, int]
    assert parse("--shuffle", "--model", "gpt2").shuffle is True


def test_on_off_or_auto():
    assert parse("--compile").compile is True
    assert parse("--no-compile").compile is False
    assert parse("--compile", "auto").compile == "auto"
    with pytest.raises(UserError, match="--no-compile takes no value") as error:
        parse("--no-compile", "auto")
    assert error.value.exit_code == 2


def test_int_or_auto():
    assert int_or_auto("auto") == "auto"
    assert type(int_or_auto("32")) is int and int_or_auto("32") == 32
    with pytest.raises(ValueError):
        int_or_auto("many")


def test_argv_none_reads_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog.py", "--steps", "7"])
    assert parse_settings(Settings) == Settings(steps=7)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "many"], "argument --steps: invalid int value: 'many' (see --help)"),
        (["--nope"], "unrecognized arguments: --nope (see --help)"),
        (["--model", "gpt5"], "argument -m/--model: invalid choice: 'gpt5'"),
    ],
)
def test_argparse_errors_are_settings_errors(argv, message):
    with pytest.raises(UserError) as error:
        parse(*argv)
    assert message in str(error.value) and error.value.exit_code == 2


def test_every_problem_in_one_error():
    with pytest.raises(UserError) as error:
        parse("--steps", "0", "--lr", "-1")
    assert str(error.value) == "invalid settings: steps=0 must be positive; lr=-1.0 must be positive"
    assert error.value.exit_code == 2


def test_help_states_the_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside "(default: ...)"
    with pytest.raises(SystemExit) as exit:
        parse("--help")
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    assert "an int (default: 10)" in help_text and "a float (default: 0.0006)" in help_text
    assert "(default: None)" not in help_text  # unset settings say nothing


def test_a_preset_changes_defaults_and_flags_still_win():
    def preset(given):
        return {"steps": 100, "lr": 0.5} if given.get("name") == "demo" else {}

    assert parse("--name", "demo", "--steps", "5", defaults=preset) == Settings(name="demo", steps=5, lr=0.5)
    assert parse("--steps", "5", defaults=preset) == Settings(steps=5)


def write_toml(tmp_path, text, name="settings.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_config_file_gives_every_kind_of_value_and_flags_win(tmp_path):
    path = write_toml(
        tmp_path,
        """
        name = "from file"
        steps = 3
        lr = 1e-3
        ratio = 0.25
        shuffle = false
        overwrite = true
        sizes = [4, 5, 6]
        time_limit = "2h"
        batch = 8
        compile = false
        model = "gpt2-xl"
        """,
    )
    expected = Settings(
        name="from file",
        steps=3,
        lr=1e-3,
        ratio=0.25,
        shuffle=False,
        overwrite=True,
        sizes=[4, 5, 6],
        time_limit=7200,
        batch=8,
        compile=False,
        model="gpt2-xl",
    )
    assert parse("--config", path) == expected
    assert parse("--steps", "9", "--config", path, "--shuffle", "--compile", "auto") == replace(
        expected, steps=9, shuffle=True, compile="auto"
    )
    # a switch turned off in the file stays off (store_true has no --no- flag)
    assert parse("--config", write_toml(tmp_path, "overwrite = false\n", "off.toml")) == Settings()


def test_a_config_file_with_unknown_settings(tmp_path):
    path = write_toml(tmp_path, "steps = 3\nstepz = 4\nlearning_rate = 0.1\n")
    with pytest.raises(UserError) as error:
        parse("--config", path)
    assert str(error.value) == f"--config {path}: unknown setting(s) learning_rate, stepz; see --help"
    assert error.value.exit_code == 2


@pytest.mark.parametrize("text", [None, "steps = \n", "steps = 3\nsteps = 4\n"])
def test_a_config_file_that_cannot_be_read(tmp_path, text):
    path = tmp_path / "settings.toml" if text is None else write_toml(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(f"cannot read --config {path} (")) as error:
        parse("--config", path)
    assert error.value.exit_code == 2


def test_a_config_file_with_a_bad_value_lists_the_problems(tmp_path):
    path = write_toml(tmp_path, "steps = 0\nlr = 0.0\n")
    with pytest.raises(UserError, match="^invalid settings: steps=0 must be positive; lr=0.0 must be positive$"):
        parse("--config", path)


def test_write_settings_writes_toml_that_config_reads_back(tmp_path):
    config = Settings(
        name='a "quoted" name',
        steps=3,
        lr=1.5e-4,
        ratio=0.5,
        shuffle=False,
        overwrite=True,
        sizes=[1, 2],
        time_limit=3600,
        batch=4,
        compile=False,
        model="gpt2-xl",
    )
    path = tmp_path / "config.toml"
    write_settings(config, path, leave_out=("overwrite",))
    with open(path, "rb") as f:
        written = tomllib.load(f)
    # None (not set) and the left-out setting are not written; everything else is, with its type
    assert written == {
        "name": 'a "quoted" name',
        "steps": 3,
        "lr": 1.5e-4,
        "ratio": 0.5,
        "shuffle": False,
        "sizes": [1, 2],
        "time_limit": 3600,
        "batch": 4,
        "compile": False,
        "model": "gpt2-xl",
    }
    assert parse("--config", path) == replace(config, overwrite=False)
    assert [name for name in os.listdir(tmp_path)] == ["config.toml"]  # written whole, no temporary left
    write_settings(Settings(), path)
    assert parse("--config", path) == Settings()


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("3h50m", 13800),
        ("90m", 5400),
        ("45s", 45),
        ("600", 600),
        ("1h", 3600),
        ("2h5s", 7205),
        ("1m30s", 90),
        (" 90m ", 5400),
        ("0", 0),
    ],
)
def test_duration(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", " ", "3x", "h", "1.5h", "-5", "5mm", "30s5m", "1d"])
def test_duration_refuses_what_is_not_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration such as 3h50m, 90m or 600"):
        duration(text)


# -----------------------------------------------------------------------------
# Files written whole: atomic_write


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    seen = []

    def write(f):
        f.write(b"new ")
        f.write(b"contents")
        seen.append((path.read_bytes(), sorted(os.listdir(tmp_path))))

    atomic_write(str(path), write)
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["out.bin"]  # nothing left beside it
    # While it wrote, the old file was whole and the new one was a hidden temporary beside it, named so that
    # claim_log_dir's clean-up (".*.tmp") finds it and two processes never share one.
    ((old, names),) = seen
    assert old == b"old" and len(names) == 2 and "out.bin" in names
    temporary = next(n for n in names if n != "out.bin")
    assert temporary.startswith(".out.bin.") and temporary.endswith(".tmp")
    assert f".{socket.gethostname()}." in temporary and f".{os.getpid()}." in temporary
    # The user's umask, as any file a program writes.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), write)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_of_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write("relative.txt", lambda f: f.write(b"here"))
    assert (tmp_path / "relative.txt").read_bytes() == b"here" and os.listdir(tmp_path) == ["relative.txt"]


def test_atomic_write_syncs_the_file_then_renames_then_syncs_the_directory(tmp_path, monkeypatch):
    """What survives a power loss cannot be tested by writing: the order of the system calls says it."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace_file(source, destination):
        calls.append(("replace", os.path.basename(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace_file)
    atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(b"12345"))
    assert [c[0] for c in calls] == ["fsync file", "replace", "fsync dir"]
    assert calls[0][1] == 5 and calls[1][1] == "out.bin"  # the file was synced with its contents in it


# -----------------------------------------------------------------------------
# One process per directory: directory_lock


def test_directory_lock_excludes_a_second_process_and_names_its_owner(tmp_path, lock_in_another_process):
    directory = tmp_path / "new" / "log"  # made if missing
    (tmp_path / "new").mkdir()
    with directory_lock(str(directory), "test run"):
        # (Not read here: closing any descriptor of the file drops this process's fcntl lock on it.)
        assert lock_in_another_process(directory) == (
            f"refused: {directory} is in use by another test run (pid {os.getpid()} on "
            f"{socket.gethostname()}); wait for it to end, or use another directory "
            f"(exit code 1)"
        )
    assert lock_in_another_process(directory) == "locked"  # released at the end of the block
    assert (directory / ".lock").exists()  # the file stays: removing it would let two processes lock two files


def test_directory_lock_is_released_when_its_process_dies(tmp_path, lock_in_another_process):
    assert lock_in_another_process(tmp_path, hold=True) == "locked"
    with directory_lock(str(tmp_path), "test run"):
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_directory_lock_replaces_a_longer_stale_owner(tmp_path):
    (tmp_path / ".lock").write_text("pid 123456789 on a-host-with-a-very-long-name.example.org\nmore\n")
    with directory_lock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


# -----------------------------------------------------------------------------
# The device and its dtype


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that says it has CUDA GPUs (none is touched): set_device's calls are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return current


def test_pick_device_on_a_cpu_machine(no_gpu):
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="^--device cuda: no such device on this machine; use --device auto$") as e:
        pick_device("cuda")
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="^--device gpu is not a device; use auto, cpu, cuda") as e:
        pick_device("gpu")
    assert e.value.exit_code == 2


def test_pick_device_prefers_mps_to_cpu(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")


def test_pick_device_cuda_is_the_local_ranks_gpu(fake_cuda, monkeypatch):
    assert pick_device("auto") == torch.device("cuda") and fake_cuda == [0]
    assert pick_device("cuda:1") == torch.device("cuda", 1) and fake_cuda == [0, 1]
    monkeypatch.setenv("RANK", "5")  # the 6th process of the job, the 2nd on its node
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1) and fake_cuda == [0, 1, 1]


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((8, 9), "bfloat16"), ((7, 5), "float16"), ((7, 0), "float16")],
)
def test_auto_dtype_on_cuda_depends_on_the_gpu(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert resolve_dtype("auto", cuda) == expected
    assert autocast_dtype_for("auto", cuda) == getattr(torch, expected)
    assert resolve_dtype("float32", cuda) == "float32" and autocast_dtype_for("float32", cuda) is None


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_dtype_is_float32_off_cuda(device):
    assert resolve_dtype("auto", torch.device(device)) == "float32"
    assert autocast_dtype_for("auto", torch.device(device)) is None
    assert resolve_dtype("bfloat16", torch.device(device)) == "bfloat16"
    assert autocast_dtype_for("float16", torch.device(device)) == torch.float16


@pytest.mark.parametrize(
    "dtype, expected, scaled",
    [
        ("float32", None, False),
        ("auto", None, False),
        ("bfloat16", torch.bfloat16, False),
        ("float16", torch.float16, True),
    ],
)
def test_autocast_and_scaler(dtype, expected, scaled):
    cpu = torch.device("cpu")
    autocast, scaler = autocast_and_scaler(dtype, cpu)
    assert isinstance(scaler, torch.amp.GradScaler) if scaled else scaler is None
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with autocast:
        product = a @ b
    assert product.dtype == (expected or torch.float32)
    synchronize(cpu)  # nothing to wait for on a CPU, and no error


def test_compile_by_default_needs_cuda_triton_and_not_windows(monkeypatch):
    import torch.utils._triton

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert compile_by_default(cuda) is True
    assert compile_by_default(torch.device("cpu")) is False
    assert compile_by_default(torch.device("mps")) is False
    monkeypatch.setattr(platform, "system", lambda: "Windows")
    assert compile_by_default(cuda) is False
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert compile_by_default(cuda) is False


def fake_files(monkeypatch, files):
    """common.py's open() sees these contents; any other path does not exist."""
    import io

    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(common, "open", fake_open, raising=False)


MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"


def test_memory_budget_is_half_the_available_memory_shared_by_the_processes(monkeypatch):
    fake_files(monkeypatch, {"/proc/meminfo": MEMINFO})
    assert memory_budget(1) == 8000000 * 1024 // 2
    assert memory_budget(4) == 8000000 * 1024 // 2 // 4
    # a cgroup limit below it wins: the limit less what the cgroup uses
    fake_files(
        monkeypatch,
        {
            "/proc/meminfo": MEMINFO,
            "/sys/fs/cgroup/memory.max": "3000000000\n",
            "/sys/fs/cgroup/memory.current": "1000000000\n",
        },
    )
    assert memory_budget(2) == (3000000000 - 1000000000) // 2 // 2
    fake_files(
        monkeypatch,
        {
            "/proc/meminfo": MEMINFO,
            "/sys/fs/cgroup/memory.max": "max\n",
            "/sys/fs/cgroup/memory.current": "1000000000\n",
        },
    )
    assert memory_budget(1) == 8000000 * 1024 // 2
    # no /proc/meminfo: half the RAM
    fake_files(monkeypatch, {})
    monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000000}.get)
    assert memory_budget(1) == 4096 * 1000000 // 2 // 2


# NVIDIA's datasheets, dense (no sparsity): (float32 as TF32, float16, bfloat16), under the names
# torch.cuda.get_device_name gives.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (494.5e12, 989e12, 989e12),
    "NVIDIA H100 PCIe": (378e12, 756e12, 756e12),
    "NVIDIA H100 NVL": (417.5e12, 835e12, 835e12),
    "NVIDIA H200": (494.5e12, 989e12, 989e12),
    "NVIDIA H200 NVL": (417.5e12, 835e12, 835e12),
    "NVIDIA H800": (494.5e12, 989e12, 989e12),
    "NVIDIA H800 PCIe": (378e12, 756e12, 756e12),
    "NVIDIA A100-SXM4-80GB": (156e12, 312e12, 312e12),
    "NVIDIA A100-PCIE-40GB": (156e12, 312e12, 312e12),
    "NVIDIA A800-SXM4-80GB": (156e12, 312e12, 312e12),
    "NVIDIA L40S": (183e12, 362e12, 362e12),
    "NVIDIA L40": (90.5e12, 181e12, 181e12),
    "NVIDIA L4": (60e12, 121e12, 121e12),
    "Tesla V100-SXM2-16GB": (15.7e12, 125e12, None),
    "Tesla V100-PCIE-32GB": (14e12, 112e12, None),
    "Tesla V100S-PCIE-32GB": (16.4e12, 130e12, None),
    "Tesla T4": (8.1e12, 65e12, None),
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb": (None, None, None),  # a slice: the whole GPU's peak would be wrong
    "NVIDIA GeForce RTX 4090": (None, None, None),  # not in the table: no MFU rather than a wrong one
}


@pytest.mark.parametrize("name", DATASHEET)
def test_peak_flops_of_a_gpu(name):
    assert tuple(peak_flops_of(name, dtype) for dtype in ("float32", "float16", "bfloat16")) == DATASHEET[name]


# -----------------------------------------------------------------------------
# Ranks: in one process, and two gloo ranks


def test_one_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert start_distributed() == (0, 1)
    assert agree() == [None] and agree(value=5) == [5]
    error = UserError("missing file", exit_code=2)
    with pytest.raises(UserError) as raised:
        agree(error)
    assert raised.value is error
    with AllRanks() as block:
        block.value = "mine"
    assert block.values == ["mine"]
    with AllRanks() as block:
        pass
    assert block.values == [None]
    with pytest.raises(UserError, match="^no data$"), AllRanks():
        raise UserError("no data")
    tensor = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]


def test_print0_prints_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    print0("alone", 1)
    monkeypatch.setenv("RANK", "0")
    print0("rank zero")
    monkeypatch.setenv("RANK", "2")  # the first process of a second node: LOCAL_RANK 0, but not rank 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    print0("rank two")
    assert capsys.readouterr().out == "alone 1\nrank zero\n"


RANKS_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
from common import AllRanks, UserError, all_reduce_sum, start_distributed

# Start together (imports take seconds): the short timeout below also bounds the rendezvous.
open(os.path.join({tmp!r}, "ready" + os.environ["RANK"]), "w").close()
deadline = time.monotonic() + 60
while len([n for n in os.listdir({tmp!r}) if n.startswith("ready")]) < 3 and time.monotonic() < deadline:
    time.sleep(0.02)
rank, world_size = start_distributed(timeout=5)
print("ranks", rank, world_size, flush=True)
with AllRanks() as block:
    block.value = 10 * rank
print("values", block.values, flush=True)
print("sum", all_reduce_sum(torch.tensor([rank + 1.0])).item(), flush=True)
for error in [UserError("only on rank 1", exit_code=2) if rank == 1 else None,
              UserError("on ranks 0 and 2") if rank != 1 else None,
              UserError("on every rank", exit_code=2),
              UserError(f"rank {{rank}}'s own")]:
    try:
        with AllRanks(prefix="oops: "):
            if error is not None:
                raise error
        print("no error", flush=True)
    except UserError as e:
        print("raised", str(e), e.exit_code, e.reported, flush=True)
# A rank that stops taking part: the others fail after the timeout, not hang.
if rank == 0:
    try:
        all_reduce_sum(torch.ones(1))
    except RuntimeError as e:
        print("lost", "timed out" in str(e).lower(), flush=True)
    os._exit(0)  # no clean-up that could wait for the others
else:
    time.sleep(120)
"""


@pytest.mark.multiprocess
def test_ranks_agree_on_values_and_errors(tmp_path):
    world_size = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(root=ROOT, tmp=str(tmp_path)))
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",  # gloo on CPUs, also on a machine with fewer GPUs than ranks
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        out0, err0 = processes[0].communicate(timeout=90)
    finally:
        for process in processes[1:]:
            process.kill()
    outputs = [(out0, err0)] + [process.communicate(timeout=30) for process in processes[1:]]
    common_lines = [
        "values [0, 10, 20]",
        "sum 6.0",
        "raised reported 2 True",
        "raised reported 1 True",
        "raised reported 2 True",
        "raised reported 1 True",
    ]
    for rank, (out, err) in enumerate(outputs):
        assert out.splitlines()[:7] == [f"ranks {rank} {world_size}"] + common_lines, (out, err)
    assert out0.splitlines()[7:] == ["lost True"]
    # Rank 0 prints each message once, with the ranks that met it unless every rank did; the others print none.
    errors = [line for line in err0.splitlines() if line.startswith("oops: ")]
    assert errors == [
        "oops: rank 1: only on rank 1",
        "oops: ranks 0, 2: on ranks 0 and 2",
        "oops: on every rank",
        "oops: rank 0: rank 0's own",
        "oops: rank 1: rank 1's own",
        "oops: rank 2: rank 2's own",
    ]
    for _, err in outputs[1:]:
        assert "oops" not in err


# -----------------------------------------------------------------------------
# Launch: the signals that end a run after this step


def test_a_signal_asks_the_launch_to_stop_and_the_handlers_are_put_back(monkeypatch, capfd):
    monkeypatch.delenv("RANK", raising=False)
    numbers = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = [signal.getsignal(n) for n in numbers]
    with Launch() as launch:
        assert launch.signal is None
        # a handler of its own for each (SIGUSR1 unhandled would end this test process)
        assert all(callable(signal.getsignal(n)) and signal.getsignal(n) != old for n, old in zip(numbers, before))
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before its time limit
        assert launch.signal == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("a Ctrl-C after another signal quit at once")
        assert launch.signal == signal.SIGUSR1
    assert [signal.getsignal(n) for n in numbers] == before
    assert capfd.readouterr().err == "SIGUSR1: stopping after this step, with a checkpoint\n"
    with pytest.raises(KeyboardInterrupt), Launch() as launch:
        os.kill(os.getpid(), signal.SIGINT)
        assert launch.signal == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C quits at once
    assert [signal.getsignal(n) for n in numbers] == before
    assert capfd.readouterr().err == (
        "SIGINT: stopping after this step, with a checkpoint (Ctrl-C again to quit at once)\n"
    )


def test_only_rank_0_says_it_stops(monkeypatch, capfd):
    monkeypatch.setenv("RANK", "1")
    with Launch() as launch:
        os.kill(os.getpid(), signal.SIGTERM)
        assert launch.signal == signal.SIGTERM
    assert capfd.readouterr().err == ""
