r"""Gemma-3-12B -> Llama-3.2-1B across tokenizers (ALM bridge), on a TPU v6e-64.

Cross-tokenizer distillation by approximate likelihood matching (Minixhofer et al., 2025,
arXiv:2503.20083) at pod scale: the Gemma-3 teacher (262,208-row vocabulary, SentencePiece)
reads the same text pieces as the Llama-3.2 student (128,256 rows, byte-level BPE) in its own
tokens; chunk log-likelihoods over common token boundaries are matched (binary KL at tau_b = 100)
and the student's own next-token CE is reported. The teacher runs inside the sharded step in
bfloat16; the student trains in bfloat16 compute with float32 weights and AdamW, rematerialised.
FSDP over 64 chips. Compile and check on any machine with libtpu (no TPU, no weights, no
tokenizer files: the bridge's word-start masks are shape-only constants in compile mode):

    python -m distill_jax.main --config configs/pod/gemma3_12b_to_llama1b_alm_v6e64.py \
        --workdir /tmp/pod_gemma_alm --mode=compile
    python -m distill_jax.main \
        --config configs/pod/gemma3_12b_to_llama1b_alm_v6e64.py:reduced=True \
        --workdir /tmp/pod_gemma_alm_reduced --mode=compile  # 2 blocks each, v6e:4x4 (CI)

Architectures: the public config.json of each model (weights not needed to compile):
google/gemma-3-12b-pt text_config: vocab_size 262208, hidden_size 3840, intermediate_size 15360,
num_hidden_layers 48, num_attention_heads 16, num_key_value_heads 8, head_dim 256,
query_pre_attn_scalar 256, sliding_window 1024, sliding_window_pattern 6 (5 local : 1 global,
the global layers 6, 12, ..., 48), rope_theta 1000000 with rope_scaling {rope_type linear, factor
8} on global layers, rope_local_base_freq 10000, hidden_activation gelu_pytorch_tanh,
rms_norm_eps 1e-6, final_logit_softcapping null, max_position_embeddings 131072, tied
embeddings. meta-llama/Llama-3.2-1B: as in configs/pod/llama8b_to_llama1b_v5e64.py.

To train: ``--config.teacher.init=<HF dir of gemma-3-12b> --config.student.init=<HF dir of
Llama-3.2-1B> --config.data.paths=<jsonl files>`` (each directory's tokenizer.json is the
bridge's tokenizer). Presets: reduced (real widths, 2 blocks each, Gemma's one local and one
global layer, v6e:4x4, 16 x 1024 tokens), steps.
"""

import ml_collections as mlc

from distill_jax import config_lib
from distill_jax.models.presets import architecture


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, reduced=False, steps=10_000)
    c = mlc.ConfigDict()
    c.seed = 0
    c.topology = "v6e:4x4" if arg.reduced else "v6e-64"
    execution = dict(attention_impl="auto", scan_layers=True)
    teacher = architecture("gemma-3-12b")
    student = architecture("llama-3.2-1b")
    if arg.reduced:  # one local and one global layer
        teacher.update(num_layers=2, layer_types=("sliding", "full"))
        student.update(num_layers=2)
    length = 1024 if arg.reduced else 2048
    c.teacher = dict(
        kind="online",
        init="random",
        config=teacher,
        dtype="bfloat16",
        param_dtype="bfloat16",
        logprob_chunk_tokens=256,  # teacher positions per step of its log-prob walk
        **execution,
    )
    c.student = dict(
        init="random", config=student, dtype="bfloat16", param_dtype="float32", **execution
    )
    c.bridge = dict(
        teacher_tokenizer="teacher",
        teacher_len=length,
        coarsen="none",
        teacher_bos=True,  # Gemma is trained with <bos> first
        student_bos=True,
        piece_bytes=3 * length,  # text per row: about 3 bytes per token for both tokenizers
    )
    c.data = dict(
        source="jsonl",
        paths=["/data/train.jsonl"],
        tokenizer="student",
        seq_len=length,
        global_batch_size=16 if arg.reduced else 128,
        held_out_fraction=0.001,
        seed=0,
    )
    c.losses = dict(
        alm=dict(
            weight=1.0,
            temperature=100.0,
            distance="binary_kl",
            append_space=True,
            student_logprob_chunk_tokens=256,
        ),
        ce=dict(weight=0.0),  # the student's next-token NLL, a metric
    )
    c.loss_options = dict(head_chunk_tokens=512)
    c.optimizer = dict(
        learning_rate=5e-5, warmup_steps=500, weight_decay=0.0, grad_clip_norm=1.0, b2=0.95
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
