"""One estimator base for predictors, cache policies and routing strategies (scikit-learn's conventions).

- ``__init__`` only stores its keyword arguments, unchanged, under the same names; no logic there.
- :meth:`Estimator.get_params` / :meth:`Estimator.set_params` read and write them (``deep=True``
  and ``part__param`` keys reach into parameters that are estimators themselves), and :func:`clone`
  rebuilds an unfitted copy from them, refusing a constructor that altered a value.
- ``fit`` validates the parameters against ``_parameter_constraints`` (one error format, naming the
  parameter and what it must be), forgets any earlier fit, sets learned state in attributes ending
  in ``_`` and returns ``self``.
- Using an estimator before ``fit`` raises :class:`NotFittedError` with one message for all:
  ``"<Class> is not fitted yet: call fit(...) first"``.

scikit-learn's own ``BaseEstimator`` is not used because its ``clone`` deep-copies non-estimator
parameters and its tag machinery brings the whole of sklearn into ``import moescope``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np

from moescope.errors import ConfigError


class NotFittedError(ConfigError):
    """An estimator was used before ``fit``."""


# ----------------------------------------------------------------------------- constraints
class Options:
    """The parameter must be one of these values."""

    def __init__(self, *values: Any) -> None:
        self.values = values

    def check(self, v: Any) -> bool:
        return v in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(x) for x in self.values)


class Interval:
    """A number of type ``kind`` in ``[lo, hi]`` (``None`` = unbounded)."""

    def __init__(self, kind: type, lo: float | None, hi: float | None) -> None:
        self.kind, self.lo, self.hi = kind, lo, hi

    def check(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(
            v, (int, np.integer) if self.kind is int else (int, float, np.number)
        ):
            return False
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else self.lo
        hi = "inf" if self.hi is None else self.hi
        return f"a{'n int' if self.kind is int else ' number'} in [{lo}, {hi}]"


class OrNone:
    """``None`` or a value accepted by ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def check(self, v: Any) -> bool:
        return v is None or self.inner.check(v)

    def __str__(self) -> str:
        return f"None or {self.inner}"


class RandomState:
    """``None`` or a non-negative int seed."""

    def check(self, v: Any) -> bool:
        return v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0)

    def __str__(self) -> str:
        return "None or a non-negative int seed"


class Boolean:
    """``True`` or ``False`` (not 0 or 1)."""

    def check(self, v: Any) -> bool:
        return isinstance(v, bool)

    def __str__(self) -> str:
        return "True or False"


class InstanceOf:
    """An instance of ``cls`` (e.g. a part that is an estimator), or ``None`` when ``optional``."""

    def __init__(self, cls: type, optional: bool = False) -> None:
        self.cls, self.optional = cls, optional

    def check(self, v: Any) -> bool:
        return isinstance(v, self.cls) or (self.optional and v is None)

    def __str__(self) -> str:
        return f"{'None or ' if self.optional else ''}a {self.cls.__name__}"


# ----------------------------------------------------------------------------- base class
class Estimator:
    """Base of predictors, cache policies and routing strategies; see the module docstring."""

    _parameter_constraints: ClassVar[dict[str, Any]] = {}

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameter names (every parameter is a keyword; no ``*args``)."""
        if cls.__init__ is object.__init__:
            return []
        sig = inspect.signature(cls.__init__)
        names = []
        for p in sig.parameters.values():
            if p.name == "self" or p.kind == p.VAR_KEYWORD:
                continue
            if p.kind == p.VAR_POSITIONAL:
                raise TypeError(f"{cls.__name__}.__init__ takes *{p.name}; estimators take keywords only")
            names.append(p.name)
        return names

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, unchanged; with ``deep``, also ``part__param`` of estimator parts."""
        out: dict[str, Any] = {}
        for name in self.param_names():
            value = getattr(self, name)
            out[name] = value
            if deep and isinstance(value, Estimator):
                out.update((f"{name}__{k}", v) for k, v in value.get_params(deep=True).items())
        return out

    def set_params(self, **params: Any) -> Estimator:
        """Set constructor arguments (``part__param`` sets a part's); checked at the next ``fit``."""
        valid = self.param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            head, sep, sub = key.partition("__")
            if head not in valid:
                raise ConfigError(f"{type(self).__name__} has no parameter {head!r}; parameters: {valid}")
            if sep:
                nested.setdefault(head, {})[sub] = value
            else:
                setattr(self, key, value)
        for head, sub_params in nested.items():
            part = getattr(self, head)
            if not isinstance(part, Estimator):
                raise ConfigError(
                    f"{type(self).__name__}: parameter {head!r} is {part!r}, not an estimator, so "
                    f"{', '.join(f'{head}__{k}' for k in sub_params)} cannot be set"
                )
            part.set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params(deep=False).items())
        return f"{type(self).__name__}({args})"

    def _validate_params(self) -> None:
        """Raise :class:`ConfigError` naming the first parameter whose value is not allowed."""
        for key, cons in self._parameter_constraints.items():
            v = getattr(self, key)
            if not cons.check(v):
                raise ConfigError(
                    f"{type(self).__name__}: parameter {key}={v!r} is invalid; it must be {cons}"
                )

    def _reset(self) -> None:
        """Forget an earlier fit: drop every public attribute ending in ``_``."""
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)

    def is_fitted(self) -> bool:
        """True once ``fit`` completed."""
        return bool(getattr(self, "fitted_", False))

    def check_is_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless ``fit`` completed."""
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(...) first")


def plain_params(est: Estimator) -> dict[str, Any]:
    """``get_params(deep=False)`` with estimator parts written as their repr (for JSON summaries)."""
    return {k: repr(v) if isinstance(v, Estimator) else v for k, v in est.get_params(deep=False).items()}


def clone(est: Estimator) -> Estimator:
    """An unfitted copy with the same parameters (parts cloned too); raises if ``__init__`` altered one."""
    params = est.get_params(deep=False)
    copied = {k: clone(v) if isinstance(v, Estimator) else v for k, v in params.items()}
    new = type(est)(**copied)
    for k, v in new.get_params(deep=False).items():
        if v is not copied[k] and not _same(v, copied[k]):
            raise ConfigError(
                f"{type(est).__name__}.__init__ altered parameter {k!r}: {params[k]!r} -> {v!r}"
            )
    return new


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


__all__ = [
    "Boolean",
    "Estimator",
    "InstanceOf",
    "Interval",
    "NotFittedError",
    "Options",
    "OrNone",
    "RandomState",
    "clone",
    "plain_params",
]
