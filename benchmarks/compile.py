r"""Trace and compile time of the real distillation step against depth: loop vs scan over blocks.

    python benchmarks/compile.py [--depths 8,30,80 --rounds 3 --max_loop_blocks 80]
    python benchmarks/compile.py --quick  # depths 8 and 80 (the loop only up to 30), one round

The step is the one training runs: ``train.step.make_distill_step`` with an ``OnlineTeacher``
(the teacher's forward pass inside the step), the fused forward-KL loss (``custom_vjp``, the
library's chunk size), AdamW over the student (``train.state.make_optimizer``) and remat "full"
on the student, compiled as ``jax.jit(step, donate_argnums=0)``. Teacher and student are
Llama-shaped and narrow so that CPU compiles stay short: width 256, FFN 768, 4 query heads and
2 KV heads of 64, vocabulary 8192; the teacher has L blocks, the student L / 2 (as step.py's
every-other-block student). Teacher: bfloat16 parameters and compute; student: bfloat16 compute
over float32 master parameters. Batch 4 x 512 tokens. Nothing is initialised: the models are
built with ``nnx.eval_shape``, the train state with ``jax.eval_shape``, and the step is lowered
with ``jax.ShapeDtypeStruct`` arguments on the CPU backend.

Rows: L in ``--depths`` x layout: ``loop`` (``ModelConfig.scan_layers=False``: a Python loop, L
copies of the block in the program) and ``scan`` (``scan_layers=True``: parameters stacked on a
``layers`` axis, one block traced and run by ``lax.scan``), both models alike. Each measurement
is its own process (no warm caches; a tiny jit first, so backend start-up is not counted), and
the rows are interleaved: every (L, layout) once per round, ``--rounds`` rounds; each cell is the
median over rounds. Columns:

* build: ``nnx.eval_shape`` of both models (abstract: no arrays, but L Python blocks each way;
  not part of compiling the step, shown because it also grows with depth, faster than linearly
  under jax 0.10: flax's ``Variable.set_value`` probes ``.sharding`` of every value it stores,
  and on a tracer that attribute's error message walks every equation traced so far; the same
  holds for a jitted init; described in jax-ml/jax pull request 40041);
* trace: ``jax.jit(step).trace(...)`` (Python to jaxpr); lower: ``.lower()`` (to StableHLO);
  XLA compile: ``.compile()``; total: the three, what ``jit(...).lower(...).compile()`` costs;
* ``vs 8 blocks`` (the smallest depth, the same layout): total and XLA compile as ratios;
* program size: characters of the lowered StableHLO text and instructions of the optimised HLO
  (lines of ``compiled.as_text()`` holding `` = ``).

Target (issue 16): with scan, compiling the 80-block step takes at most 1.5x the 8-block one
(total time). The load average (1 minute) at the end of each measurement is printed too: on a
shared machine a cell taken under a higher load is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# This checkout's distill_jax, whether or not (or another checkout) is installed.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = ("loop", "scan")
WIDTHS = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
)
BATCH, SEQ_LEN = 4, 512
TARGET_RATIO, TARGET_DEPTHS = 1.5, (8, 80)


def _abstract_step(blocks: int, scan: bool):
    """(step function, abstract state, abstract teacher params, abstract batch, build seconds)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from distill_jax import models, teachers
    from distill_jax.train import objective
    from distill_jax.train import state as state_lib
    from distill_jax.train import step as step_lib

    t0 = time.perf_counter()
    teacher_config = models.make_config(
        "llama",
        num_layers=blocks,
        scan_layers=scan,
        dtype="bfloat16",
        param_dtype="bfloat16",
        **WIDTHS,
    )
    student_config = teacher_config.replace(num_layers=blocks // 2, param_dtype="float32")
    teacher = nnx.eval_shape(lambda: models.Transformer(teacher_config, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: models.Transformer(student_config, rngs=nnx.Rngs(1)))
    build_s = time.perf_counter() - t0

    spec = objective.LossSpec.from_config(dict(forward_kl=dict(weight=1.0, temperature=1.0)))
    opt = dict(name="adamw", learning_rate=1e-5, schedule="constant", weight_decay=0.0)
    tx, _ = state_lib.make_optimizer(opt, 100, BATCH * SEQ_LEN)
    graphdef, params = teachers.split_model(student)
    online = teachers.OnlineTeacher(teacher)
    state = jax.eval_shape(
        lambda p: state_lib.create(
            {"student": p, "loss": {}}, tx, objective.init_state(spec), seed=0
        ),
        params,
    )
    step = step_lib.make_distill_step(
        student_graphdef=graphdef, teacher=online, spec=spec, tx=tx, remat="full"
    )
    ints = jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32)
    batch = dict(
        input_ids=ints,
        targets=ints,
        segment_ids=ints,
        positions=ints,
        loss_mask=jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.bool_),
    )
    return step, state, online.params(), batch, build_s


