"""seqio Tasks and Mixtures over the corpora of ``sources.py``, tokenized by our tokenizers.

``TokenizerVocabulary`` adapts a ``distill_jax.data.token_bytes.Tokenizer`` to seqio's
``Vocabulary`` (two vocabularies are equal when their tokenizers' fingerprints are). The
``register_*`` functions read a corpus now (so a missing file or an empty corpus fails at
registration), split it with ``sources.split_corpus`` into "train" and "validation", and
register a Task whose source is a ``seqio.FunctionDataSource`` over those in-memory lists:

- language-model Tasks (``register_kjv_task``, ``register_botchan_task``,
  ``register_text_files_task``, ``register_jsonl_task``, ``register_documents_task``) have one
  output feature, "targets": tokenize, append EOS to each document, then ``split_to_length``
  cuts a document longer than ``sequence_length["targets"]`` into consecutive pieces, so that
  no token is dropped (seqio alone would truncate). Pack them with
  ``seqio.LMFeatureConverter(pack=True)`` or ``seqio.DecoderFeatureConverter(pack=True)``.
- prompt/answer Tasks (``register_gsm_task``, ``register_jsonl_pairs_task``,
  ``register_pairs_task``) have "inputs" (no EOS) and "targets" (EOS appended);
  ``check_lengths`` raises when an example is longer than the requested length.

Registering a name again replaces the earlier Task or Mixture, so calls are idempotent.

seqio reserves id 0 for padding (packing counts non-zero ids to find a sequence's length), so
text must never encode to id 0: the vocabulary raises if it would (only the "byte" tokenizer,
for a NUL character), and an EOS of id 0 is refused when EOS is to be appended.

Importing this module imports TensorFlow (slow, about 5 s) and hides every GPU from it, so that
JAX keeps the accelerator memory; ``import distill_jax`` does not import it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _hide_gpus_from_tensorflow() -> None:
    """TF would reserve all GPU memory at its first op; the data pipeline only needs the CPU."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TF already initialised its devices; keep them
        pass


_hide_gpus_from_tensorflow()

import seqio  # noqa: E402

from distill_jax.data import sources  # noqa: E402
from distill_jax.data.token_bytes import Tokenizer  # noqa: E402
from distill_jax.data.tokenizers import load_tokenizer  # noqa: E402

PAD_ID = seqio.vocabularies.PAD_ID  # 0

TokenizerLike = Tokenizer | str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Vocabulary adapter
# ---------------------------------------------------------------------------------------------


class TokenizerVocabulary(seqio.Vocabulary):
    """A seqio ``Vocabulary`` over one of our ``Tokenizer`` objects (no extra ids).

    ``encode`` never adds BOS or EOS (seqio appends EOS in a preprocessor). ``decode`` drops id
    0 (seqio's padding) and, as seqio does, stops at the first EOS. TensorFlow ops run the
    tokenizer through ``tf.py_function``: strings of rank 0 or 1 encode to an int32 vector or
    a ``tf.RaggedTensor``; ids of rank 1 or 2 decode to a string scalar or vector.

    Args:
        tokenizer: a ``Tokenizer`` or a spec for ``load_tokenizer``.
    """

    def __init__(self, tokenizer: TokenizerLike):
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._zero_is_text = tokenizer.token_bytes(PAD_ID) != b""
        super().__init__(extra_ids=0)

    def __repr__(self) -> str:
        return f"TokenizerVocabulary({self.tokenizer!r})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, TokenizerVocabulary):
            return NotImplemented
        return self.tokenizer.fingerprint == other.tokenizer.fingerprint

    def __hash__(self) -> int:
        return hash(self.tokenizer.fingerprint)

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def unk_id(self) -> int | None:
        return None  # byte fallback or byte-level BPE: every text has ids; none is "unknown"

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str | bytes) -> list[int]:
        text = s.decode("utf-8") if isinstance(s, bytes) else s
        ids = self.tokenizer.encode(text)
        if self._zero_is_text and PAD_ID in ids:
            raise ValueError(
                f"Tokenizer {self.tokenizer.name!r} encodes {self.tokenizer.token_bytes(0)!r} "
                "as id 0, which seqio reserves for padding; remove that character from the text."
            )
        return ids

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(int(i) for i in ids if int(i) != PAD_ID)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        s = tf.convert_to_tensor(s, dtype=tf.string)
        if s.shape.rank == 0:
            ids = tf.py_function(
                lambda x: np.asarray(self._encode(x.numpy()), np.int32), [s], tf.int32
            )
            ids.set_shape([None])
            return ids
        if s.shape.rank != 1:
            raise ValueError(f"encode_tf takes a string scalar or vector, got shape {s.shape}.")

        def encode_many(texts):
            encoded = [self._encode(t) for t in texts.numpy()]
            flat = np.fromiter((i for ids in encoded for i in ids), np.int32)
            return flat, np.asarray([len(ids) for ids in encoded], np.int64)

        values, lengths = tf.py_function(encode_many, [s], (tf.int32, tf.int64))
        values.set_shape([None])
        lengths.set_shape(s.shape)
        return tf.RaggedTensor.from_row_lengths(values, lengths)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank == 1:
            text = tf.py_function(lambda x: self._decode(x.numpy()).encode(), [ids], tf.string)
            text.set_shape([])
            return text
        if ids.shape.rank != 2:
            raise ValueError(f"decode_tf takes ids of rank 1 or 2, got shape {ids.shape}.")

        def decode_many(rows):
            return np.asarray([self._decode(row).encode() for row in rows.numpy()], dtype=object)

        texts = tf.py_function(decode_many, [ids], tf.string)
        texts.set_shape(ids.shape[:1])
        return texts


