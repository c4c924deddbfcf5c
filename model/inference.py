"""Inference API for the worker: load the shipped model once, predict, explain.

``load_predictor()`` returns a process-wide cached :class:`Predictor`. Its
:meth:`Predictor.predict` takes float [0, 1] 2-D images (``model.images.load_image_file``
or ``dicom_io.pixels.read_pixels``), preprocesses them with ``model.preprocess`` (the
same code training used) and returns one :class:`Prediction` each: the calibrated
pneumonia probability (``sigmoid(logit / T + b)`` of the mirror-TTA logit), the out-of-distribution score
and whether the image passed the not-a-chest-radiograph guard.
:meth:`Predictor.heatmaps` gives a Grad-CAM map (Selvaraju et al., ICCV 2017) per image
at the image's own size. :meth:`Predictor.predict_with_heatmaps` gives both from one
forward pass: the map is taken on the activations (and their gradients) of the very
pass whose logit became the probability, so serving pays for one forward, not two.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy._core.multiarray import _reconstruct  # what a pickled ndarray is rebuilt by

from model.network import NetConfig, PneumoNet, build_network, tta_forward_with_map
from model.ood import OODModel
from model.precision import Precision
from model.preprocess import to_model_batch

__all__ = [
    "NOT_CHEST_CODE",
    "ModelInfo",
    "Prediction",
    "Predictor",
    "WeightsError",
    "autocast_dtype",
    "default_weights_path",
    "load_predictor",
    "native_bfloat16",
    "pick_device",
    "read_weights_file",
    "sha256_file",
]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NOT_CHEST_CODE = "not-chest-xray"
"""The one code for "the guard judged this image not a chest radiograph".

