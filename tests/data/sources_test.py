"""Corpora (plain text, JSON lines, KJV, Botchan, GSM problems), their errors and held-out splits.

References are read directly: kjv.jsonl with json.loads, botchan.txt as bytes, reasoning-gym's
own generator, and hand-written expectations for the small files written here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from distill_jax.data import sources


@pytest.fixture(scope="module")
def botchan_file():
    """Path of the cached botchan.txt (``make install`` prefetches it; a failed download fails
    the test with the pip command, never skips it)."""
    return sources.botchan_path()


def test_kjv_chapters_hold_every_verse_in_order():
    chapters = sources.kjv_chapters()
    assert chapters[0][0] == "Genesis 1"
    assert chapters[0][1].startswith("In the beginning God created the heaven and the earth. And")
    with open(sources.kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f]
    assert sum(len(text) for _, text in chapters) == sum(map(len, verses)) + len(verses) - len(
        chapters
    )
    assert len(chapters) == 1189  # chapters in the Protestant canon


def test_held_out_split_is_seeded_disjoint_and_complete():
    items = list(range(1000))
    train, held = sources.held_out_split(items, fraction=0.05, seed=3)
    assert len(held) == 50 and sorted(train + held) == items
    assert sources.held_out_split(items, fraction=0.05, seed=3) == (train, held)
    assert sources.held_out_split(items, fraction=0.05, seed=4)[1] != held


def test_split_corpus_names_the_splits_and_needs_two_documents():
    splits = sources.split_corpus(list("abcdefghij"), fraction=0.2, seed=1)
    assert (splits["train"], splits["validation"]) == sources.held_out_split(
        list("abcdefghij"), fraction=0.2, seed=1
    )
    with pytest.raises(ValueError, match="my corpus has 1 document"):
        sources.split_corpus(["only"], source="my corpus")


def test_text_documents_split_at_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_bytes(
        b"\xef\xbb\xbfFirst line\r\nsecond line\r\n\r\n  \t \r\n\r\nThird  paragraph \n\n\n"
    )
    (tmp_path / "b.txt").write_text("\nOne more\n   indented\n")
    (tmp_path / "skip.md").write_text("not matched")
    expected = ["First line\nsecond line", "Third  paragraph ", "One more\n   indented"]
    assert sources.text_documents(tmp_path / "a.txt") == expected[:2]
    assert sources.text_documents(str(tmp_path / "*.txt")) == expected
    assert sources.text_documents([tmp_path / "b.txt", tmp_path / "a.txt"]) == [
        expected[2],
        *expected[:2],
    ]
    assert sources.text_documents(str(tmp_path / "*.txt"), one_per_file=True) == [
        "First line\nsecond line\n\n  \t \n\nThird  paragraph",
        "One more\n   indented",
    ]


def test_jsonl_fields_equal_json_loads(tmp_path):
    objects = [
        {"text": "Alpha\nbeta", "prompt": "2+2?", "response": "4", "id": 1},
        {"text": " x ", "prompt": "Capital of France?", "response": "Paris"},
        {"text": "ünïcode ✓", "prompt": "p", "response": "r"},
    ]
    lines = [json.dumps(o, ensure_ascii=i % 2 == 0) for i, o in enumerate(objects)]
    path = tmp_path / "data.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    assert sources.jsonl_documents(path) == [o["text"] for o in objects]
    assert sources.jsonl_records(str(path), ["prompt", "response"]) == [
        {"prompt": o["prompt"], "response": o["response"]} for o in objects
    ]


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        sources.text_documents(missing)
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl"):
        sources.jsonl_documents(str(tmp_path / "*.jsonl"))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        sources.text_documents(tmp_path)


def test_empty_corpora_name_the_source_and_the_fix(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    with pytest.raises(ValueError, match=r"blank\.txt.*holds no documents.*whitespace only"):
        sources.text_documents(blank)
    with pytest.raises(ValueError, match=r"blank\.txt.*holds no documents"):
        sources.text_documents(blank, one_per_file=True)
    with pytest.raises(ValueError, match=r"blank\.txt.*holds no documents.*no non-blank lines"):
        sources.jsonl_documents(blank)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"bad\.jsonl:2: not valid JSON"),
        ('["text"]', r"bad\.jsonl:2: expected a JSON object, got list"),
        ('{"body": "x"}', r"bad\.jsonl:2: no field 'text'; the object has \['body'\]"),
        ('{"text": 3}', r"bad\.jsonl:2: field 'text' is int, not a string"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        sources.jsonl_documents(path)


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\n\nalso fine\n" + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:4: not UTF-8 text \(byte 0xe9 at col"):
        sources.text_documents(path)
    documents, report = sources.read_text_documents(path, bad_records="skip")
    assert documents == ["fine"] and report.skipped == 1 and "latin1.txt:4" in report.first


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "\\ud800 half a pair"}', r"bad\.jsonl:3: field 'text' holds a lone surrogate"),
        ('{"text": "  \\n\\t "}', r"bad\.jsonl:3: field 'text' is empty after stripping"),
        ('{"text": ["a"]}', r"bad\.jsonl:3: field 'text' is list, not a string"),
    ],
)
def test_bad_records_name_file_and_line_or_are_skipped_and_counted(tmp_path, line, message):
    """A lone surrogate passes json.loads but is not text: refused at load with file:line (not
    when a tokenizer meets it), like a non-string or a blank field; "skip" leaves such records
    out and counts them."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n' + line + '\n{"text": "four"}\n')
    assert json.loads(line)  # valid JSON
    with pytest.raises(ValueError, match=message + ".*data.bad_records='skip'"):
        sources.jsonl_documents(path)
    records, report = sources.read_jsonl(path, ["text"], bad_records="skip")
    assert [r["text"] for r in records] == ["one", "two", "four"]
    assert report.skipped == 1 and re.search(message, report.first)
    with pytest.raises(ValueError, match="bad_records='maybe'"):
        sources.read_jsonl(path, ["text"], bad_records="maybe")


