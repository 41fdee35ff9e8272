"""The HTTP API's request and response bodies."""

import unicodedata
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from service.tokenization import TextInput, TruncationSide

# Unicode categories that carry no content a classifier can read: control (Cc), format (Cf: zero-width space,
# joiners, BOM), surrogates (Cs) and separators (Z*).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
# JSON Schema cannot say "has a visible character": the description does, and the validator checks it.
TEXT = {"type": "string", "minLength": 1}
PAIR = {"type": "array", "items": TEXT, "minItems": 2, "maxItems": 2, "description": "[text, text_pair]"}
TEXT_OR_PAIR = {"anyOf": [TEXT, PAIR]}
ONE_OR_MORE_INPUTS = {"anyOf": [TEXT, {"type": "array", "items": TEXT_OR_PAIR, "minItems": 1}]}
# TEI's `inputs`: one text, one pair, or a list of texts and pairs (exactly two strings are one pair, as TEI reads them).
TEI_INPUTS = {"anyOf": [TEXT, PAIR, {"type": "array", "items": TEXT_OR_PAIR, "minItems": 1}]}
TRUNCATION_DIRECTION = Field(
    None,
    description="Which end of a long text is cut: right (keep its beginning) or left (keep its end); unset = the "
    "tokenizer's own side (right for almost every model).",
)


class ClassifyRequest(BaseModel):
    """Texts to classify, and how to answer."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["I loved this film", "What a waste of two hours"], "top_k": 1},
                {"texts": [["A man is eating.", "Someone eats."]], "raw_scores": True},
            ]
        },
    )

    texts: Annotated[list[TextInput], WithJsonSchema(ONE_OR_MORE_INPUTS)] = Field(
        description="One text, or a list answered in order of texts and [text, text_pair] pairs (for cross-encoders "
        "and NLI models: encoded with the tokenizer's pair template, token type ids included, and cut longest first). "
        "Each text must be valid Unicode (no lone surrogates) with at least one visible character (not only "
        "whitespace, control or zero-width characters)."
    )
    # Strict: JSON `true` or `"2"` is a mistake to report, not a number to guess.
    top_k: StrictInt | None = Field(None, ge=1, description="How many labels to list per text; null lists them all.")
    truncate: StrictBool = Field(True, description="Cut texts longer than the model's maximum; false answers 413 instead.")
    truncation_direction: TruncationSide | None = TRUNCATION_DIRECTION
    raw_scores: StrictBool = Field(False, description="Answer the model's logits instead of probabilities.")
    threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="For multi-label models: each result's above_threshold lists the labels whose probability is above it.",
    )
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
    def _one_or_more_inputs(cls, texts: object) -> list[TextInput]:
        """Checked by hand, so each message names the offending text instead of pydantic's union branches."""
        return _inputs([texts] if isinstance(texts, str) else texts, "texts")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _any_case(cls, direction: object) -> object:
        return direction.lower() if isinstance(direction, str) else direction


def _inputs(items: object, field: str) -> list[TextInput]:
    """A non-empty list of readable texts and [text, text_pair] pairs (a pair as a tuple)."""
    if not isinstance(items, list):
        raise ValueError(f"must be a string or a list of strings and [text, text_pair] pairs, not {type(items).__name__}")
    if not items:
        raise ValueError("send at least one text")
    inputs: list[TextInput] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            _check_readable(item, field, index)
            inputs.append(item)
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item):
            _check_readable(item[0], field, index, 0)
            _check_readable(item[1], field, index, 1)
            inputs.append((item[0], item[1]))
        else:
            raise ValueError(f"{field}[{index}] must be a string or a [text, text_pair] pair of strings")
    return inputs


def _check_readable(text: str, field: str, index: int, part: int | None = None) -> None:
    """Reject what JSON can carry but a tokenizer cannot read: blank texts, lone surrogates, and texts with nothing
    visible. The text's place (`field[index]`, and `[part]` in a pair) is written out only for a refusal."""
    if text.strip() and text.isprintable() and text.isascii():  # the common case, checked at C speed
        return
    where = f"{field}[{index}]" if part is None else f"{field}[{index}][{part}]"
    if not text.strip():
        raise ValueError(f"{where} is empty or blank; every text needs some content")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} has a lone UTF-16 surrogate ({text[error.start]!a}) at character {error.start}; "
            "send valid Unicode (pair the surrogate or remove it)"
        ) from None
    if all(unicodedata.category(char) in INVISIBLE_CATEGORIES for char in text):
        raise ValueError(f"{where} has only control, zero-width or other invisible characters; every text needs some content")


