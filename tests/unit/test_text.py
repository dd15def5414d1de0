"""Text for language models: tokenizers, streaming decode, packing, unigram baseline, chat
template and the saved TextPreprocessor."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer as Library
from tokenizers import decoders, models, pre_tokenizers, trainers

from kiln.config.spec import DataSpec, TokenizerSpec
from kiln.data.text import (
    DEFAULT_CHAT_TEMPLATE,
    EOS_TOKEN,
    IGNORE_INDEX,
    BPETokenizer,
    ByteTokenizer,
    ChatTemplate,
    FileTokenizer,
    TextPreprocessor,
    Tokenizer,
    build_text_preprocessor,
    build_tokenizer,
    pack_documents,
    take_megabytes,
    token_counts,
    tokenizer_from_dict,
    unigram_perplexity,
)
from kiln.errors import DataError

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "# Grüße aus Köln: naïve café, 東京, Ελληνικά 😀🚀\nprint('héllo wörld')\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
] * 20
SAMPLES = [
    "plain ascii",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "mixed\ttabs\n  and   spaces\r\n",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


def _save_metaspace_tokenizer(path: Path) -> Path:
    """A sentencepiece-style tokenizer.json (▁ for spaces, </s> as end of text), as a user
    might bring beside a checkpoint."""
    library = Library(models.BPE(unk_token="<unk>"))
    library.pre_tokenizer = pre_tokenizers.Metaspace()
    library.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False
    )
    library.train_from_iterator(CORPUS + SAMPLES, trainer)
    library.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory, bpe: BPETokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe.tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def metaspace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_metaspace_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(params=["byte", "bpe", "file"])
def tokenizer(request: pytest.FixtureRequest, bpe: BPETokenizer, bpe_file: Path) -> Tokenizer:
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "bpe":
        return bpe
    return FileTokenizer.from_file(bpe_file)


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size and i != tokenizer.eos_id for i in ids)
    assert tokenizer.encode_batch([text, "x"]) == [ids, tokenizer.encode("x")]


def test_byte_ids_are_utf8_bytes() -> None:
    tok = ByteTokenizer()
    assert tok.encode("é😀") == list("é😀".encode())
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([0xC3, 0xA9, 256, 0x41]) == "é" + EOS_TOKEN + "A"
    assert tok.decode([0xE2, 0x82, 0x41]) == "\ufffdA"  # truncated sequence -> U+FFFD
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])


def test_text_never_forges_end_of_text(tokenizer: Tokenizer) -> None:
    text = f"a{EOS_TOKEN}b"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*tokenizer.encode("a"), tokenizer.eos_id]) == "a" + EOS_TOKEN


def test_bpe_compresses_and_round_trips(bpe: BPETokenizer) -> None:
    text = "def add(a, b):\n    return a + b\nclass Point:\n    pass\n"
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode()) / 2
    assert bpe.decode(ids) == text
    assert bpe.eos_id == bpe.tokenizer.token_to_id(EOS_TOKEN)
    assert 258 < bpe.vocab_size <= 400
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        BPETokenizer.train(CORPUS, vocab_size=257)


def test_bpe_unseen_characters_still_round_trip(bpe: BPETokenizer) -> None:
    text = "Ωmega ∑ 🦀 ǅ"  # bytes never seen in training fall back to byte symbols
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("kind", ["byte", "bpe", "file"])
def test_to_dict_round_trip_is_json_and_equal(kind: str, bpe: BPETokenizer, bpe_file: Path) -> None:
    tok: Tokenizer = {
        "byte": ByteTokenizer(),
        "bpe": bpe,
        "file": FileTokenizer.from_file(bpe_file),
    }[kind]
    document = json.loads(json.dumps(tok.to_dict()))
    rebuilt = tokenizer_from_dict(document)
    assert type(rebuilt) is type(tok) and rebuilt == tok
    assert (rebuilt.vocab_size, rebuilt.eos_id) == (tok.vocab_size, tok.eos_id)
    for text in [*SAMPLES, EOS_TOKEN]:
        assert rebuilt.encode(text) == tok.encode(text)


def test_pickle_keeps_behaviour(bpe: BPETokenizer) -> None:
    # Ray ships preprocessors to workers by pickling them
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone == bpe
    assert clone.encode(EOS_TOKEN) == bpe.encode(EOS_TOKEN)
    assert clone.eos_id not in clone.encode(EOS_TOKEN)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "tokenizer.kind is missing"),
        ({"kind": "wordpiece"}, "is not byte, bpe or file"),
        ({"kind": "bpe"}, "tokenizer.tokenizer is missing"),
        ({"kind": "bpe", "tokenizer": {"model": 3}}, "tokenizer.tokenizer is invalid"),
    ],
)
def test_tokenizer_from_dict_errors(document: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        tokenizer_from_dict(document)


# ----------------------------------------------------------------------------------------------
# FileTokenizer


def test_file_tokenizer_finds_its_end_of_text(metaspace_file: Path) -> None:
    tok = FileTokenizer.from_file(metaspace_file)
    assert tok.eos_token == "</s>"
    assert tok.eos_id == tok.tokenizer.token_to_id("</s>")
    text = "print('héllo wörld') 😀"
    assert tok.decode(tok.encode(text)) == text
    assert tok.to_dict()["source"] == str(metaspace_file)


def test_file_tokenizer_explicit_eos(bpe_file: Path) -> None:
    tok = FileTokenizer.from_file(bpe_file, eos_token=EOS_TOKEN)
    assert tok.eos_id == tok.tokenizer.token_to_id(EOS_TOKEN)
    with pytest.raises(DataError, match=r"data\.tokenizer\.eos_token: '<s>' is not a token of"):
        FileTokenizer.from_file(bpe_file, eos_token="<s>")


def test_file_tokenizer_without_known_eos(tmp_path: Path) -> None:
    library = Library(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    library.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        DataError, match=r"tokenizer\.json has none of .*data\.tokenizer\.eos_token"
    ):
        FileTokenizer.from_file(tmp_path / "tokenizer.json")


def test_file_tokenizer_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.tokenizer\.path: .*missing\.json does not exist"):
        FileTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is not a tokenizer\.json"):
        FileTokenizer.from_file(tmp_path / "bad.json")


def test_build_tokenizer_from_spec(bpe_file: Path) -> None:
    assert isinstance(build_tokenizer(TokenizerSpec()), ByteTokenizer)
    spec = TokenizerSpec(kind="bpe", vocab_size=300, min_frequency=1)
    built = build_tokenizer(spec, iter(CORPUS))
    assert isinstance(built, BPETokenizer) and built.vocab_size == 300
    file = build_tokenizer(TokenizerSpec(kind="file", path=str(bpe_file)))
    assert isinstance(file, FileTokenizer) and file.eos_token == EOS_TOKEN
    with pytest.raises(DataError, match="data.tokenizer: bpe found no text"):
        build_tokenizer(spec, iter(["", ""]))


def test_build_text_preprocessor_caps_the_bpe_sample() -> None:
    data = DataSpec(
        train="x",
        validation="y",
        task="language_modeling",
        text="body",
        block_size=16,
        tokenizer=TokenizerSpec(kind="bpe", vocab_size=300, train_sample_mb=1e-5),
    )
    seen: list[str] = []

    def texts() -> object:
        for text in CORPUS:
            seen.append(text)
            yield text

    pre = build_text_preprocessor(data, texts())  # type: ignore[arg-type]
    assert len(seen) == 1  # 10 bytes of budget: the first document crosses it
    assert pre.block_size == 16 and pre.text_column == "body"
    assert isinstance(pre.tokenizer, BPETokenizer)


def test_take_megabytes_stops_after_the_budget() -> None:
    texts = ["aaaa", None, "", "bbbb", "cccc"]
    assert list(take_megabytes(texts, 6e-6)) == ["aaaa", "bbbb"]
    assert list(take_megabytes(texts, 1.0)) == ["aaaa", "bbbb", "cccc"]


# ----------------------------------------------------------------------------------------------
# Streaming decoder


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", [*SAMPLES, "".join(SAMPLES)])
def test_stream_equals_one_shot_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = [*tokenizer.encode(text), tokenizer.eos_id, *tokenizer.encode("ünd 😀")]
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)  # never a half character


def test_stream_of_random_ids_equals_decode(tokenizer: Tokenizer) -> None:
    # arbitrary ids include invalid and truncated UTF-8; the stream must still agree
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, tokenizer.vocab_size, size=int(rng.integers(1, 30))).tolist()
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_stream_with_metaspace_file_tokenizer(metaspace_file: Path) -> None:
    tok = FileTokenizer.from_file(metaspace_file)
    text = "for i in range(10): print('Köln 😀')"
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert sum(bool(p) for p in pieces) > 3  # it streams, not all at the end


def test_byte_stream_holds_back_split_characters() -> None:
    tok = ByteTokenizer()
    decoder = tok.decoder()
    emoji = list("😀".encode())
    assert [decoder.push(b) for b in emoji] == ["", "", "", "😀"]
    assert decoder.push(0xC3) == ""
    assert decoder.flush() == "\ufffd"  # an unfinished character at the end


def test_byte_stream_invalid_utf8_matches_decode() -> None:
    tok = ByteTokenizer()
    ids = [0xE2, 0x82, 0x41, 0xFF, 0xC3, 256, 0xC3, 0xA9, 0xF0, 0x9F]
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_bpe_stream_of_invalid_prefix_matches_decode(bpe: BPETokenizer) -> None:
    emoji = bpe.encode("😀")
    pieces = _stream(bpe, emoji[:1] + bpe.encode("abc"))
    assert "".join(pieces) == bpe.decode(emoji[:1] + bpe.encode("abc"))


# ----------------------------------------------------------------------------------------------
# Packing


def _stream_of(tok: Tokenizer, texts: list[str | None]) -> list[int]:
    stream: list[int] = []
    for text in texts:
        if text:
            stream += [*tok.encode(text), tok.eos_id]
    return stream


@pytest.mark.parametrize("block_size", [1, 2, 7, 64, 1000])
def test_packing_targets_every_token_exactly_once(tokenizer: Tokenizer, block_size: int) -> None:
    texts: list[str | None] = [*SAMPLES, None, *CORPUS[:6]]
    packed = pack_documents(texts, tokenizer, block_size)
    stream = _stream_of(tokenizer, texts)
    inputs, labels = packed["input_ids"], packed["labels"]
    rows = math.ceil((len(stream) - 1) / block_size)
    assert inputs.shape == labels.shape == (rows, block_size)
    assert inputs.dtype == labels.dtype == np.int32
    flat_inputs, flat_labels = inputs.reshape(-1), labels.reshape(-1)
    targets = flat_labels != IGNORE_INDEX
    assert flat_labels[targets].tolist() == stream[1:]  # each once, in order
    assert flat_inputs[targets].tolist() == stream[:-1]  # each target follows its input
    assert not targets[len(stream) - 1 :].any()  # padding only at the very end
    assert (flat_inputs[len(stream) - 1 :] == tokenizer.eos_id).all()


def test_packing_small_example_by_hand() -> None:
    packed = pack_documents(["ab", None, "", "c"], ByteTokenizer(), 3)
    assert packed["input_ids"].tolist() == [[97, 98, 256], [99, 256, 256]]
    assert packed["labels"].tolist() == [[98, 256, 99], [256, -100, -100]]


@pytest.mark.parametrize("texts", [[], [None, ""], pa.array([], pa.string())])
def test_packing_empty_input(tokenizer: Tokenizer, texts: object) -> None:
    packed = pack_documents(texts, tokenizer, 8)  # type: ignore[arg-type]
    assert packed["input_ids"].shape == packed["labels"].shape == (0, 8)
    assert packed["input_ids"].dtype == np.int32


def test_packing_arrow_matches_python_lists(tokenizer: Tokenizer) -> None:
    texts = ["héllo", None, "", "wörld 😀", "x" * 50, None]
    expected = pack_documents(texts, tokenizer, 5)
    arrays = [
        pa.array(texts, pa.string()),
        pa.array(texts, pa.large_string()),
        pa.chunked_array([pa.array(texts[:3]), pa.array(texts[3:])]),
        pa.array(["skipped", *texts], pa.string()).slice(1),  # a non-zero array offset
        pa.array(texts).dictionary_encode(),
    ]
    for array in arrays:
        packed = pack_documents(array, tokenizer, 5)
        assert np.array_equal(packed["input_ids"], expected["input_ids"]), array.type
        assert np.array_equal(packed["labels"], expected["labels"]), array.type


def test_packing_rejects_non_text(tokenizer: Tokenizer) -> None:
    with pytest.raises(DataError, match="not string"):
        pack_documents(pa.array([1, 2]), tokenizer, 4)


# ----------------------------------------------------------------------------------------------
# Unigram baseline


def test_token_counts_skip_padding() -> None:
    labels = np.array([[1, 2, 2], [0, -100, -100]], dtype=np.int32)
    assert token_counts(labels, 4).tolist() == [1, 1, 2, 0]
    assert token_counts(labels, 4).dtype == np.int64
    with pytest.raises(ValueError, match="outside 0..1"):
        token_counts(labels, 2)


def test_unigram_perplexity_by_hand() -> None:
    # add-one smoothing: train [3, 1, 0] -> p = [4/7, 2/7, 1/7]; validation targets 0, 1, 2, 2
    ppl = unigram_perplexity(np.array([3, 1, 0]), np.array([1, 1, 2]))
    by_hand = (7**4 / (4 * 2 * 1 * 1)) ** (1 / 4)  # exp(-mean log p) = (prod 1/p)^(1/4)
    assert ppl == pytest.approx(by_hand, rel=1e-12)
    assert ppl == pytest.approx(4.16222490, rel=1e-8)


def test_unigram_perplexity_uniform_and_errors() -> None:
    assert unigram_perplexity(np.zeros(257), np.ones(257)) == pytest.approx(257.0)
    with pytest.raises(ValueError, match="no targets"):
        unigram_perplexity(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="one length"):
        unigram_perplexity(np.ones(3), np.ones(4))


def test_unigram_on_packed_text_beats_uniform() -> None:
    tok = ByteTokenizer()
    train = token_counts(pack_documents(CORPUS, tok, 32)["labels"], tok.vocab_size)
    val = token_counts(pack_documents(CORPUS[:4], tok, 32)["labels"], tok.vocab_size)
    assert 1.0 < unigram_perplexity(train, val) < 60.0 < tok.vocab_size


# ----------------------------------------------------------------------------------------------
# Chat template


def test_chat_template_renders_the_documented_format() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
    ]
    assert DEFAULT_CHAT_TEMPLATE.render(messages) == (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"
    )
    assert DEFAULT_CHAT_TEMPLATE.render(messages, add_generation_prompt=False).endswith(
        "Hi!<|end|>\n"
    )
    assert DEFAULT_CHAT_TEMPLATE.stop == [
        "<|end|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        EOS_TOKEN,
    ]


def test_chat_template_accepts_text_parts() -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    rendered = DEFAULT_CHAT_TEMPLATE.render([{"role": "user", "content": parts, "name": "ann"}])
    assert rendered == "<|user|>\nHello<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], r"messages: must be a non-empty list"),
        ("hello", r"messages: must be a non-empty list"),
        (["hello"], r"messages\[0\]: must be an object"),
        (
            [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
            r"messages\[1\]\.role",
        ),
        ([{"content": "a"}], r"messages\[0\]\.role: must be one of system, user, assistant"),
        ([{"role": "user"}], r"messages\[0\]\.content: must be a string, got missing"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content: must be a string, got a int"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"messages\[0\]\.content\[0\]",
        ),
    ],
)
def test_chat_template_errors_name_the_message(messages: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        DEFAULT_CHAT_TEMPLATE.render(messages)


def test_chat_template_round_trip_and_custom_markers() -> None:
    custom = ChatTemplate(message_start="### {role}:\n", message_end="\n\n", stop=["###"])
    rebuilt = ChatTemplate.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert rebuilt == custom
    assert (
        rebuilt.render([{"role": "user", "content": "hi"}]) == "### user:\nhi\n\n### assistant:\n"
    )
    with pytest.raises(DataError, match=r"chat_template\.message_start lacks \{role\}"):
        ChatTemplate.from_dict({**custom.to_dict(), "message_start": "> "})
    with pytest.raises(DataError, match=r"chat_template\.stop"):
        ChatTemplate.from_dict({**custom.to_dict(), "stop": [""]})


# ----------------------------------------------------------------------------------------------
# TextPreprocessor


def test_preprocessor_schema_and_batches(bpe: BPETokenizer) -> None:
    pre = TextPreprocessor(bpe, block_size=16, text_column="text")
    assert pre.input_schema() == {
        "task": "language_modeling",
        "vocab_size": bpe.vocab_size,
        "eos_id": bpe.eos_id,
        "block_size": 16,
        "features": ["text"],
    }
    table = pa.table({"path": ["a.py", "b.py"], "text": CORPUS[:2]})
    packed = pre.transform_batch(table)
    assert np.array_equal(packed["labels"], pack_documents(CORPUS[:2], bpe, 16)["labels"])
    from_numpy = pre.transform_batch({"text": np.array(CORPUS[:2], dtype=object)})
    assert np.array_equal(from_numpy["input_ids"], packed["input_ids"])
    with pytest.raises(DataError, match=r"text column 'text' \(data\.text\) is missing"):
        pre.transform_batch(pa.table({"body": ["x"]}))


@pytest.mark.parametrize("kind", ["byte", "bpe", "file"])
def test_preprocessor_round_trip_packs_identically(
    kind: str, bpe: BPETokenizer, metaspace_file: Path
) -> None:
    tok: Tokenizer = {
        "byte": ByteTokenizer(),
        "bpe": bpe,
        "file": FileTokenizer.from_file(metaspace_file),
    }[kind]
    template = ChatTemplate(message_start="[{role}] ", message_end="\n", stop=["["])
    pre = TextPreprocessor(tok, block_size=8, text_column="doc", chat_template=template)
    document = json.loads(json.dumps(pre.to_dict()))
    assert document["kind"] == "text" and document["tokenizer"]["kind"] == kind
    rebuilt = TextPreprocessor.from_dict(document)
    assert rebuilt == pre and rebuilt.chat_template == template
    table = pa.table({"doc": [*SAMPLES, *CORPUS[:4]]})
    for key in ("input_ids", "labels"):
        assert np.array_equal(rebuilt.transform_batch(table)[key], pre.transform_batch(table)[key])
    assert rebuilt.input_schema() == pre.input_schema()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 9}, "format 9 is not 1"),
        ({"kind": "tabular"}, "kind 'tabular' is not 'text'"),
        ({"block_size": 1}, "block_size 1 is below 2"),
        ({"block_size": "8"}, "block_size has the wrong type"),
        ({"text_column": None}, "text_column has the wrong type"),
        ({"tokenizer": {"kind": "sentencepiece"}}, "tokenizer.kind 'sentencepiece'"),
        ({"chat_template": {}}, "chat_template.message_start is missing"),
    ],
)
def test_preprocessor_from_dict_errors(change: dict, message: str) -> None:
    document = TextPreprocessor(ByteTokenizer(), block_size=8, text_column="t").to_dict()
    with pytest.raises(DataError, match=message):
        TextPreprocessor.from_dict({**document, **change})
