"""The memory bank of good features (adtr/memory_bank.py) and the map it joins where the
reconstructor copies its input (ScoreConfig.nearest_map): known values, the fit's choice, the
run folder and ONNX round trips, updates."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors import safe_open

from adtr import ADTRDetector
from adtr.checkpoint import CONFIG_FILE, STATE_DIR, WEIGHTS_FILE
from adtr.config import ScoreConfig, TrainConfig
from adtr.memory_bank import (
    BANK_SIZE,
    covering_radius,
    fit_memory_bank,
    greedy_coreset,
    join_memory_bank,
    nearest_distance,
    nearest_residual,
    nearest_rows,
    patch_features,
    search_basis,
)
from adtr.model import ADTR

NO_QUERY = dataclasses.replace(TINY, use_query=False)


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
    with pytest.raises(ValueError, match="1 <= n"):
        greedy_coreset(x[:3], 4)


def test_nearest_distance_is_the_distance_to_the_closest_bank_row():
    g = torch.Generator().manual_seed(2)
    f, bank = torch.randn(3, 16, 4, 5, generator=g), torch.randn(70, 16, generator=g)
    got = nearest_distance(f, bank)
    assert got.shape == (3, 4, 5)
    rows = f.permute(0, 2, 3, 1).reshape(-1, 16)
    torch.testing.assert_close(got.flatten(), torch.cdist(rows, bank).amin(1), atol=1e-4, rtol=1e-4)


def test_the_bank_residual_is_the_feature_less_its_nearest_row():
    g = torch.Generator().manual_seed(3)
    f, bank = torch.randn(2, 12, 3, 4, generator=g), torch.randn(50, 12, generator=g)
    got = nearest_residual(f, bank)
    assert got.shape == f.shape
    rows = f.permute(0, 2, 3, 1).reshape(-1, 12)
    nearest = bank[torch.cdist(rows, bank).argmin(1)]
    torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1, 12), rows - nearest)
    torch.testing.assert_close(torch.linalg.vector_norm(got, dim=1), nearest_distance(f, bank), atol=1e-4, rtol=1e-4)


def test_a_defect_head_reads_the_banks_residual_beside_the_reconstruction_residual():
    """With a bank, the head's weights cover the residual's channels and the bank's; its logit in
    the map is their dot product with both. A run saved before the key (head_bank_residual
    False) keeps a head on the residual alone."""
    from adtr.config import RunConfig

    score = ScoreConfig(nearest_map=True, defect_head=True, head_gain=1.0, image_score="max_pool")
    m = ADTR(NO_QUERY, score).eval()
    cb = m.channels - m.nearest_first
    assert m.head_reads_bank and m.state_dict()["head_weight"].shape == (1, m.channels + cb, 1, 1)
    g = torch.Generator().manual_seed(4)
    m.nearest_bank.copy_(torch.randn(BANK_SIZE, cb, generator=g))
    m.nearest_norm.copy_(torch.tensor([5.0, 2.0]))
    m.head_weight.copy_(torch.randn(1, m.channels + cb, 1, 1, generator=g))
    f = m.standardize(m.extract(torch.rand(2, 3, 64, 64, generator=g) * 255))
    with torch.no_grad():
        r, bank = m.residual(f), m.bank_residual(f)
        inputs = torch.cat([r, bank], 1)
        logit = (inputs * m.head_weight).sum(1) + m.head_bias
        # the bank's part moves the logit: the head is not reading the residual alone
        assert (logit - ((r * m.head_weight[:, : m.channels]).sum(1) + m.head_bias)).abs().max() > 1e-2
        grid = m.residual_grid(r, f)
        torch.testing.assert_close(m.residual_grid(r, f, bank), grid, atol=1e-4, rtol=1e-4)
        want = m.score_maps(((grid - m.head_norm[0]) / m.head_norm[1] + logit).clamp_min(0)).anomaly_map
        torch.testing.assert_close(m.score(f).anomaly_map, want, atol=1e-4, rtol=1e-4)
    doc = RunConfig(model=NO_QUERY, score=score).to_dict()
    del doc["score"]["head_bank_residual"]
    before = RunConfig.from_dict(doc).score
    assert before.head_bank_residual is False
    doc["score"]["defect_head"] = False  # a run without a head: one fitted on it later reads the bank too
    assert RunConfig.from_dict(doc).score.head_bank_residual is True
    old = ADTR(NO_QUERY, before)
    assert not old.head_reads_bank and old.state_dict()["head_weight"].shape == (1, old.channels, 1, 1)
    assert ADTR(NO_QUERY, dataclasses.replace(score, nearest_map=False)).head_weight.shape[1] == m.channels
    with pytest.raises(ValueError, match="true or false"):
        ScoreConfig(head_bank_residual=None)


def test_a_head_that_reads_the_bank_weighs_as_much_as_the_map():
    """Three masked defects: a head on a map without a bank weighs MASK_GAIN; one that reads the
    bank's residual weighs DEFAULT_GAIN; with one masked defect, half of each
    (defect_head.default_gain, set by the fit)."""
    from adtr.defect_head import DEFAULT_GAIN, FEW_MASKED_SHARE, MASK_GAIN
    from adtr.engine import AnomalyPool
    from adtr.fit import fit_head

    g = torch.Generator().manual_seed(10)
    gains = {}
    for bank in (False, True):
        for n in (1, 3):
            m = ADTR(NO_QUERY, ScoreConfig(nearest_map=bank, defect_head=True, image_score="max_pool")).eval()
            good = torch.randn(6, m.channels, *TINY.grid_size, generator=g)
            if bank:
                m.set_memory_bank(good)
            labels = torch.zeros(n, *TINY.grid_size)
            labels[:, 1:3, 1:3] = 1.0
            defects = torch.randn(n, m.channels, *TINY.grid_size, generator=g) + 3.0 * labels[:, None]
            fit_head(m, good, AnomalyPool(defects, labels, torch.ones(n, dtype=torch.bool), ("real",) * n))
            assert m.head_reads_bank is bank
            gains[bank, n] = m.score_cfg.head_gain
    assert gains == {(False, 3): MASK_GAIN, (True, 3): DEFAULT_GAIN, (False, 1): FEW_MASKED_SHARE * MASK_GAIN,
                     (True, 1): FEW_MASKED_SHARE * DEFAULT_GAIN}  # fmt: skip


def test_the_crossed_bank_residual_takes_each_half_against_the_others_bank():
    m = ADTR(NO_QUERY, ScoreConfig(nearest_map=True))
    f = torch.randn(5, m.channels, 4, 4, generator=torch.Generator().manual_seed(5))
    got = m.crossed_bank_residual(f)
    p = m.patch_features(f)
    dims = m.score_cfg.nearest_search_dims
    assert 0 < dims < p.shape[1] and m.nearest_basis.shape == (p.shape[1], dims)
    # each half's bank searched in its own subspace, as the model's bank is in its own
    want = [nearest_residual(p[rows], bank, search_basis(bank, dims))
            for rows, bank in ((slice(0, 2), fit_memory_bank(p[2:])), (slice(2, 5), fit_memory_bank(p[:2])))]
    assert torch.equal(got, torch.cat(want)) and got.abs().amin(1).amax() > 0
    # against a bank of all 80 positions, each is its own row: a residual of (nearly) 0
    m.nearest_bank.copy_(fit_memory_bank(p))
    m._set_search_basis()
    assert m.bank_residual(f).abs().max() < 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        m.crossed_bank_residual(f[:1])


def test_the_nearest_row_is_the_first_of_the_closest_in_a_bank_of_blocks():
    """The index search in blocks (the minimum per block, then inside the best block) gives
    torch.argmin's index, the first of tied rows (a bank repeated to its size has many)."""
    g = torch.Generator().manual_seed(9)
    distinct = torch.randn(1000, 6, generator=g)
    bank = distinct[torch.arange(4096) % 1000]  # every row repeated: ties, the first one wins
    x = torch.randn(2, 300, 6, generator=g)
    got = nearest_rows(x, bank)
    assert got.shape == (2, 300) and int(got.max()) < 1000
    assert torch.equal(got, torch.cdist(x, distinct).argmin(-1))
    d = torch.randint(0, 3, (5, 4096), generator=g).float()  # ties inside and across blocks
    from adtr.memory_bank import _argmin

    assert torch.equal(_argmin(d), d.argmin(-1)) and torch.equal(_argmin(d[:, :100]), d[:, :100].argmin(-1))


