"""Every trunk behind ``NetConfig.arch``: 1-channel stem, four stages, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.network import TORCHVISION_ARCHS, NetConfig, build_network


@pytest.mark.parametrize("arch", ("pneumonet", *TORCHVISION_ARCHS))
def test_every_trunk_has_four_stages_down_to_stride_32_and_a_one_channel_stem(arch) -> None:
    torch.manual_seed(0)
    net = build_network(NetConfig(arch=arch, width=8)).eval()
    x = torch.randn(2, 1, 96, 128)
    with torch.no_grad():
        logits, ood, fmap = net.forward_ood_with_map(x)
        h = net.stem(x)
        sides, stats = [], []
        for stage, width in zip(net.stages, net.stage_widths, strict=True):
            h = stage(h)
            assert h.shape[1] == width  # the widths the guard's statistics are laid out by
            sides.append((x.shape[2] // h.shape[2], x.shape[3] // h.shape[3]))
            stats += [h.mean(dim=(2, 3)), h.flatten(2).std(dim=2)]  # torch's own, as fitted
    assert sides == [(4, 4), (8, 8), (16, 16), (32, 32)]
    torch.testing.assert_close(ood, torch.cat(stats, dim=1), rtol=1e-5, atol=1e-6)
    assert logits.shape == (2,) and fmap.shape == (2, net.feature_dim, 3, 4)
    assert ood.shape == (2, sum(net.ood_layer_dims()))
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_reading_the_stage_widths_moves_no_batchnorm_statistic(arch) -> None:
    net = build_network(NetConfig(arch=arch))
    assert net.training  # the probe pass left the mode as it found it
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert int(bn.num_batches_tracked) == 0
        assert torch.count_nonzero(bn.running_mean) == 0
