"""Losses on hand-made inputs equal SPEC section 2's formulas; extremes stay finite."""

import math

import pytest
import torch

from adtr.losses import ALPHA, image_loss, mixed_loss, mse_loss, pixel_loss, pseudo_huber

PHI = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2): K = 4 positions


def test_pseudo_huber_uses_mean_absolute_channel_difference():
    f = torch.zeros(1, 2, 1, 1)
    f_hat = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1)  # mean |d| = 2
    assert pseudo_huber(f, f_hat).item() == pytest.approx(math.sqrt(5) - 1)


def test_pixel_loss_all_normal_is_mean_phi():
    assert pixel_loss(PHI, torch.zeros_like(PHI)).item() == pytest.approx(2.5)


def test_pixel_loss_all_anomalous():
    expected = -ALPHA * math.log(1 - math.exp(-2.5))
    assert pixel_loss(PHI, torch.ones_like(PHI)).item() == pytest.approx(expected)


def test_pixel_loss_mixed():
    y = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    expected = (2 + 3 + 4) / 4 - ALPHA * math.log(1 - math.exp(-1 / 4))
    assert pixel_loss(PHI, y).item() == pytest.approx(expected)


def test_image_loss_top_k():
    assert image_loss(PHI, torch.tensor([0.0]), top_k=2).item() == pytest.approx(3.5)
    expected = -ALPHA * math.log(1 - math.exp(-3.5))
    assert image_loss(PHI, torch.tensor([1.0]), top_k=2).item() == pytest.approx(expected)


def test_mixed_loss_averages_per_sample_losses():
    f = torch.zeros(2, 1, 2, 2)
    f_hat = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    phi1, phi2 = math.sqrt(2) - 1, math.sqrt(5) - 1
    labels = torch.zeros(2, 2, 2)
    loss = mixed_loss(f, f_hat, labels, torch.tensor([0.0, 1.0]), torch.tensor([True, False]), top_k=2)
    expected = (phi1 + (-ALPHA * math.log(1 - math.exp(-phi2)))) / 2
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-3, 1e3, 1e8])
def test_extremes_are_finite_with_finite_gradients(scale):
    f = torch.zeros(2, 3, 4, 4)
    f_hat = torch.full((2, 3, 4, 4), scale, requires_grad=True)
    y = torch.ones(2, 4, 4)
    loss = mixed_loss(f, f_hat, y, torch.ones(2), torch.tensor([True, False]), top_k=3)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(f_hat.grad).all()


def test_mse():
    assert mse_loss(torch.zeros(2, 2), torch.ones(2, 2) * 3).item() == pytest.approx(9.0)
