"""From logits to answers: the activation each problem type calls for (computed in fp32, by the scorer), then
top-k ranking into each text's finished result (by the engine's front), as plain data in the shape of
`schemas.TextResult`: the API serialises it without building and validating pydantic models again."""

from dataclasses import dataclass
from typing import Literal, get_args

import torch

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
PROBLEM_TYPES: tuple[ProblemType, ...] = get_args(ProblemType)


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


def activate(logits: torch.Tensor, problem_type: ProblemType) -> list[list[float]]:
    """Scores per text: softmax for single-label, sigmoid for multi-label, the raw value for regression."""
    logits = logits.float()
    if problem_type == "single_label_classification":
        scores = logits.softmax(dim=-1)
    elif problem_type == "multi_label_classification":
        scores = logits.sigmoid()
    else:
        scores = logits
    return scores.tolist()


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
