"""bench/references.py: the PatchCore building blocks against brute force on constructed inputs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from references import _nearest_distance, greedy_coreset  # noqa: E402


def test_greedy_coreset_is_k_center_selection():
    x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(1))
    chosen = greedy_coreset(x, 50, seed=0)
    # Brute force: each step takes the row farthest from the chosen set, starting where it started.
    expected = [int(chosen[0])]
    dist = ((x - x[expected[0]]) ** 2).sum(1)
    for _ in range(49):
        c = int(dist.argmax())
        expected.append(c)
        dist = torch.minimum(dist, ((x - x[c]) ** 2).sum(1))
    assert chosen.tolist() == expected
    assert len(set(expected)) == 50


def test_nearest_distance_matches_cdist():
    g = torch.Generator().manual_seed(2)
    query, bank = torch.randn(300, 16, generator=g), torch.randn(700, 16, generator=g)
    got = _nearest_distance(query, bank, chunk=64)
    torch.testing.assert_close(got, torch.cdist(query, bank).amin(1), atol=1e-4, rtol=1e-4)
    assert float(_nearest_distance(bank[:5], bank).max()) < 1e-2  # a bank row is its own neighbour
