r"""Peak memory and time of the fused distillation loss against the naive one, forward + backward.

    python benchmarks/fused_loss.py [--sizes 49152x512,262144x2048 --chunk_size 0 --repeats 3]
    python benchmarks/fused_loss.py --quick  # V=49152, T=512, one repeat: a smoke run

Forward KL at tau = 2 between a student and a teacher of width D = 640 (batch 1, float32, random
normal hidden states, heads scaled by 0.05); ``jax.value_and_grad`` of the loss sum with respect to
the student's hidden states and head. Rows per (V, T):

* ``naive``: logits h_s W_s and h_t W_t materialised ([B, T, V] each), then
  ``divergences.forward_kl`` summed;
* ``fused (custom_vjp)`` and ``fused (remat)``: ``fused.fused_distill_loss`` with that
  ``implementation`` and ``--chunk_size`` positions per chunk (0, the default: the library's
  ``auto_chunk_size``, 2^24 logits per chunk: C = 64 at V = 262144, 256 at V = 49152).

Each row runs in its own process, one at a time, so that its peak memory belongs to it alone. Two
memory figures: XLA's compiled memory (temp + output bytes, what the computation allocates beyond
its inputs, from ``memory_analysis()``) and the process's peak RSS (inputs, runtime and compiler
included). Time: median over ``--repeats`` calls after one warm-up call; the first call, which
includes compilation, is reported too. Ratios are against ``naive`` at the same (V, T).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _measure import peak_rss

IMPLS = ("naive", "custom_vjp", "remat")
LABELS = {"naive": "naive", "custom_vjp": "fused (custom_vjp)", "remat": "fused (remat)"}
SIZES = "49152x512,49152x2048,262144x512,262144x2048"  # VxT
ACCEPT_SIZE = (262144, 2048)  # the acceptance size: memory <= 1/8 naive, time <= 1.1x
D = 640
TEMPERATURE = 2.0


def _inputs(v: int, t: int):
    """Student and teacher hidden states [1, T, D] and heads [D, V], float32, fixed seed."""
    import jax

    ks = jax.random.split(jax.random.key(0), 4)
    h_s = jax.random.normal(ks[0], (1, t, D), "float32")
    w_s = 0.05 * jax.random.normal(ks[1], (D, v), "float32")
    h_t = jax.random.normal(ks[2], (1, t, D), "float32")
    w_t = 0.05 * jax.random.normal(ks[3], (D, v), "float32")
    return h_s, w_s, h_t, w_t


def _loss(impl: str, chunk_size: int):
    """(h_s, w_s, h_t, w_t) -> loss sum [] for one implementation."""
    import jax.numpy as jnp

    from distill_jax.losses import divergences, fused

    if impl == "naive":

        def loss(h_s, w_s, h_t, w_t):
            z_s = jnp.einsum("btd,dv->btv", h_s, w_s, preferred_element_type=jnp.float32)
            z_t = jnp.einsum("btd,dv->btv", h_t, w_t, preferred_element_type=jnp.float32)
            return jnp.sum(divergences.forward_kl(z_s, z_t, temperature=TEMPERATURE))

        return loss

    def loss(h_s, w_s, h_t, w_t):
        return fused.fused_distill_loss(
            h_s,
            w_s,
            teacher_hidden=h_t,
            teacher_head=w_t,
            temperature=TEMPERATURE,
            chunk_size=chunk_size or None,
            implementation=impl,
        )[0]

    return loss


def child(args):
    import jax
    import jax.numpy as jnp

    v, t = args.size
    inputs = jax.block_until_ready(_inputs(v, t))
    step = jax.jit(jax.value_and_grad(_loss(args.impl, args.chunk_size), argnums=(0, 1)))

    t0 = time.perf_counter()
    compiled = step.lower(*inputs).compile()
    loss, grads = jax.block_until_ready(compiled(*inputs))  # first call: compile + run
    first = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads))
    result = dict(
        first_s=first,
        step_s=statistics.median(times),
        xla_bytes=mem.temp_size_in_bytes + mem.output_size_in_bytes,
        peak_rss=peak_rss(),
        loss=float(loss),
        grad_norm=float(grad_norm),
        platform=jax.devices()[0].platform,
        device=jax.devices()[0].device_kind,
    )
    print("RESULT " + json.dumps(result))


def _size(s: str) -> tuple[int, int]:
    v, t = s.lower().split("x")
    return int(v), int(t)


def _run_row(impl, size, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--impl",
        impl,
        "--size",
        f"{size[0]}x{size[1]}",
        "--chunk_size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{impl} at V={size[0]}, T={size[1]} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _ratio(x, ref) -> str:
    return f"{x / ref:.2f}x" if ref else "-"


def _print_table(rows: dict, args):
    first = next(iter(rows.values()))
    print(
        f"\nFused vs naive distillation loss, forward + backward (grads w.r.t. student hidden and "
        f"head); device: {first['platform']} ({first['device']})\nforward KL, tau={TEMPERATURE}, "
        f"D={D} (student and teacher), batch 1, float32, chunk_size={args.chunk_size or 'auto'}, "
        f"median of {args.repeats} after one warm-up call\n"
    )
    print(
        "| V | T | implementation | step (s) | time vs naive | first call (s) | XLA memory (MiB) "
        "| XLA vs naive | peak RSS (MiB) | RSS vs naive | loss | grad norm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (v, t, impl), r in rows.items():
        ref = rows.get((v, t, "naive"))
        time_r = _ratio(r["step_s"], ref and ref["step_s"])
        xla_r = _ratio(r["xla_bytes"], ref and ref["xla_bytes"])
        rss_r = _ratio(r["peak_rss"], ref and ref["peak_rss"])
        print(
            f"| {v} | {t} | {LABELS[impl]} | {r['step_s']:.3f} | {time_r} | {r['first_s']:.1f} "
            f"| {r['xla_bytes'] / 2**20:,.0f} | {xla_r} | {r['peak_rss'] / 2**20:,.0f} | {rss_r} "
            f"| {r['loss']:.6g} | {r['grad_norm']:.6g} |"
        )
    print(
        "\nXLA memory = temp + output bytes of the compiled step (beyond its inputs); peak RSS is "
        "the whole process (inputs, runtime, compiler); first call includes compilation."
    )
    v, t = ACCEPT_SIZE
    ref, fused = rows.get((v, t, "naive")), rows.get((v, t, "custom_vjp"))
    head = f"Acceptance (V={v}, T={t}): fused (custom_vjp) XLA memory <= 1/8 naive, time <= 1.1x"
    if ref is None or fused is None:
        print(f"{head}: not measured (run with --sizes {v}x{t}).")
        return
    mem, speed = fused["xla_bytes"] / ref["xla_bytes"], fused["step_s"] / ref["step_s"]
    verdict = "PASS" if mem <= 1 / 8 and speed <= 1.1 else "FAIL"
    print(f"{head}: memory {mem:.3f}x (1/{1 / mem:.1f}), time {speed:.2f}x -> {verdict}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=SIZES, help="comma-separated VxT, e.g. 49152x512")
    p.add_argument("--chunk_size", type=int, default=0, help="0: fused.auto_chunk_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--quick", action="store_true", help="V=49152, T=512, one repeat")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--size", type=_size, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return child(args)
    if args.quick:
        args.sizes, args.repeats = "49152x512", 1

    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    rows = {}
    for size in map(_size, args.sizes.split(",")):
        for impl in impls:  # one process at a time: the naive rows need most of the RAM
            print(f"running {LABELS[impl]} at V={size[0]}, T={size[1]} ...", file=sys.stderr)
            rows[(*size, impl)] = _run_row(impl, size, args)
    _print_table(rows, args)


if __name__ == "__main__":
    main()
