"""Run a model over documents and write the routing it used to a trace, resumably.

The loop: read documents in order, tokenise a chunk of them, cut them into windows, batch windows
of similar length (right-padded; the engine drops padding), run each batch under a
:class:`~moescope.capture.engine.RoutingRecorder`, put every document's rows back together in
token order and append them, then commit the chunk. Commits happen only at document boundaries,
so an interrupted capture resumes after the last committed document with no token lost or doubled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.core.sources import DataOptions, Document, iter_documents, resolve_sources
from moescope.core.windows import (
    Window,
    ensure_pad_token,
    iter_tokenized,
    make_windows,
    pad_batch,
    plan_batches,
)
from moescope.errors import ConfigError, DataError, TraceError
from moescope.models.tokenizer import byte_tokenizer

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Windows gathered before sorting into batches: more gives tighter length groups, costs memory.
CHUNK_BATCHES = 16
#: Tokenise ahead and write shards behind the model in threads; False runs that host work in line
#: (benchmarks/capture.py measures how much of it the threads hide).
OVERLAP = True
#: Upper bound on the default --seq-len; a model's max_position_embeddings caps it further.
DEFAULT_MAX_SEQ_LEN = 2048


# --------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A model ready to capture: the module, its tokenizer and what the manifest says about it."""

    model: Any
    tokenizer: Any
    name: str
    source: str  # alias | tiny | local | hub | object

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        param = next(self.model.parameters())
        return {
            "id": self.name,
            "source": self.source,
            "model_type": getattr(cfg, "model_type", None),
            "config_sha256": config_fingerprint(cfg),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
        }

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {
            "name": getattr(tok, "name_or_path", "") or type(tok).__name__,
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos_token_id": getattr(tok, "bos_token_id", None),
            "eos_token_id": getattr(tok, "eos_token_id", None),
            "pad_token_id": getattr(tok, "pad_token_id", None),
        }


def config_fingerprint(config: Any) -> str:
    """SHA-256 of the model config's JSON: two traces with the same value came from the same architecture."""
    return hashlib.sha256(config.to_json_string().encode("utf-8")).hexdigest()


#: Named models the CLI accepts besides hub ids and directories: name -> loader(device, dtype).
#: A loader returns ``(model, tokenizer)`` with the model already on ``device`` in ``dtype``
#: (``None``: the model's own). Registering a bundled model is one entry here.
MODEL_ALIASES: dict[str, Callable[[str, Any], tuple[Any, Any]]] = {}


def _bundled_loader(name: str) -> Callable[[str, Any], tuple[Any, Any]]:
    def load(device: str, torch_dtype: Any) -> tuple[Any, Any]:
        from moescope.data import bundled_model_path

        loaded = _load_pretrained(str(bundled_model_path(name)), device, torch_dtype, lambda _msg: None)
        return loaded.model, loaded.tokenizer

    return load


def _miniature_loader(name: str) -> Callable[[str, Any], tuple[Any, Any]]:
    def load(device: str, torch_dtype: Any) -> tuple[Any, Any]:
        from moescope.models.miniatures import BYTE_VOCAB, miniature

        return miniature(name).to(device=device, dtype=torch_dtype), byte_tokenizer(BYTE_VOCAB)

    return load


def _register_named_models() -> None:
    """The bundled trained models (``tiny-mixtral``, ``tiny-finegrained``) and the seed miniatures."""
    from moescope.data import BUNDLED_MODELS
    from moescope.models.miniatures import SEEDS

    for name in BUNDLED_MODELS:
        MODEL_ALIASES[name] = _bundled_loader(name)
    for name in SEEDS:
        MODEL_ALIASES[name] = _miniature_loader(name)


_register_named_models()


def resolve_device(device: str) -> str:
    """Check ``--device`` and turn ``auto`` into what this machine has (``auto`` stays when CUDA exists)."""
    import torch

    base = device.split(":", 1)[0]
    if base not in DEVICES or (":" in device and (base != "cuda" or not device.split(":", 1)[1].isdigit())):
        raise ConfigError(f"`device` must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` {device}: CUDA is not available on this machine (use `device` cpu)")
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str) -> Any:
    """``--dtype`` as a ``torch.dtype``, or ``None`` for ``auto`` (the checkpoint's own dtype)."""
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return None if dtype == "auto" else getattr(torch, dtype)


