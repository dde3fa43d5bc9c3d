"""`vlm-fsdp data prepare | inspect | bench`: real images (one corrupt, one missing), real Energon datasets; hostile
lines, odd image modes, path escapes, interrupted runs and damaged datasets."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
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
from PIL import Image
from vlm_fsdp.cli.main import main
from vlm_fsdp.data import prepare as prepare_module
from vlm_fsdp.data.bench import worker_message
from vlm_fsdp.data.energon import DatasetError, SplitReader
from vlm_fsdp.data.images import ImageSettings, decode, image_patches, verify
from vlm_fsdp.data.prepare import REPORT, prepare
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
    assert "photos/notes.jpg: not an image in a supported format" in text
    assert len(summary.shards) >= 3
    report = [json.loads(line) for line in (output / REPORT).read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in report] == [
        (4, "corrupt image"),
        (6, "missing image"),
        (8, "corrupt image"),
        (10, "invalid JSON"),
        (12, "no assistant text"),
    ]
    assert report[3]["start"] == "{not json" and report[0]["file"] == str(source / "input.jsonl")
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
    with pytest.raises(UserError, match=r"no usable sample: all 1 samples .* were skipped") as err:
        prepare(bad, tmp_path / "c", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "c").exists()


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


# --- bad input: every sample is skipped with its line and reason, never an exception --------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", *args])
    out, err = capsys.readouterr()
    return code, out, err


def noise_png(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data (how a decompression bomb starts)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def read_report(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / REPORT).read_text().splitlines()]


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".prepare-" in p.name]


def test_hostile_lines_are_each_skipped_with_their_line_and_reason(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "folder.png").mkdir(parents=True)
    noise_png(data / "ok.png")
    (data / "empty.png").write_bytes(b"")
    (data / "bomb.png").write_bytes(png_with_header(12_000, 10_000))
    (data / "float.tif").write_bytes(encoded(Image.new("F", (8, 8), 0.5), "TIFF"))
    (data / "icon.ico").write_bytes(encoded(Image.new("RGB", (16, 16)), "ICO"))
    os.mkfifo(data / "pipe.png")
    (data / "loop.png").symlink_to("loop.png")
    lines: list[tuple[bytes, str | None]] = [
        (b"\xef\xbb\xbf" + conversation("ok.png").encode(), None),  # a UTF-8 byte order mark is fine
        (conversation("a" * 300 + ".png").encode(), "bad image path"),
        (
            conversation("ok.png", answer="broken SURROGATE text").encode().replace(b"SURROGATE", rb"\ud800"),
            "invalid text",
        ),
        (b'{"messages": "caf\xe9"}', "not UTF-8"),
        (b"[1, 2]", "not a conversation"),
        (b'"just text"', "not a conversation"),
        (b"[" * 100_000, "invalid JSON"),
        (b'{"messages": 1' + b"0" * 5000 + b"}", "invalid JSON"),
        (json.dumps({"id": {"no": 1}, **json.loads(conversation("ok.png"))}).encode(), "not a conversation"),
        (conversation("SURROGATE.png").encode().replace(b"SURROGATE", rb"\udc80"), "invalid text"),
        (conversation("nul\u0000.png").encode(), "bad image path"),
        (conversation("").encode(), "bad image path"),
        (conversation("folder.png").encode(), "unreadable image"),
        (conversation("empty.png").encode(), "corrupt image"),
        (conversation("bomb.png").encode(), "image too large"),
        (conversation("float.tif").encode(), "unsupported image"),
        (conversation("icon.ico").encode(), "corrupt image"),
        (conversation("pipe.png").encode(), "unreadable image"),
        (conversation("loop.png").encode(), "unreadable image"),
        (conversation("a/" * 2100 + "x.png").encode(), "bad image path"),
        (conversation("ok.png").encode() + b"\r", None),  # CRLF line ending
    ]
    (data / "input.jsonl").write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    output = tmp_path / "out"

    code, out, err = cli(capsys, "prepare", str(data / "input.jsonl"), str(output))

    assert (code, err) == (0, ""), err
    expected = [(number, reason) for number, (_, reason) in enumerate(lines, 1) if reason]
    assert [(r["line"], r["reason"]) for r in read_report(output)] == expected
    assert "wrote 2 samples" in out and f"skipped {len(expected)} samples" in out
    report = {r["line"]: r for r in read_report(output)}
    assert "is a lone surrogate" in report[3]["detail"] and "byte 18 (0xe9)" in report[4]["detail"]
    assert "File name too long" in report[2]["detail"] and report[9]["start"].startswith('{"id": {"no": 1}')
    assert "not a regular file" in report[18]["detail"] and "more than 100,000,000 pixels" in report[15]["detail"]
    assert "\udc80" not in out  # console lines are escaped
    assert len(SplitReader(output, "train")) == 2


def test_every_skip_is_in_the_report_and_the_console_lists_the_first(tmp_path, capsys):
    noise_png(tmp_path / "ok.png")
    lines = [conversation("ok.png")] + [f"{{broken {i}" for i in range(44)] + [conversation("ok.png", answer="B")]
    (tmp_path / "input.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    code, out, _ = cli(capsys, "prepare", str(tmp_path / "input.jsonl"), str(output))
    assert code == 0 and "skipped 44 samples" in out
    assert sum(": invalid JSON: " in line for line in out.splitlines()) == 20
    assert f"and 24 more, see {output / REPORT}" in out
    report = read_report(output)
    assert [r["line"] for r in report] == list(range(2, 46))
    assert report[-1]["start"] == "{broken 43" and all(r["reason"] == "invalid JSON" for r in report)


def test_image_paths_stay_inside_the_jsonl_folder_unless_allowed(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    noise_png(tmp_path / "outside.png")
    noise_png(data / "inside.png", seed=1)
    (data / "out-link.png").symlink_to(tmp_path / "outside.png")
    (data / "in-link.png").symlink_to("inside.png")
    refs = ["../outside.png", str(tmp_path / "outside.png"), "out-link.png", "sub/../../outside.png"]
    lines = [conversation(ref) for ref in [*refs, "in-link.png", "sub/../inside.png", "/etc/passwd"]]
    (data / "input.jsonl").write_text("\n".join(lines) + "\n")

    code, _, _ = cli(capsys, "prepare", str(data / "input.jsonl"), str(tmp_path / "strict"))
    report = read_report(tmp_path / "strict")
    assert code == 0 and [r["line"] for r in report] == [1, 2, 3, 4, 7]
    assert {r["reason"] for r in report} == {"image outside the JSONL folder"}  # /etc/passwd is never opened
    assert "--allow-outside-paths" in report[0]["detail"] and "absolute path" in report[1]["detail"]

    code, out, _ = cli(capsys, "prepare", str(data / "input.jsonl"), str(tmp_path / "allowed"), "--allow-outside-paths")
    assert code == 0 and "wrote 6 samples" in out
    assert [(r["line"], r["reason"]) for r in read_report(tmp_path / "allowed")] == [(7, "corrupt image")]
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "--allow-outside-paths" in capsys.readouterr().out


def test_an_over_long_line_is_skipped_and_the_next_one_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_LINE_BYTES", 300)
    noise_png(tmp_path / "ok.png")
    long_line = conversation("ok.png", answer="x" * 2000)
    (tmp_path / "input.jsonl").write_text(f"{long_line}\n{conversation('ok.png')}\n{long_line}")
    code, out, _ = cli(capsys, "prepare", str(tmp_path / "input.jsonl"), str(tmp_path / "out"))
    assert code == 0 and "wrote 1 sample" in out
    report = read_report(tmp_path / "out")
    assert [(r["line"], r["reason"]) for r in report] == [(1, "line too long"), (3, "line too long")]


def test_whole_run_mistakes_stop_with_one_line(small_source, tmp_path, capsys):
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(conversation("ok.png") + "\n", encoding="utf-16")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for args, words in [
        ([str(utf16), str(tmp_path / "a")], "is UTF-16 text: save it as UTF-8"),
        ([str(bad), str(tmp_path / "b"), "--val", str(small_source)], "the train split would be empty"),
        ([str(blank), str(tmp_path / "c")], "holds no sample (only blank lines)"),
        ([str(tmp_path), str(tmp_path / "d")], "is not a file"),
        ([str(small_source), str(small_source)], "not an empty directory"),
    ]:
        code, out, err = cli(capsys, "prepare", *args)
        assert (code, out) == (2, "") and err.count("\n") == 1 and words in err, err
        assert err.startswith("vlm-fsdp data: error: ")
    assert not [p for p in tmp_path.iterdir() if p.name in {"a", "b", "c", "d"}] and no_leftovers(tmp_path)


def test_report_name_in_the_help_is_the_one_prepare_writes():
    from vlm_fsdp.cli import data

    assert data.REPORT == REPORT


# --- atomic output ----------------------------------------------------------------------------------------------------


@pytest.fixture
def small_source(tmp_path) -> Path:
    noise_png(tmp_path / "ok.png")
    (tmp_path / "input.jsonl").write_text(conversation("ok.png") + "\n" + conversation("ok.png", answer="B") + "\n")
    return tmp_path / "input.jsonl"


def test_a_failed_or_interrupted_run_leaves_nothing_and_a_rerun_works(small_source, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    output = tmp_path / "out" / "dataset"
    code, _, err = cli(capsys, "prepare", str(bad), str(output))
    assert code == 2 and err.count("\n") == 1 and "no usable sample" in err
    assert not output.exists() and no_leftovers(output.parent)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "index_dataset", interrupt)
    assert main(["data", "prepare", str(small_source), str(output)]) == 130
    assert not output.exists() and no_leftovers(output.parent)
    monkeypatch.undo()
    code, out, _ = cli(capsys, "prepare", str(small_source), str(output))
    assert code == 0 and "wrote 2 samples" in out and len(SplitReader(output, "train")) == 2


def test_an_empty_output_directory_is_replaced_and_a_full_one_refused(small_source, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "prepare", str(small_source), str(empty))[0] == 0
    assert (empty / REPORT).is_file() and (empty / ".nv-meta" / "split.yaml").is_file()
    code, _, err = cli(capsys, "prepare", str(small_source), str(empty))
    assert code == 2 and "not an empty directory" in err and len(SplitReader(empty, "train")) == 2


def test_scratch_left_by_a_killed_run_is_removed_and_nothing_else(small_source, tmp_path, capsys):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    marker = ".vlm-fsdp-prepare"
    abandoned, running, users = (tmp_path / f".out.prepare-{name}" for name in ("dead0000", "live0000", "user0000"))
    for directory, pid in ((abandoned, dead.pid), (running, os.getpid()), (users, None)):
        directory.mkdir()
        (directory / "train-000000.tar").write_bytes(b"partial")
        if pid is not None:
            (directory / marker).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    assert cli(capsys, "prepare", str(small_source), str(tmp_path / "out"))[0] == 0
    assert not abandoned.exists() and running.is_dir() and (users / "train-000000.tar").is_file()
    assert not (tmp_path / "out" / marker).exists()


# --- decoding: every mode becomes the 8-bit RGB its pixel values say ------------------------------------------------


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data)).astype(int)


@pytest.mark.parametrize(("mode", "kind"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I;16L", "TIFF")])
def test_16_bit_grayscale_is_scaled_to_8_bits(mode, kind):
    values = np.asarray([[0, 257, 32768, 65535]], np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    out = pixels(encoded(image, kind))
    assert out.shape == (1, 4, 3) and out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out == out[..., :1]).all()


def test_32_bit_integer_pixels_are_read_as_16_bit_values():
    image = Image.fromarray(np.asarray([[-5, 1000, 65535, 70000]], np.int32))
    assert image.mode == "I"
    assert pixels(encoded(image, "TIFF"))[0, :, 0].tolist() == [0, 4, 255, 255]


def test_one_bit_palette_and_transparency():
    bits = Image.fromarray(np.asarray([[True, False]]))
    assert bits.mode == "1" and pixels(encoded(bits, "PNG"))[0].tolist() == [[255] * 3, [0] * 3]
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 0, 0, 0, 90, 0] + [0] * 759)
    palette.putdata([0, 1, 2])
    expected = [[10, 20, 30], [200, 0, 0], [0, 90, 0]]
    assert pixels(encoded(palette, "PNG"))[0].tolist() == expected
    assert pixels(encoded(palette, "PNG", transparency=1))[0].tolist() == [expected[0], [255] * 3, expected[2]]
    assert pixels(encoded(palette, "GIF", transparency=1))[0].tolist() == [expected[0], [255] * 3, expected[2]]


def test_alpha_is_composited_over_white():
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (100, 128)])
    blended = round(100 * 128 / 255 + 255 * 127 / 255)
    out = pixels(encoded(la, "PNG"))[0]
    assert out[:2].tolist() == [[255] * 3, [0] * 3] and abs(out[2] - blended).max() <= 1
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255)])
    assert pixels(encoded(rgba, "PNG"))[0].tolist() == [[255] * 3, [255, 0, 0]]
    assert pixels(encoded(rgba, "WEBP", lossless=True))[0].tolist() == [[255] * 3, [255, 0, 0]]


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    assert pixels(encoded(cmyk, "TIFF"))[0].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]
    cyan = pixels(encoded(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95))
    assert abs(cyan - [0, 255, 255]).max() <= 3


def oriented(orientation: int, kind: str = "PNG") -> bytes:
    """A 2x1 image, red left of blue, stored with this EXIF orientation."""
    image = Image.new("RGB", (2, 1), (0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, kind, exif=exif.tobytes())


def test_exif_orientation_turns_the_image_upright():
    from PIL import ImageOps

    red, blue = [255, 0, 0], [0, 0, 255]
    assert pixels(oriented(1))[0].tolist() == [red, blue]
    assert pixels(oriented(3))[0].tolist() == [blue, red]
    assert pixels(oriented(6))[:, 0].tolist() == [red, blue]  # shown turned 90 degrees clockwise: red on top
    assert pixels(oriented(8))[:, 0].tolist() == [blue, red]
    for orientation in range(1, 9):
        reference = ImageOps.exif_transpose(Image.open(io.BytesIO(oriented(orientation)))).convert("RGB")
        assert (pixels(oriented(orientation)) == np.asarray(reference)).all(), orientation
    assert verify(oriented(6)) == ("PNG", 1, 2)
    assert verify(oriented(6, "JPEG"))[1:] == (1, 2)


def test_prepared_sizes_are_upright_and_training_decodes_the_same_pixels(tmp_path):
    (tmp_path / "turned.png").write_bytes(oriented(6))
    values = np.asarray([[0, 65535], [32768, 257]], np.uint16)
    (tmp_path / "wide.png").write_bytes(encoded(Image.fromarray(values), "PNG"))
    (tmp_path / "input.jsonl").write_text(conversation("turned.png", "wide.png") + "\n")
    prepare(tmp_path / "input.jsonl", tmp_path / "out", progress=False)
    sample = SplitReader(tmp_path / "out", "train").sample(0)
    assert [(i["width"], i["height"]) for i in sample["json"]["images"]] == [(1, 2), (2, 2)]
    settings = ImageSettings(min_pixels=32 * 32, max_pixels=32 * 32)
    patches, _ = image_patches(sample["img1.png"], (2, 2), settings)
    eight_bit = encoded(Image.fromarray(np.asarray([[0, 255], [128, 1]], np.uint8)), "PNG")
    np.testing.assert_array_equal(patches, image_patches(eight_bit, (2, 2), settings)[0])
    upright, _ = image_patches(sample["img0.png"], (1, 2), settings)
    unturned = encoded(Image.fromarray(np.asarray([[[255, 0, 0]], [[0, 0, 255]]], np.uint8)), "PNG")
    np.testing.assert_array_equal(upright, image_patches(unturned, (1, 2), settings)[0])


def test_a_dataset_prepared_before_orientation_was_applied_still_decodes():
    settings = ImageSettings(min_pixels=32 * 32, max_pixels=32 * 32)
    stored = image_patches(oriented(6), (2, 1), settings)  # recorded as stored, not upright
    np.testing.assert_array_equal(stored[0], image_patches(oriented(1), (2, 1), settings)[0])


# --- inspect and bench: a damaged dataset is named, with what is wrong ----------------------------------------------


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    """A prepared dataset of 6 samples in two train shards."""
    root = tmp_path_factory.mktemp("intact")
    for i in range(6):
        noise_png(root / f"{i}.png", seed=i)
    (root / "input.jsonl").write_text("".join(conversation(f"{i}.png", answer=f"N{i}") + "\n" for i in range(6)))
    prepare(root / "input.jsonl", root / "dataset", samples_per_shard=3, progress=False)
    return root / "dataset"


def offsets(shard: Path) -> list[int]:
    raw = shard.with_suffix(".tar.idx").read_bytes()
    return list(struct.unpack(f"{len(raw) // 8}Q", raw))


def overwrite(path: Path, at: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(at)
        file.write(data)


def json_part_offset(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return next(member.offset_data for member in tar if member.name.endswith(".json"))


SHARD = "train-000000.tar"
DAMAGES = {
    "truncated shard": (lambda d: os.truncate(d / SHARD, (d / SHARD).stat().st_size // 2), f"{SHARD} is truncated"),
    "empty shard": (lambda d: os.truncate(d / SHARD, 0), f"{SHARD} is empty"),
    "garbage at the start": (lambda d: overwrite(d / SHARD, 0, b"\xa5" * 512), f"{SHARD} is damaged: no tar header"),
    "garbage in a later sample": (
        lambda d: overwrite(d / SHARD, offsets(d / SHARD)[1], b"\xa5" * 512),
        f"{SHARD} is damaged at its sample 1: cannot read it",
    ),
    "garbage in the second shard": (
        lambda d: overwrite(d / "train-000001.tar", offsets(d / "train-000001.tar")[1], b"\xa5" * 512),
        "train-000001.tar is damaged at its sample 1: cannot read it",
    ),
    "damaged json part": (
        lambda d: overwrite(d / SHARD, json_part_offset(d / SHARD) + 5, b"\xff\xfe"),
        f"{SHARD} is damaged at its sample 0: its json part is damaged",
    ),
    "missing shard": (lambda d: (d / SHARD).unlink(), f"{SHARD} is missing"),
    "missing tar index": (lambda d: (d / f"{SHARD}.idx").unlink(), f"{SHARD}.idx is missing"),
    "cut tar index": (lambda d: os.truncate(d / f"{SHARD}.idx", 12), f"{SHARD}.idx is damaged"),
    "garbage info": (lambda d: (d / ".nv-meta/.info.json").write_bytes(b"\x00{]"), ".info.json is damaged"),
    "missing info": (lambda d: (d / ".nv-meta/.info.json").unlink(), ".info.json is missing"),
    "info without counts": (lambda d: (d / ".nv-meta/.info.json").write_text("{}"), ".info.json is damaged"),
    "garbage split": (lambda d: (d / ".nv-meta/split.yaml").write_text("split_parts: [\n"), "split.yaml is damaged"),
    "split naming an unknown shard": (
        lambda d: (d / ".nv-meta/split.yaml").write_text("split_parts:\n  train: [other.tar]\n"),
        "lists no sample count for other.tar",
    ),
    "missing split": (lambda d: (d / ".nv-meta/split.yaml").unlink(), "is not a prepared dataset"),
    "no metadata": (lambda d: shutil.rmtree(d / ".nv-meta"), "is not a prepared dataset"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_inspect_names_the_damaged_file_and_what_is_wrong(damage, intact, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(intact, dataset)
    breaks, words = DAMAGES[damage]
    breaks(dataset)
    code, _, err = cli(capsys, "inspect", str(dataset))
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert err.startswith("vlm-fsdp data: error: ")


@pytest.mark.parametrize("damage", ["truncated shard", "garbage in a later sample", "damaged json part"])
def test_bench_names_the_damaged_file(damage, intact, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(intact, dataset)
    breaks, words = DAMAGES[damage]
    breaks(dataset)
    code, _, err = cli(
        capsys, "bench", f"data.path={dataset}", "--workers", "0", "--microbatches", "1", "--warmup", "1"
    )
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_inspect_of_something_that_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for path, words in [
        (tmp_path, "is not a prepared dataset"),
        (tmp_path / "file.txt", "is not a directory"),
        (tmp_path / "nowhere", "does not exist"),
    ]:
        code, _, err = cli(capsys, "inspect", str(path))
        assert code == 2 and err.count("\n") == 1 and words in err
        code, _, err = cli(capsys, "bench", f"data.path={path}", "--workers", "0")
        assert code == 2 and err.count("\n") == 1 and words in err


def test_an_intact_dataset_passes_the_check(intact, capsys):
    SplitReader(intact, "train").check()
    code, out, _ = cli(capsys, "inspect", str(intact), "--json")
    assert code == 0 and json.loads(out)["train"]["samples"] == 6


def test_a_worker_error_keeps_only_its_own_message():
    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nvlm_fsdp.data.energon.DatasetError: x.tar is damaged at its sample 3: why\n'
    )
    assert worker_message(wrapped) == "x.tar is damaged at its sample 3: why"
    assert worker_message(DatasetError("plain")) == "plain"