def test_the_search_basis_is_the_banks_principal_subspace():
    g = torch.Generator().manual_seed(6)
    # rows that vary along 3 directions of 10 channels (and little along the rest)
    directions = torch.linalg.qr(torch.randn(10, 10, generator=g))[0]
    spread = torch.tensor([5.0, 4.0, 3.0] + [0.01] * 7)
    bank = (torch.randn(300, 10, generator=g) * spread) @ directions.t() + 2.0
    basis = search_basis(bank, 3)
    assert basis.shape == (10, 3)
    torch.testing.assert_close(basis.t() @ basis, torch.eye(3), atol=1e-5, rtol=0)
    # the same subspace as the first three directions: projecting them onto it keeps them whole
    top = directions[:, :3]
    torch.testing.assert_close(basis @ (basis.t() @ top), top, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="1 <= dims <= 10"):
        search_basis(bank, 11)
    with pytest.raises(ValueError, match="1 <= dims"):
        search_basis(bank, 0)
    with pytest.raises(ValueError, match="5 rows of 10 channels needs 1 <= dims <= 5"):
        search_basis(bank[:5], 6)  # fewer rows than dimensions: no such subspace


def test_a_search_in_the_subspace_finds_a_row_and_its_exact_distance():
    """Rows that differ only inside the subspace: the search finds the exact nearest row. Any
    bank: the distance is the exact one to the row found, never below the true nearest one."""
    g = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(12, 4, generator=g))[0]  # (12, 4) orthonormal
    offset = torch.randn(12, generator=g)
    bank = torch.randn(80, 4, generator=g) @ basis.t() + offset
    f = (torch.randn(2, 5, 6, 4, generator=g) @ basis.t() + offset).permute(0, 3, 1, 2)  # (2, 12, 5, 6)
    rows = f.permute(0, 2, 3, 1).reshape(-1, 12)
    assert torch.equal(nearest_rows(rows[None], bank, basis)[0], torch.cdist(rows, bank).argmin(1))
    torch.testing.assert_close(nearest_distance(f, bank, basis), nearest_distance(f, bank), atol=1e-4, rtol=1e-4)
    other = torch.randn(80, 12, generator=g)  # rows anywhere: an approximate search
    sub = search_basis(other, 4)
    index = nearest_rows(rows[None], other, sub)[0]
    # the nearest row of the projections, which is not the nearest row for some positions
    assert torch.equal(index, torch.cdist(rows @ sub, other @ sub).argmin(1))
    assert (index != torch.cdist(rows, other).argmin(1)).any()
    got = nearest_distance(f, other, sub)
    found = other[index]
    torch.testing.assert_close(got.flatten(), (rows - found).norm(dim=1), atol=1e-5, rtol=1e-5)
    assert (got >= nearest_distance(f, other) - 1e-4).all()
    residual = nearest_residual(f, other, search_basis(other, 4))
    torch.testing.assert_close(residual.permute(0, 2, 3, 1).reshape(-1, 12), rows - found)


