"""The packaged stories260K test model, converted to an ONNX folder on first use.

:func:`embedded_model_dir` converts ``lemonade_inferos/data/stories260K`` (llama2.c
``stories260K.bin`` + ``tok512.bin``) into ``$INFEROS_CACHE_DIR/models/stories260K``
(default ``~/.cache/lemonade-inferos/models/stories260K``) and reuses the folder while its
``inferos_manifest.json`` matches the packaged files and converter version. No network.

Concurrency: conversion happens under an exclusive ``fcntl`` lock file next to the folder
(where available), and :func:`~lemonade_inferos.model.convert.convert_llama2c` writes
into a temporary directory renamed into place, so readers never see a half folder.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .convert import convert_llama2c, is_up_to_date

EMBEDDED_NAME = "stories260K"


def embedded_source_files() -> tuple[Path, Path]:
    """Paths of the packaged ``stories260K.bin`` and ``tok512.bin``.

    Raises:
        FileNotFoundError: the package data is missing (broken install).
    """
    base = Path(__file__).resolve().parent.parent / "data" / EMBEDDED_NAME
    ckpt, tok = base / "stories260K.bin", base / "tok512.bin"
    for p in (ckpt, tok):
        if not p.is_file():
            raise FileNotFoundError(f"packaged model file {p} is missing; reinstall lemonade-inferos")
    return ckpt, tok


def cache_root() -> Path:
    """``$INFEROS_CACHE_DIR`` or ``~/.cache/lemonade-inferos``."""
    env = os.environ.get("INFEROS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lemonade-inferos"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # Windows: rely on the atomic rename in convert_llama2c
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def embedded_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """Folder of the converted embedded stories260K model (converting it if needed).

    Returns:
        an absolute path holding ``model.onnx``, ``genai_config.json`` and tokenizer files.

    Raises:
        FileNotFoundError: the packaged files are missing.
        OSError: the cache directory is not writable.
    """
    ckpt, tok = embedded_source_files()
    out = (cache_root() / "models" / EMBEDDED_NAME).resolve()
    if is_up_to_date(out, ckpt, tok):
        return out
    with _file_lock(out.parent / f".{EMBEDDED_NAME}.lock"):
        # convert_llama2c re-checks the manifest: a concurrent process may have finished
        return convert_llama2c(ckpt, tok, out, progress=progress)
