"""The llama2.c tokenizer (``tok512.bin`` etc.) and its Hugging Face ``tokenizer.json`` form.

Binary format (karpathy/llama2.c ``run.c`` ``build_tokenizer``): int32 ``max_token_length``,
then per token: float32 score, int32 byte length, the token's bytes. Token 0 is ``<unk>``,
1 BOS, 2 EOS, 3..258 the byte fallbacks ``<0x00>``..``<0xFF>``; ordinary tokens carry
their text with a *plain* leading space (``b" t"``).

:meth:`Llama2cTokenizer.encode` reproduces llama2.c ``encode()`` exactly (dummy-prefix
``" "`` token, per-UTF-8-character lookup with byte fallback, then repeatedly merge the
leftmost adjacent pair whose concatenation is the best-scoring token).

:meth:`Llama2cTokenizer.to_hf_tokenizer_json` writes the equivalent Hugging Face
``tokenizers`` pipeline in the layout of HF's SentencePiece→BPE conversion
(``transformers.convert_slow_tokenizer.LlamaConverter`` / ``SentencePieceExtractor``):
spaces become ``"▁"`` (U+2581), a ``"▁"`` dummy prefix is prepended, BPE with byte fallback
and merges ranked by the score of the merged piece, a BOS template post-processor.
"""

from __future__ import annotations

import codecs
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's whitespace marker

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # token id of <0x00>

#: HF names of the special tokens (llama2.c stores BOS/EOS as "\n<s>\n" / "\n</s>\n").
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"

#: The plain chat template written to tokenizer_config.json (valid Jinja, as HF renders it).
#: Messages become "System: ...\n", "User: ...\n", "Assistant: ...\n" lines; with
#: ``add_generation_prompt`` the prompt ends in "Assistant:". BOS is added by the tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _byte_token(b: int) -> bytes:
    return f"<0x{b:02X}>".encode()


