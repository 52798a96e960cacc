r"""Llama-3.1-70B -> Llama-3.1-8B, forward KL + CE, on a TPU v5p-256 (128 chips, FSDP x tensor).

The 70B teacher (bfloat16 weights) runs inside the sharded train step; the 8B student trains in
bfloat16 compute with float32 weights and AdamW, every block rematerialised. Parameters are
sharded over fsdp (32) x tensor (4): embed dimensions over fsdp, heads / MLP / vocabulary over
tensor. Compile and check on any machine with libtpu (no TPU, no weights):

    python -m distill_jax.main --config configs/pod/llama70b_to_llama8b_v5p256.py \
        --workdir /tmp/pod_llama70b --mode=compile
    python -m distill_jax.main --config configs/pod/llama70b_to_llama8b_v5p256.py:reduced=True \
        --workdir /tmp/pod_llama70b_reduced --mode=compile    # 2 blocks each, v5p-32 (CI)

Architectures: the public config.json of each model (weights not needed to compile):
meta-llama/Llama-3.1-70B: vocab_size 128256, hidden_size 8192, intermediate_size 28672,
num_hidden_layers 80, num_attention_heads 64, num_key_value_heads 8, head_dim 128, rms_norm_eps
1e-5, rope_theta 500000, rope_scaling {rope_type llama3, factor 8, low_freq_factor 1,
high_freq_factor 4, original_max_position_embeddings 8192}, max_position_embeddings 131072,
tie_word_embeddings false. meta-llama/Llama-3.1-8B: hidden_size 4096, intermediate_size 14336,
num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, head_dim 128, otherwise as
the 70B (same vocabulary and RoPE).

To train: ``launch/tpu_pod.py --accelerator_type=v5p-256 --check ...`` with
``--config.teacher.init=<HF dir of Llama-3.1-70B> --config.student.init=<HF dir of Llama-3.1-8B>
--config.data.paths=<jsonl files>``. Presets: reduced (real widths, 2 blocks, v5p-32 = 16 chips
as fsdp 4 x tensor 4, 16 x 1024 tokens), steps.
"""

import ml_collections as mlc

from distill_jax import config_lib
from distill_jax.models.presets import architecture


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, reduced=False, steps=10_000)
    layers = (2, 2) if arg.reduced else (80, 32)
    c = mlc.ConfigDict()
    c.seed = 0
    c.topology = "v5p-32" if arg.reduced else "v5p-256"
    execution = dict(attention_impl="auto", scan_layers=True)
    c.teacher = dict(
        kind="online",
        init="random",
        config=architecture("llama-3.1-70b", num_layers=layers[0]),
        dtype="bfloat16",
        param_dtype="bfloat16",
        **execution,
    )
    c.student = dict(
        init="random",
        config=architecture("llama-3.1-8b", num_layers=layers[1]),
        dtype="bfloat16",
        param_dtype="float32",
        **execution,
    )
    c.data = dict(
        source="jsonl",
        paths=["/data/train.jsonl"],
        tokenizer="student",
        seq_len=1024 if arg.reduced else 4096,
        global_batch_size=16 if arg.reduced else 256,
        held_out_fraction=0.001,
        seed=0,
    )
    c.losses = dict(forward_kl=dict(temperature=1.0, weight=0.9), ce=dict(weight=0.1))
    c.loss_options = dict(head_chunk_tokens=512)  # tokens per fused-loss chunk
    c.optimizer = dict(
        learning_rate=5e-5, warmup_steps=500, weight_decay=0.01, grad_clip_norm=1.0, b2=0.95
    )
    c.train = dict(
        steps=arg.steps,
        micro_batches=1,
        remat="full",  # none | full | dots | offload (models.scan.remat_policy)
        log_every_steps=10,
        checkpoint_every_steps=500,
        keep_checkpoints=2,
        export=True,
    )
    c.eval = dict(num_batches=8, every_steps=1000, at_start=True)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 4), ("expert", 1))
    return c
