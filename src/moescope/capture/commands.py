"""CLI: ``moescope capture``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from moescope.cli_utils import JsonOpt, emit, progress_enabled


def register(app: typer.Typer) -> None:
    app.command("capture")(capture)


def capture(
    model: str = typer.Argument(
        ...,
        help="Hub id or local model directory (AutoModelForCausalLM), a registered alias, or tiny:<family>"
        " for a seeded random test model.",
        show_default=False,
    ),
    data: list[str] = typer.Argument(
        ...,
        help="Texts: .txt/.jsonl/.json/.csv/.tsv/.parquet files, a datasets save_to_disk directory, a preset"
        " (wikitext, wikitext-2, lambada, hellaswag, ag_news, humaneval) or a hub data set name.",
        show_default=False,
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Trace directory to write.", show_default=False),
    text_field: str | None = typer.Option(
        None, "--text-field", help="Record field holding the text (default: the preset's, else 'text')."
    ),
    label_field: str | None = typer.Option(
        None, "--label-field", help="Record field holding each document's label (domain or category)."
    ),
    label: str | None = typer.Option(
        None, "--label", help="One label for every document (default: the data set's name or file stem)."
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Read local files with a preset's field mapping (e.g. ag_news for its categories).",
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split of a hub or saved data set (default: the preset's)."
    ),
    data_config: str | None = typer.Option(
        None, "--data-config", help="Configuration name of a hub data set."
    ),
    txt_unit: str = typer.Option(
        "paragraph",
        "--txt-unit",
        help="How .txt files become documents: paragraph (blank-line separated), file or line.",
    ),
    max_documents: int | None = typer.Option(
        None, "--max-documents", help="Read at most this many documents from each DATA source."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Stop after this many tokens in all; the last document is cut to fit."
    ),
    seq_len: int | None = typer.Option(
        None,
        "--seq-len",
        help="Window length: longer documents are split, positions continuing across windows"
        " (default: min(max_position_embeddings, 2048)).",
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Windows per forward pass (similar lengths are batched)."
    ),
    device: str = typer.Option(
        "auto", "--device", help="cpu, cuda, cuda:N or auto (device_map='auto' when CUDA is available)."
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="float32, bfloat16, float16 or auto (the checkpoint's dtype)."
    ),
    logits: bool = typer.Option(
        False,
        "--logits",
        help="Also record router logits (L x E per token, float16) and each document's loss.",
    ),
    loss: bool = typer.Option(
        False,
        "--loss",
        help="Record each document's mean next-token loss (doc_loss column); on with --logits.",
    ),
    lookahead: int = typer.Option(
        0, "--lookahead", help="Record gate lookahead: later layers' routers applied here, distances 1..D."
    ),
    strategy: str | None = typer.Option(
        None,
        "--strategy",
        help="Routing strategy applied while capturing (topp:p=0.7, topk:k=1, ...; see moescope evaluate);"
        " the trace holds the routing actually applied, a variable number of experts per token.",
    ),
    lookahead_m: int | None = typer.Option(
        None,
        "--lookahead-m",
        help="Experts kept per lookahead prediction (top_k..num_experts; default top_k).",
    ),
    token_text: bool = typer.Option(False, "--token-text", help="Also store each token's text."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted trace after its last committed document (same settings).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing trace in the output directory."
    ),
    shard_rows: int = typer.Option(65536, "--shard-rows", help="Rows (tokens) per Parquet shard, at least."),
    unit_documents: int | None = typer.Option(
        None,
        "--unit-documents",
        help="Cut the work into units of this many documents, one shard each, so that any number of"
        " ranks (torchrun, accelerate launch) writes the same trace; default 64 when launched by torchrun.",
    ),
    json_out: JsonOpt = False,
) -> None:
    """Run a MoE model over texts and record the experts every token was routed to.

    Writes a trace (manifest.json + Parquet shards) with one row per token: document, position,
    token id, label and the top-k expert ids and weights of every MoE layer. A killed capture
    continues with --resume, without losing or repeating a token.

    Example: moescope capture allenai/OLMoE-1B-7B-0924 wikitext --max-documents 300 -o runs/olmoe-wiki

    Example: moescope capture tiny:mixtral notes.txt news.jsonl --label-field topic -o runs/tiny --json

    Example (8 GPUs, one replica each): torchrun --nproc-per-node 8 -m moescope capture MODEL wikitext -o runs/w
    """
    from moescope.capture.runner import CaptureOptions
    from moescope.capture.runner import capture as run_capture

    opts = CaptureOptions(
        text_field=text_field,
        label_field=label_field,
        label=label,
        preset=preset,
        split=split,
        data_config=data_config,
        txt_unit=txt_unit,
        max_documents=max_documents,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        logits=logits,
        loss=loss,
        lookahead=lookahead,
        lookahead_m=lookahead_m,
        token_text=token_text,
        strategy=strategy,
        resume=resume,
        overwrite=overwrite,
        shard_rows=shard_rows,
        unit_documents=unit_documents,
    )
    with _Progress(max_tokens) as bar:
        result = run_capture(
            model, data, output, opts, device=device, dtype=dtype, progress=bar.update, log=_log
        )
    summary = result.to_dict()
    text = (
        f"{result.trace}: captured {result.tokens} tokens of {result.documents} documents"
        f" ({result.tokens_per_second:,.0f} tokens/s, {result.padded_tokens} padding tokens computed);"
        f" trace holds {result.total_tokens} tokens in {result.shards} shard(s)"
        + (
            f"; resumed after document {result.resumed_after_document}"
            if result.resumed_after_document is not None
            else ""
        )
    )
    if result.rank != 0:  # every rank of a distributed capture says what it did; only rank 0 reports
        _log(
            f"rank {result.rank}/{result.world_size}: captured {result.tokens} tokens of {result.documents} documents"
        )
        return
    if result.world_size > 1:
        text += f" ({result.world_size} ranks, units of {result.unit_documents} documents)"
    emit(summary, json_out, text=text)


def _log(message: str) -> None:
    typer.echo(message, err=True)


class _Progress:
    """A rich progress bar on stderr with tokens/s, shown only when stderr is a terminal."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self._progress: Any = None
        self._task: Any = None
        self._docs = 0

    def __enter__(self) -> _Progress:
        if not progress_enabled():
            return self
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("capture"),
            BarColumn(),
            TextColumn("{task.completed:,} tokens"),
            TextColumn("{task.fields[docs]:,} docs"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("capture", total=self.total, docs=0, rate="")
        return self

    def update(self, tokens: int, documents: int) -> None:
        if self._progress is None:
            return
        self._docs += documents
        self._progress.update(self._task, advance=tokens, docs=self._docs)
        speed = self._progress.tasks[0].speed
        if speed:
            self._progress.update(self._task, rate=f"{speed:,.0f} tok/s")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
