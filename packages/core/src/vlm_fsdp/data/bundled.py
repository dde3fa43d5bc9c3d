"""The bundled data: real photos with questions about them, and a text-only set, prepared on first use.

The repository holds the sources (`bundled/`: JPEG files, conversation JSONL, tokenizer, licences; see
`make_bundled.py`), not the prepared Energon shards: shards would store every photo a second time as binary tars
plus an index, and preparing takes about a second. The prepared copy lives in
`$XDG_CACHE_HOME/vlm-fsdp/` (default `~/.cache/vlm-fsdp/`) under a hash of the sources, so edited sources are
prepared again; ranks that prepare at the same time each write a private copy and the first rename wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from vlm_fsdp.data.prepare import prepare

SOURCES = Path(__file__).parent / "bundled"
SETS = {False: ("train.jsonl", "val.jsonl"), True: ("text_train.jsonl", "text_val.jsonl")}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm-fsdp"


def bundled_dataset(*, text_only: bool) -> Path:
    """The prepared Energon dataset of the bundled image-text set (or text-only set), prepared if needed."""
    train, val = (SOURCES / name for name in SETS[text_only])
    files = [train, val] + ([] if text_only else sorted((SOURCES / "images").glob("*.jpg")))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(SOURCES).as_posix().encode() + b"\0" + path.read_bytes())
    target = cache_dir() / f"bundled-{'text' if text_only else 'vqa'}-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        prepare(train, scratch / "dataset", val=val, progress=False)
        try:
            (scratch / "dataset").rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
