"""Tokenization: huge texts are read from a prefix without changing a single id, and workers do not share state."""

import random
import threading

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from service.tokenization import EncoderPool, TextEncoder, TextTooLong
from tests.conftest import build_tiny_tokenizer

MAX_LENGTH = 16  # prefixes start at 8 x 16 = 128 characters, so modest texts already take the prefix path


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A RoBERTa-style byte-level BPE, trained offline: its pre-tokenizer splits runs of spaces by what follows."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["the film was great, I loved it", "what a waste of two hours!!", "  spaced   out  text  ", "ééé 漢字 ok"]
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=MAX_LENGTH)


def random_texts(seed: int, count: int) -> list[str]:
    """Texts built to break a careless cut: long words, space runs, punctuation runs, accents, CJK, no spaces."""
    rng = random.Random(seed)
    pieces = ["the", "film", "great", " ", "   ", "\n", "!", "!!!!!!", "é", "e\u0301", "漢字", "waste", "a" * 150,
              "word" * 30, "...", "12345", "\t", "I", "loved", "ok"]  # fmt: skip
    texts = []
    for _ in range(count):
        length = rng.choice([5, 40, 200, 2000])
        texts.append("".join(rng.choice(pieces) for _ in range(length)))
    texts += ["!" * 100_000, "a" * 100_000, " " * 5000 + "film", "film " * 20_000, "漢" * 50_000]
    return texts


