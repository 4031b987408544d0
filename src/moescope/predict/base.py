"""The predictor contract: the estimator base of :mod:`moescope.core.estimator`, plus traces and queries.

- ``__init__`` only stores keyword arguments; ``get_params``/``set_params``/:func:`clone` (from the
  core) rebuild a predictor from them, parts such as the combined predictor's ``learned`` included.
- ``fit(trace)`` validates the parameters against ``_parameter_constraints`` (errors name the
  parameter and the allowed values), forgets any earlier fit, learns state in attributes ending in
  ``_`` and returns ``self``; it keeps no reference to the trace.
- :meth:`BasePredictor.predict_scores` maps a :class:`~moescope.predict.queries.Queries` batch to
  ``(n, E)`` scores (higher = more likely used; a row of NaN = abstain) and
  :meth:`BasePredictor.predict` to ranked ids ``(n, m)`` with their scores (-1 = abstain).
- :meth:`BasePredictor.save` writes one ``.npz`` file: the arrays plus a JSON header with the class,
  parameters, scalar state and the predictor's ``version`` (of its learned state's layout; nested
  predictors carry theirs too). Nothing is pickled, so loading a model never runs code from the file.
  A file whose version or arrays do not fit the installed class raises a :class:`ConfigError` that
  names the file and asks for a refit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from moescope.core.estimator import (
    Boolean,
    Estimator,
    InstanceOf,
    Interval,
    NotFittedError,
    Options,
    OrNone,
    RandomState,
    clone,
)
from moescope.errors import ConfigError
from moescope.predict.queries import TEMPORAL, Queries, mode_name
from moescope.trace.atomic import atomic_write

FORMAT = "moescope-predictor"
FORMAT_VERSION = 2  # 2: the header and nested predictors carry the predictor's state version


class StateMismatchError(ConfigError):
    """A saved predictor's state does not fit the installed class (older or newer model layout)."""


# ----------------------------------------------------------------------------- constraints
class Modes:
    """A non-empty sequence of modes: spatial distances >= 1 and/or 0 for temporal."""

    def check(self, v: Any) -> bool:
        try:
            vals = list(v)
        except TypeError:
            return False
        return bool(vals) and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0 for x in vals
        )

    def __str__(self) -> str:
        return "a non-empty list of ints (spatial distances >= 1, 0 = temporal)"


