"""Tokenizers: the bundled byte-level BPE one or a Hugging Face model directory's, and the Qwen3-VL special tokens.

Only the `tokenizers` library is used (a `tokenizer.json`), not transformers' AutoTokenizer: it loads in
milliseconds, pickles into worker processes and needs no chat-template engine (see `chat.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.errors import ConfigError

# Qwen's special tokens in Qwen's order: in the bundled tokenizer they follow the 8000 regular tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BUNDLED_REGULAR_TOKENS = 8000
BUNDLED_TOKENIZER = Path(__file__).parent / "bundled" / "tokenizer.json"
# The special tokens a ModelConfig names, by config field.
MODEL_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


@dataclass(frozen=True, kw_only=True)
class SpecialIds:
    """Ids of the special tokens the chat template and the model use."""

    pad: int
    """`<|endoftext|>`, also the padding of packed rows."""
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


def resolve_tokenizer_path(tokenizer: str | None, hf_path: str | None) -> Path:
    """The `tokenizer.json` to use: data.tokenizer, else model.hf_path's, else the bundled one."""
    if tokenizer is None and hf_path is None:
        return BUNDLED_TOKENIZER
    key, value = ("data.tokenizer", tokenizer) if tokenizer is not None else ("model.hf_path", hf_path)
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{key}={value}: no tokenizer.json there. Point it at a tokenizer.json or a Hugging Face model "
            "directory holding one (or leave data.tokenizer and model.hf_path null for the bundled tokenizer)"
        )
    return path


@cache
def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises plain Exceptions for unreadable files
        raise ConfigError(f"cannot read the tokenizer {path}: {err}") from None


def special_ids(tokenizer: Tokenizer, path: Path) -> SpecialIds:
    """The special ids of a tokenizer, or a ConfigError naming the ones it lacks."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"the tokenizer {path} lacks the Qwen3-VL special tokens {', '.join(missing)}")
    return SpecialIds(
        pad=ids["<|endoftext|>"],
        im_start=ids["<|im_start|>"],
        im_end=ids["<|im_end|>"],
        vision_start=ids["<|vision_start|>"],
        vision_end=ids["<|vision_end|>"],
        image_pad=ids["<|image_pad|>"],
        video_pad=ids["<|video_pad|>"],
    )


def check_against_model(tokenizer: Tokenizer, path: Path, model: ModelConfig) -> None:
    """Raise ConfigError when the tokenizer's special ids or size disagree with the model config."""
    wrong = [
        f"{token} is {tokenizer.token_to_id(token)} in the tokenizer but model.{name}={getattr(model, name)}"
        for name, token in MODEL_TOKEN_FIELDS.items()
        if tokenizer.token_to_id(token) != getattr(model, name)
    ]
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > model.vocab_size:
        wrong.append(f"the tokenizer has {size} tokens, more than model.vocab_size={model.vocab_size}")
    if wrong:
        fix = (
            "set model.hf_path or data.tokenizer to the model's Hugging Face directory, or give a model trained "
            "from scratch the bundled tokenizer's ids and a vocab_size of at least 8014, as the tiny recipe does"
            if path == BUNDLED_TOKENIZER
            else "use the tokenizer the model was trained with, or set the model's token ids to this tokenizer's"
        )
        raise ConfigError(f"tokenizer {path} does not match the model: " + "; ".join(wrong) + f". To fix: {fix}")
