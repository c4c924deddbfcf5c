"""The CNN: a compact ResNet (He et al. 2016) for 1-channel radiographs, from scratch.

A torchvision-style BasicBlock ResNet with configurable width and depth so it
trains in well under an hour on a 2-core CPU. Exposes the last convolutional
feature map (for Grad-CAM) and the pooled penultimate features (for the
out-of-distribution guard) besides the pneumonia logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters; stored inside the weights file."""

    width: int = 24
    blocks: tuple[int, ...] = (1, 2, 2, 1)
    dropout: float = 0.2
    in_channels: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        d = dict(d)
        d["blocks"] = tuple(d.get("blocks", cls.blocks))
        return cls(**d)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PneumoNet(nn.Module):
    """Compact ResNet: stem (stride 4) + 4 stages (widths w, 2w, 4w, 8w) + linear head."""

    def __init__(self, config: NetConfig = NetConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 7, 2, 3, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        cin = w
        for i, n in enumerate(config.blocks):
            cout = w * 2**i
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.feature_dim = cin
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(cin, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init last BN of each block: starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (N, C, h, w): Grad-CAM's target layer."""
        return self.stages(self.stem(x))

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Global average pooling to the penultimate features (N, C)."""
        return fmap.mean(dim=(2, 3))

    def logit_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(feats)).squeeze(1)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N,), penultimate features (N, C))."""
        feats = self.pool(self.feature_map(x))
        return self.logit_from_features(feats), feats

    def forward_ood(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N,), OOD features (N, D)).

        OOD features: per-channel mean and standard deviation of every stage's
        output, concatenated stage by stage (see :meth:`ood_layer_dims`).
        """
        h = self.stem(x)
        pooled = []
        for stage in self.stages:
            h = stage(h)
            pooled += [h.mean(dim=(2, 3)), h.flatten(2).std(dim=2)]
        return self.logit_from_features(pooled[-2]), torch.cat(pooled, dim=1)

    def ood_layer_dims(self) -> list[int]:
        """Width of each stage's block inside the OOD feature vector."""
        return [2 * self.config.width * 2**i for i in range(len(self.config.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pneumonia logits, shape (N,)."""
        return self.forward_with_features(x)[0]


def build_network(config: NetConfig | None = None) -> PneumoNet:
    return PneumoNet(config or NetConfig())


def tta_forward(net: PneumoNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time augmentation used by validation, calibration and serving alike.

    Returns (logits (N,), OOD features (N, D)): the logit is the mean of the
    image's and its horizontal mirror's logits; OOD features come from the
    unflipped image.
    """
    n = x.shape[0]
    # one forward over [x; mirror(x)]: BN is in eval mode, so this equals two calls
    # but uses the CPU/GPU better at small batch sizes
    logits, feats = net.forward_ood(torch.cat([x, torch.flip(x, dims=(-1,))]))
    return (logits[:n].float() + logits[n:].float()) / 2.0, feats[:n].float()
