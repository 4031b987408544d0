"""Model knowledge: parameter accounting, shipped seed-model configs, config-faithful miniatures."""

from moescope.models.miniatures import (
    MINIATURES,
    miniature,
    miniature_config,
)
from moescope.models.params import SUPPORTED_FAMILIES, ParamCount, count_parameters, expert_params
from moescope.models.registry import load_config, shipped_names
from moescope.models.tokenizer import byte_tokenizer

__all__ = [
    "MINIATURES",
    "SUPPORTED_FAMILIES",
    "ParamCount",
    "byte_tokenizer",
    "count_parameters",
    "expert_params",
    "load_config",
    "miniature",
    "miniature_config",
    "shipped_names",
]
