"""Dynamic batching across studies: one forward pass for the images of several callers.

A worker running several studies at once (Celery ``--pool threads``) shares
one model. :class:`BatchingPredictor` wraps it: each study's thread submits
its images and waits; one dispatcher thread gathers the submissions until
``max_images`` images are pending or ``max_wait_ms`` have passed since the
oldest pending one arrived, whichever comes first, runs one
:meth:`~worker.predictor.SinglePassPredictor.predict_with_heatmaps` over all
of them and hands each caller its own slice. While a pass runs, new
submissions queue up, so under load the batches fill without waiting.

A study never fails because of another: when the combined call raises, every
submission of that batch is run again alone, and only the ones that still
fail get their exception.

Which pass served a call is kept per calling thread (:meth:`take_forward_sizes`):
the first submission of each pass records the pass's image count, so each pass
is counted once (the worker stores it with the study's timings, under
:data:`FORWARD_TIMING_PREFIX`, for the ``pneumo_inference_batch_size`` metric).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.predictor import Image, ModelDescription, Prediction, SinglePassPredictor

__all__ = ["FORWARD_TIMING_PREFIX", "BatchingPredictor", "Served"]

FORWARD_TIMING_PREFIX = "forward_images:"
"""``result.timings`` key prefix: ``forward_images:<n>`` = passes of n images this study led."""


@dataclass(frozen=True)
class Served:
    """One submission's share of a pass: its predictions and maps, in its own order."""

    predictions: tuple[Prediction, ...]
    heatmaps: tuple[npt.NDArray[np.float32], ...]
    forward_images: int
    """Images in the pass that served it (its own included)."""
    leader: bool
    """The first submission of that pass: the one that counts the pass."""


@dataclass(frozen=True)
class _Submission:
    images: tuple[Image, ...]
    shapes: tuple[tuple[int, int], ...] | None  # the maps' (H, W); None: the images' own
    arrived: float
    future: Future[Served]

    def map_shapes(self) -> list[tuple[int, int]]:
        if self.shapes is not None:
            return list(self.shapes)
        return [(int(np.shape(i)[0]), int(np.shape(i)[1])) for i in self.images]


