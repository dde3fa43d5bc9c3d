"""`build_loader` on real Energon datasets: the Batch contract, packing, balancing, workers, skips, exact resume."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_fsdp.config import load_config
from vlm_fsdp.data.batch import IGNORE_INDEX, Batch
from vlm_fsdp.data.energon import index_dataset
from vlm_fsdp.data.loader import DataError, build_loader
from vlm_fsdp.data.prepare import ShardWriter
from vlm_fsdp.data.tokenizer import BUNDLED_TOKENIZER
from vlm_fsdp.errors import ConfigError

IMAGES = Path(__file__).resolve().parents[1] / "packages/core/src/vlm_fsdp/data/bundled/images"
IMAGE_PAD = 8012


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The bundled data is prepared into this session's temporary directory, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


def loader(recipe: str = "tiny", *overrides: str, split: str = "train", dp_rank: int = 0, dp_size: int = 1):
    """The tiny recipe at two sequences per microbatch (its own eight would make the tests four times the work),
    unless the overrides say otherwise."""
    small = ["train.micro_batch_size=2"] if recipe == "tiny" else []
    config = load_config(recipe, overrides=["data.num_workers=0", *small, *overrides])
    return build_loader(config, split=split, dp_rank=dp_rank, dp_size=dp_size)


def take(source, n: int) -> list[Batch]:
    return [next(source) for _ in range(n)]


def rows(batches: list[Batch]) -> list[tuple]:
    """Every packed row's tokens, padding cut off: what identifies a sequence of the stream."""
    out = []
    for batch in batches:
        for row in batch.input_ids:
            used = row[row != 8000] if (row != 8000).any() else row[:0]
            if len(used):
                out.append(tuple(used.tolist()))
    return sorted(out)


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert x.doc_lengths == y.doc_lengths and x.num_loss_tokens == y.num_loss_tokens


def test_tiny_batches_follow_the_contract():
    source = loader()
    for batch in take(source, 4):
        b, s = batch.input_ids.shape
        assert (b, s) == (2, 1024)
        assert batch.labels.dtype == batch.input_ids.dtype == batch.position_ids.dtype == torch.int64
        assert batch.position_ids.shape == (3, 2, 1024)
        assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens[-1] == b * s
        assert batch.max_seqlen == int(batch.cu_seqlens.diff().max())
        assert batch.pixel_values.dtype == torch.float32 and batch.pixel_values.shape[1] == 3 * 2 * 16 * 16
        assert batch.image_grid_thw.dtype == torch.int64 and batch.has_images
        assert batch.pixel_values.shape[0] == sum(batch.image_patches) == int(batch.image_grid_thw.prod(1).sum())
        assert int((batch.input_ids == IMAGE_PAD).sum()) == sum(batch.image_patches) // 4
        assert batch.num_loss_tokens == int((batch.labels != IGNORE_INDEX).sum()) > 0
        assert batch.num_tokens == sum(batch.doc_lengths) == int((batch.input_ids != 8000).sum())
        positions, ids, labels = batch.position_ids.reshape(3, -1), batch.input_ids.flatten(), batch.labels.flatten()
        bounds = batch.cu_seqlens.tolist()
        docs = [(a, b) for a, b in itertools.pairwise(bounds) if ids[a] != 8000]  # padding: own segment
        assert [b - a for a, b in docs] == batch.doc_lengths
        for start, end in docs:  # each packed sample restarts its positions; its last token has no target
            assert (positions[:, start] == 0).all() and labels[end - 1] == IGNORE_INDEX
        assert batch.to("cpu").input_ids.equal(batch.input_ids)
    stats = source.stats.as_dict()
    assert stats["microbatches"] == 4 and stats["images"] > 4 and stats["skipped"] == {}
    assert 0.5 < source.stats.packing_efficiency <= 1


def test_the_proxy_packs_about_eight_photos_into_each_4096_token_sequence():
    source = loader("qwen3_vl_30b_a3b_proxy")
    batches = take(source, 20)
    photos = sum(len(b.image_patches) for b in batches) / 20
    assert 7 <= photos <= 9.5
    assert source.stats.packing_efficiency > 0.85
    shapes = {tuple(g) for b in batches for g in b.image_grid_thw.tolist()}
    assert len(shapes) <= 7  # the resolution buckets


def test_the_patch_budget_bounds_every_microbatch_and_skips_samples_that_cannot_fit():
    source = loader("tiny", "data.max_patches_per_microbatch=4000")  # 2000 per sequence: one photo each
    for batch in take(source, 6):
        assert sum(batch.image_patches) <= 4000 and len(batch.image_patches) <= 2
    assert source.stats.skipped["over the patch budget"] > 0  # the two-photo samples


def test_text_only_batches_have_no_images():
    source = loader("tiny_text")
    for batch in take(source, 3):
        assert not batch.has_images and batch.image_patches == []
        assert batch.pixel_values.shape == (0, 1536) and batch.image_grid_thw.shape == (0, 3)
        assert batch.num_loss_tokens > 0 and len(batch.doc_lengths) > 10
    assert source.stats.packing_efficiency > 0.95


