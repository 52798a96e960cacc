"""Eight CPU devices for mesh tests, set before the JAX backend starts.

JAX_PLATFORMS=cpu: with the ``tpu`` extra installed (libtpu, for --mode=compile), JAX would
otherwise try to start a TPU backend on this machine (printing libtpu's complaints and taking its
lockfile); compile-only TPU devices (``distill_jax.topologies``) do not need that backend.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
