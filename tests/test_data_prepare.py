"""`vlm-fsdp data prepare | inspect | bench`: real images (one corrupt, one missing), real Energon datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from megatron.energon import (
    Cooker,
    CrudeSample,
    DefaultTaskEncoder,
    Sample,
    WorkerConfig,
    basic_sample_keys,
    edataclass,
    get_loader,
    get_train_dataset,
    stateless,
)
from vlm_fsdp.cli.main import main
from vlm_fsdp.data.energon import SplitReader
from vlm_fsdp.data.prepare import prepare
from vlm_fsdp.errors import UserError

IMAGES = Path(__file__).resolve().parents[1] / "packages/core/src/vlm_fsdp/data/bundled/images"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The bundled data is prepared into this session's temporary directory, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


def conversation(*images: str, question: str = "What does this photo show?", answer: str = "A cat.") -> str:
    content = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": question}]
    return json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A JSONL of 12 usable samples and 5 unusable ones (corrupt image, missing image, not an image, bad format)."""
    root = tmp_path_factory.mktemp("source")
    (root / "photos").mkdir()
    names = sorted(p.name for p in IMAGES.glob("*_train[0-3].jpg"))[:10]
    for name in names:
        shutil.copy(IMAGES / name, root / "photos" / name)
    data = (IMAGES / names[0]).read_bytes()
    (root / "photos" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "photos" / "notes.jpg").write_text("not an image")
    lines = [conversation(f"photos/{n}") for n in names]
    lines += [conversation(f"photos/{names[1]}", f"photos/{names[2]}", question="Same subject?", answer="No.")]
    lines += [json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})]
    lines.insert(3, conversation("photos/truncated.jpg"))
    lines.insert(5, conversation("photos/gone.jpg"))
    lines.insert(7, conversation("photos/notes.jpg"))
    lines.insert(9, "{not json")
    lines.insert(11, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    (root / "input.jsonl").write_text("\n".join(lines) + "\n\n")
    return root


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared") / "dataset"
    return output, prepare(source / "input.jsonl", output, val_fraction=0.25, samples_per_shard=4, progress=False)


def test_prepare_writes_usable_samples_and_reports_each_skip_with_its_line(prepared, source):
    output, summary = prepared
    assert sum(summary.samples.values()) == 12 and summary.samples["val"] > 0
    assert summary.images == 12
    assert summary.skipped == {
        "corrupt image": 2,
        "missing image": 1,
        "invalid JSON": 1,
        "no assistant text": 1,
    }
    text = summary.render(output)
    assert f"{source / 'input.jsonl'}:4: corrupt image: photos/truncated.jpg: cannot decode" in text
    assert f"{source / 'input.jsonl'}:6: missing image: photos/gone.jpg does not exist" in text
    assert "photos/notes.jpg: not an image file" in text
    assert len(summary.shards) >= 3
    readers = [SplitReader(output, split) for split in ("train", "val")]
    assert sum(len(r) for r in readers) == 12
    first = readers[0].sample(0)
    assert set(first) == {"json", "img0.jpg"} and first["json"]["images"][0]["width"] > 0


def test_the_split_is_stable_for_the_same_lines(prepared, source, tmp_path):
    again = prepare(source / "input.jsonl", tmp_path / "again", val_fraction=0.25, progress=False)
    assert again.samples == prepared[1].samples


@edataclass
class Conversation(Sample):
    messages: list
    images: list


@stateless
def cook(sample: CrudeSample) -> Conversation:
    record = sample["json"]
    return Conversation(
        **basic_sample_keys(sample),
        messages=record["messages"],
        images=[sample[image["name"]] for image in record["images"]],
    )


class ConversationEncoder(DefaultTaskEncoder):
    cookers = (Cooker(cook),)


@pytest.mark.filterwarnings("ignore:.pin_memory. argument")
def test_energon_get_train_dataset_reads_the_prepared_dataset(prepared):
    output, summary = prepared
    dataset = get_train_dataset(
        output,
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        task_encoder=ConversationEncoder(),
    )
    seen = [sample for _, sample in zip(range(summary.samples["train"]), get_loader(dataset), strict=False)]
    assert len({s.__key__ for s in seen}) == summary.samples["train"]
    assert all(m["role"] in ("user", "assistant") for s in seen for m in s.messages)
    assert any(s.images and s.images[0].shape[0] == 3 for s in seen)


def test_prepare_errors_are_actionable(source, tmp_path):
    with pytest.raises(UserError, match="not an empty directory"):
        prepare(source / "input.jsonl", source, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare(source / "nope.jsonl", tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="either a validation file or a validation fraction"):
        prepare(source / "input.jsonl", tmp_path / "b", val=source / "input.jsonl", val_fraction=0.1, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(UserError, match="no usable samples"):
        prepare(bad, tmp_path / "c", progress=False)


def test_cli_prepare_and_inspect(source, tmp_path, capsys):
    output = tmp_path / "cli"
    assert main(["data", "prepare", str(source / "input.jsonl"), str(output), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 samples" in out and "skipped 5 samples" in out and "corrupt image" in out
    assert main(["data", "inspect", str(output), "model.seq_length=512"]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "images per sample" in out and "resized to (height x width)" in out
    assert "longer than model.seq_length=512" in out
    assert main(["data", "inspect", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(r["samples"] for r in report.values()) == 12 and sum(r["images"] for r in report.values()) == 12
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


def test_cli_bench_reports_throughput(capsys):
    assert main(["data", "bench", "--workers", "0", "--microbatches", "3", "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["workers"] == 0 and result["samples_per_s"] > 0 and result["tokens_per_s"] > 0
    assert result["images_per_s"] > 0
