"""Turning request texts into token ids the model accepts: the fast tokenizer, truncation and length checks."""

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue

from transformers import PreTrainedTokenizerBase

from service.errors import TextTooLong


@dataclass(frozen=True, slots=True)
class EncodedText:
    """A text's token ids (special tokens included, within the model's maximum length) and whether it was cut."""

    ids: list[int]
    truncated: bool


class TextEncoder:
    """Encodes batches of texts with a fast tokenizer, truncating to `max_length` or refusing longer texts.

    Not thread-safe: a fast tokenizer's truncation setting is state of the tokenizer object, so two threads encoding
    with one tokenizer can each get the other's truncation. `EncoderPool` gives each thread its own.

    A text far longer than the model reads is tokenized from a prefix only, so a 2 MB text costs the tokenizer time
    and memory for a few thousand characters, not for two million tokens and their offsets. The prefix is used only
    when it yields the same ids: more tokens than the model takes must lie before the prefix's last two
    pre-tokenized words. The last may be cut in half; the one before is a margin for pre-tokenizers that split a
    word by what follows it (byte-level BPE gives the last space of a run to the next word). Earlier words
    tokenize the same whatever follows; tests/test_tokenization.py checks this against whole-text tokenization.
    """

    PREFIX_CHARS_PER_TOKEN = 8  # the first prefix tried; grown fourfold while it is not provably enough
    EXACT_COUNT_CHARS_PER_TOKEN = 64  # with truncate=false, texts up to this are counted whole for the 413's message

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if not tokenizer.is_fast:
            raise ValueError("a fast (Rust) tokenizer is required; the checkpoint has only a slow one")
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self.max_length = max_length
        self._content_tokens = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        # Left truncation keeps a text's end, which a prefix does not hold.
        self._prefix_chars = max_length * self.PREFIX_CHARS_PER_TOKEN if tokenizer.truncation_side == "right" else None

    def encode(self, texts: list[str], truncate: bool) -> list[EncodedText]:
        """Token ids for each text, in order. Raises TextTooLong when truncate is False and a text is too long."""
        # Refusals name a text's exact length unless it is huge; only then is it "more than" the maximum.
        shortest_cut = self.max_length * (self.PREFIX_CHARS_PER_TOKEN if truncate else self.EXACT_COUNT_CHARS_PER_TOKEN)
        prefixes = {
            i: prefix
            for i, text in enumerate(texts)
            if len(text) > shortest_cut and (prefix := self._sufficient_prefix(text)) is not None
        }
        if prefixes and not truncate:
            first = min(prefixes)
            raise TextTooLong(first, self.max_length + 1, self.max_length, exact=False)
        texts = [prefixes.get(i, text) for i, text in enumerate(texts)]
        full = self._whole_ids(texts)
        too_long = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        if too_long and not truncate:
            first = too_long[0]
            raise TextTooLong(first, len(full[first]), self.max_length)
        # Re-encode only the long ones, so the tokenizer itself decides where special tokens go when cutting.
        cut = self.tokenizer(
            [texts[i] for i in too_long], add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"] if too_long else []
        encoded = [EncodedText(ids, False) for ids in full]
        for index, ids in zip(too_long, cut):
            encoded[index] = EncodedText(ids, True)
        return encoded

    def _whole_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, special tokens included, uncut: the Rust tokenizer called directly, as transformers' call
        with truncation=False does after turning off the truncation (and padding) a previous call left on it; that
        call's own Python cost 60 of the 160 us a corpus text took to encode."""
        if self._backend.truncation is not None:
            self._backend.no_truncation()
        if self._backend.padding is not None:
            self._backend.no_padding()
        return [encoding.ids for encoding in self._backend.encode_batch(texts, add_special_tokens=True)]

    def _sufficient_prefix(self, text: str) -> str | None:
        """A prefix of `text` that truncates to the same ids as the whole and is longer than the model takes;
        None when the text is short, or no prefix is provably enough (then the whole text is tokenized)."""
        chars = self._prefix_chars
        while chars is not None and chars < len(text):
            prefix = text[:chars]
            words = self.tokenizer(prefix, add_special_tokens=False, truncation=False, verbose=False).word_ids()
            if _tokens_before_last_words(words, 2) > self._content_tokens:
                return prefix
            chars *= 4
        return None


def _tokens_before_last_words(words: list[int | None], last: int) -> int:
    """How many leading tokens belong to words before the `last` final words (word ids ascend along a text)."""
    final_words = sorted({word for word in words if word is not None})[-last:]
    if not final_words:
        return 0
    return next(i for i, word in enumerate(words) if word is not None and word >= final_words[0])


class EncoderPool:
    """Encodes requests on several threads, each with its own tokenizer copy, so one big request does not hold up
    the others (the Rust tokenizer releases the GIL while it works)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, workers: int) -> None:
        self.max_length = max_length
        self._idle: SimpleQueue[TextEncoder] = SimpleQueue()
        for worker in range(workers):
            self._idle.put(TextEncoder(tokenizer if worker == 0 else copy.deepcopy(tokenizer), max_length))
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    def submit(self, texts: list[str], truncate: bool) -> Future:
        """Encode on a free worker; the future holds the EncodedTexts or TextTooLong."""
        return self._threads.submit(self._encode, texts, truncate)

    def _encode(self, texts: list[str], truncate: bool) -> list[EncodedText]:
        encoder = self._idle.get()  # as many encoders as threads: one is always free here
        try:
            return encoder.encode(texts, truncate)
        finally:
            self._idle.put(encoder)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False)


def model_max_length(tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int | None) -> int:
    """The longest input the model takes: the tokenizer's limit when it states one, else the position table size."""
    stated = tokenizer.model_max_length
    if stated and stated < 1_000_000:  # tokenizers without a limit report a huge sentinel
        return int(stated) if max_position_embeddings is None else min(int(stated), max_position_embeddings)
    if max_position_embeddings is None:
        raise ValueError("cannot tell the model's maximum length: set CLASSIFIER_MAX_LENGTH")
    return max_position_embeddings
