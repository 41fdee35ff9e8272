"""The HTTP API's request and response bodies."""

import unicodedata
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema, field_validator

# Unicode categories that carry no content a classifier can read: control (Cc), format (Cf: zero-width space,
# joiners, BOM), surrogates (Cs) and separators (Z*).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
# JSON Schema cannot say "has a visible character": the description does, and the validator checks it.
TEXT = {"type": "string", "minLength": 1}
ONE_OR_MORE_STRINGS = {"anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1}]}


class ClassifyRequest(BaseModel):
    """Texts to classify, and how to answer."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["I loved this film", "What a waste of two hours"], "top_k": 1}]},
    )

    texts: Annotated[list[str], WithJsonSchema(ONE_OR_MORE_STRINGS)] = Field(
        description="One text, or a list of texts answered in order. Each must be valid Unicode (no lone surrogates) "
        "with at least one visible character (not only whitespace, control or zero-width characters)."
    )
    # Strict: JSON `true` or `"2"` is a mistake to report, not a number to guess.
    top_k: StrictInt | None = Field(None, ge=1, description="How many labels to list per text; null lists them all.")
    truncate: StrictBool = Field(True, description="Cut texts longer than the model's maximum; false answers 413 instead.")
    timeout_ms: StrictInt | None = Field(
        None,
        ge=1,
        le=600_000,
        description="How long you wait for the answer, from arrival, in milliseconds (also the X-Request-Timeout-Ms "
        "header; the smaller wins; unset = the server's CLASSIFIER_REQUEST_TIMEOUT_MS). A request the queue is not "
        "predicted to reach in time is refused at once with 429; texts still queued at the deadline are dropped "
        "and the request answers 504.",
    )

    @field_validator("texts", mode="before")
    @classmethod
    def _one_or_more_strings(cls, texts: object) -> list[str]:
        """Checked by hand, so each message names the offending text instead of pydantic's union branches."""
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list):
            raise ValueError(f"must be a string or a list of strings, not {type(texts).__name__}")
        if not texts:
            raise ValueError("send at least one text")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{index}] must be a string, not {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"texts[{index}] is empty or blank; every text needs some content")
            _check_readable(index, text)
        return texts


def _check_readable(index: int, text: str) -> None:
    """Reject what JSON can carry but a tokenizer cannot read: lone surrogates, and texts with nothing visible."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"texts[{index}] has a lone UTF-16 surrogate ({text[error.start]!a}) at character {error.start}; "
            "send valid Unicode (pair the surrogate or remove it)"
        ) from None
    if all(unicodedata.category(char) in INVISIBLE_CATEGORIES for char in text):
        raise ValueError(
            f"texts[{index}] has only control, zero-width or other invisible characters; every text needs some content"
        )


class LabelScoreOut(BaseModel):
    """A label and its score."""

    label: str
    score: float


class TextResult(BaseModel):
    """The answer for one text: its best label, the ranked labels, and how it was read."""

    label: str = Field(description="The best-scoring label.")
    score: float = Field(description="Its probability (softmax or sigmoid), or the raw value for regression.")
    labels: list[LabelScoreOut] = Field(description="Labels by score, best first, cut to top_k.")
    tokens: int = Field(description="Tokens the model read, special tokens included.")
    truncated: bool = Field(description="Whether the text was cut to the model's maximum length.")


class ClassifyResponse(BaseModel):
    """Results in the order the texts were sent."""

    model: str
    results: list[TextResult]


class ErrorResponse(BaseModel):
    """What went wrong, in words a person can act on."""

    error: str
