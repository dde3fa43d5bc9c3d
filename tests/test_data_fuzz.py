"""Property-based tests of `vlm-fsdp data prepare` and `data inspect` on hostile input, with a fixed seed.

Each example of the main property writes a fresh JSONL mixing usable conversations (odd but valid images, weird
unicode, CRLF endings, blank lines) with bad lines (random bytes, truncated JSON, wrong structures, lone surrogate
escapes, non-UTF-8 bytes, over-long paths, paths that escape the JSONL's folder, random, truncated, empty or
missing images), runs the CLI and checks the contract: exit 0 with every bad line listed once in the report and
every good line in the dataset, or exit 2 with a one-line error and no output; never a traceback, never a partial
dataset or a leftover scratch directory. The other properties feed the image decoder random and truncated files
and unusual modes, and `data inspect` randomly damaged datasets.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from vlm_fsdp.cli.main import main
from vlm_fsdp.data.energon import SplitReader
from vlm_fsdp.data.images import ImageError, decode, verify
from vlm_fsdp.data.prepare import CONSOLE_SKIPS, REPORT, prepare, split_of


def fuzz(max_examples: int):
    return settings(
        derandomize=True,
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def odd_valid_images() -> dict[str, bytes]:
    """Images in unusual modes and formats that prepare must accept."""
    palette = Image.new("P", (9, 7), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgb.png": encoded(noise(40, 30), "PNG"),
        "gray16.png": encoded(Image.fromarray(np.full((12, 20), 40_000, np.uint16)), "PNG"),
        "gray16b.tif": encoded(Image.frombytes("I;16B", (6, 5), b"\x9c\x40" * 30), "TIFF"),
        "bits.png": encoded(Image.fromarray(np.eye(8, dtype=bool)), "PNG"),
        "palette.gif": encoded(palette, "GIF"),
        "palette_alpha.png": encoded(palette, "PNG", transparency=1),
        "la.png": encoded(Image.new("LA", (10, 10), (90, 100)), "PNG"),
        "rgba.webp": encoded(Image.new("RGBA", (10, 12), (1, 2, 3, 4)), "WEBP", lossless=True),
        "cmyk.jpg": encoded(Image.new("CMYK", (16, 16), (200, 0, 30, 10)), "JPEG"),
        "turned.jpg": encoded(noise(24, 16, seed=1), "JPEG", exif=exif.tobytes()),
        "dot.bmp": encoded(Image.new("L", (1, 1), 7), "BMP"),
        "tall.tif": encoded(noise(3, 300, seed=2), "TIFF"),
    }


VALID_IMAGES = odd_valid_images()
PNG = encoded(noise(64, 64, seed=3), "PNG")
JPEG = encoded(noise(64, 64, seed=4), "JPEG")
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP"]
ROLES = ("system", "user", "assistant")


@dataclass
class Case:
    """One JSONL line, whether prepare should keep it, and the files it needs beside the JSONL."""

    line: bytes
    kind: str
    """"good", or what is wrong with the line."""
    files: dict[str, bytes | None] = field(default_factory=dict)
    """Name -> bytes; None makes a directory."""

    @property
    def good(self) -> bool:
        return self.kind == "good"


def dump(sample: dict, ascii_only: bool = True) -> bytes:
    return json.dumps(sample, ensure_ascii=ascii_only).encode()


def chat(*images: str, question: str = "What is it?", answer: str = "A thing.") -> dict:
    content = [{"type": "image", "image": name} for name in images] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


texts = st.text(max_size=20)  # any unicode but lone surrogates: NUL, control, RTL and zero-width characters too


@st.composite
def good_cases(draw) -> Case:
    names = draw(st.lists(st.sampled_from(sorted(VALID_IMAGES)), max_size=2))
    sample = chat(*names, question=draw(texts), answer=draw(st.text(min_size=1, max_size=20)))
    if draw(st.booleans()):
        sample["id"] = draw(st.one_of(texts, st.integers()))
    if draw(st.booleans()):
        sample["extra"] = draw(st.dictionaries(texts, st.one_of(st.none(), st.floats(), texts), max_size=2))
    files = {name: VALID_IMAGES[name] for name in names}
    return Case(dump(sample, draw(st.booleans())), "good", files=files)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def wrong_structures(draw) -> Case:
    sample = chat(answer="yes")
    messages = sample["messages"]
    mutation = draw(st.integers(0, 8))
    if mutation == 0:
        return Case(dump(draw(json_values.filter(lambda v: not isinstance(v, dict)))), "not an object")
    if mutation == 1:
        sample["messages"] = draw(st.sampled_from([None, 1, "x", {}, [], [None]]))
    elif mutation == 2:
        messages[0]["role"] = draw(texts.filter(lambda r: r not in ROLES))
    elif mutation == 3:
        messages[1]["content"] = draw(st.sampled_from([None, 1, 2.5, {}, [{"type": "text"}], [{"text": "x"}]]))
    elif mutation == 4:
        messages[0]["content"] = [{"type": draw(st.sampled_from(["video", "audio", "", None])), "video": "x.mp4"}]
    elif mutation == 5:
        del messages[1]
    elif mutation == 6:
        messages.append({"role": "system", "content": "late"})
    elif mutation == 7:
        messages[1]["content"] = [{"type": "image", "image": "rgb.png"}, {"type": "text", "text": "x"}]
    else:
        sample["id"] = draw(st.sampled_from([[], {}, 1.5, True]))
    return Case(dump(sample), f"wrong structure {mutation}")


@st.composite
def lone_surrogates(draw) -> Case:
    """Half of a UTF-16 pair, as a JSON escape, in the text, the id or an image path."""
    escape = f"\\u{draw(st.integers(0xD800, 0xDFFF)):04x}".encode()
    where = draw(st.sampled_from(["question", "answer", "id", "image"]))
    sample = chat("SURROGATE.png" if where == "image" else "rgb.png", answer="SURROGATE" if where == "answer" else "ok")
    if where == "question":
        sample["messages"][0]["content"][-1]["text"] = "before SURROGATE after"
    if where == "id":
        sample["id"] = "SURROGATE"
    return Case(
        dump(sample).replace(b"SURROGATE", escape), f"surrogate in {where}", files={"rgb.png": VALID_IMAGES["rgb.png"]}
    )


@st.composite
def not_utf8(draw) -> Case:
    line = bytearray(dump(chat(answer=draw(texts.map(lambda t: t + "x")))))
    line[draw(st.integers(0, len(line) - 1))] = draw(st.sampled_from([0xFF, 0xFE, 0xC0]))
    return Case(bytes(line), "not UTF-8")


@st.composite
def truncated_json(draw) -> Case:
    line = draw(good_cases()).line
    return Case(line[: draw(st.integers(1, len(line) - 1))], "truncated JSON")


random_bytes = (
    st.binary(min_size=1, max_size=60)
    .map(lambda b: b.replace(b"\n", b" "))
    .filter(lambda b: b.strip(b" \t\r") != b"" and b"messages" not in b)
    .map(lambda b: Case(b, "random bytes"))
)


@st.composite
def long_paths(draw) -> Case:
    if draw(st.booleans()):
        ref = "a" * draw(st.integers(256, 3000)) + ".png"
    else:
        ref = "d/" * draw(st.integers(2050, 2500)) + "x.png"
    return Case(dump(chat(ref)), "long path")


ESCAPES = ["../outside.png", "OUTSIDE", "link-out.png", "sub/../../outside.png", "/etc/passwd", "../../../etc/passwd"]


@st.composite
def path_escapes(draw) -> Case:
    return Case(dump(chat(draw(st.sampled_from(ESCAPES)))), "path escape")


@st.composite
def bad_images(draw) -> Case:
    name = f"bad-{draw(st.integers(0, 10**6))}.{draw(st.sampled_from(['png', 'jpg', 'gif', 'webp', 'tif', 'bmp']))}"
    kind = draw(st.sampled_from(["random", "truncated", "empty", "too wide", "directory", "missing"]))
    if kind == "random":
        content = draw(st.sampled_from([b"\x00", *MAGIC])) + draw(st.binary(max_size=200))
    elif kind == "truncated":
        data = draw(st.sampled_from([PNG, JPEG]))
        content = data[: draw(st.integers(0, len(data) // 2))]
    elif kind == "empty":
        content = b""
    elif kind == "too wide":  # an aspect ratio Qwen's processors refuse
        content = encoded(Image.new("RGB", (402, 2)), "PNG")
    else:
        content = None
    files = {} if kind == "missing" else {name: content}
    return Case(dump(chat("rgb.png", name)), f"{kind} image", files={"rgb.png": VALID_IMAGES["rgb.png"], **files})


bad_cases = st.one_of(
    random_bytes,
    truncated_json(),
    wrong_structures(),
    lone_surrogates(),
    not_utf8(),
    long_paths(),
    path_escapes(),
    bad_images(),
)


def write_source(root: Path, cases: list[Case], blanks: list[bytes], endings: list[bytes]) -> tuple[Path, list[int]]:
    """The JSONL (with blank lines between cases) and its images under root/data; the line numbers of the cases."""
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (root / "outside.png").write_bytes(VALID_IMAGES["rgb.png"])
    (data / "link-out.png").symlink_to(root / "outside.png")
    lines, numbers = [], []
    for case, blank in zip(cases, blanks, strict=True):
        for name, content in case.files.items():
            if content is None:
                (data / name).mkdir(exist_ok=True)
            elif not (data / name).exists():
                (data / name).write_bytes(content)
        if blank:
            lines.append(blank)
        lines.append(case.line.replace(b"OUTSIDE", str(root / "outside.png").encode()))
        numbers.append(len(lines))
    text = b"".join(line + ending for line, ending in zip(lines, endings * len(lines), strict=False))
    (data / "input.jsonl").write_bytes(text)
    return data / "input.jsonl", numbers


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["data", *args])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str) -> None:
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("vlm-fsdp data: error: ") and err.count("\n") == 1, err


def assert_no_scratch(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".prepare-" in p.name]


@fuzz(max_examples=100)
@given(
    cases=st.tuples(st.lists(good_cases(), max_size=4), st.lists(bad_cases, max_size=10))
    .map(lambda lists: lists[0] + lists[1])
    .filter(bool)
    .flatmap(st.permutations),
    blanks=st.data(),
    endings=st.sampled_from([[b"\n"], [b"\r\n"], [b"\n", b"\r\n"]]),
    val=st.sampled_from([[], ["--val-fraction", "0.5"]]),
)
def test_prepare_keeps_every_good_line_and_reports_every_bad_one(workdir, cases, blanks, endings, val):
    blank_lines = blanks.draw(st.lists(st.sampled_from([b"", b"", b"  ", b"\t", b"\r"]), min_size=len(cases)))
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        root = Path(scratch)
        source, numbers = write_source(root, cases, blank_lines[: len(cases)], endings)
        output = root / "out"
        code, out, err = run("prepare", str(source), str(output), *val)
        event(f"exit {code}")
        for case in cases:
            event(case.kind)

        assert "Traceback" not in out + err
        assert_no_scratch(root)
        good = [n for n, case in zip(numbers, cases, strict=True) if case.good]
        bad = [n for n, case in zip(numbers, cases, strict=True) if not case.good]
        splits = Counter(split_of(case.line + b"\n", 0.5 if val else 0.0) for case in cases if case.good)
        if not splits["train"]:
            assert_one_line_error(code, out, err)
            assert not output.exists() and ("no usable sample" if not good else "train split would be empty") in err
            return
        assert (code, err) == (0, ""), err
        report = [json.loads(line) for line in (output / REPORT).read_text().splitlines()]
        assert [r["line"] for r in report] == bad, report
        assert all(r["reason"] and r["file"] == str(source) for r in report)
        assert f"wrote {len(good)} sample" in out and f"skipped {len(bad)} sample" in out
        listed = [line for line in out.splitlines() if line.startswith(f"  {source}:")]
        assert len(listed) == min(len(bad), CONSOLE_SKIPS)
        for split in ("train", "val"):
            if splits[split]:
                reader = SplitReader(output, split)
                reader.check()
                assert len(reader) == splits[split]
                for index in range(len(reader)):
                    record = reader.sample(index)["json"]
                    assert record["messages"] and all(i["width"] > 0 for i in record["images"])


@fuzz(max_examples=60)
@given(content=st.binary(max_size=300), newlines=st.lists(st.integers(0, 300), max_size=6))
def test_prepare_of_random_bytes_stops_with_one_line(workdir, content, newlines):
    for at in newlines:
        content = content[:at] + b"\n" + content[at:]
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        root = Path(scratch)
        (root / "input.jsonl").write_bytes(content)
        code, out, err = run("prepare", str(root / "input.jsonl"), str(root / "out"))
        assert_one_line_error(code, out, err)
        assert not (root / "out").exists()
        assert_no_scratch(root)


@fuzz(max_examples=300)
@given(
    magic=st.sampled_from([b"", *MAGIC]),
    body=st.binary(max_size=400),
    cut=st.none() | st.integers(0, 2000),
    base=st.sampled_from([b"", PNG, JPEG, *VALID_IMAGES.values()]),
)
def test_the_decoder_refuses_damaged_files_with_an_image_error(magic, body, cut, base):
    data = (base[:cut] if cut is not None and base else magic) + body
    try:
        kind, width, height = verify(data)
    except ImageError as err:
        assert str(err) and err.kind in ("corrupt image", "unsupported image", "image too large")
        return
    image = decode(data)
    assert image.mode == "RGB" and image.size == (width, height) and kind


@fuzz(max_examples=100)
@given(
    mode=st.sampled_from(["L", "I;16", "I;16B", "I", "1", "LA", "RGBA", "P", "CMYK", "RGB"]),
    width=st.integers(1, 9),
    height=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_odd_modes_decode_to_the_expected_8_bit_rgb(mode, width, height, seed):
    rng = np.random.default_rng(seed)
    image, expected, kind = odd_image(mode, rng, width, height)
    out = np.asarray(decode(encoded(image, kind))).astype(int)
    assert out.shape == (height, width, 3)
    assert np.abs(out - expected).max() <= (1 if mode in ("LA", "RGBA", "CMYK") else 0)


def odd_image(mode: str, rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, np.ndarray, str]:
    """An image of this mode with random pixels, the RGB values it stands for, and a lossless format for it."""
    shape = (height, width)
    if mode in ("I;16", "I;16B", "I"):
        values = rng.integers(0, 65536, shape)
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
        image = Image.frombytes(mode, (width, height), values.astype(dtype).tobytes())
        gray = (values * 255 + 32767) // 65535
        return image, np.repeat(gray[..., None], 3, axis=2), "TIFF" if mode != "I;16" else "PNG"
    if mode == "1":
        bits = rng.integers(0, 2, shape).astype(bool)
        return Image.fromarray(bits), np.repeat(bits[..., None] * 255, 3, axis=2), "PNG"
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3))
        indices = rng.integers(0, 256, shape)
        image = Image.new("P", (width, height))
        image.putpalette(palette.astype(np.uint8).tobytes())
        image.putdata(indices.flatten().tolist())
        return image, palette[indices], "PNG"
    channels = {"L": 1, "LA": 2, "RGBA": 4, "CMYK": 4, "RGB": 3}[mode]
    values = rng.integers(0, 256, (*shape, channels))
    image = Image.frombytes(mode, (width, height), values.astype(np.uint8).tobytes())
    if mode == "CMYK":
        rgb = (255 - values[..., :3]) * (255 - values[..., 3:]) / 255
        return image, rgb, "TIFF"
    color, alpha = (values, None) if mode in ("L", "RGB") else (values[..., :-1], values[..., -1:])
    color = np.repeat(color, 3, axis=2) if color.shape[-1] == 1 else color
    if alpha is not None:
        color = (color * alpha + 255 * (255 - alpha)) / 255
    return image, color, "PNG"


@pytest.fixture(scope="module")
def intact(workdir) -> Path:
    """A prepared dataset of 7 samples over three train shards and a val shard."""
    root = workdir / "intact"
    root.mkdir()
    for name, content in VALID_IMAGES.items():
        (root / name).write_bytes(content)
    lines = [dump(chat(name, answer=f"Image {i}.")).decode() for i, name in enumerate(sorted(VALID_IMAGES)[:6])]
    (root / "input.jsonl").write_text("\n".join([*lines, dump(chat(answer="Text only.")).decode()]) + "\n")
    prepare(root / "input.jsonl", root / "dataset", val_fraction=0.3, samples_per_shard=2, progress=False)
    return root / "dataset"


damages = st.lists(
    st.tuples(
        st.sampled_from(["truncate", "overwrite", "delete", "append", "empty"]),
        st.integers(0, 100),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=64),
    ),
    min_size=1,
    max_size=3,
)


def damaged_copy(intact: Path, parent: Path, damages: list[tuple]) -> Path:
    dataset = parent / "dataset"
    shutil.copytree(intact, dataset)
    for action, pick, where, garbage in damages:
        files = sorted(p for p in dataset.rglob("*") if p.is_file())
        if files:
            damage(files[pick % len(files)], action, where, garbage)
    return dataset


@fuzz(max_examples=80)
@given(damages=damages)
def test_inspect_of_a_damaged_dataset_reports_or_stops_with_one_line(workdir, intact, damages):
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        dataset = damaged_copy(intact, Path(scratch), damages)
        code, out, err = run("inspect", str(dataset), "--json")
        event(f"exit {code}")
        assert "Traceback" not in out + err
        if code == 2:
            assert_one_line_error(code, out, err)
        else:
            assert code == 0 and err == "" and "train" in json.loads(out)


@fuzz(max_examples=25)
@given(damages=damages)
def test_bench_of_a_damaged_dataset_runs_or_stops_with_one_line(workdir, intact, damages):
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        dataset = damaged_copy(intact, Path(scratch), damages)
        code, out, err = run(
            "bench", f"data.path={dataset}", "--workers", "0", "--microbatches", "2", "--warmup", "1", "--json"
        )
        event(f"exit {code}")
        assert "Traceback" not in out + err and code in (0, 2)
        if code == 2:  # after the warnings of samples the loader skipped, if any
            assert out == "" and err.splitlines()[-1].startswith("vlm-fsdp data: error: "), err
        else:
            assert json.loads(out)["microbatches"] == 2


def damage(path: Path, action: str, where: float, garbage: bytes) -> None:
    size = path.stat().st_size
    at = int(where * size)
    if action == "truncate":
        with path.open("r+b") as file:
            file.truncate(at)
    elif action == "overwrite":
        with path.open("r+b") as file:
            file.seek(at)
            file.write(garbage)
    elif action == "delete":
        path.unlink()
    elif action == "append":
        with path.open("ab") as file:
            file.write(garbage)
    else:
        path.write_bytes(b"")
