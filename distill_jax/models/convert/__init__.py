"""Checkpoint loading and export: HF directories (safetensors) and GGUF files."""

from __future__ import annotations

import os

from distill_jax.models.convert import hf
from distill_jax.models.transformer import Transformer, to_looped, to_scanned


def from_pretrained(path: str | os.PathLike, **config_overrides) -> Transformer:
    """Load a model from an HF directory (config.json + safetensors) or a ``.gguf`` file.

    Args:
        path: the directory or file.
        **config_overrides: ModelConfig fields to change, e.g. ``dtype="bfloat16"`` or
            ``scan_layers=True`` (stacked blocks run by ``lax.scan``; loaded per layer, then
            stacked).

    Returns:
        A Transformer with the checkpoint's weights (float32 parameters unless overridden).
    """
    scan_layers = config_overrides.pop("scan_layers", False)
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from distill_jax.models.convert import gguf  # gguf is only needed for .gguf files

        hf_config, tensors = gguf.read_gguf(path)
    elif os.path.isdir(path):
        hf_config, tensors = hf.read_hf_dir(path)
    else:
        raise FileNotFoundError(
            f"{path} is neither a directory with config.json and safetensors nor a .gguf file."
        )
    config = hf.config_from_hf(hf_config, **config_overrides)
    model = hf.model_from_tensors(config, tensors)
    return to_scanned(model) if scan_layers else model


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, dtype: str | None = None):
    """Write ``model`` as an HF directory that ``transformers`` loads with equal logits."""
    hf.save_hf_dir(to_looped(model), out_dir, dtype=dtype)
