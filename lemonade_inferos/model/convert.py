"""Convert a llama2.c checkpoint + tokenizer into an onnxruntime-genai model folder.

The folder holds ``model.onnx`` (:func:`lemonade_inferos.model.export.build_decoder`),
``genai_config.json`` (readable by :class:`lemonade_inferos.model.spec.DecoderSpec` and by
onnxruntime-genai's ``og.Model``), ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``LICENSE`` (attribution) and ``inferos_manifest.json``
(source hashes + converter version, so an up-to-date folder is not rebuilt).

The folder is written through :mod:`lemonade_inferos.model.output_dir`: into a staging
directory beside ``out_dir`` that is renamed into place when complete, so an interrupted
conversion never leaves a half-written folder, and an existing ``out_dir`` is replaced only
when it is a previous inferos model folder or empty (``force=True`` for anything else;
inputs are never removed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import onnx

from .export import StandardKVAdapter, build_decoder
from .llama2c import Llama2cWeights, load_llama2c
from .output_dir import MANIFEST, staged_output_dir
from .tokenizer import BOS_ID, EOS_ID, Llama2cTokenizer

#: bump when the produced files change, so cached conversions are rebuilt.
CONVERTER_VERSION = "7"

ATTRIBUTION = """\
This model folder was converted by lemonade-inferos from a llama2.c checkpoint.

stories260K (weights) and tok512 (tokenizer): Andrej Karpathy's "tinyllamas" stories260K
checkpoint and its 512-token SentencePiece-derived tokenizer, trained on the TinyStories
data set, from karpathy/llama2.c (MIT licence), as redistributed under the MIT licence in
ytmytm/llama2.c64 (commit 12b5bec82eb980362b8a7bfe86992a552a492481). Keep this
attribution wherever the files are shipped.

MIT License

Copyright (c) 2023 Andrej Karpathy

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge,
publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE.
"""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_manifest(checkpoint: str | Path, tokenizer: str | Path) -> dict:
    """The manifest a conversion of these inputs writes (hashes + converter version)."""
    return {
        "converter": "lemonade_inferos.model.convert.convert_llama2c",
        "converter_version": CONVERTER_VERSION,
        "source": {
            "checkpoint": {"name": Path(checkpoint).name, "sha256": sha256_file(checkpoint)},
            "tokenizer": {"name": Path(tokenizer).name, "sha256": sha256_file(tokenizer)},
        },
    }


def is_up_to_date(out_dir: str | Path, checkpoint: str | Path, tokenizer: str | Path) -> bool:
    """True when ``out_dir`` holds a complete conversion of exactly these inputs."""
    out = Path(out_dir)
    try:
        have = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    want = expected_manifest(checkpoint, tokenizer)
    if any(have.get(k) != v for k, v in want.items()):
        return False
    return all((out / f).is_file() for f in have.get("files", []))


def genai_config(weights: Llama2cWeights, *, filename: str = "model.onnx") -> dict:
    """The onnxruntime-genai ``genai_config.json`` document for the standard graph."""
    c = weights.config
    a = StandardKVAdapter()
    return {
        "model": {
            "type": "llama",
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
            "vocab_size": c.vocab_size,
            "context_length": c.seq_len,
            "decoder": {
                "filename": filename,
                "head_size": c.head_size,
                "hidden_size": c.dim,
                "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads,
                "num_hidden_layers": c.n_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": a.past_key_name,
                    "past_value_names": a.past_value_name,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": a.present_key_name,
                    "present_value_names": a.present_value_name,
                },
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            },
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": c.seq_len,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def convert_llama2c(
    checkpoint: str | Path,
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    rebuild: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint and tokenizer into a model folder.

    Args:
        checkpoint: llama2.c ``.bin`` weights (legacy export version 0).
        tokenizer: llama2.c tokenizer ``.bin`` with exactly ``vocab_size`` tokens.
        out_dir: folder to create, or a previous inferos model folder / empty directory to
            replace (see :mod:`lemonade_inferos.model.output_dir`).
        progress: called with a short message at each stage.
        force: also replace an ``out_dir`` that is not an inferos model folder (a file or a
            non-empty directory); inputs, the current directory and its parents are never
            replaced.
        rebuild: convert even when ``out_dir`` is already up to date.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        FileNotFoundError: an input is missing.
        ValueError: an input is corrupt (message names the file and problem).
        OutputDirError (a ValueError): ``out_dir`` may not be replaced; nothing was written.
        OSError: the folder cannot be written.
    """
    say = progress or (lambda _msg: None)
    checkpoint, tokenizer = Path(checkpoint), Path(tokenizer)
    out = Path(out_dir).expanduser().absolute()
    if not rebuild and is_up_to_date(out, checkpoint, tokenizer):
        say(f"{out} is up to date")
        return out
    manifest = expected_manifest(checkpoint, tokenizer)
    with staged_output_dir(out, force=force, inputs=[checkpoint, tokenizer]) as tmp:
        say(f"loading {checkpoint}")
        weights = load_llama2c(checkpoint)
        tok = Llama2cTokenizer.load(tokenizer, weights.config.vocab_size)
        say("building ONNX decoder graph")
        model = build_decoder(weights)
        onnx.save_model(model, str(tmp / "model.onnx"))
        say("building the tiered-KV decoder graph (model_tiered.onnx)")
        from ..kv.graph import write_tiered_graph  # kv builds on model.export; import late

        write_tiered_graph(weights, tmp)
        say("writing genai_config.json and tokenizer files")
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(weights), indent=2) + "\n")
        tok.write_hf_files(tmp, weights.config.seq_len)
        (tmp / "LICENSE").write_text(ATTRIBUTION)
        files = sorted(p.name for p in tmp.iterdir()) + [MANIFEST]
        manifest["files"] = files
        manifest["config"] = {k: getattr(weights.config, k) for k in (
            "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {out}")
    return out
