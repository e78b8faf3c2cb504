"""Text to token ids and back, for decoders served with ``text_input`` / ``text_output``.

Two kinds: ``byte`` (token id = UTF-8 byte value, ids >= 256 are special; the tiny test decoder
uses it) and a Hugging Face ``tokenizer.json`` (needs the ``tokenizers`` package:
``pip install 'kiln-serve[llm]'``). ``TextStream`` turns tokens into text one token at a time
without splitting a multi-byte character across responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from core.errors import InvalidInputError, MissingDependencyError, RepositoryError

BYTE_TOKENIZER = "byte"
REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Token id = byte value (0..255); ids from 256 up are special tokens and decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as err:
            raise MissingDependencyError(
                f"{str(path)!r} is a Hugging Face tokenizer and the 'tokenizers' package is not installed ({err}); "
                "run: pip install 'kiln-serve[llm]'"
            ) from err
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception subclass for bad files
            raise RepositoryError(f"tokenizer {str(path)!r} does not load ({err}); republish the model") from err

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


def load_tokenizer(kind: str, directory: Path) -> Tokenizer:
    """``byte``, or a tokenizer file (``tokenizer.json``) inside ``directory``."""
    if kind == BYTE_TOKENIZER:
        return ByteTokenizer()
    path = directory / kind
    if "/" in kind or "\\" in kind or kind.startswith("."):
        raise InvalidInputError(f"tokenizer {kind!r} must be 'byte' or a file name inside the version directory")
    if not path.is_file():
        raise RepositoryError(f"tokenizer file {str(path)!r} is missing; republish the model with its tokenizer")
    return JsonTokenizer(path)


class TextStream:
    """Text of a growing token sequence, handed out piece by piece.

    A piece is held back while the text decoded so far ends in an incomplete character (U+FFFD),
    and released with the next token, so no response carries half a UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = 0

    def push(self, token: int) -> str:
        """The new text that ``token`` completes (may be empty)."""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith(REPLACEMENT):
            return ""
        piece, self._sent = text[self._sent :], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character shows as U+FFFD)."""
        text = self._tokenizer.decode(self._ids)
        piece, self._sent = text[self._sent :], len(text)
        return piece
