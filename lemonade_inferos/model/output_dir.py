"""Safe output folders for converters: write beside, then swap in; never delete the user's files.

Every ``inferos convert`` format writes its model folder through this module, so the rules
live in one place:

1. **Refuse what is not ours.** ``out`` may be replaced only when it does not exist, is an
   empty directory, or is a previous inferos model folder — recognised by the manifest file
   :data:`MANIFEST` (``inferos_manifest.json``, a JSON object with a ``"converter"`` key)
   that every converter writes. Anything else (a non-empty directory such as ``.`` or a
   source tree, a regular file, a symbolic link) is refused with :class:`OutputDirError`
   unless ``force=True`` (``inferos convert ... --force``).
2. **Never, even with force:** remove an input of the conversion (``out`` equal to an
   input, or a directory holding one), the current working directory or one of its
   parents, the home directory, or the filesystem root.
3. **Never leave a half-written folder.** Files are written into a staging directory
   beside ``out`` (same filesystem, so the final step is a rename); only a complete
   folder is moved into place. The previous ``out`` is renamed aside first and removed
   only after the new one is in place (restored if the swap fails). On any failure the
   staging directory is removed.

Use it like this (the pattern :func:`lemonade_inferos.model.convert.write_model_folder`
follows)::

    from lemonade_inferos.model.output_dir import MANIFEST, staged_output_dir

    with staged_output_dir(out, force=force, inputs=[checkpoint, tokenizer]) as tmp:
        ...                                   # write every file into tmp
        (tmp / MANIFEST).write_text(json.dumps({"converter": "...", ...}))
    # here ``out`` holds exactly what was written to tmp; on an exception nothing changed

or with the two calls when the writing does not fit a ``with`` block::

    tmp = prepare_output_dir(out, force=force, inputs=[src])
    try:
        ...                                   # write into tmp, including MANIFEST
        commit_output_dir(tmp, out, force=force)
    except BaseException:
        discard_output_dir(tmp)
        raise

Always write :data:`MANIFEST` into the folder (a JSON object with at least
``"converter"``): it is what lets a later conversion replace the folder without
``--force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

#: the file (a JSON object with a ``"converter"`` key) that marks an inferos model folder.
MANIFEST = "inferos_manifest.json"


class OutputDirError(ValueError):
    """The output path may not be replaced (the message names it, why, and what to do)."""


def _abs(p: str | os.PathLike[str]) -> Path:
    """Absolute path without resolving the last component (a symlink stays a symlink)."""
    p = Path(p).expanduser()
    return Path(os.path.abspath(p.parent.resolve() / p.name)) if p.name else p.resolve()


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory written by an inferos converter: it holds
    :data:`MANIFEST`, a JSON object with a ``"converter"`` key. Never raises."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        doc = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("converter"), str)


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(out: str | os.PathLike[str], *, force: bool = False,
                     inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Raise :class:`OutputDirError` unless ``out`` may be (re)placed (rules in the module
    docstring). Converters call it before reading their inputs, so a refused path fails at
    once; :func:`prepare_output_dir` and :func:`commit_output_dir` check again."""
    out = _abs(out)
    real_out = out.resolve() if out.exists() else out
    for src in inputs:
        s = Path(src).expanduser().resolve()
        if _is_within(s, real_out) or _is_within(s, out):
            raise OutputDirError(
                f"output {str(out)!r} {'is' if s == real_out else 'contains'} the input {str(s)!r}; "
                "choose an output path outside the inputs")
    protected = {Path("/").resolve(), Path.home().resolve()}
    cwd = Path.cwd().resolve()
    if real_out in protected or _is_within(cwd, real_out):
        what = "the current directory or one of its parents" if _is_within(cwd, real_out) else "a protected directory"
        raise OutputDirError(f"output {str(out)!r} is {what}; it is never replaced (not even with --force); "
                             "name a new folder, e.g. ./model-onnx")
    if not (out.exists() or out.is_symlink()) or force:
        return
    hint = "; choose a new folder, or pass --force to replace it"
    if out.is_symlink():
        raise OutputDirError(f"output {str(out)!r} is a symbolic link" + hint)
    if not out.is_dir():
        raise OutputDirError(f"output {str(out)!r} is an existing file, not a model folder" + hint)
    if is_model_folder(out) or not any(out.iterdir()):
        return
    raise OutputDirError(f"output {str(out)!r} is a non-empty directory that is not an inferos model folder "
                         f"(it has no {MANIFEST})" + hint)


def prepare_output_dir(out: str | os.PathLike[str], *, force: bool = False,
                       inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Check that ``out`` may be replaced and create an empty staging directory beside it.

    Args:
        out: the model folder to create or replace (``~`` expanded; parents are created).
        force: also replace a non-empty directory that is not an inferos model folder, a
            file or a symbolic link (``--force``). Inputs, the current directory and its
            parents, the home directory and ``/`` are refused even then.
        inputs: every file or folder the conversion reads; ``out`` may not be one of them
            nor contain one.

    Returns:
        The staging directory (``<parent>/.<name>.tmp-XXXX``, mode 0700 until committed).
        Write the whole folder there, then call :func:`commit_output_dir`, or
        :func:`discard_output_dir` on failure.

    Raises:
        OutputDirError: ``out`` may not be replaced (message names the path, the reason and
            the fix).
        OSError: the parent directory cannot be created or written.
    """
    path = _abs(out)
    check_output_dir(path, force=force, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def commit_output_dir(staging: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Move the finished ``staging`` folder to ``out``.

    The checks of :func:`prepare_output_dir` are repeated (``out`` may have changed while
    the conversion ran). A previous ``out`` is renamed aside, the staging folder renamed into
    place, and only then the old one removed; if the swap fails the old one is put back.

    Returns:
        ``out`` as an absolute path.

    Raises:
        OutputDirError: ``out`` became something that may not be replaced; the staging
            folder is left for the caller to discard.
        OSError: a rename failed (``out`` is as it was).
    """
    src, dst = Path(staging), _abs(out)
    check_output_dir(dst, force=force, inputs=())
    os.chmod(src, 0o755)
    if not (dst.exists() or dst.is_symlink()):
        os.rename(src, dst)
        return dst
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except OSError:
        os.rename(old, dst)  # put the previous version back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return dst


def discard_output_dir(staging: str | os.PathLike[str]) -> None:
    """Remove a staging folder from :func:`prepare_output_dir` (after a failure). Never raises."""
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike[str], *, force: bool = False,
                      inputs: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """``with staged_output_dir(out, force=..., inputs=[...]) as tmp:`` write into ``tmp``;
    on normal exit it becomes ``out`` (:func:`commit_output_dir`), on an exception it is
    removed and ``out`` is untouched. Raises as :func:`prepare_output_dir` /
    :func:`commit_output_dir`."""
    staging = prepare_output_dir(out, force=force, inputs=inputs)
    try:
        yield staging
        commit_output_dir(staging, out, force=force)
    except BaseException:
        discard_output_dir(staging)
        raise
