r"""Offline teacher cache: a teacher's top-k for every batch of a dataset, written once, read back
aligned with the same batches (METHODS.md 3, 1.13).

Layout of a cache directory:

    manifest.json                      settings + per-process shard list; written last
    p{process:03d}-{shard:05d}.npz     ids [n, B, L, K] int32, logprobs [n, B, L, K] (dtype),
                                       log_normalizer, log_tail [n, B, L] float32,
                                       input_hash [n, 32] uint8 (sha256 of each batch's input_ids)

The manifest names the teacher (a hash of its config and parameters), the tokenizer
(``Tokenizer.fingerprint``), K, the temperature, the stored dtype, the batch shape and the data
iterator's settings. ``TeacherCache.check`` refuses a cache whose settings differ from the run's,
naming each difference; ``check_run`` refuses, before anything loads, a cache shorter than the
run (one batch per optimizer step) or whose K / temperature / dtype differ from the config's,
and ``check_arrays`` one whose files hold arrays of other shapes than the manifest says
(headers only, nothing is read); ``TeacherCache.get(i, batch)`` refuses a batch whose input ids
are not the ones the cache was written for. Each file is written under a temporary name and
renamed, and the manifest comes last, so an interrupted write never looks like a complete cache.

Log-probs can be stored as float32, float16 or bfloat16 (bfloat16 as its 16 raw bits); ids are
int32. ``bytes_per_token`` reports the on-disk size per cached position.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np

from distill_jax.losses import topk

MANIFEST = "manifest.json"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
FORMAT_VERSION = 1


def batch_hash(input_ids: np.ndarray) -> np.ndarray:
    """[32] uint8 sha256 of a batch's input ids (int32 little-endian)."""
    data = np.ascontiguousarray(np.asarray(input_ids, "<i4")).tobytes()
    return np.frombuffer(hashlib.sha256(data).digest(), np.uint8)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TeacherCacheWriter:
    """Collects (batch, SparseTeacher) pairs and writes them in shards of ``batches_per_shard``.

    Args:
        directory: the cache directory (created).
        settings: what the cache is for: teacher, tokenizer, k, temperature and data settings
            (see ``teachers.build_teacher_cache``); stored in the manifest and checked on read.
        dtype: storage dtype of the log-probs, a key of ``DTYPES``.
        process_index, process_count: each process writes the shards of its own batches.
    """

    def __init__(
        self,
        directory: str,
        settings: dict,
        *,
        dtype: str = "bfloat16",
        batches_per_shard: int = 64,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"teacher cache dtype={dtype!r}: choose one of {sorted(DTYPES)}.")
        os.makedirs(directory, exist_ok=True)
        self.directory, self.dtype, self.batches_per_shard = directory, dtype, batches_per_shard
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.settings = dict(settings, dtype=dtype, format_version=FORMAT_VERSION)
        self._pending: list[dict[str, np.ndarray]] = []
        self._shards: list[dict] = []
        self._bytes = 0
        self._positions = 0

    def add(self, batch: dict[str, np.ndarray], sparse: topk.SparseTeacher) -> None:
        """Append one batch's teacher top-k ([B, L, K]) aligned with ``batch["input_ids"]``."""
        ids = np.asarray(batch["input_ids"])
        tau = float(np.asarray(sparse.temperature))
        if self.settings.setdefault("temperature", tau) != tau:
            raise ValueError(
                f"The teacher cache holds top-k at temperature {self.settings['temperature']}; "
                f"this batch's is at {tau}. One cache, one temperature."
            )
        if sparse.ids.shape[:2] != ids.shape:
            raise ValueError(
                f"Teacher top-k {sparse.ids.shape} does not match the batch {ids.shape}."
            )
        self._pending.append(
            dict(
                ids=np.asarray(sparse.ids, np.int32),
                logprobs=np.asarray(sparse.logprobs, np.float32).astype(DTYPES[self.dtype]),
                log_normalizer=np.asarray(sparse.log_normalizer, np.float32),
                log_tail=np.asarray(sparse.log_tail, np.float32),
                input_hash=batch_hash(ids),
            )
        )
        self._positions += ids.size
        if len(self._pending) == self.batches_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"p{self.process_index:03d}-{len(self._shards):05d}.npz"
        arrays = {k: np.stack([p[k] for p in self._pending]) for k in self._pending[0]}
        if self.dtype == "bfloat16":  # npz cannot store bfloat16: keep its raw 16 bits
            arrays["logprobs"] = arrays["logprobs"].view(np.uint16)
        path = os.path.join(self.directory, name)
        _atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
        self._bytes += os.path.getsize(path)
        self._shards.append({"file": name, "num_batches": len(self._pending)})
        self._pending = []

    def close(self) -> dict:
        """Write the last shard and this process's manifest entry; returns the manifest."""
        self._flush()
        manifest = {
            "settings": self.settings,
            "process_count": self.process_count,
            "shards": {str(self.process_index): self._shards},
            "bytes": {str(self.process_index): self._bytes},
            "positions": {str(self.process_index): self._positions},
        }
        name = MANIFEST if self.process_count == 1 else f"manifest.p{self.process_index:03d}.json"
        path = os.path.join(self.directory, name)
        _atomic_write(path, lambda tmp: _write_json(tmp, manifest))
        return manifest


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


