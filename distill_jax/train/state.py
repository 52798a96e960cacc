"""TrainState: everything a run carries from step to step, and nothing it does not own.

The student's parameters (a pure dict of arrays), the trainable loss parameters (projectors),
the optimizer state, the loss controllers (TAID, AdaKD), the PRNG key and, for an EMA teacher,
its parameters. The frozen teacher is not here: it is an argument of the step, never donated,
never checkpointed with the student.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from distill_jax import config_lib


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps done
    params: dict  # {"student": pure dict, "loss": projector pytree}
    opt_state: Any
    loss_state: dict
    rng: jax.Array  # [2] uint32 key data
    ema: dict | None = None  # EMA teacher parameters (student-shaped), or None


def create(params: dict, tx, loss_state: dict, *, seed: int, ema: bool = False) -> TrainState:
    """The initial state for trainable ``params`` = {"student": ..., "loss": ...}."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        loss_state=loss_state,
        rng=jax.random.key_data(jax.random.key(seed)),
        ema=jax.tree.map(jnp.copy, params["student"]) if ema else None,
    )


def _decay_mask(params):
    """Weight decay on matrices only (not on norms and biases), as usual for transformers."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(c, total_steps: int, tokens_per_step: int) -> tuple[Any, Any]:
    """(optax transformation, learning-rate schedule) from ``config.optimizer``.

    Keys: name ("adamw" | "sgd"), learning_rate, end_learning_rate_ratio (0.1), schedule
    ("cosine" | "linear" | "constant"), warmup_steps / warmup_tokens / warmup_percent,
    weight_decay, b1, b2, eps, grad_clip_norm (None = off).
    """
    c = dict(c)
    warmup = config_lib.to_steps(
        c, "warmup", total_steps=total_steps, tokens_per_step=tokens_per_step
    )
    peak = float(c.get("learning_rate", 3e-4))
    end = peak * float(c.get("end_learning_rate_ratio", 0.1))
    kind = c.get("schedule", "cosine")
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule={kind!r}: choose cosine, linear or constant.")
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), after], [warmup])
        if warmup
        else after
    )
    name = c.get("name", "adamw")
    if name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=c.get("b1", 0.9),
            b2=c.get("b2", 0.95),
            eps=c.get("eps", 1e-8),
            weight_decay=c.get("weight_decay", 0.0),
            mask=_decay_mask,
        )
    elif name == "sgd":
        opt = optax.sgd(schedule, momentum=c.get("momentum"))
    else:
        raise ValueError(f"optimizer.name={name!r}: choose adamw or sgd.")
    clip = c.get("grad_clip_norm")
    tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
    return tx, schedule
