"""The manifest: what a trace holds, how it was made, and which shards are committed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.errors import TraceError

FORMAT_NAME = "moescope-trace"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: How a router turns logits into probabilities, for entropy and density work.
ROUTER_KINDS = ("softmax", "sigmoid", "sparsemixer", "unknown")

#: What the order of a token's top-k slots means. ``rank``: slot 0 is the router's first choice and
#: the rest follow in rank (weight) order, so first-choice statistics mean something. ``set``: the
#: ids form a set whose order carries nothing (ids sorted by id, ``topk(sorted=False)``, logs whose
#: order is unknown); first-choice statistics are refused or skipped.
SLOT_ORDERS = ("rank", "set")

#: Spellings of ``source.slot_order`` written by moescope before slot order became a routing fact.
LEGACY_SLOT_ORDERS = {
    "rank": "rank",
    "ranked": "rank",
    "set": "set",
    "as logged": "set",
    "ascending": "set",
    "unordered": "set",
}


@dataclass
class RoutingSpec:
    """The routing facts of a model: enough to shape and interpret every routing column.

    Parameters
    ----------
    num_experts : routed experts per MoE layer (the same in every MoE layer).
    top_k : experts chosen per token per MoE layer.
    moe_layers : decoder-layer index of each MoE layer, in order; dense layers are absent.
    family : transformers ``model_type`` (or the source format of an imported log).
    router_kind : how logits become probabilities (one of ``ROUTER_KINDS``).
    n_shared_experts : always-active experts, not recorded in the expert columns.
    num_hidden_layers : decoder layers in the model, dense ones included.
    module_paths : module path of each MoE block, so layers are mapped by name, never by order.
    dtype : the dtype the model ran in.
    slot_order : what the order of a token's top-k slots means, one of ``SLOT_ORDERS``.
    """

    num_experts: int
    top_k: int
    moe_layers: list[int]
    family: str = "unknown"
    router_kind: str = "softmax"
    n_shared_experts: int = 0
    num_hidden_layers: int | None = None
    module_paths: list[str] = field(default_factory=list)
    dtype: str = "float32"
    slot_order: str = "rank"

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def check(self) -> None:
        """Raise :class:`TraceError` naming the field when the facts are inconsistent."""
        _check_types(self)
        if self.num_experts < 1:
            raise TraceError(f"routing.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise TraceError(f"routing.top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if not self.moe_layers:
            raise TraceError("routing.moe_layers is empty: a trace needs at least one MoE layer")
        if sorted(set(self.moe_layers)) != list(self.moe_layers):
            raise TraceError(f"routing.moe_layers must be strictly increasing, got {self.moe_layers}")
        if self.module_paths and len(self.module_paths) != len(self.moe_layers):
            raise TraceError(
                f"routing.module_paths has {len(self.module_paths)} entries for {len(self.moe_layers)} MoE layers"
            )
        if self.router_kind not in ROUTER_KINDS:
            raise TraceError(f"routing.router_kind must be one of {ROUTER_KINDS}, got {self.router_kind!r}")
        if self.slot_order not in SLOT_ORDERS:
            raise TraceError(f"routing.slot_order must be one of {SLOT_ORDERS}, got {self.slot_order!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> RoutingSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TraceError(f"{source}: unknown routing field(s) {sorted(unknown)}")
        try:
            spec = cls(**d)
        except TypeError as exc:
            raise TraceError(f"{source}: routing section is incomplete: {exc}") from None
        spec.check()
        return spec


def legacy_slot_order(value: Any, where: str = "source.slot_order") -> str:
    """Map a slot-order spelling of older traces (``"ranked"``, ``"ascending"``, ...) to ``SLOT_ORDERS``."""
    if value not in LEGACY_SLOT_ORDERS:
        raise TraceError(f"{where}: unknown slot order {value!r}; known: {sorted(LEGACY_SLOT_ORDERS)}")
    return LEGACY_SLOT_ORDERS[value]


def routing_from_manifest(manifest: dict[str, Any], where: str = "manifest") -> RoutingSpec:
    """The checked :class:`RoutingSpec` of a manifest, older ones included.

    Traces written before ``routing.slot_order`` existed said it (if at all) in ``source.slot_order``
    with one of five spellings; those are mapped, and a trace saying nothing is a capture: ``rank``.
    """
    routing = dict(manifest["routing"])
    if "slot_order" not in routing:
        legacy = (manifest.get("source") or {}).get("slot_order")
        routing["slot_order"] = (
            "rank" if legacy is None else legacy_slot_order(legacy, f"{where}: source.slot_order")
        )
    return RoutingSpec.from_dict(routing, source=where)


def is_int(v: Any) -> bool:
    """A JSON integer (``True`` and ``8.5`` are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(spec: RoutingSpec) -> None:
    """Integers where integers belong (8.5 experts or a negative layer is a damaged manifest)."""
    for name in ("num_experts", "top_k", "n_shared_experts"):
        v = getattr(spec, name)
        if not is_int(v) or v < 0:
            raise TraceError(f"routing.{name} must be a non-negative integer, got {v!r}")
    if not isinstance(spec.moe_layers, list) or not all(is_int(x) and x >= 0 for x in spec.moe_layers):
        raise TraceError(
            f"routing.moe_layers must be a list of non-negative integers, got {spec.moe_layers!r}"
        )
    n = spec.num_hidden_layers
    if n is not None and (not is_int(n) or (spec.moe_layers and n <= max(spec.moe_layers))):
        raise TraceError(
            f"routing.num_hidden_layers must be an integer above every MoE layer index, got {n!r}"
        )
    for name in ("family", "router_kind", "dtype"):
        if not isinstance(getattr(spec, name), str):
            raise TraceError(f"routing.{name} must be a string, got {getattr(spec, name)!r}")
    if not isinstance(spec.module_paths, list) or not all(isinstance(x, str) for x in spec.module_paths):
        raise TraceError("routing.module_paths must be a list of strings")


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load and sanity-check ``directory/manifest.json``; errors name the file and the field."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise TraceError(f"{directory}: not a trace directory (it does not exist or is not a directory)")
    if not path.is_file():
        raise TraceError(f"{path}: missing; a trace directory needs its manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text (byte {exc.start}); the manifest is damaged") from None
    if not isinstance(manifest, dict):
        raise TraceError(f"{path}: top level must be a JSON object")
    if not isinstance(manifest.get("routing"), dict):
        raise TraceError(f"{path}: field 'routing' must be a JSON object")
    for key in ("format", "format_version", "routing", "shards", "columns"):
        if key not in manifest:
            raise TraceError(f"{path}: missing required field {key!r}")
    if manifest["format"] != FORMAT_NAME:
        raise TraceError(f"{path}: field 'format' is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise TraceError(
            f"{path}: field 'format_version' is {manifest['format_version']!r}; this moescope reads version"
            f" {FORMAT_VERSION}"
        )
    if not isinstance(manifest["shards"], list):
        raise TraceError(f"{path}: field 'shards' must be a list")
    for i, shard in enumerate(manifest["shards"]):
        for key in ("file", "rows"):  # sha256 may be absent in traces older than checksums
            if not isinstance(shard, dict) or key not in shard:
                raise TraceError(f"{path}: shards[{i}] lacks field {key!r}")
    return manifest