@pytest.mark.parametrize("make_tokenizer", [lambda: build_tiny_tokenizer(MAX_LENGTH), byte_level_bpe], ids=["wordpiece", "bytelevel-bpe"])
def test_prefix_reading_gives_exactly_the_ids_of_tokenizing_the_whole_text(make_tokenizer):
    tokenizer = make_tokenizer()
    reference = make_tokenizer()  # a separate instance: the encoder's truncation setting must not matter
    encoder = TextEncoder(tokenizer, MAX_LENGTH)
    texts = random_texts(seed=7, count=300)
    encoded = encoder.encode(texts, truncate=True)
    for text, got in zip(texts, encoded):
        whole = reference(text, truncation=False)["input_ids"]
        cut = reference(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        assert got.ids == cut, text[:80]
        assert got.truncated == (len(whole) > MAX_LENGTH)
    # and the prefix path was taken, or this test would prove nothing
    assert sum(encoder._sufficient_part(text, "right", encoder._content_tokens) is not None for text in texts) > 100


def test_a_text_cut_before_leaves_no_truncation_behind():
    encoder = TextEncoder(build_tiny_tokenizer(MAX_LENGTH), MAX_LENGTH)
    assert encoder.encode(["film " * 40], truncate=True)[0].truncated  # the tokenizer now has truncation on
    with pytest.raises(TextTooLong, match="has 42 tokens"):  # counted whole, not cut to the maximum
        encoder.encode(["film " * 40], truncate=False)


def test_a_huge_text_is_tokenized_from_a_short_prefix():
    encoder = TextEncoder(build_tiny_tokenizer(MAX_LENGTH), MAX_LENGTH)
    prefix = encoder._sufficient_part("!" * 2_000_000, "right", encoder._content_tokens)
    assert prefix is not None and len(prefix) <= MAX_LENGTH * TextEncoder.PREFIX_CHARS_PER_TOKEN


def test_without_truncation_a_huge_text_is_refused_without_counting_every_token():
    encoder = TextEncoder(build_tiny_tokenizer(MAX_LENGTH), MAX_LENGTH)
    with pytest.raises(TextTooLong, match=r"texts\[1\] has more than 16 tokens"):
        encoder.encode(["fine", "film " * 100_000], truncate=False)
    with pytest.raises(TextTooLong, match=r"texts\[0\] has 42 tokens"):  # a modest one is counted exactly
        encoder.encode(["film " * 40], truncate=False)


def test_workers_encoding_at_once_each_get_their_own_truncation():
    """Truncating and non-truncating requests interleaved on 4 workers: each gets what it asked for."""
    pool = EncoderPool(build_tiny_tokenizer(MAX_LENGTH), MAX_LENGTH, workers=4)
    long_text = "film " * 40
    errors: list[str] = []

    def hammer(truncate: bool) -> None:
        for _ in range(50):
            try:
                [encoded] = pool.submit([long_text], truncate).result()
                if not truncate or len(encoded.ids) != MAX_LENGTH:
                    errors.append(f"truncate={truncate} gave {len(encoded.ids)} ids")
            except TextTooLong:
                if truncate:
                    errors.append("truncate=True was refused")

    threads = [threading.Thread(target=hammer, args=(i % 2 == 0,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.shutdown()
    assert errors == []


@pytest.mark.parametrize("make_tokenizer", [lambda: build_tiny_tokenizer(MAX_LENGTH), byte_level_bpe], ids=["wordpiece", "bytelevel-bpe"])
def test_suffix_reading_gives_exactly_the_ids_of_tokenizing_the_whole_text_and_keeping_its_end(make_tokenizer):
    tokenizer = make_tokenizer()
    reference = make_tokenizer()
    reference.truncation_side = "left"
    encoder = TextEncoder(tokenizer, MAX_LENGTH)
    texts = [*random_texts(seed=11, count=300), "film " * 20_000 + "the end", "漢" * 50_000 + "ok"]
    encoded = encoder.encode(texts, truncate=True, side="left")
    for text, got in zip(texts, encoded):
        whole = reference(text, truncation=False)["input_ids"]
        cut = reference(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        assert got.ids == cut, text[-80:]
        assert got.truncated == (len(whole) > MAX_LENGTH)
    # the suffix path was taken, or this test would prove nothing
    assert sum(encoder._sufficient_part(text, "left", encoder._content_tokens) is not None for text in texts) > 100
    # and the encoder's own truncation side is left as the request found it: the next request cuts on the right
    assert (
        encoder.encode(["film " * 40 + "the end"], truncate=True)[0].ids
        == tokenizer("film " * 40 + "the end", truncation=True, max_length=MAX_LENGTH)["input_ids"]
    )


def test_a_huge_text_is_tokenized_from_a_short_suffix():
    encoder = TextEncoder(build_tiny_tokenizer(MAX_LENGTH), MAX_LENGTH)
    suffix = encoder._sufficient_part("!" * 2_000_000 + "end", "left", encoder._content_tokens)
    assert suffix is not None and suffix.endswith("end") and len(suffix) <= MAX_LENGTH * TextEncoder.PREFIX_CHARS_PER_TOKEN


@pytest.mark.parametrize("side", ["right", "left"])
def test_pairs_give_the_tokenizers_pair_encoding_with_longest_first_truncation(side):
    tokenizer, reference = build_tiny_tokenizer(MAX_LENGTH), build_tiny_tokenizer(MAX_LENGTH)
    reference.truncation_side = side
    encoder = TextEncoder(tokenizer, MAX_LENGTH)
    texts = random_texts(seed=5, count=40)[:-5]  # without the 100,000-character texts: the reference reads them whole
    pairs = [(texts[i], texts[-i - 1]) for i in range(len(texts))]
    requested = [item for pair in pairs for item in (pair, pair[0])]  # pairs and single texts mixed
    encoded = encoder.encode(requested, truncate=True, side=side)
    for item, got in zip(requested, encoded):
        if isinstance(item, str):
            assert type(got.ids) is list
            continue
        expected = reference(*item, truncation="longest_first", max_length=MAX_LENGTH)
        whole = reference(*item, truncation=False)["input_ids"]
        assert list(got.ids) == expected["input_ids"], item
        assert got.ids.second_start == expected["token_type_ids"].index(1)
        assert got.truncated == (len(whole) > MAX_LENGTH)


def test_a_huge_text_paired_with_a_short_one_is_read_from_a_bounded_part(monkeypatch):
    encoder = TextEncoder(build_tiny_tokenizer(MAX_LENGTH), MAX_LENGTH)
    read: list = []
    whole_ids = encoder._whole_ids
    monkeypatch.setattr(encoder, "_whole_ids", lambda texts: read.extend(texts) or whole_ids(texts))
    pairs = [("film " * 40_000, "a man eats"), ("a man eats", "film " * 40_000)]
    encoded = encoder.encode(pairs, truncate=True)
    assert all(len(part) <= MAX_LENGTH * TextEncoder.PREFIX_CHARS_PER_TOKEN for pair in read for part in pair)
    reference = build_tiny_tokenizer(MAX_LENGTH)
    for got, pair in zip(encoded, pairs):
        assert list(got.ids) == reference(*pair, truncation="longest_first", max_length=MAX_LENGTH)["input_ids"]
    with pytest.raises(TextTooLong, match=r"texts\[1\] has more than 16 tokens"):
        encoder.encode(["fine", ("film " * 400_000, "ok")], truncate=False)
    with pytest.raises(TextTooLong, match=r"texts\[1\] has 25 tokens"):  # a modest pair is counted exactly
        encoder.encode(["fine", ("film " * 20, "ok")], truncate=False)