def as_vocabulary(tokenizer: TokenizerLike | TokenizerVocabulary) -> TokenizerVocabulary:
    """``tokenizer`` as a ``TokenizerVocabulary`` (returned unchanged if it already is one)."""
    if isinstance(tokenizer, TokenizerVocabulary):
        return tokenizer
    return TokenizerVocabulary(tokenizer)


# ---------------------------------------------------------------------------------------------
# Preprocessors that need the sequence length
# ---------------------------------------------------------------------------------------------


def split_to_length(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int | None] | None = None
) -> tf.data.Dataset:
    """Cuts each "targets" sequence into consecutive pieces of ``sequence_length["targets"]``.

    Every piece but the last of a document is exactly that long; concatenated, the pieces are
    the document's tokens (with its EOS, if one was appended). Without a length, examples pass
    unchanged. Other features are dropped (a piece has no single pretokenized text).
    """
    length = (sequence_length or {}).get("targets")
    if length is None:
        return dataset.map(lambda ex: {"targets": ex["targets"]})
    length = tf.constant(length, tf.int64)

    def pieces(ex):
        tokens = ex["targets"]
        count = (tf.size(tokens, out_type=tf.int64) + length - 1) // length
        return tf.data.Dataset.range(count).map(
            lambda i: {"targets": tokens[i * length : (i + 1) * length]}
        )

    return dataset.flat_map(pieces)


def check_lengths(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int | None] | None = None
) -> tf.data.Dataset:
    """Raises (when iterated) if a feature is longer than its ``sequence_length``.

    seqio trims over-long features silently; for prompt/answer pairs a cut answer is a wrong
    answer, so this fails instead, naming the feature and the length to raise.
    """
    lengths = {k: v for k, v in (sequence_length or {}).items() if v is not None}

    def check(ex):
        asserts = [
            tf.debugging.assert_less_equal(
                tf.size(ex[key]),
                length,
                message=f"An example's {key!r} is longer than sequence_length[{key!r}] = "
                f"{length} tokens; raise that length (seqio would cut the example)",
            )
            for key, length in lengths.items()
            if key in ex
        ]
        with tf.control_dependencies(asserts):
            return {k: tf.identity(v) for k, v in ex.items()}

    return dataset.map(check) if lengths else dataset


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _function_source(splits: Mapping[str, Sequence[Mapping[str, str]]]) -> seqio.DataSource:
    """A ``FunctionDataSource`` yielding the given records (string features) per split."""
    keys = sorted(next(iter(splits.values()))[0])
    signature = {key: tf.TensorSpec([], tf.string) for key in keys}

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one in-memory list; seqio shuffles examples after this
        records = splits[split]
        return tf.data.Dataset.from_generator(
            lambda: ({k: r[k] for k in keys} for r in records), output_signature=signature
        )

    return seqio.FunctionDataSource(
        dataset_fn,
        splits=tuple(splits),
        num_input_examples={split: len(records) for split, records in splits.items()},
    )


