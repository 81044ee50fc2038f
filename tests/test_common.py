"""common.py: settings as flags (and TOML), their rules, durations, files written whole, the directory lock, the
device and its dtype, peak FLOP/s, and the ranks' agreement on errors.

Every expectation is a literal or a plain recomputation: tomllib reads what write_settings wrote, argparse's help is
read back line by line, a second Python process tries the lock, NVIDIA's datasheet figures are written out, and two
real gloo ranks agree (a job of three is played in this process, torch.distributed answered as a real job answers).
"""

import argparse
import contextlib
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, fields, replace

import pytest
import torch

from common import (
    RULES,
    UserError,
    agree,
    atomic_write,
    autocast_and_scaler,
    autocast_dtype_for,
    compile_by_default,
    config_file_flags,
    directory_lock,
    duration,
    parse_settings,
    peak_flops_of,
    pick_device,
    print0,
    problems_of,
    resolve_dtype,
    setting,
    write_settings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_error_defaults_to_a_run_time_error_not_yet_reported():
    error = UserError("no data")
    assert (str(error), error.exit_code, error.reported) == ("no data", 1, False)
    error = UserError("bad flag", exit_code=2, reported=True)
    assert (error.exit_code, error.reported) == (2, True)


@contextlib.contextmanager
def umask(mask):
    """The process's umask set to `mask` for the block (files a program makes get 0o666 & ~mask)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -----------------------------------------------------------------------------
# Settings: a dataclass of setting()s -> flags, sections, rules, a TOML file, a preset


@dataclass
class Settings:
    name: str = setting("run", "a string", section="names")
    label: str = setting(None, "a string, unset by default")
    model: str = setting("gpt2", "a choice with a short flag", flags=("-m", "--model"), choices=["gpt2", "gpt2-xl"])
    steps: int = setting(10, "an int", must="be positive", section="numbers")
    lr: float = setting(6e-4, "a float", must="be positive")
    limit: int = setting(None, "an int, unset by default", must="not be negative")
    ratio: float = setting(None, "a float, unset by default", must="be in [0, 1)")
    offset: int = setting(0, "an int of any sign")
    scale: float = setting(1.0, "a float of any sign")
    sizes: list = setting(None, "a list", nargs="+", type=int)
    time_limit: int = setting(0, "a duration", type=duration)
    shuffle: bool = setting(True, "a bool that is on by default", section="switches")
    overwrite: bool = setting(False, "a switch", action="store_true")
    compile: bool = setting(None, "a bool whose default, None, means: decide later")
    path: str = setting(None, "a positional argument", positional=True, nargs="?")

    def problems(self):  # a check of settings taken together
        return [f"limit={self.limit} is over steps={self.steps}"] if (self.limit or 0) > self.steps else []


def parse(*argv, **kwargs):
    return parse_settings(Settings, [str(a) for a in argv], **kwargs)


def test_setting_is_a_dataclass_field_whose_metadata_is_the_flag():
    (field,) = [f for f in fields(Settings) if f.name == "ratio"]
    assert field.default is None
    assert dict(field.metadata) == {"help": "a float, unset by default", "must": "be in [0, 1)", "section": None}
    (field,) = [f for f in fields(Settings) if f.name == "model"]
    assert dict(field.metadata) == {
        "help": "a choice with a short flag",
        "must": None,
        "section": None,
        "flags": ("-m", "--model"),
        "choices": ["gpt2", "gpt2-xl"],
    }


def test_no_flags_give_the_defaults():
    assert parse() == Settings()
    assert Settings().compile is None  # not False: "decide later" stays distinguishable


def test_flags_of_every_kind():
    config = parse(
        *"--name x --label y --steps 5 --lr 1e-3 --limit 4 --ratio 0.5 --offset -3 --scale -2.5 --sizes 1 2 "
        "--time-limit 1h30m --no-shuffle --overwrite --compile -m gpt2-xl ckpt.pt".split()
    )
    assert config == Settings(
        name="x",
        label="y",
        model="gpt2-xl",
        steps=5,
        lr=1e-3,
        limit=4,
        ratio=0.5,
        offset=-3,
        scale=-2.5,
        sizes=[1, 2],
        time_limit=5400,
        shuffle=False,
        overwrite=True,
        compile=True,
        path="ckpt.pt",
    )
    # the types, not just equal values (5.0 == 5); an unset setting takes its annotation's type
    types = [type(getattr(config, k)) for k in ("steps", "lr", "limit", "ratio", "offset", "scale", "label")]
    assert types == [int, float, int, float, int, float, str]
    assert parse("--no-compile").compile is False and parse("--shuffle", "--model", "gpt2").shuffle is True


def test_argv_none_reads_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog.py", "--steps", "7"])
    assert parse_settings(Settings) == Settings(steps=7)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "many"], "argument --steps: invalid int value: 'many' (see --help)"),
        (["--nope"], "unrecognized arguments: --nope (see --help)"),
        (["--model", "gpt5"], "argument -m/--model: invalid choice: 'gpt5'"),
        (["--time-limit", "1h30"], "argument --time-limit: '1h30' is not a duration such as 3h50m, 90m, 45s or 600"),
        (["--no-compile=yes"], "ignored explicit argument 'yes'"),
    ],
)
def test_argparse_errors_are_settings_errors(argv, message):
    with pytest.raises(UserError) as error:
        parse(*argv)
    assert message in str(error.value) and error.value.exit_code == 2


def test_problems_of_checks_each_rule_and_that_floats_are_finite():
    assert set(RULES) == {"be positive", "not be negative", "be in [0, 1)"}
    # each rule's edges, accepted
    assert problems_of(Settings(steps=1, lr=1e-12, limit=0, ratio=0.0)) == []
    assert problems_of(Settings(limit=10, ratio=0.999)) == []
    assert problems_of(Settings(limit=None, ratio=None)) == []  # None, "not set", is no value to check
    # and just past them, refused in the order of the fields, then what problems() finds
    assert problems_of(Settings(steps=0, lr=-1e-12, limit=-1, ratio=1.0)) == [
        "steps=0 must be positive",
        "lr=-1e-12 must be positive",
        "limit=-1 must not be negative",
        "ratio=1.0 must be in [0, 1)",
    ]
    assert problems_of(Settings(ratio=-0.5, limit=11)) == ["ratio=-0.5 must be in [0, 1)", "limit=11 is over steps=10"]
    # a float that is not finite: one problem, whatever its rule (nan passes no comparison, inf passes some)
    assert problems_of(Settings(lr=float("nan"), ratio=float("-inf"), scale=float("inf"))) == [
        "lr=nan must be a finite number",
        "ratio=-inf must be a finite number",
        "scale=inf must be a finite number",
    ]


def test_every_problem_in_one_error():
    with pytest.raises(UserError) as error:
        parse("--steps", "0", "--lr", "nan", "--limit", "3")
    assert str(error.value) == (
        "invalid settings: steps=0 must be positive; lr=nan must be a finite number; limit=3 is over steps=0"
    )
    assert error.value.exit_code == 2
    with pytest.raises(UserError, match=r"^invalid settings: scale=-inf must be a finite number$"):
        parse("--scale=-inf")


def help_sections(monkeypatch, capsys):
    """--help as {heading: [the first flag of each of its settings]}."""
    monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside "(default: ...)"
    with pytest.raises(SystemExit) as exit:
        parse("--help")
    assert exit.value.code == 0
    text, sections, heading = capsys.readouterr().out, {}, None
    for line in text.splitlines():
        if re.fullmatch(r"\S.*:", line):
            heading = line[:-1]
            sections[heading] = []
        elif heading and (option := re.match(r"  (-[\w-]+|\w+)", line)):
            sections[heading].append(option[1])
    return text, sections


def test_help_is_grouped_by_section_and_states_the_defaults(monkeypatch, capsys):
    text, sections = help_sections(monkeypatch, capsys)
    # a setting with a section starts it; the settings after it, without one, are in it too
    assert sections == {
        "options": ["-h", "--config"],
        "names": ["--name", "--label", "-m"],
        "numbers": ["--steps", "--lr", "--limit", "--ratio", "--offset", "--scale", "--sizes", "--time-limit"],
        "switches": ["--shuffle", "--overwrite", "--compile", "path"],
    }
    assert "an int (default: 10)" in text and "a float (default: 0.0006)" in text and "(default: True)" in text
    assert "  --compile, --no-compile\n" in text  # the plain on/off form
    assert "default: None" not in text and "SUPPRESS" not in text  # unset settings say nothing


def test_a_preset_gives_defaults_of_its_own_and_a_config_file_and_flags_win(tmp_path):
    seen = []

    def preset(given):
        seen.append(given)
        return ["--steps=100", "--lr=0.5", "--sizes", "3", "4"] if given.get("name") == "demo" else []

    assert parse("--name", "demo", preset=preset) == Settings(name="demo", steps=100, lr=0.5, sizes=[3, 4])
    assert seen == [{"name": "demo"}]  # what the command line gave, nothing else
    assert parse("--name", "demo", "--steps", "5", preset=preset) == Settings(
        name="demo", steps=5, lr=0.5, sizes=[3, 4]
    )
    path = write_toml(tmp_path, "steps = 7\nsizes = [9]\n")
    from_file = parse("--name", "demo", "--config", path, preset=preset)
    assert from_file == Settings(name="demo", steps=7, lr=0.5, sizes=[9])
    assert parse("--steps", "8", "--name", "demo", "--config", path, preset=preset).steps == 8
    assert parse("--steps", "5", preset=preset) == Settings(steps=5)
    with pytest.raises(UserError, match=r"^invalid settings: steps=0 must be positive$"):
        parse("--name", "demo", preset=lambda given: ["--steps=0"])


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
        offset = -4
        shuffle = false
        overwrite = true
        compile = false
        sizes = [4, 5, 6]
        time_limit = "2h"
        model = "gpt2-xl"
        """,
    )
    expected = Settings(
        name="from file",
        steps=3,
        lr=1e-3,
        ratio=0.25,
        offset=-4,
        shuffle=False,
        overwrite=True,
        compile=False,
        sizes=[4, 5, 6],
        time_limit=7200,
        model="gpt2-xl",
    )
    assert parse("--config", path) == expected
    assert parse("--steps", "9", "--config", path, "--shuffle", "--compile") == replace(
        expected, steps=9, shuffle=True, compile=True
    )
    # a switch turned off in the file stays off (store_true has no --no- flag)
    assert parse("--config", write_toml(tmp_path, "overwrite = false\n", "off.toml")) == Settings()


