"""The decoder description the engine needs, read from a model folder's ``genai_config.json``.

A model folder written by ``inferos convert`` (or any onnxruntime-genai decoder folder with
explicit past/present KV-cache I/O) holds:

* ``model.onnx`` – standard decoder: inputs ``input_ids`` int64 [batch, seq],
  ``attention_mask`` int64 [batch, past_len + seq], ``position_ids`` int64 [batch, seq],
  ``past_key_values.{i}.key|value`` float32 [batch, kv_heads, past_len, head_dim];
  outputs ``logits`` float32 [batch, seq, vocab], ``present.{i}.key|value`` float32
  [batch, kv_heads, past_len + seq, head_dim].
* optionally ``model_tiered.onnx`` – the same decoder reading a tiered quantized KV cache
  (see :mod:`lemonade_inferos.kv.graph`).
* ``genai_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or not a decoder inferos can drive."""


@dataclass(frozen=True)
class DecoderSpec:
    """Shape facts of a decoder-only transformer with explicit KV-cache I/O."""

    folder: Path
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    filename: str = "model.onnx"
    past_key_name: str = "past_key_values.%d.key"
    past_value_name: str = "past_key_values.%d.value"
    present_key_name: str = "present.%d.key"
    present_value_name: str = "present.%d.value"
    name: str = ""
    #: plain prompts start with BOS (``tokenizer_config.json`` ``add_bos_token``; SmolLM2
    #: and Qwen2 say false, Llama and llama2.c true; absent = true)
    add_bos_token: bool = True

    @property
    def model_path(self) -> Path:
        return self.folder / self.filename

    @property
    def tiered_model_path(self) -> Path:
        return self.folder / "model_tiered.onnx"

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """K+V bytes one token occupies across all layers at the given element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    @classmethod
    def from_folder(cls, folder: str | Path) -> "DecoderSpec":
        """Read ``genai_config.json`` from ``folder``.

        Raises:
            ModelFolderError: the folder or its config is missing, or the config lacks a
                field (the message names it).
        """
        folder = Path(folder).expanduser().resolve()
        cfg_path = folder / "genai_config.json"
        if not folder.is_dir():
            raise ModelFolderError(f"model folder {str(folder)!r} does not exist")
        if not cfg_path.is_file():
            raise ModelFolderError(
                f"{str(folder)!r} has no genai_config.json; convert a checkpoint first with "
                "'inferos convert llama2c CHECKPOINT TOKENIZER OUT_DIR'"
            )
        try:
            cfg = json.loads(cfg_path.read_text())
            m = cfg["model"]
            d = m["decoder"]
            eos = m["eos_token_id"]
            eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
            inputs = d.get("inputs", {})
            outputs = d.get("outputs", {})
            return cls(
                folder=folder,
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                num_kv_heads=int(d["num_key_value_heads"]),
                head_dim=int(d["head_size"]),
                hidden_size=int(d["hidden_size"]),
                vocab_size=int(m["vocab_size"]),
                context_length=int(m["context_length"]),
                bos_token_id=int(m["bos_token_id"]),
                eos_token_ids=eos_ids,
                pad_token_id=int(m.get("pad_token_id", eos_ids[0])),
                filename=d.get("filename", "model.onnx"),
                past_key_name=inputs.get("past_key_names", "past_key_values.%d.key"),
                past_value_name=inputs.get("past_value_names", "past_key_values.%d.value"),
                present_key_name=outputs.get("present_key_names", "present.%d.key"),
                present_value_name=outputs.get("present_value_names", "present.%d.value"),
                name=folder.name,
                add_bos_token=_add_bos(folder),
            )
        except KeyError as e:
            raise ModelFolderError(f"{cfg_path}: missing field {e.args[0]!r}") from None
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ModelFolderError(f"{cfg_path}: not a valid genai_config.json ({e})") from None


def _add_bos(folder: Path) -> bool:
    """``add_bos_token`` of the folder's ``tokenizer_config.json`` (absent or unreadable: True)."""
    try:
        v = json.loads((folder / "tokenizer_config.json").read_text()).get("add_bos_token", True)
    except (OSError, ValueError, AttributeError):
        return True
    return bool(v) if v is not None else True
