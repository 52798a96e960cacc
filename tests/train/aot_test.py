"""--mode=compile: a reduced pod config compiled for a real TPU topology on this CPU (libtpu),
per-chip bytes against hand counts, the one-message failure, the HLO collective parser on a
hand-written module, topology names, and the trainer and compile mode sharing one step builder."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import experiment, sharding, topologies
from distill_jax.experiment import compile as compile_lib
from distill_jax.train import aot, hlo
from distill_jax.train import build as build_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA_POD = os.path.join(ROOT, "configs", "pod", "llama8b_to_llama1b_v5e64.py")
TINY = os.path.join(ROOT, "configs", "tiny_kd.py")
MiB = 2**20


def _config(path, arg=None):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _llama_params(vocab, d, f, layers, heads, kv_heads, head_dim, tied) -> int:
    """Parameters of a Llama model counted by hand: embedding (and head unless tied), per block
    q, k, v, o, gate, up, down and two norms, and the final norm."""
    block = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * f + 2 * d
    return vocab * d * (1 if tied else 2) + layers * block + d


# ------------------------------------------------------------------- the reduced pod config


@pytest.fixture(scope="module")
def llama_report():
    config = _config(LLAMA_POD, "reduced=True")
    assert config.topology == "v5e:4x4"
    return config, compile_lib.compile_check(config)


def test_reduced_pod_config_per_chip_bytes_match_hand_counts(llama_report):
    config, report = llama_report
    s = config.student.config
    n = _llama_params(128256, 2048, 8192, s.num_layers, 32, 8, 64, tied=True)
    chips = 16  # v5e:4x4, every weight sharded 16 ways over fsdp
    mem = report["memory"]
    np.testing.assert_allclose(mem["student parameters"], n * 4 / chips, rtol=0.05)  # float32
    np.testing.assert_allclose(mem["optimizer state"], 2 * n * 4 / chips, rtol=0.05)  # Adam mu, nu
    t = config.teacher.config
    n_t = _llama_params(128256, 4096, 14336, t.num_layers, 32, 8, 128, tied=False)
    np.testing.assert_allclose(mem["teacher parameters"], n_t * 2 / chips, rtol=0.05)  # bf16
    arguments = sum(mem[k] for k in aot._ARGUMENT_CATEGORIES)
    np.testing.assert_allclose(arguments, report["xla_argument_bytes"], rtol=0.05)
    assert 0 < mem["temporaries"] and mem["total"] < report["hbm_per_chip"]
    assert report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1, "expert": 1}


def test_reduced_pod_config_report_tables(llama_report, tmp_path):
    config, report = llama_report
    b, t = 16, 1024
    s = config.student.config
    n_s = aot.matmul_weights_per_token(
        experiment.model_config_from_block(config.student, "student")
    )
    # The student's matmul weights per token by hand: 2 blocks and the (tied) head.
    d, f = 2048, 8192
    by_hand = s.num_layers * (2 * d * 64 * (32 + 8) + 3 * d * f) + d * 128256
    assert n_s == by_hand
    assert report["flops"]["model_student"] > 6 * n_s * b * t  # plus causal attention
    assert report["flops"]["xla_per_chip"] > 0
    kinds = report["collectives"]
    assert kinds["all-gather"]["ops"] > 0 and kinds["all-gather"]["bytes"] > 0  # FSDP gathers
    assert 0 < report["mfu"] < 1 and report["roofline_seconds"]["step"] > 0
    text = aot.write_report(report, str(tmp_path), "llama:reduced")
    assert "| student parameters |" in text and "| all-gather |" in text
    assert "| largest: " in text and "| largest temporaries per chip |" in text
    assert report["top_collectives"][0]["op_name"].startswith("jit(step)")
    assert "MFU" in text and "XLA argument_size_in_bytes" in text
    saved = json.loads((tmp_path / "compile_report.json").read_text())
    assert saved["memory"]["total"] == report["memory"]["total"]


# ------------------------------------------------------------------------ does not fit


def test_does_not_fit_exits_with_one_message_naming_the_largest_buffer(tmp_path):
    # Llama-3.1-8B in float32 on one v5e chip: 32 GB of teacher weights, 16 GiB of HBM.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            f"--config={LLAMA_POD}",
            "--config.teacher.param_dtype=float32",
            "--config.teacher.dtype=float32",
            "--mode=compile",
            "--topology=v5e:1x1",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert "does not fit on v5e:1x1" in line
    assert "teacher parameters 2" in line  # 29.9 GiB, the largest category, named first
    # The scanned teacher's stacked FFN matrices: 32 x 4096 x 14336 float32 = 7.0 GiB each.
    assert re.search(r"largest arguments: teacher/layers/0/mlp/(gate|up|down)_proj 7\.00 GiB", line)
    assert "teacher.param_dtype='bfloat16'" in line
    assert json.loads((tmp_path / "compile_report.json").read_text())["fits"] is False


def test_temporaries_that_do_not_fit_name_the_fix():
    # A tiny model with 16 rows of 8192 tokens per chip: [16, 4, 8192, 8192] float32 attention
    # scores of the reference attention are 16 GiB, more than a v5e chip holds (splash, the TPU
    # default, would never hold them); the compiler says so and we say what to do.
    config = _config(TINY)
    with config.unlocked():
        config.student.attention_impl = config.teacher.attention_impl = "reference"
        config.data.seq_len, config.data.global_batch_size = 8192, 64
        config.student.config.max_position_embeddings = 8192
        config.teacher.config.max_position_embeddings = 8192
    with pytest.raises(aot.DoesNotFitError) as e:
        compile_lib.compile_check(config, "v5e:2x2")
    message = str(e.value)
    assert "does not fit on v5e:2x2" in message and "XLA: " in message
    assert "train.remat" in message and "train.micro_batches" in message


# ------------------------------------------------------------------------------ HLO parser

HLO = "\n".join(
    [
        "HloModule hand_written, entry_computation_layout={(bf16[1024,512]{1,0})->f32[]}",
        "",
        "%add (x: f32[], y: f32[]) -> f32[] {",
        "  %x = f32[] parameter(0)",
        "  %y = f32[] parameter(1)",
        "  ROOT %sum = f32[] add(%x, %y)",
        "}",
        "",
        "%exchange (q: f32[4,32]) -> f32[4,32] {",
        "  %q = f32[4,32]{1,0} parameter(0)",
        "  ROOT %a2a = f32[4,32]{1,0:T(8,128)} all-to-all(%q), replica_groups={}, dimensions={0}",
        "}",
        "",
        "%async_start (s0: f32[16,32]) -> (f32[16,32], f32[64,32]) {",
        "  %s0 = f32[16,32]{1,0} parameter(0)",
        "  %g1 = f32[64,32]{1,0} all-gather(%s0), channel_id=7, replica_groups=[2,4]<=[8], "
        "dimensions={0}",
        "  ROOT %st = (f32[16,32]{1,0}, f32[64,32]{1,0}) custom-call(%g1), "
        'custom_call_target="AsyncCollectiveStart"',
        "}",
        "",
        "%async_continue (s1: f32[16,32]) -> f32[64,32] {",
        "  %s1 = f32[16,32]{1,0} parameter(0)",
        "  ROOT %g2 = f32[64,32]{1,0} all-gather(%s1), channel_id=7, replica_groups=[2,4]<=[8], "
        "dimensions={0}",
        "}",
        "",
        "%async_done (s2: f32[16,32]) -> f32[64,32] {",
        "  %s2 = f32[16,32]{1,0} parameter(0)",
        "  %g3 = f32[64,32]{1,0} all-gather(%s2), channel_id=7, replica_groups=[2,4]<=[8], "
        "dimensions={0}",
        '  ROOT %dn = f32[64,32]{1,0} custom-call(%g3), custom_call_target="AsyncCollectiveDone"',
        "}",
        "",
        "%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {",
        "  %p = (s32[], f32[8,128]{1,0}) parameter(0)",
        "  %i = s32[] get-tuple-element(%p), index=0",
        "  %v = f32[8,128]{1,0} get-tuple-element(%p), index=1",
        "  %ar-start = f32[8,128]{1,0} all-reduce-start(%v), "
        "replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%add",
        "  %ar-done = f32[8,128]{1,0} all-reduce-done(%ar-start)",
        "  %called = f32[4,32]{1,0} call(%ar-done), to_apply=%exchange",
        "  %s16 = f32[16,32]{1,0} slice(%v), slice={[0:8], [0:32]}",
        "  %cont = f32[64,32]{1,0} fusion(%s16), kind=kCustom, calls=%async_continue",
        "  %one = s32[] constant(1)",
        "  %next = s32[] add(%i, %one)",
        "  ROOT %out = (s32[], f32[8,128]{1,0}) tuple(%next, %ar-done)",
        "}",
        "",
        "%cond (c: (s32[], f32[8,128])) -> pred[] {",
        "  %c = (s32[], f32[8,128]{1,0}) parameter(0)",
        "  %ci = s32[] get-tuple-element(%c), index=0",
        "  %limit = s32[] constant(99)",
        "  ROOT %lt = pred[] compare(%ci, %limit), direction=LT",
        "}",
        "",
        "%body2 (r: (s32[], bf16[16,64])) -> (s32[], bf16[16,64]) {",
        "  %r = (s32[], bf16[16,64]{1,0}) parameter(0)",
        "  %w = bf16[16,64]{1,0} get-tuple-element(%r), index=1",
        "  %cp-start = (bf16[16,64]{1,0}, bf16[16,64]{1,0}, u32[], "
        "u32[]) collective-permute-start(%w), source_target_pairs={{0,1},{1,0}}",
        "  %cp-done = bf16[16,64]{1,0} collective-permute-done(%cp-start)",
        "  %j = s32[] get-tuple-element(%r), index=0",
        "  ROOT %out2 = (s32[], bf16[16,64]{1,0}) tuple(%j, %cp-done)",
        "}",
        "",
        "%cond2 (k: (s32[], bf16[16,64])) -> pred[] {",
        "  %k = (s32[], bf16[16,64]{1,0}) parameter(0)",
        "  %kj = s32[] get-tuple-element(%k), index=0",
        "  %three = s32[] constant(3)",
        "  ROOT %lt2 = pred[] compare(%kj, %three), direction=LT",
        "}",
        "",
        "%cond3 (m: (s32[], bf16[16,64])) -> pred[] {",
        "  %m = (s32[], bf16[16,64]{1,0}) parameter(0)",
        '  ROOT %flag = pred[] custom-call(%m), custom_call_target="opaque"',
        "}",
        "",
        "ENTRY %main (a: bf16[1024,512], b: f32[1024,128], v0: f32[8,128], "
        "w0: bf16[16,64]) -> f32[] {",
        "  %a = bf16[1024,512]{1,0} parameter(0)",
        "  %b = f32[1024,128]{1,0} parameter(1)",
        "  %v0 = f32[8,128]{1,0} parameter(2)",
        "  %w0 = bf16[16,64]{1,0} parameter(3)",
        "  %zero = s32[] constant(0)",
        "  %a16 = f32[16,32]{1,0} slice(%b), slice={[0:16], [0:32]}",
        "  %acs = (f32[16,32]{1,0}, f32[64,32]{1,0}) fusion(%a16), kind=kCustom, "
        "calls=%async_start",
        "  %acd = f32[64,32]{1,0} fusion(%a16), kind=kCustom, calls=%async_done",
        "  %ag = bf16[4096,512]{1,0:T(8,128)(2,1)} all-gather(%a), "
        "replica_groups=[2,4]<=[8], dimensions={0}",
        "  %rs = f32[256,128]{1,0} reduce-scatter(%b), "
        "replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add",
        "  %init = (s32[], f32[8,128]{1,0}) tuple(%zero, %v0)",
        "  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body, "
        'backend_config={"known_trip_count":{"n":"5"}}',
        "  %init2 = (s32[], bf16[16,64]{1,0}) tuple(%zero, %w0)",
        "  %loop2 = (s32[], bf16[16,64]{1,0}) while(%init2), condition=%cond2, body=%body2",
        "  %loop3 = (s32[], bf16[16,64]{1,0}) while(%init2), condition=%cond3, body=%body2",
        "  ROOT %res = f32[] constant(0)",
        "}",
        "",
    ]
)


def test_collective_parser_on_a_hand_written_module():
    ops, unknown = hlo.collectives(HLO, num_devices=8)
    assert unknown == ["loop3"]  # an opaque condition: counted once, and said so
    by = hlo.bytes_by_kind(ops)
    # all-gather: the gathered bf16[4096,512] (4 MiB), groups of 4 ([2,4]<=[8]), once; and one
    # asynchronous f32[64,32] (8 KiB) whose start, continuation (in the loop body: 5 copies)
    # and done fusions repeat it with channel_id=7: counted once.
    ag = {"bytes": 4 * MiB + 8192, "traffic": 3 * MiB + 6144, "ops": 2}
    assert by["all-gather"] == ag
    # reduce-scatter: its f32[1024,128] operand (512 KiB), groups of 4, once.
    assert by["reduce-scatter"] == {"bytes": 512 * 1024, "traffic": 384 * 1024, "ops": 1}
    # all-reduce f32[8,128] (4 KiB) over 'y' (4 chips) in a loop of known_trip_count 5 (not the
    # condition's 99): 20 KiB; traffic 2 x 3/4 x 20 KiB.
    assert by["all-reduce"] == {"bytes": 20 * 1024, "traffic": 30 * 1024, "ops": 5}
    # all-to-all f32[4,32] (512 B) in a computation called from that loop body, all 8 chips.
    assert by["all-to-all"] == {"bytes": 5 * 512, "traffic": 5 * 512 * 7 / 8, "ops": 5}
    # collective-permute bf16[16,64] (2 KiB): 3 trips (counter < 3) + 1 (unknown loop).
    assert by["collective-permute"] == {"bytes": 4 * 2048, "traffic": 4 * 2048, "ops": 4}


def test_shape_bytes_and_group_sizes():
    assert hlo.shape_bytes("bf16[2,3]{1,0:T(8,128)(2,1)}") == 12
    assert hlo.shape_bytes("(f32[4], (s8[3], pred[]), u32[])") == 16 + 3 + 1 + 4
    groups = "replica_groups=mesh['axis_0'=16,'axis_1'=2] {'axis_0','axis_1'}"
    assert hlo.group_size(groups, 1) == 32
    assert hlo.group_size("replica_groups=[4,16]<=[64]", 1) == 16
    assert hlo.group_size("replica_groups={{0,2},{1,3}}", 1) == 2
    assert hlo.group_size("dimensions={0}", 64) == 64


def test_largest_buffers():
    ((size, shape, _), *_) = hlo.largest_buffers(HLO, 1)
    assert (size, shape) == (4 * MiB, "bf16[4096,512]")


# ---------------------------------------------------------------------------- topologies


@pytest.mark.parametrize(
    "name,slices,chips,topology_name",
    [
        ("v5p-128", 1, 64, "v5p:4x4x4"),  # v5p counts TensorCores, 2 per chip
        ("v5p-256", 1, 128, "v5p:4x4x8"),
        ("v4-32", 1, 16, "v4:2x2x4"),
        ("v5e-64", 1, 64, "v5e:8x8"),  # v5e / v6e count chips
        ("v5litepod-16", 1, 16, "v5e:4x4"),
        ("v6e-64", 1, 64, "v6e:8x8"),
        ("v5e:4x4", 1, 16, "v5e:4x4"),
        ("v5p-128", 2, 128, "v5p:4x4x4"),
    ],
)
def test_topology_names(name, slices, chips, topology_name):
    topo = topologies.parse(name, slices)
    assert (topo.num_chips, topo.topology_name, topo.num_slices) == (chips, topology_name, slices)


@pytest.mark.parametrize("name", ["v5p-100", "v9-8", "v5e:4x4x4", "v5e-3"])
def test_bad_topology_names(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        topologies.parse(name)


def test_compile_only_devices_and_a_multislice_mesh():
    devices = topologies.parse("v4-16").devices()  # megacore: one device per chip
    assert len(devices) == 8 and devices[0].device_kind == "TPU v4"
    devices = topologies.parse("v5p-16", num_slices=2).devices()
    assert len(devices) == 16
    config = _config(TINY)
    with pytest.raises(ValueError, match="make the data axis a multiple of 2"):
        experiment.build_mesh(config, devices)  # data 1: nothing would span the slices
    with config.unlocked():
        config.mesh = (("data", 2), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    mesh = experiment.build_mesh(config, devices)
    for i in range(2):  # the data axis spans the two slices: each index lies in one slice
        assert len({d.slice_index for d in mesh.devices[i].flat}) == 1
    assert {mesh.devices[i].flat[0].slice_index for i in range(2)} == {0, 1}


# ---------------------------------------------------------------- one builder, one program


def test_compile_mode_lowers_the_trainers_program():
    """The abstract build (compile mode) and the trainer's real build of the same config lower
    to the same StableHLO: same state and teacher shapes and shardings, same step function."""
    config = _config(TINY)
    devices = jax.devices()
    _, abstract, args, _ = compile_lib.build_abstract(config, devices)
    mesh = experiment.build_mesh(config, devices)
    rules = tuple(tuple(r) for r in config.get("rules", sharding.DEFAULT_RULES))
    student = experiment.build_model(config.student, "student", 0)
    teacher = experiment.build_teacher(config.teacher, student, 0, None, None)
    spec = experiment.loss_spec(config)
    real = build_lib.build_step(
        experiment.run_settings(config, spec),
        mesh=mesh,
        rules=rules,
        spec=spec,
        student=student,
        teacher=teacher,
        vocab_mask=None,
        tokens_per_step=8 * 64,
    )
    assert isinstance(real.state.step, jax.Array)
    assert isinstance(abstract.state.step, jax.ShapeDtypeStruct)
    batch = args[2]
    want = real.jitted.lower(real.state, real.teacher_params, batch).as_text()
    got = abstract.jitted.lower(*args).as_text()
    assert got == want


def test_the_trainer_goes_through_the_builder(monkeypatch, tmp_path):
    calls = []
    build = build_lib.build_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("abstract", False))
        return build(*args, **kwargs)

    monkeypatch.setattr(build_lib, "build_step", spy)
    config = _config(TINY, "steps=1")
    with config.unlocked():
        config.eval.num_batches = 1
    experiment.train(config, str(tmp_path))
    compile_lib.build_abstract(_config(TINY), jax.devices())
    assert calls == [False, True]


def test_abstract_batch_shapes():
    config = _config(TINY)
    mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
    shardings = build_lib.batch_shardings(mesh, sharding.DEFAULT_RULES, cached=False)
    batch = aot.abstract_batch(config, (8, 64), shardings)
    assert batch["input_ids"].shape == (8, 64) and batch["loss_mask"].dtype == jnp.bool_


HBM_HLO = "\n".join(
    [
        "HloModule traffic",
        "",
        "%layer (w: f32[4,256,256], x: f32[8,256], i: s32[]) -> f32[8,256] {",
        "  %w = f32[4,256,256]{2,1,0} parameter(0)",
        "  %x = f32[8,256]{1,0} parameter(1)",
        "  %i = s32[] parameter(2)",
        "  %z = s32[] constant(0)",
        "  %wi = f32[1,256,256]{2,1,0} dynamic-slice(%w, %i, %z, %z), "
        "dynamic_slice_sizes={1,256,256}",
        "  %w2 = f32[256,256]{1,0} bitcast(%wi)",
        "  ROOT %y = f32[8,256]{1,0} dot(%x, %w2), lhs_contracting_dims={1}, "
        "rhs_contracting_dims={0}",
        "}",
        "",
        "%store (buf: f32[4,8,256], y: f32[8,256], i: s32[]) -> f32[4,8,256] {",
        "  %buf = f32[4,8,256]{2,1,0} parameter(0)",
        "  %y = f32[8,256]{1,0} parameter(1)",
        "  %i = s32[] parameter(2)",
        "  %z = s32[] constant(0)",
        "  %y3 = f32[1,8,256]{2,1,0} bitcast(%y)",
        "  ROOT %u = f32[4,8,256]{2,1,0} dynamic-update-slice(%buf, %y3, %i, %z, %z)",
        "}",
        "",
        "%body (p: (s32[], f32[4,256,256], f32[8,256], f32[4,8,256])) -> "
        "(s32[], f32[4,256,256], f32[8,256], f32[4,8,256]) {",
        "  %p = (s32[], f32[4,256,256]{2,1,0}, f32[8,256]{1,0}, f32[4,8,256]{2,1,0}) parameter(0)",
        "  %i = s32[] get-tuple-element(%p), index=0",
        "  %w = f32[4,256,256]{2,1,0} get-tuple-element(%p), index=1",
        "  %x = f32[8,256]{1,0} get-tuple-element(%p), index=2",
        "  %buf = f32[4,8,256]{2,1,0} get-tuple-element(%p), index=3",
        "  %y = f32[8,256]{1,0} fusion(%w, %x, %i), kind=kOutput, calls=%layer",
        "  %buf2 = f32[4,8,256]{2,1,0} fusion(%buf, %y, %i), kind=kLoop, calls=%store",
        "  %one = s32[] constant(1)",
        "  %i2 = s32[] add(%i, %one)",
        "  ROOT %t = (s32[], f32[4,256,256]{2,1,0}, f32[8,256]{1,0}, f32[4,8,256]{2,1,0}) "
        "tuple(%i2, %w, %y, %buf2)",
        "}",
        "",
        "%cond (c: (s32[], f32[4,256,256], f32[8,256], f32[4,8,256])) -> pred[] {",
        "  %c = (s32[], f32[4,256,256]{2,1,0}, f32[8,256]{1,0}, f32[4,8,256]{2,1,0}) parameter(0)",
        "  %ci = s32[] get-tuple-element(%c), index=0",
        "  %n = s32[] constant(4)",
        "  ROOT %lt = pred[] compare(%ci, %n), direction=LT",
        "}",
        "",
        "ENTRY %main (w: f32[4,256,256], x: f32[8,256], buf: f32[4,8,256]) -> f32[8,256] {",
        "  %w = f32[4,256,256]{2,1,0} parameter(0)",
        "  %x = f32[8,256]{1,0} parameter(1)",
        "  %buf = f32[4,8,256]{2,1,0} parameter(2)",
        "  %zero = s32[] constant(0)",
        "  %init = (s32[], f32[4,256,256]{2,1,0}, f32[8,256]{1,0}, f32[4,8,256]{2,1,0}) "
        "tuple(%zero, %w, %x, %buf)",
        "  %loop = (s32[], f32[4,256,256]{2,1,0}, f32[8,256]{1,0}, f32[4,8,256]{2,1,0}) "
        "while(%init), condition=%cond, body=%body",
        "  %out = f32[8,256]{1,0} get-tuple-element(%loop), index=2",
        "  ROOT %neg = f32[8,256]{1,0} negate(%out)",
        "}",
        "",
    ]
)


def test_hbm_traffic_counts_loop_bodies_per_trip_and_slices_not_whole_buffers():
    traffic, unknown = hlo.hbm_bytes(HBM_HLO)
    assert unknown == []
    layer_w, act, s32 = 256 * 256 * 4, 8 * 256 * 4, 4  # one layer's weights, [8, 256] f32
    # Per trip (4 of them): the layer fusion reads its weight slice (not the [4, 256, 256]
    # stack), x and the index, and writes y; the store fusion writes y's row in place (the
    # rest of the [4, 8, 256] buffer is not moved) and reads y and the index; the counter add;
    # the condition's compare (two s32 in, one pred out).
    per_trip = (layer_w + act + s32 + act) + (act + act + s32) + (s32 + s32 + s32) + (1 + 2 * s32)
    # Once: the final negate reads and writes [8, 256].
    assert traffic == 4 * per_trip + 2 * act


def test_collectives_outside_fusions_that_share_a_channel_id_are_separate_ops():
    # shard_map lowers every all_to_all with channel_id=1; only the start / continuation / done
    # fusions of one asynchronous collective repeat it (the hand-written module above).
    module = "\n".join(
        [
            "HloModule shared_channel",
            "",
            "ENTRY %main (x: bf16[8,64,32]) -> bf16[8,64,32] {",
            "  %x = bf16[8,64,32]{2,1,0} parameter(0)",
            "  %a = bf16[8,64,32]{2,1,0} all-to-all(%x), channel_id=1, "
            "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}",
            "  ROOT %b = bf16[8,64,32]{2,1,0} all-to-all(%a), channel_id=1, "
            "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}",
            "}",
        ]
    )
    ops, _ = hlo.collectives(module, num_devices=8)
    by = hlo.bytes_by_kind(ops)
    assert by["all-to-all"]["ops"] == 2 and by["all-to-all"]["bytes"] == 2 * 8 * 64 * 32 * 2
