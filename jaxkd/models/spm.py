"""SentencePiece tokenization from a GGUF file's vocabulary, as llama.cpp's SPM tokenizer.

A GGUF file of ``tokenizer.ggml.model = 'llama'`` (Gemma's, LLaMA's) holds the tokens, a
score per token and a type per token (1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte). llama.cpp (``llama-vocab.cpp``) encodes a text in three steps, which
:meth:`SpmTokenizer.encode` follows:

1. Partition: every user-defined token (Gemma's ``"\\n"``, runs of spaces, HTML tags) found
   in the raw text is cut out as that token, the longest tokens first (control tokens such
   as ``<bos>`` only when ``parse_special``).
2. Each remaining piece (``' '`` written ``'▁'``; a ``'▁'`` prefix only with
   ``add_space_prefix``) starts as one symbol per UTF-8 character; the adjacent pair whose
   concatenation is a token of the highest score (ties: the leftmost) is merged, again and
   again, until no adjacent pair is a token.
3. Each final symbol is its token if it is one, else the two symbols it was merged from,
   recursively, and a character that is no token becomes its UTF-8 bytes' ``<0xHH>`` tokens.

``<bos>`` is prepended when the file says ``add_bos_token``. :meth:`decode` inverts it
(control tokens dropped, ``'▁'`` -> ``' '``, byte tokens joined into UTF-8).
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Sequence
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # '▁'


class SpmTokenizer:
    """llama.cpp's SPM tokenizer over one vocabulary (module docstring)."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = True,
                 add_space_prefix: bool = False):
        self.tokens, self.scores, self.types = list(tokens), list(scores), list(types)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_space_prefix = bool(add_bos), bool(add_space_prefix)
        self.ids = {t: i for i, t in enumerate(self.tokens)}  # a repeated text: the last id
        specials = [i for i, k in enumerate(self.types) if k in (CONTROL, USER_DEFINED, UNKNOWN)]
        self.specials = sorted(specials, key=lambda i: -len(self.tokens[i]))
        self.bytes = {int(m.group(1), 16): i for i, t in enumerate(self.tokens)
                      if self.types[i] == BYTE and (m := re.fullmatch(r"<0x([0-9A-F]{2})>", t))}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------------- encode

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        pieces: list[str | int] = [text]
        for token in self.specials:
            if not parse_special and self.types[token] in (CONTROL, UNKNOWN):
                continue
            special = self.tokens[token]
            if not special:
                continue
            out: list[str | int] = []
            for piece in pieces:
                if not isinstance(piece, str) or special not in piece:
                    out.append(piece)
                    continue
                parts = piece.split(special)
                for k, part in enumerate(parts):
                    if part:
                        out.append(part)
                    if k < len(parts) - 1:
                        out.append(token)
            pieces = out
        return pieces

    def _spm(self, text: str, out: list[int]) -> None:
        symbols = list(text)  # one symbol per character (UTF-8 sequence)
        n = len(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        queue: list[tuple[float, int, int, str]] = []
        merged_from: dict[str, tuple[int, int, str, str]] = {}

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            joined = symbols[left] + symbols[right]
            token = self.ids.get(joined)
            if token is None:
                return
            # highest score first, then the leftmost pair
            heapq.heappush(queue, (-self.scores[token], left, right, joined))
            merged_from[joined] = (left, right, symbols[left], symbols[right])

        for i in range(1, n):
            push(i - 1, i)
        while queue:
            _, left, right, joined = heapq.heappop(queue)
            if (not alive[left] or not alive[right] or nxt[left] != right
                    or symbols[left] + symbols[right] != joined):
                continue
            symbols[left] = joined
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        def resegment(piece: str) -> None:
            token = self.ids.get(piece)
            if token is not None:
                out.append(token)
                return
            split = merged_from.get(piece)
            if split is None:
                for byte in piece.encode("utf-8"):
                    out.append(self.bytes[byte])
                return
            resegment(split[2])
            resegment(split[3])

        i = 0 if n else -1
        while i >= 0:
            resegment(symbols[i])
            i = nxt[i]

    def encode(self, text: str, *, add_bos: bool | None = None,
               parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (``<bos>`` first when ``add_bos``, default the file's)."""
        out: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            out.append(self.bos_id)
        previous_special = True
        for piece in self._partition(text, parse_special):
            if isinstance(piece, int):
                out.append(piece)
                previous_special = True
                continue
            if self.add_space_prefix and previous_special:
                piece = " " + piece
            if piece:
                self._spm(piece.replace(" ", SPACE), out)
            previous_special = False
        return out

    # ------------------------------------------------------------------------- decode

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (control tokens dropped)."""
        data = bytearray()
        for i in ids:
            kind, text = self.types[int(i)], self.tokens[int(i)]
            if kind == CONTROL:
                continue
            if kind == BYTE:
                data.append(int(text[3:5], 16))
            else:
                data.extend(text.replace(SPACE, " ").encode("utf-8"))
        return data.decode("utf-8", errors="replace")


def from_gguf(path: str) -> SpmTokenizer:
    """The tokenizer in a GGUF file's metadata (``tokenizer.ggml.*``)."""
    import gguf

    from jaxkd.schema import ConfigError

    reader = gguf.GGUFReader(os.fspath(path))

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    if field("model") != "llama":
        raise ConfigError(f"{path}: tokenizer.ggml.model={field('model')!r}; jaxkd reads "
                          "SentencePiece ('llama') vocabularies")
    return SpmTokenizer(field("tokens"), field("scores"), field("token_type"),
                        bos_id=field("bos_token_id"), eos_id=field("eos_token_id"),
                        add_bos=field("add_bos_token", True),
                        add_space_prefix=field("add_space_prefix", False))
