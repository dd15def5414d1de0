"""Text for language modeling: tokenizers, document packing, a chat template, and the
`TextPreprocessor` that is saved with a language model.

Three tokenizer kinds share one interface (`Tokenizer`):

- `byte` (`ByteTokenizer`): UTF-8 bytes are ids 0..255, the end-of-text id is 256. Nothing to fit.
- `bpe` (`BPETokenizer`): byte-level BPE trained with the `tokenizers` library; `EOS_TOKEN` is its
  only special token.
- `file` (`FileTokenizer`): a Hugging Face `tokenizer.json` a user brings, e.g. the one beside a
  local checkpoint.

Text is always text: `encode` never turns characters into special ids (a document that contains
the characters `<|endoftext|>` gets ordinary tokens for them, so data cannot forge a document
boundary), and it adds no special tokens of its own. `decode` renders the end-of-text id as
`EOS_TOKEN` and invalid UTF-8 as U+FFFD. Every tokenizer serialises to JSON (`to_dict`), with the
`tokenizers` document inline, so a registered model carries its tokenizer and no pickle is used.
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa

from kiln.errors import DataError

if TYPE_CHECKING:
    import tokenizers

    from kiln.config.spec import DataSpec, TokenizerSpec

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""The end-of-text token of the byte and BPE tokenizers; ends every packed document."""
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")
"""Tokens a `file` tokenizer's end-of-text defaults to, first known one wins."""
IGNORE_INDEX = -100
"""Label of padding positions (never a target; torch's cross-entropy default ignore_index)."""
FORMAT = 1
"""Version of the `TextPreprocessor.to_dict` document."""
ROLES = ("system", "user", "assistant")
"""Chat roles `ChatTemplate.render` accepts."""

TextColumn: TypeAlias = Sequence[str | None] | pa.Array | pa.ChunkedArray
"""Documents: strings (None = no document) or a pyarrow string column."""


# ----------------------------------------------------------------------------------------------
# Streaming decoders


class StreamDecoder(ABC):
    """Turns token ids into text one id at a time, for streaming generation.

    `push` returns only text that is final: an incomplete UTF-8 sequence (or a BPE piece whose
    text may still change with the next token) is held back until it completes. The pushed
    pieces plus `flush()` concatenate to exactly `tokenizer.decode(all_ids)`.
    """

    @abstractmethod
    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is complete (possibly empty)."""

    @abstractmethod
    def flush(self) -> str:
        """Return whatever is held back (an unfinished sequence decodes with U+FFFD)."""


class _ByteStreamDecoder(StreamDecoder):
    def __init__(self, eos_id: int) -> None:
        self._eos_id = eos_id
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id == self._eos_id:
            return self._utf8.decode(b"", final=True) + EOS_TOKEN
        return self._utf8.decode(bytes((_check_byte(token_id),)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _PrefixStreamDecoder(StreamDecoder):
    """Decodes a sliding window of ids and emits what the newest id added to it.

    The window starts one complete piece back, so decoders that treat a sequence's first token
    specially (leading-space markers) decode it the same way as the whole text does.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []  # the window: the last emitted piece, then the pending ids
        self._read = 0  # ids before this index were emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # an unfinished UTF-8 sequence or piece: wait for the next token
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(before) :]

    def flush(self) -> str:
        before = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(before) :]