def test_resume_continues_exactly():
    uninterrupted = loader()
    take(uninterrupted, 3)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # a checkpoint holds plain values
    expected = take(uninterrupted, 3)
    restored = loader()
    restored.load_state_dict(state)
    assert_same(take(restored, 3), expected)
    assert restored.stats.microbatches == 6


@pytest.mark.parametrize(("before", "after"), [((2, 2), (1, 2)), ((1, 2), (4, 1)), ((3, 1), (2, 3))])
def test_resume_with_other_data_parallel_sizes_continues_the_same_sequence_stream(before, after):
    """(dp_size, micro_batch_size) before and after: the sequences after the restore are exactly those the
    uninterrupted run would produce next, whatever the number of ranks."""
    dp, mbs = before
    ranks = [
        loader("tiny", f"train.micro_batch_size={mbs}", "train.global_batch_size=24", dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]
    for rank in ranks:
        take(rank, 2)
    states = [rank.state_dict()["position"] for rank in ranks]
    assert states.count(states[0]) == dp  # every rank holds the same position
    state = ranks[0].state_dict()
    sequences = 12  # a multiple of every dp x mbs above
    expected = rows([b for rank in ranks for b in take(rank, sequences // (dp * mbs))])
    dp, mbs = after
    restored = [
        loader("tiny", f"train.micro_batch_size={mbs}", "train.global_batch_size=24", dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]
    for rank in restored:
        rank.load_state_dict(state)
    got = rows([b for rank in restored for b in take(rank, sequences // (dp * mbs))])
    assert got == expected and len(got) == sequences


def test_ranks_get_microbatches_with_similar_patch_counts():
    ranks = [loader("tiny", "train.micro_batch_size=1", dp_rank=r, dp_size=4) for r in range(4)]
    spread, total = [], []
    for _ in range(8):
        patches = [sum(next(rank).image_patches) for rank in ranks]
        spread.append(max(patches) - min(patches))
        total.append(max(patches))
    assert np.mean(spread) < 0.5 * np.mean(total)


def test_validation_is_one_pass_with_equal_counts_on_every_rank():
    ranks = [loader(split="val", dp_rank=r, dp_size=2) for r in range(2)]
    passes = [list(rank) for rank in ranks]
    assert len(passes[0]) == len(passes[1]) > 0
    samples = sum(len(b.doc_lengths) for p in passes for b in p)
    assert samples == 65  # the bundled val split, each sample once
    assert_same(list(ranks[0]), passes[0])  # a second pass is the same


def test_full_size_recipe_with_the_bundled_tokenizer_says_how_to_fix_it():
    with pytest.raises(ConfigError) as err:
        loader("qwen3_vl_30b_a3b")
    text = str(err.value)
    assert "<|image_pad|> is 8012 in the tokenizer but model.image_token_id=151655" in text
    assert "model.hf_path or data.tokenizer" in text


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.image_buckets=[[100, 100]]", "multiples of 32"),
        ("data.num_workers=-1", "data.num_workers must be at least 0"),
        ("data.path=/nonexistent/dataset", "vlm-fsdp data prepare"),
        ("data.max_patches_per_microbatch=1", "below train.micro_batch_size"),
        ("data.tokenizer=/nonexistent", "no tokenizer.json there"),
        ("data.max_pixels=1000", "0 < min_pixels <= max_pixels"),
    ],
)
def test_bad_data_settings_are_rejected_with_the_reason(override, words):
    with pytest.raises(ConfigError, match=words):
        loader("tiny", override)


def test_a_hugging_face_model_directory_sets_tokenizer_and_image_processing(tmp_path):
    shutil.copy(BUNDLED_TOKENIZER, tmp_path / "tokenizer.json")
    processor = {"patch_size": 16, "merge_size": 2, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}
    processor["size"] = {"shortest_edge": 4096, "longest_edge": 100_000}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    source = loader("tiny", f"model.hf_path={tmp_path}", "data.image_buckets=[]")
    images = source.settings.images
    assert images.mean == (0.1, 0.2, 0.3) and (images.min_pixels, images.max_pixels) == (4096, 100_000)
    batch = next(source)
    assert all(t * h * w * 256 <= 100_000 for t, h, w in batch.image_grid_thw.tolist())
    processor["patch_size"] = 14
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ConfigError, match="patch_size=14"):
        loader("tiny", f"model.hf_path={tmp_path}")


def test_resuming_with_settings_that_change_the_stream_is_refused():
    state = loader().state_dict()
    other = loader("tiny", "model.seq_length=2048")
    with pytest.raises(DataError, match="seq_length was 1024, now 2048"):
        other.load_state_dict(state)


# --- a dataset with a corrupt and a missing image, read by worker processes ---


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory) -> Path:
    """16 samples of real photos; one image's bytes are truncated after prepare, one sample lost its image."""
    root = tmp_path_factory.mktemp("broken")
    names, photos = [], sorted(IMAGES.glob("*_train1.jpg"))[:14]
    writer = ShardWriter(root, "train", 5, names)
    ids = [f"photo-{i}" for i in range(14)] + ["broken-truncated", "broken-missing"]
    for i, sample_id in enumerate(ids):
        path = photos[i % len(photos)]
        width, height = Image.open(path).size
        data = path.read_bytes()[:2000] if sample_id == "broken-truncated" else path.read_bytes()
        record = {
            "id": sample_id,
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "img0.jpg"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Photo {i}."}]},
            ],
            "images": [{"name": "img0.jpg", "width": width, "height": height}],
        }
        parts = {"json": json.dumps(record).encode()}
        if sample_id != "broken-missing":
            parts["img0.jpg"] = data
        writer.write(f"{i:06d}", parts)
    writer.close()
    index_dataset(root, names)
    return root


@pytest.fixture(scope="module")
def with_workers(broken_dataset):
    source = loader("tiny", f"data.path={broken_dataset}", "data.num_workers=2")
    yield source
    source.close()


def test_workers_skip_corrupt_and_missing_images_log_their_ids_and_go_on(with_workers, caplog):
    caplog.set_level(logging.WARNING, logger="vlm_fsdp.data")
    batches = take(with_workers, 16)  # several epochs of the 16 samples
    skipped = with_workers.stats.skipped
    logged = Counter(r.getMessage().split(":")[0] for r in caplog.records)
    assert set(skipped) == {"corrupt image", "missing image"} and min(skipped.values()) >= 2
    assert logged == {
        "skipped sample broken-truncated": skipped["corrupt image"],
        "skipped sample broken-missing": skipped["missing image"],
    }
    assert "broken-truncated: corrupt image (img0.jpg: cannot decode: image file is truncated" in caplog.text
    assert with_workers.stats.samples == sum(len(b.doc_lengths) for b in batches) > 14 * 2
    assert all(b.has_images for b in batches)


def test_workers_give_the_same_batches_as_decoding_in_process(with_workers, broken_dataset):
    state = with_workers.state_dict()
    expected = take(with_workers, 4)
    in_process = loader("tiny", f"data.path={broken_dataset}")
    in_process.load_state_dict(state)
    assert_same(take(in_process, 4), expected)
    # rewinding the running loader drops the microbatches its workers prepared ahead
    with_workers.load_state_dict(state)
    assert_same(take(with_workers, 4), expected)


def test_the_next_window_packed_ahead_gives_the_in_process_stream():
    """With workers, each next training window is packed in a process of its own (`Planner`); with one sequence per
    window every microbatch comes from a window packed there."""
    ahead = loader("tiny", "data.num_workers=1", "data.packing_window=1")
    try:
        got = take(ahead, 6)
        assert ahead.planner._executor is not None
    finally:
        ahead.close()
    assert_same(got, take(loader("tiny", "data.packing_window=1"), 6))


def test_a_lookahead_process_that_dies_costs_only_time(caplog):
    """The window it was packing is packed in the rank's process instead, and the stream stays the same."""
    caplog.set_level(logging.WARNING, logger="vlm_fsdp.data")
    ahead = loader("tiny", "data.num_workers=1", "data.packing_window=1")
    try:
        got = take(ahead, 2)
        for process in ahead.planner._executor._processes.values():
            process.kill()
        got += take(ahead, 3)
        assert ahead.planner._executor is None
    finally:
        ahead.close()
    # the death shows when the next window is handed over or when the one in flight is awaited, whichever comes first
    assert "BrokenProcessPool" in caplog.text and "in this process" in caplog.text
    assert_same(got, take(loader("tiny", "data.packing_window=1"), 5))


def test_strict_mode_stops_at_the_first_unusable_sample(broken_dataset):
    source = loader("tiny", f"data.path={broken_dataset}", "data.strict=true")
    with pytest.raises(DataError, match=r"sample broken-\w+: (corrupt|missing) image .* data.strict=true"):
        take(source, 16)


def test_a_slow_worker_fails_with_a_clear_timeout(broken_dataset):
    source = loader("tiny", f"data.path={broken_dataset}", "data.num_workers=1", "data.timeout_seconds=0.001")
    with pytest.raises(DataError, match=r"no microbatch within data\.timeout_seconds=0\.001"):
        next(source)


@pytest.mark.parametrize(
    ("cores", "local_ranks", "workers"),
    [(16, None, 4), (16, "8", 1), (96, "8", 4), (2, None, 1), (24, "4", 4), (12, "4", 2)],
)
def test_default_workers_share_the_node_cores_among_its_ranks(monkeypatch, cores, local_ranks, workers):
    from vlm_fsdp.data import settings

    monkeypatch.setattr(settings.os, "sched_getaffinity", lambda _: set(range(cores)))
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert settings.default_workers() == workers