def test_config_file_flags_gives_each_value_as_one_argument(tmp_path):
    path = write_toml(tmp_path, 'name = "-x"\noffset = -2\nsizes = [1, 2]\nshuffle = false\noverwrite = true\n')
    flags = config_file_flags(path, Settings)
    assert flags == ["--name=-x", "--offset=-2", "--sizes", "1", "2", "--no-shuffle", "--overwrite"]
    assert config_file_flags(write_toml(tmp_path, "overwrite = false\n", "off.toml"), Settings) == []


def test_a_config_file_with_unknown_settings(tmp_path):
    path = write_toml(tmp_path, "steps = 3\nstepz = 4\nlearning_rate = 0.1\n")
    with pytest.raises(UserError) as error:
        parse("--config", path)
    assert str(error.value) == f"--config {path}: unknown setting(s) learning_rate, stepz; see --help"
    assert error.value.exit_code == 2


@pytest.mark.parametrize("text", [None, "steps = \n", "steps = 3\nsteps = 4\n", b'name = "caf\xe9"\n', b"\xff\xfe"])
def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, text):
    path = tmp_path / "settings.toml"
    if isinstance(text, bytes):  # Latin-1 and UTF-16 text, not UTF-8
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as error:
        parse("--config", path)
    message = str(error.value)
    assert message.startswith(f"cannot read --config {path} (") and "\n" not in message
    assert message.endswith("); give a TOML file of settings") and error.value.exit_code == 2


