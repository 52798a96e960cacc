"""A tensorflow-datasets builder over the local corpora of ``sources.py``.

``LocalCorpus`` (registered as ``"local_corpus"``) is one ``GeneratorBasedBuilder`` whose
``LocalCorpusConfig`` names the corpus (``kind``) and its options; ``download_and_prepare()``
reads only local files (Botchan: the cached file of ``sources.botchan_path``), so it works
offline. Splits "train" and "validation" come from ``sources.split_corpus`` with the config's
``fraction`` and ``seed``, and examples keep corpus order (shuffling is disabled), so
``as_dataset(split=..., shuffle_files=False)`` yields the same documents as ``sources.py``.

Features by kind (all ``tfds.features.Text``):

- "text" (plain files), "jsonl" (one string field), "botchan": ``{"text"}``
- "kjv": ``{"chapter", "text"}`` (chapter is "Genesis 1")
- "jsonl_pairs": ``{"prompt", "response"}``
- "gsm_symbolic": ``{"question", "answer", "solution"}``

Predefined configs ``local_corpus/kjv``, ``local_corpus/botchan`` and
``local_corpus/gsm_symbolic`` use the defaults; files need a config of your own::

    config = LocalCorpusConfig(name="my_notes", kind="text", paths=("notes/*.txt",))
    builder = LocalCorpus(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="validation")

A prepared dataset is found again by config name and version: after changing the files behind
a config, use a new name or delete ``data_dir/local_corpus/<name>``.

Importing this module imports TensorFlow and hides every GPU from it (JAX keeps them).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def _hide_gpus_from_tensorflow() -> None:
    """TF would reserve all GPU memory at its first op; building datasets needs only the CPU."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TF already initialised its devices; keep them
        pass


_hide_gpus_from_tensorflow()

import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402

from distill_jax.data import sources  # noqa: E402

KINDS = ("text", "jsonl", "jsonl_pairs", "kjv", "botchan", "gsm_symbolic")


@dataclasses.dataclass(eq=False)
class LocalCorpusConfig(tfds.core.BuilderConfig):
    """Which corpus ``LocalCorpus`` builds, and its held-out split.

    Attributes:
        kind: one of ``KINDS``.
        paths: files or globs, for "text", "jsonl" and "jsonl_pairs".
        one_per_file: "text": each file is one document (else blank lines separate them).
        field: "jsonl": the string field holding the text.
        prompt_field, response_field: "jsonl_pairs": the two string fields.
        num_problems, generator_seed: "gsm_symbolic": ``sources.gsm_problems`` arguments.
        cache_dir: "botchan": where ``sources.botchan_path`` keeps the file.
        fraction, seed: the held-out split (``sources.split_corpus``).
    """

    kind: str = "text"
    paths: tuple[str, ...] = ()
    one_per_file: bool = False
    field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    num_problems: int = 1000
    generator_seed: int = 0
    cache_dir: str | None = None
    fraction: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LocalCorpusConfig kind {self.kind!r} is not one of {KINDS}.")
        if isinstance(self.paths, str | os.PathLike):
            self.paths = (self.paths,)
        self.paths = tuple(os.fspath(p) for p in self.paths)
        if self.kind in ("text", "jsonl", "jsonl_pairs") and not self.paths:
            raise ValueError(f"LocalCorpusConfig {self.name!r} of kind {self.kind!r} needs paths.")


def corpus_records(config: LocalCorpusConfig) -> list[dict[str, str]]:
    """The examples of ``config``'s corpus in corpus order, before the split."""
    if config.kind == "text":
        documents = sources.text_documents(config.paths, one_per_file=config.one_per_file)
        return [{"text": d} for d in documents]
    if config.kind == "jsonl":
        return [{"text": d} for d in sources.jsonl_documents(config.paths, config.field)]
    if config.kind == "jsonl_pairs":
        fields = [config.prompt_field, config.response_field]
        records = sources.jsonl_records(config.paths, fields)
        return [{"prompt": r[fields[0]], "response": r[fields[1]]} for r in records]
    if config.kind == "kjv":
        return [{"chapter": name, "text": text} for name, text in sources.kjv_chapters()]
    if config.kind == "botchan":
        return [{"text": p} for p in sources.botchan_paragraphs(config.cache_dir)]
    return sources.gsm_problems(config.num_problems, config.generator_seed)


_FEATURE_KEYS = {
    "kjv": ("chapter", "text"),
    "jsonl_pairs": ("prompt", "response"),
    "gsm_symbolic": ("question", "answer", "solution"),
}


class LocalCorpus(tfds.core.GeneratorBasedBuilder):
    """Local text corpora (see the module docstring) with seeded train/validation splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        LocalCorpusConfig(name="kjv", kind="kjv", description="King James Bible chapters."),
        LocalCorpusConfig(name="botchan", kind="botchan", description="Botchan paragraphs."),
        LocalCorpusConfig(
            name="gsm_symbolic",
            kind="gsm_symbolic",
            description="GSM-style problems from reasoning-gym with worked solutions.",
        ),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. tfds 4.9.10 finds it through ``importlib_resources``, which it does not
        install on Python >= 3.9 (``ModuleNotFoundError`` in ``download_and_prepare``)."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        keys = _FEATURE_KEYS.get(self.builder_config.kind, ("text",))
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in keys}),
            disable_shuffling=True,  # corpus order, so contents compare with sources.py
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # every source is local
        config = self.builder_config
        splits = sources.split_corpus(
            corpus_records(config),
            fraction=config.fraction,
            seed=config.seed,
            source=f"local_corpus/{config.name}",
        )
        return {split: self._generate_examples(records) for split, records in splits.items()}

    def _generate_examples(self, records):
        yield from enumerate(records)  # key = position, kept as the order (no shuffling)
