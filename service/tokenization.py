"""Turning request texts into token ids the model accepts: the fast tokenizer, truncation and length checks."""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, slots=True)
class EncodedText:
    """A text's token ids (special tokens included, within the model's maximum length) and whether it was cut."""

    ids: list[int]
    truncated: bool


class TextTooLong(ValueError):
    """A text exceeds the model's maximum length and the request asked not to truncate."""

    def __init__(self, index: int, tokens: int, max_length: int) -> None:
        super().__init__(
            f"texts[{index}] has {tokens} tokens but the model takes at most {max_length}; "
            "shorten it or send truncate=true"
        )
        self.index, self.tokens, self.max_length = index, tokens, max_length


class TextEncoder:
    """Encodes batches of texts with a fast tokenizer, truncating to `max_length` or refusing longer texts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if not tokenizer.is_fast:
            raise ValueError("a fast (Rust) tokenizer is required; the checkpoint has only a slow one")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, texts: list[str], truncate: bool) -> list[EncodedText]:
        """Token ids for each text, in order. Raises TextTooLong when truncate is False and a text is too long."""
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        too_long = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        if too_long and not truncate:
            first = too_long[0]
            raise TextTooLong(first, len(full[first]), self.max_length)
        # Re-encode only the long ones, so the tokenizer itself decides where special tokens go when cutting.
        cut = self.tokenizer(
            [texts[i] for i in too_long], add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"] if too_long else []
        encoded = [EncodedText(ids, False) for ids in full]
        for index, ids in zip(too_long, cut):
            encoded[index] = EncodedText(ids, True)
        return encoded


def model_max_length(tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int | None) -> int:
    """The longest input the model takes: the tokenizer's limit when it states one, else the position table size."""
    stated = tokenizer.model_max_length
    if stated and stated < 1_000_000:  # tokenizers without a limit report a huge sentinel
        return int(stated) if max_position_embeddings is None else min(int(stated), max_position_embeddings)
    if max_position_embeddings is None:
        raise ValueError("cannot tell the model's maximum length: set CLASSIFIER_MAX_LENGTH")
    return max_position_embeddings
