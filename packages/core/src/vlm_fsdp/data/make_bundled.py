"""Regenerate the bundled data in `bundled/`: photos, question/answer conversations, text-only set, tokenizer.

    uv run --with scikit-image==0.26.0 python -m vlm_fsdp.data.make_bundled

The photos come from `skimage.data` (the images its wheel ships; each one's source and licence is written to
`bundled/SOURCES.md`). Each photo is cut into views of varied crops, aspect ratios and resolutions, and every
question is answered from the pixels or the photo's subject, so a model can learn them: what the photo shows, its
orientation, its brightest quadrant, colour or black-and-white, its dominant colour channel, whether two views
show the same subject, and which of two images is a photo rather than a tile-shuffled one. The text-only set is
arithmetic and spelling exercises. The tokenizer is a byte-level BPE of 8000 tokens trained on all of that text
plus the docstrings of Python's standard library, followed by Qwen's special tokens. Output is deterministic for
given versions of Python, Pillow, NumPy, scikit-image and tokenizers.
"""

from __future__ import annotations

import ast
import io
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from vlm_fsdp.data.tokenizer import BUNDLED_REGULAR_TOKENS, SPECIAL_TOKENS

OUT = Path(__file__).parent / "bundled"
SEED = 20261123
TRAIN_VIEWS, VAL_VIEWS = 7, 1
JPEG_QUALITY = 80
ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3), (2, 1), (1, 2)]
# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Photo:
    name: str
    """skimage.data function."""
    subject: str
    keep: tuple[float, float, float, float] | None
    """(left, top, right, bottom) fractions every crop must contain so the subject stays in view; None: any crop."""
    credit: str
    licence: str


PHOTOS = [
    Photo("astronaut", "an astronaut in an orange spacesuit", (0.1, 0.05, 0.65, 0.7),
          "Eileen Collins, NASA Great Images database (https://flic.kr/p/r9qvLn)",
          "no known copyright restrictions, released into the public domain"),
    Photo("camera", "a man filming with a camera on a tripod", (0.2, 0.1, 0.75, 0.95),
          "Lav Varshney", "CC0 by the photographer"),
    Photo("chelsea", "the face of a tabby cat", (0.3, 0.15, 0.75, 0.85),
          "Chelsea the cat, by Stefan van der Walt", "CC0 by the photographer"),
    Photo("coffee", "a cup of espresso on a red saucer", (0.1, 0.05, 0.75, 0.9),
          "Pikolo Espresso Bar, photo by Rachel Michetti", "CC0 by the photographer"),
    Photo("coins", "rows of ancient coins", None,
          "Greek coins from Pompeii, Brooklyn Museum Collection", "no known copyright restrictions"),
    Photo("hubble_deep_field", "galaxies scattered across deep space", None,
          "Hubble eXtreme Deep Field, NASA (HubbleSite)", "public domain (NASA media guidelines)"),
    Photo("rocket", "a rocket on its launch pad at dusk", (0.35, 0.15, 0.65, 0.95),
          "DSCOVR launch on Falcon 9, SpaceX Photos", "released into the public domain by SpaceX"),
    Photo("retina", "the retina of a human eye", (0.2, 0.2, 0.8, 0.8),
          "Fundus photograph, Mikael Häggström, Wikimedia Commons", "CC0 1.0 Universal"),
    Photo("clock", "a motion-blurred wall clock", (0.3, 0.25, 0.75, 0.75),
          "Stefan van der Walt", "released into the public domain by the photographer"),
    Photo("brick", "a brick wall", None, "CC0Textures (Bricks25), transformed by scikit-image", "CC0"),
    Photo("grass", "grass", None, "DeviantArt user linolafett (Grass-01)", "CC0"),
    Photo("gravel", "gravel", None, "CC0Textures (Gravel04)", "CC0"),
    Photo("cell", "a single cell under a microscope", (0.55, 0.45, 0.85, 0.8),
          "quantitative phase image, Paul Müller et al., Optics Express 26(8) 2018", "CC0"),
    Photo("immunohistochemistry", "stained tissue under a microscope", None,
          "Center for Microscopy And Molecular Imaging (CMMI)", "no known copyright restrictions"),
]  # fmt: skip

SYSTEM = "You are a helpful assistant that answers questions about images."
QUESTIONS = {
    "subject": ["What does this photo show?", "What is in this picture?", "Describe the subject of this image."],
    "orientation": ["Is this image landscape, portrait or square?", "What is the orientation of this image?"],
    "quadrant": ["Which quadrant of the image is the brightest?", "Where is this image brightest: which quadrant?"],
    "colour": ["Is this a colour or a black-and-white photo?", "Does this image have colour?"],
    "channel": ["Which colour dominates this image: red, green or blue?", "Is this image mostly red, green or blue?"],
}


