"""``pneumo train``: train, calibrate and export the pneumonia CNN.

Entry points (the CLI in ``pneumo/commands/model.py`` composes them):

* ``TrainConfig`` -- frozen dataclass, every field argparse-friendly
  (``Path``/``int``/``float``/``str``/``bool``; ``blocks`` is a "1,2,2,1" string);
  ``TrainConfig.for_recipe(name, **overrides)`` gives a named recipe (``RECIPES``:
  ``full`` = the pneumonet-2.0.0 candidate, ``quick`` = under an hour, ``1.0.0``).
* ``run_training(config: TrainConfig) -> Path`` -- trains (resuming from
  ``work_dir/last.pt`` when present and ``resume`` is true), calibrates on the
  validation split and writes the shipped weights file
  ``out_dir/<name>-<version>.pt``; returns its path.
* ``add_arguments(parser)`` / ``config_from_args(args)`` -- argparse helpers.
* ``main(argv) -> int`` -- ``python -m model.train ...``.

Recipe: Kermany ``train`` only, split by patient (``model.training_data``); every image
squash-resized once to the input size (``model.preprocess``) and cached as uint8;
optionally (``shift_prob``) acquisition perturbations from ``model.shift`` on part of
each batch; on-the-fly radiograph augmentations (mirror, small affine, gamma, window,
blur/sharpen, down-up resampling, noise) then per-image standardisation;
class-balanced BCE (optionally label smoothing, mixup); AdamW with warm-up + cosine
decay; an exponential moving average (EMA) of the weights is what gets validated and
shipped; checkpoints every epoch.

Validation is scored twice per epoch: on the patient-level split and on its
shift-robust view (``model.shift.perturbed_view``, fixed by the seed). The plain
split alone is too easy (AUC ~0.995) to tell candidates apart, so the best epoch
and early stopping use the mean of both AUCs. After training, temperature and
bias (``model.calibration``) are fitted on both views together, the threshold on
the perturbed view (sensitivity >= target there), the OOD guard (``model.ood``) on
train/validation -- never anything on ``kermany/test``.

If the epochs are already complete in ``work_dir`` (``last.pt``), a rerun skips
straight to calibration and export from ``best.pt``; fields that only affect the
run, not the recipe (threads, ``tta``, ``epochs``, ``out_dir``...), may change between
reruns.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.calibration import (
    apply_temperature,
    fit_platt,
    threshold_for_sensitivity,
)
from model.inference import pick_device, read_weights_file
from model.metrics import expected_calibration_error
from model.network import NetConfig, PneumoNet, build_network, tta_forward
from model.ood import fit_ood
from model.preprocess import INPUT_SIZE, standardize
from model.shift import perturb, perturbed_view
from model.training_data import Sample, list_samples, load_pixels, patient_split

__all__ = [
    "RECIPES",
    "WEIGHTS_FORMAT",
    "TrainConfig",
    "add_arguments",
    "augment",
    "config_from_args",
    "main",
    "network_outputs",
    "run_training",
    "shift_batch",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_FORMAT = 1


def _default_data() -> Path:
    return REPO.parent / "shared" / "data" / "kermany" / "train"


@dataclass(frozen=True)
class TrainConfig:
    """Training run parameters (defaults = the shipped model's recipe)."""

    data: Path = field(default_factory=_default_data)  # folder with NORMAL/ and PNEUMONIA/
    work_dir: Path = Path("var/model-train")  # checkpoints + pixel cache
    out_dir: Path = REPO / "model" / "weights"
    name: str = "pneumonet"
    version: str = "1.0.0"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    ema_decay: float = 0.995
    val_fraction: float = 0.15
    seed: int = 0
    patience: int = 7
    width: int = 24
    blocks: str = "1,2,2,1"
    dropout: float = 0.2
    arch: str = "pneumonet"  # or a torchvision trunk (model.network.TORCHVISION_ARCHS)
    shift_prob: float = 0.0  # fraction of training images put through model.shift.perturb
    label_smoothing: float = 0.0  # targets become y * (1 - ls) + ls / 2
    mixup: float = 0.0  # >0: mixup with Beta(mixup, mixup) mixing weights, per batch
    equalize: bool = False  # histogram-equalise every image (model.preprocess); serving follows
    input_size: int = INPUT_SIZE
    target_sensitivity: float = 0.95
    ood_quantile: float = 0.995
    ood_margin: float = 1.25
    limit: int = 0  # >0: use only this many images per class (smoke tests)
    max_minutes: float = 0.0  # >0: stop starting new epochs after this wall-clock budget
    resume: bool = True
    device: str = ""  # "" = CUDA when present, else CPU
    threads: int = 0  # 0 = torch default
    channels_last: bool = False  # NHWC on CPU: ~3x faster for the torchvision ResNets
    tta: str = "hflip-mean-logit"  # or "none": serving speed for the wide trunks (no mirror)
    weights_dtype: str = "float32"  # or "float16": halves the shipped file (ResNet-18: ~22 MB)
    progress: bool = True

    @classmethod
    def for_recipe(cls, recipe: str, **overrides: object) -> TrainConfig:
        """The configuration of a named recipe (:data:`RECIPES`), with ``overrides`` on top.

        Raises:
            ValueError: ``recipe`` is not a known recipe name.
        """
        if recipe not in RECIPES:
            raise ValueError(f"recipe: unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
        return cls(**{**RECIPES[recipe], **overrides})  # type: ignore[arg-type]

    def net_config(self) -> NetConfig:
        blocks = tuple(int(b) for b in str(self.blocks).split(",") if b.strip())
        return NetConfig(width=self.width, blocks=blocks, dropout=self.dropout, arch=self.arch)


RECIPES: dict[str, dict[str, object]] = {
    # pneumonet-2.0.0 (issue 12): torchvision ResNet-18 from scratch, trained against the
    # site shift; about 1.2 h of quiet 2-core CPU. No mirror TTA: serving speed (>= 50
    # images/s at batch 8 on 2 cores) and the chest is not left-right symmetric anyway.
    "full": {
        "arch": "resnet18",
        "channels_last": True,
        "epochs": 12,
        "patience": 6,
        "tta": "none",
        "weight_decay": 0.01,
        "shift_prob": 0.5,
        "label_smoothing": 0.05,
        "version": "2.0.0",
        "weights_dtype": "float16",  # 45 MB of float32 weights would not fit the 30 MB limit
    },
    # for hospitals that retrain: the ResNet-18 layout at half width, under an hour
    "quick": {
        "arch": "pneumonet",
        "width": 32,
        "blocks": "2,2,2,2",
        "epochs": 20,
        "patience": 6,
        "weight_decay": 0.01,
        "shift_prob": 0.5,
        "label_smoothing": 0.05,
        "max_minutes": 55.0,
        "version": "2.0.0-quick",
    },
    # pneumonet-1.0.0 exactly as shipped: the TrainConfig defaults
    "1.0.0": {},
}
"""Named training recipes: ``pneumo train --recipe NAME`` (fields not named keep defaults)."""


# --------------------------------------------------------------------------- augmentation


def _blur(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Cheap low-pass: anti-aliased downsample by ``factor`` and back (conv is slow on CPU)."""
    s = x.shape[-1]
    r = max(8, int(s * factor))
    small = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Radiograph augmentations on an (N, 1, S, S) batch in [0, 1]; returns [0, 1].

    Chosen to cover what differs between sources of frontal CXRs: positioning
    (small rotation/shift/scale, mirror), exposure and processing (gamma, window,
    blur/sharpen, noise) and resolution (down-up resampling, as in the 224 px
    squashed test set).
    """
    n, _, s, _ = x.shape
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(dev) * (hi - lo) + lo

    # mirror
    flip = torch.rand(n, generator=gen).to(dev) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), torch.flip(x, dims=(-1,)), x)
    # affine: rotation +-10 deg, scale 0.88..1.12, shift +-6 %
    ang = u(-10, 10, n) * math.pi / 180
    scale = u(0.88, 1.12, n)
    tx, ty = u(-0.06, 0.06, n) * 2, u(-0.06, 0.06, n) * 2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # resolution: down-up resampling of the whole batch (one size per batch for speed)
    if float(u(0, 1, 1)) < 0.5:
        r = int(u(0.45, 0.95, 1) * s)
        x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    # blur (a < 0) or unsharp-mask sharpen (a > 0), per image
    a = u(-1.0, 1.0, n).view(n, 1, 1, 1)
    blurred = _blur(x, float(u(0.35, 0.7, 1)))
    x = x + a * (x - blurred)
    # window (contrast stretch with clipping) and gamma, per image
    lo = u(0.0, 0.1, n).view(n, 1, 1, 1)
    hi = u(0.9, 1.0, n).view(n, 1, 1, 1)
    x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    gamma = torch.exp(u(-0.4, 0.4, n)).view(n, 1, 1, 1)
    x = x.clamp_min(1e-6) ** gamma
    # sensor noise
    x = x + torch.randn(x.shape, generator=gen).to(dev) * u(0.0, 0.02, n).view(n, 1, 1, 1)
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- helpers


def shift_batch(images: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of a uint8 (N, S, S) batch with a ``prob`` share put through ``model.shift``.

    The same acquisition perturbations the shift-robust validation view uses, at a
    milder strength, so training sees what a new site looks like without the
    validation view merely testing memorised perturbation parameters.
    """
    out = images.copy()
    if prob <= 0:
        return out
    for i in range(len(out)):
        if rng.random() < prob:
            out[i] = perturb(out[i], rng, count=(1, 2), strength=0.8)
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _batches(pixels: np.ndarray, size: int = 64) -> Iterator[tuple[int, torch.Tensor]]:
    for i in range(0, len(pixels), size):
        yield i, torch.from_numpy(pixels[i : i + size]).float().div_(255.0).unsqueeze(1)


@torch.inference_mode()
def network_outputs(
    net: PneumoNet,
    pixels: np.ndarray,
    device: torch.device,
    batch: int = 64,
    mirror: bool = True,
    channels_last: bool = False,
    equalize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(TTA logits (N,), OOD features (N, D)) of cached uint8 images, eval mode."""
    net.eval()
    logits, feats = [], []
    for _, x in _batches(pixels, batch):
        x = standardize(x, equalize=equalize).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lg, ft = tta_forward(net, x, mirror=mirror)
        logits.append(lg.cpu().numpy())
        feats.append(ft.cpu().numpy())
    if not logits:
        return np.zeros(0), np.zeros((0, 1))
    return np.concatenate(logits), np.concatenate(feats)


def _outputs_for(
    cfg: TrainConfig, net: PneumoNet, device: torch.device
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:func:`network_outputs` with the run's TTA and memory layout, as serving will use them."""
    return functools.partial(
        network_outputs,
        net,
        device=device,
        mirror=cfg.tta != "none",
        channels_last=cfg.channels_last,
        equalize=cfg.equalize,
    )


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _ema_update(ema: PneumoNet, net: PneumoNet, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for eb, b in zip(ema.buffers(), net.buffers(), strict=True):
        eb.copy_(b)


def _subset(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    if limit <= 0:
        return samples
    rng = random.Random(seed)
    out: list[Sample] = []
    for label in (0, 1):
        cls = [s for s in samples if s.label == label]
        rng.shuffle(cls)
        out += cls[:limit]
    return sorted(out, key=lambda s: str(s.path))


def _portable(value: object) -> str:
    """A config value for the shipped file: paths relative to the repo's parent, never absolute."""
    if isinstance(value, Path):
        try:
            return Path(value).resolve().relative_to(REPO.parent).as_posix()
        except ValueError:
            return value.name
    return str(value)


def _machine() -> str:
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except Exception:  # pragma: no cover - psutil is a dependency, but stay robust
        mem = ""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} logical CPUs{mem}, torch {torch.__version__}"


# --------------------------------------------------------------------------- training


def run_training(config: TrainConfig) -> Path:
    """Train (or resume), calibrate, fit the OOD guard and export; returns the weights path."""
    cfg = config
    t_start = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    _seed_all(cfg.seed)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    samples = _subset(list_samples(Path(cfg.data)), cfg.limit, cfg.seed)
    train_s, val_s = patient_split(samples, cfg.val_fraction, cfg.seed)
    if not train_s or not val_s:
        raise ValueError("not enough data for a train/validation split")
    pixels = load_pixels(samples, cfg.input_size, cache_dir=work / "cache")
    index = {s.path: i for i, s in enumerate(samples)}
    tr_pix = pixels[[index[s.path] for s in train_s]]
    va_pix = pixels[[index[s.path] for s in val_s]]
    tr_y = np.array([s.label for s in train_s], dtype=np.float32)
    va_y = np.array([s.label for s in val_s], dtype=np.int64)
    va_shift = perturbed_view(va_pix, cfg.seed)  # the shift-robust validation view
    log.info(
        "train %d images (%d pneumonia), val %d images (%d pneumonia), %d/%d patients",
        len(train_s),
        int(tr_y.sum()),
        len(val_s),
        int(va_y.sum()),
        len({s.patient for s in train_s}),
        len({s.patient for s in val_s}),
    )

    net = build_network(cfg.net_config()).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(tr_pix) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: _lr_factor(step, total_steps, warmup)
    )
    # class-balanced loss: each class contributes half of the expected loss
    n_pos = float(tr_y.sum())
    n_neg = float(len(tr_y) - n_pos)
    w_pos = len(tr_y) / (2 * max(n_pos, 1))
    w_neg = len(tr_y) / (2 * max(n_neg, 1))

    last_ckpt, best_ckpt = work / "last.pt", work / "best.pt"
    start_epoch, best_auc, best_epoch, history = 0, -1.0, -1, []
    train_seconds = 0.0
    if cfg.resume and last_ckpt.exists():
        state = read_weights_file(last_ckpt, map_location=device)
        if state.get("config_key") == _config_key(cfg):
            net.load_state_dict(state["net"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start_epoch = state["epoch"] + 1
            best_auc, best_epoch = state["best_auc"], state["best_epoch"]
            history = state["history"]
            train_seconds = state.get("train_seconds", 0.0)
            log.info("resumed from %s at epoch %d", last_ckpt, start_epoch)
        else:
            log.warning("checkpoint %s belongs to another configuration; starting over", last_ckpt)

    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        if best_epoch >= 0 and epoch - best_epoch > cfg.patience:
            stopped_early = True
            log.info("early stopping: no validation score gain for %d epochs", cfg.patience)
            break
        if cfg.max_minutes > 0 and history:
            per_epoch = train_seconds / len(history)
            if train_seconds + per_epoch > cfg.max_minutes * 60:
                log.info("time budget of %.0f min reached", cfg.max_minutes)
                break
        t0 = time.time()
        # per-epoch seeds: an interrupted run resumes with exactly the same batches
        torch.manual_seed(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(tr_pix), generator=gen).numpy()
        net.train()
        run_loss, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
            file=sys.stderr,
        )
        for step in bar:
            idx = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            batch = shift_batch(
                tr_pix[idx], cfg.shift_prob, np.random.default_rng([cfg.seed, epoch, step])
            )
            x = torch.from_numpy(batch).float().div_(255.0).unsqueeze(1)
            x = standardize(augment(x, gen), equalize=cfg.equalize)
            x = x.to(device).contiguous(memory_format=fmt)
            y = torch.from_numpy(tr_y[idx]).to(device)
            weights = torch.where(y > 0.5, w_pos, w_neg)
            if cfg.mixup > 0:
                lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
                perm = torch.randperm(len(idx), generator=gen).to(device)
                x = lam * x + (1 - lam) * x[perm]
                y = lam * y + (1 - lam) * y[perm]
                weights = lam * weights + (1 - lam) * weights[perm]
            target = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            loss = F.binary_cross_entropy_with_logits(net(x), target, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            _ema_update(ema, net, cfg.ema_decay if epoch > 0 else min(cfg.ema_decay, 0.9))
            run_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{run_loss / seen:.4f}")
        bar.close()
        outputs = _outputs_for(cfg, ema, device)
        val_logits, _ = outputs(va_pix)
        val_auc = _auc(va_y, val_logits)
        shift_logits, _ = outputs(va_shift)
        shift_auc = _auc(va_y, shift_logits)
        # selection score: plain validation alone is too easy to rank candidates (issue 12)
        score = (val_auc + shift_auc) / 2
        val_loss = float(
            F.binary_cross_entropy_with_logits(
                torch.from_numpy(val_logits), torch.from_numpy(va_y).float()
            )
        )
        epoch_s = time.time() - t0
        train_seconds += epoch_s
        improved = score > best_auc
        if improved:
            best_auc, best_epoch = score, epoch
            torch.save({"ema": ema.state_dict(), "epoch": epoch}, best_ckpt)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": run_loss / max(seen, 1),
                "val_loss": val_loss,
                "val_auc": val_auc,
                "val_auc_perturbed": shift_auc,
                "lr": opt.param_groups[0]["lr"],
                "seconds": epoch_s,
            }
        )
        msg = (
            f"epoch {epoch + 1}/{cfg.epochs} train_loss {run_loss / max(seen, 1):.4f} "
            f"val_loss {val_loss:.4f} val_auc {val_auc:.4f} "
            f"perturbed_auc {shift_auc:.4f}{' *' if improved else ''} "
            f"({epoch_s:.0f}s)"
        )
        print(msg, file=sys.stderr, flush=True)
        tmp = last_ckpt.with_suffix(".tmp")
        torch.save(
            {
                "net": net.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "epoch": epoch,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "history": history,
                "train_seconds": train_seconds,
                "config_key": _config_key(cfg),
            },
            tmp,
        )
        tmp.replace(last_ckpt)  # atomic: an interruption never leaves a half checkpoint

    if best_ckpt.exists():
        ema.load_state_dict(read_weights_file(best_ckpt, map_location=device)["ema"])
    ema.eval()
    return _calibrate_and_export(
        cfg,
        ema,
        device,
        tr_pix,
        va_pix,
        va_y,
        train_s,
        val_s,
        history,
        best_epoch,
        train_seconds,
        stopped_early,
        time.time() - t_start,
    )


_RUNTIME_FIELDS = (
    "resume",
    "progress",
    "max_minutes",
    "threads",
    "device",
    "out_dir",
    "version",
    "name",
    "patience",
    "epochs",
    "channels_last",
    "tta",
    "weights_dtype",
)


def _config_key(cfg: TrainConfig) -> str:
    """What must match for a checkpoint to be resumed: every recipe field.

    Fields at their default value are left out, so adding a new field (with a
    default that keeps the old behaviour) does not orphan runs already under way.
    """
    defaults = asdict(TrainConfig())
    keep = {
        k: str(v)
        for k, v in asdict(cfg).items()
        if k not in _RUNTIME_FIELDS and str(v) != str(defaults[k])
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _calibrate_and_export(
    cfg: TrainConfig,
    net: PneumoNet,
    device: torch.device,
    tr_pix: np.ndarray,
    va_pix: np.ndarray,
    va_y: np.ndarray,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    history: list[dict[str, float]],
    best_epoch: int,
    train_seconds: float,
    stopped_early: bool,
    wall_seconds: float,
) -> Path:
    store = getattr(torch, cfg.weights_dtype)
    if store != torch.float32:
        # round the weights to what the file will hold *before* calibrating, so the shipped
        # temperature, threshold and guard are fitted to exactly the served network
        with torch.no_grad():
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(store))
    outputs = _outputs_for(cfg, net, device)
    va_logits, va_feats = outputs(va_pix)
    sh_logits, sh_feats = outputs(perturbed_view(va_pix, cfg.seed))
    _, tr_feats = outputs(tr_pix)
    # temperature on both views (calibration must hold after the shift); threshold on
    # the perturbed one, so sensitivity >= target survives a new site's look (issue 12)
    temperature, bias = fit_platt(
        np.concatenate([va_logits, sh_logits]), np.concatenate([va_y, va_y])
    )
    va_prob = apply_temperature(va_logits, temperature, bias)
    sh_prob = apply_temperature(sh_logits, temperature, bias)
    threshold = threshold_for_sensitivity(sh_prob, va_y, cfg.target_sensitivity)
    ood = fit_ood(
        tr_feats, va_feats, net.ood_layer_dims(), quantile=cfg.ood_quantile, margin=cfg.ood_margin
    )
    yb = va_y.astype(bool)

    def summary(logits: np.ndarray, prob: np.ndarray, feats: np.ndarray) -> dict[str, float]:
        pred = prob >= threshold
        return {
            "n": int(len(va_y)),
            "roc_auc": _auc(va_y, prob),
            "sensitivity": float((pred & yb).sum() / max(yb.sum(), 1)),
            "specificity": float((~pred & ~yb).sum() / max((~yb).sum(), 1)),
            "ece_uncalibrated": expected_calibration_error(va_y, apply_temperature(logits, 1.0)),
            "ece": expected_calibration_error(va_y, prob),
            "ood_flagged_fraction": float((ood.score(feats) > ood.threshold).mean()),
        }

    val_summary = summary(va_logits, va_prob, va_feats)
    shift_summary = summary(sh_logits, sh_prob, sh_feats)
    log.info("perturbed validation: %s", shift_summary)
    log.info("validation: %s", val_summary)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{cfg.name}-{cfg.version}.pt"
    payload = {
        "format": WEIGHTS_FORMAT,
        "name": cfg.name,
        "version": cfg.version,
        "net_config": cfg.net_config().to_dict(),
        "state_dict": {
            k: v.detach().cpu().to(store) if v.is_floating_point() else v.detach().cpu()
            for k, v in net.state_dict().items()
        },
        "input_size": cfg.input_size,
        "temperature": float(temperature),
        "bias": float(bias),
        "threshold": float(threshold),
        "target_sensitivity": cfg.target_sensitivity,
        "tta": cfg.tta,
        "equalize": cfg.equalize,
        # calibrated validation probabilities: what ``pneumo monitor`` compares production with
        "monitoring_reference": va_prob.astype(np.float32),
        "ood": ood.to_dict(),
        "intended_population": "pediatric (1-5 years) frontal chest radiographs",
        "max_age_years": 17,
        "training": {
            "config": {k: _portable(v) for k, v in asdict(cfg).items() if k != "out_dir"},
            "history": history,
            "best_epoch": best_epoch + 1,
            "epochs_run": len(history),
            "stopped_early": stopped_early,
            "train_seconds": train_seconds,
            "wall_seconds": wall_seconds,
            "machine": _machine(),
            "device": str(device),
            "n_train": len(train_s),
            "n_val": len(val_s),
            "n_train_patients": len({s.patient for s in train_s}),
            "n_val_patients": len({s.patient for s in val_s}),
            "n_train_pneumonia": int(sum(s.label for s in train_s)),
            "n_val_pneumonia": int(sum(s.label for s in val_s)),
            "validation": val_summary,
            "validation_perturbed": shift_summary,
        },
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per :class:`TrainConfig` field (defaults from the dataclass)."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = type(default) if not isinstance(default, Path) else Path
            parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.train", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    path = run_training(config_from_args(args))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