class PipelineParameters(BaseModel):
    """The Hugging Face Inference API's `parameters` for text classification (what huggingface_hub's
    InferenceClient.text_classification sends)."""

    top_k: StrictInt | None = Field(None, ge=1, description="How many labels to list per input; null lists them all.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="The activation: none answers the logits; unset = the model's own."
    )


class PredictRequest(BaseModel):
    """Text-embeddings-inference's (TEI) /predict request, and the Hugging Face Inference API's form of it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"inputs": "I like you. I love you"},
                {"inputs": [["I like you."], ["I hate you."]]},
                {"inputs": [["I like you.", "I love you"]], "raw_scores": True},
            ]
        },
    )

    inputs: Annotated[list[TextInput], WithJsonSchema(TEI_INPUTS)] = Field(
        description="As TEI reads it: a text, a [text, text_pair] pair (exactly two strings), or a list of texts and "
        "pairs. One text or pair answers one list of labels; a list answers a list of lists."
    )
    raw_scores: StrictBool = Field(False, description="Answer the model's logits instead of probabilities.")
    truncate: StrictBool | None = Field(False, description="Cut inputs longer than the model's maximum; false (TEI's default) answers 413 instead.")
    truncation_direction: TruncationSide | None = TRUNCATION_DIRECTION
    parameters: PipelineParameters | None = Field(
        None,
        description="The Hugging Face Inference API's form: when given, every input (even one) answers a list of "
        "labels, cut to parameters.top_k, as huggingface_hub's InferenceClient.text_classification reads it.",
    )

    # Whether one text or pair was sent (answered as one list, not a list of lists).
    _one_input: bool = PrivateAttr(False)

    @field_validator("inputs", mode="before")
    @classmethod
    def _tei_inputs(cls, inputs: object) -> list[TextInput]:
        return _inputs([inputs] if _one_tei_input(inputs) else inputs, "inputs")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _any_case(cls, direction: object) -> object:
        return direction.lower() if isinstance(direction, str) else direction

    @model_validator(mode="wrap")
    @classmethod
    def _note_one_input(cls, data: object, handler: ModelWrapValidatorHandler["PredictRequest"]) -> "PredictRequest":
        request = handler(data)
        request._one_input = isinstance(data, dict) and _one_tei_input(data.get("inputs"))
        return request

    @property
    def one_input(self) -> bool:
        return self._one_input


def _one_tei_input(inputs: object) -> bool:
    """TEI's reading: a string is one input, and so is a list of exactly two strings (a pair)."""
    return isinstance(inputs, str) or (isinstance(inputs, list) and len(inputs) == 2 and all(isinstance(part, str) for part in inputs))


class LabelScoreOut(BaseModel):
    """A label and its score."""

    label: str
    score: float


class TextResult(BaseModel):
    """The answer for one text or pair: its best label, the ranked labels, and how it was read."""

    label: str = Field(description="The best-scoring label.")
    score: float = Field(description="Its probability (softmax or sigmoid), or the raw value for regression and with raw_scores.")
    labels: list[LabelScoreOut] = Field(description="Labels by score, best first, cut to top_k.")
    tokens: int = Field(description="Tokens the model read, special tokens included.")
    truncated: bool = Field(description="Whether the text was cut to the model's maximum length.")
    above_threshold: list[str] | None = Field(
        None, description="Multi-label models only: every label whose probability is above the request's threshold."
    )


class ClassifyResponse(BaseModel):
    """Results in the order the texts were sent."""

    model: str
    results: list[TextResult]


class ErrorResponse(BaseModel):
    """What went wrong, in words a person can act on, and the request's id (also its X-Request-Id header)."""

    error: str
    request_id: str | None = None


class TeiErrorResponse(ErrorResponse):
    """/predict's errors in TEI's shape: its error_type beside the message."""

    error_type: Literal["validation", "tokenizer", "overloaded", "backend", "unhealthy", "empty"]


class LabelScores(BaseModel):
    """TEI's answer to one input: every label and its score, best first."""

    root: list[LabelScoreOut]
