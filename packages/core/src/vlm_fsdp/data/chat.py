"""Conversations: the JSONL sample format, its checks, and the Qwen3-VL chat template as token ids.

A sample is `{"messages": [{"role": "system" | "user" | "assistant", "content": TEXT or [PART, ...]}, ...]}` with
parts `{"type": "text", "text": ...}` and `{"type": "image", "image": "relative/path.jpg"}`, plus an optional
`"id"`. It is rendered as Qwen3-VL's chat template does:

    <|im_start|>{role}\\n{content}<|im_end|>\\n        (per message; an image is
    <|vision_start|><|image_pad|> x N<|vision_end|>     N = merged patches of its grid)

The loss covers what the assistant says: its content and the `<|im_end|>` that ends it. Pieces are tokenized
separately; every piece boundary falls on a `\\n` or a special token, where Qwen's pre-tokenizer splits anyway, so
the ids equal those of tokenizing the rendered string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from vlm_fsdp.data.tokenizer import SpecialIds

ROLES = ("system", "user", "assistant")
BAD_FORMAT = "not a conversation"
BAD_TEXT = "invalid text"


class SampleError(Exception):
    """A sample that cannot be used: `kind` is the short reason skip counts group by, `detail` says more."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def normalize_messages(sample: Any) -> list[dict]:
    """The sample's messages with every content as a list of parts; SampleError says what is wrong."""
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list) or not sample["messages"]:
        raise SampleError(BAD_FORMAT, 'not an object with a non-empty "messages" list')
    messages = []
    for i, message in enumerate(sample["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise SampleError(BAD_FORMAT, f'message {i} needs "role" set to one of {", ".join(ROLES)}')
        if message["role"] == "system" and i > 0:
            raise SampleError(BAD_FORMAT, f"message {i}: a system message may only come first")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise SampleError(BAD_FORMAT, f'message {i}: "content" must be a string or a list of parts')
        messages.append({"role": message["role"], "content": [_part(part, i, message["role"]) for part in parts]})
    if not any(m["role"] == "assistant" and any(p.get("text") for p in m["content"]) for m in messages):
        raise SampleError("no assistant text", "nothing to learn from")
    return messages


def _part(part: Any, i: int, role: str) -> dict:
    """A content part reduced to its type and value."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in ("text", "image") or not isinstance(part.get(kind), str):
        raise SampleError(
            BAD_FORMAT,
            f'message {i}: each content part must be {{"type": "text", "text": ...}} or '
            f'{{"type": "image", "image": "path"}}, got {brief(part)}',
        )
    if kind == "image" and role == "assistant":
        raise SampleError(BAD_FORMAT, f"message {i}: images in assistant messages are not supported")
    check_text(part[kind], f"message {i}")
    return {"type": kind, kind: part[kind]}


def brief(value: Any) -> str:
    """A JSON value as messages show it: never long, and never a deep walk through a nested one."""
    if isinstance(value, dict):
        keys = ", ".join(f"{key!r:.40}" for key in list(value)[:4])
        return f"an object with keys {keys}" if value else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return f"{value!r:.80}"


def check_text(text: str, where: str) -> None:
    """SampleError unless `text` can be stored as UTF-8: JSON can spell half of a UTF-16 surrogate pair
    (`"\\ud800"`), which no UTF-8 text holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SampleError(
            BAD_TEXT, f"{where}: character {err.start + 1} is a lone surrogate (\\u{ord(text[err.start]):04x})"
        ) from None


def image_refs(messages: list[dict]) -> list[str]:
    """The image references of a conversation in order of appearance."""
    return [part["image"] for m in messages for part in m["content"] if part["type"] == "image"]


@dataclass(kw_only=True)
class Encoded:
    """One sample as token ids."""

    ids: np.ndarray
    """[L] int64 token ids."""
    is_target: np.ndarray
    """[L] bool: the token is one the model learns to predict (assistant content and its `<|im_end|>`)."""


def encode(messages: list[dict], image_tokens: list[int], tokenizer: Tokenizer, special: SpecialIds) -> Encoded:
    """Token ids of a conversation; `image_tokens[i]` is the `<|image_pad|>` count of its i-th image."""
    pieces: list[tuple[list[int], bool]] = []
    images = iter(image_tokens)

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False).ids

    for message in messages:
        learn = message["role"] == "assistant"
        pieces.append(([special.im_start, *text(message["role"] + "\n")], False))
        for part in message["content"]:
            if part["type"] == "text":
                pieces.append((text(part["text"]), learn))
            else:
                span = [special.vision_start] + [special.image_pad] * next(images) + [special.vision_end]
                pieces.append((span, False))
        pieces.append(([special.im_end], learn))
        pieces.append((text("\n"), False))
    ids = np.fromiter((i for piece, _ in pieces for i in piece), dtype=np.int64)
    is_target = np.fromiter((learn for piece, learn in pieces for _ in piece), dtype=bool)
    return Encoded(ids=ids, is_target=is_target)
