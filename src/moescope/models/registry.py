"""Where model configs come from: shipped seed-model configs, a config.json, or a model directory.

The shipped files in ``configs/`` hold the published ``config.json`` values of the seed models, so
parameter counts and miniatures work offline, with no weights and no Hugging Face hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Hub ids of the shipped configs, so a name seen in a seed document or a trace manifest resolves too.
HUB_IDS: dict[str, str] = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "tinymistral-6x248m": "M4-ai/TinyMistral-6x248M",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
}
# Fine-tuned variants with the same routing layout, as the seed logs name them.
VARIANT_IDS: dict[str, tuple[str, ...]] = {
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-Instruct-v0.1",),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite-Chat",),
}
_ALIASES: dict[str, str] = {
    hub.lower(): name
    for name, hubs in ((n, (h, *VARIANT_IDS.get(n, ()))) for n, h in HUB_IDS.items())
    for hub in hubs
}


def shipped_names() -> list[str]:
    """Names of the configs shipped with moescope (file stems in ``models/configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_shipped(name: str) -> str | None:
    """The shipped config name for ``name`` (a shipped name or a known hub id), else None."""
    key = name.strip().lower()
    if key in shipped_names():
        return key
    return _ALIASES.get(key)


def load_config_dict(source: str | Path) -> dict[str, Any]:
    """Read a config as a plain dict from a shipped name, a bundled model name (``tiny-mixtral``),
    a config.json path or a model directory.

    Raises :class:`ConfigError` naming the path or name when nothing usable is found.
    """
    from moescope.data import BUNDLED_MODELS, bundled_model_path

    text = str(source)
    shipped = resolve_shipped(text) if not Path(text).exists() else None
    if shipped is not None:
        path = CONFIG_DIR / f"{shipped}.json"
    elif text in BUNDLED_MODELS and not Path(text).exists():
        path = bundled_model_path(text) / "config.json"
    else:
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"{source}: model directory has no config.json")
        elif not path.is_file():
            raise ConfigError(
                f"{source}: no such file or directory, and not a shipped config name "
                f"(shipped: {', '.join(shipped_names())})"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
    if "model_type" not in data:
        raise ConfigError(f"{path}: field 'model_type' is missing")
    return data


def load_config(source: Any) -> Any:
    """A transformers ``PretrainedConfig`` from a config object, a dict, a shipped name or a path.

    Dicts go through ``AutoConfig.for_model(model_type, **fields)`` so that the family's defaults
    (biases, head sizes, dense-layer rules) fill the fields the file leaves out, exactly as they
    would when the model is built.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    data = dict(source) if isinstance(source, dict) else load_config_dict(source)
    where = "config" if isinstance(source, dict) else str(source)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{where}: field 'model_type' is missing")
    data.pop("auto_map", None)  # remote-code pointers: the native transformers class is used instead
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{where}: transformers cannot build a '{model_type}' config ({exc})") from exc
