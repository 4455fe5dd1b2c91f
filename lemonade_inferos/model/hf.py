"""Read Hugging Face checkpoint folders (``config.json`` + ``*.safetensors``) into :class:`DecoderWeights`.

Supported ``architectures``: ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (QKV biases). Tensors are read with the ``safetensors`` package's numpy
backend (bf16 through ``ml_dtypes``; no torch) from a single file or a sharded set with
``model.safetensors.index.json``.

Layout: Hugging Face applies RoPE with ``rotate_half`` (pair ``m`` with ``m + D/2``); q/k rows
and biases are permuted to the interleaved-pair layout our graph uses
(:func:`~lemonade_inferos.model.weights.half_to_interleaved_rows`), the same permutation
llama.cpp's converter applies. ``rope_scaling`` other than none is refused (the RoPE table
would be wrong); ``tie_word_embeddings`` is honoured.

Tokenizer: the folder's ``tokenizer.json`` is copied verbatim; ``tokenizer_config.json``
(chat template, ``add_bos_token``, special tokens) is copied with the chat template from
``chat_template.jinja`` folded in when that newer file exists. EOS ids come from
``generation_config.json`` (a list is kept) or ``config.json``.

Errors are :class:`HFCheckpointError` (a ``ValueError``) naming the folder and what is wrong.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .weights import DecoderConfig, DecoderWeights, half_to_interleaved_rows

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint folder cannot be converted (names the folder and problem)."""


@dataclass
class HFModel:
    """A Hugging Face checkpoint read into the common types."""

    weights: DecoderWeights
    folder: Path
    bos_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)

    def write_tokenizer(self, out: Path) -> list[Path]:
        """Copy ``tokenizer.json`` and write ``tokenizer_config.json`` / ``special_tokens_map.json``.

        Raises:
            HFCheckpointError: the folder has no ``tokenizer.json``.
        """
        src = self.folder / "tokenizer.json"
        if not src.is_file():
            raise HFCheckpointError(f"{self.folder}: no tokenizer.json (the converter needs the fast tokenizer file)")
        out = Path(out)
        shutil.copyfile(src, out / "tokenizer.json")
        cfg = dict(self.tokenizer_config)
        cfg.setdefault("model_max_length", self.weights.config.seq_len)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        smap = self.folder / "special_tokens_map.json"
        if smap.is_file():
            shutil.copyfile(smap, out / "special_tokens_map.json")
        else:
            doc = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)}
            (out / "special_tokens_map.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HFCheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index, "shard index").get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise HFCheckpointError(f"{folder}: shard(s) named by the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFCheckpointError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not read; convert them to safetensors)")
    return files


