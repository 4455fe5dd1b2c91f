"""Tokenizer files of a model folder: ``tokenizer.json`` (Hugging Face ``tokenizers``),
``tokenizer_config.json`` (chat template, special tokens, ``add_bos_token``) and
``special_tokens_map.json`` — what ``AutoTokenizer``, ``og.Tokenizer`` and the engine read.

:func:`tokenizer_from_gguf_vocab` builds the ``tokenizers.Tokenizer`` from a GGUF file's
``tokenizer.ggml.*`` arrays, the way llama.cpp interprets them:

* ``gpt2`` (byte-level BPE: SmolLM2, Llama 3, Qwen2, StarCoder…): ``BPE(vocab, merges)``
  with the pre-tokenizer named by ``tokenizer.ggml.pre`` — the same split regexes as
  llama.cpp ``llama-vocab.cpp`` (``LLAMA_VOCAB_PRE_TYPE_*``) and the models' own
  ``tokenizer.json``;
* ``llama`` (SentencePiece BPE with byte fallback: Llama 2, Mistral, TinyLlama, llama2.c):
  merges are derived from the piece scores (a merge ``a + b`` exists when both halves and
  the whole are pieces, ranked by the whole's score — transformers'
  ``SentencePieceExtractor``), with the ``▁`` normalizer/decoder of Hugging Face's
  ``LlamaTokenizerFast``.

Token types (GGUF ``tokenizer.ggml.token_type``): 3 = control (added as special tokens,
skipped when decoding), 4 = user-defined (added tokens, kept when decoding), 6 = byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

CONTROL, USER_DEFINED, BYTE = 3, 4, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(regex: str | None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    parts: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        parts.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        parts.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(parts) if len(parts) > 1 else parts[0]


#: ``tokenizer.ggml.pre`` → pre-tokenizer (llama.cpp ``llama_vocab::impl::load`` groups).
GPT2_PRE_TOKENIZERS = {
    "default": lambda: _byte_level(None), "gpt-2": lambda: _byte_level(None), "gpt2": lambda: _byte_level(None),
    "phi-2": lambda: _byte_level(None), "olmo": lambda: _byte_level(None),
    "smollm": lambda: _byte_level(None, digits=True), "starcoder": lambda: _byte_level(None, digits=True),
    "refact": lambda: _byte_level(None, digits=True), "codeshell": lambda: _byte_level(None, digits=True),
    "llama-bpe": lambda: _byte_level(_LLAMA3_REGEX), "llama3": lambda: _byte_level(_LLAMA3_REGEX),
    "smaug-bpe": lambda: _byte_level(_LLAMA3_REGEX),
    "qwen2": lambda: _byte_level(_QWEN2_REGEX), "deepseek-r1-qwen": lambda: _byte_level(_QWEN2_REGEX),
}


class TokenizerBuildError(ValueError):
    """The GGUF vocabulary cannot be turned into a tokenizer (names what is unsupported)."""


@dataclass
class TokenizerFiles:
    """Everything the tokenizer files of a model folder say.

    Attributes:
        tokenizer: the ``tokenizers.Tokenizer`` (saved as ``tokenizer.json``).
        bos_token_id: beginning-of-sequence id; ``add_bos_token`` says whether plain
            prompts start with it (SmolLM2 and Qwen2: no; Llama: yes).
        eos_token_ids: every id that ends generation (first = the tokenizer's EOS).
        pad_token_id: padding id (defaults to the first EOS).
        chat_template: Jinja chat template (Hugging Face ``apply_chat_template`` syntax) or None.
        context_length: ``model_max_length`` in tokens.
    """

    tokenizer: Tokenizer
    bos_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int | None = None
    add_bos_token: bool = True
    chat_template: str | None = None
    context_length: int = 2048
    extra_config: dict = field(default_factory=dict)

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(int(i))

    def tokenizer_config(self) -> dict:
        """The ``tokenizer_config.json`` document (``PreTrainedTokenizerFast``)."""
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.context_length,
            "bos_token": self.token(self.bos_token_id),
            "eos_token": self.token(self.eos_token_ids[0]),
            "pad_token": self.token(self.pad_token_id if self.pad_token_id is not None else self.eos_token_ids[0]),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        cfg.update(self.extra_config)
        return cfg

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
        folder = Path(folder)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        cfg = self.tokenizer_config()
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        smap = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token") if cfg.get(k)}
        (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
        return [folder / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]


def _add_typed_tokens(tok: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece pieces and scores (transformers'
    ``SentencePieceExtractor.extract``): ``(a, b)`` for every split of a normal piece into
    two pieces, ordered by the whole piece's score (higher first), then by the halves' ids."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, 0)}
    merges = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[pid], vocab[a], vocab[b], a, b))
    merges.sort()
    return [(a, b) for *_k, a, b in merges]


def tokenizer_from_gguf_vocab(model: str, pre: str | None, tokens: Sequence[str], types: Sequence[int],
                              merges: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                              add_space_prefix: bool = True) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` arrays.

    Args:
        model: ``tokenizer.ggml.model`` (``gpt2`` or ``llama``).
        pre: ``tokenizer.ggml.pre`` (gpt2 only; see :data:`GPT2_PRE_TOKENIZERS`).
        tokens, types: pieces and token types, one per id.
        merges: ``"a b"`` strings (gpt2).
        scores: piece scores (llama).
        add_space_prefix: SentencePiece's ``add_dummy_prefix`` (llama).

    Raises:
        TokenizerBuildError: unknown tokenizer model or pre-tokenizer, or missing arrays.
    """
    if len(types) != len(tokens):
        raise TokenizerBuildError(f"{len(tokens)} tokens but {len(types)} token types")
    if model == "gpt2":
        if merges is None:
            raise TokenizerBuildError("byte-level BPE vocabulary without tokenizer.ggml.merges")
        key = (pre or "default").lower()
        if key not in GPT2_PRE_TOKENIZERS:
            raise TokenizerBuildError(
                f"tokenizer.ggml.pre={pre!r} is not supported; known: {', '.join(sorted(GPT2_PRE_TOKENIZERS))}")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=key in ("llama-bpe", "llama3")))
        tok.pre_tokenizer = GPT2_PRE_TOKENIZERS[key]()
        tok.decoder = decoders.ByteLevel()
    elif model == "llama":
        if scores is None:
            raise TokenizerBuildError("SentencePiece vocabulary without tokenizer.ggml.scores")
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = next((t for t, k in zip(tokens, types) if k == 2), None)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        norm = [normalizers.Replace(" ", "▁")]
        if add_space_prefix:
            norm.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(norm)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        raise TokenizerBuildError(f"tokenizer.ggml.model={model!r} is not supported (supported: gpt2, llama)")
    _add_typed_tokens(tok, tokens, types)
    return tok