def test_the_search_dims_set_the_models_basis_and_runs_saved_before_search_exactly():
    from adtr.checkpoint import model_fingerprint
    from adtr.config import RunConfig

    m = ADTR(NO_QUERY, ScoreConfig(nearest_map=True))
    cb = m.channels - m.nearest_first
    assert m.state_dict()["nearest_basis"].shape == (cb, ScoreConfig().nearest_search_dims)
    g = torch.Generator().manual_seed(8)
    m.set_memory_bank(torch.randn(4, m.channels, 8, 8, generator=g), held=torch.randn(2, m.channels, 8, 8, generator=g))
    torch.testing.assert_close(m.nearest_basis, search_basis(m.nearest_bank, m.nearest_basis.shape[1]))
    exact = ADTR(NO_QUERY, ScoreConfig(nearest_map=True, nearest_search_dims=0))
    assert "nearest_basis" not in exact.state_dict()  # nothing stored: an exact search
    assert "nearest_basis" not in ADTR(NO_QUERY, ScoreConfig(nearest_map=True, nearest_search_dims=cb)).state_dict()
    assert "nearest_basis" not in ADTR(NO_QUERY, ScoreConfig(nearest_map=False)).state_dict()
    # a run saved before the key searched exactly, and its fingerprint (cached graph) is as it was
    doc = RunConfig(model=NO_QUERY, score=ScoreConfig(nearest_map=True)).to_dict()
    del doc["score"]["nearest_search_dims"]
    assert RunConfig.from_dict(doc).score.nearest_search_dims == 0
    import adtr.checkpoint as ck

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "_state_hash", lambda state, extra=b"": seen.append(extra) or "")
        model_fingerprint(exact)
        model_fingerprint(m)
    assert b"nearest_search_dims" not in seen[0] and b"nearest_search_dims" in seen[1]
    # dims at the bank's channels or more: an exact search, stored and fingerprinted as 0
    wide = ADTR(NO_QUERY, ScoreConfig(nearest_map=True, nearest_search_dims=cb))
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "_state_hash", lambda state, extra=b"": seen.append(extra) or "")
        model_fingerprint(wide)
    assert b"nearest_search_dims" not in seen[0]
    # with_score from an exact search to a subspace search: the same fitted bank, its basis computed
    exact.set_memory_bank(torch.randn(4, m.channels, 8, 8, generator=g), held=torch.randn(2, m.channels, 8, 8,
                                                                                          generator=g))  # fmt: skip
    searched = exact.with_score(ScoreConfig(nearest_map=True))
    assert torch.equal(searched.nearest_bank, exact.nearest_bank) and searched.nearest_bank.abs().sum() > 0
    dims = ScoreConfig().nearest_search_dims
    assert searched.nearest_basis.shape == (cb, dims)
    torch.testing.assert_close(searched.nearest_basis, search_basis(searched.nearest_bank, dims))
    with pytest.raises(ValueError, match="whole number >= 0"):
        ScoreConfig(nearest_search_dims=-1)


