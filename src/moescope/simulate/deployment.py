"""A deployment: where the experts live, how fast they move, and how long a layer computes.

Figures in the presets are the vendors' published peak numbers (cited per preset); every field can
be overridden. Effective PCIe throughput is usually 80-90% of the peak, so simulated stalls are a
lower bound unless ``link_efficiency`` is lowered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.errors import ConfigError

GB = 1e9
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass
class Tier:
    """An offload tier experts are fetched from.

    Parameters
    ----------
    name : label (``host``, ``ssd``).
    capacity_gb : bytes it can hold, in GB (None: unlimited).
    bandwidth_gbs : sustained read bandwidth towards the GPU, GB/s (the slowest link on the way).
    latency_us : fixed cost per transfer, microseconds.
    """

    name: str
    capacity_gb: float | None
    bandwidth_gbs: float
    latency_us: float


@dataclass
class Deployment:
    """A GPU with an expert cache and the tiers behind it.

    Parameters
    ----------
    name : preset name or a label.
    gpu_memory_gb : GPU memory (the expert cache is what remains after the resident weights).
    gpu_bandwidth_gbs : GPU memory bandwidth, GB/s (bounds decode compute: weights are streamed once
        per step).
    gpu_tflops : dense 16-bit tensor throughput, TFLOP/s (bounds prefill compute).
    tiers : offload tiers, fastest first; experts that miss the GPU come from the first tier that
        holds them (hosts are filled with the most used experts first).
    link_efficiency : share of the published link bandwidth actually reached (1.0 = the peak).
    compute_ms_per_layer : a fixed per-layer compute time, overriding the derived one.
    overhead_us_per_layer : added to every layer's compute (kernel launches, attention over the
        KV cache).
    copies_per_load : link transfers per expert load: 1, or 2 when the system first copies the
        evicted expert back to the host on the same stream (Mixtral-offloading's ``_swap``), so
        every miss moves its bytes twice, one copy after the other. A float: with the two
        directions at different measured speeds it is ``1 + H2D / D2H``.
    expert_read_bytes_per_param : GPU memory traffic per expert parameter each time compute uses
        an expert (None: the storage width, ``ModelCost.bytes_per_param``, read once). Kernels that
        dequantise metadata on every call move more: HQQ's Triton path in Mixtral-offloading
        (``HQQLinearTritonSavable.forward_triton``, src/custom_layers.py of
        github.com/dvmazur/mixtral-offloading at ce54518) first turns the 8-bit scale and zero of
        every group into fp16 with ``Quantizer.dequantize`` (hqq 37502be: ``.half()``, subtract,
        multiply, each a separate kernel reading and writing the whole tensor: 11 bytes per group
        for each of the two), then its matmul reads the packed weights and the fp16 scale and
        zero. For 2-bit weights in groups of 16 that is 2 * 11 / 16 + 2 / 8 + 4 / 16 = 1.875
        bytes per parameter, against 0.377 stored (3.016 bits).
    """

    name: str
    gpu_memory_gb: float
    gpu_bandwidth_gbs: float
    gpu_tflops: float
    tiers: list[Tier] = field(default_factory=list)
    link_efficiency: float = 1.0
    compute_ms_per_layer: float | None = None
    overhead_us_per_layer: float = 0.0
    copies_per_load: float = 1.0
    expert_read_bytes_per_param: float | None = None

    def replace(self, **changes: Any) -> Deployment:
        """A copy with some fields changed; unknown fields raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ConfigError(f"deployment has no field(s) {bad}; fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the field when a value cannot be used."""
        for f in ("gpu_memory_gb", "gpu_bandwidth_gbs", "gpu_tflops"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"deployment {self.name!r}: {f} must be > 0, got {getattr(self, f)!r}")
        if not 0 < self.link_efficiency <= 1:
            raise ConfigError(
                f"deployment {self.name!r}: link_efficiency must be in (0, 1], got {self.link_efficiency}"
            )
        if not self.copies_per_load >= 1:
            raise ConfigError(
                f"deployment {self.name!r}: copies_per_load must be >= 1, got {self.copies_per_load}"
            )
        rb = self.expert_read_bytes_per_param
        if rb is not None and not rb > 0:
            raise ConfigError(
                f"deployment {self.name!r}: expert_read_bytes_per_param must be > 0 or None, got {rb!r}"
            )
        if not self.tiers:
            raise ConfigError(f"deployment {self.name!r}: at least one offload tier is needed")
        for t in self.tiers:
            if not t.bandwidth_gbs > 0 or t.latency_us < 0:
                raise ConfigError(
                    f"deployment {self.name!r}: tier {t.name!r} needs bandwidth_gbs > 0, latency_us >= 0"
                )
        if self.tiers[-1].capacity_gb is not None:
            raise ConfigError(
                f"deployment {self.name!r}: the last tier ({self.tiers[-1].name}) must be unlimited"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# PCIe: 4.0 x16 = 16 GT/s x 16 lanes x 128/130 = 31.5 GB/s per direction; 5.0 x16 = 63 GB/s (PCI-SIG).
_HOST_PCIE4 = Tier("host", None, 31.5, 10.0)
_HOST_PCIE5 = Tier("host", None, 63.0, 10.0)

DEPLOYMENT_PRESETS: dict[str, Deployment] = {
    # GeForce RTX 4090: 24 GB GDDR6X at 1008 GB/s, 165 TFLOPS dense FP16 tensor with FP32 accumulate
    # (NVIDIA Ada Lovelace architecture whitepaper, Appendix A), PCIe 4.0 x16.
    "rtx4090-pcie4": Deployment("rtx4090-pcie4", 24.0, 1008.0, 165.2, [_HOST_PCIE4]),
    # A100 80GB PCIe: HBM2e 1935 GB/s, 312 TFLOPS dense BF16, PCIe 4.0 x16 (NVIDIA A100 datasheet).
    "a100-80gb-pcie4": Deployment("a100-80gb-pcie4", 80.0, 1935.0, 312.0, [_HOST_PCIE4]),
    # H100 PCIe: 80 GB HBM2e at 2.0 TB/s, 756 TFLOPS dense BF16, PCIe 5.0 x16 (NVIDIA H100 datasheet).
    "h100-pcie5": Deployment("h100-pcie5", 80.0, 2000.0, 756.0, [_HOST_PCIE5]),
    # RTX 4090 whose experts live on a PCIe 4.0 NVMe SSD (7.45 GB/s sequential read, Samsung 990 PRO
    # datasheet) with ~80 us access latency, behind a 16 GB host staging area.
    "rtx4090-nvme": Deployment(
        "rtx4090-nvme", 24.0, 1008.0, 165.2, [Tier("host", 16.0, 31.5, 10.0), Tier("ssd", None, 7.45, 80.0)]
    ),
}


def get_preset(name: str) -> Deployment:
    """A copy of a preset deployment; errors list the known presets."""
    if name not in DEPLOYMENT_PRESETS:
        raise ConfigError(f"preset {name!r} is unknown; presets: {', '.join(DEPLOYMENT_PRESETS)}")
    return dataclasses.replace(DEPLOYMENT_PRESETS[name], tiers=list(DEPLOYMENT_PRESETS[name].tiers))


@dataclass
class ModelCost:
    """What a deployment needs to know about the model: bytes per expert and per-layer active work.

    Parameters
    ----------
    expert_params : parameters of one routed expert.
    bytes_per_param : storage width of the experts (2 = bf16, 0.5 = int4).
    dense_params_per_layer : parameters every token reads in every MoE layer besides its routed
        experts (attention, router, shared experts).
    top_k : routed experts per token.
    source : where the numbers come from (a config name, a path, or "given").
    """

    expert_params: int
    bytes_per_param: float = 2.0
    dense_params_per_layer: int = 0
    top_k: int = 1
    source: str = "given"

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.bytes_per_param


def model_cost(config: Any, dtype: str = "bf16") -> ModelCost:
    """Costs from a model config (shipped name, config.json path or dict) via ``moescope params``.

    The dense work of a MoE layer is the model's attention, router and shared-expert parameters
    divided by the number of MoE layers (a per-layer average).
    """
    from moescope.models.params import count_parameters

    if dtype not in BYTES_PER_PARAM:
        raise ConfigError(f"dtype {dtype!r} is unknown; use one of {', '.join(BYTES_PER_PARAM)}")
    pc = count_parameters(config)
    n_moe = max(len(pc.moe_layers), 1)
    dense = (pc.attention + pc.router + pc.shared_experts) // n_moe
    return ModelCost(
        expert_params=int(pc.expert_params),
        bytes_per_param=BYTES_PER_PARAM[dtype],
        dense_params_per_layer=int(dense),
        top_k=int(pc.top_k),
        source=str(config) if isinstance(config, str) else "config",
    )


def cache_capacity(
    deployment: Deployment,
    cost: ModelCost,
    num_layers: int,
    num_experts: int,
    *,
    experts: int | None = None,
    fraction: float | None = None,
    gb: float | None = None,
    shared: bool = False,
) -> np.ndarray:
    """Cache slots per partition (``(L,)`` per layer, or ``(1,)`` shared), from exactly one of three forms.

    ``experts``: slots per layer (or in total when ``shared``); ``fraction``: share of all experts;
    ``gb``: GPU memory given to the cache.
    """
    given = [x is not None for x in (experts, fraction, gb)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of `cache_experts`, `cache_fraction`, `cache_gb`")
    total = num_layers * num_experts
    if experts is not None:
        if experts < 1:
            raise ConfigError(f"cache_experts must be >= 1, got {experts}")
        n_total = experts if shared else experts * num_layers
    elif fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"cache_fraction must be in (0, 1], got {fraction}")
        n_total = round(fraction * total)
    else:
        if not 0 < gb <= deployment.gpu_memory_gb:
            raise ConfigError(
                f"`cache_gb` must be in (0, gpu_memory_gb={deployment.gpu_memory_gb}], got {gb}"
            )
        n_total = int(gb * GB // cost.expert_bytes)
    n_total = max(1, min(n_total, total))
    if shared:
        return np.array([n_total], np.int64)
    per = max(1, min(num_experts, n_total // num_layers))
    return np.full(num_layers, per, np.int64)


def load_times(
    deployment: Deployment, cost: ModelCost, popularity: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Seconds to move each key ``layer * E + e`` to the GPU, and the tier each one lives in.

    Tiers with a capacity are filled with the most popular experts first (``popularity`` is ``(L, E)``).
    """
    eb = cost.expert_bytes
    flat = popularity.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))
    times = np.zeros(flat.size, np.float64)
    tier_of = np.empty(flat.size, dtype=object)
    pos = 0
    for tier in deployment.tiers:
        n = (
            flat.size - pos
            if tier.capacity_gb is None
            else min(flat.size - pos, int(tier.capacity_gb * GB // eb))
        )
        keys = order[pos : pos + n]
        one = tier.latency_us * 1e-6 + eb / (tier.bandwidth_gbs * GB * deployment.link_efficiency)
        times[keys] = deployment.copies_per_load * one
        tier_of[keys] = tier.name
        pos += n
    return times, list(tier_of)


def compute_times(
    deployment: Deployment, cost: ModelCost, tokens: np.ndarray, unique: np.ndarray
) -> np.ndarray:
    """``(S, L)`` seconds per layer: the larger of reading the weights once and doing the FLOPs.

    ``tokens`` is ``(S,)`` tokens per step and ``unique`` ``(S, L)`` distinct experts per step and
    layer. Decode is bound by the weight reads (memory), a long prefill by the FLOPs. Each distinct
    expert moves ``deployment.expert_read_bytes_per_param`` bytes per parameter when that is set.
    """
    if deployment.compute_ms_per_layer is not None:
        base = np.full(unique.shape, deployment.compute_ms_per_layer * 1e-3)
    else:
        per_expert = deployment.expert_read_bytes_per_param
        if per_expert is None:
            per_expert = cost.bytes_per_param
        read = cost.dense_params_per_layer * cost.bytes_per_param + unique * cost.expert_params * per_expert
        mem = read / (deployment.gpu_bandwidth_gbs * GB)
        flops = 2.0 * tokens[:, None] * (cost.dense_params_per_layer + cost.top_k * cost.expert_params)
        base = np.maximum(mem, flops / (deployment.gpu_tflops * 1e12))
    return base + deployment.overhead_us_per_layer * 1e-6
