"""The engine façade for one model: texts in, finished per-text results out.

It is two halves, declared here: the front (`Front`: tokenization, then ranking into results) and the back
(`Backend`: queue, scheduler, batcher and model runner), which takes token ids and returns fp32 logits (the front
activates them, so a request may have its raw logits or another activation without a second forward pass). Only
plain data and `service.errors` cross between them, so the back can run in the same process (`service.scorer.Scorer`)
or in the engine process (`service.ipc.RemoteBackend`); `service.loading.make_backend` picks one. `EngineFacts` is
what building the back half decided, which the front is built from and /info shows.
"""

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from service import metrics
from service.postprocess import ACTIVATIONS, Activation, ProblemType, above_threshold, activated, text_result
from service.tokenization import EncodedText, EncoderPool, TextInput, TruncationSide


class Backend(Protocol):
    """The engine's back half: scores token ids in batches before a deadline."""

    @property
    def ready(self) -> bool:
        """Whether it takes new texts (false once draining, or once it has gone)."""
        ...

    async def score(self, token_ids: list[list[int]], deadline: float, caller: str = "") -> list[list[float]]:
        """Each text's fp32 logits, once all have run, by `deadline` (`time.monotonic()` seconds), sent by `caller`
        (`service.callers`: the queue is shared fairly between callers; "" for one anonymous caller).

        Raises a ClassifierError: Overloaded, NotAccepting, DeadlineExceeded, TextTooLargeForDevice, InferenceFailed
        (or, remote, EngineUnavailable). Cancelling the caller drops its texts still queued.
        """
        ...

    def info(self) -> dict[str, Any]:
        """How batches are shaped, the budget now in force included (/info's `batching`)."""
        ...

    async def stop(self) -> None:
        """Stop admitting and answer every queued text (remote: let go of the engine process)."""
        ...


class EngineFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What building the back half decided about the model: the front is built from it, /info shows it, and the
    engine process publishes it to the API processes."""

    model_id: str  # the model setting as given, or "default"
    model_path: str  # where its tokenizer loads from: the setting, or the default model's directory
    labels: tuple[str, ...]
    problem_type: ProblemType
    max_length: int
    device: str
    precision: str
    traced: bool  # the model runs as a checked TorchScript trace (`runner.traced_logits`)
    tuning: dict[str, Any]  # `TuningReport.as_dict()`, or {"enabled": false, "reason": ...}
    default_model_build: dict[str, Any] | None = None  # the default model's build report, when it is served

    def shown(self) -> dict[str, Any]:
        """As /info shows them (beside the live `batching`)."""
        shown = {
            "labels": list(self.labels),
            "problem_type": self.problem_type,
            "max_length": self.max_length,
            "device": self.device,
            "precision": self.precision,
            "traced": self.traced,
            "tuning": self.tuning,
        }
        if self.default_model_build is not None:
            shown["default_model_build"] = self.default_model_build
        return shown


class Front:
    """The engine's front half: texts to token ids (on tokenizer threads), logits to ranked per-text results."""

    def __init__(self, encoders: EncoderPool, labels: tuple[str, ...], problem_type: ProblemType) -> None:
        self.encoders = encoders
        self.labels = labels
        self.problem_type = problem_type
        self.multi_label = problem_type == "multi_label_classification"

    async def encode(self, texts: Sequence[TextInput], truncate: bool, side: TruncationSide | None, caller: str = "") -> list[EncodedText]:
        """Token ids for the texts and pairs (`EncoderPool.encode`: a big request off the event loop, by a free
        tokenizer worker, in `caller`'s turn); raises TextTooLong."""
        encoded = await self.encoders.encode(texts, truncate, side, caller)
        for text in encoded:
            metrics.INPUT_TOKENS.observe(len(text.ids))
            if text.truncated:
                metrics.TRUNCATED_TEXTS.inc()
        return encoded

    def results(
        self,
        encoded: list[EncodedText],
        logits: list[list[float]],
        top_k: int | None,
        activation: Activation | None,
        threshold: float,
    ) -> list[dict]:
        """Each text's `schemas.TextResult`, as plain data: scored by `activation` (None: the model's own); a
        multi-label model's also lists the labels whose probability is above `threshold`."""
        activation = activation or ACTIVATIONS[self.problem_type]
        results = []
        for text, text_logits in zip(encoded, logits):
            scores = activated(text_logits, activation)
            result = text_result(scores, self.labels, top_k, len(text.ids), text.truncated)
            if self.multi_label:
                probabilities = scores if activation == "sigmoid" else activated(text_logits, "sigmoid")
                result["above_threshold"] = above_threshold(probabilities, self.labels, threshold)
            results.append(result)
        return results


class Engine:
    """A loaded, warmed-up model behind its queue: `classify` texts, `stop` to drain. Built by
    `service.loading.load_engine`."""

    def __init__(self, front: Front, backend: Backend, facts: EngineFacts) -> None:
        self.front = front
        self.backend = backend
        self.facts = facts

    @property
    def model_id(self) -> str:
        return self.facts.model_id

    @property
    def labels(self) -> tuple[str, ...]:
        return self.front.labels

    @property
    def ready(self) -> bool:
        """Whether it takes new texts (false once stopping)."""
        return self.backend.ready

    async def classify(
        self,
        texts: Sequence[TextInput],
        *,
        top_k: int | None,
        truncate: bool,
        deadline: float,
        side: TruncationSide | None = None,
        activation: Activation | None = None,
        threshold: float = 0.5,
        caller: str = "",
    ) -> list[dict]:
        """Each text's or pair's result (a `schemas.TextResult` as plain data), in order, once all have run by
        `deadline` (`time.monotonic()` seconds); long texts cut on `side` (None: the tokenizer's own), scored by
        `activation` (None: the model's own; "none": the raw logits), for `caller` (its fair share of the queue).
        /classify and /predict both answer from this.

        Raises a ClassifierError: TextTooLong, or any the back half raises. Cancelling the caller (its client left)
        drops its texts still queued.
        """
        encoded = await self.front.encode(texts, truncate, side, caller)
        logits = await self.backend.score([text.ids for text in encoded], deadline, caller)
        metrics.CLASSIFIED_TEXTS.inc(len(encoded))
        return self.front.results(encoded, logits, top_k, activation, threshold)

    def refuse_waiting(self, caller: str, refusal: Callable[[], Exception]) -> None:
        """Fail `caller`'s requests still waiting to be tokenized with a `refusal()` each."""
        self.front.encoders.refuse_waiting(caller, refusal)

    def info(self) -> dict[str, Any]:
        """What /info shows of the loaded model: labels, how and where it runs, and how it batches."""
        return {**self.facts.shown(), "batching": self.backend.info()}

    async def stop(self) -> None:
        """Stop admitting, answer every queued text, then release the threads."""
        await self.backend.stop()
        self.front.encoders.shutdown()
