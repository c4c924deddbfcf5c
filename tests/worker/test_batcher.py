"""Cross-study batching (:mod:`worker.batcher`) on the real model, and in a real threads worker.

The batcher wraps the shipped model; a thin wrapper around the model counts
its calls. Several threads submitting at once share one pass and get what
they would have got alone; a bad submission fails only its own caller; the
window and the image limit decide when a pass starts. The CUDA serving path
(autocast, channels-last) runs on the CPU and agrees with the plain one. A
real ``pneumo worker --pool threads`` processes several studies in one pass
and the ``pneumo_inference_batch_size`` metric shows it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from db import migrate
from db.engine import session_scope
from db.models import Result, Study, StudyStatus
from pneumo.metrics import StateCollector
from pneumo.settings import Settings
from tests.worker.conftest import base_env, wait_until
from tests.worker.studies import CXR, record_study
from worker.app import PROCESS_STUDY, create_app
from worker.batcher import FORWARD_TIMING_PREFIX, BatchingPredictor
from worker.predictor import Image, ModelDescription, Prediction, SinglePassPredictor
from worker.queues import QueueName

torch = pytest.importorskip("torch")
inference = pytest.importorskip("model.inference")


@pytest.fixture(scope="module")
def model() -> Any:
    try:
        return inference.load_predictor()
    except inference.WeightsError:
        pytest.skip("no model weights")


class Counting:
    """The real model, with a record of each ``predict_with_heatmaps`` call."""

    def __init__(self, inner: SinglePassPredictor) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.started: list[float] = []
        self.threads: list[threading.Thread] = []

    @property
    def info(self) -> ModelDescription:
        return self.inner.info

    def predict(self, images: Sequence[Image]) -> Sequence[Prediction]:
        return self.inner.predict(images)

    def heatmaps(self, images: Sequence[Image]) -> Sequence[npt.NDArray[np.float32]]:
        return self.inner.heatmaps(images)

    def predict_with_heatmaps(
        self, images: Sequence[Image], heatmap_shapes: Sequence[tuple[int, int]] | None = None
    ) -> tuple[Sequence[Prediction], Sequence[npt.NDArray[np.float32]]]:
        self.calls.append(len(images))
        self.started.append(time.monotonic())
        self.threads.append(threading.current_thread())
        return self.inner.predict_with_heatmaps(images, heatmap_shapes)


@pytest.fixture(scope="module")
def radiographs(kermany: Path) -> list[np.ndarray]:
    """Real chest X-rays, both classes, each its own size (the model's outputs are not saturated)."""
    from model.images import load_image_file

    normal, pneumonia = (sorted(kermany.glob(f"{c}/*.jpeg")) for c in ("NORMAL", "PNEUMONIA"))
    if len(normal) < 9 or len(pneumonia) < 11:
        pytest.skip("Kermany images missing")
    # 415x512 and 224x224 images, most of them neither clearly normal nor clearly not
    return [load_image_file(f) for f in [normal[1], *normal[4:9], pneumonia[10]]]


def _together(batcher: BatchingPredictor, submissions: Sequence[Sequence[Image]]) -> list[Any]:
    """Each submission from its own thread, released at once; its result or its exception."""
    out: list[Any] = [None] * len(submissions)
    barrier = threading.Barrier(len(submissions))

    def call(k: int) -> None:
        barrier.wait()
        try:
            out[k] = batcher.predict_with_heatmaps(submissions[k])
        except Exception as exc:
            out[k] = exc

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(submissions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _assert_same(got: Any, alone: Any) -> None:
    (predictions, maps), (want_predictions, want_maps) = got, alone
    assert len(predictions) == len(want_predictions) == len(maps)
    for p, q in zip(predictions, want_predictions, strict=True):
        assert p.probability == pytest.approx(q.probability, abs=1e-5)
        assert p.ood_score == pytest.approx(q.ood_score, rel=1e-5, abs=1e-5)
        assert p.is_chest == q.is_chest
    for m, w in zip(maps, want_maps, strict=True):
        assert m.shape == w.shape
        np.testing.assert_allclose(m, w, atol=1e-5)


def test_concurrent_callers_share_one_pass_and_get_their_own_results(
    model: Any, radiographs: list[np.ndarray]
) -> None:
    images = radiographs[1:5]
    alone = [model.predict_with_heatmaps([image]) for image in images]
    counting = Counting(model)
    # The window is long: the pass starts because the batch is full, not because time ran out.
    with BatchingPredictor(counting, max_images=4, max_wait_ms=30_000) as batcher:
        began = time.monotonic()
        got = _together(batcher, [[image] for image in images])
        elapsed = time.monotonic() - began

    assert counting.calls == [4]
    assert elapsed < 20
    assert any(0.05 < p.probability < 0.95 for (ps, _) in alone for p in ps)
    for mine, want in zip(got, alone, strict=True):
        _assert_same(mine, want)


def test_callers_asking_for_map_sizes_get_their_own_sizes_in_a_shared_pass(
    model: Any, radiographs: list[np.ndarray]
) -> None:
    images = radiographs[1:3]
    asked = [[(40, 30)], None]  # one caller wants a small map, the other its image's size
    alone = [
        model.predict_with_heatmaps([image], shapes)
        for image, shapes in zip(images, asked, strict=True)
    ]
    counting = Counting(model)
    out: list[Any] = [None, None]
    with BatchingPredictor(counting, max_images=2, max_wait_ms=30_000) as batcher:
        barrier = threading.Barrier(2)

        def call(k: int) -> None:
            barrier.wait()
            out[k] = batcher.predict_with_heatmaps([images[k]], asked[k])

        threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with pytest.raises(ValueError, match="heatmap shapes"):
            batcher.predict_with_heatmaps(images, [(4, 4)])
    assert counting.calls == [2]
    assert out[0][1][0].shape == (40, 30) and out[1][1][0].shape == images[1].shape
    for mine, want in zip(out, alone, strict=True):
        _assert_same(mine, want)


def test_a_failing_submission_fails_only_its_caller(
    model: Any, radiographs: list[np.ndarray]
) -> None:
    good = radiographs[:2]
    bad = np.zeros((2, 3, 40, 40), np.float32)  # not a 2-D image: the combined pass raises
    alone = [model.predict_with_heatmaps([image]) for image in good]
    with pytest.raises(Exception) as direct:
        model.predict_with_heatmaps([bad])
    counting = Counting(model)
    with BatchingPredictor(counting, max_images=3, max_wait_ms=30_000) as batcher:
        first, broken, second = _together(batcher, [[good[0]], [bad], [good[1]]])

    assert counting.calls[0] == 3  # tried together first...
    assert sorted(counting.calls[1:]) == [1, 1, 1]  # ...then each alone
    assert isinstance(broken, type(direct.value))
    _assert_same(first, alone[0])
    _assert_same(second, alone[1])


def test_the_window_starts_a_pass_that_is_not_full(
    model: Any, radiographs: list[np.ndarray]
) -> None:
    counting = Counting(model)
    image = radiographs[0]
    with BatchingPredictor(counting, max_images=8, max_wait_ms=300) as batcher:
        submitted = time.monotonic()
        first = batcher.submit([image])
        time.sleep(0.05)
        second = batcher.submit([image, image])  # within the window: same pass
        assert len(first.result(30).predictions) == 1
        assert len(second.result(30).predictions) == 2

    assert counting.calls == [3]
    waited = counting.started[0] - submitted
    assert 0.29 <= waited < 5, waited
    assert first.result().leader and not second.result().leader
    assert first.result().forward_images == second.result().forward_images == 3


def test_no_pass_takes_more_than_max_images(model: Any, radiographs: list[np.ndarray]) -> None:
    counting = Counting(model)
    images = radiographs[:5]
    batcher = BatchingPredictor(counting, max_images=2, max_wait_ms=200)
    futures = [batcher.submit([image]) for image in images]
    served = [future.result(30) for future in futures]
    batcher.close()

    assert counting.calls == [2, 2, 1]  # in the order submitted
    assert [s.forward_images for s in served] == [2, 2, 2, 2, 1]
    assert [s.leader for s in served] == [True, False, True, False, True]
    # Closed: calls run at once, in the caller's thread.
    batcher.predict_with_heatmaps([images[0]])
    assert counting.calls[-1] == 1 and counting.threads[-1] is threading.current_thread()


def test_window_zero_is_a_direct_call(model: Any, radiographs: list[np.ndarray]) -> None:
    counting = Counting(model)
    batcher = BatchingPredictor(counting, max_images=16, max_wait_ms=0)
    predictions, maps = batcher.predict_with_heatmaps(radiographs[:2])

    assert counting.calls == [2] and counting.threads == [threading.current_thread()]
    assert len(predictions) == len(maps) == 2
    assert batcher.take_forward_sizes() == [2]
    assert batcher.take_forward_sizes() == []


def test_cuda_serving_path_on_the_cpu_agrees_with_the_plain_path(
    radiographs: list[np.ndarray],
) -> None:
    """float16 autocast and channels-last, as on a GPU, on CPU tensors (no GPU needed)."""
    weights = inference.default_weights_path()
    plain = inference.Predictor(weights, device="cpu", precision="float32", channels_last=False)
    gpu_like = inference.Predictor(weights, device="cpu", precision="float16", channels_last=True)
    assert gpu_like._autocast is torch.float16
    images = radiographs

    want, want_maps = plain.predict_with_heatmaps(images)
    got, got_maps = gpu_like.predict_with_heatmaps(images)

    assert any(0.05 < q.probability < 0.95 for q in want)  # not saturated: a real comparison
    for p, q in zip(got, want, strict=True):
        assert p.probability == pytest.approx(q.probability, abs=5e-3)
        assert p.ood_score == pytest.approx(q.ood_score, rel=0.01)
    for m, w in zip(got_maps, want_maps, strict=True):
        assert m.shape == w.shape and m.dtype == np.float32
        if w.max() > 0:
            assert float(np.corrcoef(m.ravel(), w.ravel())[0, 1]) > 0.95
    assert inference.autocast_dtype(inference.pick_device("cpu")) is None  # off by default
    with pytest.raises(ValueError, match="precision"):
        inference.autocast_dtype(inference.pick_device("cpu"), "int8")
    # what a result records: the numbers the pass actually ran in
    assert (plain.info.precision, gpu_like.info.precision) == ("float32", "float16")


def test_bfloat16_on_the_cpu_agrees_with_float32_and_says_so(
    radiographs: list[np.ndarray],
) -> None:
    """The PNEUMO_INFERENCE_PRECISION=bfloat16 opt-in: a few thousandths, the same decisions."""
    weights = inference.default_weights_path()
    plain = inference.load_predictor(weights, device="cpu", precision="float32")
    fast = inference.load_predictor(weights, device="cpu", precision=" BFloat16 ")
    assert fast is not plain and fast._autocast is torch.bfloat16
    assert fast is inference.load_predictor(weights, device="cpu", precision="bfloat16")
    assert (plain.info.precision, fast.info.precision) == ("float32", "bfloat16")

    want, want_maps = plain.predict_with_heatmaps(radiographs)
    got, got_maps = fast.predict_with_heatmaps(radiographs)
    assert any(0.05 < q.probability < 0.95 for q in want)  # not saturated: a real comparison
    for p, q in zip(got, want, strict=True):
        assert p.probability != q.probability or p.ood_score != q.ood_score  # really bfloat16
        assert p.probability == pytest.approx(q.probability, abs=5e-3)
        assert p.is_chest == q.is_chest
    for m, w in zip(got_maps, want_maps, strict=True):
        assert m.shape == w.shape and m.dtype == np.float32
        if w.max() > 0:
            assert float(np.corrcoef(m.ravel(), w.ravel())[0, 1]) > 0.95


def test_bfloat16_without_native_support_is_served_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A CPU without AVX512-BF16/AMX (not this one: its detection is stood in for) is warned of."""
    assert inference.native_bfloat16() in (True, False, None)
    monkeypatch.setattr(inference, "native_bfloat16", lambda: False)
    weights = inference.default_weights_path()
    with caplog.at_level("WARNING", logger="model.inference"):
        slow = inference.Predictor(weights, device="cpu", precision="bfloat16")
    assert slow.info.precision == "bfloat16"
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.inference"):
        inference.Predictor(weights, device="cpu", precision="float32")
    assert not caplog.records  # float32 never warns


def test_threads_worker_batches_studies_and_reports_batch_sizes(
    embedded_redis: Path, spawn: Any, tmp_path: Path
) -> None:
    env = base_env(
        embedded_redis,
        PNEUMO_WORKER_WARMUP="true",
        PNEUMO_BATCH_WINDOW_MS="1500",
        PNEUMO_RECONCILE_INTERVAL_SECONDS="0",
    )
    settings = Settings(data_dir=embedded_redis)
    config = settings.worker_config()
    migrate.upgrade(config.database_url)
    studies = [record_study(config, [CXR]) for _ in range(4)]
    app = create_app(config)
    for study in studies:
        app.send_task(
            PROCESS_STUDY, args=[study.study_id, study.revision], queue=QueueName.REALTIME.value
        )

    worker = spawn(
        [sys.executable, "-m", "pneumo.cli", "worker", "--pool", "threads", "--concurrency", "4"],
        env,
    )

    def all_done() -> bool:
        if worker.poll() is not None:
            raise AssertionError(Path(worker.log_path).read_text()[-3000:])
        with session_scope(config.database_url) as session:
            rows = [session.get(Study, s.study_id) for s in studies]
            return all(row is not None and row.status is StudyStatus.DONE for row in rows)

    try:
        wait_until(all_done, 120, "4 studies done")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{Path(worker.log_path).read_text()[-3000:]}") from exc

    with session_scope(config.database_url) as session:
        passes: dict[int, float] = {}
        for timings in session.query(Result.timings).all():
            for key, count in timings[0].items():
                if key.startswith(FORWARD_TIMING_PREFIX):
                    size = int(key.removeprefix(FORWARD_TIMING_PREFIX))
                    passes[size] = passes.get(size, 0) + count
    assert sum(size * n for size, n in passes.items()) == 4  # every image counted once
    assert max(passes) > 1, passes  # studies shared a pass

    collector = StateCollector(config.database_url, lambda: None, heartbeat_stale_seconds=30.0)
    (histogram,) = [m for m in collector.collect() if m.name == "pneumo_inference_batch_size"]
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.samples}
    assert samples[("pneumo_inference_batch_size_sum", None)] == 4
    assert samples[("pneumo_inference_batch_size_count", None)] == sum(passes.values())
    assert samples[("pneumo_inference_batch_size_bucket", "1")] < sum(passes.values())
