r"""``step.py --pair``: our step on a real-shaped teacher / student pair, random weights, MFU.

    python benchmarks/step.py --pair llama8b_1b --out /tmp/llama8b_1b.json          # GPU / TPU
    python benchmarks/step.py --pair llama8b_1b --remat full,dots --find_max_batch
    python benchmarks/step.py --pair llama8b_1b --tiny                               # CPU smoke run

Pair ``llama8b_1b``: Llama-3.1-8B as the teacher (bfloat16 parameters and compute) and
Llama-3.2-1B as the student (bfloat16 compute over float32 master parameters and AdamW moments),
at their real shapes (``PAIRS``), with random weights made on the device by one jitted function
(normal(0, 0.02) matrices, unit norm scales): nothing is read from or written to disk and the 16
GB of teacher never pass through the host. Both models scan over their blocks
(``scan_layers=True``), attention ``--attention`` (default "auto": cuDNN on GPU, splash on TPU,
the reference on CPU), the student rematerialised per block (``--remat``, default "full"; "dots"
keeps the weight matmuls' outputs). The step is ``train.step.make_distill_step``: teacher
forward, student forward and backward, the fused forward KL at tau = 1 (plus hard-label CE with
``--ce W``), loss chunk ``--chunk_size`` positions (default: 4096 / B, so that each chunk's head
matmul has 4096 rows, at most T / 2), AdamW (lr 1e-5, betas 0.9 / 0.999, no weight decay),
``jax.jit`` with the state donated, one device. ``--tiny`` shrinks widths, depths and the
vocabulary (same code path) so the mode runs end to end on a CPU in a minute.

Time: median of ``--repeats`` steps after ``--warmup`` steps, each step timed to
``block_until_ready`` of the new state and metrics; compile: ``jit(...).lower(...).compile()``.
Model FLOPs per step (nothing recomputed by remat is counted), B sequences of T tokens:

    FLOP/step = B T [ 2 P_t + 2 L_t T N_t H_t  +  3 (2 P_s + 2 L_s T N_s H_s) ]
    P = L (D N H + 2 D K H + N H D + 3 D F) + D V

P counts the matmul weights of one model: per block q, k, v, o (K KV heads) and gate, up, down;
plus the head D V (untied for the teacher; the student's is its tied embedding), whose matmuls
are the fused loss's (teacher head forward, student head forward + backward); the embedding
lookup is no matmul. 2 L T N H is causal attention per token (Q K^T and A V, each 2 N H per
visible key, T / 2 visible keys on average; cuDNN skips the masked half). Backward = 2 x
forward, hence the factor 3 for the student. MFU = FLOP/step / step time / the device's
published dense bf16 peak (``_measure.PEAK_BF16_TFLOPS``; "-" for a device not listed). Memory:
the device's ``memory_stats()["peak_bytes_in_use"]`` after the row (a high-water mark over the
process: rows run in order, so a later row shows the larger of its peak and the earlier ones')
and XLA's temporary buffers of the compiled step (``memory_analysis()``).

``--find_max_batch`` doubles the global batch from ``--batch`` (up to ``--max_batch`` if given)
until compiling or running a step runs out of device memory, keeps a row per batch that fit and
reports the largest. ``--out PATH`` writes the rows as JSON, rewritten after each row.
``--budget_s S`` skips the rows (remat policies, batch sizes) that would end after S seconds of
the run, judging by the previous row's time, so that a run with a time limit still prints its
table.

Imports: this mode needs jax, flax, optax and numpy (with scipy, ml_dtypes, opt_einsum, which jax
itself requires), and ``tokenizers``, which distill_jax's package ``__init__`` imports
(``bridges`` -> ``data.tokenizers``).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

from _measure import PEAK_BF16_TFLOPS, peak_bf16_flops

PAIRS = {
    "llama8b_1b": dict(
        title="Llama-3.1-8B -> Llama-3.2-1B",
        teacher="llama-3.1-8b",  # models.presets: the public config.json
        student="llama-3.2-1b",
        tiny=dict(  # --tiny: the same code path at CPU size
            teacher=dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=4),
            student=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2),
            heads=dict(num_heads=4, num_kv_heads=2, head_dim=32),
        ),
    )
}
ADAMW = dict(name="adamw", learning_rate=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
CHUNK_ROWS = 4096  # default loss chunk: batch x chunk_size = this many head-matmul rows


# --------------------------------------------------------------------------------- imports


def import_distill_jax() -> None:
    """Import what the step needs (the checkout's package: the repo root is on sys.path)."""
    import distill_jax.losses  # noqa: F401
    import distill_jax.models  # noqa: F401
    import distill_jax.teachers  # noqa: F401
    import distill_jax.train.state  # noqa: F401
    import distill_jax.train.step  # noqa: F401


# ----------------------------------------------------------------------------------- model


def configs(pair: str, tiny: bool, attention: str = "auto"):
    """(teacher ModelConfig, student ModelConfig) of ``pair``, scanned, bf16 compute."""
    from distill_jax import models
    from distill_jax.models.presets import architecture

    spec = PAIRS[pair]
    teacher, student = architecture(spec["teacher"]), architecture(spec["student"])
    if tiny:
        teacher.update(spec["tiny"]["teacher"], **spec["tiny"]["heads"])
        student.update(spec["tiny"]["student"], **spec["tiny"]["heads"])
    common = dict(scan_layers=True, attention_impl=attention, dtype="bfloat16")
    return (
        models.make_config(**teacher, param_dtype="bfloat16", **common),
        models.make_config(**student, param_dtype="float32", **common),
    )


def matmul_params(c) -> int:
    """P = L (D N H + 2 D K H + N H D + 3 D F) + D V: the matmul weights of one model."""
    d, nh, kh = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return c.num_layers * (2 * d * nh + 2 * d * kh + 3 * d * c.intermediate_size) + d * c.vocab_size


def model_flops(teacher, student, batch: int, seq_len: int) -> float:
    """B T [2 P_t + 2 L_t T N_t H_t + 3 (2 P_s + 2 L_s T N_s H_s)] (module docstring)."""

    def forward(c):  # per token
        attention = 2 * c.num_layers * seq_len * c.num_heads * c.head_dim
        return 2 * matmul_params(c) + attention

    return batch * seq_len * (forward(teacher) + 3 * forward(student))


def _random_params(abstract: dict, key):
    """normal(0, 0.02) for matrices, ones for norm scales, in each leaf's dtype."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if "scale" in jax.tree_util.keystr(path):
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            k = jax.random.fold_in(key, i)
            out.append((0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


class Setup:
    """Models, teacher parameters on the device, and a jitted fresh student state."""

    def __init__(self, args):
        import jax
        from flax import nnx

        from distill_jax import models, teachers
        from distill_jax.train import objective
        from distill_jax.train import state as state_lib

        self.teacher_config, self.student_config = configs(args.pair, args.tiny, args.attention)
        build = lambda c: nnx.eval_shape(lambda: models.Transformer(c, rngs=nnx.Rngs(0)))
        teacher, student = build(self.teacher_config), build(self.student_config)
        self.teacher = teachers.OnlineTeacher(teacher)  # abstract: its graph and axes only
        self.num_params = (models.num_params(teacher), models.num_params(student))
        self.graphdef, s_abstract = teachers.split_model(student)
        terms = dict(forward_kl=dict(weight=1.0, temperature=1.0))
        if args.ce:
            terms["ce"] = dict(weight=args.ce)
        self.terms = terms
        self.args = args
        self.tx, _ = state_lib.make_optimizer(dict(ADAMW, schedule="constant"), 1000, 1)
        t_abstract = self.teacher.params()
        t0 = time.perf_counter()
        self.teacher_params = jax.jit(lambda k: _random_params(t_abstract, k))(jax.random.key(0))
        jax.block_until_ready(self.teacher_params)
        self.loss_state = objective.init_state(self.spec(args.batch))

        def fresh_state(key):
            params = {"student": _random_params(s_abstract, key), "loss": {}}
            return state_lib.create(params, self.tx, self.loss_state, seed=0)

        self._fresh_state = jax.jit(fresh_state)
        jax.block_until_ready(self.fresh_state())
        self.init_s = time.perf_counter() - t0

    def spec(self, batch: int):
        from distill_jax.train import objective

        # At least two chunks: with one, XLA's CPU backend (jax 0.10) fails to run the step
        # with bf16 compute over float32 parameters ("Unsupported element type for
        # DotThunk::Execute: BF16 x BF16 = F32"); accelerators are unaffected.
        chunk = self.args.chunk_size or min(max(16, CHUNK_ROWS // batch), self.args.seq_len // 2)
        return objective.LossSpec.from_config(self.terms, dict(head_chunk_tokens=chunk))

    def fresh_state(self):
        import jax

        return self._fresh_state(jax.random.key(1))

    def batches(self, batch: int, n: int) -> list[dict]:
        """n random token batches [B, T] on the device; the last position has no target."""
        import jax
        import numpy as np

        t = self.args.seq_len
        rng = np.random.RandomState(0)
        out = []
        for _ in range(n):
            ids = rng.randint(0, self.student_config.vocab_size, (batch, t)).astype(np.int32)
            mask = np.ones((batch, t), bool)
            mask[:, -1] = False
            b = dict(
                input_ids=ids,
                targets=np.roll(ids, -1, axis=1),
                segment_ids=np.ones((batch, t), np.int32),
                positions=np.tile(np.arange(t, dtype=np.int32), (batch, 1)),
                loss_mask=mask,
            )
            out.append(jax.device_put(b))
        return out


# ------------------------------------------------------------------------------------- run


def _resolved_attention(config) -> str:
    from distill_jax.models import attention_kernels

    return attention_kernels.resolve_impl(config.attention_impl, dtype=config.dtype)


def _is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _device_peak_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends have no allocator statistics
        return None
    return stats.get("peak_bytes_in_use")


def _xla_temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # no memory analysis on this backend / version
        return None


def run_row(setup: Setup, batch: int, remat: str) -> dict:
    """Compile the step for one batch size and remat policy; time it."""
    import jax

    from distill_jax.train import step as step_lib

    args = setup.args
    step = step_lib.make_distill_step(
        student_graphdef=setup.graphdef,
        teacher=setup.teacher,
        spec=setup.spec(batch),
        tx=setup.tx,
        remat=remat,
    )
    batches = setup.batches(batch, args.warmup + args.repeats)
    state = setup.fresh_state()
    t0 = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0,)).lower(state, setup.teacher_params, batches[0]).compile()
    )
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for b in batches:
        t0 = time.perf_counter()
        state, metrics = compiled(state, setup.teacher_params, b)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    step_s = statistics.median(times[args.warmup :])
    flops = model_flops(setup.teacher_config, setup.student_config, batch, args.seq_len)
    return dict(
        batch=batch,
        seq_len=args.seq_len,
        remat=remat,
        chunk_size=setup.spec(batch).options["head_chunk_tokens"],
        compile_s=compile_s,
        step_s=step_s,
        step_times=times,
        tokens_per_s=batch * args.seq_len / step_s,
        model_flops=flops,
        model_flops_per_s=flops / step_s,
        losses=[losses[0], losses[-1]],
        peak_bytes=_device_peak_bytes(),
        xla_temp_bytes=_xla_temp_bytes(compiled),
    )


def try_row(setup: Setup, batch: int, remat: str) -> dict:
    """``run_row``, or {"batch", "remat", "oom": message} when the device memory runs out."""
    try:
        return run_row(setup, batch, remat)
    except Exception as error:  # noqa: BLE001 (jax's runtime error type moved between versions)
        if not _is_oom(error):
            raise
        message = str(error).splitlines()[0][:200]
    gc.collect()  # the failed attempt's buffers, now unreferenced
    return dict(batch=batch, seq_len=setup.args.seq_len, remat=remat, oom=message)


def _status(row: dict) -> str | None:
    """Why a row has no timing ("out of memory", "skipped: --budget_s"), or None."""
    if "oom" in row:
        return "out of memory"
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    return None


def batch_sizes(start: int, cap: int | None, fits) -> list[dict]:
    """Rows for start, 2 start, 4 start, ... until one does not fit (``fits(b)`` -> a row with
    "oom"), is skipped, or the next would exceed ``cap``."""
    rows, batch = [], start
    while True:
        row = fits(batch)
        rows.append(row)
        if _status(row) or (cap is not None and 2 * batch > cap):
            return rows
        batch *= 2


# ----------------------------------------------------------------------------------- print


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:,.1f}"


def print_table(result: dict) -> None:
    peak = result["peak_bf16_flops"]
    print(
        f"\n{result['title']}{' (--tiny stand-in)' if result['tiny'] else ''}, random weights; "
        f"device: {result['device']}; jax {result['jax']}, flax {result['flax']}\n"
        f"teacher {result['teacher_params'] / 1e9:.4g} B parameters (bf16), student "
        f"{result['student_params'] / 1e9:.4g} B (bf16 compute, float32 master + AdamW); "
        f"scan over blocks, attention {result['attention']}, fused forward KL"
        f"{' + CE' if result['ce'] else ''}; median of {result['repeats']} steps after "
        f"{result['warmup']} warm-up\npeak: "
        + (f"{peak / 1e12:,.1f} TFLOP/s dense bf16 (published)" if peak else "not in the table")
        + f"; init (teacher + student state, jitted): {result['init_s']:.1f} s\n"
    )
    print(
        "| pair | batch | seq_len | remat | loss chunk | step (s) | tokens/s "
        "| TFLOP/step (model) | TFLOP/s (model) | MFU | peak device memory (GiB) "
        "| XLA temp (GiB) | compile (s) | loss first -> last |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        head = f"| {result['pair']} | {r['batch']} | {r['seq_len']} | {r['remat']}"
        if _status(r):
            print(f"{head} | - | {_status(r)} |" + " - |" * 8)
            continue
        mfu = f"{100 * r['model_flops_per_s'] / peak:.1f} %" if peak else "-"
        print(
            f"{head} | {r['chunk_size']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {r['model_flops'] / 1e12:,.4g} | {r['model_flops_per_s'] / 1e12:,.4g} | {mfu} "
            f"| {_gib(r['peak_bytes'])} | {_gib(r['xla_temp_bytes'])} | {r['compile_s']:.1f} "
            f"| {r['losses'][0]:.4f} -> {r['losses'][1]:.4f} |"
        )
    print(f"\nFLOP/step (model): {result['formula']}")
    if "wall_s" in result:
        print(f"Wall time of this run (imports, init, compiles, steps): {result['wall_s']:.0f} s")
    for remat, largest in result.get("largest_batch", {}).items():
        print(
            f"Largest global batch that fit, remat {remat}: {largest['batch']} "
            f"(stopped: {largest['stopped_by']})"
        )


def main(args) -> None:
    start = time.perf_counter()
    import_distill_jax()
    import flax
    import jax

    if args.pair not in PAIRS:
        sys.exit(f"--pair: unknown {args.pair!r}; choose from {sorted(PAIRS)}")
    device = jax.devices()[0]
    print(f"{args.pair}: building on {device.device_kind} ...", file=sys.stderr)
    setup = Setup(args)
    result = dict(
        pair=args.pair,
        title=PAIRS[args.pair]["title"],
        tiny=args.tiny,
        device=f"{device.platform} ({device.device_kind})",
        device_kind=device.device_kind,
        jax=jax.__version__,
        flax=flax.__version__,
        peak_bf16_flops=peak_bf16_flops(device.device_kind),
        peak_table=[list(p) for p in PEAK_BF16_TFLOPS],
        teacher_params=setup.num_params[0],
        student_params=setup.num_params[1],
        ce=args.ce,
        attention=f"{args.attention} -> {_resolved_attention(setup.teacher_config)}",
        warmup=args.warmup,
        repeats=args.repeats,
        init_s=setup.init_s,
        formula="B T [2 P_t + 2 L_t T N_t H_t + 3 (2 P_s + 2 L_s T N_s H_s)], "
        "P = L (D N H + 2 D K H + N H D + 3 D F) + D V",
        rows=[],
    )

    last_row_s = 0.0

    def attempt(batch, remat):
        """One row, recorded (JSON rewritten), or skipped when it would overrun --budget_s."""
        nonlocal last_row_s
        elapsed = time.perf_counter() - start
        if args.budget_s and result["rows"] and elapsed + last_row_s > args.budget_s:
            row = dict(batch=batch, seq_len=args.seq_len, remat=remat, skipped="--budget_s")
        else:
            t0 = time.perf_counter()
            row = dict(try_row(setup, batch, remat), wall_s=time.perf_counter() - t0)
            last_row_s = row["wall_s"]
        result["rows"].append(row)
        state = _status(row) or f"{row['step_s']:.3f} s/step, {row['wall_s']:.0f} s in all"
        print(f"  batch {batch}, remat {remat}: {state}", file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return row

    for remat in args.remat.split(","):
        if args.find_max_batch:
            rows = batch_sizes(args.batch, args.max_batch, lambda b, r=remat: attempt(b, r))
            fit = [r["batch"] for r in rows if not _status(r)]
            why = (
                f"{rows[-1]['batch']}: {_status(rows[-1])}" if _status(rows[-1]) else "--max_batch"
            )
            result.setdefault("largest_batch", {})[remat] = dict(
                batch=max(fit) if fit else None, stopped_by=why
            )
        else:
            attempt(args.batch, remat)
    result["wall_s"] = time.perf_counter() - start
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    if args.out:
        print(f"\nJSON: {os.path.abspath(args.out)}")