def config_from_hf(cfg: dict, where: str) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``config.json`` document.

    Raises:
        HFCheckpointError: unsupported architecture or RoPE scaling, or a missing field.
    """
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise HFCheckpointError(f"{where}: architectures={archs!r} not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    scaling = cfg.get("rope_scaling")
    if scaling not in (None, {}) and (scaling or {}).get("rope_type", scaling.get("type")) not in (None, "default"):
        raise HFCheckpointError(f"{where}: rope_scaling={scaling!r} is not supported")
    try:
        heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or dim // heads)
        c = DecoderConfig(
            dim=dim, hidden_dim=int(cfg["intermediate_size"]), n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]), seq_len=int(cfg.get("max_position_embeddings", 2048)),
            shared_classifier=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            head_dim=None if head_dim == dim // heads else head_dim,
            architecture={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[arch])
    except KeyError as e:
        raise HFCheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"{where}: config.json has a bad value ({e})") from None
    try:
        return c.validate(where)
    except ValueError as e:
        raise HFCheckpointError(str(e)) from None


def load_hf(folder: str | Path, progress: Callable[[str], None] | None = None) -> HFModel:
    """Read a Hugging Face checkpoint folder.

    Returns:
        :class:`HFModel` with float32 weights in the interleaved RoPE layout.

    Raises:
        FileNotFoundError: the folder does not exist.
        HFCheckpointError: no config, unsupported architecture/RoPE scaling, no safetensors,
            a missing tensor or a tensor of the wrong shape (names it).
    """
    from safetensors import safe_open

    folder = Path(folder)
    say = progress or (lambda _m: None)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    cfg_doc = _read_json(folder / "config.json", "the model configuration")
    c = config_from_hf(cfg_doc, str(folder))
    files = _tensor_files(folder)
    say(f"reading {len(files)} safetensors file(s) ({c.architecture}, {c.n_layers} layers)")
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), "np") as h:
                for k in h.keys():
                    where[k] = f
        except Exception as e:  # safetensors raises its own SafetensorError
            raise HFCheckpointError(f"{f}: unreadable safetensors file ({e})") from None

    def tensor(name: str) -> np.ndarray:
        f = where.get(name)
        if f is None:
            raise HFCheckpointError(f"{folder}: tensor {name!r} is missing")
        with safe_open(str(f), "np") as h:
            return np.ascontiguousarray(h.get_tensor(name).astype(np.float32))

    L = c.n_layers
    per: dict[str, list[np.ndarray]] = {k: [] for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")}
    bias: dict[str, list[np.ndarray]] = {"bq": [], "bk": [], "bv": []}
    has_bias = "model.layers.0.self_attn.q_proj.bias" in where
    for i in range(L):
        p = f"model.layers.{i}."
        per["wq"].append(half_to_interleaved_rows(tensor(p + "self_attn.q_proj.weight"), c.n_heads))
        per["wk"].append(half_to_interleaved_rows(tensor(p + "self_attn.k_proj.weight"), c.n_kv_heads))
        per["wv"].append(tensor(p + "self_attn.v_proj.weight"))
        per["wo"].append(tensor(p + "self_attn.o_proj.weight"))
        per["rms_att"].append(tensor(p + "input_layernorm.weight"))
        per["rms_ffn"].append(tensor(p + "post_attention_layernorm.weight"))
        per["w1"].append(tensor(p + "mlp.gate_proj.weight"))
        per["w2"].append(tensor(p + "mlp.down_proj.weight"))
        per["w3"].append(tensor(p + "mlp.up_proj.weight"))
        if has_bias:
            bias["bq"].append(half_to_interleaved_rows(tensor(p + "self_attn.q_proj.bias"), c.n_heads))
            bias["bk"].append(half_to_interleaved_rows(tensor(p + "self_attn.k_proj.bias"), c.n_kv_heads))
            bias["bv"].append(tensor(p + "self_attn.v_proj.bias"))
    emb = tensor("model.embed_tokens.weight")
    if c.shared_classifier or "lm_head.weight" not in where:
        wcls = emb
        if not c.shared_classifier:
            raise HFCheckpointError(f"{folder}: tensor 'lm_head.weight' is missing (tie_word_embeddings is false)")
    else:
        wcls = tensor("lm_head.weight")
    try:
        w = DecoderWeights(config=c, token_embedding=emb, rms_final=tensor("model.norm.weight"), wcls=wcls, source=folder,
                           **{k: np.stack(v) for k, v in per.items()},
                           **({k: np.stack(v) for k, v in bias.items()} if has_bias else {})).check_shapes(str(folder))
    except ValueError as e:
        raise HFCheckpointError(str(e)) from None

    tok_cfg: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(folder / "tokenizer_config.json", "tokenizer settings")
    if (folder / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (folder / "chat_template.jinja").read_text()
    gen = _read_json(folder / "generation_config.json", "") if (folder / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", cfg_doc.get("eos_token_id"))
    eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos])] if eos is not None else []
    if not eos_ids:
        raise HFCheckpointError(f"{folder}: no eos_token_id in config.json or generation_config.json")
    bos = gen.get("bos_token_id", cfg_doc.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg_doc.get("pad_token_id"))
    return HFModel(weights=w, folder=folder, bos_token_id=int(bos if bos is not None else eos_ids[0]),
                   eos_token_ids=eos_ids, pad_token_id=None if pad is None else int(pad), tokenizer_config=tok_cfg)
