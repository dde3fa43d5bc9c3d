"""The bundled data and tokenizer: small, licensed, well-formed, answerable from the pixels, Qwen's special ids."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlm_fsdp.config import load_config
from vlm_fsdp.data.chat import image_refs, normalize_messages
from vlm_fsdp.data.make_bundled import PHOTOS
from vlm_fsdp.data.tokenizer import BUNDLED_TOKENIZER, SPECIAL_TOKENS, load_tokenizer
from vlm_fsdp.recipes.qwen3_vl import BUNDLED_TOKENIZER_IDS

BUNDLED = Path(__file__).resolve().parents[1] / "packages/core/src/vlm_fsdp/data/bundled"


def samples(name: str) -> list[dict]:
    return [json.loads(line) for line in (BUNDLED / name).read_text().splitlines()]


def test_bundled_data_is_small_and_every_image_source_has_a_licence():
    size = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert size < 5 * 2**20
    sources = (BUNDLED / "SOURCES.md").read_text()
    for photo in PHOTOS:
        assert f"| `{photo.name}` |" in sources and photo.licence in sources
    for path in (BUNDLED / "images").glob("*.jpg"):
        assert any(path.name.startswith(p.name + "_") for p in PHOTOS), f"{path.name} has no recorded source"


@pytest.mark.parametrize("name", ["train.jsonl", "val.jsonl", "text_train.jsonl", "text_val.jsonl"])
def test_bundled_conversations_are_valid_and_their_images_exist(name):
    found = samples(name)
    assert len(found) >= (50 if "val" in name else 400)
    for sample in found:
        for ref in image_refs(normalize_messages(sample)):
            assert (BUNDLED / ref).is_file(), ref
    if name.startswith("text_"):
        assert not any(image_refs(normalize_messages(s)) for s in found)


def test_image_samples_vary_in_size_aspect_and_image_count():
    sizes = {Image.open(p).size for p in (BUNDLED / "images").glob("*.jpg")}
    aspects = {round(w / h, 1) for w, h in sizes}
    assert len(sizes) > 50 and len(aspects) > 8 and min(min(s) for s in sizes) < 200
    counts = {len(image_refs(normalize_messages(s))) for s in samples("train.jsonl")}
    assert counts == {1, 2}
    train = {r for s in samples("train.jsonl") for r in image_refs(normalize_messages(s))}
    val = {r for s in samples("val.jsonl") for r in image_refs(normalize_messages(s))}
    assert not train & val  # validation photos are crops the model never trained on


def test_answers_follow_from_the_pixels():
    checked = 0
    for sample in samples("train.jsonl"):
        messages = normalize_messages(sample)
        refs = image_refs(messages)
        for question, answer in itertools.pairwise(messages):
            if question["role"] != "user" or answer["role"] != "assistant" or len(refs) != 1:
                continue
            image = Image.open(BUNDLED / refs[0])
            text = answer["content"][0]["text"]
            asked = question["content"][-1]["text"]
            if "orientation" in asked or "landscape, portrait" in asked:
                ratio = image.width / image.height
                assert text == ("Landscape." if ratio > 1.1 else "Portrait." if ratio < 1 / 1.1 else "Square.")
                checked += 1
            elif "colour or a black-and-white" in asked:
                assert text == ("Colour." if image.mode == "RGB" else "Black and white.")
                checked += 1
            elif "quadrant" in asked:
                luma = np.asarray(image.convert("L"), dtype=np.float32)
                h, w = luma.shape
                quads = {
                    "top left": luma[: h // 2, : w // 2],
                    "top right": luma[: h // 2, w // 2 :],
                    "bottom left": luma[h // 2 :, : w // 2],
                    "bottom right": luma[h // 2 :, w // 2 :],
                }
                assert text == f"The {max(quads, key=lambda q: quads[q].mean())} quadrant."
                checked += 1
    assert checked > 100


def test_tokenizer_places_qwen_special_tokens_after_8000_regular_tokens():
    tokenizer = load_tokenizer(BUNDLED_TOKENIZER)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(8000, 8014))
    assert tokenizer.get_vocab_size() == 8014
    tiny = load_config("tiny").model
    assert tokenizer.get_vocab_size() <= tiny.vocab_size
    for field, value in BUNDLED_TOKENIZER_IDS.items():
        assert getattr(tiny, field) == value
    text = "It shows the face of a tabby cat.\nWhat is 23 plus 58? Ünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert len(tokenizer.encode("What does this photo show?").ids) <= 6  # trained on the bundled text
