"""The package's layers import downwards only (DESIGN.md, "Layers"), read from the source files.

    main, demo  ->  experiment  ->  train  ->  teachers, bridges, transforms, eval  ->
    losses, data  ->  models, sharding, assets, config_lib, topologies

A layer is a subpackage or a top-level module of ``distill_jax``. Every ``import`` statement
counts, at module level or inside a function (a deferred import is still a dependency). Layers of
one tier may import each other as long as the graph stays acyclic and the named rules hold:
models import no losses, data, bridges or train; losses import no train, data or bridges; data
imports no models, eval or train. No module is imported here: the graph comes from ``ast``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "distill_jax")

# Lowest tier first. A new subpackage or top-level module gets a tier here.
TIERS = (
    ("models", "sharding", "assets", "config_lib", "topologies"),
    ("losses", "data"),
    ("teachers", "bridges", "transforms", "eval"),
    ("train",),
    ("experiment",),
    ("main", "demo", "commands"),
)
TIER = {layer: i for i, layers in enumerate(TIERS) for layer in layers}
FORBIDDEN = {
    "models": ("losses", "data", "bridges", "train"),
    "losses": ("train", "data", "bridges"),
    "data": ("models", "eval", "train"),
}


class Edge(NamedTuple):
    source: str  # layer
    target: str  # layer
    where: str  # "distill_jax/data/seqkd.py:33"
    statement: str  # "from distill_jax.eval import gsm"

    def __str__(self):
        return f"{self.where}: {self.statement}  ({self.source} -> {self.target})"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Fully qualified names a statement imports (``from a import b`` gives ``a.b``: b may be a
    submodule, and for a layer-level graph ``a.b`` and ``a`` land in the same layer anyway)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: resolve against this module's package
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" for a in node.names]


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "distill_jax" and len(parts) > 1 else None


def _edges() -> list[Edge]:
    edges = []
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            module = _module_name(path)
            source = _layer(module)
            if source is None:  # distill_jax/__init__.py: imports its submodules lazily
                continue
            with open(path) as f:
                text = f.read()
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text, path)):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                for name in _imported(node, module, file == "__init__.py"):
                    target = _layer(name)
                    if target is not None and target != source:
                        where = f"{os.path.relpath(path, ROOT)}:{node.lineno}"
                        edges.append(Edge(source, target, where, lines[node.lineno - 1].strip()))
    return edges


EDGES = _edges()


def _report(bad: list[Edge]) -> str:
    return "\n  ".join(str(e) for e in sorted(set(bad)))


def test_every_layer_has_a_tier():
    layers = {e.source for e in EDGES} | {e.target for e in EDGES}
    for entry in os.listdir(PACKAGE):
        name = entry[:-3] if entry.endswith(".py") else entry
        if entry.endswith(".py") or os.path.isfile(os.path.join(PACKAGE, entry, "__init__.py")):
            layers.add(name)
    unknown = sorted(layers - set(TIER) - {"__init__"})
    assert not unknown, f"Layers without a tier in TIERS of {__file__}: {unknown}"


def test_imports_point_down_the_layer_order():
    up = [e for e in EDGES if TIER.get(e.target, -1) > TIER.get(e.source, len(TIERS))]
    assert not up, "Imports that point up the layer order (DESIGN.md, Layers):\n  " + _report(up)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_design_rules(layer):
    bad = [e for e in EDGES if e.source == layer and e.target in FORBIDDEN[layer]]
    assert not bad, f"{layer} must import none of {FORBIDDEN[layer]}:\n  " + _report(bad)


def test_the_layer_graph_is_acyclic():
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        graph.setdefault(e.source, set()).add(e.target)
    cycles, state = [], {}  # state: 1 on the DFS stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            lines += [
                f"    {e}" for e in sorted({e for e in EDGES if (e.source, e.target) == (a, b)})
            ]
    assert not cycles, "Import cycles between layers:\n  " + "\n  ".join(lines)


def _loaded_after(statement: str) -> list[str]:
    code = (
        f"import sys\n{statement}\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'distill_jax')))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_importing_the_package_loads_no_submodule():
    assert _loaded_after("import distill_jax") == ["distill_jax"]


def test_importing_the_divergences_loads_only_their_layer_and_below():
    loaded = _loaded_after("import distill_jax.losses.divergences")
    allowed = {None, "losses", *TIERS[0]}
    above = [m for m in loaded if _layer(m) not in allowed]
    assert not above, (
        f"import distill_jax.losses.divergences loads modules of other layers: {above}"
    )
    assert len(loaded) <= 30, f"losses.divergences loads {len(loaded)} modules: {loaded}"


def test_the_public_surface_resolves_lazily():
    import jax.numpy as jnp

    import distill_jax as dj

    logits = jnp.zeros((1, 2, 3))
    assert dj.losses.divergence("forward_kl", logits, logits + 1.0).shape == (1, 2)
    assert callable(dj.models.from_pretrained) and callable(dj.data.load_tokenizer)
    assert callable(dj.bridges.align_chunks) and callable(dj.transforms.prune_experts)
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        dj.no_such_module  # noqa: B018
