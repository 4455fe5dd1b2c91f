"""Read Llama-family GGUF files (llama.cpp's format) into :class:`DecoderWeights` and tokenizer files.

Reading and dequantization use the ``gguf`` package (llama.cpp's own Python reader and
reference dequantizers for Q4_0/Q4_1/Q5_x/Q8_0/K-quants/…), so every tensor type llama.cpp
writes loads as float32.

Supported ``general.architecture`` values and their layout facts:

* ``llama`` (Llama 1/2/3 without RoPE frequency factors, Mistral, SmolLM, TinyLlama):
  llama.cpp's converter already permuted q/k rows into the interleaved-pair RoPE layout
  (``LLAMA_ROPE_TYPE_NORM``), which is the layout our graph uses — taken as is.
* ``qwen2``: QKV biases; RoPE in rotate-half (``NEOX``) layout — q/k rows and biases are
  permuted into interleaved pairs on load (:func:`half_to_interleaved_rows`).

GGUF stores shapes innermost-first (``ne0`` = input width), so a tensor's numpy shape is
the reversed GGUF shape, i.e. ``[out, in]`` — the layout :class:`DecoderWeights` uses.

Errors are :class:`GGUFError` (a ``ValueError``) naming the file and what is wrong:
not a GGUF file, truncated, unsupported architecture/RoPE scaling/tokenizer, missing tensor,
wrong tensor shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .hf_tokenizer import TokenizerBuildError, TokenizerFiles, tokenizer_from_gguf_vocab
from .weights import DecoderConfig, DecoderWeights, half_to_interleaved_rows

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class GGUFError(ValueError):
    """A GGUF file cannot be converted (the message names the file and the problem)."""


@dataclass
class GGUFModel:
    """A GGUF file read into the common types."""

    weights: DecoderWeights
    tokenizer: TokenizerFiles
    metadata: dict[str, Any]
    #: GGML types of the transformer-layer matrices (e.g. ``{"Q4_1"}``)
    matrix_types: frozenset[str] = frozenset()

    @property
    def auto_precision(self) -> str:
        """The weight precision ``--weights auto`` picks: ``int8`` when the file's matrices
        are already quantized to 6 bits or fewer (re-quantizing llama.cpp's blocks to
        onnxruntime's int4 blocks stacks a second rounding on the first: measured on
        SmolLM2-135M Q4_1, mean KL divergence 0.30 from the file's own weights for int4 vs
        0.004 for int8), else ``int4``."""
        low = {"Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS",
               "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"}
        return "int8" if self.matrix_types & low else "int4"


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
        size = path.stat().st_size
        raise GGUFError(f"{path}: unreadable GGUF ({size} bytes; truncated or corrupt): {e}") from None


def _field(reader, key: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise GGUFError(f"{reader.path if hasattr(reader, 'path') else 'GGUF'}: metadata key {key!r} is missing")
        return default
    v = f.contents()
    return v


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All scalar metadata of a GGUF file (arrays longer than 16 entries are summarised).

    Raises:
        FileNotFoundError: no such file.
        GGUFError: not a readable GGUF file.
    """
    r = _reader(Path(path))
    out: dict[str, Any] = {}
    for k, f in r.fields.items():
        try:
            v = f.contents()
        except Exception:  # pragma: no cover - exotic field types
            continue
        if isinstance(v, list) and len(v) > 16:
            v = f"<array of {len(v)}>"
        out[k] = v
    return out