def test_a_config_file_with_a_bad_value_lists_the_problems(tmp_path):
    path = write_toml(tmp_path, "steps = 0\nlr = 0.0\n")
    with pytest.raises(UserError, match=r"^invalid settings: steps=0 must be positive; lr=0.0 must be positive$"):
        parse("--config", path)


def test_write_settings_writes_toml_that_config_reads_back(tmp_path):
    config = Settings(
        name='a "quoted" name',
        steps=3,
        lr=1.5e-4,
        ratio=0.5,
        shuffle=False,
        overwrite=True,
        compile=False,
        sizes=[1, 2],
        time_limit=3600,
        model="gpt2-xl",
    )
    path = tmp_path / "config.toml"
    with umask(0o002):
        write_settings(config, path, leave_out=("overwrite",))
    assert mode(path) == 0o664  # the user's umask, as any file a program writes
    with open(path, "rb") as f:
        written = tomllib.load(f)
    # None (not set) and the left-out setting are not written; everything else is, with its type
    assert written == {
        "name": 'a "quoted" name',
        "model": "gpt2-xl",
        "steps": 3,
        "lr": 1.5e-4,
        "ratio": 0.5,
        "offset": 0,
        "scale": 1.0,
        "sizes": [1, 2],
        "time_limit": 3600,
        "shuffle": False,
        "compile": False,
    }
    assert parse("--config", path) == replace(config, overwrite=False)
    assert os.listdir(tmp_path) == ["config.toml"]  # written whole, no temporary left
    write_settings(Settings(), path)
    assert parse("--config", path) == Settings()