class BatchingPredictor:
    """A :class:`~worker.predictor.SinglePassPredictor` that batches concurrent callers.

    Thread-safe. ``max_wait_ms`` 0 disables batching: every call goes straight
    to ``inner`` (no dispatcher thread). :meth:`predict` and :meth:`heatmaps`
    are not batched (the pipeline uses :meth:`predict_with_heatmaps`).

    Raises:
        ValueError: ``max_images`` is below 1 or ``max_wait_ms`` is negative.
    """

    def __init__(self, inner: SinglePassPredictor, *, max_images: int, max_wait_ms: float) -> None:
        if max_images < 1:
            raise ValueError("max_images must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self.inner = inner
        self.max_images = max_images
        self.max_wait_ms = float(max_wait_ms)
        self._wait = self.max_wait_ms / 1000.0
        self._pending: deque[_Submission] = deque()
        self._pending_images = 0
        self._closed = False
        self._ready = threading.Condition()
        self._local = threading.local()
        self._dispatcher: threading.Thread | None = None
        if self._wait > 0:
            self._dispatcher = threading.Thread(
                target=self._dispatch, name="pneumo-batcher", daemon=True
            )
            self._dispatcher.start()

    # ------------------------------------------------------------------ the predictor protocol
    @property
    def info(self) -> ModelDescription:
        return self.inner.info

    def predict(self, images: Sequence[Image]) -> Sequence[Prediction]:
        """The inner model's :meth:`predict` (not batched)."""
        return self.inner.predict(images)

    def heatmaps(self, images: Sequence[Image]) -> Sequence[npt.NDArray[np.float32]]:
        """The inner model's :meth:`heatmaps` (not batched)."""
        return self.inner.heatmaps(images)

    def predict_with_heatmaps(
        self,
        images: Sequence[Image],
        heatmap_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[Sequence[Prediction], Sequence[npt.NDArray[np.float32]]]:
        """``images`` through the model, in one pass with other callers' images when they come.

        ``heatmap_shapes``: each map's (H, W), one per image (None: the images' own).

        Raises:
            ValueError: ``heatmap_shapes`` does not have one shape per image, or
                the inner predictor returned a different number of results than images.
            Exception: whatever the inner predictor raises on these images
                alone (never another caller's failure).
        """
        served = self.submit(images, heatmap_shapes).result()
        if served.leader:
            self._forwards().append(served.forward_images)
        return served.predictions, served.heatmaps

    # ------------------------------------------------------------------ batching
    def submit(
        self,
        images: Sequence[Image],
        heatmap_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Future[Served]:
        """Queue ``images`` for the next pass; the future holds this submission's share.

        Without a dispatcher (``max_wait_ms`` 0, or after :meth:`close`) the
        call runs at once in the calling thread and the future is already done.

        Raises:
            ValueError: ``heatmap_shapes`` does not have one shape per image.
        """
        if heatmap_shapes is not None and len(heatmap_shapes) != len(images):
            raise ValueError(f"{len(heatmap_shapes)} heatmap shapes for {len(images)} image(s)")
        future: Future[Served] = Future()
        shapes = (
            None if heatmap_shapes is None else tuple((int(h), int(w)) for h, w in heatmap_shapes)
        )
        submission = _Submission(tuple(images), shapes, time.monotonic(), future)
        if submission.images:
            with self._ready:
                if not self._closed and self._dispatcher is not None:
                    self._pending.append(submission)
                    self._pending_images += len(submission.images)
                    self._ready.notify()
                    return future
        if future.set_running_or_notify_cancel():
            self._serve_alone(submission)
        return future

    def take_forward_sizes(self) -> list[int]:
        """Image counts of the passes the calling thread's calls led since the last take."""
        forwards = self._forwards()
        taken = list(forwards)
        forwards.clear()
        return taken

    def close(self, timeout: float | None = None) -> None:
        """Serve what is pending, then stop the dispatcher; later calls run directly."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout)

    def __enter__(self) -> BatchingPredictor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _forwards(self) -> list[int]:
        forwards: list[int] | None = getattr(self._local, "forwards", None)
        if forwards is None:
            forwards = self._local.forwards = []
        return forwards

    def _dispatch(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            try:
                self._serve(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                for submission in batch:
                    if not submission.future.done():
                        submission.future.set_exception(exc)
                raise

    def _next_batch(self) -> list[_Submission]:
        """Wait for a full batch or the oldest submission's deadline; [] once closed and drained."""
        with self._ready:
            while not self._pending:
                if self._closed:
                    return []
                self._ready.wait()
            deadline = self._pending[0].arrived + self._wait
            while not self._closed and self._pending_images < self.max_images:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            batch = [self._pending.popleft()]
            count = len(batch[0].images)
            while self._pending and count + len(self._pending[0].images) <= self.max_images:
                batch.append(self._pending.popleft())
                count += len(batch[-1].images)
            self._pending_images -= count
        return [s for s in batch if s.future.set_running_or_notify_cancel()]

    def _serve(self, batch: Sequence[_Submission]) -> None:
        if len(batch) == 1:
            self._serve_alone(batch[0])
            return
        images = [image for submission in batch for image in submission.images]
        shapes = [shape for submission in batch for shape in submission.map_shapes()]
        try:
            predictions, maps = self._call(images, shapes)
        except Exception:
            # Someone's images broke the pass: each alone, so only they fail.
            for submission in batch:
                self._serve_alone(submission)
            return
        start = 0
        for k, submission in enumerate(batch):
            end = start + len(submission.images)
            submission.future.set_result(
                Served(tuple(predictions[start:end]), tuple(maps[start:end]), len(images), k == 0)
            )
            start = end

    def _serve_alone(self, submission: _Submission) -> None:
        n = len(submission.images)
        try:
            predictions, maps = self._call(submission.images, submission.shapes) if n else ([], [])
        except Exception as exc:
            submission.future.set_exception(exc)
            return
        submission.future.set_result(Served(tuple(predictions), tuple(maps), n, n > 0))

    def _call(
        self, images: Sequence[Image], shapes: Sequence[tuple[int, int]] | None
    ) -> tuple[Sequence[Prediction], Sequence[npt.NDArray[np.float32]]]:
        predictions, maps = (
            self.inner.predict_with_heatmaps(images)
            if shapes is None
            else self.inner.predict_with_heatmaps(images, shapes)
        )
        if len(predictions) != len(images) or len(maps) != len(images):
            raise ValueError(
                f"predictor returned {len(predictions)} predictions and {len(maps)} heatmaps"
                f" for {len(images)} image(s)"
            )
        return predictions, maps