def test_patch_features_are_the_coarse_stages_averaged_3x3():
    f = torch.arange(2 * 5 * 4 * 4, dtype=torch.float32).reshape(2, 5, 4, 4)
    got = patch_features(f, first=2)
    assert got.shape == (2, 3, 4, 4)
    assert got[1, 0, 1, 2] == f[1, 2, 0:3, 1:4].mean()  # inside: the 3x3 block
    assert got[0, 2, 0, 0] == f[0, 4, 0:2, 0:2].mean()  # a corner: the 2x2 positions it has


def test_the_bank_has_a_fixed_size_of_training_positions():
    """Fewer positions than rows: every one is kept (repeated to the size), so each training
    position is its own nearest row; more: `size` distinct rows, each a training position."""
    few = torch.randn(2, 8, 3, 4)  # 24 positions
    bank = fit_memory_bank(few, size=100)
    assert bank.shape == (100, 8) and len(bank.unique(dim=0)) == 24
    assert nearest_distance(few, bank).max() < 1e-2  # float32 rounding of |x|^2 - 2 x.y + |y|^2
    many = torch.randn(10, 8, 6, 6)  # 360 positions
    bank = fit_memory_bank(many, size=50)
    rows = many.permute(0, 2, 3, 1).reshape(-1, 8)
    assert len(bank.unique(dim=0)) == 50 and torch.cdist(bank, rows).amin(1).max() < 1e-2
    assert torch.equal(bank, fit_memory_bank(many, size=50))  # seeded
    with pytest.raises(ValueError, match="at least one good image"):
        fit_memory_bank(many[:0])


def test_the_coreset_continued_from_centers_stops_once_every_row_is_covered():
    """With centers (rows chosen before), the greedy k-center selection starts from them and stops
    as soon as every row lies within the radius; the radius is covering_radius's, in the same
    projected space (no projection at these 2 channels)."""
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.2, 0.0], [9.0, 0.0]])
    centers = torch.tensor([[0.0, 0.0]])
    assert covering_radius(x[:2], centers) == pytest.approx(0.1)
    # farthest first: 9, then 5 (4 from 9, 5 from 0); then 5.2 lies 0.2 from 5, within 0.25
    assert greedy_coreset(x, 5, centers=centers, radius=0.25).tolist() == [4, 2]
    assert greedy_coreset(x, 5, centers=centers, radius=0.15).tolist() == [4, 2, 3]  # 5.2 is not within 0.15
    assert greedy_coreset(x, 1, centers=centers, radius=0.25).tolist() == [4]  # n bounds it
    assert greedy_coreset(x, 0, centers=centers).tolist() == []
    assert greedy_coreset(x, 5, centers=torch.cat([centers, x[2:]]), radius=0.11).tolist() == []  # all covered
    # at 200 channels, projected to 128 as the fresh coreset is: the radius comes from the same space
    g = torch.Generator().manual_seed(4)
    many, bank = torch.randn(300, 200, generator=g), torch.randn(40, 200, generator=g)
    r = covering_radius(many, bank)
    assert greedy_coreset(many, 300, centers=bank, radius=r).tolist() == []
    assert len(greedy_coreset(many, 300, centers=bank, radius=0.5 * r)) > 0


def test_a_bank_holding_every_position_is_fitted_again_with_the_new_ones():
    """A small set's bank holds all its positions, repeated to its rows: a join refits it on them
    and the new positions at the same rows, as a fit on all the images would (no radius: it is 0)."""
    g = torch.Generator().manual_seed(7)
    old = torch.randn(2, 8, 3, 4, generator=g)  # 24 positions in a bank of 100 rows
    bank = fit_memory_bank(old, size=100)
    new = torch.randn(1, 8, 3, 4, generator=g) + 5  # far from the old ones
    assert nearest_distance(new, bank).min() > 1
    joined = join_memory_bank(bank, new, reference=old)
    assert joined.shape == (100, 8) and len(joined.unique(dim=0)) == 36  # the 24 old rows and the 12 new
    assert nearest_distance(torch.cat([old, new]), joined).max() < 1e-2
    many = torch.randn(10, 8, 3, 4, generator=g)  # 120 more positions like the old: 144 in all, 100 rows
    joined = join_memory_bank(bank, many, reference=old)
    assert joined.shape == (100, 8) and len(joined.unique(dim=0)) == 100
    assert torch.equal(joined, join_memory_bank(bank, many, reference=old))  # seeded