def load_model(name: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """Load ``name`` as capture does, except that on CPU ``auto`` means float32 (for scoring and ablation)."""
    if dtype == "auto" and resolve_device(device) == "cpu":
        dtype = "float32"  # half precision is slow and lossy on CPU
    return resolve_model(name, device=device, dtype=dtype)


def resolve_model(
    name: str, *, device: str = "auto", dtype: str = "auto", log: Callable[[str], None] | None = None
) -> LoadedModel:
    """Load ``name``: a registered alias, ``tiny:<family>``, a local directory or a hub id.

    ``tiny:<family>`` is a seeded random model from :func:`moescope.capture.tiny.tiny_model` with
    the offline :func:`~moescope.models.tokenizer.byte_tokenizer`, for demos and tests. Other models
    load with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``; ``device="auto"``
    spreads them with ``device_map="auto"`` when CUDA is available (with ``accelerate``; without
    it the model loads on the CPU and moves to one GPU). ``log`` receives one-line notes.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if name in MODEL_ALIASES:
        model, tokenizer = MODEL_ALIASES[name]("cuda" if dev == "auto" else dev, torch_dtype)
        return LoadedModel(model.eval(), tokenizer, name, "alias")
    if name.startswith("tiny:"):
        from moescope.capture.tiny import tiny_model

        model = tiny_model(name.split(":", 1)[1])
        model = model.to(device="cuda" if dev == "auto" else dev, dtype=torch_dtype)
        return LoadedModel(model.eval(), byte_tokenizer(model.config.vocab_size), name, "tiny")
    from moescope.models.miniatures import shipped_without_weights

    why = shipped_without_weights(name)
    if why is not None:
        raise ConfigError(why)
    return _load_pretrained(name, dev, torch_dtype, log or (lambda _msg: None))


def _load_pretrained(name: str, device: str, torch_dtype: Any, log: Callable[[str], None]) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    source = "local" if local.is_dir() else "hub"
    if source == "local" and not (local / "config.json").is_file():
        raise ConfigError(
            f"{local}: a model directory needs config.json (is this a saved transformers model?)"
        )
    where = str(local) if source == "local" else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a missing tokenizer
        raise ConfigError(f"{name}: cannot load its tokenizer: {exc}") from None
    kwargs: dict[str, Any] = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    move_to = None
    if device != "cpu":
        # A device_map (loading straight onto the GPU, or spreading with "auto") needs accelerate.
        if importlib.util.find_spec("accelerate") is not None:
            kwargs["device_map"] = device
        else:
            move_to = "cuda" if device == "auto" else device
            log(
                f"accelerate is not installed: loading {name} on the CPU, then moving it to {move_to}"
                + (
                    " (install accelerate to spread it over devices with device_map='auto')"
                    if device == "auto"
                    else ""
                )
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as exc:  # OSError (not found, offline), ValueError (unknown architecture), ...
        raise ConfigError(f"{name}: cannot load the model with AutoModelForCausalLM: {exc}") from None
    if move_to is not None:
        model = model.to(move_to)
    return LoadedModel(model.eval(), tokenizer, name, source)


# --------------------------------------------------------------------------- options and result
@dataclass
class CaptureOptions(DataOptions):
    """Every setting of a capture: the shared data settings plus the capture's own; the CLI options
    map one to one (``seq_len`` is ``--seq-len``; None: min(max_position_embeddings, DEFAULT_MAX_SEQ_LEN)).
    """

    logits: bool = False
    loss: bool = False  # record each document's loss (also on whenever logits is)
    lookahead: int = 0
    lookahead_m: int | None = None
    token_text: bool = False
    resume: bool = False
    overwrite: bool = False
    shard_rows: int = 65536
    unit_documents: int | None = None  # units of D documents, one shard each (any rank count: same trace)
    strategy: str | None = None  # a routing strategy spec (moescope.strategies); None: the model's own


#: Capture settings (manifest ``capture`` keys) and the option that sets each, for resume errors.
_OPTION_OF = {
    "model": "MODEL",
    "config_sha256": "MODEL (its config changed)",
    "dtype": "`dtype`",
    "tokenizer": "MODEL (its tokenizer changed)",
    "tokenizer_vocab_size": "MODEL (its tokenizer changed)",
    "data": "DATA",
    "seq_len": "`seq_len`",
    "max_tokens": "`max_tokens`",
    "logits": "`logits`",
    "loss": "`loss`",
    "lookahead": "`lookahead`",
    "lookahead_m": "`lookahead_m`",
    "lookahead_columns": "`lookahead`",
    "token_text": "`token_text`",
    "strategy": "`strategy`",
    "unit_documents": "`unit_documents`",
}
_DATA_OPTION_OF = {
    "max_documents": "`max_documents`",
    "text": "`text_field`",
    "label_field": "`label_field`",
    "label": "`label`",
    "preset": "`preset`",
    "split": "`split`",
    "config": "`data_config`",
    "txt_unit": "`txt_unit`",
}


@dataclass
class CaptureResult:
    """What a capture did; ``--json`` prints it."""

    trace: str
    model: str
    documents: int = 0  # captured in this run
    tokens: int = 0  # captured in this run
    windows: int = 0
    batches: int = 0
    padded_tokens: int = 0  # pad positions the model computed (not recorded)
    seconds: float = 0.0
    model_seconds: float = 0.0  # inside the recorder's forward passes
    tokens_per_second: float = 0.0
    resumed_after_document: int | None = None
    total_documents: int = 0
    total_tokens: int = 0
    shards: int = 0
    routing: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # this process's rank in a distributed capture
    world_size: int = 1
    unit_documents: int | None = None  # documents per unit (unit-structured captures only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_options(opts: CaptureOptions) -> None:
    if opts.resume and opts.overwrite:
        raise ConfigError("`resume` and `overwrite` cannot be used together")
    for name, value in (("`max_tokens`", opts.max_tokens), ("`seq_len`", opts.seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if opts.batch_size < 1:
        raise ConfigError(f"`batch_size` must be >= 1, got {opts.batch_size}")
    if opts.unit_documents is not None and opts.unit_documents < 1:
        raise ConfigError(f"`unit_documents` must be >= 1, got {opts.unit_documents}")
    if opts.shard_rows < 1:
        raise ConfigError(f"`shard_rows` must be >= 1, got {opts.shard_rows}")
    if opts.lookahead < 0:
        raise ConfigError(f"`lookahead` must be >= 0, got {opts.lookahead}")
    if opts.lookahead_m is not None and opts.lookahead_m < 1:
        raise ConfigError(f"`lookahead_m` must be >= 1, got {opts.lookahead_m}")
    if opts.lookahead_m is not None and not opts.lookahead:
        raise ConfigError("`lookahead_m` needs `lookahead` D (the distance to predict)")


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """Dotted path of the first value that differs between two JSON-like structures."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:  # insertion order: the main setting first
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if diff is not None:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            diff = _first_difference(a, b, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    return None if old == new else path


def _lookup(obj: Any, path: str) -> Any:
    import re

    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            idx = int(part[1:-1])
            obj = obj[idx] if isinstance(obj, list) and idx < len(obj) else None
        else:
            obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _check_resume(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume with other settings, naming the setting and the option behind it."""
    import json

    path = _first_difference(old, new)
    if path is None:
        return
    top = path.split(".", 1)[0].split("[", 1)[0]
    option = _OPTION_OF.get(top, top)
    if top == "data":
        leaf = path.rsplit(".", 1)[-1] if "." in path else ""
        option = _DATA_OPTION_OF.get(
            leaf, "DATA (the data changed)" if leaf in ("sha256", "bytes", "fingerprint") else "DATA"
        )
    raise ConfigError(
        f"{directory}: cannot resume: capture setting {path!r} was {json.dumps(_lookup(old, path))},"
        f" now {json.dumps(_lookup(new, path))} (set by {option}); rerun with the original settings or"
        " use `overwrite` to start again"
    )


# --------------------------------------------------------------------------- the capture
def capture(
    model: str | LoadedModel,
    data: Sequence[str],
    output: str | Path,
    options: CaptureOptions | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> CaptureResult:
    """Capture the routing of ``model`` over ``data`` into the trace directory ``output``.

    ``model`` is a name for :func:`resolve_model` or an already loaded :class:`LoadedModel`
    (``device``/``dtype`` then do not apply). ``progress(tokens, documents)`` is called after each
    batch with the counts since the last call; ``log`` receives one-line notes.
    """
    opts = options or CaptureOptions()
    _check_options(opts)
    output = Path(output)
    log = log or (lambda _msg: None)
    if not data:
        raise DataError("no DATA given: pass at least one file, directory, preset or hub data set")
    sources = resolve_sources(data, opts)
    from moescope.capture.distributed import DEFAULT_UNIT_DOCUMENTS, DistContext

    ctx = DistContext.from_env()
    old_units = _trace_units(output) if opts.resume else None
    if ctx.world > 1 and opts.resume and (output / "manifest.json").is_file() and old_units is None:
        raise ConfigError(
            f"{output}: `resume` with {ctx.world} ranks: this trace was captured by one process without"
            " `unit_documents`; continue it with a single process (moescope capture `resume`)"
        )
    units = opts.unit_documents or old_units or (DEFAULT_UNIT_DOCUMENTS if ctx.launched else None)
    if units is None:
        return _capture_single(model, data, sources, output, opts, device, dtype, progress, log)
    try:
        return _capture_units(model, data, sources, output, opts, units, ctx, device, dtype, progress, log)
    finally:
        ctx.close()


def _trace_units(output: Path) -> int | None:
    """``--unit-documents`` of the trace in ``output`` (``None``: none there, or a single-process trace)."""
    from moescope.trace.outputs import is_trace_dir

    if not is_trace_dir(output):
        return None
    import json

    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    value = (manifest.get("capture") or {}).get("unit_documents")
    return value if isinstance(value, int) and value >= 1 else None


def _check_output(output: Path, opts: CaptureOptions) -> bool:
    """Refuse outputs capture must not touch; returns whether this run resumes a trace there."""
    resuming = opts.resume and (output / "manifest.json").is_file()
    if output.exists() and not output.is_dir():
        raise TraceError(f"{output}: exists and is not a directory")
    if opts.resume and not resuming and output.is_dir() and any(output.iterdir()):
        raise TraceError(
            f"{output}: `resume`: the directory is not empty but has no manifest.json to resume from"
        )
    if output.is_dir() and any(output.iterdir()) and not (resuming or opts.overwrite):
        raise TraceError(
            f"{output}: already exists and is not empty; pass `resume` to continue it or `overwrite` to replace it"
        )
    return resuming


@dataclass
class _Setup:
    """A loaded model with its recorder and everything the manifest says about the capture."""

    loaded: LoadedModel
    recorder: Any
    pad_id: int
    seq_len: int
    columns: dict[str, Any]
    model_info: dict[str, Any]
    tok_info: dict[str, Any]
    params: dict[str, Any]


def _setup(
    model: str | LoadedModel,
    described: list[dict[str, Any]],
    opts: CaptureOptions,
    device: str,
    dtype: str,
    log: Callable[[str], None],
) -> _Setup:
    """Load the model, build its recorder and the capture parameters a resume must match."""
    if isinstance(model, str):
        log(f"loading model {model}")
        loaded = resolve_model(model, device=device, dtype=dtype, log=log)
    else:
        loaded = model
    pad_id = ensure_pad_token(loaded.tokenizer)
    seq_len = opts.seq_len or _default_seq_len(loaded.model.config)
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"`seq_len` {seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    n_embed = loaded.model.get_input_embeddings().weight.shape[0]
    if len(loaded.tokenizer) > n_embed:
        raise ConfigError(
            f"tokenizer {loaded.tokenizer_info()['name']!r} has {len(loaded.tokenizer)} ids but the model embeds"
            f" only {n_embed}: they do not belong together"
        )

    from moescope.capture.engine import RoutingRecorder

    if opts.strategy:
        from moescope.strategies.trace import StrategyRecorder

        base = None
        if opts.logits or opts.lookahead or _records_loss(opts):
            base = RoutingRecorder(
                loaded.model,
                logits=opts.logits,
                lookahead=opts.lookahead,
                lookahead_m=opts.lookahead_m,
                token_loss=_records_loss(opts),
            )
        recorder = StrategyRecorder(loaded.model, opts.strategy, base=base)
    else:
        recorder = RoutingRecorder(
            loaded.model,
            logits=opts.logits,
            lookahead=opts.lookahead,
            lookahead_m=opts.lookahead_m,
            token_loss=_records_loss(opts),
        )
    if not recorder.spec.moe_layers:
        raise ConfigError(f"{loaded.name}: the model has no MoE layer to capture")
    columns = _columns(recorder, opts)
    model_info = loaded.info()
    tok_info = loaded.tokenizer_info()
    params = {
        "model": loaded.name,
        "config_sha256": model_info["config_sha256"],
        "dtype": model_info["dtype"],
        "tokenizer": tok_info["name"],
        "tokenizer_vocab_size": tok_info["vocab_size"],
        "data": described,
        "seq_len": seq_len,
        "max_tokens": opts.max_tokens,
        "logits": opts.logits,
        "lookahead": opts.lookahead,
        "lookahead_m": columns["lookahead"]["m"] if columns["lookahead"] else None,
        "lookahead_columns": list(recorder.lookahead_columns),
        "token_text": opts.token_text,
    }
    if _records_loss(opts):  # only then, so traces captured before the key existed still resume
        params["loss"] = True
    if opts.strategy:
        params.update(recorder.manifest_entries())
    return _Setup(loaded, recorder, pad_id, seq_len, columns, model_info, tok_info, params)


def _create_writer(output: Path, setup: _Setup, described: list[dict[str, Any]], opts: CaptureOptions) -> Any:
    from moescope.trace.writer import TraceWriter

    return TraceWriter.create(
        output,
        setup.recorder.spec,
        columns=setup.columns,
        model=setup.model_info,
        tokenizer=setup.tok_info,
        datasets=[dict(d) for d in described],
        capture=setup.params,
        source={"tool": "moescope capture"},
        shard_rows=opts.shard_rows,
        overwrite=opts.overwrite,
    )


def _capture_single(
    model: str | LoadedModel,
    data: Sequence[str],
    sources: list[Any],
    output: Path,
    opts: CaptureOptions,
    device: str,
    dtype: str,
    progress: Callable[[int, int], None] | None,
    log: Callable[[str], None],
) -> CaptureResult:
    """One process, shards cut every ``shard_rows`` rows, resumed after the last committed document."""
    resuming = _check_output(output, opts)
    from moescope.trace.outputs import claim

    inputs = [item for item in data if Path(item).exists()]
    left = f"a resumable trace in {output} (continue it with `resume`)"
    with claim(output, "trace", overwrite=opts.overwrite, resume=resuming, inputs=inputs, left=left):
        described = [src.describe() for src in sources]
        documents = iter_documents(sources)
        first = next(documents, None)
        if first is None:
            raise DataError(f"no documents in {', '.join(data)}: the data is empty or every text is blank")
        documents = itertools.chain([first], documents)
        setup = _setup(model, described, opts, device, dtype, log)
        loaded, recorder, spec = setup.loaded, setup.recorder, setup.recorder.spec

        from moescope.trace.manifest import read_manifest
        from moescope.trace.writer import TraceWriter

        if resuming:
            _check_resume(output, read_manifest(output).get("capture", {}), setup.params)
            writer = TraceWriter.resume(output, capture=setup.params, shard_rows=opts.shard_rows)
            log(f"resuming {output} after document {writer.last_document}")
        else:
            writer = _create_writer(output, setup, described, opts)
        result = CaptureResult(
            trace=str(output), model=loaded.name, resumed_after_document=writer.last_document
        )
        start_doc = 0 if writer.last_document is None else writer.last_document + 1
        budget = None
        if opts.max_tokens is not None:
            budget = max(0, opts.max_tokens - int(writer.manifest["progress"]["rows"]))
        tally = _Tally(writer.manifest["datasets"] if resuming else described)

        def write(docs: list[Document], ids: list[np.ndarray], rows: dict[str, Any]) -> None:
            writer.append(**rows)
            tally.add(docs, ids)
            # written with the next shard, so it matches the shards
            writer.manifest["datasets"] = tally.entries
            writer.commit(docs[-1].doc_id)

        # Chunk i+1 is tokenised in one thread and chunk i-1's shards are written in another while
        # the model runs chunk i (on a GPU the forward pass is as fast as the host work); at most one
        # chunk waits on each side, so memory stays bounded, and the pending write always finishes (or
        # raises) before the capture returns.
        todo = (d for d in documents if d.doc_id >= start_doc)
        tokenized = iter_tokenized(todo, loaded.tokenizer, max_tokens=budget, group=opts.batch_size)
        chunks = _chunks(tokenized, setup.seq_len, opts.batch_size)
        t0 = time.perf_counter()
        try:
            with writer, recorder, ThreadPoolExecutor(1, thread_name_prefix="moescope-writer") as pool:
                pending: Future | None = None
                try:
                    for docs, ids in read_ahead(chunks) if OVERLAP else chunks:
                        rows = _run_chunk(
                            recorder, docs, ids, setup.seq_len, setup.pad_id, opts, loaded, result, progress
                        )
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(write, docs, ids, rows)
                        if not OVERLAP:
                            pending.result()
                finally:
                    if pending is not None:
                        pending.result()
                result.seconds = time.perf_counter() - t0
        except Exception:
            if not resuming and not writer.manifest["shards"]:
                _remove_empty_trace(output)  # nothing was captured: do not block a plain rerun
            raise
        result.tokens_per_second = result.tokens / result.seconds if result.seconds > 0 else 0.0
        result.total_tokens = int(writer.manifest["progress"]["rows"])
        result.total_documents = sum(e["documents"] for e in tally.entries)
        result.shards = len(writer.manifest["shards"])
        result.routing = spec.to_dict()
        return result


def _capture_units(
    model: str | LoadedModel,
    data: Sequence[str],
    sources: list[Any],
    output: Path,
    opts: CaptureOptions,
    units: int,
    ctx: Any,
    device: str,
    dtype: str,
    progress: Callable[[int, int], None] | None,
    log: Callable[[str], None],
) -> CaptureResult:
    """Unit-structured capture: units of ``units`` documents, unit u on rank u % world, one shard each.

    See :mod:`moescope.capture.distributed`. Every rank loads its own replica; rank 0 holds the
    output lock, creates (or reopens) the trace and commits the manifest after the last agreement.
    """
    import contextlib

    from moescope.capture.distributed import (
        clean_unfinished,
        commit_units,
        maybe_fault,
        owner,
        read_records,
        unit_shard_name,
        write_record,
    )
    from moescope.trace.manifest import read_manifest
    from moescope.trace.outputs import claim
    from moescope.trace.writer import TraceWriter

    device = ctx.device(device)
    ctx.init(device)
    tag = f"rank {ctx.rank}/{ctx.world}: " if ctx.world > 1 else ""
    described = [src.describe() for src in sources]
    stack = contextlib.ExitStack()
    error: BaseException | None = None
    resuming = False
    created = False
    setup: _Setup | None = None
    with stack:
        try:
            if ctx.is_main:
                resuming = _check_output(output, opts)
                inputs = [item for item in data if Path(item).exists()]
                left = f"a resumable trace in {output} (continue it with `resume`, any number of ranks)"
                stack.enter_context(
                    claim(
                        output, "trace", overwrite=opts.overwrite, resume=resuming, inputs=inputs, left=left
                    )
                )
            setup = _setup(model, described, opts, device, dtype, lambda m: log(tag + m))
            setup.params["unit_documents"] = units
            if ctx.is_main:
                if resuming:
                    _check_resume(output, read_manifest(output).get("capture", {}), setup.params)
                    for p in clean_unfinished(output):
                        log(f"{tag}removed {p.name} (an unfinished unit)")
                else:
                    _create_writer(output, setup, described, opts)
                    created = True
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            error = exc
        try:
            ctx.agree(error, "opening the trace")
        except Exception:
            if created:
                _remove_empty_trace(output)
            raise
        assert setup is not None
        loaded, recorder = setup.loaded, setup.recorder
        manifest = read_manifest(output)
        done = set(read_records(output))
        result = CaptureResult(
            trace=str(output), model=loaded.name, rank=ctx.rank, world_size=ctx.world, unit_documents=units
        )
        if done:
            log(f"{tag}resuming {output}: {len(done)} unit(s) already captured")
        n_docs = [0]  # documents in the capture (the budget's cut included): they set the unit count

        def counted(items: Iterator[Any]) -> Iterator[Any]:
            for item in items:
                d = item[0] if isinstance(item, tuple) else item
                n_docs[0] = d.doc_id + 1
                yield item

        def mine(doc_id: int) -> bool:
            unit = doc_id // units
            return owner(unit, ctx.world) == ctx.rank and unit not in done

        documents = iter_documents(sources)
        if opts.max_tokens is not None:  # the budget is global: every rank tokenises every document
            tokenized = iter_tokenized(
                documents, loaded.tokenizer, max_tokens=opts.max_tokens, group=opts.batch_size
            )
            pairs = ((d, x) for d, x in counted(tokenized) if mine(d.doc_id))
        else:
            pairs = iter_tokenized(
                (d for d in counted(documents) if mine(d.doc_id)), loaded.tokenizer, group=opts.batch_size
            )
        writer = TraceWriter(output, manifest, opts.shard_rows)
        written = [0]

        def write(
            docs: list[Document],
            ids: list[np.ndarray],
            rows: dict[str, Any],
            unit: int,
            last: bool,
            tally: _Tally,
        ) -> None:
            writer.append(**rows)
            tally.add(docs, ids)
            if last:
                entry = writer.write_unit(unit_shard_name(unit), unit=unit)
                write_record(output, unit, entry, tally.entries)
                written[0] += 1
                maybe_fault(ctx.rank, written[0])

        tally = _Tally([{} for _ in described])
        t0 = time.perf_counter()
        error = None
        try:
            with recorder, ThreadPoolExecutor(1, thread_name_prefix="moescope-writer") as pool:
                pending: Future | None = None
                try:
                    chunks = _unit_chunks(pairs, units, setup.seq_len, opts.batch_size)
                    for unit, docs, ids, last in read_ahead(chunks) if OVERLAP else chunks:
                        rows = _run_chunk(
                            recorder, docs, ids, setup.seq_len, setup.pad_id, opts, loaded, result, progress
                        )
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(write, docs, ids, rows, unit, last, tally)
                        if not OVERLAP:
                            pending.result()
                        if last:
                            tally = _Tally([{} for _ in described])
                finally:
                    if pending is not None:
                        pending.result()
        except Exception as exc:
            error = exc
        result.seconds = time.perf_counter() - t0
        n_units = -(-n_docs[0] // units)
        if error is None and n_docs[0] == 0:
            error = DataError(f"no documents in {', '.join(data)}: the data is empty or every text is blank")
        try:
            ctx.agree(error, "capturing")
        except Exception:
            if ctx.is_main and created and not read_records(output):
                _remove_empty_trace(output)  # nothing was captured: do not block a plain rerun
            elif ctx.is_main:  # list what is done, so --allow-incomplete readers see it
                with contextlib.suppress(Exception):
                    commit_units(output, None, complete=False)
            raise
        if ctx.is_main:
            error = None
            try:
                final = commit_units(output, n_units)
            except Exception as exc:
                error = exc
                final = None
        ctx.agree(error if ctx.is_main else None, "committing the manifest")
        final = ctx.broadcast(final if ctx.is_main else None)
    result.tokens_per_second = result.tokens / result.seconds if result.seconds > 0 else 0.0
    result.total_tokens = int(final["progress"]["rows"])
    result.total_documents = sum(e["documents"] for e in final["datasets"])
    result.shards = len(final["shards"])
    result.routing = recorder.spec.to_dict()
    return result


def _remove_empty_trace(output: Path) -> None:
    """Remove a trace this run created and that holds no shard (its own files only)."""
    import contextlib

    from moescope.trace.outputs import clear_trace_dir

    clear_trace_dir(output)
    with contextlib.suppress(OSError):
        output.rmdir()  # only when nothing else is left in it


class _Tally:
    """Per data set: documents, tokens, labels and document-id range captured so far (resume included)."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = [
            {"documents": 0, "tokens": 0, "labels": [], "first_doc": None, "last_doc": None, **e}
            for e in entries
        ]

    def add(self, docs: list[Document], ids: list[np.ndarray]) -> None:
        for d, x in zip(docs, ids, strict=True):
            e = self.entries[d.source]
            e["documents"] += 1
            e["tokens"] += len(x)
            if d.label not in e["labels"]:
                e["labels"] = sorted([*e["labels"], d.label])
            e["first_doc"] = d.doc_id if e["first_doc"] is None else e["first_doc"]
            e["last_doc"] = d.doc_id


def _default_seq_len(config: Any) -> int:
    max_pos = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
    return int(min(max_pos, DEFAULT_MAX_SEQ_LEN))


def _records_loss(opts: CaptureOptions) -> bool:
    """Whether a capture records the per-document loss: asked for, or the LM logits are computed anyway."""
    return bool(opts.loss or opts.logits)


def _columns(recorder: Any, opts: CaptureOptions) -> dict[str, Any]:
    """The trace's optional columns, with the lookahead section read off the recorder's column names."""
    from moescope.trace.schema import default_columns

    names = list(recorder.lookahead_columns)
    distances: list[int] = []
    variants: list[str] = []
    for name in names:
        variant, _, d = name.removeprefix("lookahead_").rpartition("_d")
        if variant not in variants:
            variants.append(variant)
        if int(d) not in distances:
            distances.append(int(d))
    m = None
    if names:
        m = opts.lookahead_m or getattr(recorder, "lookahead_m", None) or recorder.spec.top_k
    cols = default_columns(
        weights=True,
        logits=opts.logits,
        lookahead_distances=distances or None,
        lookahead_variants=variants or None,
        lookahead_m=m,
        token_text=opts.token_text,
        doc_loss=_records_loss(opts),
    )
    if cols["lookahead"]:
        expected = [f"lookahead_{v}_d{d}" for v in variants for d in distances]
        if sorted(expected) != sorted(names):
            raise ConfigError(f"the recorder's lookahead columns {names} are not a variant x distance grid")
    return cols


def _chunks(
    pairs: Iterable[tuple[Document, np.ndarray]], seq_len: int, batch_size: int
) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    """Groups of whole documents with their token ids, about ``CHUNK_BATCHES`` batches of windows each."""
    want = batch_size * CHUNK_BATCHES
    docs: list[Document] = []
    ids: list[np.ndarray] = []
    n_windows = 0
    for d, x in pairs:
        docs.append(d)
        ids.append(x)
        n_windows += -(-len(x) // seq_len)
        if n_windows >= want:
            yield docs, ids
            docs, ids, n_windows = [], [], 0
    if docs:
        yield docs, ids


def _unit_chunks(
    pairs: Iterable[tuple[Document, np.ndarray]], units: int, seq_len: int, batch_size: int
) -> Iterator[tuple[int, list[Document], list[np.ndarray], bool]]:
    """``(unit, docs, ids, last)``: :func:`_chunks` restarted at every unit, ``last`` on a unit's final chunk.

    Chunks never straddle units, so a unit's batches are the same whichever rank runs it.
    """
    for unit, group in itertools.groupby(pairs, key=lambda p: p[0].doc_id // units):
        prev: tuple[list[Document], list[np.ndarray]] | None = None
        for chunk in _chunks(group, seq_len, batch_size):
            if prev is not None:
                yield unit, *prev, False
            prev = chunk
        if prev is not None:
            yield unit, *prev, True


def read_ahead(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate ``items`` while a background thread prepares the next ``depth`` of them.

    The capture reads and tokenises chunk i+1 while the model runs chunk i (the trace reader's
    read-ahead, reused): an error in the thread is raised here, in order; leaving the loop early
    stops the thread at its next item.
    """
    from moescope.trace.readahead import read_ahead_iter

    return read_ahead_iter(items, depth)


def _run_chunk(
    recorder: Any,
    docs: list[Document],
    ids: list[np.ndarray],
    seq_len: int,
    pad_id: int,
    opts: CaptureOptions,
    loaded: LoadedModel,
    result: CaptureResult,
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """Run every window of ``docs`` and return their rows in document and position order."""
    import torch

    windows: list[Window] = []
    for d, x in zip(docs, ids, strict=True):
        windows.extend(make_windows(d.doc_id, x, seq_len))
    device = loaded.model.get_input_embeddings().weight.device
    outputs: list[dict[str, np.ndarray] | None] = [None] * len(windows)
    for batch in plan_batches(windows, opts.batch_size):
        wins = [windows[i] for i in batch]
        input_ids, mask = pad_batch(wins, pad_id)  # (B, T) each
        t = time.perf_counter()
        with torch.inference_mode():
            out = recorder.run(torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device))
        result.model_seconds += time.perf_counter() - t
        lengths = [len(w) for w in wins]
        n = int(sum(lengths))
        for name, arr in out.items():
            if len(arr) != n:
                raise TraceError(
                    f"the recorder returned {len(arr)} rows of {name!r} for a batch of {n} real tokens"
                )
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for j, i in enumerate(batch):
            outputs[i] = {name: arr[offsets[j] : offsets[j + 1]] for name, arr in out.items()}
        result.batches += 1
        result.padded_tokens += int(mask.size - n)
        if progress is not None:
            progress(n, 0)
    result.windows += len(windows)
    result.documents += len(docs)
    result.tokens += int(sum(len(x) for x in ids))
    if progress is not None:
        progress(0, len(docs))
    # Windows were made document by document, start by start: their order is the row order.
    rows: dict[str, Any] = {
        "doc_id": np.concatenate([np.full(len(w), w.doc_id, np.int64) for w in windows]),
        "position": np.concatenate([np.arange(w.start, w.start + len(w), dtype=np.int32) for w in windows]),
        "token_id": np.concatenate([w.ids for w in windows]).astype(np.int32),
        "label": [d.label for d, x in zip(docs, ids, strict=True) for _ in range(len(x))],
    }
    for name in ("experts", "weights", "logits"):
        if name in outputs[0]:
            rows[name] = np.concatenate([o[name] for o in outputs])
    lookahead = {c: np.concatenate([o[c] for o in outputs]) for c in recorder.lookahead_columns}
    if lookahead:
        rows["lookahead"] = lookahead
    if opts.token_text:
        rows["token"] = [t for x in ids for t in loaded.tokenizer.convert_ids_to_tokens(x.tolist())]
    if "token_nll" in outputs[0]:
        rows["doc_loss"] = _document_loss(rows["doc_id"], np.concatenate([o["token_nll"] for o in outputs]))
    return rows


def _document_loss(doc_id: np.ndarray, token_nll: np.ndarray) -> np.ndarray:
    """Each row's document loss: the mean next-token cross-entropy over the document's predicted
    tokens (NaN ones, the last token of each window, left out), repeated on every row."""
    _, inv = np.unique(doc_id, return_inverse=True)
    ok = np.isfinite(token_nll)
    total = np.bincount(inv, weights=np.where(ok, token_nll, 0.0))
    count = np.bincount(inv, weights=ok.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return mean[inv].astype(np.float32)