def load_gguf(path: str | Path, progress: Callable[[str], None] | None = None) -> GGUFModel:
    """Read a Llama-family GGUF file.

    Args:
        path: the ``.gguf`` file.
        progress: called with a short message per stage.

    Returns:
        :class:`GGUFModel` with float32 weights in the interleaved RoPE layout and the
        tokenizer files (``tokenizer.json`` built from the embedded vocabulary, the chat
        template from ``tokenizer.chat_template``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        GGUFError: not a GGUF file, truncated, unsupported architecture, RoPE scaling or
            tokenizer, a missing tensor or a tensor of the wrong shape.
    """
    import gguf

    path = Path(path)
    say = progress or (lambda _m: None)
    r = _reader(path)
    arch = _field(r, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    a = lambda key, default=...: _field(r, f"{arch}.{key}", default)  # noqa: E731
    scaling = a("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: RoPE frequency factors (rope_freqs.weight, Llama 3.1+ scaling) are not supported")
    tokens = _field(r, "tokenizer.ggml.tokens", None)
    if tokens is None:
        raise GGUFError(f"{path}: no embedded tokenizer (tokenizer.ggml.tokens)")
    n_heads = int(a("attention.head_count"))
    dim = int(a("embedding_length"))
    head_dim = int(a("attention.key_length", dim // n_heads))
    cfg = DecoderConfig(
        dim=dim, hidden_dim=int(a("feed_forward_length")), n_layers=int(a("block_count")),
        n_heads=n_heads, n_kv_heads=int(a("attention.head_count_kv", n_heads)),
        vocab_size=int(a("vocab_size", len(tokens))), seq_len=int(a("context_length")),
        shared_classifier="output.weight" not in tensors, rope_theta=float(a("rope.freq_base", 10000.0)),
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        head_dim=None if head_dim == dim // n_heads else head_dim, architecture=arch,
    )
    try:
        cfg.validate(str(path))
    except ValueError as e:
        raise GGUFError(str(e)) from None

    def tensor(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path}: tensor {name!r} is missing")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise GGUFError(f"{path}: tensor {name!r} of type {t.tensor_type.name} cannot be dequantized: {e}") from None
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if arr.size != int(np.prod(shape)):
            raise GGUFError(f"{path}: tensor {name!r} holds {arr.size} values, its shape {shape} needs {int(np.prod(shape))}")
        return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)

    L = cfg.n_layers
    neox = arch == "qwen2"
    say(f"dequantizing {len(tensors)} tensors ({arch}, {L} layers)")
    per_layer: dict[str, list[np.ndarray]] = {k: [] for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")}
    biases: dict[str, list[np.ndarray]] = {"bq": [], "bk": [], "bv": []}
    has_bias = "blk.0.attn_q.bias" in tensors
    for i in range(L):
        p = f"blk.{i}."
        wq, wk = tensor(p + "attn_q.weight"), tensor(p + "attn_k.weight")
        if neox:
            wq, wk = half_to_interleaved_rows(wq, cfg.n_heads), half_to_interleaved_rows(wk, cfg.n_kv_heads)
        per_layer["wq"].append(wq)
        per_layer["wk"].append(wk)
        per_layer["wv"].append(tensor(p + "attn_v.weight"))
        per_layer["wo"].append(tensor(p + "attn_output.weight"))
        per_layer["rms_att"].append(tensor(p + "attn_norm.weight"))
        per_layer["rms_ffn"].append(tensor(p + "ffn_norm.weight"))
        per_layer["w1"].append(tensor(p + "ffn_gate.weight"))
        per_layer["w2"].append(tensor(p + "ffn_down.weight"))
        per_layer["w3"].append(tensor(p + "ffn_up.weight"))
        if has_bias:
            bq, bk = tensor(p + "attn_q.bias"), tensor(p + "attn_k.bias")
            if neox:
                bq, bk = half_to_interleaved_rows(bq, cfg.n_heads), half_to_interleaved_rows(bk, cfg.n_kv_heads)
            biases["bq"].append(bq)
            biases["bk"].append(bk)
            biases["bv"].append(tensor(p + "attn_v.bias"))
    emb = tensor("token_embd.weight")
    wcls = emb if cfg.shared_classifier else tensor("output.weight")
    stacked = {k: np.stack(v) for k, v in per_layer.items()}
    bias_kw = {k: np.stack(v) for k, v in biases.items()} if has_bias else {}
    try:
        weights = DecoderWeights(config=cfg, token_embedding=emb, rms_final=tensor("output_norm.weight"), wcls=wcls,
                                 source=path, **stacked, **bias_kw).check_shapes(str(path))
    except ValueError as e:
        raise GGUFError(str(e)) from None

    say("building tokenizer.json from the embedded vocabulary")
    types = [int(x) for x in _field(r, "tokenizer.ggml.token_type", [1] * len(tokens))]
    tok_model = _field(r, "tokenizer.ggml.model", "llama")
    try:
        tok = tokenizer_from_gguf_vocab(
            tok_model, _field(r, "tokenizer.ggml.pre", None), tokens, types,
            merges=_field(r, "tokenizer.ggml.merges", None), scores=_field(r, "tokenizer.ggml.scores", None),
            add_space_prefix=bool(_field(r, "tokenizer.ggml.add_space_prefix", True)))
    except TokenizerBuildError as e:
        raise GGUFError(f"{path}: {e}") from None
    eos = int(_field(r, "tokenizer.ggml.eos_token_id", 2))
    eos_ids = [eos]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = _field(r, key, None)
        if extra is not None and int(extra) not in eos_ids:
            eos_ids.append(int(extra))
    # a chat model's end-of-turn token (ChatML <|im_end|>, Llama 3 <|eot_id|>) and the
    # document end both end generation, as llama.cpp's llama_vocab::is_eog does
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        i = tok.token_to_id(name)
        if i is not None and i not in eos_ids and types[i] == 3:
            eos_ids.append(i)
    bos = int(_field(r, "tokenizer.ggml.bos_token_id", 1))
    default_add_bos = tok_model == "llama"
    files = TokenizerFiles(
        tokenizer=tok, bos_token_id=bos, eos_token_ids=eos_ids,
        pad_token_id=_opt_int(_field(r, "tokenizer.ggml.padding_token_id", None)),
        add_bos_token=bool(_field(r, "tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=_field(r, "tokenizer.chat_template", None), context_length=cfg.seq_len)
    meta = {k: v for k, v in read_metadata(path).items() if k.startswith("general.")}
    mtypes = frozenset(t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.") and n.endswith(".weight")
                       and len(t.shape) == 2)
    return GGUFModel(weights=weights, tokenizer=files, metadata=meta, matrix_types=mtypes)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