def test_a_join_adds_rows_where_the_new_images_are_not_covered_as_densely_as_the_old():
    """The parent's rows all stay (its parts map exactly as before); images like the parent's add
    few rows, a new mode (a product change) many; no old position lies farther from the bank."""
    g = torch.Generator().manual_seed(5)
    old = torch.randn(8, 4, 6, 6, generator=g)  # 288 positions
    bank = fit_memory_bank(old, size=64)
    alike = torch.randn(4, 4, 6, 6, generator=g)
    shifted = torch.randn(8, 4, 6, 6, generator=g) + 6  # a new mode, far from the old one
    radius = covering_radius(old.permute(0, 2, 3, 1).reshape(-1, 4), bank)
    for new, rows in ((alike, (0, 32)), (shifted, (32, 1000))):
        joined = join_memory_bank(bank, new, reference=old, fit_rows=64)
        added = len(joined.unique(dim=0)) - 64
        assert rows[0] <= added <= rows[1], added
        assert len(joined) % 64 == 0 and len(joined) - 64 - added < 64  # padded by repeats to the search's blocks
        assert torch.equal(joined[:64], bank.unique(dim=0))  # the old rows first, every one of them
        # with an exact search no old position is farther (the subspace search may find a farther row)
        assert (nearest_distance(old, joined) <= nearest_distance(old, bank) + 1e-5).all()
        assert covering_radius(new.permute(0, 2, 3, 1).reshape(-1, 4), joined) <= radius * (1 + 1e-4)
    # a second join of a grown (padded) bank grows it again: its repeats are padding, not a small set
    grown = join_memory_bank(bank, shifted, reference=old, fit_rows=64)
    again = join_memory_bank(grown, shifted + 6, reference=torch.cat([old, shifted]), fit_rows=64)
    assert torch.equal(again[: len(grown.unique(dim=0))], grown.unique(dim=0)) and len(again) > len(grown)
    joins = [join_memory_bank(bank, alike, reference=old, fit_rows=64) for _ in range(2)]
    assert torch.equal(*joins)  # seeded


def test_above_the_candidate_limit_the_coreset_is_drawn_from_a_seeded_subset(monkeypatch):
    from adtr import memory_bank

    monkeypatch.setattr(memory_bank, "CANDIDATES", 40)
    f = torch.randn(4, 6, 5, 5)  # 100 positions
    rows = f.permute(0, 2, 3, 1).reshape(-1, 6)
    bank = fit_memory_bank(f, size=64)
    distinct = bank.unique(dim=0)
    assert bank.shape == (64, 6) and len(distinct) == 40  # all 40 candidates, repeated to the size
    positions = {tuple(r) for r in rows.tolist()}
    assert all(tuple(r) in positions for r in distinct.tolist())  # each a training position
    assert torch.equal(bank, fit_memory_bank(f, size=64)) and not torch.equal(bank, fit_memory_bank(f, 64, seed=1))
    # a join keeps every old row and adds new positions drawn from a seeded subset of theirs
    far = torch.randn(4, 6, 5, 5) + 10
    joined = join_memory_bank(fit_memory_bank(f, size=30), far, reference=f, seed=0, fit_rows=30)
    assert torch.equal(joined[:30], fit_memory_bank(f, size=30).unique(dim=0))
    new_positions = {tuple(r) for r in far.permute(0, 2, 3, 1).reshape(-1, 6).tolist()}
    distinct = joined.unique(dim=0)
    assert 0 < len(distinct) - 30 <= 40 and len(joined) == 64  # padded to the search's blocks
    assert all(tuple(r) in new_positions for r in joined[30 : len(distinct)].tolist())


def test_a_join_beyond_its_rows_keeps_a_coreset_of_old_and_new_rows(caplog):
    g = torch.Generator().manual_seed(6)
    old = torch.randn(8, 4, 6, 6, generator=g)  # 288 positions in a bank of 64 distinct rows
    bank = fit_memory_bank(old, size=64)
    new = torch.randn(2, 4, 6, 6, generator=g) * 2 + 6  # a new mode, far from the old one and wider
    with caplog.at_level("WARNING", logger="adtr.memory_bank"):
        joined = join_memory_bank(bank, new, reference=old, max_rows=72, fit_rows=64)  # room for 8 rows: too few
    assert "the parent's parts lose rows" in caplog.text
    assert joined.shape == (72, 4) and len(joined.unique(dim=0)) == 72
    far = joined.mean(1) > 3  # rows of the new mode
    assert 8 < int(far.sum()) < 72  # both modes keep rows: a coreset covers both, the old lose some
    assert nearest_distance(new, joined).mean() < 0.5 * nearest_distance(new, bank).mean()
    old_rows = {tuple(r) for r in bank.tolist()}
    assert all(tuple(r) in old_rows for r in joined[~far].tolist())  # old rows come from the old bank