def _check_byte(token_id: int) -> int:
    if not 0 <= token_id < 256:
        raise ValueError(f"token id {token_id} is out of range for the byte tokenizer (0..256)")
    return token_id


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses: `ByteTokenizer`, `BPETokenizer`, `FileTokenizer`."""

    kind: str
    eos_id: int

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no end-of-text id is appended."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the end-of-text id renders as its token, invalid UTF-8 as U+FFFD."""

    @abstractmethod
    def decoder(self) -> StreamDecoder:
        """A fresh incremental decoder (see `StreamDecoder`)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A self-contained JSON-able document that `tokenizer_from_dict` rebuilds."""

    @abstractmethod
    def encode_documents(self, texts: TextColumn) -> tuple[np.ndarray, np.ndarray]:
        """Encode many documents at once, skipping None and empty ones.

        Returns:
            The ids of all kept documents concatenated (int32) and each one's token count
            (int64). Documents that encode to no tokens are left out of both.
        """

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end-of-text 256 (vocab 257). Needs no fitting."""

    kind = "byte"
    eos_id = 256

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        pieces: list[str] = []
        chunk = bytearray()
        for token_id in ids:
            if token_id == self.eos_id:
                pieces.append(chunk.decode("utf-8", errors="replace") + EOS_TOKEN)
                chunk.clear()
            else:
                chunk.append(_check_byte(int(token_id)))
        pieces.append(chunk.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def decoder(self) -> StreamDecoder:
        return _ByteStreamDecoder(self.eos_id)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "byte"}

    def encode_documents(self, texts: TextColumn) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, (pa.Array, pa.ChunkedArray)):
            data, lengths = _arrow_utf8(texts)
        else:
            encoded = [text.encode("utf-8") for text in texts if text]
            data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return data.astype(np.int32), lengths[lengths > 0]


def _arrow_utf8(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a string column straight from its Arrow buffers, and each row's length.

    Null rows get length 0. No Python string is created, which makes byte-level packing cheap.
    """
    array = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise DataError(f"the text column has type {array.type}, not string")
    if array.null_count:
        array = array.fill_null("")
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[
        array.offset : array.offset + len(array) + 1
    ]
    if data_buffer is None or len(array) == 0:
        return np.empty(0, dtype=np.uint8), np.zeros(len(array), dtype=np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data, np.diff(offsets).astype(np.int64)


class _LibraryTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with a known end-of-text token."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"the tokenizer has no token {eos_token!r} to end documents with")
        tokenizer.encode_special_tokens = True  # text is text: see the module docstring
        self._tokenizer = tokenizer
        self.eos_token = eos_token
        self.eos_id = int(eos_id)

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._encode_many(list(texts))
        return [list(encoding.ids) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))

    def decoder(self) -> StreamDecoder:
        return _PrefixStreamDecoder(self.decode)

    def encode_documents(self, texts: TextColumn) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = _arrow_strings(texts)
        ids = [encoding.ids for encoding in self._encode_many([t for t in texts if t])]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())
        )
        return flat, lengths[lengths > 0]

    def _encode_many(self, texts: list[str]) -> list[Any]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return list(encode(texts, add_special_tokens=False))

    def _document(self) -> dict[str, Any]:
        return dict(json.loads(self._tokenizer.to_str()))

    def __reduce__(self) -> tuple[Any, ...]:
        # tokenizers' own pickling drops encode_special_tokens; rebuild from the JSON instead
        return (tokenizer_from_dict, (self.to_dict(),))


def _arrow_strings(texts: pa.Array | pa.ChunkedArray) -> list[str | None]:
    kind = texts.type.value_type if pa.types.is_dictionary(texts.type) else texts.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"the text column has type {texts.type}, not string")
    return list(texts.to_pylist())


class BPETokenizer(_LibraryTokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization) with `EOS_TOKEN` as its special token."""

    kind = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        super().__init__(tokenizer, EOS_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from `texts` until `vocab_size` ids (257 ids are the 256 byte symbols
        and `EOS_TOKEN`), merging only pairs seen at least `min_frequency` times.

        A small corpus can stop short of `vocab_size`; `vocab_size` then reports what was learned.
        """
        from tokenizers import Tokenizer as Library
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + eos + 1), got {vocab_size}")
        tokenizer = Library(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator((text for text in texts if text), trainer)
        trained = cls(tokenizer)
        logger.info("trained a byte-level BPE tokenizer: %d ids", trained.vocab_size)
        return trained

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "tokenizer": self._document()}