def measure(blocks: int, layout: str) -> dict:
    """Build, trace, lower and compile the step once; seconds and program sizes."""
    import jax

    jax.jit(lambda x: x + 1)(1.0).block_until_ready()  # backend start-up, not counted
    step, state, t_params, batch, build_s = _abstract_step(blocks, layout == "scan")
    t0 = time.perf_counter()
    traced = jax.jit(step, donate_argnums=(0,)).trace(state, t_params, batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    hlo = compiled.as_text()
    return dict(
        build=build_s,
        trace=t1 - t0,
        lower=t2 - t1,
        compile=t3 - t2,
        total=t3 - t0,
        stablehlo_chars=len(lowered.as_text()),
        hlo_ops=sum(" = " in line for line in hlo.splitlines()),
        load=os.getloadavg()[0],
        platform=jax.devices()[0].platform,
    )


def _child(blocks: int, layout: str) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{blocks}:{layout}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{blocks} blocks, {layout} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _print_table(results: dict, depths: list[int], rounds: int, skipped: set) -> None:
    base = min(depths)
    print(
        f"\nCompiling the distill step (teacher forward + student fwd/bwd with remat 'full' + "
        f"fused forward KL + AdamW), Llama-shaped width {WIDTHS['hidden_size']}, teacher L "
        f"blocks (bf16), student L/2 (bf16 compute, float32 master), batch {BATCH} x "
        f"{SEQ_LEN}; CPU backend, {os.cpu_count()} CPU threads; median of {rounds} "
        f"interleaved round(s), each measurement in a fresh process\n"
    )
    print(
        "| blocks (teacher / student) | layout | build (s) | trace (s) | lower (s) "
        f"| XLA compile (s) | total (s) | total vs {base} blocks | XLA compile vs {base} blocks "
        "| StableHLO (KiB) | HLO ops (optimised) | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        for blocks in depths:
            label = f"{blocks} / {blocks // 2}"
            if (blocks, layout) in skipped:
                print(f"| {label} | {layout} | skipped (--max_loop_blocks) |" + " - |" * 9)
                continue
            runs, ref = results[(blocks, layout)], results[(base, layout)]
            m = {k: _median(runs, k) for k in ("build", "trace", "lower", "compile", "total")}
            vs = {k: m[k] / _median(ref, k) for k in ("total", "compile")}
            loads = [r["load"] for r in runs]
            print(
                f"| {label} | {layout} | {m['build']:.2f} | {m['trace']:.2f} | {m['lower']:.2f} "
                f"| {m['compile']:.2f} | {m['total']:.2f} | {vs['total']:.2f}x "
                f"| {vs['compile']:.2f}x "
                f"| {runs[0]['stablehlo_chars'] / 1024:,.0f} | {runs[0]['hlo_ops']:,} "
                f"| {min(loads):.1f}-{max(loads):.1f} |"
            )
    print(
        f"\nvs 8 blocks: against the {base}-block row of the same layout. A load average above "
        f"the {os.cpu_count()} threads means other processes shared the CPU."
    )
    lo, hi = TARGET_DEPTHS
    if (lo, "scan") not in results or (hi, "scan") not in results:
        print(f"Target: not measured (needs scan rows at {lo} and {hi} blocks).")
        return
    total = _median(results[(hi, "scan")], "total") / _median(results[(lo, "scan")], "total")
    xla = _median(results[(hi, "scan")], "compile") / _median(results[(lo, "scan")], "compile")
    verdict = "PASS" if total <= TARGET_RATIO else "FAIL"
    print(
        f"Target: with scan, compiling the {hi}-block step takes <= {TARGET_RATIO}x the "
        f"{lo}-block one: {total:.2f}x (XLA compile alone {xla:.2f}x) -> {verdict}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="8,30,80", help="teacher blocks, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--max_loop_blocks", type=int, default=None, help="skip deeper loop rows")
    p.add_argument("--quick", action="store_true", help="depths 8,80, loop up to 30, 1 round")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        blocks, layout = args.child.split(":")
        print("RESULT " + json.dumps(measure(int(blocks), layout)))
        return
    if args.quick:
        args.depths, args.rounds, args.max_loop_blocks = "8,80", 1, 30
    depths = sorted(int(d) for d in args.depths.split(","))
    if min(depths) < 2:
        p.error("--depths: at least 2 blocks (the student has L / 2)")
    cap = args.max_loop_blocks
    skipped = {(b, "loop") for b in depths if cap is not None and b > cap and b != min(depths)}
    results: dict = {}
    for r in range(args.rounds):
        for blocks in depths:
            for layout in LAYOUTS:
                if (blocks, layout) in skipped:
                    continue
                print(
                    f"round {r + 1}/{args.rounds}: {blocks} blocks, {layout} ...", file=sys.stderr
                )
                results.setdefault((blocks, layout), []).append(_child(blocks, layout))
    _print_table(results, depths, args.rounds, skipped)


if __name__ == "__main__":
    main()