def test_the_bank_is_fixed_when_the_model_is_built():
    m = ADTR(NO_QUERY, ScoreConfig(nearest_map=False))
    assert not any(k.startswith("nearest_") for k in m.state_dict())
    with pytest.raises(ValueError, match="use with_score"):
        m.score_cfg = dataclasses.replace(m.score_cfg, nearest_map=True)
    with pytest.raises(ValueError, match="no memory bank"):
        m.set_memory_bank(torch.zeros(2, m.channels, *TINY.grid_size))
    with pytest.raises(ValueError, match="true, false or null"):
        ScoreConfig(nearest_map=1)
    on = ADTR(NO_QUERY, ScoreConfig(nearest_map=True))
    # Lite0's stride-2 and stride-4 stages (16 + 24 channels) are left out: PatchCore's stages
    assert on.nearest_first == 40 and on.state_dict()["nearest_bank"].shape == (BANK_SIZE, on.channels - 40)
    coarse = ADTR(dataclasses.replace(NO_QUERY, strides=(2, 4)), ScoreConfig(nearest_map=True))
    assert coarse.nearest_first == 0  # no stage at stride 8 or coarser: all of them
    with pytest.raises(ValueError, match="pass the features"):
        on.residual_grid(torch.zeros(1, on.channels, *TINY.grid_size))


TRAIN = TrainConfig(epochs=1, batch_size=4, val_fraction=0.25, query_fallback=None)


@pytest.fixture(scope="module")
def root(update_root):
    return update_root


def _standardised(m: ADTR, samples: list) -> torch.Tensor:
    from adtr.engine import extract_features

    return m.standardize(extract_features(m, samples, torch.device("cpu"), progress=False))


