"""Shared test fixtures: everything offline, tiny and real.

- `tokenizer`: GPT-2's tokenizer from the local ranks file (tokenizer.py).
- `corpus_documents`: a small real English corpus, the topics of Python's reference manual that
  ship with every Python (pydoc_data.topics), one document per topic.
- `tiny_config`: a tiny GPTConfig with non-square sizes.
- `hf_gpt2_dir`: a randomly initialised transformers GPT2LMHeadModel saved with save_pretrained,
  the offline stand-in for OpenAI's weights.
- `data_dir`: that corpus as train_gpt2.py's shards (fineweb.write_shards, 4,096 tokens each).
- `run_main`: a script's main(argv) run in-process, giving (exit code, stdout, stderr), with the warnings
  python would print on stderr; `call_main`: the same for fixtures of any scope.
- `lock_in_another_process`: common.directory_lock tried from a second Python process.
- `flaky_server`: the FlakyServer class, a local HTTP server that counts its requests (HellaSwag's download).
- `trained_log`: the log directory of a real 6-step train_gpt2.py run of a tiny GPT, and
  `exported_run`: export.py's folder of its latest checkpoint (the notebook, export and sample tests).
- `cpu_demo`: the demo's run on the CPU, 8 steps (test_gpu's and test_train's demo tests).
"""

import contextlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

# No test may touch the network: without these a hub call retries for ~25 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several processes (torchrun, killed runs)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/test_gpu.py; skipped without one)")


def pytest_ignore_collect(collection_path, config):
    """`-m gpu` collects tests/test_gpu.py alone: a GPU machine with only the training stack (no
    datasets, no Jupyter) must not fail on the imports of modules that hold no GPU test."""
    name = collection_path.name
    if config.option.markexpr == "gpu" and name.startswith("test_") and name != "test_gpu.py":
        return True
    return None


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def corpus_documents():
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_documents):
    import fineweb

    path = tmp_path_factory.mktemp("data")
    fineweb.write_shards(corpus_documents, str(path), "pydocs", shard_size=4096, num_proc=1, progress=False)
    return str(path)


