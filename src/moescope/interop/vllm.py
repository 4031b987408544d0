"""vLLM routed experts (``--enable-return-routed-experts``): prompt and completion arrays, prefill told from decode.

vLLM's routed-experts capturer fills, per request, an integer array ``[tokens, num_moe_layers,
top_k]`` of the expert ids each token was routed to (int16 in the capture buffer; ``-1`` where a
slot was never written). The offline API returns it on ``RequestOutput.prompt_routed_experts``
(the prompt tokens: **prefill**) and ``CompletionOutput.routed_experts`` (the generated tokens fed
back: **decode**; the last generated token is never fed back, so it has no row). The OpenAI-compatible
server returns the same arrays as nested lists: ``prompt_routed_experts`` on the response and
``routed_experts`` on each choice (``vllm/entrypoints/openai/.../protocol.py``), beside the
optional ``prompt_token_ids`` and ``choices[i].token_ids``.

Layouts read here:

- ``name.json``: one HTTP response object (or a list of them); ``name.jsonl``: one per line;
- ``name.npz`` saved from a ``RequestOutput``: keys ``prompt_routed_experts`` and/or
  ``routed_experts`` (one request), or ``<request>.prompt_routed_experts`` /
  ``<request>.routed_experts`` for several; optional ``[<request>.]prompt_token_ids`` and
  ``[<request>.]token_ids`` give the token ids.

One document per (request, choice). Rows are the prompt rows (positions ``0..P-1``) then the
completion rows (``P..``); with ``n > 1`` choices only the first choice's document holds the prompt
rows (vLLM routes the prompt once). Prefill and decode rows are told apart by
``source.documents[i]["prefill_rows"]``: rows at positions below it are prefill, the rest decode
(:func:`row_phase` gives the flag per row). Checks (engine_checks): ``-1`` and ``255`` padding
slots, partial rows, ids out of range (error), a request logged twice (two data-parallel ranks or
two files: counted once, ``duplicate_request``), arrays whose layer count or width differ (error
naming the file). The arrays carry no expert count: give ``--num-experts`` (or ``--model``), and
``--moe-layers`` when the model has dense layers (default ``0..L-1``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    default_label,
    expand_paths,
    iter_json_responses,
    resolve_facts,
)
from moescope.interop.engine_checks import clean_layers

NAME = "vllm-routed-experts"
DESCRIPTION = (
    "vLLM routed experts: prompt_routed_experts + routed_experts from RequestOutput (.npz) or HTTP JSON"
)
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS
_SUFFIXES = (".npz", ".json", ".jsonl")


class _Req:
    """One (request, choice): prompt and completion id arrays ``(n, L, w)`` and token ids, as logged."""

    def __init__(
        self,
        path: Path,
        where: str,
        request: str,
        choice: int,
        prompt: Any,
        completion: Any,
        ptok: Any,
        ctok: Any,
    ):
        self.path, self.where, self.request, self.choice = path, where, request, choice
        self.prompt = _array(prompt, f"{where}: prompt_routed_experts")
        self.completion = _array(completion, f"{where}: routed_experts")
        self.ptok, self.ctok = ptok, ctok


def _array(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise DataError(f"{where}: ragged nested lists; expected [tokens, num_moe_layers, top_k]") from None
    if arr.size == 0 and arr.ndim < 3:
        return None
    if arr.dtype.kind not in "iu" or arr.ndim != 3:
        raise DataError(
            f"{where}: shape {arr.shape}, dtype {arr.dtype}; expected integers [tokens, num_moe_layers, top_k]"
        )
    return arr


def _from_response(obj: Any, path: Path, where: str) -> Iterator[_Req]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a response object, got {type(obj).__name__}")
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise DataError(f"{where}: missing field 'choices' (an OpenAI-compatible response)")
    if "prompt_routed_experts" not in obj and not any(
        isinstance(c, dict) and "routed_experts" in c for c in choices
    ):
        raise DataError(
            f"{where}: no 'prompt_routed_experts' or choices[].routed_experts: was the server started with"
            " --enable-return-routed-experts?"
        )
    rid = str(obj.get("id", where))
    for i, ch in enumerate(choices):
        if not isinstance(ch, dict):
            raise DataError(f"{where}: choices[{i}] is not an object")
        yield _Req(
            path,
            f"{where}: choices[{ch.get('index', i)}]",
            rid,
            int(ch.get("index", i)),
            obj.get("prompt_routed_experts") if i == 0 else None,
            ch.get("routed_experts"),
            obj.get("prompt_token_ids") if i == 0 else None,
            ch.get("token_ids"),
        )


def _requests(files: list[Path]) -> Iterator[_Req]:
    for path in files:
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {key: z[key] for key in z.files}
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"{path}: not a readable .npz file ({exc})") from None
            names = sorted({key.rsplit(".", 1)[0] if "." in key else "" for key in arrays})
            found = False
            for name in names:
                pre = f"{name}." if name else ""
                if f"{pre}prompt_routed_experts" not in arrays and f"{pre}routed_experts" not in arrays:
                    continue
                found = True
                yield _Req(
                    path,
                    f"{path}[{name or 'request'}]",
                    name or path.stem,
                    0,
                    arrays.get(f"{pre}prompt_routed_experts"),
                    arrays.get(f"{pre}routed_experts"),
                    arrays.get(f"{pre}prompt_token_ids"),
                    arrays.get(f"{pre}token_ids"),
                )
            if not found:
                raise DataError(
                    f"{path}: holds neither 'prompt_routed_experts' nor 'routed_experts' (keys: {sorted(arrays)[:6]})"
                )
        else:
            for where, obj in iter_json_responses(path):
                yield from _from_response(obj, path, where)


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Read every request, check shapes agree, clean sentinels, drop repeated requests, one document each."""
    files = expand_paths(paths, _SUFFIXES, "vLLM routed-experts")
    reqs = [r for r in _requests(files) if r.prompt is not None or r.completion is not None]
    if not reqs:
        raise DataError(f"{files[0]}: no routed experts in any request (all null)")
    first = reqs[0]
    ref = (first.prompt if first.prompt is not None else first.completion).shape[1:]
    for r in reqs:
        for arr, what in ((r.prompt, "prompt_routed_experts"), (r.completion, "routed_experts")):
            if arr is not None and arr.shape[1:] != ref:
                raise DataError(
                    f"{r.where}: {what} has shape {arr.shape}, but {first.where} has [tokens, {ref[0]}, {ref[1]}]"
                    " (num_moe_layers, top_k): logs of different models or settings"
                )
    L, w = ref
    facts = resolve_facts(opts, None, top_k=int(w), seen_layers=range(L), where=first.where)
    if len(facts.moe_layers) != L:
        raise DataError(
            f"{first.where}: {L} layers in the arrays but {len(facts.moe_layers)} MoE layers {facts.moe_layers};"
            f" pass `moe_layers` with {L} layers"
        )
    report = ImportReport()
    if opts.moe_layers is None and opts.model is None:
        report.notes.append(
            f"moe_layers assumed to be 0..{L - 1}: pass `moe_layers` if the model has dense layers"
        )
    mapping: list[dict[str, Any]] = []
    source: dict[str, Any] = {
        "format": NAME,
        "files": [str(f) for f in files],
        "doc_id": "one per (request, choice), in file order; see 'documents'",
        "position": "token index in prompt + completion: prefill rows below documents[i].prefill_rows, decode after",
        "slot_order": "set",
        "slot_order_note": "routed experts carry no weights: rank order cannot be checked, so ids are a set",
        "documents": mapping,
    }
    seen: dict[bytes, str] = {}
    docs: list[RoutedDocument] = []
    for r in reqs:
        parts, tok = [], []
        P = 0 if r.prompt is None else len(r.prompt)
        for arr, ids, what in ((r.prompt, r.ptok, "prompt"), (r.completion, r.ctok, "completion")):
            if arr is None:
                continue
            ex = clean_layers(arr, facts, report, f"{r.where}: {what}")
            parts.append(ex)
            tid = np.full(len(arr), -1, np.int32)
            if ids is not None:
                ids = np.asarray(ids).ravel()
                n = min(len(ids), len(arr))
                if what == "prompt" and len(ids) != len(arr):
                    report.add(
                        "token_count_mismatch", 1, f"{r.where}: {len(ids)} prompt token ids, {len(arr)} rows"
                    )
                tid[:n] = ids[:n]
            tok.append(tid)
        experts = np.concatenate(parts)
        key = experts.tobytes() + str(experts.shape).encode()
        if key in seen:
            report.add("duplicate_request", 1, f"{r.where}: the same rows as {seen[key]}; counted once")
            continue
        seen[key] = r.where
        start = 0
        if r.prompt is None and r.choice > 0 and docs and mapping[-1]["request"] == r.request:
            start = mapping[-1]["prefill_rows"]  # later choices continue after the shared prompt
        doc_id = len(docs)
        label = default_label(opts, None, r.path)
        docs.append(
            RoutedDocument(
                doc_id, label, start + np.arange(len(experts)), experts, token_id=np.concatenate(tok)
            )
        )
        mapping.append(
            {
                "doc_id": doc_id,
                "source": r.where,
                "request": r.request,
                "choice": r.choice,
                "prefill_rows": P if r.prompt is not None else start,
                "decode_rows": 0 if r.completion is None else len(r.completion),
            }
        )
        if (experts == facts.sentinel).any():
            masked = (experts == facts.sentinel).all(-1)
            for c in np.flatnonzero(masked.any(0)):
                m = int(masked[:, c].sum())
                report.mask(
                    doc_id,
                    facts.moe_layers[c],
                    len(experts),
                    len(experts) - m,
                    "padding (-1/255) or partial rows",
                    m,
                )
    return Imported(facts, iter(docs), report, source)


def row_phase(trace: Any) -> np.ndarray:
    """``True`` for decode rows, ``False`` for prefill rows, in the order of ``trace.load()``."""
    b = trace.load(columns=["doc_id", "position"])
    cut = {d["doc_id"]: d["prefill_rows"] for d in trace.manifest["source"]["documents"]}
    return b.position >= np.array([cut[int(d)] for d in b.doc_id])
