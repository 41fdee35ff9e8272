"""The model runner: loads a sequence classifier and runs dynamically padded batches on one device."""

import inspect
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from service.postprocess import ProblemType, problem_type_of

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready to serve: the model in eval mode, its fast tokenizer, labels and activation."""

    model_id: str
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
        model_id=model_id,
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
    """`auto` means fp16 autocast on CUDA and fp32 elsewhere: on CPUs without AMX, autocast slows BERT 6-20x, and
    where AMX makes bf16 faster (2.9x per batch measured on an AMX Xeon) it still costs precision: opt in."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type == "cpu":
        log.warning(
            "%s autocast on a CPU pays off only with AMX (amx_bf16 in /proc/cpuinfo); without it, expect it "
            "several times slower than fp32", precision
        )
    return precision


class ModelRunner:
    """Runs one batch at a time: pads token ids to the batch's length, forwards under autocast, returns fp32 logits."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, pad_token_id: int) -> None:
        self.model = model
        self.device = device
        self.precision = precision
        self.pad_token_id = pad_token_id
        self._takes_token_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters

    def run(self, sequences: list[list[int]], padded_length: int) -> torch.Tensor:
        """Logits for each sequence, as an fp32 CPU tensor of shape (len(sequences), num_labels)."""
        input_ids = torch.full((len(sequences), padded_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), padded_length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_token_type_ids:
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        inputs = {name: tensor.to(self.device, non_blocking=True) for name, tensor in inputs.items()}
        with torch.inference_mode(), torch.autocast(
            device_type=self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"
        ):
            logits = self.model(**inputs).logits
        # Activations and scores are computed in fp32 whatever the forward pass ran in.
        return logits.float().cpu()
