"""The core beneath the stages: one family table, one hook set, one data-options class, one meaning per fact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moescope.ablate.hooks import ExpertAblator
from moescope.ablate.sweep import AblateOptions
from moescope.capture.engine import RoutingRecorder
from moescope.capture.runner import CaptureOptions
from moescope.capture.tiny import tiny_model
from moescope.core.families import config_facts, resolve_adapter
from moescope.core.routing import HookSet, moe_sites, routing_spec
from moescope.core.sources import DataOptions, resolve_source, resolve_sources
from moescope.interop.common import known_models, preset, preset_for_model_id
from moescope.models.params import count_parameters
from moescope.models.registry import load_config


def test_stage_options_extend_the_one_data_options_class(tmp_path) -> None:
    shared = {f.name: f.default for f in dataclasses.fields(DataOptions)}
    assert len(shared) == 11
    for cls in (CaptureOptions, AblateOptions):
        assert issubclass(cls, DataOptions)
        assert {f.name: f.default for f in dataclasses.fields(cls) if f.name in shared} == shared
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a b", "topic": "x"}) + "\n")
    opts = CaptureOptions(label_field="topic", max_documents=3)
    got = [s.describe() for s in resolve_sources([str(path)], opts)]
    want = [resolve_source(str(path), label_field="topic", max_documents=3).describe()]
    assert got == want


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "llama4_text", "jetmoe", "dbrx"])
def test_moe_sites_name_the_module_each_family_consumes_routing_from(family: str) -> None:
    model = tiny_model(family)
    spec = routing_spec(model)
    fam = resolve_adapter(spec.family)
    sites = moe_sites(model, spec, fam)
    assert [s.path for s in sites] == spec.module_paths and [s.j for s in sites] == list(range(len(sites)))
    for s in sites:
        assert s.block is model.get_submodule(s.path)
        assert type(s.router).__name__ in fam.router_classes
        if fam.selection == "experts_call":
            assert s.consumer is model.get_submodule(f"{s.path}.{fam.experts}")
        else:
            assert s.consumer is None


def test_recorder_and_ablator_share_one_reentrant_hook_set() -> None:
    model = tiny_model("mixtral")
    rec, abl = RoutingRecorder(model), ExpertAblator(model, mode="drop")
    assert isinstance(rec, HookSet) and isinstance(abl, HookSet)
    experts = model.get_submodule(rec.spec.module_paths[0]).experts

    def hooks() -> int:
        return len(experts._forward_pre_hooks)

    before = hooks()
    with rec, rec:  # re-entrant: installed once
        assert hooks() == before + 1
        with abl:
            assert hooks() == before + 2
        assert hooks() == before + 1
    assert hooks() == before
    out = rec.run(torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long))
    assert out["experts"].shape == (4, rec.spec.num_moe_layers, rec.spec.top_k) and hooks() == before


# Published facts the importers used to type by hand (FIELD-NOTES section 2): now derived.
PUBLISHED = {
    "mixtral-8x7b": ("mixtral", 8, 2, list(range(32)), 32, 0),
    "tinymistral-6x248m": ("mixtral", 6, 2, list(range(12)), 12, 0),
    "deepseek-v2-lite": ("deepseek_v2", 64, 6, list(range(1, 27)), 27, 2),
    "qwen3-30b-a3b": ("qwen3_moe", 128, 8, list(range(48)), 48, 0),
    "olmoe-1b-7b": ("olmoe", 64, 8, list(range(16)), 16, 0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_importer_presets_capture_and_params_read_the_same_facts(name: str) -> None:
    assert sorted(known_models()) == sorted(PUBLISHED)
    f = preset(name)
    assert (
        f.family,
        f.num_experts,
        f.top_k,
        list(f.moe_layers),
        f.num_hidden_layers,
        f.n_shared_experts,
    ) == (PUBLISHED[name])
    spec = routing_spec(load_config(name))
    assert (spec.num_experts, spec.top_k, spec.moe_layers, spec.n_shared_experts) == (
        f.num_experts,
        f.top_k,
        list(f.moe_layers),
        f.n_shared_experts,
    )
    assert list(count_parameters(name).moe_layers) == list(f.moe_layers)
    assert config_facts(load_config(name)).moe_layers == f.moe_layers
    assert preset_for_model_id(f.model_id) is f


def test_params_uses_the_family_dense_layer_rule() -> None:
    from moescope.capture.tiny import tiny_config

    for family, overrides in (
        ("qwen2_moe", {"mlp_only_layers": [1], "decoder_sparse_step": 1}),
        ("deepseek_v2", {"first_k_dense_replace": 2}),
    ):
        cfg = tiny_config(family, **overrides)
        assert list(count_parameters(cfg).moe_layers) == routing_spec(cfg).moe_layers
        assert list(count_parameters(cfg).moe_layers) == list(config_facts(cfg).moe_layers)