# Strings a user may give: options' look-alikes, nothing, unicode beyond the BMP, DEL, control characters, quotes
STRINGS = [
    "-x",
    "--steps=3",
    "--name",  # (not "--" alone: Python 3.11's argparse reads `--name=--` as [], on the command line too)
    "-",
    "",
    " padded ",
    "=",
    "née 中文 𝄞 😀",
    "\x7f",
    "tab\tnew\nline\r\x1b[31m\x00\x01\x1f",
    'quote " backslash \\ end\\',
    "'single' # not a comment",
    "[1, 2]",
    "5",
    "true",
]


@pytest.mark.parametrize("text", STRINGS, ids=[ascii(s) for s in STRINGS])
def test_every_string_written_reads_back_the_same(tmp_path, text):
    config = Settings(name=text, label=text)
    write_settings(config, tmp_path / "config.toml")
    assert parse("--config", tmp_path / "config.toml") == config


@pytest.mark.parametrize(
    "changes",
    [
        dict(lr=1e-08, scale=-1e-08),
        dict(lr=5e-324, scale=1e300),  # the smallest float and a huge one
        dict(lr=0.1 + 0.2, scale=-0.0),
        dict(steps=2**40, offset=-(2**40), limit=0),
        dict(sizes=[7], shuffle=False, compile=True, overwrite=True),
        dict(sizes=[3, 1, 2], shuffle=True, compile=False, time_limit=5400),
    ],
)
def test_every_value_written_reads_back_the_same(tmp_path, changes):
    config = Settings(**changes)
    write_settings(config, tmp_path / "config.toml")
    read = parse("--config", tmp_path / "config.toml")
    assert read == config
    assert [type(getattr(read, k)) for k in changes] == [type(v) for v in changes.values()]
    assert all(str(getattr(read, k)) == str(v) for k, v in changes.items())  # -0.0 stays -0.0


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("3h50m", 13800),
        ("1h30m", 5400),
        ("90m", 5400),
        ("45s", 45),
        ("600", 600),
        ("1h", 3600),
        ("2h5s", 7205),
        ("1m30s", 90),
        ("1h2m3s", 3723),
        (" 90m ", 5400),
        ("0", 0),
    ],
)
def test_duration(text, seconds):
    assert duration(text) == seconds and type(duration(text)) is int


@pytest.mark.parametrize("text", ["", " ", "3x", "h", "1.5h", "-5", "5mm", "30s5m", "1d", "1h30", "90 m", "m30"])
def test_duration_refuses_what_is_not_one(text):
    # '1h30' is neither 1 h 30 m nor 1 h 30 s: refused rather than guessed
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration such as 3h50m, 90m, 45s or 600"):
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

    with umask(0o002):
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
    assert mode(path) == 0o664  # the user's umask (0o002 here), as any file a program writes


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


