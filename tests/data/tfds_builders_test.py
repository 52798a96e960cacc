"""tfds builders over local corpora: prepared offline into a temp data_dir, read back exactly.

Each prepared split is compared with the corpus read independently (kjv.jsonl via json.loads,
reasoning-gym's generator, the files written here) and split with ``held_out_split``.
"""

from __future__ import annotations

import json

import pytest

from distill_jax.data import sources, tfds_builders  # noqa: E402
from distill_jax.data.tfds_builders import LocalCorpus, LocalCorpusConfig  # noqa: E402


def _prepare(config, data_dir) -> dict[str, list[dict[str, str]]]:
    """Builds ``config`` into ``data_dir``; both splits as lists of str-valued dicts."""
    builder = LocalCorpus(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return {
        split: [
            {k: v.decode("utf-8") for k, v in example.items()}
            for example in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()
        ]
        for split in ("train", "validation")
    }


def _expected(records, fraction=0.02, seed=0) -> dict[str, list]:
    train, validation = sources.held_out_split(records, fraction=fraction, seed=seed)
    return {"train": train, "validation": validation}


def test_kjv_builder_holds_the_chapters_of_kjv_jsonl(tmp_path):
    chapters: dict[str, list[str]] = {}
    with open(sources.kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    records = [{"chapter": name, "text": " ".join(v)} for name, v in chapters.items()]
    splits = _prepare("kjv", tmp_path)
    assert splits == _expected(records)
    assert len(splits["train"]) == 1165 and len(splits["validation"]) == 24
    builder = LocalCorpus(config="kjv", data_dir=str(tmp_path))  # found again, not rebuilt
    assert builder.info.splits["validation"].num_examples == 24


def test_gsm_builder_holds_reasoning_gym_problems(tmp_path):
    import reasoning_gym

    config = LocalCorpusConfig(
        name="gsm_small", kind="gsm_symbolic", num_problems=40, generator_seed=5, seed=2
    )
    generated = list(reasoning_gym.create_dataset("gsm_symbolic", size=40, seed=5))
    assert len({g["question"] for g in generated}) == 40  # no repeat: gsm_problems is this
    records = [
        {"question": g["question"], "answer": g["answer"], "solution": g["metadata"]["answer_cot"]}
        for g in generated
    ]
    assert _prepare(config, tmp_path) == _expected(records, seed=2)


def test_botchan_builder_holds_the_paragraphs_of_the_file(tmp_path):
    path = sources.botchan_path()
    with open(path, encoding="utf-8-sig") as f:
        text = f.read().replace("\r\n", "\n").rstrip("\n")
    paragraphs = sources.botchan_paragraphs()
    assert "\n".join(paragraphs) == text  # the paragraphs are the file, cut at line breaks
    config = LocalCorpusConfig(name="botchan_5pc", kind="botchan", fraction=0.05, seed=1)
    splits = _prepare(config, tmp_path)
    assert splits == _expected([{"text": p} for p in paragraphs], fraction=0.05, seed=1)
    assert len(splits["validation"]) == round(0.05 * len(paragraphs))


def test_text_and_jsonl_builders_read_local_files(tmp_path):
    docs_dir = tmp_path / "docs"
    docs_dir.mkdir()
    paragraphs = [f"Paragraph {i} line one\nline two of {i}" for i in range(30)]
    (docs_dir / "a.txt").write_text("\n\n".join(paragraphs[:20]) + "\n")
    (docs_dir / "b.txt").write_text(
        "\r\n\r\n".join(p.replace("\n", "\r\n") for p in paragraphs[20:])
    )
    config = LocalCorpusConfig(name="docs", kind="text", paths=(str(docs_dir / "*.txt"),), seed=4)
    assert _prepare(config, tmp_path) == _expected([{"text": p} for p in paragraphs], seed=4)

    objects = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i), "text": "é" * (i + 1)}
               for i in range(25)]  # fmt: skip
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    pairs = LocalCorpusConfig(name="pairs", kind="jsonl_pairs", paths=str(jsonl), fraction=0.2)
    assert _prepare(pairs, tmp_path) == _expected(
        [{"prompt": o["prompt"], "response": o["response"]} for o in objects], fraction=0.2
    )
    texts = LocalCorpusConfig(name="texts", kind="jsonl", paths=(str(jsonl),), fraction=0.2)
    assert _prepare(texts, tmp_path) == _expected([{"text": o["text"]} for o in objects], 0.2)


def test_bad_configs_and_inputs_raise_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="kind 'csv' is not one of"):
        LocalCorpusConfig(name="bad", kind="csv")
    with pytest.raises(ValueError, match="'nopaths' of kind 'text' needs paths"):
        LocalCorpusConfig(name="nopaths", kind="text")
    missing = LocalCorpusConfig(name="missing", kind="text", paths=(str(tmp_path / "gone.txt"),))
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        LocalCorpus(config=missing, data_dir=str(tmp_path)).download_and_prepare()
    (tmp_path / "empty.jsonl").write_text("\n")
    empty = LocalCorpusConfig(name="empty", kind="jsonl", paths=(str(tmp_path / "empty.jsonl"),))
    with pytest.raises(ValueError, match=r"empty\.jsonl.*holds no documents"):
        LocalCorpus(config=empty, data_dir=str(tmp_path)).download_and_prepare()
    assert tfds_builders.KINDS == ("text", "jsonl", "jsonl_pairs", "kjv", "botchan", "gsm_symbolic")