@pytest.mark.parametrize("use_query", [False, True])
def test_the_fit_joins_the_bank_to_a_copying_models_map_and_a_run_keeps_it(root, tmp_path, use_query, caplog):
    """No query (a copying model): the map is the reconstruction error plus the standardised
    nearest distance, the bank standardised on the held-out good images, saved, loaded to the
    same scores, joined by an update's new good images and kept by one with defects only. With
    the query: no bank, nothing stored. A run saved before the key reads False."""
    from adtr.data.mvtec import train_samples
    from adtr.data.splits import split_validation

    det = ADTRDetector(dataclasses.replace(TINY, use_query=use_query), train=TRAIN, progress=False,
                       backend="torch").fit(root)  # fmt: skip
    use = not use_query
    m = det.model_
    assert det.config.score.nearest_map is use and m.score_cfg.nearest_map is use
    f = m.standardize(m.extract(torch.rand(3, 3, 64, 64) * 255))
    with torch.no_grad():
        residual = m.residual(f)
        plain = m._grid_error(residual, m.position_mean, m.position_std)
        grid = m.residual_grid(residual, f)
        if use:
            d = nearest_distance(m.patch_features(f), m.nearest_bank, m.nearest_basis)
            torch.testing.assert_close(grid, plain + ((d - m.nearest_norm[0]) / m.nearest_norm[1]).clamp_min(0))
            assert not torch.equal(grid, plain)
            assert torch.equal(m.score(f).anomaly_map, m.score_maps(grid).anomaly_map)
            # 12 good images: cross-fitted, every one trains the run and none is held out, so the
            # bank is standardised on the second half's distances to a bank of the first
            good = m.patch_features(_standardised(m, train_samples(root)))
            assert torch.equal(m.nearest_bank, fit_memory_bank(good))
            dims = m.score_cfg.nearest_search_dims
            torch.testing.assert_close(m.nearest_basis, search_basis(m.nearest_bank, dims))
            half = fit_memory_bank(good[:6])
            d = nearest_distance(good[6:], half, search_basis(half, dims)).double()
            torch.testing.assert_close(m.nearest_norm, torch.stack([d.mean(), d.std()]).float())
            assert m.nearest_norm[0] > 10 * nearest_distance(good, m.nearest_bank).mean()  # not the biased one
            # with held-out good images: on their distances to the bank
            other = m.with_score(m.score_cfg)
            features = _standardised(m, train_samples(root))
            other.set_memory_bank(features[:9], held=features[9:])
            d = nearest_distance(good[9:], other.nearest_bank, other.nearest_basis).double()
            torch.testing.assert_close(other.nearest_norm, torch.stack([d.mean(), d.std()]).float())
        else:
            assert torch.equal(grid, plain)
    det.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["score"]["nearest_map"] is use
    with safe_open(str(tmp_path / "run" / WEIGHTS_FILE), "pt") as fh:
        assert ("nearest_bank" in fh.keys()) is use
    files = sorted((root / "new_good").iterdir())
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    want = [p.anomaly_score for p in det.predict(files)]
    assert [p.anomaly_score for p in loaded.predict(files)] == want
    if use:
        from adtr.data.folder import good_images

        new = m.patch_features(_standardised(m, good_images(root / "new_good")))
        before = nearest_distance(new, m.nearest_bank)
        updated = loaded.update(good=root / "new_good", steps=1)
        u = updated.model_
        assert updated.config.score.nearest_map and torch.equal(u.nearest_norm, m.nearest_norm)
        new_train, _ = split_validation(len(files), TRAIN.val_fraction, TRAIN.seed)
        # the new good training images' positions joined the bank: now (nearly) their own neighbours
        after = nearest_distance(new[new_train], u.nearest_bank)
        assert after.mean() < 0.5 * before[new_train].mean()
        # the joined bank is searched in its own subspace, not the parent's
        torch.testing.assert_close(u.nearest_basis, search_basis(u.nearest_bank, u.nearest_basis.shape[1]))
        assert not torch.allclose(u.nearest_basis, m.nearest_basis)
        # the parent's bank holds every position of its 64x64 images: refitted on them and the new
        # ones, every parent row kept (there is room), at the fit's rows; the run records them
        joined = {tuple(r) for r in u.nearest_bank.tolist()}
        assert all(tuple(r) in joined for r in m.nearest_bank.tolist())
        assert len(joined) > len(m.nearest_bank.unique(dim=0))
        assert u.score_cfg.nearest_bank_rows == updated.config.score.nearest_bank_rows == len(u.nearest_bank)
        updated.save(tmp_path / "updated")
        assert json.loads((tmp_path / "updated" / CONFIG_FILE).read_text())["score"]["nearest_bank_rows"] == len(
            u.nearest_bank)  # fmt: skip
        reloaded = ADTRDetector.load(tmp_path / "updated", progress=False, backend="torch")
        assert torch.equal(reloaded.model_.nearest_bank, u.nearest_bank)
        assert [p.anomaly_score for p in reloaded.predict(files)] == [p.anomaly_score for p in updated.predict(files)]
        calls = []
        crossed = ADTR.crossed_bank_residual

        def spy(self, features, *args):
            calls.append(len(features))
            return crossed(self, features, *args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ADTR, "crossed_bank_residual", spy)
            head = loaded.update(anomalies=root / "new_defects", steps=1)
        assert head.config.score.defect_head and torch.equal(head.model_.nearest_bank, m.nearest_bank)
        # 64x64 images: the small grids of the 12 good images (none held out) fit in the bank whole, so
        # the head's good tokens take their bank residual against a bank of the other half (0 in their own)
        assert calls == [len(train_samples(root))] and m.nearest_bank.unique(dim=0).shape[0] < BANK_SIZE
        # a parent whose settings say the head reads the residual alone (saved before the key): a
        # head fitted anew reads the bank too, as a fresh fit's does
        old = tmp_path / "old"
        shutil.copytree(tmp_path / "run", old)
        doc = json.loads((old / CONFIG_FILE).read_text())
        doc["score"]["head_bank_residual"] = False
        (old / CONFIG_FILE).write_text(json.dumps(doc))
        parent = ADTRDetector.load(old, progress=False, backend="torch")
        assert parent.config.score.head_bank_residual is False
        anew = parent.update(anomalies=root / "new_defects", steps=1)
        assert anew.config.score.head_bank_residual and anew.model_.head_reads_bank
        # the head fitted now reads the bank's residual beside the reconstruction residual
        h = head.model_
        assert h.head_reads_bank and h.head_weight.shape[1] == 2 * m.channels - m.nearest_first
        assert h.head_weight[0, m.channels :].abs().sum() > 0
        # a parent whose bank-reading head weighs 4 (given, or fitted before the bank's rule) keeps
        # it in an update that fits the head again, and the log says what a fresh fit would weigh
        import logging

        head.save(tmp_path / "head")
        four = head.update(anomalies=root / "new_defects", steps=1, head_gain=4.0)
        four.save(tmp_path / "four")
        with caplog.at_level(logging.INFO, logger="adtr"):
            again = four.update(anomalies=root / "new_defects", steps=1)
        assert again.config.score.head_gain == 4.0
        said = r"keeps the parent's weight 4 in the map; a fresh fit with these \d+ masked defects weighs it 1 "
        assert re.search(said, caplog.text)
    else:  # a run saved before the key: no bank
        doc = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
        del doc["score"]["nearest_map"]
        (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps(doc))
        assert ADTRDetector.load(tmp_path / "run", progress=False, backend="torch").config.score.nearest_map is False


