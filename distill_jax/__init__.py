"""distill_jax: distil large language models in JAX, from one CPU to a TPU pod.

``import distill_jax as dj`` loads no submodule: ``dj.losses``, ``dj.models``, ``dj.data``,
``dj.bridges``, ``dj.transforms`` ... are imported on first use (PEP 562 module ``__getattr__``),
so ``import distill_jax.losses.divergences`` does not pull in the trainer, the data pipeline or
the bridges.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"


def __getattr__(name: str):
    """``distill_jax.<submodule>``: the submodule, imported the first time it is asked for."""
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
