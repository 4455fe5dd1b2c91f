"""Tokenizer access and streaming detokenization for any model folder with ``tokenizer.json``.

Uses the Hugging Face ``tokenizers`` library (the same file onnxruntime-genai and
``transformers.AutoTokenizer`` read), so the engine is not tied to one tokenizer family.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ..model.spec import DecoderSpec, ModelFolderError


class TextCodec:
    """Encode prompts and decode generated ids for one model folder.

    Raises:
        ModelFolderError: the folder has no ``tokenizer.json``.
    """

    def __init__(self, spec: DecoderSpec):
        path = Path(spec.folder) / "tokenizer.json"
        if not path.is_file():
            raise ModelFolderError(f"{str(spec.folder)!r} has no tokenizer.json")
        self.spec = spec
        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of ``text``; starts with BOS when ``bos`` and the model's tokenizer adds
        one (``add_bos_token``; added once, never twice). Special-token text such as
        ``<|im_start|>`` in ``text`` becomes its special id (chat templates rely on it)."""
        # encode_batch releases the GIL while the Rust tokenizer runs (encode holds it), so a
        # long prompt tokenized in a worker thread does not stall the server's event loop
        ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        if bos and self.spec.add_bos_token and (not ids or ids[0] != self.spec.bos_token_id):
            ids = [self.spec.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that are safe to print.

    The vLLM method: decode a short window twice (with and without the newest tokens) and
    emit the difference, holding back pieces that end in an incomplete UTF-8 sequence
    (U+FFFD). Seeding with the prompt's last tokens keeps the first generated token's
    leading space, which SentencePiece-style decoders strip at the start of a text.
    """

    def __init__(self, codec: TextCodec, seed_ids: list[int] = ()):  # type: ignore[assignment]
        self.codec = codec
        self.ids: list[int] = list(seed_ids)[-6:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one id; return the new printable text (may be empty)."""
        self.ids.append(token_id)
        prefix = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.codec.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        piece = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return piece


class StopStream:
    """Generated text with stop strings, for streaming.

    Each :meth:`add` detokenizes one id, cuts the text before the first stop string if one
    appeared, and returns the piece that is safe to emit: text that could still grow into a
    stop string is held back until it is resolved. :attr:`text` is the output so far (stop
    string excluded); :meth:`rest` is what was held back and never became a stop string.
    """

    def __init__(self, detok: IncrementalDetokenizer, stops: list[str]):
        self.detok = detok
        self.stops = list(stops)
        self.text = ""
        self.emitted = 0

    def _holdback(self) -> int:
        """Characters at the end of the text that could still grow into a stop string."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one id; returns ``(piece to emit, a stop string was reached)``."""
        self.text += self.detok.add(token_id)
        hit = -1
        for s in self.stops:
            i = self.text.find(s, max(0, self.emitted - len(s)))
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            self.text = self.text[:hit]
        upto = len(self.text) if hit != -1 else len(self.text) - self._holdback()
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece, hit != -1

    def rest(self) -> str:
        """Held-back text not yet emitted."""
        return self.text[self.emitted :]