def test_the_banks_map_exports_to_onnx(root, tmp_path):
    pytest.importorskip("onnxruntime")
    from adtr.export import export_run

    det = ADTRDetector(NO_QUERY, train=TRAIN, progress=False, backend="torch").fit(root)
    assert det.config.score.nearest_map
    parity = export_run(det, tmp_path / "m.onnx")
    assert parity.agrees, parity
    files = sorted((root / "new_good").iterdir())
    # PyTorch's predictions first: use_onnx switches this detector itself to the graph
    torch_out = det.predict(files)
    onnx = det.use_onnx(tmp_path / "m.onnx")
    assert onnx.backend_.name == "onnx"
    for a, b in zip(torch_out, onnx.predict(files), strict=True):
        assert abs(a.anomaly_score - b.anomaly_score) < 1e-4 + 1e-5 * abs(a.anomaly_score)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-3 * (1 + np.abs(a.anomaly_map).max())
    # with a defect head, which reads the bank's residual (its nearest row: an ArgMin and a Gather)
    det.save(tmp_path / "run")
    head = det.update(anomalies=root / "new_defects", steps=1)
    assert head.model_.head_reads_bank
    parity = export_run(head, tmp_path / "head.onnx")
    assert parity.agrees, parity
    torch_out = head.predict(files)
    onnx = head.use_onnx(tmp_path / "head.onnx")
    for a, b in zip(torch_out, onnx.predict(files), strict=True):
        assert abs(a.anomaly_score - b.anomaly_score) < 1e-4 + 1e-5 * abs(a.anomaly_score)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-3 * (1 + np.abs(a.anomaly_map).max())
    # a bank an update grew: more rows than a fit's, a multiple of the search's blocks or not
    g = torch.Generator().manual_seed(8)
    bank = det.model_.nearest_bank
    for rows in (BANK_SIZE + 64, BANK_SIZE + 5):
        extra = bank[torch.randint(len(bank), (rows - len(bank),), generator=g)]
        det.model_._set_bank(torch.cat([bank, extra + 0.1 * torch.randn(extra.shape, generator=g)]))
        assert det.model_.score_cfg.nearest_bank_rows == rows
        parity = export_run(det, tmp_path / f"grown{rows}.onnx")
        assert parity.agrees, parity


def test_the_cli_option_sets_it(run_cli, tiny_folder, tmp_path):
    from adtr import cli

    assert cli.build_parser().parse_args(["fit", "D", "--out", "R"]).nearest_map == "auto"
    for value, want in (("on", True), ("off", False)):
        code, _, err = run_cli("fit", tiny_folder, "--out", tmp_path / value, "--nearest-map", value, "--steps", "2",
                               "--image-size", "64", "--quiet")  # fmt: skip
        assert code == 0, err
        assert json.loads((tmp_path / value / CONFIG_FILE).read_text())["score"]["nearest_map"] is want


def test_a_training_state_saved_before_the_head_read_the_bank_resumes(tmp_path):
    """A state saved with a head on the residual alone (head_bank_residual False: before the key)
    and an exact search of the bank (no search basis: before nearest_search_dims) resumes into a
    model whose head reads the bank and whose bank is searched in a subspace: the settings match,
    the reconstructor's weights are restored, and the head's weights and the basis, set after
    training, are left to the fit. A state whose reconstructor differs is still refused."""
    from adtr.checkpoint import CheckpointError, load_train_state, save_train_state
    from adtr.config import RunConfig

    score = ScoreConfig(nearest_map=True, defect_head=True, head_gain=1.0)
    old_cfg = RunConfig(model=NO_QUERY, score=dataclasses.replace(score, head_bank_residual=False,
                                                                  nearest_search_dims=0), train=TRAIN)  # fmt: skip
    new_cfg = RunConfig(model=NO_QUERY, score=score, train=TRAIN)
    torch.manual_seed(0)
    old, new = ADTR(NO_QUERY, old_cfg.score), ADTR(NO_QUERY, new_cfg.score)
    assert old.head_weight.shape[1] < new.head_weight.shape[1]
    assert "nearest_basis" not in old.state_dict() and "nearest_basis" in new.state_dict()
    gen = torch.Generator().manual_seed(0)
    save_train_state(tmp_path, old, torch.optim.AdamW(old.reconstructor.parameters()), gen, 1, [], old_cfg)
    epoch, _ = load_train_state(tmp_path, new, torch.optim.AdamW(new.reconstructor.parameters()), gen, new_cfg)
    assert epoch == 1
    for k, v in old.reconstructor.state_dict().items():
        assert torch.equal(new.reconstructor.state_dict()[k], v)
    # any other tensor of another shape is still refused
    from safetensors.torch import load_file, save_file

    from adtr.checkpoint import FORMAT, STATE_WEIGHTS

    weights = tmp_path / STATE_DIR / STATE_WEIGHTS
    tensors = load_file(str(weights))
    tensors["model.position_mean"] = torch.zeros(1, 3, 3)
    save_file(tensors, str(weights), metadata={"format": FORMAT, "epoch": "1"})
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_train_state(tmp_path, new, torch.optim.AdamW(new.reconstructor.parameters()), gen, new_cfg)
