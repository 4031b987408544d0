"""The dependency rule, checked on every module of src/moescope (docs/architecture.md explains it).

Layers, bottom up: ``errors``; ``trace`` (the format every stage reads and writes); ``core`` (typed
facts and helpers beneath the stages); ``data`` and ``models`` (bundled files, model facts); then
the stages, which import only the layers below them and the public face of a few other stages
(written below as data); ``demo`` runs stages through commands it is handed; ``cli`` on top.
Nothing imports ``cli``, only command modules import ``cli_utils``, no private name crosses a
module boundary, and there are no import circles.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections import defaultdict
from pathlib import Path

import pytest

import moescope

SRC = Path(moescope.__file__).parent

#: layer -> the layers it may import (beside itself). The root package ``moescope`` is ``""``.
FOUNDATION = {"errors", "trace", "core", "data", "models"}
ALLOWED: dict[str, set[str]] = {
    "": {
        "errors",
        "trace",
        "core",
        "analysis",
        "predict",
        "simulate",
        "capture",
        "report",
    },  # the lazy front door
    "errors": set(),
    "trace": {"", "errors"},  # "": the package version written into manifests
    "core": {"errors", "trace"},
    "data": {"errors"},
    "models": {"errors", "trace", "core", "data"},
    "capture": FOUNDATION | {"strategies"},  # capture --strategy records the routing a strategy applied
    "strategies": FOUNDATION | {"analysis"},  # pvalue reads the density model analyze fits
    "evaluate": FOUNDATION | {"capture", "strategies"},
    "analysis": FOUNDATION,
    "predict": FOUNDATION | {"interop"},  # seed 004 extract finds short series with the importer's test
    "simulate": FOUNDATION | {"predict"},  # predictor-guided prefetching, through predict's public face
    "ablate": FOUNDATION | {"capture"},  # loads models and records routing the way capture does
    "interop": FOUNDATION,
    "monitor": FOUNDATION | {"capture", "analysis"},  # the capture engine's hooks, the offline metrics
    "report": FOUNDATION | {"analysis", "evaluate", "predict"},  # the page shows them; compare reuses diff
    "demo": FOUNDATION,
    "cli_utils": set(),
    "__main__": {"cli"},  # python -m moescope (torchrun -m moescope) runs the CLI
    "cli": {
        "errors",
        "ablate",
        "analysis",
        "capture",
        "demo",
        "evaluate",
        "interop",
        "models",
        "predict",
        "report",
        "simulate",
        "trace",
    },
}

#: What one stage may import from another: its public face, not its internals.
PUBLIC_FACE: dict[str, set[str]] = {
    "predict": {"moescope.predict", "moescope.predict.base", "moescope.predict.queries"},
    "capture": {"moescope.capture", "moescope.capture.runner", "moescope.capture.engine"},
    "analysis": {
        "moescope.analysis",
        "moescope.analysis.load",
        "moescope.analysis.entropy",
        "moescope.analysis.density",
        "moescope.analysis.run",  # report runs the suite when no analysis folder is given
        "moescope.analysis.suite",
    },
    "interop": {"moescope.interop"},
}

#: Known violations left to another branch (#12 part A moves capture's family code into core.families);
#: delete an entry when it is gone.
PENDING: set[tuple[str, str]] = set()
#: Private names still imported across modules, for the same branch to remove.
PENDING_PRIVATE: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """``(module, imported names, at module level)`` for every moescope import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        level = id(node) in top
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moescope":
            out.append((node.module, [a.name for a in node.names], level))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], level) for a in node.names if a.name.split(".")[0] == "moescope"]
    return out


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(target: str, names: list[str]) -> list[str]:
    """The modules an import statement loads: ``from pkg import mod`` names a submodule."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs or [target]


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(moescope.__path__, "moescope.")]
    assert set(names) >= set(MODULES) - {"moescope"}
    for name in names:
        importlib.import_module(name)


def test_layers_import_only_what_the_rule_allows() -> None:
    bad = []
    for module, path in MODULES.items():
        src = _layer(module)
        for target, names, _ in _imports(path):
            for dst_module in _resolve(target, names):
                dst = _layer(dst_module)
                if dst == src or (module, dst_module) in PENDING:
                    continue
                if dst == "cli" and src != "__main__":
                    bad.append(f"{module} imports the CLI ({dst_module})")
                elif dst == "cli_utils" and not module.endswith(".commands"):
                    bad.append(f"{module} imports cli_utils, which is for command modules only")
                elif src == "cli":
                    continue
                elif dst != "cli_utils" and dst not in ALLOWED.get(src, FOUNDATION):
                    bad.append(f"{module} ({src}) imports {dst_module} ({dst}): not allowed for {src}")
                elif dst in PUBLIC_FACE and src not in ("", "cli") and dst_module not in PUBLIC_FACE[dst]:
                    bad.append(f"{module} imports {dst_module}, an internal of {dst}")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module() -> None:
    bad = []
    for module, path in MODULES.items():
        for target, names, _ in _imports(path):
            private = [
                n
                for n in names
                if n.startswith("_") and not n.startswith("__") and (module, n) not in PENDING_PRIVATE
            ]
            if private:
                bad.append(f"{module}: from {target} import {', '.join(private)}")
            if any(p.startswith("_") for p in target.split(".")) and _layer(target) != _layer(module):
                bad.append(f"{module} imports the private module {target} of another package")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    modules: dict[str, set[str]] = defaultdict(set)  # module-level imports: circles break imports
    layers: dict[str, set[str]] = defaultdict(set)  # every import, lazy ones too: circles between layers
    for module, path in MODULES.items():
        for target, names, top in _imports(path):
            for dst in _resolve(target, names):
                if top and dst != module and not module.startswith(dst + "."):
                    modules[module].add(dst)
                if _layer(dst) != _layer(module) and _layer(module) != "":
                    layers[_layer(module)].add(_layer(dst))
    layers.pop("", None)
    for graph in (layers, modules):
        for comp in _cycles({k: {d for d in v if d != ""} for k, v in graph.items()}):
            pytest.fail(f"import circle: {' -> '.join(comp)}")


def test_the_checks_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("moescope.simulate.engine") == "simulate" and _layer("moescope") == ""
    assert "simulate" not in ALLOWED["predict"]  # predict -> simulate would close a circle
    assert ALLOWED.get("a-new-stage", FOUNDATION) == FOUNDATION
