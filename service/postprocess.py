"""From logits to answers: the activation each problem type calls for (or the one a request asks for, or none for raw
logits), computed in the engine's front from the fp32 logits the back half returns, then top-k ranking into each
text's finished result, as plain data in the shape of `schemas.TextResult`: the API serialises it without building
and validating pydantic models again."""

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
PROBLEM_TYPES: tuple[ProblemType, ...] = get_args(ProblemType)
# What turns a text's logits into its scores: "none" leaves the logits as they are (raw scores).
Activation = Literal["softmax", "sigmoid", "none"]
ACTIVATIONS: dict[ProblemType, Activation] = {
    "single_label_classification": "softmax",
    "multi_label_classification": "sigmoid",
    "regression": "none",
}


@dataclass(frozen=True, slots=True)
class LabelScore:
    """One label and its score (probability, or the raw value for regression)."""

    label: str
    score: float


def problem_type_of(configured: str | None, num_labels: int) -> ProblemType:
    """The checkpoint's problem type; unset means regression for one output and single-label otherwise (as in transformers)."""
    for problem_type in PROBLEM_TYPES:
        if configured == problem_type:
            return problem_type
    if configured is not None:
        raise ValueError(f"unsupported problem_type {configured!r} in the model config")
    return "regression" if num_labels == 1 else "single_label_classification"


def activated(logits: list[float], activation: Activation) -> list[float]:
    """One text's scores: softmax, sigmoid per label, or the logits themselves. Plain Python: for the few labels of a
    classifier it costs less than a tensor, and the front applies it per text."""
    if activation == "softmax":
        top = max(logits)
        exps = [math.exp(logit - top) for logit in logits]
        total = sum(exps)
        return [value / total for value in exps]
    if activation == "sigmoid":
        return [_sigmoid(logit) for logit in logits]
    return logits


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1 / (1 + math.exp(-logit))
    exp = math.exp(logit)  # exp(-logit) would overflow for very negative logits
    return exp / (1 + exp)


def activate(logits: torch.Tensor, problem_type: ProblemType) -> list[list[float]]:
    """Scores per text of a batch's logits: softmax for single-label, sigmoid for multi-label, the raw value for
    regression."""
    return [activated(row, ACTIVATIONS[problem_type]) for row in logits.float().tolist()]


def score_differences(reference: list[list[float]], other: list[list[float]], problem_type: ProblemType) -> tuple[float, int]:
    """How far `other` logits are from `reference` logits of the same texts, as scores: the largest difference of any
    score, and how many texts' top-1 label changed (what a precision's fidelity is judged on)."""
    activation = ACTIVATIONS[problem_type]
    largest, changed = 0.0, 0
    for expected_logits, got_logits in zip(reference, other, strict=True):
        expected, got = activated(expected_logits, activation), activated(got_logits, activation)
        largest = max(largest, *(abs(a - b) for a, b in zip(expected, got, strict=True)))
        changed += max(range(len(expected)), key=expected.__getitem__) != max(range(len(got)), key=got.__getitem__)
    return largest, changed


def rank(scores: list[float], labels: tuple[str, ...], top_k: int | None) -> list[LabelScore]:
    """Labels ordered by score, best first, cut to top_k (all of them when top_k is None)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return [LabelScore(labels[i], scores[i]) for i in order[:top_k]]


def text_result(scores: list[float], labels: tuple[str, ...], top_k: int | None, tokens: int, truncated: bool) -> dict:
    """One text's finished answer (a `schemas.TextResult` as plain data): its best label and score, the ranked
    labels, and how it was read."""
    ranked = rank(scores, labels, top_k)
    return {
        "label": ranked[0].label,
        "score": ranked[0].score,
        "labels": [{"label": item.label, "score": item.score} for item in ranked],
        "tokens": tokens,
        "truncated": truncated,
    }


def above_threshold(probabilities: list[float], labels: tuple[str, ...], threshold: float) -> list[str]:
    """A multi-label model's answer: every label whose probability is above `threshold`, best first."""
    return [item.label for item in rank(probabilities, labels, None) if item.score > threshold]