@pytest.mark.parametrize("mask, expected", [(0o002, 0o664), (0o027, 0o640)])
def test_the_lock_file_gets_the_umasks_permissions(tmp_path, mask, expected):
    # A group sharing a log directory must be able to lock it too: not 0600 whatever the umask says.
    with umask(mask), directory_lock(str(tmp_path / "log")):
        pass
    assert mode(tmp_path / "log" / ".lock") == expected


# -----------------------------------------------------------------------------
# The device and its dtype


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_pick_device_on_a_cpu_machine(no_gpu):
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="^--device cuda: no such device on this machine; use --device auto$") as e:
        pick_device("cuda")
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="^--device mps: no such device on this machine; use --device auto$") as e:
        pick_device("mps")
    assert e.value.exit_code == 2
    with pytest.raises(UserError, match="^--device gpu is not a device; use auto, cpu, cuda, cuda:N or mps$") as e:
        pick_device("gpu")
    assert e.value.exit_code == 2


def test_pick_device_prefers_mps_to_cpu(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_prefers_cuda_and_leaves_the_gpu_to_the_script(monkeypatch):
    # Which GPU a torchrun process uses (cuda:LOCAL_RANK) is the script's DDP block's to say, not pick_device's.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("pick_device chose a GPU"))
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda") and pick_device("auto").index is None
    assert pick_device("cuda") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("mps") == torch.device("mps")


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


def test_compile_by_default_needs_cuda_triton_and_not_windows(monkeypatch):
    import torch.utils._triton

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(sys, "platform", "linux")
    assert compile_by_default(cuda) is True
    assert compile_by_default(torch.device("cpu")) is False
    assert compile_by_default(torch.device("mps")) is False
    monkeypatch.setattr(sys, "platform", "win32")
    assert compile_by_default(cuda) is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert compile_by_default(cuda) is False


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
# Ranks: one process, a job of three played here, and two real gloo ranks


def test_one_process_agrees_with_itself(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert agree() == [None] and agree(value=5) == [5] and agree(None, ("step", 3)) == [("step", 3)]
    error = UserError("missing file", exit_code=2)
    with pytest.raises(UserError) as raised:
        agree(error)
    assert raised.value is error  # not yet printed: main() prints it


def agree_on_ranks(monkeypatch, capsys, calls, prefix="error: "):
    """agree(error, value, prefix) on each rank of a job where rank r calls it with calls[r], played in this process:
    torch.distributed answers as in a real job (all_gather_object: every rank's object, in rank order), the objects
    taken from a first pass in which each rank only sends. -> per rank: (what agree returned, or the UserError it
    raised; what it printed to stderr before the barrier, or None if it did not wait at one; what it printed after)."""
    import torch.distributed as dist

    sent, current = [], {"rank": 0}

    class Sent(Exception):
        pass

    def send(outcomes, mine):
        sent.append(mine)
        raise Sent

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(calls))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: current["rank"])
    monkeypatch.setattr(dist, "all_gather_object", send)
    for rank, (error, value) in enumerate(calls):
        current["rank"] = rank
        with pytest.raises(Sent):
            agree(error, value, prefix)

    def gather(outcomes, mine):
        assert mine == sent[current["rank"]] and len(outcomes) == len(calls)
        outcomes[:] = sent

    barriers = []
    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(dist, "barrier", lambda group=None: barriers.append(capsys.readouterr().err))
    results = []
    for rank, (error, value) in enumerate(calls):
        current["rank"], barriers[:] = rank, []
        capsys.readouterr()
        try:
            outcome = agree(error, value, prefix)
        except UserError as e:
            outcome = e
        after = capsys.readouterr()
        assert after.out == "" and len(barriers) <= 1
        results.append((outcome, barriers[0] if barriers else None, after.err))
    return results