class TeacherCache:
    """A written cache, read back for this process's batches.

    Raises:
        FileNotFoundError: no (complete) cache in ``directory``.
    """

    def __init__(self, directory: str, process_index: int | None = None):
        self.directory = directory
        p = jax.process_index() if process_index is None else process_index
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            path = os.path.join(directory, f"manifest.p{p:03d}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No complete teacher cache in {directory!r} (no {MANIFEST}); write it with "
                "teachers.build_teacher_cache, or finish the interrupted write."
            )
        with open(path) as f:
            self.manifest = json.load(f)
        self.settings = self.manifest["settings"]
        self._shards = self.manifest["shards"][str(p)]
        self._offsets = np.cumsum([0] + [s["num_batches"] for s in self._shards])
        self._loaded: tuple[int, dict] | None = None
        self.bytes_per_token = self.manifest["bytes"][str(p)] / max(
            self.manifest["positions"][str(p)], 1
        )

    @property
    def num_batches(self) -> int:
        return int(self._offsets[-1])

    def check(self, **expected) -> None:
        """Raise if any expected setting differs from the cache's, naming every difference."""
        diffs = [
            f"{k}: cache has {self.settings.get(k)!r}, this run has {v!r}"
            for k, v in expected.items()
            if self.settings.get(k) != v
        ]
        if diffs:
            raise ValueError(
                f"The teacher cache in {self.directory!r} was written with other settings ("
                + "; ".join(diffs)
                + "); rebuild the cache for this run or use matching settings."
            )

    def check_run(self, *, steps: int, **config) -> None:
        """Refuse a cache that cannot serve a run of ``steps`` optimizer steps: fewer batches
        than steps (``CachedTeacherSource`` reads one batch per step; micro-batches split it
        inside the step), or a setting the config names (``k``, ``temperature``, ``dtype``;
        None: not set, the cache's is used) that differs from the cache's."""
        if self.num_batches < steps:
            raise ValueError(
                f"The teacher cache in {self.directory!r} holds {self.num_batches} batches but "
                f"train.steps={steps} reads {steps} (one per step); rebuild it with --mode=cache "
                f"--config.train.steps={steps}, or run at most {self.num_batches} steps."
            )
        diffs = [
            f"teacher.{name}={value!r} but the cache has {self.settings.get(key)!r}"
            for (name, key), value in zip(
                (("k", "k"), ("cache_temperature", "temperature"), ("cache_dtype", "dtype")),
                (config.get("k"), config.get("temperature"), config.get("dtype")),
            )
            if value is not None and self.settings.get(key) != value
        ]
        if diffs:
            raise ValueError(
                f"The teacher cache in {self.directory!r} was written with other settings ("
                + "; ".join(diffs)
                + "); rebuild it with --mode=cache for these settings, or drop them from "
                "config.teacher to use the cache's."
            )

    def expected_shapes(self, num_batches: int) -> dict[str, tuple]:
        """{array: shape} a shard of ``num_batches`` batches holds by the manifest: ids and
        logprobs [n, B, L, K], log_normalizer and log_tail [n, B, L], input_hash [n, 32]; B and
        L are None when the manifest has no data settings (then not checked)."""
        data, k = self.settings.get("data") or {}, int(self.settings["k"])
        processes = int(self.manifest.get("process_count", 1))
        b = data.get("global_batch_size")
        b = None if b is None else int(b) // processes
        n, seq = num_batches, data.get("seq_len")
        return dict(
            ids=(n, b, seq, k),
            logprobs=(n, b, seq, k),
            log_normalizer=(n, b, seq),
            log_tail=(n, b, seq),
            input_hash=(n, 32),
        )

    def check_arrays(self) -> None:
        """Every shard file holds the arrays the manifest describes, of its shapes (read from
        the .npy headers inside each .npz; no array is loaded).

        Raises:
            FileNotFoundError: a shard file is missing.
            ValueError: an array is missing or its shape differs, naming file, array and both
                shapes.
        """
        for shard in self._shards:
            path = os.path.join(self.directory, shard["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"The teacher cache in {self.directory!r} lists {shard['file']} but the file "
                    "is missing; rebuild the cache with --mode=cache."
                )
            found = npz_shapes(path)
            for name, want in self.expected_shapes(int(shard["num_batches"])).items():
                got = found.get(name)
                ok = got is not None and len(got) == len(want)
                if not ok or any(w is not None and g != w for g, w in zip(got, want)):
                    raise ValueError(
                        f"{path}: {name} has shape {got} but the manifest says "
                        f"{tuple('?' if w is None else w for w in want)} (batches, rows, "
                        "positions, k); the file is not the one this manifest was written with: "
                        "rebuild the cache with --mode=cache."
                    )

    def _shard(self, i: int) -> tuple[dict, int]:
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        if self._loaded is None or self._loaded[0] != s:
            with np.load(os.path.join(self.directory, self._shards[s]["file"])) as data:
                arrays = {k: data[k] for k in data.files}
            if self.settings["dtype"] == "bfloat16":
                arrays["logprobs"] = arrays["logprobs"].view(ml_dtypes.bfloat16)
            self._loaded = (s, arrays)
        return self._loaded[1], i - int(self._offsets[s])

    def get(self, index: int, batch: dict[str, np.ndarray] | None = None) -> topk.SparseTeacher:
        """The SparseTeacher [B, L, K] (log-probs as float32) of batch ``index``.

        Args:
            index: the batch's position in this process's stream (the data iterator's count).
            batch: if given, its input_ids must be the ones the cache was written for.
        """
        if not 0 <= index < self.num_batches:
            raise IndexError(f"Batch {index} is not in the cache ({self.num_batches} batches).")
        arrays, j = self._shard(index)
        if batch is not None and not np.array_equal(
            arrays["input_hash"][j], batch_hash(batch["input_ids"])
        ):
            raise ValueError(
                f"Batch {index} is not the batch the teacher cache was written for (input ids "
                "differ): the data order, tokenizer or packing changed since the cache was built."
            )
        # Host arrays: the trainer places them on the devices with the rest of the batch.
        return topk.SparseTeacher(
            ids=np.asarray(arrays["ids"][j]),
            logprobs=np.asarray(arrays["logprobs"][j], np.float32),
            log_normalizer=np.asarray(arrays["log_normalizer"][j]),
            log_tail=np.asarray(arrays["log_tail"][j]),
            temperature=np.float32(self.settings["temperature"]),
        )


def npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{array name: shape} of an .npz file from its members' .npy headers (nothing loaded)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.endswith(".npy"):
                continue
            with z.open(member) as f:
                fmt = np.lib.format
                v1 = fmt.read_magic(f) == (1, 0)
                shape, _, _ = (fmt.read_array_header_1_0 if v1 else fmt.read_array_header_2_0)(f)
            out[member[: -len(".npy")]] = tuple(shape)
    return out