class FileTokenizer(_LibraryTokenizer):
    """A user's Hugging Face `tokenizer.json`; documents end with its `eos_token`."""

    kind = "file"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str, source: str = "") -> None:
        super().__init__(tokenizer, eos_token)
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = None) -> FileTokenizer:
        """Load `path`. Without `eos_token`, the first of `EOS_CANDIDATES` the tokenizer knows.

        Raises:
            DataError: The file is missing or not a tokenizer, or has no such end-of-text token
                (the message names the file and `data.tokenizer.eos_token`).
        """
        from tokenizers import Tokenizer as Library

        path = Path(path)
        if not path.is_file():
            raise DataError(f"data.tokenizer.path: {path} does not exist or is not a file")
        try:
            tokenizer = Library.from_file(str(path))
        except Exception as exc:  # the library raises plain Exception on bad JSON
            raise DataError(f"data.tokenizer.path: {path} is not a tokenizer.json: {exc}") from exc
        return cls(tokenizer, _eos_token(tokenizer, eos_token, path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "tokenizer": self._document(),
            "eos_token": self.eos_token,
            "source": self.source,
        }


def _eos_token(tokenizer: tokenizers.Tokenizer, eos_token: str | None, path: Path) -> str:
    if eos_token is not None:
        if tokenizer.token_to_id(eos_token) is None:
            raise DataError(f"data.tokenizer.eos_token: {eos_token!r} is not a token of {path}")
        return eos_token
    for candidate in EOS_CANDIDATES:
        if tokenizer.token_to_id(candidate) is not None:
            return candidate
    raise DataError(
        f"{path} has none of the end-of-text tokens {list(EOS_CANDIDATES)}; "
        "name one with data.tokenizer.eos_token"
    )


def tokenizer_from_dict(document: Any) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict` output.

    Raises:
        DataError: The document is not a valid tokenizer (names the offending key).
    """
    from tokenizers import Tokenizer as Library

    kind = _field(document, "kind", str, "tokenizer.")
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("bpe", "file"):
        raise DataError(f"preprocessor document: tokenizer.kind {kind!r} is not byte, bpe or file")
    inline = _field(document, "tokenizer", dict, "tokenizer.")
    try:
        library = Library.from_str(json.dumps(inline))
    except Exception as exc:
        raise DataError(f"preprocessor document: tokenizer.tokenizer is invalid: {exc}") from exc
    if kind == "bpe":
        return BPETokenizer(library)
    eos_token = _field(document, "eos_token", str, "tokenizer.")
    source = _field(document, "source", str, "tokenizer.")
    return FileTokenizer(library, eos_token, source=source)


def build_tokenizer(spec: TokenizerSpec, texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer `data.tokenizer` describes.

    Args:
        spec: The `data.tokenizer` section.
        texts: bpe only: the training text to learn merges from (the caller caps it at
            `spec.train_sample_mb`, e.g. with `take_megabytes`).

    Raises:
        DataError: bpe without any training text, or a bad `file` tokenizer.
    """
    if spec.kind == "byte":
        return ByteTokenizer()
    if spec.kind == "file":
        assert spec.path is not None  # the spec's validator requires it
        return FileTokenizer.from_file(spec.path, spec.eos_token)
    if texts is None:
        raise ValueError("a bpe tokenizer needs the training texts to learn from")
    seen = [0]

    def counted() -> Iterator[str]:
        for text in texts:
            if text:
                seen[0] += 1
                yield text

    tokenizer = BPETokenizer.train(counted(), spec.vocab_size, spec.min_frequency)
    if seen[0] == 0:
        raise DataError("data.tokenizer: bpe found no text to train on in the training split")
    return tokenizer


def take_megabytes(texts: Iterable[str | None], megabytes: float) -> Iterator[str]:
    """The non-empty texts, in order, until their UTF-8 size reaches `megabytes` (the text that
    crosses the limit is included)."""
    budget = megabytes * 1_000_000
    used = 0
    for text in texts:
        if not text:
            continue
        yield text
        used += len(text.encode("utf-8"))
        if used >= budget:
            return


# ----------------------------------------------------------------------------------------------
# Packing and unigram statistics


def pack_documents(
    texts: TextColumn, tokenizer: Tokenizer, block_size: int
) -> dict[str, np.ndarray]:
    """Cut documents into next-token-prediction blocks.

    Each document's tokens are followed by the end-of-text id and the documents concatenated
    into one stream `s`. Block i has `input_ids = s[i*B:(i+1)*B]` and
    `labels = s[i*B+1:(i+1)*B+1]`, so every token of the stream but the first is a target
    exactly once. The last block is padded: inputs with the end-of-text id, labels with
    `IGNORE_INDEX`. None and empty documents are skipped.

    Args:
        texts: One document per entry: a list of strings or a pyarrow string array (the fast
            path for the byte tokenizer reads its buffers directly).
        tokenizer: Any `Tokenizer`.
        block_size: B, tokens per block.

    Returns:
        `{"input_ids": int32 (n, B), "labels": int32 (n, B)}`; n = 0 when there is no text.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ids, lengths = tokenizer.encode_documents(texts)
    stream = _end_documents(ids, lengths, tokenizer.eos_id)
    return _blocks(stream, block_size, tokenizer.eos_id)


def _end_documents(ids: np.ndarray, lengths: np.ndarray, eos_id: int) -> np.ndarray:
    """ids with `eos_id` inserted after each document."""
    stream = np.full(ids.size + lengths.size, eos_id, dtype=np.int32)
    eos_at = np.cumsum(lengths + 1) - 1
    keep = np.ones(stream.size, dtype=bool)
    keep[eos_at] = False
    stream[keep] = ids
    return stream


def _blocks(stream: np.ndarray, block_size: int, eos_id: int) -> dict[str, np.ndarray]:
    targets = max(stream.size - 1, 0)
    rows = math.ceil(targets / block_size)
    input_ids = np.full(rows * block_size, eos_id, dtype=np.int32)
    labels = np.full(rows * block_size, IGNORE_INDEX, dtype=np.int32)
    input_ids[:targets] = stream[:targets]
    labels[:targets] = stream[1 : targets + 1]
    return {
        "input_ids": input_ids.reshape(rows, block_size),
        "labels": labels.reshape(rows, block_size),
    }


def token_counts(labels: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id is a target: int64 (vocab_size,), `IGNORE_INDEX` positions left out."""
    targets = np.asarray(labels).reshape(-1)
    targets = targets[targets != IGNORE_INDEX]
    if targets.size and (targets.min() < 0 or targets.max() >= vocab_size):
        raise ValueError(f"labels hold ids outside 0..{vocab_size - 1}")
    return np.bincount(targets.astype(np.int64), minlength=vocab_size).astype(np.int64)


def unigram_perplexity(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Perplexity of the validation targets under the training unigram distribution.

    The distribution is add-one smoothed, p(t) = (c(t) + 1) / (N + V), so a token never seen in
    training still has a finite cost. The result is exp of the mean negative log probability of
    the validation targets: the baseline a language model has to beat.
    """
    train = np.asarray(train_counts, dtype=np.float64)
    val = np.asarray(val_counts, dtype=np.float64)
    if train.shape != val.shape or train.ndim != 1:
        raise ValueError(f"counts must be two vectors of one length: {train.shape}, {val.shape}")
    if val.sum() <= 0:
        raise ValueError("the validation counts hold no targets")
    log_p = np.log(train + 1.0) - np.log(train.sum() + train.size)
    return float(np.exp(-(val * log_p).sum() / val.sum()))


# ----------------------------------------------------------------------------------------------
# Chat template


def _default_stop() -> list[str]:
    return ["<|end|>", *(f"<|{role}|>" for role in ROLES), EOS_TOKEN]


@dataclass
class ChatTemplate:
    """Renders chat messages as one prompt string; stored with the model.

    The default format, with `add_generation_prompt` appending the last line::

        <|system|>
        You are terse.<|end|>
        <|user|>
        Hi!<|end|>
        <|assistant|>

    Each message is `message_start` (with `{role}` replaced by the role), its content, then
    `message_end`. The model's reply ends at the first of the `stop` strings: the end-of-turn
    marker, any role marker, or `EOS_TOKEN`. Roles are system, user and assistant; content is a
    string, or an OpenAI-style list of `{"type": "text", "text": ...}` parts, joined.
    """

    message_start: str = "<|{role}|>\n"
    """Opens each message; `{role}` becomes the role."""
    message_end: str = "<|end|>\n"
    """Closes each message."""
    stop: list[str] = field(default_factory=_default_stop)
    """Strings that end an assistant turn."""

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`, ending with the assistant's opening marker when
        `add_generation_prompt`.

        Raises:
            DataError: `messages` is not a non-empty list of {role, content} objects; the
                message names the element, e.g. `messages[2].role`.
        """
        if not isinstance(messages, list) or not messages:
            raise DataError("messages: must be a non-empty list of {role, content} objects")
        parts = []
        for i, message in enumerate(messages):
            role, content = _role_and_content(message, i)
            parts.append(self._start(role) + content + self.message_end)
        if add_generation_prompt:
            parts.append(self._start("assistant"))
        return "".join(parts)

    def _start(self, role: str) -> str:
        return self.message_start.replace("{role}", role)

    def to_dict(self) -> dict[str, Any]:
        """The template as a JSON-able document."""
        return {
            "message_start": self.message_start,
            "message_end": self.message_end,
            "stop": list(self.stop),
        }

    @classmethod
    def from_dict(cls, document: Any) -> ChatTemplate:
        """Rebuild from `to_dict` output; DataError names a bad key."""
        start = _field(document, "message_start", str, "chat_template.")
        if "{role}" not in start:
            raise DataError("preprocessor document: chat_template.message_start lacks {role}")
        stop = _field(document, "stop", list, "chat_template.")
        if not all(isinstance(item, str) and item for item in stop):
            raise DataError("preprocessor document: chat_template.stop must be non-empty strings")
        return cls(
            message_start=start,
            message_end=_field(document, "message_end", str, "chat_template."),
            stop=list(stop),
        )


def _role_and_content(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise DataError(f"messages[{i}]: must be an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        return role, "".join(_text_part(part, i, j) for j, part in enumerate(content))
    kind = "missing" if content is None else f"a {type(content).__name__}"
    raise DataError(f"messages[{i}].content: must be a string, got {kind}")


def _text_part(part: Any, i: int, j: int) -> str:
    if (
        isinstance(part, Mapping)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    ):
        return str(part["text"])
    raise DataError(f'messages[{i}].content[{j}]: only {{"type": "text", "text": ...}} parts')


DEFAULT_CHAT_TEMPLATE = ChatTemplate()
"""The template models get unless they bring their own (do not mutate it)."""


# ----------------------------------------------------------------------------------------------
# The preprocessor saved with a language model


class TextPreprocessor:
    """Tokenization and packing for language modeling: the LM counterpart of
    `kiln.data.preprocess.Preprocessor`, saved with the model as `preprocessing.json`."""

    task = "language_modeling"

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        block_size: int,
        text_column: str,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.text_column = text_column
        template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        self.chat_template = ChatTemplate.from_dict(template.to_dict())  # a private copy

    def input_schema(self) -> dict[str, Any]:
        """What a model factory needs: vocabulary, end-of-text id, block size."""
        return {
            "task": self.task,
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
            "block_size": self.block_size,
            "features": [self.text_column],
        }

    def transform_batch(self, batch: pa.Table | Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`pack_documents` of the batch's text column (a pyarrow table or a dict of columns).

        Raises:
            DataError: The text column is missing or not strings.
        """
        names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
        if self.text_column not in names:
            raise DataError(
                f"text column {self.text_column!r} (data.text) is missing from the data "
                f"(found {names})"
            )
        column = batch[self.text_column]
        if isinstance(column, np.ndarray):
            column = column.tolist()
        return pack_documents(column, self.tokenizer, self.block_size)

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild, as JSON (the tokenizer inline)."""
        return {
            "format": FORMAT,
            "kind": "text",
            "task": self.task,
            "text_column": self.text_column,
            "block_size": self.block_size,
            "tokenizer": self.tokenizer.to_dict(),
            "chat_template": self.chat_template.to_dict(),
        }

    @classmethod
    def from_dict(cls, document: Any) -> TextPreprocessor:
        """Rebuild from `to_dict` output.

        Raises:
            DataError: The document is not a valid text preprocessor (names the offending key).
        """
        if _field(document, "format", int, "") != FORMAT:
            raise DataError(f"preprocessor document: format {document['format']!r} is not {FORMAT}")
        if _field(document, "kind", str, "") != "text":
            raise DataError(f"preprocessor document: kind {document['kind']!r} is not 'text'")
        block_size = _field(document, "block_size", int, "")
        if block_size < 2:
            raise DataError(f"preprocessor document: block_size {block_size} is below 2")
        return cls(
            tokenizer_from_dict(_field(document, "tokenizer", dict, "")),
            block_size=block_size,
            text_column=_field(document, "text_column", str, ""),
            chat_template=ChatTemplate.from_dict(_field(document, "chat_template", dict, "")),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextPreprocessor) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"TextPreprocessor(tokenizer={self.tokenizer.kind!r}, "
            f"vocab_size={self.tokenizer.vocab_size}, block_size={self.block_size}, "
            f"text_column={self.text_column!r})"
        )


def build_text_preprocessor(data: DataSpec, texts: Iterable[str] | None = None) -> TextPreprocessor:
    """The `TextPreprocessor` of a language-modeling `data` section.

    Args:
        data: The spec's `data` section.
        texts: bpe only: the training split's documents; at most `train_sample_mb` of them are
            read.
    """
    sample = take_megabytes(texts, data.tokenizer.train_sample_mb) if texts is not None else None
    tokenizer = build_tokenizer(data.tokenizer, sample)
    return TextPreprocessor(tokenizer, block_size=data.block_size, text_column=data.text)


def _field(document: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(document, dict) or key not in document:
        raise DataError(f"preprocessor document: {where}{key} is missing")
    value = document[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"preprocessor document: {where}{key} has the wrong type ({value!r})")
    return value
