"""distill_jax: distil large language models in JAX/Flax, from one CPU to a TPU pod."""

from setuptools import find_packages, setup

# Pinned to the versions the test suite runs with (Python 3.11, CPU).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "gguf==0.19.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "tqdm==4.70.1",
    "absl-py==2.5.1",
    "tensorboardX==2.6.5",
]

EXTRAS = {
    # Reference implementation for parity tests and export checks (CPU build of torch).
    "hf": [
        "torch==2.13.0",
        "transformers==5.23.0",
        "accelerate==1.15.0",
        "trl==1.16.0",  # benchmarks/step.py: TRL's GKD trainer side by side
        "datasets==5.2.0",
    ],
    # seqio Tasks / tfds builders over local files (TensorFlow, about 3 GB), GSM-style problems.
    "data": [
        "seqio==0.0.20",
        "tensorflow==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorflow-datasets==4.9.10",
        "reasoning-gym==0.1.25",
    ],
    # tiktoken is the reference for tiktoken rank files in the tokenizer tests.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "ruff==0.17.6",
        "tiktoken==0.14.0",
        "hypothesis==6.170.17",  # generated texts for the bridge alignment tests
        "scipy==1.17.1",  # chi-square tests of speculative sampling (also a jax dependency)
    ],
    # notebooks/ (executed by tests/notebooks_test.py); matplotlib also draws benchmarks/report.py.
    "notebooks": ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "matplotlib==3.11.2"],
    # libtpu for `--mode=compile` (compiling the train step for a TPU topology on any machine,
    # distill_jax/train/aot.py) and for training on Cloud TPU VMs.
    "tpu": ["jax[tpu]==0.10.2"],
    # A gs:// workdir (Cloud TPU pods, launch/tpu_pod.py): orbax checkpoints through tensorstore,
    # metrics and exports through etils.epath (gcsfs), TensorBoard events through tensorboardX.
    "gcs": ["gcsfs==2026.10.1", "google-cloud-storage==3.17.1"],
}

setup(
    name="distill_jax",
    version="0.1.0",
    description="Knowledge distillation for large language models in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["distill_jax", "distill_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
