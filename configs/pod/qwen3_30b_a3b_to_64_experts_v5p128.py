r"""Qwen3-30B-A3B -> the same model with half its experts (64 of 128), on a TPU v5p-128.

MoE expert pruning then recovery by distillation (expert saliency as in REAP, Lasby et al.,
2025): the student is Qwen3-30B-A3B with 64 experts per layer (top-8 routing kept),
trained with forward KL + CE against the unpruned 128-expert teacher, which runs inside the
sharded step in bfloat16. 64 chips as fsdp 8 x expert 8: experts are split over the expert axis
(16 teacher / 8 student experts per chip), embed dimensions over fsdp, and the batch over both.
Compile and check on any machine with libtpu (no TPU, no weights):

    python -m distill_jax.main --config configs/pod/qwen3_30b_a3b_to_64_experts_v5p128.py \
        --workdir /tmp/pod_qwen3_moe --mode=compile
    python -m distill_jax.main \
        --config configs/pod/qwen3_30b_a3b_to_64_experts_v5p128.py:reduced=True \
        --workdir /tmp/pod_qwen3_moe_reduced --mode=compile  # 2 blocks each, v5p-32 (CI)

Architecture: the public config.json of Qwen/Qwen3-30B-A3B (weights not needed to compile):
model_type qwen3_moe, vocab_size 151936, hidden_size 2048, num_hidden_layers 48,
num_attention_heads 32, num_key_value_heads 4, head_dim 128, num_experts 128,
num_experts_per_tok 8, moe_intermediate_size 768 (intermediate_size 6144 is unused: every layer is
MoE, decoder_sparse_step 1, mlp_only_layers []), norm_topk_prob true, router_aux_loss_coef 0.001,
rms_norm_eps 1e-6, rope_theta 1000000, max_position_embeddings 40960, tie_word_embeddings false.

To train: prune with ``dj.transforms.rank_experts`` / ``prune_experts`` (e.g. REAP saliency,
configs/moe_prune_distill.py shows the plan on a small model), save the pruned model, and pass
``--config.student.init=<its HF dir> --config.teacher.init=<HF dir of Qwen3-30B-A3B>``.
Presets: reduced (real widths, 2 blocks, v5p-32 = 16 chips as fsdp 2 x expert 8, 16 x 1024
tokens), steps, capacity_factor (the student's expert-parallel buffers as a multiple of the even
share of assignments, default 1.25, the overflow dropped and counted; 0: dropless).
"""

import ml_collections as mlc

from distill_jax import config_lib, sharding
from distill_jax.models.presets import architecture


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, reduced=False, steps=5_000, capacity_factor=1.25)
    layers = 2 if arg.reduced else 48
    c = mlc.ConfigDict()
    c.seed = 0
    c.topology = "v5p-32" if arg.reduced else "v5p-128"
    # Expert parallelism sends each (token, expert) assignment to its expert's chip through fixed
    # buffers (models/moe.py): dropless ones hold the worst case, P * min(k, E/P) / k = 8x the
    # even share here; with a capacity factor c they hold c x the even share and the overflow
    # is dropped and counted (the train metric moe/dropped_fraction). The teacher stays dropless
    # (its logits are the real model's); the student trains at capacity_factor (0: dropless).
    execution = dict(attention_impl="auto", moe_impl="auto", scan_layers=True)
    c.teacher = dict(
        kind="online",
        init="random",
        config=architecture("qwen3-30b-a3b", num_layers=layers),
        dtype="bfloat16",
        param_dtype="bfloat16",
        moe_capacity_factor=None,
        **execution,
    )
    c.student = dict(
        init="random",
        config=architecture("qwen3-30b-a3b", num_layers=layers, num_experts=64),
        dtype="bfloat16",
        param_dtype="float32",
        moe_capacity_factor=arg.capacity_factor or None,
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
        learning_rate=2e-5, warmup_steps=200, weight_decay=0.01, grad_clip_norm=1.0, b2=0.95
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
    c.eval = dict(num_batches=8, every_steps=500, at_start=True)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 8))
    # sharding.DEFAULT_RULES, except that batch rows are also split over the expert axis.
    c.rules = tuple(dict(sharding.DEFAULT_RULES, batch=("data", "fsdp", "expert")).items())
    return c
