"""Convert checkpoints into an onnxruntime-genai model folder: llama2.c, GGUF, Hugging Face.

Every source is read into :class:`~lemonade_inferos.model.weights.DecoderWeights` plus
tokenizer files, and :func:`write_model_folder` writes one folder format for all of them:
``model.onnx`` (:func:`lemonade_inferos.model.export.build_decoder`), ``model_tiered.onnx``
(the tiered-KV decoder), ``genai_config.json`` (readable by
:class:`lemonade_inferos.model.spec.DecoderSpec` and by onnxruntime-genai's ``og.Model``),
``tokenizer.json``, ``tokenizer_config.json`` (chat template, ``add_bos_token``),
``special_tokens_map.json``, ``LICENSE`` (attribution) and ``inferos_manifest.json`` (source
hashes, weight precision and converter version, so an up-to-date folder is not rebuilt).

Files are written into a temporary sibling directory which is then renamed into place,
so an interrupted conversion never leaves a half-written folder at ``out_dir``.

The folder is written through :mod:`lemonade_inferos.model.output_dir` (every converter ends
in :func:`write_model_folder`): into a staging directory beside ``out_dir`` that is renamed
into place when complete, so an interrupted conversion never leaves a half-written folder;
an existing ``out_dir`` is replaced only when it is a previous inferos model folder or an
empty directory (``overwrite=True`` for anything else), and never when it is, or holds, an
input, the current directory or one of its parents. Each converter checks ``out_dir`` before
it reads its inputs, so a refused path fails at once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from .export import StandardKVAdapter, build_decoder, save_model
from .llama2c import load_llama2c
from .output_dir import MANIFEST, check_output_dir, commit_output_dir, discard_output_dir, prepare_output_dir
from .precision import FOLD_NORMS, PRECISIONS, apply_weight_precision
from .tokenizer import BOS_ID, EOS_ID, Llama2cTokenizer
from .weights import DecoderConfig, DecoderWeights

#: bump when the produced files change, so cached conversions are rebuilt.
CONVERTER_VERSION = "8"

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


def expected_manifest(checkpoint: str | Path, tokenizer: str | Path | None = None, *,
                      converter: str = "convert_llama2c", weights: str | None = None) -> dict:
    """The manifest a conversion of these inputs writes (hashes, precision, converter version).

    ``checkpoint`` may be a file or a folder (Hugging Face: every ``*.json`` and
    ``*.safetensors`` file in it is hashed).
    """
    src = {}
    ck = Path(checkpoint)
    if ck.is_dir():
        for f in sorted(ck.iterdir()):
            if f.is_file() and (f.suffix in (".json", ".safetensors", ".jinja")):
                src[f.name] = {"sha256": sha256_file(f)}
        src = {"checkpoint": {"name": ck.name, "files": src}}
    else:
        src = {"checkpoint": {"name": ck.name, "sha256": sha256_file(ck)}}
    if tokenizer is not None:
        src["tokenizer"] = {"name": Path(tokenizer).name, "sha256": sha256_file(tokenizer)}
    out = {
        "converter": f"lemonade_inferos.model.convert.{converter}",
        "converter_version": CONVERTER_VERSION,
        "source": src,
    }
    if weights is not None:
        out["weights"] = weights
    return out


def is_up_to_date(out_dir: str | Path, checkpoint: str | Path, tokenizer: str | Path | None = None, *,
                  converter: str = "convert_llama2c", weights: str | None = None) -> bool:
    """True when ``out_dir`` holds a complete conversion of exactly these inputs."""
    out = Path(out_dir)
    try:
        have = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    want = expected_manifest(checkpoint, tokenizer, converter=converter, weights=weights)
    if any(have.get(k) != v for k, v in want.items()):
        return False
    return all((out / f).is_file() for f in have.get("files", []))


def genai_config(config: DecoderConfig | DecoderWeights, *, filename: str = "model.onnx",
                 bos_token_id: int = BOS_ID, eos_token_ids: list[int] | int = EOS_ID,
                 pad_token_id: int | None = None) -> dict:
    """The onnxruntime-genai ``genai_config.json`` document for the standard graph.

    ``eos_token_id`` is written as a list when there are several (onnxruntime-genai 0.9 and
    0.18 both accept a list and stop at any of them).
    """
    c = config.config if isinstance(config, DecoderWeights) else config
    a = StandardKVAdapter()
    eos = list(eos_token_ids) if isinstance(eos_token_ids, (list, tuple)) else [int(eos_token_ids)]
    return {
        "model": {
            "type": "llama",
            "bos_token_id": int(bos_token_id),
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad_token_id if pad_token_id is not None else eos[0]),
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


def write_model_folder(
    weights: DecoderWeights,
    out_dir: str | Path,
    *,
    manifest: dict,
    write_tokenizer: Callable[[Path], object],
    bos_token_id: int,
    eos_token_ids: list[int],
    pad_token_id: int | None = None,
    attribution: str = "",
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write the model folder for ``weights`` (every converter ends here).

    Args:
        weights: the decoder (interleaved RoPE layout).
        out_dir: folder to create or replace.
        manifest: :func:`expected_manifest` of the inputs (``files``/``config`` are added).
        write_tokenizer: writes ``tokenizer.json``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` into the folder it is given.
        bos_token_id, eos_token_ids, pad_token_id: for ``genai_config.json``.
        attribution: text of ``LICENSE`` (keep the source's licence and authors).
        precision: weight storage (:data:`~lemonade_inferos.model.precision.PRECISIONS`).
        progress: called with a short message at each stage.
        overwrite: also replace an ``out_dir`` that is not an inferos model folder
            (:func:`~lemonade_inferos.model.output_dir.prepare_output_dir` ``force``).
        inputs: the files/folders the conversion read; never replaced.

    Raises:
        ValueError: ``precision`` is unknown.
        OutputDirError (a ValueError): ``out_dir`` may not be replaced; nothing was written.
        OSError: the folder cannot be written (nothing is left half-written).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"weights={precision!r} is not allowed; must be one of {', '.join(PRECISIONS)}")
    say = progress or (lambda _msg: None)
    out = Path(out_dir).expanduser().absolute()
    tmp = prepare_output_dir(out, force=overwrite, inputs=inputs)
    transform = (lambda m: apply_weight_precision(m, precision))
    fold = FOLD_NORMS[precision]
    try:
        say(f"building the ONNX decoder graph (model.onnx, {precision} weights)")
        save_model(transform(build_decoder(weights, fold_norms=fold)), tmp / "model.onnx")
        say(f"building the tiered-KV decoder graph (model_tiered.onnx, {precision} weights)")
        from ..kv.graph import write_tiered_graph  # kv builds on model.export; import late

        write_tiered_graph(weights, tmp, transform=transform, fold_norms=fold)
        say("writing genai_config.json and tokenizer files")
        doc = genai_config(weights, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
        (tmp / "genai_config.json").write_text(json.dumps(doc, indent=2) + "\n")
        write_tokenizer(tmp)
        if attribution:
            (tmp / "LICENSE").write_text(attribution)
        manifest = dict(manifest, weights=precision)
        manifest["files"] = sorted(p.name for p in tmp.iterdir()) + [MANIFEST]
        c = weights.config
        manifest["config"] = {k: getattr(c, k) for k in (
            "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len",
            "rope_theta", "rms_eps", "architecture")}
        manifest["config"]["head_size"] = c.head_size
        manifest["config"]["qkv_bias"] = weights.has_qkv_bias
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        commit_output_dir(tmp, out, force=overwrite)
    except BaseException:
        discard_output_dir(tmp)
        raise
    say(f"wrote {out}")
    return out


def convert_llama2c(
    checkpoint: str | Path,
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint and tokenizer into a model folder (float32 weights).

    Args:
        checkpoint: llama2.c ``.bin`` weights (legacy export version 0).
        tokenizer: llama2.c tokenizer ``.bin`` with exactly ``vocab_size`` tokens.
        out_dir: folder to create or replace.
        progress: called with a short message at each stage.
        force: convert even when ``out_dir`` is already up to date.
        overwrite: also replace an ``out_dir`` that is not an inferos model folder (a file,
            a non-empty directory); inputs and the current directory never are.

    Returns:
        ``out_dir`` resolved.

    Raises:
        FileNotFoundError: an input is missing.
        ValueError: an input is corrupt (message names the file and problem).
        OSError: the folder cannot be written.
    """
    say = progress or (lambda _msg: None)
    checkpoint, tokenizer = Path(checkpoint), Path(tokenizer)
    out = Path(out_dir).expanduser().absolute()
    if not force and is_up_to_date(out, checkpoint, tokenizer, weights="fp32"):
        say(f"{out} is up to date")
        return out
    inputs = [checkpoint, tokenizer]
    check_output_dir(out, force=overwrite, inputs=inputs)  # before reading: a refused OUT fails at once
    manifest = expected_manifest(checkpoint, tokenizer)
    say(f"loading {checkpoint}")
    weights = load_llama2c(checkpoint)
    tok = Llama2cTokenizer.load(tokenizer, weights.config.vocab_size)
    return write_model_folder(
        weights, out, manifest=manifest, write_tokenizer=lambda d: tok.write_hf_files(d, weights.config.seq_len),
        bos_token_id=BOS_ID, eos_token_ids=[EOS_ID], attribution=ATTRIBUTION, precision="fp32", progress=say,
        overwrite=overwrite, inputs=inputs)