Stored in the database, written as an SR flag by the worker and used by
``model.evaluation.NotProcessed.NOT_CHEST``; prose for people stays prose.
"""


class WeightsError(RuntimeError):
    """The weights file is missing, unreadable or of an unknown format."""


@dataclass(frozen=True)
class ModelInfo:
    """What a result must record about the model that produced it."""

    name: str
    version: str
    sha256: str  # of the weights file
    threshold: float  # operating point on the calibrated probability
    temperature: float
    ood_threshold: float
    input_size: int
    intended_population: str
    max_age_years: int | None
    target_sensitivity: float = 0.95
    bias: float = 0.0  # calibration: p = sigmoid(logit / temperature + bias)
    path: str = ""  # file name of the weights (no directories: nothing site-specific)
    equalize: bool = False  # preprocessing: histogram equalisation (model.preprocess)
    precision: str = "float32"
    """What the forward pass computed in: float32, or the autocast dtype (float16, bfloat16)."""


@dataclass(frozen=True)
class Prediction:
    probability: float  # calibrated P(pneumonia)
    ood_score: float
    is_chest: bool  # ood_score <= ood_threshold
    threshold: float = field(default=0.5, repr=False)

    @property
    def finding(self) -> bool:
        """Pneumonia suspected: a chest radiograph at or above the operating threshold."""
        return self.is_chest and self.probability >= self.threshold


def sha256_file(path: Path) -> str:
    """The sha256 of a file (the identity results record for a weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_key(path: Path) -> tuple[tuple[int, ...], bool]:
    """Sort key so the highest release (and releases over ``-dev``) wins."""
    version = path.stem.split("-", 1)[1] if "-" in path.stem else ""
    core, _, suffix = version.partition("-")
    nums = tuple(int(p) if p.isdigit() else -1 for p in core.split("."))
    return (nums, suffix == "")


def default_weights_path() -> Path:
    """The shipped weights file in ``model/weights/`` (highest version)."""
    candidates = sorted(WEIGHTS_DIR.glob("*.pt"), key=_version_key)
    if not candidates:
        raise WeightsError(f"no weights file (*.pt) in {WEIGHTS_DIR}")
    return candidates[-1]


# What a pneumo weights file or training checkpoint may hold besides tensors:
# the OOD guard's statistics are numpy arrays. Nothing else is unpickled.
_NUMPY_GLOBALS: list[Any] = [
    _reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.Float32DType,
    np.dtypes.Float64DType,
    np.dtypes.Int64DType,
]


def read_weights_file(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """Load a weights file or checkpoint with ``torch.load(weights_only=True)``.

    A ``.pt`` file is a pickle: loaded without ``weights_only`` it can run
    arbitrary code. Only tensors, plain containers and the numpy array types
    our files carry are accepted.

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the file holds anything else (or is corrupt).
    """
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def pick_device(device: str | None = None) -> torch.device:
    """``device`` when given (not empty), else CUDA when present, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(
    device: torch.device, precision: str | Precision = Precision.AUTO
) -> torch.dtype | None:
    """The ``torch.autocast`` dtype for ``precision`` on ``device``; None = plain float32.

    ``auto``: float16 on CUDA (tensor cores, half the memory traffic), float32
    on the CPU: bfloat16 there is an opt-in, as it changes the validated
    model's outputs by a few thousandths (:mod:`model.precision`).
    ``float16`` and ``bfloat16`` force autocast on any device (how the GPU
    path runs on a CPU).

    Raises:
        ValueError: ``precision`` is not one of auto, float32, float16, bfloat16.
    """
    chosen = Precision.parse(precision)
    if chosen is Precision.AUTO:
        return torch.float16 if device.type == "cuda" else None
    return {
        Precision.FLOAT32: None,
        Precision.FLOAT16: torch.float16,
        Precision.BFLOAT16: torch.bfloat16,
    }[chosen]


def _dtype_name(dtype: torch.dtype | None) -> str:
    """``float32`` for no autocast, else the autocast dtype's name (``bfloat16``...)."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def native_bfloat16() -> bool | None:
    """Whether this CPU computes in bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX).

    None when torch cannot tell. Without it, bfloat16 autocast on the CPU is
    emulated and slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without oneDNN
        return None


class Predictor:
    """A loaded model. Thread-safe: calls are serialised by a lock.

    On CUDA: batches are copied from pinned host memory (asynchronously),
    laid out channels-last and run under float16 autocast. ``precision`` and
    ``channels_last`` choose otherwise (see :func:`autocast_dtype`; None =
    channels-last where the network benefits: CUDA, and the wide torchvision
    trunks on the CPU). Run one process per GPU (``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(
        self,
        weights: Path,
        device: str | None = None,
        batch_size: int = 16,
        *,
        precision: str | Precision = Precision.AUTO,
        channels_last: bool | None = None,
    ) -> None:
        weights = Path(weights)
        try:
            payload = read_weights_file(weights)
        except FileNotFoundError as exc:
            raise WeightsError(f"weights file not found: {weights}") from exc
        except Exception as exc:  # corrupt file, wrong format
            raise WeightsError(f"cannot read weights file {weights.name}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise WeightsError(f"{weights.name} is not a pneumo weights file (format 1)")
        self.device = pick_device(device)
        self.batch_size = batch_size
        self._autocast = autocast_dtype(self.device, precision)
        if (
            self._autocast is torch.bfloat16
            and self.device.type == "cpu"
            and native_bfloat16() is False
        ):
            log.warning(
                "bfloat16 inference requested, but this CPU has no native bfloat16 "
                "(AVX512-BF16 or AMX): it is emulated and slower than float32"
            )
        # pinned (page-locked) host memory: the copy to the GPU runs asynchronously
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        config = NetConfig.from_dict(payload["net_config"])
        net = build_network(config)
        net.load_state_dict(payload["state_dict"])
        net.eval().to(self.device)
        # NHWC pays off on GPUs and, on CPU, for the wide torchvision trunks (~3x there)
        self._channels_last = (
            channels_last
            if channels_last is not None
            else self.device.type == "cuda" or config.arch != "pneumonet"
        )
        if self._channels_last:
            net = net.to(memory_format=torch.channels_last)
        # mirror TTA is part of a model's calibration, so the weights file says whether to use it
        self._mirror = str(payload.get("tta", "hflip-mean-logit")) != "none"
        self.net: PneumoNet = net
        self.ood = OODModel.from_dict(payload["ood"])
        self.info = ModelInfo(
            name=str(payload["name"]),
            version=str(payload["version"]),
            sha256=sha256_file(weights),
            threshold=float(payload["threshold"]),
            temperature=float(payload["temperature"]),
            ood_threshold=float(self.ood.threshold),
            input_size=int(payload["input_size"]),
            intended_population=str(payload.get("intended_population", "")),
            max_age_years=payload.get("max_age_years"),
            target_sensitivity=float(payload.get("target_sensitivity", 0.95)),
            bias=float(payload.get("bias", 0.0)),
            path=weights.name,
            equalize=bool(payload.get("equalize", False)),
            precision=_dtype_name(self._autocast),
        )
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ prediction
    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self._pin:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _chunks(
        self, images: Sequence[np.ndarray]
    ) -> Iterator[tuple[Sequence[np.ndarray], torch.Tensor]]:
        """(images, their preprocessed batch on the device), ``batch_size`` at a time."""
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            yield (
                chunk,
                self._to_device(
                    to_model_batch(chunk, self.info.input_size, equalize=self.info.equalize)
                ),
            )

    def _tta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`~model.network.tta_forward_with_map` of ``x`` (under autocast when set)."""
        if self._autocast is not None:
            with torch.autocast(self.device.type, dtype=self._autocast):
                return tta_forward_with_map(self.net, x, mirror=self._mirror)
        return tta_forward_with_map(self.net, x, mirror=self._mirror)

    def logits_and_ood(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated TTA logits, OOD scores) per image."""
        logits: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        with self._lock, torch.inference_mode():
            for _, x in self._chunks(images):
                lg, ft, _ = self._tta(x)
                logits.append(lg.float().cpu().numpy())
                scores.append(self.ood.score(ft.float().cpu().numpy()))
        if not logits:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(logits), np.concatenate(scores)

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Calibrated pneumonia probability + OOD verdict for each 2-D [0, 1] image."""
        logits, scores = self.logits_and_ood(images)
        return self._predictions(logits, scores)

    def _predictions(self, logits: np.ndarray, scores: np.ndarray) -> list[Prediction]:
        """Calibrate raw TTA logits and judge OOD scores, one :class:`Prediction` each."""
        t, b = self.info.temperature, self.info.bias
        out = []
        for lg, sc in zip(logits, scores, strict=True):
            z = float(lg) / t + b
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            sc = float(sc)
            out.append(
                Prediction(
                    probability=p,
                    ood_score=sc,
                    is_chest=bool(sc <= self.info.ood_threshold),
                    threshold=self.info.threshold,
                )
            )
        return out

    def predict_with_heatmaps(
        self,
        images: Sequence[np.ndarray],
        heatmap_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[list[Prediction], list[np.ndarray]]:
        """:meth:`predict` and :meth:`heatmaps` from one forward pass per chunk.

        The TTA batch ``[x; mirror(x)]`` goes forward once, as in :meth:`predict`
        (same logits, OOD features and so probabilities). The unmirrored half's
        last feature map is kept from that pass; the pneumonia logit is
        recomputed from it (pool + head, the same operations) with gradients
        enabled and backpropagated to it for Grad-CAM. The trunk itself records
        no graph: Grad-CAM needs the gradient at its layer only, and the layers
        after it are the pool and the head. A map is returned for every image,
        chest or not (callers drop the ones they do not want).

        ``heatmap_shapes`` (one (H, W) per image) asks for each map at that size
        instead of its image's own: a caller that displays the map smaller (the
        worker's heatmap capture) then never has a full-resolution map made.

        Raises:
            ValueError: ``heatmap_shapes`` does not have one shape per image.
        """
        shapes = self._map_shapes(images, heatmap_shapes)
        logits: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        with self._lock:
            start = 0
            for chunk, x in self._chunks(images):
                with torch.no_grad():
                    lg, ft, fmap = self._tta(x)
                logits.append(lg.float().cpu().numpy())
                scores.append(self.ood.score(ft.float().cpu().numpy()))
                maps += self._grad_cam(fmap, shapes[start : start + len(chunk)])
                start += len(chunk)
        if not logits:
            return [], []
        return self._predictions(np.concatenate(logits), np.concatenate(scores)), maps

    @staticmethod
    def _map_shapes(
        images: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]] | None
    ) -> list[tuple[int, int]]:
        if shapes is None:
            return [(int(np.shape(img)[0]), int(np.shape(img)[1])) for img in images]
        if len(shapes) != len(images):
            raise ValueError(f"{len(shapes)} heatmap shapes for {len(images)} image(s)")
        return [(int(h), int(w)) for h, w in shapes]

    def _grad_cam(self, fmap: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Grad-CAM of the pneumonia logit at ``fmap`` (N, C, h, w), one map per image.

        Each map is float32 in [0, 1] at its (H, W) of ``shapes``; all zeros
        when the model sees no positive evidence.
        """
        with torch.enable_grad():
            leaf = fmap.detach().float().requires_grad_(True)
            logit = self.net.logit_from_features(self.net.pool(leaf))
            (grads,) = torch.autograd.grad(logit.sum(), leaf)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cams = F.relu((weights * leaf.detach()).sum(dim=1, keepdim=True))
        out: list[np.ndarray] = []
        for (h, w), cam in zip(shapes, cams, strict=True):
            up = F.interpolate(cam[None].float(), size=(h, w), mode="bilinear",
                               align_corners=False)[0, 0].cpu()  # fmt: skip
            peak = float(up.max())
            # normalised in place: no second full-size copy of a 2048² map
            out.append(up.div_(peak).numpy() if peak > 0 else np.zeros((h, w), np.float32))
        return out

    # ------------------------------------------------------------------ explanation
    def heatmaps(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Grad-CAM of the pneumonia logit on the last conv stage, per image.

        Each map is float32 in [0, 1] with the input image's own (H, W); all zeros
        when the model sees no positive evidence.
        """
        shapes = self._map_shapes(images, None)
        out: list[np.ndarray] = []
        with self._lock:
            for chunk, x in self._chunks(images):
                with torch.no_grad():
                    fmap = self.net.feature_map(x)
                out += self._grad_cam(fmap, shapes[len(out) : len(out) + len(chunk)])
        return out


_CACHE: dict[tuple[str, str, str], Predictor] = {}
_CACHE_LOCK = threading.Lock()


def load_predictor(
    weights: Path | None = None,
    device: str | None = None,
    precision: str | Precision = Precision.AUTO,
) -> Predictor:
    """The process-wide :class:`Predictor` for (weights, device, precision), loaded on first use.

    Raises:
        WeightsError: the weights file is missing, unreadable or of an unknown format.
        ValueError: ``precision`` is not one of :class:`~model.precision.Precision`.
    """
    path = Path(weights) if weights else default_weights_path()
    chosen = Precision.parse(precision)
    key = (str(path.resolve()), str(pick_device(device)), chosen.value)
    with _CACHE_LOCK:
        pred = _CACHE.get(key)
        if pred is None:
            pred = Predictor(path, device, precision=chosen)
            _CACHE[key] = pred
        return pred
