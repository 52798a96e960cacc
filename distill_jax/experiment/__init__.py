r"""A config turned into objects: the only code that reads a config to build things.

``build(config) -> Experiment`` checks the config (before anything is loaded), then builds the
mesh, the loss spec, the data (tokenizer, train / held-out split, the training iterator), the
student (one-shot pruning included), the teacher and the vocabulary mask. ``train(config,
workdir)`` is ``loop.train(build(config), workdir)``; ``--mode=compile`` (``compile.py``), the
other ``--mode``\s (``distill_jax/commands.py``), ``demo.py`` and the notebooks build through it
too.

    experiment.models    models, teachers, the mesh  (build_model, build_teacher, build_mesh)
    experiment.data      tokenizers, documents, examples, preference pairs, batch iterators, the
                         bridge collator
    experiment.checks    check_onpolicy, check_pairs, check_vocab, loss_spec, step_shape
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax

from distill_jax import teachers
from distill_jax.experiment.checks import (
    ONPOLICY_TEACHERS,
    check_batch,
    check_cache,
    check_onpolicy,
    check_pairs,
    check_run,
    check_vocab,
    loss_spec,
    run_settings,
    step_shape,
)
from distill_jax.experiment.data import (
    load_documents,
    load_examples,
    make_batches,
    make_bridge_batches,
    make_collator,
    make_pair_batches,
    make_prompt_batches,
    privileged_prompts,
    tokenizer_from_spec,
    training_data,
)
from distill_jax.experiment.models import (
    ASSETS,
    MODEL_OVERRIDES,
    TEACHER_BUILDERS,
    build_mesh,
    build_model,
    build_teacher,
    model_config_from_block,
    read_checkpoint_config,
    resolve_path,
    rules,
)
from distill_jax.models import sampling
from distill_jax.models import scan as scan_lib
from distill_jax.models.transformer import to_scanned
from distill_jax.train import batch_sources, loop, registry, rollout
from distill_jax.train import step as step_lib
from distill_jax.train.build import StepBuild
from distill_jax.train.settings import RunSettings
from distill_jax.transforms import schedule as prune_schedule
from distill_jax.transforms import stats as transform_stats

__all__ = [
    "ASSETS",
    "MODEL_OVERRIDES",
    "ONPOLICY_TEACHERS",
    "TEACHER_BUILDERS",
    "Experiment",
    "build",
    "build_mesh",
    "build_model",
    "build_teacher",
    "check_batch",
    "check_cache",
    "check_onpolicy",
    "check_pairs",
    "check_run",
    "check_vocab",
    "load_documents",
    "load_examples",
    "loss_spec",
    "make_batches",
    "make_bridge_batches",
    "make_collator",
    "make_pair_batches",
    "make_prompt_batches",
    "model_config_from_block",
    "privileged_prompts",
    "read_checkpoint_config",
    "resolve_path",
    "rules",
    "run_settings",
    "step_shape",
    "tokenizer_from_spec",
    "train",
    "training_data",
]


def train(config, workdir: str) -> dict:
    """Run ``config`` in ``workdir`` (resuming from its checkpoints); returns the last eval.

    From the first line: a SIGTERM exits cleanly (``train.preemption``) and the workdir is
    locked against a second run (``config.train.force_unlock`` overrides; ``loop.guard``)."""
    force = bool((config.get("train") or {}).get("force_unlock", False))
    with loop.guard(workdir, force_unlock=force) as preemption:
        return loop.train(build(config), workdir, preemption)


@dataclasses.dataclass
class Experiment:
    """What a config builds, ready for ``train/loop.py`` (see ``build``)."""

    config: Any
    mesh: Any
    rules: tuple
    spec: Any  # the loss spec
    stages: list  # progressive pruning stages (``prune_schedule``), checked
    tokenizer: Any
    split: dict  # {"train": [...], "validation": [...]} documents or examples
    train_batches: Any  # the training host iterator
    student: Any  # the student module after one-shot pruning
    teacher: Any  # a ``teachers`` object or None
    bridge: Any  # the cross-tokenizer ``ChunkCollator`` or None
    vocab_mask: Any  # [V] bool (host) or None
    onpolicy: Any  # config.onpolicy (checked) or None
    settings: Any  # sampling.RolloutSettings on-policy, else None
    shape: tuple  # [B, L] of a step batch
    seed: int
    run: RunSettings  # what the step builder and the loop read (``run_settings``)

    @property
    def privileged(self) -> bool:
        """Batches carry a self-teacher's privileged prompts."""
        return self.onpolicy is not None and "privileged_ids" in self.train_batches.fields

    @property
    def pairs(self) -> bool:
        """Batches are preference pairs (``data.source="pairs"``)."""
        return self.config.data.get("source") == "pairs"

    @property
    def tensor_size(self) -> int:
        return int(self.mesh.shape["tensor"])

    def calibration_batches(self):
        """Fixed training batches for pruning statistics: the same on every (re)start."""
        if self.bridge is not None:
            raise ValueError("Pruning by calibration statistics is not wired to config.bridge.")
        return make_batches(
            self.config.data,
            self.split["train"],
            self.tokenizer,
            num_epochs=1,
            num_batches=int(self.config.get("calibration_batches", 4)),
            seed=self.seed + 1000,
        )

    def held_out_batches(self):
        """This process's held-out host batches (``eval.num_batches`` of them)."""
        c, held_out = self.config, self.split["validation"]
        n = c.eval.get("num_batches", 4)
        if self.pairs:  # held-out pairs; the evaluation reads their chosen side
            batches = make_pair_batches(c, held_out, self.tokenizer, num_epochs=1, seed=0)
            return list(itertools.islice(batches, n))
        if self.onpolicy is not None:  # the dataset completions of held-out prompts
            batches = make_prompt_batches(c, held_out, self.tokenizer, num_epochs=1, seed=0)
            return list(itertools.islice(batches, n))
        if self.bridge is not None:
            batches = make_bridge_batches(c, held_out, self.tokenizer, num_epochs=1, seed=0)
            return itertools.islice(batches, n)
        return make_batches(c.data, held_out, self.tokenizer, num_epochs=1, num_batches=n, seed=0)

    def acceptance(self) -> dict | None:
        """``speculative.acceptance`` keywords when ``eval.acceptance`` is on (on-policy)."""
        if self.onpolicy is None or not self.config.eval.get("acceptance"):
            return None
        return dict(
            max_new_tokens=self.settings.max_new_tokens,
            temperature=self.config.eval.get("acceptance_temperature", 1.0),
            eos_id=self.settings.eos_id,
            seed=self.seed,
        )

    def make_source(self, built: StepBuild):
        """The training regime (``registry.regime_of``) as a ``train.batch_sources`` source on
        ``built``'s shardings."""
        regime = registry.regime_of(self.config)
        shardings = built.batch_shardings
        if regime == "pairs":
            return batch_sources.PairsSource(self.train_batches, shardings)
        if regime == "cached":
            return batch_sources.CachedTeacherSource(self.train_batches, shardings, self.teacher)
        if regime in ("fixed", "bridge"):
            return batch_sources.FixedSource(self.train_batches, shardings)
        o, graphdef = self.onpolicy, teachers.split_model(self.student)[0]
        prompts = batch_sources.prompt_shardings(self.mesh, self.rules, self.train_batches.fields)
        common = dict(seed=self.seed, lmbda=float(o.lmbda))
        if regime == "bridge_onpolicy":
            settings = self.settings
            sample = jax.jit(
                lambda params, p, rng, step: rollout.sample_prompts(
                    graphdef, params, p, rng, step, settings
                )
            )
            return batch_sources.BridgeSource(
                self.train_batches,
                prompts,
                shardings,
                collator=self.bridge,
                student_sample=sample,
                **common,
            )
        sequences = {k: shardings[k] for k in step_lib.BATCH_FIELDS}
        teacher_rollout = None
        if o.get("seq_kd"):
            teacher_rollout = rollout.make_rollout(
                self.teacher.graphdef, self.settings, out_shardings=sequences
            )
        replay, capacity = None, int(o.get("replay", {}).get("capacity", 0))
        if capacity:
            replay = batch_sources.replay_buffer(self.mesh, self.rules, self.shape, capacity)
        add_privileged = None
        if self.privileged:  # the teacher's view under K privileged prompts
            add_privileged = jax.jit(rollout.with_privileged, out_shardings=shardings)
        return batch_sources.OnPolicySource(
            self.train_batches,
            prompts,
            student_rollout=rollout.make_rollout(graphdef, self.settings, out_shardings=sequences),
            supervised=jax.jit(rollout.supervised_batch, out_shardings=sequences),
            teacher_rollout=teacher_rollout,
            teacher=self.teacher,
            teacher_params=built.teacher_params,
            add_privileged=add_privileged,
            replay=replay,
            init_threshold=float(o.get("replay", {}).get("init_threshold", 0.2)),
            loss_eps=float(o.get("replay", {}).get("loss_eps", 0.1)),
            **common,
        )