def convert_gguf(
    gguf_file: str | Path,
    out_dir: str | Path,
    *,
    weights: str = "auto",
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    attribution: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Llama-family GGUF file (``llama``, ``qwen2``) into a model folder.

    Args:
        gguf_file: the ``.gguf`` file (any tensor type llama.cpp writes; dequantized first).
        out_dir: folder to create or replace.
        weights: storage precision of the ONNX weights (:mod:`lemonade_inferos.model.precision`);
            ``auto`` (default) = ``int4``, or ``int8`` when the file's matrices are already
            quantized to 6 bits or fewer (:attr:`~lemonade_inferos.model.gguf.GGUFModel.auto_precision`).
        progress: called with a short message at each stage.
        force: convert even when ``out_dir`` is already up to date.
        overwrite: also replace an ``out_dir`` that is not an inferos model folder (a file,
            a non-empty directory); inputs and the current directory never are.
        attribution: ``LICENSE`` text (default: the GGUF's ``general.*`` names and licence).

    Raises:
        FileNotFoundError: the file is missing.
        lemonade_inferos.model.gguf.GGUFError: unsupported or corrupt file (names it).
        ValueError: ``weights`` is unknown.
    """
    from .gguf import load_gguf

    if weights not in PRECISIONS + ("auto",):
        raise ValueError(f"weights={weights!r} is not allowed; must be auto or one of {', '.join(PRECISIONS)}")
    say = progress or (lambda _msg: None)
    src = Path(gguf_file)
    out = Path(out_dir).expanduser().absolute()
    if not force and is_up_to_date(out, src, converter="convert_gguf", weights=None if weights == "auto" else weights):
        say(f"{out} is up to date")
        return out
    check_output_dir(out, force=overwrite, inputs=[src])
    say(f"reading {src}")
    model = load_gguf(src, progress=say)
    if weights == "auto":
        weights = model.auto_precision
        say(f"weights: {weights} (source matrices: {', '.join(sorted(model.matrix_types))})")
    manifest = expected_manifest(src, converter="convert_gguf", weights=weights)
    if attribution is None:
        meta = model.metadata
        attribution = (f"Converted by lemonade-inferos from {src.name}.\n"
                       f"Model: {meta.get('general.name', '?')} by {meta.get('general.organization', '?')}; "
                       f"licence: {meta.get('general.license', 'see the source')}.\n")
    t = model.tokenizer
    return write_model_folder(
        model.weights, out, manifest=manifest, write_tokenizer=t.write,
        bos_token_id=t.bos_token_id, eos_token_ids=t.eos_token_ids, pad_token_id=t.pad_token_id,
        attribution=attribution, precision=weights, progress=say, overwrite=overwrite, inputs=[src])


def convert_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    weights: str = "auto",
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``) of a
    ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` into a model folder.

    The folder's ``tokenizer.json``/``tokenizer_config.json`` (and ``chat_template.jinja``)
    are copied; ``LICENSE``/``README.md`` are kept as the attribution.

    Raises:
        FileNotFoundError: the folder or a file it names is missing.
        lemonade_inferos.model.hf.HFCheckpointError: no config, unsupported architecture,
            a missing tensor or a tensor of the wrong shape (names it).
        ValueError: ``weights`` is unknown.
    """
    from .hf import load_hf

    weights = "int4" if weights == "auto" else weights  # float sources: onnxruntime's int4 blocks
    if weights not in PRECISIONS:
        raise ValueError(f"weights={weights!r} is not allowed; must be one of {', '.join(PRECISIONS)}")
    say = progress or (lambda _msg: None)
    src = Path(hf_dir)
    out = Path(out_dir).expanduser().absolute()
    if not force and is_up_to_date(out, src, converter="convert_hf", weights=weights):
        say(f"{out} is up to date")
        return out
    check_output_dir(out, force=overwrite, inputs=[src])
    say(f"reading {src}")
    model = load_hf(src, progress=say)
    manifest = expected_manifest(src, converter="convert_hf", weights=weights)
    lic = next((src / n for n in ("LICENSE", "LICENSE.txt", "LICENSE.md") if (src / n).is_file()), None)
    attribution = f"Converted by lemonade-inferos from the Hugging Face checkpoint {src.name}.\n"
    if lic is not None:
        attribution += "\n" + lic.read_text(errors="replace")
    return write_model_folder(
        model.weights, out, manifest=manifest, write_tokenizer=model.write_tokenizer,
        bos_token_id=model.bos_token_id, eos_token_ids=model.eos_token_ids, pad_token_id=model.pad_token_id,
        attribution=attribution, precision=weights, progress=say, overwrite=overwrite, inputs=[src])