def _eos_vocabulary(tokenizer, add_eos: bool) -> TokenizerVocabulary:
    vocabulary = as_vocabulary(tokenizer)
    if add_eos and vocabulary.eos_id is None:
        raise ValueError(f"{vocabulary} has no EOS token to append; pass add_eos=False.")
    if add_eos and vocabulary.eos_id == PAD_ID:
        raise ValueError(
            f"{vocabulary} has EOS id 0, which seqio reserves for padding; pass add_eos=False."
        )
    return vocabulary


def _add_task(name: str, **task_kwargs) -> seqio.Task:
    seqio.TaskRegistry.remove(name)  # idempotent: the latest registration wins
    return seqio.TaskRegistry.add(name, **task_kwargs)


def register_documents_task(
    name: str,
    documents: Sequence[str],
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    fraction: float = 0.02,
    seed: int = 0,
    add_eos: bool = True,
    source: str = "the documents",
) -> seqio.Task:
    """Registers a language-model Task ("targets") over ``documents``.

    Args:
        name: the Task's name (letters, digits, ``._:#``); an existing Task of that name is
            replaced.
        documents: the corpus, in order; ``held_out_split(documents, fraction, seed)`` gives
            the "train" and "validation" splits.
        tokenizer: a ``Tokenizer``, a spec for ``load_tokenizer``, or a ``TokenizerVocabulary``.
        fraction, seed: the held-out split.
        add_eos: append the tokenizer's EOS to every document.
        source: what the documents are, for error messages.

    Raises:
        ValueError: fewer than two documents, or ``add_eos`` with no usable EOS.
    """
    vocabulary = _eos_vocabulary(tokenizer, add_eos)
    splits = sources.split_corpus(
        [{"targets": d} for d in documents], fraction=fraction, seed=seed, source=source
    )
    return _add_task(
        name,
        source=_function_source(splits),
        output_features={"targets": seqio.Feature(vocabulary, add_eos=add_eos)},
        preprocessors=[
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos,
            split_to_length,
        ],
    )


def register_pairs_task(
    name: str,
    records: Sequence[Mapping[str, str]],
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    inputs_field: str = "prompt",
    targets_field: str = "response",
    fraction: float = 0.02,
    seed: int = 0,
    source: str = "the records",
) -> seqio.Task:
    """Registers a Task with "inputs" (``inputs_field``) and "targets" (``targets_field``).

    "targets" gets EOS, "inputs" none; "inputs_pretokenized" and "targets_pretokenized" keep
    the texts. ``check_lengths`` fails on an example longer than the requested lengths. For a
    decoder-only student use ``seqio.PrefixLMFeatureConverter``; other arguments as in
    ``register_documents_task``.
    """
    vocabulary = _eos_vocabulary(tokenizer, True)
    pairs = [{"inputs": r[inputs_field], "targets": r[targets_field]} for r in records]
    splits = sources.split_corpus(pairs, fraction=fraction, seed=seed, source=source)
    return _add_task(
        name,
        source=_function_source(splits),
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=False),
            "targets": seqio.Feature(vocabulary, add_eos=True),
        },
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos,
            check_lengths,
        ],
    )


def register_text_files_task(
    name: str,
    paths: sources.PathsLike,
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    one_per_file: bool = False,
    fraction: float = 0.02,
    seed: int = 0,
    add_eos: bool = True,
) -> seqio.Task:
    """A language-model Task over ``sources.text_documents(paths, one_per_file=...)``."""
    documents = sources.text_documents(paths, one_per_file=one_per_file)
    return register_documents_task(
        name,
        documents,
        tokenizer,
        fraction=fraction,
        seed=seed,
        add_eos=add_eos,
        source=f"text files {paths!r}",
    )


