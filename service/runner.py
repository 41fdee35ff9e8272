"""The model runner: loads a sequence classifier and runs dynamically padded batches on one device; its adapter to
the batcher (`BatchModelAdapter`) scores batches and warms the model up."""

import contextlib
import copy
import inspect
import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from service.postprocess import ProblemType, problem_type_of
from service.scheduler import BatchingPolicy
from service.splitting import OutOfMemory
from service.tokenization import PairIds

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready to serve: the model in eval mode, its fast tokenizer, labels and activation."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]
    problem_type: ProblemType
    max_position_embeddings: int | None


def load_classifier(model_id: str, device: torch.device) -> LoadedModel:
    """Load any Hugging Face sequence-classification checkpoint (a local directory, or a hub id when reachable)."""
    tokenizer = AutoTokenizer.from_pretrained(model_id, use_fast=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_id, dtype=torch.float32)
    model.to(device).eval()
    config = model.config
    labels = tuple(config.id2label[i] for i in range(config.num_labels))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        labels=labels,
        problem_type=problem_type_of(config.problem_type, config.num_labels),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
    )


def resolve_device(name: str) -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision when it is not measured: `auto` means fp16 autocast on CUDA and fp32 elsewhere (the safe choice
    without a measurement: emulated bf16 slows BERT 6-20x on CPUs without bf16 instructions)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "%s autocast on a CPU without bf16 instructions (avx512_bf16 or amx_bf16) is emulated: expect it several times slower than fp32",
            precision,
        )
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether the CPU advertises bf16 instructions (AVX512-BF16 or AMX-BF16) in the Linux kernel's CPU flags.

    Only a hint that bf16 may pay off (tuning then times it): torch exposes no such check (its capability string
    says AVX512 either way, and mkldnn's bf16 check accepts any AVX512 CPU). False where /proc/cpuinfo is absent.
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether the GPU runs bf16 natively (Ampere and later); emulated bf16 is not worth timing."""
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no such argument and counts native support only
        return torch.cuda.is_bf16_supported()


def release_cached_memory(device: torch.device) -> None:
    """After an out-of-memory, hand the caching allocator's free blocks back so the next batch can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_linear_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` whose linear layers hold their weights and biases in `dtype`, sharing every other tensor.

    Autocast casts each linear layer's fp32 weights to `dtype` on every forward pass (5 of the 15 ms of a small
    MiniLM batch on the CPU); holding them cast already computes exactly the same logits. A parameter some other
    module also uses (a tied embedding) stays as it is.
    """
    linear = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    shared = {
        id(parameter) for module in model.modules() if not isinstance(module, torch.nn.Linear) for parameter in module.parameters(recurse=False)
    }
    memo: dict[int, object] = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    for module in linear:
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in shared:
                memo[id(parameter)] = torch.nn.Parameter(parameter.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo)


class _LogitsOf(torch.nn.Module):
    """The model as a function of its input tensors in a fixed order, returning the logits alone: what a trace takes."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


# Token ids a trace is checked on: one text, texts of several lengths padded (a trace records the path of one
# example: a mask or a shape taken for fixed would show here), and pairs where the model reads token type ids.
_TRACE_CHECK_LENGTHS = ((9, 16, 3), (24,), (5, 5))


