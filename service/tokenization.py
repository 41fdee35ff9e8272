"""Turning request texts into token ids the model accepts: the fast tokenizer, truncation and length checks."""

import asyncio
import copy
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from service.errors import TextTooLong
from service.thread_names import lower_this_threads_priority, name_this_thread

# Which end of a long text is cut: "right" keeps its beginning, "left" its end (TEI's truncation_direction).
TruncationSide = Literal["right", "left"]
# One input: a text, or a (text, text_pair) pair for cross-encoders and NLI models.
TextInput = str | tuple[str, str]


class PairIds(list[int]):
    """A text pair's token ids, which carry where the second text's tokens (token type 1) start: they travel as the
    plain id list through the queue, and the runner builds the token type ids from `second_start` when it collates."""

    __slots__ = ("second_start",)

    def __init__(self, ids: list[int], second_start: int) -> None:
        super().__init__(ids)
        self.second_start = second_start


@dataclass(frozen=True, slots=True)
class EncodedText:
    """A text's token ids (special tokens included, within the model's maximum length; a `PairIds` for a pair whose
    model reads token type ids) and whether it was cut."""

    ids: list[int]
    truncated: bool


class TextEncoder:
    """Encodes batches of texts and text pairs with a fast tokenizer, truncating to `max_length` (from the side asked
    for) or refusing longer texts.

    Not thread-safe: a fast tokenizer's truncation setting is state of the tokenizer object, so two threads encoding
    with one tokenizer can each get the other's truncation. `EncoderPool` gives each thread its own.

    A text far longer than the model reads is tokenized from a prefix only (or, truncated on the left, a suffix), so a
    2 MB text costs the tokenizer time and memory for a few thousand characters, not for two million tokens and their
    offsets. The prefix is used only when it yields the same ids: more tokens than the model takes must lie before the
    prefix's last two pre-tokenized words. The last may be cut in half; the one before is a margin for pre-tokenizers
    that split a word by what follows it (byte-level BPE gives the last space of a run to the next word). Earlier words
    tokenize the same whatever follows. A suffix mirrors it: more tokens than the model takes must lie after its first
    two words (the first may be cut, and the second is a margin for a word read by what precedes it).
    tests/test_tokenization.py checks both against whole-text tokenization. A pair's huge text is read the same way
    when the other is short (`_pair_read` says when): `longest_first` truncation cuts a text longer than the model
    takes to the same length whatever its true length.
    """

    PREFIX_CHARS_PER_TOKEN = 8  # the first prefix tried; grown fourfold while it is not provably enough
    EXACT_COUNT_CHARS_PER_TOKEN = 64  # with truncate=false, texts up to this are counted whole for the 413's message

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if not tokenizer.is_fast:
            raise ValueError("a fast (Rust) tokenizer is required; the checkpoint has only a slow one")
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self.max_length = max_length
        self.default_side: TruncationSide = "left" if tokenizer.truncation_side == "left" else "right"
        self._content_tokens = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        self._pair_content_tokens = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        self._part_chars = max_length * self.PREFIX_CHARS_PER_TOKEN
        # The model reads token type ids only where its tokenizer hands them to it.
        self._type_ids = "token_type_ids" in tokenizer.model_input_names

    def encode(self, texts: Sequence[TextInput], truncate: bool, side: TruncationSide | None = None) -> list[EncodedText]:
        """Token ids for each text or pair, in order, cut on `side` (None: the tokenizer's own). Raises TextTooLong
        when truncate is False and one is too long."""
        side = side or self.default_side
        singles = [i for i, text in enumerate(texts) if isinstance(text, str)]
        if len(singles) == len(texts):
            return self._encode_texts(texts, list(range(len(texts))), truncate, side)  # type: ignore[arg-type]
        encoded: list[EncodedText | None] = [None] * len(texts)
        pairs = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        singles_encoded = self._encode_texts([texts[i] for i in singles], singles, truncate, side)  # type: ignore[misc]
        pairs_encoded = self._encode_pairs([texts[i] for i in pairs], pairs, truncate, side)  # type: ignore[misc]
        for index, text in [*zip(singles, singles_encoded), *zip(pairs, pairs_encoded)]:
            encoded[index] = text
        return encoded  # type: ignore[return-value]

    def _encode_texts(self, texts: list[str], positions: list[int], truncate: bool, side: TruncationSide) -> list[EncodedText]:
        """Single texts; `positions` are their places in the request, which a refusal names."""
        # Refusals name a text's exact length unless it is huge; only then is it "more than" the maximum.
        shortest_cut = self.max_length * (self.PREFIX_CHARS_PER_TOKEN if truncate else self.EXACT_COUNT_CHARS_PER_TOKEN)
        parts = {
            i: part
            for i, text in enumerate(texts)
            if len(text) > shortest_cut and (part := self._sufficient_part(text, side, self._content_tokens)) is not None
        }
        if parts and not truncate:
            raise TextTooLong(positions[min(parts)], self.max_length + 1, self.max_length, exact=False)
        texts = [parts.get(i, text) for i, text in enumerate(texts)]
        full = self._whole_ids(texts)
        too_long = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        if too_long and not truncate:
            first = too_long[0]
            raise TextTooLong(positions[first], len(full[first]), self.max_length)
        encoded = [EncodedText(ids, False) for ids in full]
        if too_long:
            # Re-encode only the long ones, so the tokenizer itself decides where special tokens go when cutting.
            self.tokenizer.truncation_side = side
            cut = self.tokenizer([texts[i] for i in too_long], add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
            for index, ids in zip(too_long, cut):
                encoded[index] = EncodedText(ids, True)
        return encoded

    def _encode_pairs(self, pairs: list[tuple[str, str]], positions: list[int], truncate: bool, side: TruncationSide) -> list[EncodedText]:
        """Text pairs as the tokenizer encodes them (its pair template, `longest_first` truncation), each a `PairIds`
        when the model reads token type ids."""
        shortest_cut = self.max_length * (self.PREFIX_CHARS_PER_TOKEN if truncate else self.EXACT_COUNT_CHARS_PER_TOKEN)
        read = []
        for position, pair in zip(positions, pairs):
            parts = [self._sufficient_part(text, side, self._pair_content_tokens) if len(text) > shortest_cut else None for text in pair]
            if not truncate and any(part is not None for part in parts):
                raise TextTooLong(position, self.max_length + 1, self.max_length, exact=False)
            read.append(self._pair_read(pair, parts))
        full = self._whole_ids(read)
        too_long = [i for i, encoding in enumerate(full) if len(encoding) > self.max_length]
        if too_long and not truncate:
            first = too_long[0]
            raise TextTooLong(positions[first], len(full[first]), self.max_length)
        if too_long:
            self._backend.enable_truncation(self.max_length, strategy="longest_first", direction=side)
            for index, encoding in zip(too_long, self._backend.encode_batch([read[i] for i in too_long])):
                full[index] = encoding
        return [self._pair_text(encoding, i in too_long) for i, encoding in enumerate(full)]

    def _pair_read(self, pair: tuple[str, str], parts: list[str | None]) -> tuple[str, str]:
        """The pair as it is read: a part stands for its whole text only when it provably truncates the same. When
        both texts are cut to half the budget, the longer gets the odd token, which parts cannot tell: both are read
        whole then (a pair of two huge texts costs the tokenizer their whole length, within the body limit). One part
        must stay longer in tokens than the other text, so that the same text is the longer."""
        first, second = parts
        if first is None and second is None:
            return pair
        if first is not None and second is not None:
            return pair
        part, other = (first, pair[1]) if first is not None else (second, pair[0])
        assert part is not None
        if self._token_count(part) <= self._token_count(other):
            return pair
        return (part, pair[1]) if first is not None else (pair[0], part)

    def _token_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def _pair_text(self, encoding, truncated: bool) -> EncodedText:  # encoding: tokenizers.Encoding
        if not self._type_ids or 1 not in encoding.type_ids:
            return EncodedText(encoding.ids, truncated)
        second_start = encoding.type_ids.index(1)
        if any(type_id != 1 for type_id in encoding.type_ids[second_start:]):
            raise ValueError("the tokenizer's pair template does not give the second text's tokens one type id")
        return EncodedText(PairIds(encoding.ids, second_start), truncated)

    def _whole_ids(self, texts: list) -> list:
        """Each text's (or pair's) encoding, special tokens included, uncut: the Rust tokenizer called directly, as
        transformers' call with truncation=False does after turning off the truncation (and padding) a previous call
        left on it; that call's own Python cost 60 of the 160 us a corpus text took to encode. Single texts' ids,
        pairs' whole encodings (which hold their type ids)."""
        if self._backend.truncation is not None:
            self._backend.no_truncation()
        if self._backend.padding is not None:
            self._backend.no_padding()
        encodings = self._backend.encode_batch(texts, add_special_tokens=True)
        if texts and isinstance(texts[0], str):
            return [encoding.ids for encoding in encodings]
        return encodings

    def _sufficient_part(self, text: str, side: TruncationSide, content_tokens: int) -> str | None:
        """A prefix (side "right") or suffix (side "left") of `text` that truncates to the same ids as the whole and
        is longer than `content_tokens`; None when the text is short, or no part is provably enough (then the whole
        text is tokenized)."""
        chars = self._part_chars
        while chars < len(text):
            part = text[:chars] if side == "right" else text[-chars:]
            words = self.tokenizer(part, add_special_tokens=False, truncation=False, verbose=False).word_ids()
            kept = _tokens_before_last_words(words, 2) if side == "right" else _tokens_after_first_words(words, 2)
            if kept > content_tokens:
                return part
            chars *= 4
        return None


def _tokens_before_last_words(words: list[int | None], last: int) -> int:
    """How many leading tokens belong to words before the `last` final words (word ids ascend along a text)."""
    final_words = sorted({word for word in words if word is not None})[-last:]
    if not final_words:
        return 0
    return next(i for i, word in enumerate(words) if word is not None and word >= final_words[0])


def _tokens_after_first_words(words: list[int | None], first: int) -> int:
    """How many trailing tokens belong to words after the `first` leading words."""
    leading_words = sorted({word for word in words if word is not None})[:first]
    if not leading_words:
        return 0
    return sum(1 for word in words if word is not None and word > leading_words[-1])


@dataclass(slots=True)
class _Job:
    """One request's encoding: its future, and the work a tokenizer thread does for it."""

    future: Future
    run: Callable[[TextEncoder], None]


class _FairJobs:
    """The tokenizer threads' jobs, queued by caller (`service.callers`) and handed out to the caller served least
    recently first: a caller with hundreds of big requests waiting holds up another's next request by at most one job
    per thread, as the batch queue shares the model between callers (`fairness`)."""

    def __init__(self) -> None:
        self._queued: dict[str, deque[_Job]] = {}
        self._last_served: dict[str, int] = {}  # the turn each caller with jobs queued was last served in
        self._turn = 0
        self._changed = threading.Condition()
        self._closed = False

    def put(self, caller: str, job: _Job) -> None:
        with self._changed:
            self._queued.setdefault(caller, deque()).append(job)
            self._last_served.setdefault(caller, -1)  # a caller with nothing queued comes first
            self._changed.notify()

    def get(self) -> _Job | None:
        """The next job, waiting for one; None once closed and empty."""
        with self._changed:
            while not self._queued:
                if self._closed:
                    return None
                self._changed.wait()
            caller = min(self._queued, key=self._last_served.__getitem__)
            jobs = self._queued[caller]
            job = jobs.popleft()
            self._turn += 1
            self._last_served[caller] = self._turn
            if not jobs:
                del self._queued[caller], self._last_served[caller]
            return job

    def take(self, caller: str) -> list[_Job]:
        """Remove and return `caller`'s queued jobs."""
        with self._changed:
            self._last_served.pop(caller, None)
            return list(self._queued.pop(caller, ()))

    def close(self) -> None:
        """The threads finish the jobs queued, then stop."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class EncoderPool:
    """Encodes requests on several threads, each with its own tokenizer copy, so one big request does not hold up
    the others (the Rust tokenizer releases the GIL while it works), taking callers' requests in turn (`_FairJobs`);
    `encode` encodes a small request on the event loop's own thread instead (with a copy of its own), where handing
    it to a thread and back costs more than tokenizing it."""

    INLINE_CHARS = 1000  # requests of at most this many characters are encoded on the event loop
    # The tokenizer threads' nice value over the process's: on a busy CPU the event loop and the model get the cores
    # first. A greedy caller's first 40 requests of 256 texts, tokenized at once, otherwise held an interactive caller's
    # answers up to 0.7-1.2 s (p99 over the flood's first 10 s); at +10, 0.4-0.6 s, and its throughput alone unchanged.
    NICENESS = 10

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, workers: int) -> None:
        self.max_length = max_length
        self._jobs = _FairJobs()
        for worker in range(workers):
            encoder = TextEncoder(tokenizer if worker == 0 else copy.deepcopy(tokenizer), max_length)
            threading.Thread(target=self._work, args=(encoder,), name=f"tokenize_{worker}", daemon=True).start()
        self._inline = TextEncoder(copy.deepcopy(tokenizer), max_length)  # the event loop's

    async def encode(self, texts: Sequence[TextInput], truncate: bool, side: TruncationSide | None = None, caller: str = "") -> list[EncodedText]:
        """The EncodedTexts, or TextTooLong: from the event loop, which it holds up only for a small request."""
        if sum(len(text) if isinstance(text, str) else len(text[0]) + len(text[1]) for text in texts) <= self.INLINE_CHARS:
            return self._inline.encode(texts, truncate, side)
        return await asyncio.wrap_future(self.submit(texts, truncate, side, caller))

    def submit(self, texts: Sequence[TextInput], truncate: bool, side: TruncationSide | None = None, caller: str = "") -> Future:
        """Encode on a tokenizer thread, in `caller`'s turn; the future holds the EncodedTexts or TextTooLong."""
        future: Future[list[EncodedText]] = Future()

        def run(encoder: TextEncoder) -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(encoder.encode(texts, truncate, side))
            except BaseException as error:
                future.set_exception(error)

        self._jobs.put(caller, _Job(future, run))
        return future

    def refuse_waiting(self, caller: str, refusal: Callable[[], Exception]) -> None:
        """Fail `caller`'s requests still waiting for a tokenizer thread with a `refusal()` each, unencoded."""
        for job in self._jobs.take(caller):
            if job.future.set_running_or_notify_cancel():  # else its client left: nobody to answer
                job.future.set_exception(refusal())

    def _work(self, encoder: TextEncoder) -> None:
        name_this_thread("clf-tokenize")
        lower_this_threads_priority(self.NICENESS)
        while (job := self._jobs.get()) is not None:
            job.run(encoder)

    def shutdown(self) -> None:
        self._jobs.close()


def model_max_length(tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int | None) -> int:
    """The longest input the model takes: the tokenizer's limit when it states one, else the position table size."""
    stated = tokenizer.model_max_length
    if stated and stated < 1_000_000:  # tokenizers without a limit report a huge sentinel
        return int(stated) if max_position_embeddings is None else min(int(stated), max_position_embeddings)
    if max_position_embeddings is None:
        raise ValueError("cannot tell the model's maximum length: set CLASSIFIER_MAX_LENGTH")
    return max_position_embeddings
