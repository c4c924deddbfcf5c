"""Stage 3, predict: studies share calls; a single-pass predictor is called once per batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from pydicom.dataset import Dataset

from tests.worker.studies import FakePrediction, FakePredictor
from worker.predictor import Image, Predictor
from worker.stages.load import LoadedInstance, LoadedStudy
from worker.stages.predict import predict
from worker.stages.read import ReadInstance, ReadStudy
from worker.stages.timing import StageTimer


def _read_study(study_id: int, values: Sequence[float | None]) -> ReadStudy:
    """A read study whose images are constant arrays (None = skipped instance)."""
    loaded, read = [], []
    for n, value in enumerate(values, start=1):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.{study_id}.{n}"
        item = LoadedInstance(study_id * 100 + n, ds.SOPInstanceUID, ds)
        loaded.append(item)
        if value is None:
            read.append(ReadInstance(item, None, "modality:CT"))
        else:
            read.append(ReadInstance(item, np.full((8, 6), value, np.float32), None))
    study = LoadedStudy(study_id, f"1.2.{study_id}", 1, tuple(loaded))
    return ReadStudy(study, tuple(read))


def _guard(image: Image) -> FakePrediction:
    """Images of 0.9 are not chest radiographs; the others are, with probability = value."""
    value = float(image.mean())
    return FakePrediction(value, ood_score=value, is_chest=value < 0.85)


def test_two_studies_share_one_forward_pass() -> None:
    fake = FakePredictor(verdict=_guard)
    first, second = _read_study(1, [0.2, None, 0.9]), _read_study(2, [0.7, 0.4])
    timer = StageTimer()

    one, two = predict(fake, [first, second], timer=timer)

    assert fake.predict_calls == [4]  # every usable image of both studies, one call
    assert fake.heatmap_calls == [3]  # the chest images only, one call
    assert one.read is first and two.read is second
    assert [i.instance.instance_id for i in one.images] == [101, 103]
    assert [i.prediction.probability for i in one.images] == pytest.approx([0.2, 0.9])
    assert [i.heatmap is not None for i in one.images] == [True, False]
    assert [i.instance.instance_id for i in one.chest] == [101]
    assert [i.prediction.probability for i in two.images] == pytest.approx([0.7, 0.4])
    assert all(i.heatmap is not None and i.heatmap.shape == (8, 6) for i in two.images)
    assert one.images[0].source is first.instances[0].loaded.dataset
    assert set(timer.seconds) == {"inference", "heatmaps"}


def test_batch_size_bounds_each_call_across_studies() -> None:
    fake = FakePredictor(verdict=_guard)
    one, two = predict(fake, [_read_study(1, [0.2, 0.3, 0.9]), _read_study(2, [0.4])], batch_size=2)
    assert fake.predict_calls == [2, 2]  # the second call mixes both studies
    assert fake.heatmap_calls == [2, 1]
    assert [len(one.images), len(two.images)] == [3, 1]
    assert [i.heatmap is not None for i in one.images + two.images] == [True, True, False, True]
    with pytest.raises(ValueError, match="batch_size"):
        predict(fake, [], batch_size=0)


def test_nothing_usable_calls_nothing() -> None:
    fake = FakePredictor()
    (result,) = predict(fake, [_read_study(1, [None, None])])
    assert result.images == () and result.predictions == ()
    assert fake.predict_calls == [] and fake.heatmap_calls == []


def test_no_chest_image_means_no_heatmap_call() -> None:
    fake = FakePredictor(verdict=_guard)
    (result,) = predict(fake, [_read_study(1, [0.9])])
    assert fake.predict_calls == [1] and fake.heatmap_calls == []
    assert result.chest == () and result.images[0].heatmap is None


class _Miscounting(FakePredictor):
    def predict(self, images: Sequence[Image]) -> list[FakePrediction]:
        return super().predict(images)[:-1]


def test_a_predictor_that_drops_an_image_is_an_error() -> None:
    predictor: Predictor = _Miscounting()
    with pytest.raises(ValueError, match="1 predictions for 2 image"):
        predict(predictor, [_read_study(1, [0.2, 0.3])])


class _SinglePass(FakePredictor):
    """A fake with the single-pass method: records its calls; predict/heatmaps must not run."""

    def __init__(self) -> None:
        super().__init__(verdict=_guard)
        self.joint_calls: list[int] = []
        self.shapes_asked: list[list[tuple[int, int]] | None] = []

    def predict_with_heatmaps(
        self, images: Sequence[Image], heatmap_shapes: Sequence[tuple[int, int]] | None = None
    ) -> tuple[list[FakePrediction], list[np.ndarray]]:
        self.joint_calls.append(len(images))
        self.shapes_asked.append(None if heatmap_shapes is None else list(heatmap_shapes))
        shapes = heatmap_shapes or [np.asarray(im).shape for im in images]
        maps = [np.full(shape, 0.25, np.float32) for shape in shapes]
        return [_guard(image) for image in images], maps


def test_a_single_pass_predictor_is_called_once_per_batch() -> None:
    fake = _SinglePass()
    first, second = _read_study(1, [0.2, None, 0.9]), _read_study(2, [0.7, 0.4])
    timer = StageTimer()

    one, two = predict(fake, [first, second], timer=timer)

    assert fake.joint_calls == [4]  # one pass for every usable image of both studies
    assert fake.predict_calls == [] and fake.heatmap_calls == []  # no second pass
    assert [i.prediction.probability for i in one.images] == pytest.approx([0.2, 0.9])
    assert [i.heatmap is not None for i in one.images] == [True, False]  # non-chest map dropped
    assert all(i.heatmap is not None and i.heatmap.shape == (8, 6) for i in two.images)
    assert set(timer.seconds) == {"inference", "heatmaps"}

    batched = _SinglePass()
    one, two = predict(batched, [first, second], batch_size=3)
    assert batched.joint_calls == [3, 1] and batched.predict_calls == []
    assert [i.heatmap is not None for i in one.images + two.images] == [True, False, True, True]

    idle = _SinglePass()
    predict(idle, [_read_study(1, [None])])
    assert idle.joint_calls == []


def test_maps_are_asked_for_at_the_capture_size() -> None:
    """With a heatmap size limit, the single pass makes each map at the capture's size."""
    fake = _SinglePass()
    (study,) = predict(fake, [_read_study(1, [0.2, 0.7])], heatmap_max_side=4)
    assert fake.shapes_asked == [[(4, 3), (4, 3)]]  # 8 x 6 images, longest side 4
    assert all(i.heatmap is not None and i.heatmap.shape == (4, 3) for i in study.images)
    assert all(np.asarray(i.image).shape == (8, 6) for i in study.images)  # pixels untouched
    roomy = _SinglePass()
    predict(roomy, [_read_study(1, [0.2])], heatmap_max_side=64)
    assert roomy.shapes_asked == [[(8, 6)]]  # never scaled up
    with pytest.raises(ValueError, match="heatmap_max_side"):
        predict(_SinglePass(), [_read_study(1, [0.2])], heatmap_max_side=-1)


class _DroppingSinglePass(_SinglePass):
    def predict_with_heatmaps(
        self, images: Sequence[Image], heatmap_shapes: Sequence[tuple[int, int]] | None = None
    ) -> tuple[list[FakePrediction], list[np.ndarray]]:
        predictions, maps = super().predict_with_heatmaps(images, heatmap_shapes)
        return predictions, maps[:-1]


def test_a_single_pass_predictor_that_drops_a_heatmap_is_an_error() -> None:
    with pytest.raises(ValueError, match="1 heatmaps for 2 image"):
        predict(_DroppingSinglePass(), [_read_study(1, [0.2, 0.3])])