def test_ranks_share_their_values_when_none_failed(monkeypatch, capsys):
    results = agree_on_ranks(monkeypatch, capsys, [(None, ("s", 0)), (None, ("t", 1)), (None, None)])
    assert results == [([("s", 0), ("t", 1), None], None, "")] * 3  # no barrier: nothing to wait for


@pytest.mark.parametrize(
    "errors, exit_code, printed",
    [
        # one rank's error: named with its rank
        ([None, UserError("disk full"), None], 1, ["oops: rank 1: disk full"]),
        # the same error on two of three ranks: named once, with both
        ([UserError("no data", 2), None, UserError("no data", 2)], 2, ["oops: rank 0, 2: no data"]),
        # every rank's: once, no ranks named
        ([UserError("no data", 2)] * 3, 2, ["oops: no data"]),
        # each rank its own: each named, in rank order; the exit code is the first failing rank's
        (
            [None, UserError("b", 2), UserError("c"), UserError("b", 2)],
            2,
            ["oops: rank 1, 3: b", "oops: rank 2: c"],
        ),
        ([UserError("a"), UserError("b", 2)], 1, ["oops: rank 0: a", "oops: rank 1: b"]),
    ],
)
def test_an_error_on_any_rank_ends_every_rank_printed_once(monkeypatch, capsys, errors, exit_code, printed):
    results = agree_on_ranks(monkeypatch, capsys, [(error, rank) for rank, error in enumerate(errors)], "oops: ")
    for rank, (outcome, before_barrier, after) in enumerate(results):
        assert isinstance(outcome, UserError), rank
        assert (str(outcome), outcome.exit_code, outcome.reported) == ("reported", exit_code, True)
        # rank 0 prints, then every rank waits for it at a barrier (so none exits before the print), then raises
        expected = "".join(line + "\n" for line in printed) if rank == 0 else ""
        assert (before_barrier, after) == (expected, ""), rank


TWO_RANKS = """
import datetime, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from common import UserError, agree, print0

rank = int(sys.argv[1])
store = {store!r}
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
print("values", agree(value=("rank", rank)), flush=True)
for error in [UserError("only on rank 1", exit_code=2) if rank == 1 else None, UserError("on both")]:
    try:
        agree(error, value=rank, prefix="oops: ")
        print("no error", flush=True)
    except UserError as e:
        print("raised", e, e.exit_code, e.reported, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_two_gloo_ranks_agree(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(TWO_RANKS.format(root=ROOT, store=str(tmp_path / "store")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for rank in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for rank, (out, err) in enumerate(outputs):
        assert processes[rank].returncode == 0, err
        assert out.splitlines() == [
            "values [('rank', 0), ('rank', 1)]",
            "raised reported 2 True",
            "raised reported 1 True",
        ], (rank, err)
    assert [line for line in outputs[0][1].splitlines() if "oops" in line] == [
        "oops: rank 1: only on rank 1",
        "oops: on both",
    ]
    assert "oops" not in outputs[1][1]  # rank 0 alone prints


def test_print0_prints_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    print0("alone", 1)
    monkeypatch.setenv("RANK", "0")
    print0("rank zero", end="!\n")
    print0("to stderr", file=sys.stderr)
    monkeypatch.setenv("RANK", "2")  # the first process of a second node: LOCAL_RANK 0, but not rank 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    print0("rank two")
    print0("rank two", file=sys.stderr)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("alone 1\nrank zero!\n", "to stderr\n")


def test_check_compile_names_what_to_install_where_no_c_compiler_works(tmp_path):
    # Inductor compiles C++ for the CPU (and Triton's launchers for CUDA) at run time: with no working compiler,
    # set-up stops with one line naming the fix, not a traceback at the first evaluation
    script = (
        "import sys, torch, common\ntry:\n    common.check_compile(torch.device('cpu'))\n"
        "except common.UserError as e:\n    print(e)\n    sys.exit(e.exit_code)\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("torch.compile does not work here (InductorError: InvalidCxxCompiler")
    fix = "; install a C compiler and Python's headers (apt install build-essential python3-dev), or --no-compile\n"
    assert proc.stdout.endswith(fix)
