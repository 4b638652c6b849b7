"""Decode ahead of inference and batch images of identical preprocessed size.

Decoding runs in a thread pool (Pillow and numpy release the GIL while they work) over a bounded
window of submitted paths, so memory does not grow with the number of inputs and the pool keeps
decoding while the model runs.  Batches only ever hold equally sized images, so no padding changes
a result: an image gets the same probabilities alone or in any batch.  Each batch is normalised
straight into a reused buffer; :class:`InferenceLanes` can run several batches at once.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from .decision import NoVerdictError
from .image import ImageLoadError, LoaderConfig, load_image_with_size, normalize_batch
from .inspector import Decision, Inspector
from .metadata import ModelMetadata
from .providers import physical_cores


@dataclass
class Item:
    """One input on its way through the pipeline."""

    path: str
    array: np.ndarray | None = None
    size: tuple[int, int] | None = None
    error: str | None = None
    decode_ms: float = 0.0
    sha256: str | None = None  # of the bytes decoded, when asked for (`watch`); None if none were read
    read_stat: os.stat_result | None = None  # with sha256: the status of the open file those bytes came from


@dataclass
class Result:
    item: Item
    decision: Decision | None = None
    cam: np.ndarray | None = None  # (h, w) map of the decision's defect class
    error: str | None = None
    latency_ms: float = 0.0


def describe_error(exc: BaseException) -> str:
    """'kind: reason' for loader errors, so rows can be grouped by kind."""
    if isinstance(exc, ImageLoadError):
        return f"{exc.kind}: {exc.reason}"
    return f"unreadable: {type(exc).__name__}: {exc}"


def decode(path: str, cfg: LoaderConfig, digest: bool = False) -> Item:
    """One input decoded, or its error; ``digest``: also the sha256 of the bytes read (hashlib releases
    the GIL on large buffers, so digests of several files are taken in parallel like their decoding)."""
    t0 = time.perf_counter()
    read: list[tuple[str, os.stat_result]] = []
    on_bytes = (lambda data, st: read.append((hashlib.sha256(data).hexdigest(), st))) if digest else None
    try:
        arr, size = load_image_with_size(path, cfg, on_bytes)
        item = Item(path, arr, size, None)
    except Exception as exc:  # a bad file must become a row, never stop the run
        item = Item(path, None, None, describe_error(exc))
    item.decode_ms = (time.perf_counter() - t0) * 1e3
    if read:
        item.sha256, item.read_stat = read[0]
    return item


def decode_stream(paths: Iterable[str], cfg: LoaderConfig, workers: int, window: int) -> Iterator[Item]:
    """Decoded items in input order; at most ``window`` decodes are in flight or buffered."""
    if workers <= 0:
        for p in paths:
            yield decode(p, cfg)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque[Future[Item]] = deque()
    try:
        for p in paths:
            pending.append(pool.submit(decode, p, cfg))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Batcher:
    """Per-size pending lists; a list is released when full, or the largest when too many wait."""

    batch_size: int
    max_pending: int
    _buckets: dict[tuple[int, ...], list[Item]] = field(default_factory=dict)
    _count: int = 0

    PENDING_BATCHES = 4

    @classmethod
    def for_stream(cls, batch_size: int) -> Batcher:
        """The policy of `inspect` over a stream: at most four batches of decoded images wait.

        More waiting images would fill more same-size batches when inputs come in many sizes, but
        memory would then grow with the image size; four batches keeps peak RSS flat over any number
        of inputs (docs/benchmarks.md, memory row).
        """
        return cls(batch_size, max_pending=batch_size * cls.PENDING_BATCHES)

    def add(self, item: Item) -> list[list[Item]]:
        assert item.array is not None
        key = tuple(item.array.shape)
        bucket = self._buckets.setdefault(key, [])
        bucket.append(item)
        self._count += 1
        ready = []
        if len(bucket) >= self.batch_size:
            ready.append(self._pop(key))
        while self._count > self.max_pending:
            ready.append(self._pop(max(self._buckets, key=lambda k: len(self._buckets[k]))))
        return ready

    def drain(self) -> list[list[Item]]:
        return [self._pop(k) for k in list(self._buckets)]

    @property
    def pending(self) -> int:
        return self._count

    def _pop(self, key: tuple[int, ...]) -> list[Item]:
        items = self._buckets.pop(key)
        self._count -= len(items)
        return items


class BatchBuffer:
    """A grow-only float32 buffer every batch is normalised into: a fresh multi-MB array per batch
    costs a page fault per 4 KiB on first touch, which is as much as the normalisation itself."""

    def __init__(self) -> None:
        self._flat = np.empty(0, np.float32)

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        if self._flat.size < size:
            self._flat = np.empty(size, np.float32)
        return self._flat[:size].reshape(shape)


def model_input(items: Sequence[Item], meta: ModelMetadata, buffer: BatchBuffer | None = None) -> np.ndarray:
    """The NCHW float32 batch the model sees for equally sized decoded ``items`` (in ``buffer``)."""
    arrays = [it.array for it in items if it.array is not None]
    h, w, c = arrays[0].shape
    out = buffer.get((len(arrays), c, h, w)) if buffer is not None else None
    return normalize_batch(arrays, meta.mean, meta.std, out=out)


def infer(
    inspector: Inspector,
    items: list[Item],
    threshold: float,
    *,
    want_cam: bool,
    buffer: BatchBuffer | None = None,
) -> list[Result]:
    """Run one same-size batch; if the batch fails, retry image by image so one bad input
    cannot take its neighbours down with it."""
    t0 = time.perf_counter()
    try:
        outs = inspector.predict(model_input(items, inspector.metadata, buffer), cam=want_cam)
    except Exception as exc:
        if len(items) == 1:
            return [Result(items[0], error=f"inference_failed: {type(exc).__name__}: {exc}")]
        return [
            r for it in items for r in infer(inspector, [it], threshold, want_cam=want_cam, buffer=buffer)
        ]
    share = (time.perf_counter() - t0) * 1e3 / len(items)
    results = []
    cams = outs.get("cam")
    names = inspector.class_names
    for i, it in enumerate(items):
        try:
            d = inspector.decide(outs["probs"][i], threshold)
        except NoVerdictError as exc:  # an error row: never a verdict the model did not give
            results.append(Result(it, error=f"inference_failed: {exc}"))
            continue
        cam = cams[i, names.index(d.defect_class)] if cams is not None else None
        results.append(Result(it, d, cam, None, it.decode_ms + share))
    return results


def inference_lanes(inspector: Inspector) -> int:
    """Batches to run at once: on the CPU provider one per ``threads`` physical cores, else one."""
    if inspector.provider != "cpu":
        return 1
    return max(1, physical_cores() // max(1, inspector.threads))


class InferenceLanes:
    """Runs same-size batches on ``lanes`` threads at once; results come back in submission order.

    ONNX Runtime releases the GIL while a session runs, and one session may run on several threads,
    so with a one-thread session every lane keeps a core busy at single-thread efficiency (no
    intra-op synchronisation) beside the decode threads.  One lane runs each batch at once on the
    calling thread, as before.  At most ``2 * lanes`` batches are in flight.
    """

    def __init__(self, inspector: Inspector, threshold: float, *, want_cam: bool, lanes: int) -> None:
        self.inspector, self.threshold, self.want_cam, self.lanes = inspector, threshold, want_cam, lanes
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="infer") if lanes > 1 else None
        self._pending: deque[Future[list[Result]]] = deque()

    def _run(self, batch: list[Item]) -> list[Result]:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = BatchBuffer()
        return infer(self.inspector, batch, self.threshold, want_cam=self.want_cam, buffer=buffer)

    def submit(self, batch: list[Item]) -> list[list[Result]]:
        """Queue ``batch``; returns the batches finished so far (waits while too many are in flight)."""
        if self._pool is None:
            return [self._run(batch)]
        self._pending.append(self._pool.submit(self._run, batch))
        done = []
        while self._pending and (len(self._pending) > 2 * self.lanes or self._pending[0].done()):
            done.append(self._pending.popleft().result())
        return done

    def drain(self) -> list[list[Result]]:
        done = [f.result() for f in self._pending]
        self._pending.clear()
        return done

    def __enter__(self) -> InferenceLanes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
