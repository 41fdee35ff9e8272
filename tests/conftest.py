"""Shared fixtures: tiny random classifiers built offline from a config, and real service processes."""

import contextlib
import string
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from loadtest.probe import ROOT as ROOT  # re-exported: the tests import the tree's root from here
from loadtest.probe import ServerProcess, free_port, service_command

TINY_MAX_LENGTH = 64
WORDS = (
    "the a an this that film movie was is great good bad awful loved hated waste of two hours i it and not very "
    "plot story actors acting boring brilliant funny slow long short ending music"
).split()


def build_tiny_tokenizer(max_length: int = TINY_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer over letters, digits, punctuation and a few words: every English text encodes."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase)
    vocab = specials + letters + [f"##{c}" for c in letters] + list(string.digits) + list(string.punctuation) + WORDS
    vocab = list(dict.fromkeys(vocab))  # one id per token: "a" and "i" are letters and words
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT's: pairs carry token type ids
    )


def build_tiny_model(directory: Path, labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE"), problem_type: str | None = None, seed: int = 0) -> Path:
    """Save a 2-layer random BERT classifier and its tokenizer to `directory`; same seed, same weights."""
    tokenizer = build_tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_LENGTH,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=problem_type,
        initializer_range=0.5,  # large random weights, so scores differ clearly from text to text
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-single-label"))


@pytest.fixture(scope="session")
def multi_label_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-multi-label"), ("ACTION", "COMEDY", "DRAMA"), "multi_label_classification")


@pytest.fixture(scope="session")
def regression_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-regression"), ("RATING",), "regression")


@pytest.fixture(autouse=True)
def _running_test(request) -> Iterator[None]:
    """Remember which test runs, so that run_service can refuse to start a server for one not marked integration."""
    global _running_item
    _running_item = request.node
    yield
    _running_item = None


_running_item: pytest.Item | None = None


def _require_integration_marker() -> None:
    if _running_item is not None and _running_item.get_closest_marker("integration") is None:
        raise RuntimeError(
            f"{_running_item.nodeid} starts a service process but is not marked integration: add "
            "@pytest.mark.integration (or pytestmark = pytest.mark.integration for the module), so that "
            '`pytest -m "not integration"` stays the fast in-process suite'
        )


@contextlib.contextmanager
def start_service(model_dir: Path, extra_env: dict[str, str] | None = None, timeout: float = 90) -> Iterator[str]:
    """Run `python -m service` on a free loopback port until the block ends; yields its base URL once ready."""
    with run_service(model_dir, extra_env, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def run_service(model_dir: Path, extra_env: dict[str, str] | None = None, timeout: float = 90) -> Iterator[tuple[str, subprocess.Popen]]:
    """Like start_service, but also yields the process, for tests that signal it."""
    _require_integration_marker()
    port = free_port()
    # No drain delay unless a test asks for one: every test's teardown sends SIGTERM.
    env = {"CLASSIFIER_TORCH_THREADS": "1", "CLASSIFIER_DRAIN_DELAY_SECONDS": "0", **(extra_env or {})}
    command = [*service_command(model_dir, port), "--host", "127.0.0.1"]
    with tempfile.TemporaryDirectory() as logs, ServerProcess(command, port, Path(logs) / "service.log", env, ready_timeout=timeout) as server:
        yield server.url, server.process


@pytest.fixture(scope="session")
def service_url(tiny_model_dir) -> Iterator[str]:
    with start_service(tiny_model_dir) as url:
        yield url
