"""Shared pytest fixtures (keep minimal; other suites add their own here)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests: no per-example deadline (a loaded 2-core CI box must not turn a slow example
# into a failure), and a fixed example sequence in CI so a run is reproducible.
settings.register_profile("inferos", deadline=None)
settings.register_profile("inferos-ci", deadline=None, derandomize=True, database=None)
settings.load_profile("inferos-ci" if os.environ.get("CI") else "inferos")

DATA_DIR = Path(__file__).resolve().parent.parent / "lemonade_inferos" / "data" / "stories260K"

# `inferos serve` (and its subprocesses) keeps client quotas in the agent's state directory:
# never the user's real one during tests.
if "INFEROS_STATE_DIR" not in os.environ:
    import tempfile

    os.environ["INFEROS_STATE_DIR"] = tempfile.mkdtemp(prefix="inferos-test-state-")


@pytest.fixture(scope="session")
def stories_paths() -> tuple[Path, Path]:
    """(checkpoint, tokenizer) paths of the packaged llama2.c stories260K model."""
    return DATA_DIR / "stories260K.bin", DATA_DIR / "tok512.bin"


def _user_cache() -> Path:
    from lemonade_inferos.model.embedded import cache_root

    return cache_root()


#: the user's inferos cache as it was before any fixture pointed INFEROS_CACHE_DIR at a temp
#: folder: where ``inferos pull`` (scripts/test.sh) left the realistic model
USER_CACHE = _user_cache()


@contextlib.contextmanager
def user_cache():
    """Run a block with ``INFEROS_CACHE_DIR`` = :data:`USER_CACHE` (pulled models are shared
    with the user's cache instead of being fetched again into a test's temp cache)."""
    old = os.environ.get("INFEROS_CACHE_DIR")
    os.environ["INFEROS_CACHE_DIR"] = str(USER_CACHE)
    try:
        yield USER_CACHE
    finally:
        if old is None:
            os.environ.pop("INFEROS_CACHE_DIR", None)
        else:
            os.environ["INFEROS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted stories260K model folder, built once per session in a temp cache.

    ``INFEROS_CACHE_DIR`` points at the temp cache for the whole session (so code under test
    calling ``embedded_model_dir()`` reuses this folder) and is restored afterwards.
    """
    from lemonade_inferos.model.embedded import embedded_model_dir

    cache = tmp_path_factory.mktemp("inferos_cache")
    old = os.environ.get("INFEROS_CACHE_DIR")
    os.environ["INFEROS_CACHE_DIR"] = str(cache)
    try:
        yield embedded_model_dir()
    finally:
        if old is None:
            os.environ.pop("INFEROS_CACHE_DIR", None)
        else:
            os.environ["INFEROS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def weights(stories_paths):
    """The stories260K weights (float32 numpy arrays, llama2.c layout)."""
    from lemonade_inferos.model.llama2c import load_llama2c

    return load_llama2c(stories_paths[0])


@pytest.fixture(scope="session")
def tok(stories_paths):
    """The stories260K llama2.c tokenizer (512 tokens)."""
    from lemonade_inferos.model.tokenizer import Llama2cTokenizer

    return Llama2cTokenizer.load(stories_paths[1], 512)


@pytest.fixture(scope="module")
def serve_process(embedded_model, tmp_path_factory):
    """``inferos serve`` on the embedded model in its own process (so a client in this
    process measures the server, not a shared GIL), on a free loopback port with
    ``--max-tokens 16``. Yields the base URL; the process is stopped afterwards."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log_file = open(log_path, "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "lemonade_inferos.cli", "serve", "-m", str(embedded_model), "--port", str(port),
         "--max-tokens", "16"],
        stdout=subprocess.DEVNULL, stderr=log_file, text=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"inferos serve exited: {log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("inferos serve did not answer /health within 120 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - stuck shutdown
            proc.kill()
            proc.wait()
        log_file.close()