def build(c) -> Experiment:
    """Check ``c`` and build everything a run of it needs, in the order that fails fastest."""
    seed = int(c.get("seed", 0))
    # --- mesh and checks (nothing loaded yet)
    check_run(c)  # every knob of train / optimizer / eval / data (the registry's tables)
    mesh, mesh_rules = build_mesh(c), rules(c)
    onpolicy = check_onpolicy(c)
    shape = step_shape(c)  # on-policy: prompt + completion, static lengths
    check_batch(c, mesh, mesh_rules, shape)  # a batch the mesh or micro_batches cannot divide
    spec = loss_spec(c)  # unknown terms fail here
    check_pairs(c, spec)
    check_cache(c)  # a cached teacher: short or reshaped caches fail here
    run = run_settings(c, spec)  # the loop's settings (keep_checkpoints >= 1, ...)
    stages = prune_schedule.check_schedule(c.get("prune_schedule") or [], c.train.steps)
    scan_lib.remat_policy(c.train.get("remat", False), mesh.devices.flat[0].platform)
    if stages and c.teacher.get("kind") == "ema":
        raise ValueError(
            "prune_schedule with an EMA teacher: the teacher would change shape with the "
            "student; use an online teacher (the unpruned model) for progressive pruning."
        )
    # --- data and models
    split, tokenizer, train_batches = training_data(c)
    student = build_model(c.student, "student", seed)
    bridge = None
    if c.get("bridge"):
        bridge = make_collator(c, tokenizer, shape[1]) if onpolicy else train_batches.collator
    exp = Experiment(
        config=c,
        mesh=mesh,
        rules=mesh_rules,
        spec=spec,
        stages=stages,
        tokenizer=tokenizer,
        split=split,
        train_batches=train_batches,
        student=student,
        teacher=None,
        bridge=bridge,
        vocab_mask=None,
        onpolicy=onpolicy,
        settings=None,
        shape=shape,
        seed=seed,
        run=run,
    )
    for i, stage in enumerate(c.student.get("prune") or ()):  # one-shot, before distillation
        if stage.get("kind") not in prune_schedule.ONCE_KINDS:
            raise ValueError(
                f"student.prune[{i}].kind={stage.get('kind')!r}: use one of "
                f"{prune_schedule.ONCE_KINDS}."
            )
        exp.student = prune_schedule.apply_once(
            exp.student,
            stage,
            lambda m: transform_stats.calibrate(m, exp.calibration_batches()),
            exp.tensor_size,
        )
    if c.student.get("scan_layers"):  # the pruning stages above work on the per-layer layout
        exp.student = to_scanned(exp.student)
    student = exp.student
    fixed = not (bridge or onpolicy or exp.pairs)  # packed documents: settings per stream
    data_settings = train_batches.streams[0].config if fixed else train_batches.config
    teacher = build_teacher(
        c.teacher, student, seed, data_settings, tokenizer, bridge, needs=spec.needs()
    )
    exp.vocab_mask = check_vocab(student, None if bridge else teacher, tokenizer)
    if not bridge and teacher is not None and teacher.vocab_size != student.config.vocab_size:
        teacher = teachers.PaddedVocabTeacher(teacher, student.config.vocab_size)
    if c.get("reference"):  # Rho-1 / AdaSPEC selection: a frozen reference beside the teacher
        if teacher is None or teacher.kind not in ("online", "ensemble", "composite"):
            raise ValueError("config.reference needs an online teacher (or ensemble/composite).")
        teacher = teachers.WithReference(teacher, build_model(c.reference, "reference", seed + 2))
    exp.teacher = teacher
    if onpolicy is not None:
        exp.settings = sampling.RolloutSettings(
            onpolicy.max_new_tokens,
            temperature=onpolicy.get("temperature", 1.0),
            top_k=onpolicy.get("top_k", 0),
            top_p=onpolicy.get("top_p", 1.0),
            eos_id=tokenizer.eos_id,
            vocab_limit=tokenizer.vocab_size,
        )
        sampling.check_settings(exp.settings, student.config, onpolicy.prompt_len)
        if onpolicy.get("seq_kd"):
            sampling.check_settings(exp.settings, teacher.config, onpolicy.prompt_len)
    return exp
