"""Data that ships inside moescope: held-out slices of a multi-domain corpus and two small MoE models.

Both exist so that a new user sees real routing offline, in minutes: the models were trained on
public-domain and permissively licensed text by ``scripts/train_tiny_moe.py`` (see each model's
MODEL_CARD.md) and the held-out slices were never seen in training (``corpus/ATTRIBUTION.md``).

Examples
--------
>>> from moescope.data import bundled_model_path, load_corpus
>>> docs = load_corpus(domains=["code"], max_chars=2000)
>>> docs[0][1]
'code'
>>> bundled_model_path("tiny-mixtral").name
'tiny-mixtral'
"""

from __future__ import annotations

import json
from pathlib import Path

from moescope.errors import ConfigError, DataError

_HERE = Path(__file__).resolve().parent

#: Names of the bundled models, as the CLI understands them.
BUNDLED_MODELS: tuple[str, ...] = ("tiny-mixtral", "tiny-finegrained")

#: Splits that ship with the package (the training split stays in the build folder).
SPLITS: tuple[str, ...] = ("heldout",)


def corpus_path() -> Path:
    """Folder holding the held-out slices (``heldout-<domain>.jsonl``), ATTRIBUTION.md and manifest.json."""
    return _HERE / "corpus"


def corpus_domains() -> list[str]:
    """Domain labels of the bundled corpus, in the order the build script wrote them."""
    manifest = corpus_path() / "manifest.json"
    try:
        return list(json.loads(manifest.read_text(encoding="utf-8"))["domains"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{manifest}: cannot read the corpus manifest ({exc})") from exc


def load_corpus(
    split: str = "heldout",
    *,
    domains: list[str] | None = None,
    max_chars: int | None = None,
) -> list[tuple[str, str]]:
    """Return the bundled documents as ``(text, domain)`` pairs, grouped by domain.

    Parameters
    ----------
    split
        Only ``"heldout"`` ships with the package.
    domains
        Domains to read (default: all, see :func:`corpus_domains`).
    max_chars
        Per domain, stop once this many characters were taken (whole documents; at least one),
        so tests and demos can take a small, fixed prefix.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not bundled; available: {', '.join(SPLITS)}")
    known = corpus_domains()
    wanted = known if domains is None else list(domains)
    unknown = [d for d in wanted if d not in known]
    if unknown:
        raise DataError(f"unknown corpus domain(s) {', '.join(unknown)}; available: {', '.join(known)}")
    if max_chars is not None and max_chars <= 0:
        raise DataError(f"max_chars must be positive, got {max_chars}")
    docs: list[tuple[str, str]] = []
    for domain in wanted:
        path = corpus_path() / f"{split}-{domain}.jsonl"
        taken = 0
        try:
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    try:
                        rec = json.loads(line)
                        text = rec["text"]
                    except (ValueError, KeyError) as exc:
                        raise DataError(f"{path}:{lineno}: not a JSON record with a 'text' field") from exc
                    docs.append((text, domain))
                    taken += len(text)
                    if max_chars is not None and taken >= max_chars:
                        break
        except OSError as exc:
            raise DataError(f"{path}: cannot read the bundled corpus slice ({exc})") from exc
    return docs


def bundled_model_path(name: str) -> Path:
    """Folder of a bundled model, loadable with ``AutoModelForCausalLM.from_pretrained(path)`` offline."""
    if name not in BUNDLED_MODELS:
        raise ConfigError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED_MODELS)}")
    path = _HERE / "models" / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(f"bundled model {name!r} is missing its files under {path}; reinstall moescope")
    return path


__all__ = ["BUNDLED_MODELS", "SPLITS", "bundled_model_path", "corpus_domains", "corpus_path", "load_corpus"]