# ----------------------------------------------------------------------------- base class
class BasePredictor(Estimator):
    """Base of every expert predictor; see the module docstring for the contract.

    Subclasses set ``name`` (registry key), ``_parameter_constraints`` and implement ``_fit(trace)``
    and ``_scores(queries)``; ``_modes()`` says which query modes the fitted predictor answers.
    """

    name: ClassVar[str] = "base"
    version: ClassVar[int] = (
        1  # layout of the learned state; bump when saved files of the old layout cannot load
    )
    table: ClassVar[bool] = True  # a table lookup (counted in the >= 1M predictions/s target)
    _parameter_constraints: ClassVar[dict[str, Any]] = {}

    # -- fitting
    def fit(self, trace: Any) -> BasePredictor:
        """Learn from ``trace`` (a :class:`~moescope.trace.Trace` or a filtered view); returns ``self``."""
        self._validate_params()
        self._reset()
        if trace.num_tokens == 0:
            from moescope.errors import DataError

            raise DataError(f"{trace.path}: no rows to fit {type(self).__name__} on (empty trace or filter)")
        self.num_experts_ = int(trace.num_experts)
        self.top_k_ = int(trace.top_k)
        self.num_layers_ = int(trace.num_layers)
        self._fit(trace)
        self.fitted_ = True
        return self

    def _fit(self, trace: Any) -> None:
        raise NotImplementedError

    def history_window(self) -> int:
        """How many previous tokens the predictor looks at (the evaluator builds windows this wide)."""
        return 1

    def modes(self) -> list[int]:
        """Modes the fitted predictor answers (0 = temporal, d >= 1 spatial distance); all by default."""
        return self._modes()

    def _modes(self) -> list[int]:
        return []  # empty list = every mode

    # -- predicting
    def predict_scores(self, q: Queries) -> np.ndarray:
        """``(n, E)`` float32 scores, higher = more likely used; a NaN row means the predictor abstains."""
        self.check_is_fitted()
        if q.num_experts != self.num_experts_:
            raise ConfigError(
                f"{type(self).__name__} was fitted on E={self.num_experts_} experts; the queries have E={q.num_experts}"
            )
        if not 0 <= q.layer < self.num_layers_:
            raise ConfigError(
                f"{type(self).__name__}: layer {q.layer} out of range 0..{self.num_layers_ - 1}"
            )
        modes = self._modes()
        if modes and q.distance not in modes:
            raise ConfigError(
                f"{type(self).__name__} was fitted for modes {[mode_name(m) for m in modes]}, not "
                f"{mode_name(q.distance)}: refit with that distance"
            )
        return self._scores(q)

    def _scores(self, q: Queries) -> np.ndarray:
        raise NotImplementedError

    def predict(self, q: Queries, m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ranked predictions: ids ``(n, m)`` int16 (best first, -1 = abstain) and their scores ``(n, m)``.

        ``m`` defaults to ``top_k``; ask for ``m > k`` to fill a prefetch budget.
        """
        scores = self.predict_scores(q)
        return rank(scores, self.top_k_ if m is None else m)

    # -- size
    @property
    def n_params_(self) -> int:
        """Number of learned numbers (table entries or weights)."""
        self.check_is_fitted()
        state, _ = self._state()
        return int(sum(a.size for a in state.values()))

    # -- persistence
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned state split into arrays and JSON scalars."""
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, Any] = {}
        for key, v in vars(self).items():
            if not key.endswith("_") or key.startswith("_"):
                continue
            if isinstance(v, np.ndarray):
                arrays[key] = v
            elif isinstance(v, dict) and v and all(isinstance(x, np.ndarray) for x in v.values()):
                for sub, arr in v.items():
                    arrays[f"{key}/{sub}"] = arr
            elif isinstance(v, BasePredictor):
                sa, ss = v._state()
                for sub, arr in sa.items():
                    arrays[f"{key}>{sub}"] = arr
                scalars[key] = {
                    "__predictor__": v.name,
                    "version": v.version,
                    "params": _jsonable(v.get_params(deep=False)),
                    "state": ss,
                }
            else:
                scalars[key] = _jsonable(v)
        return arrays, scalars

    def _set_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        nested: dict[str, dict[str, np.ndarray]] = {}
        for key, arr in arrays.items():
            if ">" in key:
                head, sub = key.split(">", 1)
                nested.setdefault(head, {})[sub] = arr
            elif "/" in key:
                head, sub = key.split("/", 1)
                d = getattr(self, head, None)
                if not isinstance(d, dict):
                    d = {}
                    setattr(self, head, d)
                d[sub] = arr
            else:
                setattr(self, key, arr)
        for key, v in scalars.items():
            if isinstance(v, dict) and "__predictor__" in v:
                check_version(v["__predictor__"], v.get("version", 1), f"its {key[:-1]!r} part")
                child = make_predictor(v["__predictor__"], **_params_from_json(v["params"]))
                child._set_state(nested.get(key, {}), v["state"])
                setattr(self, key, child)
            else:
                setattr(self, key, v)
        self._after_load()

    def _after_load(self) -> None:
        """Rebuild derived objects (e.g. a torch module) from the loaded state."""

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the fitted predictor to ``path`` (``.npz``) atomically; ``extra`` is stored in the header."""
        self.check_is_fitted()
        path = Path(path)
        arrays, scalars = self._state()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "predictor": self.name,
            "predictor_version": self.version,
            "params": _jsonable(self.get_params(deep=False)),
            "state": scalars,
            "extra": _jsonable(extra or {}),
        }
        payload = {"__header__": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)}
        payload.update({k.replace(">", "__GT__"): v for k, v in arrays.items()})

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **payload)

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a saved predictor (class, parameters, ``extra``) without loading arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__header__" not in z.files:
                raise ConfigError(f"{path}: not a moescope predictor file (no __header__ entry)")
            header = json.loads(z["__header__"].tobytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such predictor file") from None
    except EOFError:
        raise ConfigError(f"{path}: empty file, not a moescope predictor file") from None
    except (zipfile.BadZipFile, ValueError, OSError, io.UnsupportedOperation) as exc:
        raise ConfigError(f"{path}: not a moescope predictor file ({exc})") from None
    if not isinstance(header, dict):
        raise ConfigError(
            f"{path}: the predictor header is a {type(header).__name__}, expected a JSON object"
        )
    if header.get("format") != FORMAT:
        raise ConfigError(f"{path}: header format is {header.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("predictor", str), ("params", dict), ("state", dict), ("format_version", int)):
        if not isinstance(header.get(key), kind):
            raise ConfigError(
                f"{path}: header field {key!r} must be a {kind.__name__}, got {header.get(key)!r:.80}"
            )
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {header['format_version']} is newer than this moescope reads"
        )
    return header


def check_version(name: str, version: int, what: str = "it") -> None:
    """Raise :class:`StateMismatchError` unless ``version`` is the installed version of predictor ``name``."""
    reg = registered_predictors()
    cls = reg[name].cls if name in reg else None
    if cls is not None and version != cls.version:
        raise StateMismatchError(
            f"{what} is a {name!r} predictor of version {version}, and this moescope's {cls.__name__} is "
            f"version {cls.version} (the model changed)"
        )


def load_predictor(path: str | Path) -> BasePredictor:
    """Load a predictor written by :meth:`BasePredictor.save` (no pickle involved).

    Files whose predictor version or arrays do not fit the installed class (saved before the model
    changed) raise a :class:`ConfigError` naming the file and asking for a refit.
    """
    path = Path(path)
    header = read_header(path)
    name = header["predictor"]
    refit = "refit it with this moescope (moescope predict fit ... -o FILE)"
    try:
        check_version(name, int(header.get("predictor_version", 1)))
        pred = make_predictor(name, **_params_from_json(header["params"]))
        with np.load(path, allow_pickle=False) as z:
            arrays = {k.replace("__GT__", ">"): z[k] for k in z.files if k != "__header__"}
        pred._set_state(arrays, header["state"])
    except StateMismatchError as exc:
        raise ConfigError(f"{path}: {exc}; {refit}") from None
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        # e.g. torch's size mismatch on load, an array of the wrong shape, a state of the wrong type
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"{path}: the saved {name!r} predictor does not fit this moescope's model ({detail}); {refit}"
        ) from exc
    return pred


def _jsonable(v: Any) -> Any:
    if isinstance(v, BasePredictor):  # a part given as an estimator (CombinedPredictor(learned=...))
        return {"__predictor__": v.name, "params": _jsonable(v.get_params(deep=False))}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, tuple):
        return {"__tuple__": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _params_from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_params_from_json(x) for x in v["__tuple__"])
        if set(v) == {"__predictor__", "params"}:
            return make_predictor(v["__predictor__"], **_params_from_json(v["params"]))
        return {k: _params_from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_params_from_json(x) for x in v]
    return v


def rank(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``m`` ids by descending score (ties: lower id first) and their scores; NaN rows give -1.

    The kept set comes from a value ``np.partition`` (several times faster than ``argpartition``)
    and only the ``m`` kept columns are sorted.
    """
    n, E = scores.shape
    m = int(min(max(m, 1), E))
    nan = np.isnan(scores)
    abstain = nan.all(axis=1) if n else np.zeros(0, bool)
    s = (
        np.where(nan, -np.inf, scores).astype(np.float32)
        if nan.any()
        else scores.astype(np.float32, copy=False)
    )
    if m < E:
        t = np.partition(s, E - m, axis=1)[:, E - m : E - m + 1]  # (n, 1) the m-th largest score
        above = s > t
        tie = s == t
        need = m - above.sum(1, keepdims=True)
        keep = above | (tie & (np.cumsum(tie, axis=1) - tie < need))  # ties: lowest ids first
        part = np.nonzero(keep)[1].reshape(n, m)  # kept ids, ascending
    else:
        part = np.broadcast_to(np.arange(E), (n, E))
    vals = np.take_along_axis(s, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: equal scores keep the lower id first
    ids = np.take_along_axis(part, order, 1).astype(np.int16)
    top = np.take_along_axis(vals, order, 1)
    if abstain.any():
        ids[abstain] = -1
        top[abstain] = np.nan
    return ids, top


def count_popularity(trace: Any, batch_size: int = 65536) -> np.ndarray:
    """``(L, E)`` share of routing slots that went to each expert, per layer (missing ignored)."""
    L, E, missing = trace.num_layers, trace.num_experts, trace.missing_id
    counts = np.zeros((L, E + 1), np.float64)
    for b in trace.iter_batches(["experts"], batch_size=batch_size):
        ex = np.where(b.experts == missing, E, b.experts).astype(np.int64)  # (n, L, k)
        flat = (np.arange(L)[None, :, None] * (E + 1) + ex).ravel()
        counts += np.bincount(flat, minlength=L * (E + 1)).reshape(L, E + 1)
    c = counts[:, :E]
    tot = c.sum(1, keepdims=True)
    return np.where(tot > 0, c / np.maximum(tot, 1), 1.0 / E).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Registration:
    """One registry entry: the class, its default parameters and the line ``moescope predict list`` shows.

    A default that is a :class:`BasePredictor` (a part, such as the combined predictor's learned
    model) is cloned for every new predictor, so two predictors never share a part.
    """

    cls: type[BasePredictor]
    defaults: dict[str, Any]
    description: str
    listed: bool = True


#: name -> registration, in the order ``moescope predict list`` shows them; filled by
#: :mod:`moescope.predict.registry`.
REGISTRY: dict[str, Registration] = {}


def register_predictor(
    name: str, cls: type[BasePredictor], description: str, *, listed: bool = True, **params: Any
) -> None:
    """Make ``cls`` with ``params`` available as ``name`` (``listed=False``: an alias, not listed)."""
    REGISTRY[name] = Registration(cls, params, description, listed)


def registered_predictors() -> dict[str, Registration]:
    """Every registered predictor name with its registration (the registry module is imported first)."""
    from moescope.predict import registry  # noqa: F401  (fills REGISTRY)

    return dict(REGISTRY)


def make_predictor(name: str, **params: Any) -> BasePredictor:
    """A new predictor by registry name (``moescope predict list``); ``params`` override its defaults.

    ``part__param`` keys set a parameter of a part, e.g. ``make_predictor("best", learned__epochs=1)``.
    """
    reg = registered_predictors()
    if name not in reg:
        raise ConfigError(f"unknown predictor {name!r}; choose one of: {', '.join(sorted(reg))}")
    r = reg[name]
    names = r.cls.param_names()
    unknown = sorted(k for k in params if k.split("__")[0] not in names)
    if unknown:
        raise ConfigError(
            f"predictor {name!r} has no parameter {unknown[0]!r}; it takes {', '.join(names) or 'none'}"
        )
    defaults = {k: clone(v) if isinstance(v, Estimator) else v for k, v in r.defaults.items()}
    flat = {k: v for k, v in params.items() if "__" not in k}
    nested = {k: v for k, v in params.items() if "__" in k}
    pred = r.cls(**{**defaults, **flat})
    if nested:
        pred.set_params(**nested)
    return pred


__all__ = [
    "REGISTRY",
    "TEMPORAL",
    "BasePredictor",
    "Boolean",
    "InstanceOf",
    "Interval",
    "NotFittedError",
    "Options",
    "OrNone",
    "RandomState",
    "Registration",
    "StateMismatchError",
    "clone",
    "load_predictor",
    "make_predictor",
    "rank",
]
