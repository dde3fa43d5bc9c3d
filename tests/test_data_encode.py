"""Sample encoding against transformers: chat template and loss mask, image resize and patches, mRoPE positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_fsdp.config import load_config
from vlm_fsdp.data.batch import IGNORE_INDEX, Doc, collate
from vlm_fsdp.data.chat import SampleError, encode, image_refs, normalize_messages
from vlm_fsdp.data.images import ImageSettings, grid_thw, image_patches, num_image_tokens, smart_resize, target_size
from vlm_fsdp.data.rope_index import mrope_positions
from vlm_fsdp.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer, special_ids

IMAGES = Path(__file__).resolve().parents[1] / "packages/core/src/vlm_fsdp/data/bundled/images"
QWEN3_VL = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer(BUNDLED_TOKENIZER)
    return tokenizer, special_ids(tokenizer, BUNDLED_TOKENIZER)


def conversation(*images: str) -> list[dict]:
    return normalize_messages(
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {
                    "role": "user",
                    "content": [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": "Which?"}],
                },
                {"role": "assistant", "content": "The first one."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": [{"type": "text", "text": "It is brighter."}]},
            ]
        }
    )


def test_chat_template_matches_the_rendered_string_and_learns_only_assistant_text(tok):
    tokenizer, special = tok
    encoded = encode(conversation("a.jpg", "b.jpg"), [3, 2], tokenizer, special)
    rendered = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Which?<|im_end|>\n"
        "<|im_start|>assistant\nThe first one.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\nIt is brighter.<|im_end|>\n"
    )
    assert encoded.ids.tolist() == tokenizer.encode(rendered).ids
    learned = tokenizer.decode(encoded.ids[encoded.is_target].tolist(), skip_special_tokens=False)
    assert learned == "The first one.<|im_end|>It is brighter.<|im_end|>"
    assert (encoded.ids == special.image_pad).sum() == 5


@pytest.mark.parametrize(
    ("sample", "kind", "words"),
    [
        ({"messages": []}, "not a conversation", "non-empty"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "not a conversation", "role"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "not a conversation", "content part"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant text", "nothing to learn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]},
            "not a conversation",
            "only come first",
        ),
    ],
)
def test_bad_samples_say_what_is_wrong(sample, kind, words):
    with pytest.raises(SampleError) as err:
        normalize_messages(sample)
    assert err.value.kind == kind and words in str(err.value)


@pytest.mark.parametrize(("height", "width"), [(300, 451), (1000, 40), (17, 17), (4000, 3000), (512, 512)])
def test_smart_resize_matches_transformers(height, width):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for low, high in [(65536, 16777216), (3136, 200_000)]:
        assert smart_resize(height, width, 32, low, high) == hf_smart_resize(height, width, 32, low, high)


def test_buckets_pick_closest_aspect_then_area():
    settings = ImageSettings(buckets=((672, 672), (576, 768), (768, 576), (256, 256), (512, 896)))
    assert target_size(300, 451, settings) == (576, 768)  # landscape 3:2 -> 4:3 is the closest aspect
    assert target_size(900, 600, settings) == (768, 576)
    assert target_size(300, 300, settings) == (256, 256)  # squares: the one nearest in area (300x300 -> 288x288)
    assert target_size(2000, 2000, settings) == (672, 672)
    assert target_size(100, 1000, settings) == (512, 896)
    grid = grid_thw(300, 451, settings)
    assert grid == (1, 36, 48) and num_image_tokens(grid, settings) == 36 * 48 // 4


@pytest.mark.parametrize("name", ["chelsea_train0.jpg", "camera_train0.jpg", "rocket_val0.jpg"])
def test_pixel_values_match_the_qwen_image_processor(name):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = IMAGES / name
    image = Image.open(path)
    for low, high in [(65536, 16777216), (3136, 100_000)]:
        processor = Qwen2VLImageProcessorPil(**QWEN3_VL, min_pixels=low, max_pixels=high)
        expected = processor(images=[image], return_tensors="np")
        ours, grid = image_patches(path.read_bytes(), image.size, ImageSettings(min_pixels=low, max_pixels=high))
        assert [list(grid)] == expected["image_grid_thw"].tolist()
        assert ours.dtype == np.float32 and ours.shape == expected["pixel_values"].shape
        np.testing.assert_allclose(ours, expected["pixel_values"], atol=1e-6)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen3VLMoeConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel
    from vlm_fsdp.model.hf_config import hf_config_dict

    return Qwen3VLMoeModel(Qwen3VLMoeConfig(**hf_config_dict(load_config("tiny").model)))


def hf_positions(model, ids: np.ndarray, grids: list) -> np.ndarray:
    input_ids = torch.from_numpy(ids)[None]
    positions, _ = model.get_rope_index(
        input_ids,
        (input_ids == model.config.image_token_id).int(),
        image_grid_thw=torch.tensor(grids).reshape(-1, 3),
    )
    return positions[:, 0].numpy()


def doc_of(names: list[str], tok, settings: ImageSettings) -> Doc:
    tokenizer, special = tok
    sizes = [Image.open(IMAGES / n).size for n in names]
    grids = [grid_thw(h, w, settings) for w, h in sizes]
    encoded = encode(conversation(*names), [num_image_tokens(g, settings) for g in grids], tokenizer, special)
    return Doc(
        ids=encoded.ids,
        is_target=encoded.is_target,
        positions=mrope_positions(encoded.ids, grids, special.image_pad, settings.merge_size),
        pixels=[image_patches((IMAGES / n).read_bytes(), s, settings)[0] for n, s in zip(names, sizes, strict=True)],
        grids=grids,
    )


def test_mrope_positions_match_transformers_get_rope_index(hf_model, tok):
    settings = ImageSettings(min_pixels=3136, max_pixels=150_000)  # no buckets: three different grids
    names = ["chelsea_train0.jpg", "camera_train0.jpg", "rocket_val0.jpg"]
    doc = doc_of(names, tok, settings)
    assert len({g[1:] for g in doc.grids}) == 3
    np.testing.assert_array_equal(doc.positions, hf_positions(hf_model, doc.ids, doc.grids))

    # packed: every sample restarts at 0 and equals its own get_rope_index; padding continues counting
    other = doc_of(["coffee_train1.jpg"], tok, settings)
    seq_length = len(doc.ids) + len(other.ids) + 7
    batch = collate([[doc, other], [other]], seq_length, pad_id=tok[1].pad, images=settings)
    row = batch.position_ids[:, 0].numpy()
    np.testing.assert_array_equal(row[:, : len(doc.ids)], hf_positions(hf_model, doc.ids, doc.grids))
    tail = row[:, len(doc.ids) : len(doc.ids) + len(other.ids)]
    np.testing.assert_array_equal(tail, hf_positions(hf_model, other.ids, other.grids))
    padding = row[:, len(doc.ids) + len(other.ids) :]
    np.testing.assert_array_equal(padding, np.tile(np.arange(7) + tail.max() + 1, (3, 1)))
    assert batch.image_grid_thw.tolist() == [list(g) for g in doc.grids + other.grids + other.grids]
    assert batch.pixel_values.shape[0] == sum(t * h * w for t, h, w in batch.image_grid_thw.tolist())


def test_collate_shifts_labels_within_each_sample_and_marks_segments(tok):
    _tokenizer, special = tok
    settings = ImageSettings(buckets=((256, 256),))
    docs = [doc_of(["chelsea_train0.jpg"], tok, settings), doc_of(["coffee_train1.jpg"], tok, settings)]
    text = Doc(
        ids=np.asarray([special.im_start, 5, 6, special.im_end], np.int64),
        is_target=np.asarray([False, False, True, True]),
        positions=np.tile(np.arange(4), (3, 1)),
        pixels=[],
        grids=[],
    )
    lengths = [len(d.ids) for d in docs]
    seq = sum(lengths) + 10
    batch = collate([docs, [text], []], seq, special.pad, settings)
    assert batch.input_ids.shape == (3, seq) and batch.input_ids.dtype == torch.int64
    assert batch.position_ids.shape == (3, 3, seq)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, lengths[0], sum(lengths), seq, seq + 4, 2 * seq, 3 * seq]
    assert batch.max_seqlen == seq and batch.doc_lengths == [*lengths, 4] and batch.num_tokens == sum(lengths) + 4
    labels, ids = batch.labels[0], batch.input_ids[0]
    for start, doc in zip([0, lengths[0]], docs, strict=True):
        n = len(doc.ids)
        expected = np.where(doc.is_target[1:], doc.ids[1:], IGNORE_INDEX)
        assert labels[start : start + n - 1].tolist() == expected.tolist()
        assert labels[start + n - 1] == IGNORE_INDEX  # the last token of a sample predicts nothing
    assert (labels[sum(lengths) :] == IGNORE_INDEX).all() and (ids[sum(lengths) :] == special.pad).all()
    assert batch.labels[1, :4].tolist() == [IGNORE_INDEX, 6, special.im_end, IGNORE_INDEX]
    assert batch.num_loss_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert batch.has_images and batch.image_patches == [256 // 16 * 256 // 16] * 2
    assert (batch.position_ids[:, 2] == torch.arange(seq)).all()  # an empty row counts from 0

    no_images = collate([[text]], 16, special.pad, settings)
    assert not no_images.has_images
    assert no_images.pixel_values.shape == (0, settings.patch_dim) and no_images.image_grid_thw.shape == (0, 3)


def test_bundled_conversations_encode(tok):
    tokenizer, special = tok
    lines = (IMAGES.parent / "train.jsonl").read_text().splitlines()[:20]
    for line in lines:
        messages = normalize_messages(json.loads(line))
        encoded = encode(messages, [4] * len(image_refs(messages)), tokenizer, special)
        assert encoded.is_target.any() and encoded.ids[-2:].tolist() == [special.im_end, *tokenizer.encode("\n").ids]
