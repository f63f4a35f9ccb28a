"""Log-probabilities in OpenAI's two response shapes, and the text and bytes of single tokens.

The engine reports each output token's log-probability and its ``k`` most likely alternatives
(``ponder.engine.TokenLogprob``: the model's own distribution, before temperature and top-k/top-p). Here they become
OpenAI's objects: chat completions' ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`` and legacy
completions' ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.

A token's text is the tokenizer's decoding of that token alone (special tokens included). Where a token holds only
part of a UTF-8 character (byte-level BPE splits characters across tokens), that text is U+FFFD, so its ``bytes``
come from the token's own symbols instead: byte-level BPE (GPT-2 and its descendants, SmolLM2's among them) spells
each byte as one printable character, and SentencePiece spells a raw byte as ``<0xAB>``.
"""

from __future__ import annotations

import re
from typing import Any

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_symbols() -> dict[str, int]:
    """Byte-level BPE's alphabet, as a map from symbol to byte: printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, NBSP, soft hyphen) take the code points from 256 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


class TokenPieces:
    """Text and bytes of single tokens for one tokenizer, remembered once computed. Not thread-safe, like the
    tokenizer: the server calls it on its engine loop thread only."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int]]] = {}
        self._symbols = _byte_level_symbols()

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._known:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = text.encode("utf-8")
            if "\ufffd" in text:
                raw = self._raw(token) or raw
            self._known[token] = (text, list(raw))
        return self._known[token]

    def _raw(self, token: int) -> bytes | None:
        symbol = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(symbol, str):
            return None
        if m := _SP_BYTE.match(symbol):
            return bytes([int(m.group(1), 16)])
        if symbol and all(ch in self._symbols for ch in symbol):
            return bytes(self._symbols[ch] for ch in symbol)
        return None


def pieces_of(pieces: TokenPieces, entries: list[Any]) -> dict[int, tuple[str, list[int]]]:
    """Every token an event's ``TokenLogprob`` entries mention, with its text and bytes (on the loop thread)."""
    ids = {e.token for e in entries} | {t for e in entries for t, _ in e.top}
    return {t: pieces(t) for t in ids}


def chat_logprobs(entries: list[Any], pieces: dict[int, tuple[str, list[int]]]) -> dict[str, Any]:
    """Chat completions' ``logprobs`` object for these tokens."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = pieces[token]
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(t, v) for t, v in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[Any], pieces: dict[int, tuple[str, list[int]]], offset: int) -> dict[str, Any]:
    """Legacy completions' ``logprobs`` object for these tokens; ``offset``: characters of the completion's text
    before the first of them (``text_offset`` counts from the start of the completion)."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(pieces[e.token][0])
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{pieces[t][0]: v for t, v in e.top} for e in entries], "text_offset": offsets}