@dataclass(frozen=True, eq=False)
class Llama2cTokenizer:
    """A loaded llama2.c tokenizer.

    Attributes:
        pieces: token bytes by id (``pieces[i]``), exactly as stored in the file.
        scores: merge scores by id (float; higher merges first).
        max_token_length: from the file header (bytes).
    """

    pieces: tuple[bytes, ...]
    scores: tuple[float, ...]
    max_token_length: int
    source: Path | None = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> "Llama2cTokenizer":
        """Read a llama2.c ``tokenizer.bin``.

        Args:
            path: the file (e.g. ``tok512.bin``).
            vocab_size: expected number of tokens; ``None`` reads until the end of file.

        Raises:
            FileNotFoundError: missing file.
            ValueError: truncated/corrupt file, fewer than 259 tokens (no byte fallbacks), a
                byte-fallback token not spelled ``<0xXX>``, or a count mismatch; the message
                names the file and the token index.
        """
        path = Path(path)
        data = path.read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path}: truncated tokenizer file ({len(data)} bytes)")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= 1 << 16:
            raise ValueError(f"{path}: max_token_length={max_len} is out of range (corrupt?)")
        off = 4
        pieces: list[bytes] = []
        scores: list[float] = []
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if off + 8 > len(data):
                raise ValueError(f"{path}: truncated at token {len(pieces)} (offset {off})")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if not 0 < n <= max_len or off + n > len(data):
                raise ValueError(
                    f"{path}: token {len(pieces)} has invalid length {n} at offset {off - 4} "
                    f"(max_token_length={max_len}, file size {len(data)}); truncated or corrupt"
                )
            pieces.append(data[off : off + n])
            scores.append(score)
            off += n
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{path}: holds {len(pieces)} tokens, expected vocab_size={vocab_size}")
        if vocab_size is not None and off != len(data):
            raise ValueError(f"{path}: {len(data) - off} trailing bytes after {vocab_size} tokens")
        if len(pieces) < BYTE_OFFSET + 256:
            raise ValueError(f"{path}: only {len(pieces)} tokens; llama2.c needs >= 259")
        for b in range(256):
            if pieces[BYTE_OFFSET + b] != _byte_token(b):
                raise ValueError(
                    f"{path}: token {BYTE_OFFSET + b} is {pieces[BYTE_OFFSET + b]!r}, "
                    f"expected byte fallback {_byte_token(b)!r}"
                )
        return cls(tuple(pieces), tuple(scores), max_len, path)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lookup", {p: i for i, p in enumerate(self.pieces)})

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` exactly as llama2.c ``encode()``.

        Args:
            text: any Unicode string (encoded as UTF-8).
            bos: prepend BOS (id 1).
            eos: append EOS (id 2).

        Returns:
            list of int ids. A non-empty text starts (after BOS) with the dummy-prefix
            merge of ``" "``; characters missing from the vocab become byte tokens 3..258.
        """
        lookup: dict[bytes, int] = self._lookup  # type: ignore[attr-defined]
        ids: list[int] = [BOS_ID] if bos else []
        toks: list[int] = []
        if text:
            toks.append(lookup[b" "])
        for ch in text:
            b = ch.encode("utf-8")
            tid = lookup.get(b)
            if tid is not None:
                toks.append(tid)
            else:
                toks.extend(BYTE_OFFSET + x for x in b)
        pieces, scores = self.pieces, self.scores
        while True:
            best_score, best_id, best_idx = -1e10, -1, -1
            for i in range(len(toks) - 1):
                tid = lookup.get(pieces[toks[i]] + pieces[toks[i + 1]], -1)
                if tid != -1 and scores[tid] > best_score:
                    best_score, best_id, best_idx = scores[tid], tid, i
            if best_idx == -1:
                break
            toks[best_idx : best_idx + 2] = [best_id]
        ids.extend(toks)
        if eos:
            ids.append(EOS_ID)
        return ids

    def piece_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for (byte fallbacks resolved; BOS/EOS/UNK → b"")."""
        if token_id in (UNK_ID, BOS_ID, EOS_ID):
            return b""
        if BYTE_OFFSET <= token_id < BYTE_OFFSET + 256:
            return bytes([token_id - BYTE_OFFSET])
        return self.pieces[token_id]

    def decode_piece(self, prev_id: int, token_id: int) -> bytes:
        """Bytes of ``token_id`` in context, as llama2.c ``decode(prev, token)``.

        The leading space of a piece right after BOS is stripped (SentencePiece's dummy
        prefix). Returns *bytes*: a byte-fallback token may be part of a multi-byte UTF-8
        character, so stream through :class:`IncrementalDecoder` to get text.

        Raises:
            IndexError: ``token_id`` is not in the vocab.
        """
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} outside vocab of {self.vocab_size}")
        b = self.piece_bytes(token_id)
        if prev_id == BOS_ID and b.startswith(b" "):
            b = b[1:]
        return b

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: special tokens dropped, byte fallbacks joined into UTF-8.

        The dummy-prefix space after BOS is stripped as in llama2.c (a sequence without
        BOS keeps its leading space). Invalid UTF-8 becomes U+FFFD.
        """
        out = bytearray()
        prev = -1
        for t in ids:
            out += self.decode_piece(prev, int(t))
            prev = int(t)
        return out.decode("utf-8", errors="replace")

    def incremental_decoder(self, prev_id: int = BOS_ID) -> "IncrementalDecoder":
        """A streaming detokenizer continuing after ``prev_id`` (default: right after BOS)."""
        return IncrementalDecoder(self, prev_id)

    # ---------------------------------------------------------------- HF export
    def hf_vocab(self) -> dict[str, int]:
        """HF token strings by id: specials renamed, spaces → ``"▁"``, bytes as ``<0xXX>``.

        Raises:
            ValueError: a piece is not valid UTF-8 or two pieces map to the same string.
        """
        vocab: dict[str, int] = {}
        for i, p in enumerate(self.pieces):
            if i == UNK_ID:
                s = UNK_TOKEN
            elif i == BOS_ID:
                s = BOS_TOKEN
            elif i == EOS_ID:
                s = EOS_TOKEN
            else:
                try:
                    s = p.decode("utf-8").replace(" ", SPIECE_UNDERLINE)
                except UnicodeDecodeError:
                    raise ValueError(f"token {i} {p!r} is not valid UTF-8") from None
            if s in vocab:
                raise ValueError(f"tokens {vocab[s]} and {i} both map to {s!r}")
            vocab[s] = i
        return vocab

    def hf_merges(self) -> list[tuple[str, str]]:
        """BPE merges derived from the scores, best first.

        Every split of every multi-character non-byte piece into two in-vocab pieces is a
        merge; merges are ranked by the merged piece's score (descending, ties by id), as
        HF's ``SentencePieceExtractor`` does. This reproduces llama2.c's "merge the best
        scoring pair" loop as BPE merge ranks.
        """
        vocab = self.hf_vocab()
        ordinary = {s: i for s, i in vocab.items() if i >= BYTE_OFFSET + 256}
        merges: list[tuple[float, int, int, tuple[str, str]]] = []
        for s, i in ordinary.items():
            for k in range(1, len(s)):
                a, b = s[:k], s[k:]
                if a in ordinary and b in ordinary:
                    merges.append((-self.scores[i], i, ordinary[b], (a, b)))
        merges.sort()
        return [m[3] for m in merges]

    def to_hf_tokenizer_json(self) -> dict:
        """The ``tokenizer.json`` document (a dict; dump with :func:`json.dumps`).

        Pipeline: normalizer ``Prepend("▁")`` + ``Replace(" ", "▁")`` (SentencePiece's
        ``add_dummy_prefix``, as in HF's Llama conversion with ``legacy=True``), no
        pre-tokenizer, ``BPE(byte_fallback=True, fuse_unk=True)``, a ``TemplateProcessing``
        post-processor adding ``<s>``, decoder ``Replace("▁", " ")``, ``ByteFallback``,
        ``Fuse``, ``Strip(" ", 1, 0)``.
        """
        specials = [(UNK_ID, UNK_TOKEN), (BOS_ID, BOS_TOKEN), (EOS_ID, EOS_TOKEN)]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for i, s in specials
            ],
            "normalizer": {
                "type": "Sequence",
                "normalizers": [
                    {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
                    {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE},
                ],
            },
            "pre_tokenizer": None,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
                "pair": [
                    {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS_ID], "tokens": [BOS_TOKEN]}},
            },
            "decoder": {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ],
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": UNK_TOKEN,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": True,
                "byte_fallback": True,
                "ignore_merges": False,
                "vocab": self.hf_vocab(),
                "merges": [list(m) for m in self.hf_merges()],
            },
        }

    def hf_tokenizer_config(self, context_length: int) -> dict:
        """The ``tokenizer_config.json`` document (add_bos_token, plain chat template).

        ``tokenizer_class`` is ``PreTrainedTokenizerFast`` rather than
        ``LlamaTokenizerFast``: transformers >= 5 rebuilds Llama tokenizers around a
        ``Metaspace`` pre-tokenizer that skips the dummy prefix when the text already
        starts with a space (``"  two"`` → one token fewer than llama2.c/SentencePiece),
        while ``PreTrainedTokenizerFast`` runs ``tokenizer.json`` verbatim. onnxruntime-genai
        reads the same ``tokenizer.json`` either way (its ``encode`` adds BOS only with
        ``update_options(add_special_tokens="true")``).
        """
        added = {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in [(UNK_ID, UNK_TOKEN), (BOS_ID, BOS_TOKEN), (EOS_ID, EOS_TOKEN)]
        }
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": UNK_TOKEN,
            "pad_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": context_length,
            "padding_side": "left",
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE,
        }

    @staticmethod
    def special_tokens_map() -> dict:
        """The ``special_tokens_map.json`` document."""
        return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}

    def write_hf_files(self, folder: str | Path, context_length: int) -> list[Path]:
        """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
        folder = Path(folder)
        docs = {
            "tokenizer.json": self.to_hf_tokenizer_json(),
            "tokenizer_config.json": self.hf_tokenizer_config(context_length),
            "special_tokens_map.json": self.special_tokens_map(),
        }
        out = []
        for name, doc in docs.items():
            p = folder / name
            p.write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            out.append(p)
        return out


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get only complete UTF-8 text.

    Byte-fallback tokens that start a multi-byte character are held back until the
    character is complete, so concatenating every :meth:`push` result plus :meth:`flush`
    equals :meth:`Llama2cTokenizer.decode` of the same ids (after ``prev_id``).
    """

    def __init__(self, tokenizer: Llama2cTokenizer, prev_id: int = BOS_ID):
        self._tok = tokenizer
        self._prev = prev_id
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by ``token_id`` (possibly ``""``)."""
        b = self._tok.decode_piece(self._prev, int(token_id))
        self._prev = int(token_id)
        return self._dec.decode(b)

    def flush(self) -> str:
        """Any held-back bytes (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)
