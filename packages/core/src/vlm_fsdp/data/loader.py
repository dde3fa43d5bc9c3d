"""`build_loader`: packed, rank-balanced, resumable microbatches from a prepared dataset.

How a microbatch comes about, the same way on every data-parallel rank:

1. Sample order: for training, a fresh permutation of the split per epoch (seeded by train.seed and the epoch),
   epochs following one another endlessly; for validation, the split in order, once per `iter()`.
2. Packing: the order is cut into windows of samples that fill data.packing_window sequences; each window's
   samples are packed into sequences of model.seq_length tokens (first-fit decreasing, also under the patch
   budget) from their recorded sizes alone, and the sequences of a training window are shuffled. This gives one
   global stream of sequences that depends on neither the number of ranks nor the microbatch size.
3. Balancing: each round takes the next dp_size x micro_batch_size sequences of the stream and gives every rank
   micro_batch_size of them with similar patch counts (`balance.py`).
4. Workers: a rank's share of the round is read, decoded and encoded by worker processes (forkserver: no CUDA
   state is ever forked into a process that decodes with PIL), in order, with a timeout; with workers, one more
   process packs the next training window while the current one is handed out (`Planner`).

The loader's state is the position in the sequence stream (where its window starts in the sample order, and how
many of the window's sequences were taken), so a restored loader continues with exactly the sequences an
uninterrupted run would produce, with any number of ranks or microbatch size.

Where Energon is and is not used: the dataset is an Energon WebDataset read through Energon's random-access tar
reader (`energon.py`). Energon's loader machinery (`get_train_dataset`, its packing and `get_savable_loader`) is
not used: it shards samples over ranks and workers and saves a state per rank and worker, which cannot be restored
with a different number of ranks, and its packing sees only one worker's samples, so it cannot balance vision
work across ranks. Here packing and balancing plan on recorded sizes in the main process (cheap: no image is
decoded) and only decoding runs in workers.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.balance import assign
from vlm_fsdp.data.batch import Batch, collate
from vlm_fsdp.data.chat import SampleError
from vlm_fsdp.data.energon import SplitReader
from vlm_fsdp.data.packing import Item, Sequence, pack
from vlm_fsdp.data.samples import cost, make_doc
from vlm_fsdp.data.settings import DataSettings, resolve
from vlm_fsdp.errors import UserError

log = logging.getLogger("vlm_fsdp.data")
STATE_VERSION = 1


class DataError(UserError):
    """The data cannot be loaded as configured (a skipped sample under data.strict, a timeout, no samples)."""


@dataclass(frozen=True)
class Skip:
    """A sample left out, and why."""

    sample: str
    kind: str
    detail: str


@dataclass(kw_only=True)
class Window:
    """The packed sequences of one window of the sample order, and the samples it left out."""

    sequences: list[Sequence]
    skips: list[Skip]
    end: int
    """Position in the order where the next window begins."""


@dataclass(kw_only=True)
class Work:
    """What one microbatch of one rank is made of: the job a worker gets."""

    rows: list[list[int]]
    """Dataset indices of the samples of each row."""
    position: tuple[int, int]
    """The stream position after this microbatch's round: (window start in the sample order, sequences of that
    window already taken)."""
    skips: list[Skip]
    """Samples the planner left out since the previous round."""


@dataclass(kw_only=True)
class LoaderStats:
    """Running counts of what one rank's loader delivered and skipped."""

    microbatches: int = 0
    samples: int = 0
    images: int = 0
    tokens: int = 0
    """Useful (non-padding) tokens."""
    loss_tokens: int = 0
    capacity: int = 0
    """Token slots delivered: microbatches x micro_batch_size x seq_length."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped samples by reason (samples the packer left out are counted on every rank)."""

    @property
    def packing_efficiency(self) -> float:
        """Useful tokens / token slots."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict:
        return {
            "microbatches": self.microbatches,
            "samples": self.samples,
            "images": self.images,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "capacity": self.capacity,
            "packing_efficiency": self.packing_efficiency,
            "skipped": dict(self.skipped),
        }


class Planner:
    """The global sequence stream of a split: sample order, windows and their packing (identical on every rank).

    With `lookahead` (a multiprocessing context), the window after the one in use is packed in a process of its own
    meanwhile: packing reads and tokenizes every sample of a window (about 0.4 ms each; a 4,096-token sequence of
    the bundled text holds some 130), which in the rank's process would stop its training loop for each new window.
    """

    def __init__(
        self, settings: DataSettings, reader: SplitReader, *, train: bool, lookahead: BaseContext | None = None
    ):
        self.settings, self.reader, self.train = settings, reader, train
        self.size = len(reader)
        self._windows: OrderedDict[int, Window] = OrderedDict()
        self._epoch: tuple[int, np.ndarray] | None = None
        self._lookahead = lookahead
        self._executor: ProcessPoolExecutor | None = None
        self._next: tuple[int, Future] | None = None

    def __getstate__(self) -> dict:
        # what the lookahead process needs: no cached windows, order, or the process itself
        return self.__dict__ | {"_windows": OrderedDict(), "_epoch": None, "_lookahead": None, "_executor": None,
                                "_next": None}  # fmt: skip

    def close(self) -> None:
        """Stop the lookahead process (the next window starts it again, unless it failed)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._next = None

    def index(self, position: int) -> int:
        """Dataset index of the sample at this position of the order."""
        if not self.train:
            return position
        epoch, offset = divmod(position, self.size)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng((self.settings.seed, epoch)).permutation(self.size))
        return int(self._epoch[1][offset])

    def window(self, start: int) -> Window:
        """The window that begins at this position of the order."""
        if start not in self._windows:
            ahead = self._next is not None and self._next[0] == start
            self._windows[start] = self._packed_ahead() if ahead else self._pack(start)
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        window = self._windows[start]
        if self._lookahead is not None and (self._next is None or self._next[0] != window.end):
            if self._executor is None:
                self._executor = ProcessPoolExecutor(1, mp_context=self._lookahead)
            try:
                self._next = (window.end, self._executor.submit(self._pack, window.end))
            except BrokenProcessPool:  # the process died before this window was handed to it
                log.warning(
                    "the lookahead process died (BrokenProcessPool) before the window at sample %d was handed to it; "
                    "packing the later windows in this process",
                    window.end,
                )
                self.close()
                self._lookahead = None
        return window

    def _packed_ahead(self) -> Window:
        """The window the lookahead process packed. When that process died or took longer than data.timeout_seconds,
        this window and the later ones are packed here instead, and the log says so."""
        start, future = self._next
        try:
            return future.result(timeout=self.settings.timeout_seconds)
        except (TimeoutError, BrokenProcessPool) as err:
            log.warning(
                "the window at sample %d, packed ahead in a process of its own, did not arrive (%s); packing it and "
                "the later windows in this process",
                start,
                f"{type(err).__name__}: {err}" if str(err) else type(err).__name__,
            )
            self.close()
            self._lookahead = None
            return self._pack(start)

    def _pack(self, start: int) -> Window:
        s = self.settings
        items, skips, tokens, position = [], [], 0, start
        while tokens < s.packing_window * s.seq_length and (self.train or position < self.size):
            if position - start > self.size and not items:
                raise DataError(
                    f"{self.reader.root} ({self.reader.split} split): no sample is usable"
                    + (" (data.text_only keeps only samples without images)" if s.drop_image_samples else "")
                    + "".join(f"; {skip.sample}: {skip.kind} ({skip.detail})" for skip in skips[:3])
                )
            item = self._item(self.index(position), skips)
            position += 1
            if item is not None:
                items.append(item)
                tokens += item.tokens
        sequences = pack(items, s.seq_length, s.max_patches_per_sequence)
        if self.train:
            order = np.random.default_rng((s.seed, start, 1)).permutation(len(sequences))
            sequences = [sequences[i] for i in order]
        return Window(sequences=sequences, skips=skips, end=position)

    def _item(self, index: int, skips: list[Skip]) -> Item | None:
        """What packing needs of a sample, or None (with the reason added to `skips` when it is unusable)."""
        s = self.settings
        try:
            record = self.reader.meta(index)
            if record is None or (s.drop_image_samples and record["images"]):
                return None  # excluded by the dataset's split.yaml, or has images under data.text_only
            tokens, patches = cost(record, s)
        except SampleError as err:
            skips.append(Skip(f"#{index}", err.kind, err.detail))
            return None
        except (KeyError, TypeError, ValueError) as err:
            skips.append(Skip(f"#{index}", "unreadable sample", repr(err)))
            return None
        if tokens > s.seq_length:
            skips.append(Skip(record["id"], "longer than model.seq_length", f"{tokens} tokens"))
        elif s.max_patches_per_sequence is not None and patches > s.max_patches_per_sequence:
            skips.append(Skip(record["id"], "over the patch budget", f"{patches} patches"))
        else:
            return Item(index=index, tokens=tokens, patches=patches)
        return None

    def rounds(self, position: tuple[int, int], count: int) -> Iterator[tuple[list[Sequence], list[Skip], tuple]]:
        """From `position` (window start, sequences of it already taken) on, each round's `count` sequences (fewer
        at the end of a validation pass), the samples left out on the way, and the position after the round."""
        start, taken = position
        while True:
            sequences, skips = [], []
            while len(sequences) < count and (self.train or start < self.size):
                window = self.window(start)
                if taken == 0:
                    skips += window.skips
                more = window.sequences[taken : taken + count - len(sequences)]
                sequences += more
                taken += len(more)
                if taken >= len(window.sequences):
                    start, taken = window.end, 0
            if not sequences:
                return
            yield sequences, skips, (start, taken)