def test_all_records_bad_and_empty_fields_that_may_be_empty(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(b'{"p": "\\udfff", "c": "x"}\n\xff\n')
    with pytest.raises(ValueError, match=r"all 2 were bad and skipped .*all_bad\.jsonl:1"):
        sources.read_jsonl(path, ["p", "c"], bad_records="skip")
    with pytest.raises(ValueError, match=r"all_bad\.jsonl:2: not UTF-8 text \(byte 0xff"):
        sources.read_jsonl(path, ["c"])
    path.write_text('{"p": "q", "c": ""}\n')
    with pytest.raises(ValueError, match="field 'c' is empty"):
        sources.read_jsonl(path, ["p", "c"])
    assert sources.read_jsonl(path, ["p", "c"], blank_ok=["c"])[0] == [{"p": "q", "c": ""}]


def test_glob_characters_in_an_existing_file_name(tmp_path):
    path = tmp_path / "run[0].jsonl"
    path.write_text('{"text": "a"}\n')
    assert sources.jsonl_documents(str(path)) == ["a"]


def test_botchan_paragraphs_rejoin_to_the_file(botchan_file):
    with open(botchan_file, "rb") as f:
        raw = f.read()
    assert raw.startswith(b"\xef\xbb\xbfProject Gutenberg's Botchan") and b"\r\n" in raw
    text = raw.decode("utf-8")[1:].replace("\r\n", "\n").rstrip("\n")
    paragraphs = sources.botchan_paragraphs()
    assert "\n".join(paragraphs) == text
    assert 600 < len(paragraphs) < 800
    assert all(p.strip() for p in paragraphs)
    assert "CHAPTER I" in paragraphs and "CHAPTER XI." in paragraphs
    assert '"Rather dull? See if they don\'t cut!" I retorted.' in paragraphs
    (start,) = [p for p in paragraphs if p.startswith("Because of an hereditary recklessness")]
    assert start.endswith('by jumping only from a second story!"')


def test_gsm_problems_equal_reasoning_gym():
    import reasoning_gym

    problems = sources.gsm_problems(40, seed=5)
    reference = list(reasoning_gym.create_dataset("gsm_symbolic", size=40, seed=5))
    assert len({r["question"] for r in reference}) == 40  # no repeat: a plain prefix
    assert problems == [
        {
            "question": r["question"],
            "answer": r["answer"],
            "solution": r["metadata"]["answer_cot"],
        }
        for r in reference
    ]
    assert all(p["solution"].rstrip().split("#### ")[-1].startswith(p["answer"]) for p in problems)
    assert sources.gsm_problems(20, seed=5) == problems[:20]


def test_gsm_problems_are_distinct_and_exactly_n():
    problems = sources.gsm_problems(1000, seed=0)  # reasoning-gym repeats one question here
    assert len(problems) == 1000 and len({p["question"] for p in problems}) == 1000
    with pytest.raises(ValueError, match="n >= 1"):
        sources.gsm_problems(0)


@pytest.mark.parametrize("corpus", ["kjv", "botchan", "gsm"])
def test_every_corpus_has_a_seeded_held_out_split(corpus, request):
    if corpus == "kjv":
        items = [text for _, text in sources.kjv_chapters()]
    elif corpus == "botchan":
        request.getfixturevalue("botchan_file")
        items = sources.botchan_paragraphs()
    else:
        items = [p["question"] for p in sources.gsm_problems(500, seed=1)]
    items = list(enumerate(items))  # a corpus may repeat a text (Botchan: '"Yes."')
    splits = sources.split_corpus(items, fraction=0.05, seed=7)
    train, validation = splits["train"], splits["validation"]
    assert len(validation) == round(len(items) * 0.05)
    assert set(train).isdisjoint(validation) and len(train) + len(validation) == len(items)
    assert sources.split_corpus(items, fraction=0.05, seed=7) == splits


def test_importing_the_package_does_not_import_tensorflow():
    code = (
        "import sys, distill_jax, distill_jax.data, distill_jax.data.sources; "
        "assert not {'tensorflow', 'seqio', 'tensorflow_datasets'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