def register_jsonl_task(
    name: str,
    paths: sources.PathsLike,
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    field: str = "text",
    fraction: float = 0.02,
    seed: int = 0,
    add_eos: bool = True,
) -> seqio.Task:
    """A language-model Task over the string ``field`` of JSON-lines files."""
    documents = sources.jsonl_documents(paths, field)
    return register_documents_task(
        name,
        documents,
        tokenizer,
        fraction=fraction,
        seed=seed,
        add_eos=add_eos,
        source=f"JSON-lines files {paths!r}",
    )


def register_jsonl_pairs_task(
    name: str,
    paths: sources.PathsLike,
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    fraction: float = 0.02,
    seed: int = 0,
) -> seqio.Task:
    """An "inputs"/"targets" Task over two string fields of JSON-lines files."""
    records = sources.jsonl_records(paths, [prompt_field, response_field])
    return register_pairs_task(
        name,
        records,
        tokenizer,
        inputs_field=prompt_field,
        targets_field=response_field,
        fraction=fraction,
        seed=seed,
        source=f"JSON-lines files {paths!r}",
    )


def register_kjv_task(
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    name: str = "distill_jax.kjv",
    fraction: float = 0.02,
    seed: int = 0,
    add_eos: bool = True,
) -> seqio.Task:
    """A language-model Task over the 1,189 KJV chapters (``sources.kjv_chapters``)."""
    documents = [text for _, text in sources.kjv_chapters()]
    return register_documents_task(
        name,
        documents,
        tokenizer,
        fraction=fraction,
        seed=seed,
        add_eos=add_eos,
        source="The King James Bible",
    )


def register_botchan_task(
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    name: str = "distill_jax.botchan",
    cache_dir: str | os.PathLike | None = None,
    fraction: float = 0.02,
    seed: int = 0,
    add_eos: bool = True,
) -> seqio.Task:
    """A language-model Task over Botchan's paragraphs (``sources.botchan_paragraphs``)."""
    documents = sources.botchan_paragraphs(cache_dir)
    return register_documents_task(
        name,
        documents,
        tokenizer,
        fraction=fraction,
        seed=seed,
        add_eos=add_eos,
        source="Botchan",
    )


def register_gsm_task(
    tokenizer: TokenizerLike | TokenizerVocabulary,
    *,
    name: str = "distill_jax.gsm_symbolic",
    num_problems: int = 1000,
    generator_seed: int = 0,
    target: str = "solution",
    fraction: float = 0.02,
    seed: int = 0,
) -> seqio.Task:
    """An "inputs" (question) / "targets" Task over ``sources.gsm_problems``.

    Args:
        target: "solution" (the worked solution, ending "#### <answer>") or "answer" (the
            final answer alone).
        num_problems, generator_seed: ``gsm_problems(num_problems, generator_seed)``.
        fraction, seed: the held-out split.
    """
    if target not in ("solution", "answer"):
        raise ValueError(f"GSM target must be 'solution' or 'answer', got {target!r}.")
    problems = sources.gsm_problems(num_problems, generator_seed)
    return register_pairs_task(
        name,
        problems,
        tokenizer,
        inputs_field="question",
        targets_field=target,
        fraction=fraction,
        seed=seed,
        source="GSM problems",
    )


def register_mixture(
    name: str, rates: Mapping[str | seqio.Task, float] | Sequence[tuple[str | seqio.Task, float]]
) -> seqio.Mixture:
    """Registers a Mixture sampling its Tasks in proportion to ``rates`` (per example).

    Tasks must share output features and vocabularies (seqio checks). The Mixture holds the
    Task objects registered now: re-register it after re-registering one of its Tasks.
    """
    items = rates.items() if isinstance(rates, Mapping) else rates
    tasks = [(t.name if isinstance(t, seqio.Task) else t, float(rate)) for t, rate in items]
    if not tasks or any(rate <= 0 for _, rate in tasks):
        raise ValueError(f"Mixture {name!r} needs tasks with positive rates, got {tasks}.")
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks)
