"""Callable stage packages for the front door: ``moescope.capture(...)`` and ``moescope.simulate(...)``.

A stage package stays an ordinary package (``from moescope.simulate import LRU`` works); calling it
runs its main function. This is done by giving the module object a class with ``__call__``, which
keeps ``import moescope.simulate`` and the attribute ``moescope.simulate`` the same object.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call runs its ``__call_target__`` attribute."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__call_target__)(*args, **kwargs)


def make_callable(module_name: str, target: str) -> None:
    """Make the module ``module_name`` callable as its function ``target``."""
    module = sys.modules[module_name]
    module.__call_target__ = target
    module.__class__ = CallableModule
