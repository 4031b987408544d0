"""Expert ablation: disable experts at run time and measure what the model loses, per domain.

:mod:`~moescope.ablate.hooks` edits the routing (``ExpertAblator``, ``ablate``),
:mod:`~moescope.ablate.measure` scores next-token predictions and bootstraps intervals,
:mod:`~moescope.ablate.sweep` runs conditions over a corpus and :mod:`~moescope.ablate.report`
writes rankings, figures and the summary. Importing this package loads none of them (the CLI
stays fast); the names below are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODES", "AblateOptions", "ExpertAblator", "ablate", "run_ablation", "write_outputs"]

_WHERE = {
    "MODES": "hooks",
    "ExpertAblator": "hooks",
    "ablate": "hooks",
    "AblateOptions": "sweep",
    "run_ablation": "sweep",
    "write_outputs": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moescope.ablate' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"moescope.ablate.{_WHERE[name]}"), name)
