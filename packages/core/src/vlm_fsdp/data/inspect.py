"""`data inspect`: what a prepared dataset holds, from its samples' recorded metadata (no image is decoded)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from vlm_fsdp.data.chat import SampleError, image_refs
from vlm_fsdp.data.energon import SPLITS, NoSplitError, SplitReader
from vlm_fsdp.data.images import ImageError, target_size
from vlm_fsdp.data.prepare import plural
from vlm_fsdp.data.samples import cost
from vlm_fsdp.data.settings import DataSettings

LONG_SIDE = (256, 512, 1024, 2048)


def _long_side_bin(side: int) -> str:
    low = max([0, *(b for b in LONG_SIDE if side >= b)])
    high = next((b for b in LONG_SIDE if side < b), None)
    return f"{low}-{high - 1} px" if high else f">={low} px"


def inspect_split(reader: SplitReader, settings: DataSettings) -> dict:
    """Counts, original and resized image sizes, and token lengths of one split."""
    per_sample, long_sides, resized, tokens, unusable = Counter(), Counter(), Counter(), [], Counter()
    images = 0
    for index in range(len(reader)):
        record = reader.meta(index)
        if record is None:
            continue
        refs = image_refs(record["messages"])
        per_sample[len(refs)] += 1
        sizes = {im["name"]: (im["width"], im["height"]) for im in record["images"]}
        for ref in refs:
            width, height = sizes[ref]
            images += 1
            long_sides[_long_side_bin(max(width, height))] += 1
            try:
                h, w = target_size(height, width, settings.images)
            except ImageError:
                continue
            resized[f"{h}x{w}"] += 1
        try:
            tokens.append(cost(record, settings)[0])
        except SampleError as err:
            unusable[err.kind] += 1
    lengths = np.asarray(tokens or [0])
    return {
        "samples": sum(per_sample.values()),
        "images": images,
        "images_per_sample": dict(sorted(per_sample.items())),
        "long_side": {b: long_sides[b] for b in map(_long_side_bin, (0, *LONG_SIDE)) if long_sides[b]},
        "resized": dict(resized.most_common()),
        "tokens": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "total": int(lengths.sum()),
            "over_seq_length": int((lengths > settings.seq_length).sum()),
        },
        "unusable": dict(unusable),
    }


def inspect_dataset(settings: DataSettings) -> dict:
    """`inspect_split` of every split of the dataset that has samples; DatasetError names a damaged file."""
    out = {}
    for split in SPLITS:
        try:
            reader = SplitReader(settings.dataset, split)
        except NoSplitError:
            if split == "train":
                raise
            continue
        reader.check()
        if len(reader):
            out[split] = inspect_split(reader, settings)
    return out


def render(report: dict, settings: DataSettings) -> str:
    lines = [f"dataset {settings.dataset}"]
    for split, r in report.items():
        t = r["tokens"]
        lines += [
            f"{split}: {plural(r['samples'], 'sample')}, {plural(r['images'], 'image')}",
            "  images per sample: " + ", ".join(f"{k}: {v}" for k, v in r["images_per_sample"].items()),
        ]
        if r["images"]:
            lines += [
                "  original size (long side): " + ", ".join(f"{k}: {v}" for k, v in r["long_side"].items()),
                "  resized to (height x width): " + ", ".join(f"{k}: {v}" for k, v in r["resized"].items()),
            ]
        lines += [
            f"  tokens per sample: min {t['min']}, median {t['median']:.0f}, mean {t['mean']:.1f}, "
            f"p95 {t['p95']:.0f}, max {t['max']}; {t['total']} in all; "
            f"{t['over_seq_length']} longer than model.seq_length={settings.seq_length}",
        ]
        if r["unusable"]:
            lines.append("  unusable: " + ", ".join(f"{k}: {v}" for k, v in r["unusable"].items()))
    return "\n".join(lines)
