r"""Llama-3.1-8B -> Llama-3.2-1B, forward KL + CE, on a TPU v5e-64 (FSDP over 64 chips).

Pod scale: the 8B teacher runs inside the sharded train step (bfloat16 weights), the 1B student
trains in bfloat16 compute with float32 weights and AdamW, every block rematerialised. Check that it
compiles and fits, and what it costs, on any machine with libtpu (no TPU, no weights):

    python -m distill_jax.main --config configs/pod/llama8b_to_llama1b_v5e64.py \
        --workdir /tmp/pod_llama8b --mode=compile
    python -m distill_jax.main --config configs/pod/llama8b_to_llama1b_v5e64.py:reduced=True \
        --workdir /tmp/pod_llama8b_reduced --mode=compile     # 2 blocks each, v5e:4x4 (CI)

Architectures (``models.presets``): the public config.json of each model (no weights needed):
meta-llama/Llama-3.1-8B: vocab_size 128256, hidden_size 4096, intermediate_size 14336,
num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, head_dim 128, rms_norm_eps
1e-5, rope_theta 500000, rope_scaling {rope_type llama3, factor 8, low_freq_factor 1,
high_freq_factor 4, original_max_position_embeddings 8192}, max_position_embeddings 131072,
tie_word_embeddings false. meta-llama/Llama-3.2-1B: hidden_size 2048, intermediate_size 8192,
num_hidden_layers 16, num_attention_heads 32, num_key_value_heads 8, head_dim 64, rope_scaling
factor 32 (otherwise as 3.1), tie_word_embeddings true, the same 128256-token vocabulary.

To train: ``launch/tpu_pod.py --accelerator_type=v5litepod-64 --check ...`` with
``--config.teacher.init=<HF dir of Llama-3.1-8B> --config.student.init=<HF dir of Llama-3.2-1B>
--config.data.paths=<jsonl files>`` (compile mode reads only config.json from such a directory).
Presets: reduced (real widths, 2 blocks, v5e:4x4, 16 x 1024 tokens), steps.
"""

import ml_collections as mlc

from distill_jax import config_lib
from distill_jax.models.presets import architecture


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, reduced=False, steps=10_000)
    layers = (2, 2) if arg.reduced else (32, 16)
    c = mlc.ConfigDict()
    c.seed = 0
    c.topology = "v5e:4x4" if arg.reduced else "v5e-64"
    execution = dict(attention_impl="auto", scan_layers=True)
    c.teacher = dict(
        kind="online",
        init="random",
        config=architecture("llama-3.1-8b", num_layers=layers[0]),
        dtype="bfloat16",
        param_dtype="bfloat16",
        **execution,
    )
    c.student = dict(
        init="random",
        config=architecture("llama-3.2-1b", num_layers=layers[1]),
        dtype="bfloat16",
        param_dtype="float32",
        **execution,
    )
    c.data = dict(
        source="jsonl",
        paths=["/data/train.jsonl"],
        tokenizer="student",
        seq_len=1024 if arg.reduced else 2048,
        global_batch_size=16 if arg.reduced else 128,
        held_out_fraction=0.001,
        seed=0,
    )
    c.losses = dict(forward_kl=dict(temperature=1.0, weight=0.9), ce=dict(weight=0.1))
    c.loss_options = dict(head_chunk_tokens=512)  # tokens per fused-loss chunk
    c.optimizer = dict(
        learning_rate=1e-4, warmup_steps=500, weight_decay=0.01, grad_clip_norm=1.0, b2=0.95
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
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
