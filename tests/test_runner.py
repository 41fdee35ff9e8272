"""The model runner and its neighbours, in-process: precision per device, padding, activations, encoding."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.postprocess import activate, problem_type_of, rank, score_differences
from service.runner import DTYPES, ModelRunner, resolve_device, resolve_precision, with_linear_weights_in
from service.tokenization import PairIds, TextEncoder, TextTooLong, model_max_length
from tests.conftest import TINY_MAX_LENGTH

TEXTS = ["I loved this film", "What a waste of two hours, the plot was slow and the acting awful", "ok"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return (
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )


def unpadded_logits(model, tokenizer, texts):
    with torch.inference_mode():
        return torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in texts])


@pytest.mark.parametrize("trace", [False, True])
def test_a_padded_batch_gives_each_text_its_unpadded_logits(model_and_tokenizer, trace):
    model, tokenizer = model_and_tokenizer
    runner = ModelRunner(model, torch.device("cpu"), "fp32", tokenizer.pad_token_id, trace)
    assert runner.traced == trace
    sequences = tokenizer(TEXTS)["input_ids"]
    logits = runner.run(sequences, padded_length=max(map(len, sequences)) + 5)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, unpadded_logits(model, tokenizer, TEXTS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("trace", [False, True])
def test_pairs_batched_with_single_texts_each_get_the_logits_of_the_model_run_alone_on_them(model_and_tokenizer, trace):
    model, tokenizer = model_and_tokenizer
    runner = ModelRunner(model, torch.device("cpu"), "fp32", tokenizer.pad_token_id, trace)
    assert runner.traced == trace
    pairs = [("A man is eating food.", "Someone eats."), ("The film was long", "it was " + "very " * 10 + "boring")]
    encoder = TextEncoder(tokenizer, TINY_MAX_LENGTH)
    encoded = encoder.encode([TEXTS[0], pairs[0], TEXTS[1], pairs[1]], truncate=True)
    sequences = [text.ids for text in encoded]
    assert [type(ids) for ids in sequences] == [list, PairIds, list, PairIds]
    inputs = runner.collate(sequences, padded_length=max(map(len, sequences)) + 3)
    assert inputs["token_type_ids"][1].tolist()[: len(sequences[1])] == tokenizer(*pairs[0])["token_type_ids"]
    with torch.inference_mode():
        alone = [model(**tokenizer(*pair, return_tensors="pt")).logits[0] for pair in pairs]
    logits = runner.forward(inputs)
    torch.testing.assert_close(logits[[1, 3]], torch.stack(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[[0, 2]], unpadded_logits(model, tokenizer, TEXTS[:2]), atol=1e-4, rtol=1e-4)
    # token type ids matter to this model: read as one text, the pair scores differently
    flat = runner.run([list(sequences[1])], padded_length=len(sequences[1]))
    assert not torch.allclose(flat[0], alone[0], atol=1e-4)


def test_collate_pads_each_row_to_the_batch_length_and_masks_the_padding(model_and_tokenizer):
    model, _ = model_and_tokenizer
    runner = ModelRunner(model, torch.device("cpu"), "fp32", pad_token_id=7)
    inputs = runner.collate([[1, 2, 3], [4], [5, 6, 8, 9]], padded_length=5)
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 7, 7], [4, 7, 7, 7, 7], [5, 6, 8, 9, 7]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert inputs["token_type_ids"].tolist() == [[0] * 5] * 3  # the tiny BERT takes them
    assert all(tensor.dtype == torch.long and not tensor.is_pinned() for tensor in inputs.values())  # pinned on CUDA only


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_under_autocast_and_still_returns_fp32(model_and_tokenizer, precision):
    """The GPU's code path (autocast, fp32 outputs), exercised on the CPU."""
    model, tokenizer = model_and_tokenizer
    runner = ModelRunner(model, torch.device("cpu"), precision, tokenizer.pad_token_id)
    sequences = tokenizer(TEXTS)["input_ids"]
    logits = runner.run(sequences, padded_length=max(map(len, sequences)))
    assert logits.dtype == torch.float32
    reference = unpadded_logits(model, tokenizer, TEXTS)
    assert not torch.equal(logits, reference)  # autocast really ran in lower precision
    torch.testing.assert_close(logits, reference, atol=0.15, rtol=0.05)
    probabilities = torch.tensor(activate(logits, "single_label_classification"))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(TEXTS)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_linear_weights_held_in_low_precision_give_exactly_autocasts_logits(model_and_tokenizer, precision):
    model, tokenizer = model_and_tokenizer
    sequences = tokenizer(TEXTS)["input_ids"]
    padded = max(map(len, sequences))
    fp32 = ModelRunner(model, torch.device("cpu"), "fp32", tokenizer.pad_token_id)
    inputs = fp32.collate(sequences, padded)
    with torch.inference_mode(), torch.autocast("cpu", dtype=DTYPES[precision]):
        autocast_over_fp32_weights = model(**inputs).logits.float()
    runner = ModelRunner(model, torch.device("cpu"), precision, tokenizer.pad_token_id)
    assert torch.equal(runner.run(sequences, padded), autocast_over_fp32_weights)
    traced = ModelRunner(model, torch.device("cpu"), precision, tokenizer.pad_token_id, trace=True)
    assert traced.traced and torch.equal(traced.run(sequences, padded), autocast_over_fp32_weights)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}  # the fp32 model is untouched
    assert runner.model.classifier.weight.dtype == DTYPES[precision]
    assert runner.model.bert.embeddings.word_embeddings.weight is model.bert.embeddings.word_embeddings.weight