# What python does not show by default (outside __main__): the others reach a script's stderr.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@contextlib.contextmanager
def warnings_on_stderr():
    """Every warning python shows by default is written to sys.stderr when it happens, as in the script's own
    process; pytest still gets every warning for its summary."""
    pytests = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, HIDDEN_WARNINGS):
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        pytests(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def exit_code_of(main, argv, seconds=300):
    """main(argv)'s return value, or the code of the sys.exit it ends with (argparse's usage errors); the test fails
    after `seconds` (SIGALRM) rather than wait forever on a main that never ends. A deadline already set (a
    fixture's, as in test_fineweb.py) is left as it is, and bounds this call too."""
    if signal.getitimer(signal.ITIMER_REAL)[0]:
        return call_main_of(main, argv)

    def expire(signum, frame):
        pytest.fail(f"{main.__module__}.main ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return call_main_of(main, argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def call_main_of(main, argv):
    """main(argv)'s return value or sys.exit code, with the warnings python shows by default on stderr."""
    with warnings_on_stderr():
        try:
            return main([str(a) for a in argv])
        except SystemExit as e:
            return e.code


@pytest.fixture
def run_main(capsys):
    """run(main, *argv) -> (its return value or sys.exit code, stdout, stderr), in this process."""

    def run(main, *argv):
        code = exit_code_of(main, argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def call_main():
    """run_main for fixtures of any scope: call(main, *argv) -> (exit code, stdout, stderr), in this process."""

    def call(main, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_code_of(main, argv)
        return code, out.getvalue(), err.getvalue()

    return call


@pytest.fixture
def lock_in_another_process():
    """take(directory, what) -> "locked", or "refused: <the UserError> (exit code N)", from a new Python process
    (an fcntl lock belongs to a process: this one would always get its own). hold=True: it dies holding it."""

    def take(directory, what="test run", hold=False):
        code = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {ROOT!r})
            from common import UserError, directory_lock
            try:
                with directory_lock({str(directory)!r}, {what!r}):
                    print("locked", flush=True)
                    if {hold}:
                        os._exit(0)
            except UserError as e:
                print(f"refused: {{e}} (exit code {{e.exit_code}})")
            """)
        run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    return take


class FlakyServer:
    """An HTTP server on 127.0.0.1 in a thread: answers 503 to the first `failures` requests, then serves
    `body`. Counts the requests it gets (under a lock: requests from several processes come in threads)."""

    def __init__(self, body, failures=0):
        self.body, self.failures, self.requests = body, failures, 0
        server, lock = self, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with lock:
                    server.requests += 1
                    failing = server.requests <= server.failures
                if failing:
                    self.send_error(503, "try again later")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):  # quiet
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hellaswag_val.jsonl"

    def __enter__(self):
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def flaky_server():
    """`with flaky_server(body, failures=0) as server:` serves body at server.url; server.requests counts."""
    return FlakyServer


@pytest.fixture
def tiny_config():
    from model import GPTConfig

    return GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=3, n_embd=48)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A random GPT-2 in Hugging Face format (n_positions 64, vocab 50257, 2 layers, 4 heads, 64 wide)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def trained_log(tmp_path_factory, corpus_documents):
    """A 6-step training run of a tiny GPT (vocab padded to 50304) on Python's reference manual, with
    val and HellaSwag evals at steps 0, 3 and 6 and checkpoints at steps 3 and 6."""
    import fineweb
    import train_gpt2

    tmp = tmp_path_factory.mktemp("run")
    data_dir, log_dir = tmp / "data", tmp / "log"
    fineweb.write_shards(corpus_documents, str(data_dir), "pydocs", shard_size=8192, num_proc=1, progress=False)
    # A few real HellaSwag-format examples so the run logs hellaswag_acc too.
    hellaswag_file = tmp / "hellaswag.jsonl"
    with open(hellaswag_file, "w") as f:
        for ctx, endings, label in [
            (
                "The chef cracked two eggs into the bowl and",
                [" whisked them with a fork.", " painted the ceiling.", " drove to the airport.", " sang to the moon."],
                0,
            ),
            (
                "She tied her running shoes, stepped outside and",
                [" fell asleep on the sofa.", " started to jog.", " baked a cake.", " read the newspaper."],
                1,
            ),
        ]:
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": label}) + "\n")
    exit_code = train_gpt2.main(
        [
            "--data-dir",
            str(data_dir),
            "--log-dir",
            str(log_dir),
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--block-size",
            "64",
            "--vocab-size",
            "50304",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--total-batch-size",
            "128",
            "--max-steps",
            "6",
            "--warmup-steps",
            "2",
            "--max-lr",
            "1e-2",
            "--min-lr",
            "1e-3",
            "--eval-interval",
            "3",
            "--val-tokens",
            "256",
            "--hellaswag-interval",
            "3",
            "--hellaswag-file",
            str(hellaswag_file),
            "--sample-interval",
            "0",
            "--checkpoint-interval",
            "3",
            "--no-compile",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ]
    )
    assert exit_code == 0
    return log_dir


@pytest.fixture(scope="session")
def exported_run(trained_log, tmp_path_factory):
    """export.py's Hugging Face folder of trained_log's latest checkpoint (step 6), in float32."""
    import export

    directory = tmp_path_factory.mktemp("exported") / "tiny-gpt2"
    assert export.main([str(trained_log), str(directory)]) == 0
    return directory


@pytest.fixture(scope="session")
def cpu_demo(tmp_path_factory):
    """The demo on the CPU with dtype and compile left to the device, 8 steps, val loss over 2,048 tokens, its data
    made by the run (test_gpu.run_demo_with_auto_defaults): test_gpu checks the run, test_train's demo test what
    `--demo` does."""
    from test_gpu import run_demo_with_auto_defaults
    from test_train import HELLASWAG

    directory = tmp_path_factory.mktemp("demo")
    hellaswag_file = directory / "hellaswag_val.jsonl"
    hellaswag_file.write_text("".join(json.dumps({"ctx": c, "endings": e, "label": n}) + "\n" for c, e, n in HELLASWAG))
    return run_demo_with_auto_defaults("cpu", directory, str(hellaswag_file), steps=8, val_tokens=2048)