def view(rng: np.random.Generator, source: Image.Image, photo: Photo) -> Image.Image:
    """A random crop of `source` with a random aspect ratio, size and mirror image that keeps the subject."""
    width, height = source.size
    for _ in range(1000):
        aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
        scale = min(width / aw, height / ah) * rng.uniform(0.6, 1.0)
        w, h = int(aw * scale), int(ah * scale)
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if photo.keep is None or (
            left <= photo.keep[0] * width
            and top <= photo.keep[1] * height
            and left + w >= photo.keep[2] * width
            and top + h >= photo.keep[3] * height
        ):
            break
    else:
        raise AssertionError(f"no crop of {photo.name} keeps its subject")
    crop = source.crop((left, top, left + w, top + h))
    long_side = int(rng.integers(160, 449))
    factor = long_side / max(w, h)
    crop = crop.resize((max(16, round(w * factor)), max(16, round(h * factor))), Image.Resampling.LANCZOS)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.3 else crop


def shuffled(rng: np.random.Generator, image: Image.Image, tiles: int = 4) -> Image.Image:
    """The image cut into tiles x tiles pieces put back in a random order."""
    w, h = image.width // tiles * tiles, image.height // tiles * tiles
    array = np.asarray(image.crop((0, 0, w, h)))
    pieces = [
        array[r * h // tiles : (r + 1) * h // tiles, c * w // tiles : (c + 1) * w // tiles]
        for r in range(tiles)
        for c in range(tiles)
    ]
    order = rng.permutation(len(pieces))
    rows = [np.concatenate([pieces[i] for i in order[r * tiles : (r + 1) * tiles]], axis=1) for r in range(tiles)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def answers(image: Image.Image, photo: Photo) -> dict[str, str]:
    """The answer of each question type that the image answers clearly."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    luma = rgb @ np.float32([0.299, 0.587, 0.114])
    h, w = luma.shape
    out = {"subject": f"It shows {photo.subject}."}
    ratio = image.width / image.height
    out["orientation"] = "Landscape." if ratio > 1.1 else "Portrait." if ratio < 1 / 1.1 else "Square."
    quadrants = {
        "top left": luma[: h // 2, : w // 2].mean(),
        "top right": luma[: h // 2, w // 2 :].mean(),
        "bottom left": luma[h // 2 :, : w // 2].mean(),
        "bottom right": luma[h // 2 :, w // 2 :].mean(),
    }
    ranked = sorted(quadrants, key=quadrants.get, reverse=True)
    if quadrants[ranked[0]] - quadrants[ranked[1]] >= 8:
        out["quadrant"] = f"The {ranked[0]} quadrant."
    colour = image.mode == "RGB"
    out["colour"] = "Colour." if colour else "Black and white."
    if colour:
        means = dict(zip(("red", "green", "blue"), rgb.reshape(-1, 3).mean(axis=0), strict=True))
        top = sorted(means, key=means.get, reverse=True)
        if means[top[0]] - means[top[1]] >= 12:
            out["channel"] = f"{top[0].capitalize()}."
    return out


def user(*images: str, text: str) -> dict:
    parts = [{"type": "image", "image": i} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def image_samples(rng: np.random.Generator, views: list[tuple[str, Image.Image, Photo]], extra: list) -> list[dict]:
    """Conversations about single views, pairs of views, and photo-versus-shuffled pairs (`extra`)."""
    samples = []
    for path, image, photo in views:
        known = answers(image, photo)
        kinds = list(rng.permutation(sorted(known)))
        first, second, *rest = kinds
        messages = [user(path, text=rng.choice(QUESTIONS[first])), assistant(known[first])]
        messages += [user(text=rng.choice(QUESTIONS[second])), assistant(known[second])]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        samples.append({"messages": messages})
        for kind in rest[:2]:
            samples.append({"messages": [user(path, text=rng.choice(QUESTIONS[kind])), assistant(known[kind])]})
        other_path, _, other = views[int(rng.integers(len(views)))]
        if other.name == photo.name:
            answer = f"Yes, both show {photo.subject}."
        else:
            answer = f"No: {photo.subject}, then {other.subject}."
        question = "Do these two images show the same subject?"
        samples.append({"messages": [user(path, other_path, text=question), assistant(answer)]})
    for photo_path, shuffled_path in extra:
        pair, answer = (
            ((photo_path, shuffled_path), "The first.")
            if rng.random() < 0.5
            else (
                (shuffled_path, photo_path),
                "The second.",
            )
        )
        question = "One of these two images is a photo, the other one has its tiles shuffled. Which is the photo?"
        samples.append({"messages": [user(*pair, text=question), assistant(answer)]})
    return [samples[i] for i in rng.permutation(len(samples))]


WORDS = [
    *("astronaut", "camera", "coffee", "rocket", "retina", "clock", "brick", "grass", "gravel", "galaxy", "coin"),
    *("tissue", "cat", "saucer", "tripod", "launch", "photo", "image", "pixel", "colour", "bright", "shadow"),
    *("window", "river", "mountain", "garden", "silver", "orange", "purple", "yellow", "green", "blue", "number"),
    *("letter", "answer", "question", "model", "train", "token", "vision", "language", "sequence", "packing", "patch"),
]


def text_samples(rng: np.random.Generator, count: int) -> list[dict]:
    """Short exercises a small model can learn: arithmetic, comparison, spelling."""
    samples = []
    for _ in range(count):
        kind = int(rng.integers(6))
        a, b, c = (int(x) for x in rng.integers(0, 100, size=3))
        word = str(rng.choice(WORDS))
        if kind == 0:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            q, ans = f"What is {max(a, b)} minus {min(a, b)}?", f"{max(a, b)} minus {min(a, b)} is {abs(a - b)}."
        elif kind == 2:
            q, ans = f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger." if a != b else "They are equal."
        elif kind == 3:
            q = f"Sort these numbers from smallest to largest: {a}, {b}, {c}."
            ans = ", ".join(map(str, sorted([a, b, c]))) + "."
        elif kind == 4:
            q, ans = f"Spell the word '{word}' backwards.", f"{word[::-1]}"
        else:
            q, ans = f"How many letters does the word '{word}' have?", f"It has {len(word)} letters."
        samples.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    return samples


def stdlib_docstrings() -> list[str]:
    """Docstrings of the standard library's modules: plenty of varied English for the BPE merges."""
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def train_tokenizer(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUNDLED_REGULAR_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.get_vocab_size() == BUNDLED_REGULAR_TOKENS, "the corpus is too small for 8000 tokens"
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == BUNDLED_REGULAR_TOKENS + offset
    return tokenizer


def save_jpeg(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    path.write_bytes(buffer.getvalue())


def write_jsonl(path: Path, samples: list[dict]) -> None:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")


def sources_md(skimage_version: str) -> str:
    rows = "\n".join(f"| `{p.name}` | {p.credit} | {p.licence} |" for p in PHOTOS)
    return f"""# Bundled data: sources and licences

Generated by `python -m vlm_fsdp.data.make_bundled` from the images of scikit-image {skimage_version}'s
`skimage.data` (scikit-image itself is BSD-3-Clause). Files in `images/` are named after the `skimage.data` image
they were cut from; each keeps that image's licence:

| image | source | licence |
| --- | --- | --- |
{rows}

The conversations (`train.jsonl`, `val.jsonl`) and the text-only exercises (`text_train.jsonl`, `text_val.jsonl`)
were generated by the same script and are dedicated to the public domain (CC0). `tokenizer.json` is a byte-level
BPE trained on those texts and on docstrings of Python {sys.version_info.major}.{sys.version_info.minor}'s
standard library.
"""


def main() -> None:
    import skimage
    import skimage.data

    rng = np.random.default_rng(SEED)
    images_dir = OUT / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for old in images_dir.glob("*.jpg"):
        old.unlink()
    splits = {"train": ([], []), "val": ([], [])}
    for photo in PHOTOS:
        array = getattr(skimage.data, photo.name)()
        source = Image.fromarray(array).convert("RGB" if array.ndim == 3 else "L")
        for split, count in (("train", TRAIN_VIEWS), ("val", VAL_VIEWS)):
            views, extra = splits[split]
            for i in range(count):
                image = view(rng, source, photo)
                name = f"images/{photo.name}_{split}{i}.jpg"
                save_jpeg(image, OUT / name)
                views.append((name, image, photo))
                if i % 2 == 0:
                    tiles = f"images/{photo.name}_{split}{i}_shuffled.jpg"
                    save_jpeg(shuffled(rng, view(rng, source, photo)), OUT / tiles)
                    extra.append((name, tiles))
    texts = []
    for split, (views, extra) in splits.items():
        samples = image_samples(rng, views, extra)
        write_jsonl(OUT / f"{split}.jsonl", samples)
        text = text_samples(rng, 1500 if split == "train" else 150)
        write_jsonl(OUT / f"text_{split}.jsonl", text)
        texts += [part["text"] if isinstance(part, dict) else part for s in samples + text for m in s["messages"]
                  for part in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                  if not isinstance(part, dict) or part["type"] == "text"]  # fmt: skip
    tokenizer = train_tokenizer(stdlib_docstrings() + texts * 20)
    tokenizer.save(str(OUT / "tokenizer.json"))
    (OUT / "SOURCES.md").write_text(sources_md(skimage.__version__))
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(list(images_dir.glob('*.jpg')))} images, {size / 2**20:.1f} MiB in {OUT}")


if __name__ == "__main__":
    main()