class _Logits:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _PaddingSensitive(torch.nn.Module):
    """Takes a Python branch on whether the batch holds padding: a trace records one side of it only."""

    config = type("Config", (), {"vocab_size": 100})()

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Logits:
        lengths = attention_mask.sum(-1, keepdim=True).float()
        return _Logits(self.head(lengths if bool((attention_mask == 0).any()) else -lengths))


class _Untraceable(_PaddingSensitive):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Logits:
        if torch.jit.is_tracing():
            raise RuntimeError("an operation TorchScript cannot record")
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize(("model", "says"), [(_PaddingSensitive(), "differ"), (_Untraceable(), "could not be traced")])
def test_a_model_whose_trace_differs_or_fails_runs_operator_by_operator(model, says, caplog):
    runner = ModelRunner(model, torch.device("cpu"), "fp32", pad_token_id=0, trace=True)
    assert not runner.traced
    assert says in caplog.text and "operator by operator" in caplog.text
    unpadded = runner.run([[5, 6, 7], [8, 9, 10]], padded_length=3)
    torch.testing.assert_close(unpadded, model.head(torch.tensor([[-3.0], [-3.0]])).detach())


def test_a_linear_weight_tied_to_another_module_is_left_shared():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10)
    head.weight = embedding.weight
    copy = with_linear_weights_in(torch.nn.Sequential(embedding, head), torch.bfloat16)
    assert copy[1].weight is embedding.weight and copy[0].weight is embedding.weight
    assert copy[1].bias.dtype == torch.bfloat16 and head.bias.dtype == torch.float32


def test_precision_is_chosen_per_device():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_activations_follow_the_problem_type():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert activate(logits, "single_label_classification")[0] == pytest.approx(logits.softmax(-1)[0].tolist())
    assert activate(logits, "multi_label_classification")[0] == pytest.approx(logits.sigmoid()[0].tolist())
    assert activate(logits.half(), "regression")[0] == pytest.approx([2.0, -1.0, 0.5])
    assert problem_type_of(None, 1) == "regression"
    assert problem_type_of(None, 3) == "single_label_classification"
    assert problem_type_of("multi_label_classification", 3) == "multi_label_classification"
    with pytest.raises(ValueError, match="unsupported problem_type"):
        problem_type_of("token_classification", 3)


def test_score_differences_compare_activated_scores_and_count_changed_top_labels():
    reference = [[2.0, -1.0], [0.1, 0.0]]
    other = [[2.0, -0.9], [0.0, 0.1]]  # the second text's top label changes
    largest, changed = score_differences(reference, other, "single_label_classification")
    expected = max((torch.tensor(reference).softmax(-1) - torch.tensor(other).softmax(-1)).abs().max().item(), 0.0)
    assert largest == pytest.approx(expected) and changed == 1
    assert score_differences(reference, reference, "multi_label_classification") == (0.0, 0)
    assert score_differences([[1.5]], [[1.25]], "regression") == (0.25, 0)


def test_rank_orders_labels_and_cuts_to_top_k():
    labels = ("A", "B", "C")
    assert [item.label for item in rank([0.2, 0.5, 0.3], labels, None)] == ["B", "C", "A"]
    assert [item.label for item in rank([0.2, 0.5, 0.3], labels, 2)] == ["B", "C"]


def test_encoder_truncates_keeping_special_tokens_or_refuses(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    encoder = TextEncoder(tokenizer, TINY_MAX_LENGTH)
    long_text = "film " * 100
    short, cut = encoder.encode(["good film", long_text], truncate=True)
    assert not short.truncated and short.ids == tokenizer("good film")["input_ids"]
    assert cut.truncated and len(cut.ids) == TINY_MAX_LENGTH
    assert cut.ids[0] == tokenizer.cls_token_id and cut.ids[-1] == tokenizer.sep_token_id
    with pytest.raises(TextTooLong) as refused:
        encoder.encode(["good film", long_text], truncate=False)
    assert (refused.value.index, refused.value.tokens, refused.value.max_length) == (1, 102, TINY_MAX_LENGTH)


def test_max_length_comes_from_the_tokenizer_or_the_position_table(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert model_max_length(tokenizer, 512) == TINY_MAX_LENGTH
    assert model_max_length(tokenizer, 32) == 32
