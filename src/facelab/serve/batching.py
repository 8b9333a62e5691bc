"""Dynamic batching: many request threads, one model call per batch.

Why: on a CPU, one forward pass over 8 faces costs much less than 8 passes over one face
(weights are read once, the matrix kernels run on larger blocks). A server handles each
request in its own thread; here every thread puts its work items in a queue and waits, while
one worker thread takes up to `max_batch` items (waiting at most `max_wait` seconds for more
after the first arrives), runs the model once on all of them, and hands each thread its
results. It waits only while another caller could still come (`InFlight`: fewer callers in the
batch than requests in progress): a lone request never waits for company that is not there
(identify p50 24.1 -> 13.8 ms with BlazeFace, docs/deployment.md), a busy server still fills
its batches. With `max_batch=1` the same queue serialises the model calls one at a time, which
is the baseline the load test compares against.

The wrappers keep the interfaces the gallery functions expect, so the server calls the same
public functions as the CLI: `BatchedFaceModel` is a `FaceModel` whose backbone forwards
through a queue, `BatchedDetector` has the detector's `detect(images)`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from facelab.models.detectors.mtcnn import Detections, face_order
from facelab.models.face_model import FaceModel
from facelab.serve.limits import check_deadline

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    """How the queue has batched so far (read by /healthz and the load test)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    seconds: float = 0.0  # spent in the batched function

    def record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.seconds += seconds

    def to_dict(self) -> dict[str, float]:
        mean = self.items / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": round(mean, 2),
            "largest_batch": self.largest,
            "busy_seconds": round(self.seconds, 3),
        }


class InFlight:
    """A thread-safe count of the requests in progress (`with in_flight:` around each)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> InFlight:
        with self._lock:
            self._count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._count -= 1

    def __call__(self) -> int:
        return self._count


@dataclass
class _Job(Generic[T]):
    item: T
    caller: int = field(default_factory=threading.get_ident)
    future: Future = field(default_factory=Future)


class BatchQueue(Generic[T, R]):
    """Runs `fn(items) -> results` (one result per item, in order) on batches of items
    submitted from any thread; a daemon worker thread makes the calls. `callers`: how many
    threads may submit soon (an `InFlight`); the worker waits for more items only while its
    batch comes from fewer threads than that (None: always up to `max_wait`)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        max_batch: int = 8,
        max_wait: float = 0.005,
        name: str = "batch",
        callers: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait)
        self.callers = callers
        self.stats = BatchStats()
        self._jobs: queue.SimpleQueue[_Job[T] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name=f"facelab-{name}", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[T]) -> list[R]:
        """Queue the items, wait for their results (an exception in `fn` is raised here, in
        every thread whose items were in the failed batch)."""
        jobs = [_Job(item) for item in items]
        for job in jobs:
            self._jobs.put(job)
        return [job.future.result() for job in jobs]

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._jobs.put(None)
        self._worker.join()

    def _collect(self, first: _Job[T]) -> tuple[list[_Job[T]], bool]:
        """The first job plus what is queued and, while another caller may still come,
        whatever arrives within max_wait, up to max_batch; and whether the queue was closed
        meanwhile."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            wait = max(0.0, deadline - time.monotonic())
            if self.callers is not None and len({job.caller for job in batch}) >= self.callers():
                wait = 0.0  # every request in progress is in the batch: nobody to wait for
            try:
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        closed = False
        while not closed:
            first = self._jobs.get()
            if first is None:
                return
            batch, closed = self._collect(first)
            try:
                self._settle(batch)
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].future.set_exception(exc)
                    continue
                # One bad item must not fail the other requests of its batch: retry alone.
                for job in batch:
                    try:
                        self._settle([job])
                    except Exception as exc:
                        job.future.set_exception(exc)

    def _settle(self, batch: list[_Job[T]]) -> None:
        tick = time.perf_counter()
        results = self.fn([job.item for job in batch])
        self.stats.record(len(batch), time.perf_counter() - tick)
        if len(results) != len(batch):
            raise RuntimeError(f"batched call gave {len(results)} results for {len(batch)}")
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)


class _QueuedBackbone(nn.Module):
    """Forwards each input row through a queue shared by all threads."""

    def __init__(self, rows: BatchQueue[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_deadline("embedding")
        return torch.stack(self.rows.submit(list(x)))


class BatchedFaceModel(FaceModel):
    """A frozen inference copy of `model` whose backbone calls, from any number of threads,
    are batched together (same preprocessing, embedding size and fingerprint)."""

    def __init__(
        self,
        model: FaceModel,
        max_batch: int = 8,
        max_wait: float = 0.005,
        callers: Callable[[], int] | None = None,
    ) -> None:
        model = model.eval()
        dim = model.embedding_dim
        backbone = model.backbone

        @torch.inference_mode()
        def forward_rows(rows: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(backbone(torch.stack(rows).to(model.device)).float().cpu())

        self.queue: BatchQueue[torch.Tensor, torch.Tensor] = BatchQueue(
            forward_rows, max_batch, max_wait, name="embed", callers=callers
        )
        super().__init__(
            _QueuedBackbone(self.queue),
            model.preprocess,
            model.name,
            model.kwargs,
            model.fingerprint(),
            model.operating_points,
        )
        self._dim = dim

    @property
    def embedding_dim(self) -> int:
        return self._dim


class BatchedDetector:
    """A face detector whose `detect` calls from many threads are batched together; it keeps
    at most `max_faces` faces per image (the main ones, `face_order`), so that a crowd photo
    costs at most that many alignments and embeddings."""

    def __init__(
        self,
        detector: Any,
        max_batch: int = 8,
        max_wait: float = 0.005,
        max_faces: int = 20,
        callers: Callable[[], int] | None = None,
    ) -> None:
        self.queue: BatchQueue[np.ndarray, Any] = BatchQueue(
            detector.detect, max_batch, max_wait, name="detect", callers=callers
        )
        self.max_faces = max_faces

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        check_deadline("detection")
        found = self.queue.submit(list(images))
        check_deadline("detection")
        return [self._capped(d, image.shape) for d, image in zip(found, images, strict=True)]

    def _capped(self, found: Detections, shape: tuple[int, ...]) -> Detections:
        if len(found) <= self.max_faces:
            return found
        log.info("%d faces in one image, keeping the main %d", len(found), self.max_faces)
        keep = np.sort(face_order(found, shape)[: self.max_faces])  # still most confident first
        return Detections(found.boxes[keep], found.scores[keep], found.landmarks[keep])