def traced_logits(runner: "ModelRunner") -> Callable[..., torch.Tensor] | None:
    """The runner's model traced to TorchScript, as a function of the collated tensors (in collate's order) returning
    the logits; None (and a warning saying why) where it cannot be traced or its logits differ from the eager model's.

    Run eagerly, the model hands the interpreter lock back and takes it again around every operator, and any other
    Python thread of the process (the event loop, tokenizer threads) holds it up to the 5 ms switch interval each
    time: a 512-token text took 7x as long beside one busy Python thread. A trace runs the whole forward pass in one
    call that releases the lock once. Checked here against the eager model on several shapes, in the runner's own
    precision, before it is used.
    """
    vocabulary = int(getattr(getattr(runner.model, "config", None), "vocab_size", 0) or 0)
    if vocabulary < 2:
        log.warning("the model states no vocabulary size to check a trace with: it runs operator by operator")
        return None

    def example(lengths: tuple[int, ...], pairs: bool) -> dict[str, torch.Tensor]:
        sequences = [[1 + (7 * i + 3 * n) % (vocabulary - 1) for i in range(length)] for n, length in enumerate(lengths)]
        if pairs:
            sequences = [PairIds(ids, len(ids) // 2) for ids in sequences]
        inputs = runner.collate(sequences, max(lengths))
        return {name: tensor.to(runner.device) for name, tensor in inputs.items()}

    examples = [example(lengths, pairs=False) for lengths in _TRACE_CHECK_LENGTHS]
    if runner.takes_token_type_ids:
        examples.append(example(_TRACE_CHECK_LENGTHS[0], pairs=True))
    names = tuple(examples[0])
    try:
        with warnings.catch_warnings(), runner.running():
            warnings.simplefilter("ignore")  # TracerWarnings: every shape-dependent branch is checked below instead
            traced = torch.jit.trace(_LogitsOf(runner.model, names), tuple(examples[0].values()), check_trace=False)
            for inputs in examples:
                expected, got = runner.model(**inputs).logits.float(), traced(*inputs.values()).float()
                if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
                    difference = (got - expected).abs().max().item()
                    log.warning("the traced model's logits differ from the model's by up to %.3g: it runs operator by operator", difference)
                    return None
    except Exception as error:  # a model whose forward pass TorchScript cannot record: eager still serves it
        log.warning("the model could not be traced (%s: %s): it runs operator by operator", type(error).__name__, error)
        return None
    return traced


class ModelRunner:
    """Runs one batch at a time: pads token ids to the batch's length, forwards under autocast, returns fp32 logits.

    Building the padded inputs (`collate`) and running the model (`forward`) are separate steps, so the batcher can
    build the next batch's inputs on another thread while the current batch runs. Under fp16 or bf16 it runs a copy
    of the model with its linear layers' weights in that precision (`with_linear_weights_in`). With `trace`, it runs
    the model as a checked TorchScript trace where one can be made (`traced_logits`), else eagerly.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, pad_token_id: int, trace: bool = False) -> None:
        self.model = model if precision == "fp32" else with_linear_weights_in(model, DTYPES[precision])
        self.device = device
        self.precision = precision
        self.pad_token_id = pad_token_id
        self.takes_token_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters
        # Page-locked host memory lets the copy to the GPU run asynchronously (non_blocking has no effect without).
        self._pin_memory = device.type == "cuda"
        self._traced = traced_logits(self) if trace else None

    @property
    def traced(self) -> bool:
        """Whether the forward pass runs as a TorchScript trace."""
        return self._traced is not None

    def running(self) -> contextlib.AbstractContextManager:
        """The context every forward pass runs in: no autograd, and autocast in a reduced precision."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"))
        return stack

    def collate(self, sequences: list[list[int]], padded_length: int) -> dict[str, torch.Tensor]:
        """The model's inputs for `sequences` padded to `padded_length`, on the host.

        Vectorised in numpy and safe to call off the inference thread: it runs no parallel torch operator (only
        allocations), so the calling thread starts no OpenMP team of its own to compete with the inference thread's
        for the cores.
        """
        shape = (len(sequences), padded_length)
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        input_ids = torch.empty(shape, dtype=torch.long, pin_memory=self._pin_memory)
        attention_mask = torch.empty(shape, dtype=torch.long, pin_memory=self._pin_memory)
        ids_view, mask_view = input_ids.numpy(), attention_mask.numpy()
        real = np.arange(padded_length) < lengths[:, None]  # row-major, like the concatenated sequences
        ids_view.fill(self.pad_token_id)
        ids_view[real] = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
        mask_view[...] = real
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_token_type_ids:
            token_type_ids = torch.empty(shape, dtype=torch.long, pin_memory=self._pin_memory)
            types_view = token_type_ids.numpy()
            types_view.fill(0)
            if any(type(ids) is PairIds for ids in sequences):  # a pair's second text has token type 1
                second_starts = np.array([getattr(ids, "second_start", padded_length) for ids in sequences])
                types_view[real & (np.arange(padded_length) >= second_starts[:, None])] = 1
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for collated inputs, as an fp32 CPU tensor of shape (texts, num_labels)."""
        if self.device.type != "cpu":  # collated on the host; three no-op .to() calls were 8% of a small CPU batch
            inputs = {name: tensor.to(self.device, non_blocking=True) for name, tensor in inputs.items()}
        with self.running():
            logits = self._traced(*inputs.values()) if self._traced is not None else self.model(**inputs).logits
        # Activations and scores are computed in fp32 whatever the forward pass ran in.
        return logits.float().cpu()

    def run(self, sequences: list[list[int]], padded_length: int) -> torch.Tensor:
        """Logits for each sequence, as an fp32 CPU tensor of shape (len(sequences), num_labels)."""
        return self.forward(self.collate(sequences, padded_length))


class BatchModelAdapter:
    """Adapts a `ModelRunner` to the batcher's `splitting.BatchModel`: inputs collated on the host, fp32 logits out
    (the engine's front applies the activation, so a request can have the raw logits instead at no cost), and the
    framework's out-of-memory turned into the batcher's `OutOfMemory`. With runners for other precisions (live
    tuning), `use_precision` picks the one the next batch runs on."""

    def __init__(self, runner: ModelRunner, others: dict[str, ModelRunner] | None = None) -> None:
        self.runner = runner
        self._runners = {runner.precision: runner, **(others or {})}

    def use_precision(self, precision: str) -> None:
        """Run the next batches in `precision` (one of the runners given); inputs collate alike in every precision."""
        self.runner = self._runners[precision]

    def collate(self, sequences: list[list[int]], padded_length: int) -> dict[str, torch.Tensor]:
        return self.runner.collate(sequences, padded_length)

    def run(self, inputs: dict[str, torch.Tensor]) -> list[list[float]]:
        """fp32 logits for one batch. An out-of-memory becomes OutOfMemory (after the allocator's cache is released), so
        the batcher can split the batch without knowing torch."""
        try:
            logits = self.runner.forward(inputs)
        except torch.cuda.OutOfMemoryError as error:
            release_cached_memory(self.runner.device)
            raise OutOfMemory(str(error)) from error
        return logits.tolist()

    def warm_up(self, policy: BatchingPolicy) -> tuple[int, float]:
        """One batch per bucket, so first requests do not pay for lazy initialisation (and CUDA OOMs show now).
        Returns the real tokens run and the seconds they took: the model's first measured rate.

        On the CPU one text per bucket is enough; on a GPU each batch is as big as the budget allows.
        """
        started = time.monotonic()
        tokens = 0
        on_cpu = self.runner.device.type == "cpu"
        for bound in policy.bucket_bounds:
            length = policy.padded_length(bound)
            count = 1 if on_cpu else max(1, min(policy.max_batch_size, policy.max_batch_tokens // length))
            self.run(self.collate([[self.runner.pad_token_id] * length] * count, length))
            tokens += count * length
        seconds = time.monotonic() - started
        log.info("warmed up %d buckets in %.1f s", len(policy.bucket_bounds), seconds)
        return tokens, seconds
