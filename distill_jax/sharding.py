"""Mesh, logical-axis rules, and placement of parameters and batches.

Model code names array dimensions with logical axes only (``vocab``, ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``experts``, ``batch``, ``length``). A rules table maps each logical
axis to zero or more mesh axes out of ``data``, ``fsdp``, ``tensor``, ``expert``. Within one array
a mesh axis is used at most once: the first logical axis that claims it wins (so activations
``("batch", "length", "embed")`` shard the batch over data+fsdp and leave ``embed`` whole, while
a parameter ``("embed", "mlp")`` shards ``embed`` over fsdp).

Axis types: meshes are built with ``AxisType.Auto`` (GSPMD propagation, as MaxText does), not the
Explicit default of ``jax.make_mesh``: the model then runs unchanged on one device and on a mesh,
and contractions over a sharded dimension need no ``out_sharding`` annotations. Activations are
pinned with ``shard(x, axes)`` (a ``with_sharding_constraint``) only where a layout matters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("experts", "expert"),
    ("layers", None),
)

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "distill_jax_sharding", default=None
)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with named axes; one size may be -1 (the rest).

    Args:
        axes: e.g. ``(("data", 2), ("fsdp", -1), ("tensor", 1), ("expert", 1))``; names from
            ``MESH_AXES``, each at most once.
        devices: the devices to use, default ``jax.devices()``.

    Raises:
        ValueError: unknown axis name, more than one -1, or sizes whose product is not the number
            of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = [name for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"Mesh axes must be distinct names from {MESH_AXES}; got {names}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may have size -1; got {dict(axes)}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known == 0 or len(devices) % known:
            raise ValueError(
                f"Mesh {dict(axes)} cannot fill {len(devices)} devices: the fixed axes multiply "
                f"to {known}, which does not divide {len(devices)}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(names, sizes))} has {math.prod(sizes)} devices but {len(devices)} are "
            "available; make the axis sizes multiply to the device count (or use -1 for one axis)."
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; each mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        mesh_axes = (target,) if isinstance(target, str) else tuple(target)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names if n in mesh.shape)


def _restrict_to_mesh(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes the mesh does not have (a rules table may name axes a small mesh lacks)."""
    out = []
    for entry in spec:
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        names = tuple(n for n in names if n in mesh.shape)
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: Rules, shape=None, what: str = "array"
) -> NamedSharding:
    """NamedSharding for an array with these logical axes; checks divisibility when shape is given.

    Raises:
        ValueError: a dimension is not divisible by the mesh axes it is sharded over.
    """
    spec = _restrict_to_mesh(logical_to_spec(logical_axes, rules), mesh)
    if shape is not None:
        for dim, (size, entry, name) in enumerate(zip(shape, spec, logical_axes)):
            parts = _axis_size(mesh, entry)
            if size % parts:
                raise ValueError(
                    f"{what}: dimension {dim} ({name!r}, size {size}) is sharded over mesh axes "
                    f"{entry} of total size {parts}, which does not divide it; change the mesh or "
                    f"map {name!r} to other mesh axes in the rules."
                )
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding per variable of an nnx State, from each variable's ``out_sharding`` names."""

    def one(path, var):
        axes = var.get_metadata().get("out_sharding") or (None,) * np.ndim(var.get_value())
        name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        return var.replace(named_sharding(mesh, axes, rules, np.shape(var.get_value()), name))

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of ``model`` on ``mesh`` by ``rules`` (in place; also returned)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, shape=None) -> NamedSharding:
    """Sharding of a [B, T] token batch: batch over the rules' ``batch`` axes, length whole."""
    return named_sharding(mesh, ("batch", "length"), rules, shape, what="batch")


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[int, tuple[str, ...]]:
    """(devices a batch's rows are split over, the mesh axes the rules map ``batch`` to)."""
    entry = _restrict_to_mesh(logical_to_spec(("batch",), rules), mesh)[0]
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    return _axis_size(mesh, entry), names


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within this context, ``shard(x, axes)`` constrains activations on ``mesh`` with ``rules``."""
    token = _CONTEXT.set((mesh, tuple(rules)))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _CONTEXT.reset(token)


def current_mesh() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the enclosing ``use_mesh``, or None."""
    return _CONTEXT.get()


def current_platform() -> str:
    """The platform ("cpu", "gpu" or "tpu") of the mesh in use, else JAX's default backend.

    A program compiled for a TPU topology on a CPU machine (``--mode=compile``) runs under a mesh of
    TPU devices, so kernels are chosen by the mesh, not by the machine.
    """
    ctx = _CONTEXT.get()
    if ctx is not None:
        return ctx[0].devices.flat[0].platform
    return jax.default_backend()


def shard(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's layout by logical axes; a no-op outside ``use_mesh``.

    Dimensions that a mesh axis does not divide are left unsharded rather than failing, since
    activation shapes (e.g. a decode step's length 1) vary while parameter layouts are fixed.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = _restrict_to_mesh(logical_to_spec(logical_axes, rules), mesh)
    spec = PartitionSpec(
        *(e if size % _axis_size(mesh, e) == 0 else None for size, e in zip(x.shape, spec))
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_logical_axes(model: nnx.Module) -> dict[str, tuple | None]:
    """{"layers/0/attn/q_proj": ("embed", "heads", "head_dim"), ...}: each parameter's
    logical axes (its ``out_sharding`` metadata), keyed by its path in the pure-dict state."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        out["/".join(str(p) for p in path)] = tuple(axes) if axes else None
    return out


def tree_shardings(tree, mesh: Mesh, rules: Rules, axes: dict[str, tuple | None]):
    """A NamedSharding per leaf of a pure-dict parameter tree, from ``param_logical_axes``.

    Leaves without logical axes are replicated. Raises (naming the parameter) when a mesh axis
    does not divide a sharded dimension.
    """

    def one(path, leaf):
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        names = axes.get(key) or (None,) * np.ndim(leaf)
        return named_sharding(mesh, names, rules, np.shape(leaf), what=key)

    return jax.tree_util.tree_map_with_path(one, tree)
