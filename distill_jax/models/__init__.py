"""Flax NNX decoder LMs: Llama/SmolLM2, Qwen2/3, Gemma3, Mixtral, Qwen2/3-MoE."""

from distill_jax.models.cache import KVCache, init_cache
from distill_jax.models.config import FAMILIES, ModelConfig, make_config
from distill_jax.models.convert import from_pretrained, save_pretrained
from distill_jax.models.sampling import Generation, generate, sample_logits
from distill_jax.models.transformer import ModelOutput, Transformer, num_params