class Rounds:
    """The sampler of the DataLoader: this rank's Work per round, from the loader's position at `iter()` time."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __iter__(self) -> Iterator[Work]:
        loader = self.loader
        rows = loader.settings.micro_batch_size
        for sequences, skips, after in loader.planner.rounds(loader.position, loader.dp_size * rows):
            mine = assign([s.patches for s in sequences], loader.dp_size, rows)[loader.dp_rank]
            work_rows = [[item.index for item in sequences[i].items] for i in mine]
            yield Work(rows=work_rows + [[]] * (rows - len(work_rows)), position=after, skips=skips)


class Microbatches(Dataset):
    """What the workers run: Work -> (Batch, Work, skipped samples). Opens the dataset lazily in each process."""

    def __init__(self, settings: DataSettings, reader: SplitReader):
        self.settings, self.reader = settings, reader

    def __getitem__(self, work: Work) -> tuple[Batch, Work, list[Skip]]:
        rows, skips = [], []
        for indices in work.rows:
            docs = []
            for index in indices:
                parts = self.reader.sample(index)
                try:
                    docs.append(make_doc(parts, self.settings))
                except SampleError as err:
                    skips.append(Skip(parts["json"]["id"], err.kind, err.detail))
            rows.append(docs)
        s = self.settings
        return collate(rows, s.seq_length, s.special.pad, s.images), work, skips


def _as_is(item):
    return item


class Loader:
    """Microbatches (`Batch`) of one data-parallel rank; see the module docstring. Training iterates endlessly;
    validation makes one pass per `iter()`, every rank getting the same number of microbatches (at the end of the
    pass some rows, or a whole microbatch, may hold only padding: num_loss_tokens 0)."""

    def __init__(self, settings: DataSettings, split: Literal["train", "val"], *, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.settings, self.split, self.dp_rank, self.dp_size = settings, split, dp_rank, dp_size
        reader = SplitReader(settings.dataset, split)
        if not len(reader):
            raise DataError(f"{settings.dataset} has no samples in its '{split}' split")
        workers = settings.num_workers
        context = None
        if workers:
            context = multiprocessing.get_context("forkserver")
            # the fork server imports these once; each worker forked from it then starts without importing torch
            context.set_forkserver_preload([__name__])
        # with workers, the rank's process only hands out work: the next training window is packed meanwhile
        lookahead = context if split == "train" else None
        self.planner = Planner(settings, reader, train=split == "train", lookahead=lookahead)
        self.position = (0, 0)
        self.stats = LoaderStats()
        self._loader = DataLoader(
            Microbatches(settings, reader),
            sampler=Rounds(self),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            multiprocessing_context=context,
            prefetch_factor=settings.prefetch_factor if workers else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            timeout=settings.timeout_seconds if workers else 0,
        )
        self._iterator = None

    def __iter__(self) -> Loader:
        if self.split == "val":
            self.position, self._iterator = (0, 0), None
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        try:
            batch, work, skips = next(self._iterator)
        except StopIteration:
            self._iterator = None
            raise
        except RuntimeError as err:
            if "timed out" not in str(err):
                raise
            self.close()
            raise DataError(
                f"the data workers delivered no microbatch within data.timeout_seconds="
                f"{self.settings.timeout_seconds}: decoding is too slow for it (raise data.num_workers or the "
                "timeout) or a worker hangs (check the storage of the dataset)"
            ) from None
        self.position = work.position
        for skip in work.skips + skips:
            self._skip(skip)
        s = self.stats
        s.microbatches += 1
        s.samples += len(batch.doc_lengths)
        s.images += len(batch.image_patches)
        s.tokens += batch.num_tokens
        s.loss_tokens += batch.num_loss_tokens
        s.capacity += batch.input_ids.numel()
        return batch

    def close(self) -> None:
        """Stop the worker processes now (they stop anyway when the loader is garbage-collected); the next
        microbatch starts them again."""
        # the DataLoader keeps its persistent workers' iterator too; the last reference going shuts the workers down
        self._iterator = self._loader._iterator = None
        self.planner.close()

    def _skip(self, skip: Skip) -> None:
        if self.settings.strict:
            raise DataError(
                f"sample {skip.sample}: {skip.kind} ({skip.detail}). data.strict=true stops here; set it to false "
                "to skip such samples"
            )
        self.stats.skipped[skip.kind] += 1
        log.warning("skipped sample %s: %s (%s)", skip.sample, skip.kind, skip.detail)

    def state_dict(self) -> dict:
        """The position after the last microbatch returned, and the counters; restorable with any dp_size."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "position": list(self.position),
            "stream": self._stream_key(),
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the microbatch where `state` was taken (discarding microbatches prepared ahead)."""
        if state.get("version") != STATE_VERSION or state.get("split") != self.split:
            raise DataError(f"not a data loader state of the '{self.split}' split (version {STATE_VERSION})")
        changed = {k: (v, state["stream"].get(k)) for k, v in self._stream_key().items() if state["stream"].get(k) != v}
        if changed:
            raise DataError(
                "the data state was saved with other settings that change the sample stream, so it cannot be "
                "continued exactly: "
                + ", ".join(f"{k} was {old!r}, now {new!r}" for k, (new, old) in changed.items())
                + ". Resume with the saved settings"
            )
        self.position = tuple(state["position"])
        saved = state["stats"]
        self.stats = LoaderStats(
            **{k: v for k, v in saved.items() if k not in ("skipped", "packing_efficiency")},
            skipped=Counter(saved["skipped"]),
        )
        self._iterator = None

    def _stream_key(self) -> dict:
        """The settings that determine the sequence stream."""
        s = self.settings
        return {
            "samples": self.planner.size,
            "seed": s.seed,
            "seq_length": s.seq_length,
            "packing_window": s.packing_window,
            "max_patches_per_sequence": s.max_patches_per_sequence,
            "buckets": [list(b) for b in s.images.buckets],
            "pixels": [s.images.min_pixels, s.images.max_pixels],
            "drop_image_samples": s.drop_image_samples,
        }


def build_loader(config: Config, *, split: Literal["train", "val"] = "train", dp_rank: int = 0, dp_size: int = 1):
    """The microbatch loader of one data-parallel rank (`Loader`: iterate it, `state_dict`, `load_state_dict`,
    `stats`)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return Loader(resolve(config), split, dp_rank=dp_rank, dp_size=dp_size)
