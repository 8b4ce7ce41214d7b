"""bench/references.py: PatchCore's nearest distance over rows, against brute force on constructed inputs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from references import _nearest_distance  # noqa: E402


def test_nearest_distance_matches_cdist():
    g = torch.Generator().manual_seed(2)
    query, bank = torch.randn(300, 16, generator=g), torch.randn(700, 16, generator=g)
    got = _nearest_distance(query, bank, chunk=64)
    torch.testing.assert_close(got, torch.cdist(query, bank).amin(1), atol=1e-4, rtol=1e-4)
    assert float(_nearest_distance(bank[:5], bank).max()) < 1e-2  # a bank row is its own neighbour
