"""Tokenizers for rebuilding token ids of imported logs, loaded from local files only (no hub).

Accepted ``--tokenizer`` values: a SentencePiece ``.model`` file, a ``tokenizer.json`` file, a
folder holding either, or ``mistral-common:<file>`` for a model file that the PyPI package
``mistral-common`` ships (``mistral-common:tokenizer.model.v1`` is Mixtral's v1 vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError


@dataclass
class Vocab:
    """A loaded tokenizer: ``encode`` text without special tokens, map pieces to ids and back."""

    name: str
    kind: str  # "sentencepiece" or "tokenizers"
    impl: Any

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self.impl.encode(text))
        return list(self.impl.encode(text, add_special_tokens=False).ids)

    def piece_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece, -1 when the vocabulary lacks it."""
        if self.kind == "sentencepiece":
            i = self.impl.piece_to_id(piece)
            return -1 if i == self.impl.unk_id() and piece != self.impl.id_to_piece(i) else int(i)
        i = self.impl.token_to_id(piece)
        return -1 if i is None else int(i)

    def id_to_piece(self, i: int) -> str:
        if self.kind == "sentencepiece":
            return str(self.impl.id_to_piece(int(i)))
        return str(self.impl.id_to_token(int(i)))

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return int(self.impl.get_piece_size())
        return int(self.impl.get_vocab_size(with_added_tokens=True))

    def describe(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` section."""
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size}


def load_vocab(spec: str | Path) -> Vocab:
    """Load a tokenizer from ``spec`` (see the module docstring); errors name the option and the path."""
    text = str(spec)
    if text.startswith("mistral-common:"):
        try:
            import mistral_common
        except ImportError:
            raise ConfigError(
                f"`tokenizer` {text}: needs the package mistral-common (pip install mistral-common)"
            ) from None
        path = Path(mistral_common.__file__).parent / "data" / text.split(":", 1)[1]
        if not path.is_file():
            have = sorted(p.name for p in path.parent.glob("tokenizer.model*"))
            raise ConfigError(f"`tokenizer` {text}: mistral-common has no {path.name}; it has {have}")
        return _sentencepiece(path, text)
    path = Path(text)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _tokenizers(path / "tokenizer.json", text)
        if (path / "tokenizer.model").is_file():
            return _sentencepiece(path / "tokenizer.model", text)
        raise ConfigError(f"`tokenizer` {text}: folder holds neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise ConfigError(
            f"`tokenizer` {text}: no such file; give a .model or tokenizer.json file, a folder with one,"
            " or mistral-common:tokenizer.model.v1"
        )
    if path.suffix == ".json":
        return _tokenizers(path, text)
    return _sentencepiece(path, text)


def _sentencepiece(path: Path, name: str) -> Vocab:
    try:
        import sentencepiece as spm
    except ImportError:
        raise ConfigError(
            f"`tokenizer` {name}: a SentencePiece model needs the package sentencepiece"
            " (pip install sentencepiece)"
        ) from None
    try:
        proc = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"`tokenizer` {name}: {path} is not a SentencePiece model ({exc})") from None
    return Vocab(name, "sentencepiece", proc)


def _tokenizers(path: Path, name: str) -> Vocab:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"`tokenizer` {name}: {path} is not a tokenizer.json ({exc})") from None
    return Vocab(name, "tokenizers", tok)
