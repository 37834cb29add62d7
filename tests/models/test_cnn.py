"""The seed CNN: shapes for every pooling/padding/batch-norm combination, pooling kinds, noise."""

from __future__ import annotations

import itertools

import pytest
import torch

from cnnops.config import ConvBlock, Pooling, SeedCnn
from cnnops.errors import ConfigError
from cnnops.models import build_model, feature_sizes


def seed_spec(**changes: object) -> SeedCnn:
    blocks = [
        ConvBlock(filters=6, kernel=5, padding="valid"),
        ConvBlock(filters=12, kernel=5, padding="valid"),
    ]
    return SeedCnn(conv=blocks, fc=[32], **changes)


@pytest.mark.parametrize(
    ("kind", "padding", "batch_norm"),
    list(itertools.product(["max", "avg", "sum"], ["valid", "same"], [True, False])),
)
def test_feature_map_shapes_follow_padding_and_pooling(
    kind: str, padding: str, batch_norm: bool
) -> None:
    blocks = [
        ConvBlock(filters=6, kernel=5, padding=padding),
        ConvBlock(filters=12, kernel=3, padding=padding),
    ]
    spec = SeedCnn(conv=blocks, pooling=Pooling(kind=kind), batch_norm=batch_norm, fc=[16])
    net = build_model(spec, 1, 10, 28).eval()
    features = net.features(torch.rand(3, 1, 28, 28))
    # valid: 28 -5+1 = 24 → pool 12 → -3+1 = 10 → pool 5; same: 28 → 14 → 14 → 7.
    side = 5 if padding == "valid" else 7
    assert features.shape == (3, 12, side, side)
    assert feature_sizes(spec, 28) == ([12, 5] if padding == "valid" else [14, 7])
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert has_bn == batch_norm


def test_seed_network_from_the_product_card_is_expressible() -> None:
    # 28×28×1 → conv 5×5 valid (24×24×n1) → max-pool 2×2 → conv 5×5 valid → max-pool → FC → softmax
    net = build_model(seed_spec(), 1, 10, 28).eval()
    conv = net.features[0]
    assert conv(torch.rand(1, 1, 28, 28)).shape == (1, 6, 24, 24)
    proba = net.predict_proba(torch.rand(4, 1, 28, 28))
    assert torch.allclose(proba.sum(dim=1), torch.ones(4))


def test_sum_pooling_sums_each_window() -> None:
    spec = SeedCnn(
        conv=[ConvBlock(filters=1, kernel=1)], pooling=Pooling(kind="sum"), batch_norm=False
    )
    pool = build_model(spec, 1, 2, 4).features[-1]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert pool(x).flatten().tolist() == [
        0 + 1 + 4 + 5,
        2 + 3 + 6 + 7,
        8 + 9 + 12 + 13,
        10 + 11 + 14 + 15,
    ]


def test_stride_with_same_padding_halves_the_map() -> None:
    spec = SeedCnn(
        conv=[ConvBlock(filters=4, kernel=3, stride=2, padding="same", pool=False)], fc=[]
    )
    net = build_model(spec, 3, 5, 32)
    assert net.features(torch.rand(2, 3, 32, 32)).shape == (2, 4, 16, 16)


def test_noise_and_dropout_act_only_in_training() -> None:
    net = build_model(seed_spec(noise_std=0.5, dropout_fc=0.5, dropout_conv=0.2), 1, 10, 28)
    x = torch.rand(8, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_kernel_larger_than_feature_map_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.conv\[1\].kernel = 5: larger than the 4x4"):
        feature_sizes(seed_spec(), 12)
