"""ADTR module: shapes, gradient flow, the query, scoring options."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adtr.config import MODEL_PRESETS, RECONSTRUCTOR_KINDS, ModelConfig, RunConfig, ScoreConfig
from adtr.model import (
    ADTR,
    RECONSTRUCTORS,
    TokenGridReconstructor,
    align_features,
    gaussian_kernel1d,
    map_image_score,
    shrunk_position_stats,
    upsample_map,
    upsample_matrix,
)
from adtr.transformer import ReconstructionTransformer

SMALL = ModelConfig(
    image_size=(64, 96), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, ffn_dim=64
)


def test_forward_shapes_follow_non_square_grid():
    m = ADTR(SMALL).eval()
    assert SMALL.grid_size == (4, 6)
    x = torch.rand(2, 3, 64, 96) * 255
    f = m.extract(x)
    assert f.shape == (2, 16 + 24 + 40 + 112, 4, 6)
    out = m(x)
    assert out.anomaly_map.shape == (2, 64, 96)
    assert out.anomaly_score.shape == (2,)
    # the map is the token error (B, h, w) interpolated and blurred: convex combinations of it
    with torch.no_grad():
        f_std = m.standardize(f)
        grid = torch.linalg.vector_norm(f_std - m.reconstructor(f_std), dim=1)
    assert grid.min() > 0
    assert out.anomaly_map.min() >= grid.min() - 1e-5 and out.anomaly_map.max() <= grid.max() + 1e-5


def test_gradients_reach_query_not_backbone():
    m = ADTR(SMALL)
    f = m.standardize(m.extract(torch.rand(2, 3, 64, 96) * 255))
    loss = ((m.reconstructor(f) - f) ** 2).mean()
    loss.backward()
    q = m.reconstructor.transformer.query_embed
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert m.reconstructor.transformer.pos_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.backbone.parameters())


def test_no_query_ablation_has_no_query_parameter():
    m = ADTR(dataclasses.replace(SMALL, use_query=False))
    assert m.reconstructor.transformer.query_embed is None
    f = torch.randn(1, m.channels, 4, 6)
    assert m.reconstructor(f).shape == f.shape


def test_neighbor_mask_keeps_a_token_from_reading_its_own_neighbourhood():
    # One decoder layer, no encoder layer: the output at a token depends on the input only
    # outside the 3x3 window around it (UniAD's neighbor masked attention). Deeper models can
    # still pass information around in two hops, as in UniAD.
    torch.manual_seed(0)
    t = ReconstructionTransformer(4 * 6, 16, 2, 32, 0, 1, 0.0, grid=(4, 6), neighbor_mask=3).eval()
    x = torch.randn(1, 24, 16)
    inside, outside = x.clone(), x.clone()
    inside[0, 1 * 6 + 2] += 5.0  # row 1, column 2: next to token (2, 3)
    outside[0, 0 * 6 + 0] += 5.0  # row 0, column 0: two rows and three columns away
    with torch.no_grad():
        out, out_in, out_out = t(x), t(inside), t(outside)
    token = 2 * 6 + 3
    assert torch.equal(out[0, token], out_in[0, token])
    assert not torch.allclose(out[0, token], out_out[0, token])
    with pytest.raises(ValueError, match="needs the learnable query"):
        ReconstructionTransformer(24, 16, 2, 32, 1, 1, 0.0, use_query=False, grid=(4, 6), neighbor_mask=3)
    # the same guarantee for UniAD's layer-wise query: both of its attentions are masked
    lq = ReconstructionTransformer(24, 16, 2, 32, 0, 1, 0.0, grid=(4, 6), neighbor_mask=3, layer_query=True).eval()
    with torch.no_grad():
        out, out_in, out_out = lq(x), lq(inside), lq(outside)
    assert torch.equal(out[0, token], out_in[0, token])
    assert not torch.allclose(out[0, token], out_out[0, token])


def test_the_querys_first_self_attention_runs_once_per_batch_outside_training():
    torch.manual_seed(0)
    t = ReconstructionTransformer(24, 16, 2, 32, 1, 2, 0.1, grid=(4, 6)).eval()
    x = torch.randn(5, 24, 16)
    calls = []
    hook = t.decoder[0].self_attn.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    with torch.no_grad():
        out = t(x)
        t.train()  # the same forward with the query expanded first: what training runs (dropout off here)
        for mod in t.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.eval()
        expanded = t(x)
    hook.remove()
    assert calls == [(1, 24, 16), (5, 24, 16)]  # once for the batch in eval; per image in training
    assert out.shape == (5, 24, 16) and torch.allclose(out, expanded, atol=1e-6)
    # and each image's output is the one it gets alone
    with torch.no_grad():
        t.eval()
        alone = torch.cat([t(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(out, alone, atol=1e-6)


def test_layer_query_gives_each_decoder_layer_its_own_query():
    m = ADTR(dataclasses.replace(SMALL, num_decoder_layers=2, layer_query=True))
    t = m.reconstructor.transformer
    assert t.query_embed is None
    f = m.standardize(m.extract(torch.rand(2, 3, 64, 96) * 255))
    ((m.reconstructor(f) - f) ** 2).mean().backward()
    queries = [layer.query_embed for layer in t.decoder]
    assert len(queries) == 2 and all(q.shape == (1, 24, 32) and q.grad.abs().sum() > 0 for q in queries)
    with pytest.raises(ValueError, match="needs use_query"):
        ADTR(dataclasses.replace(SMALL, use_query=False, layer_query=True))


def test_token_patch_puts_a_block_of_the_feature_grid_in_each_token():
    cfg = dataclasses.replace(SMALL, token_patch=2)
    assert cfg.grid_size == (8, 12) and cfg.feature_stride == 8  # residual and map at stride 8
    m = ADTR(cfg).eval()
    rec = m.reconstructor
    assert rec.transformer.pos_embed.shape[1] == 4 * 6  # tokens stay on the stride-16 grid
    assert rec.proj_in.in_channels == 4 * m.channels
    x = torch.rand(2, 3, 64, 96) * 255
    f = m.standardize(m.extract(x))
    assert f.shape == (2, m.channels, 8, 12)
    with torch.no_grad():
        out = rec(f)
        # With the transformer bypassed, a change at one feature position must reach exactly
        # the 2x2 block of its token: rows 2-3, cols 4-5 for position (3, 5) (token (1, 2)).
        rec.transformer.forward = lambda t: t  # type: ignore[method-assign]
        g = f.clone()
        g[:, :, 3, 5] += 10
        changed = (rec(g) - rec(f)).abs().amax(dim=(0, 1)) > 1e-6
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)
    assert out.shape == f.shape
    assert m(x).anomaly_map.shape == (2, 64, 96)
    with pytest.raises(ValueError, match="token_patch"):
        _ = dataclasses.replace(SMALL, token_patch=3).grid_size
    # an input size that is not a multiple of the largest stride still gives whole tokens
    assert dataclasses.replace(cfg, image_size=(72, 100)).grid_size == (8, 12)
    # The MLP and CNN have no tokens: they run on the finer feature grid itself.
    assert RECONSTRUCTOR_KINDS == tuple(RECONSTRUCTORS)  # the CLI's choices are the model's
    for kind in ("mlp", "cnn"):
        m = ADTR(dataclasses.replace(cfg, reconstructor=kind)).eval()
        with torch.no_grad():
            assert m.reconstructor(f).shape == f.shape
            assert m.residual_grid(m.residual(f)).shape == (2, 8, 12)  # the stride-8 grid
            assert m(x).anomaly_map.shape == (2, 64, 96)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_baseline_reconstructors_keep_shape(kind):
    m = ADTR(dataclasses.replace(SMALL, reconstructor=kind))
    f = torch.randn(2, m.channels, 4, 6)
    assert m.reconstructor(f).shape == f.shape


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_baseline_feature_dropout_noises_training_only(kind):
    model = ADTR(dataclasses.replace(SMALL, reconstructor=kind, feature_dropout=0.5))
    m, f = model.reconstructor, torch.randn(2, model.channels, 4, 6)
    with torch.no_grad():
        m.train()
        torch.manual_seed(0)
        a = m(f)
        assert not torch.equal(a, m(f))  # a fresh mask per call
        m.eval()
        assert torch.equal(m(f), m(f))
        # eval is the clean input through the same weights: the dropout is an identity there
        assert torch.allclose(m(f), m.net(f))


def test_image_scorer_is_stored_only_in_runs_that_have_one():
    with_scorer = ADTR(dataclasses.replace(SMALL, image_scorer="cnn")).state_dict()
    plain = ADTR(SMALL).state_dict()
    scorer_keys = {k for k in with_scorer if k.startswith(("image_scorer.", "scorer_"))}
    assert {"scorer_residual_scale", "scorer_position_mean", "scorer_position_std"} < scorer_keys
    assert set(with_scorer) - scorer_keys == set(plain)  # runs saved before it load unchanged
    assert MODEL_PRESETS["cpu"].image_scorer == "cnn" and ModelConfig().image_scorer is None
    assert RunConfig.from_dict({"schema_version": 1, "model": {}}).model.image_scorer is None
    with pytest.raises(ValueError, match="image_scorer"):
        ModelConfig(image_scorer="transformer")
    with pytest.raises(ValueError, match="this model has no image scorer"):
        ADTR(SMALL).scorer_grid(torch.zeros(1, 1, 1, 1))


def test_a_defect_head_with_head_image_score_map_keeps_the_image_score_on_the_map():
    score = ScoreConfig(defect_head=True, head_gain=1.0, head_image_score="map")
    m = ADTR(dataclasses.replace(SMALL, image_scorer="cnn"), score).eval()
    m.head_weight.normal_()
    f = torch.randn(2, m.channels, 4, 6)
    with torch.no_grad():
        out = m.score(f)
    expected = map_image_score(out.anomaly_map[:, None], m.score_cfg, m.cfg.image_size)
    assert torch.equal(out.anomaly_score, expected) and not m.uses_image_scorer
    # the default: the scorer's map joined with the head scores the image, the map stays the head's
    scored = m.with_score(dataclasses.replace(score, head_image_score="scorer"))
    with torch.no_grad():
        other = scored.score(f)
    assert scored.uses_image_scorer and torch.equal(other.anomaly_map, out.anomaly_map)
    assert not torch.allclose(other.anomaly_score, out.anomaly_score)


def test_paper_preset_is_spec_section_1():
    p = MODEL_PRESETS["paper"]
    assert (p.hidden_dim, p.num_encoder_layers, p.num_decoder_layers, p.num_heads, p.ffn_dim, p.dropout) == (
        256,
        4,
        4,
        8,
        1024,
        0.1,
    )
    assert p.strides == (2, 4, 8, 16) and p.use_query


def test_image_score_options():
    m = ADTR(SMALL, ScoreConfig(smoothing_sigma=0, image_score="mean")).eval()
    grid = torch.zeros(1, 4, 6)
    grid[0, 1, 2] = 6.0
    out = m.score_maps(grid)
    assert out.anomaly_score.item() == pytest.approx(out.anomaly_map.mean().item())
    m2 = ADTR(SMALL, ScoreConfig(smoothing_sigma=0, image_score="max_pool", pool_size=1)).eval()
    assert m2.score_maps(grid).anomaly_score.item() == pytest.approx(m2.score_maps(grid).anomaly_map.max().item())


def test_pooled_residual_score_is_the_norm_of_the_mean_residual():
    m = ADTR(SMALL, ScoreConfig(smoothing_sigma=0, image_score="pooled_residual")).eval()
    # Two images with the same per-token error norms (3 everywhere): in the first all tokens
    # err in one direction, in the second the errors of neighbouring tokens cancel.
    same = torch.zeros(2, 2, 4, 6)
    same[0, 0] = 3.0
    same[1, 0] = 3.0 * torch.tensor([1.0, -1.0]).repeat(12).view(4, 6)
    out = m.score_maps(same.norm(dim=1), same)
    assert torch.allclose(out.anomaly_map, torch.full_like(out.anomaly_map, 3.0))
    assert out.anomaly_score.tolist() == pytest.approx([3.0, 0.0])
    with pytest.raises(ValueError, match="needs the feature residual"):
        m.score_maps(same.norm(dim=1))


def test_smoothing_preserves_mass_of_a_constant_map():
    m = ADTR(SMALL, ScoreConfig(smoothing_sigma=4)).eval()
    out = m.score_maps(torch.full((1, 4, 6), 2.0))
    assert torch.allclose(out.anomaly_map, torch.full_like(out.anomaly_map, 2.0), atol=1e-5)


def test_config_round_trip_and_unknown_keys():
    cfg = RunConfig(model=SMALL)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    bad = cfg.to_dict()
    bad["model"]["hiden_dim"] = 3
    with pytest.raises(ValueError, match="hiden_dim"):
        RunConfig.from_dict(bad)


class _ZeroReconstructor(torch.nn.Module):
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(f)


def test_residual_scale_is_the_per_channel_rms_of_the_training_residual():
    m = ADTR(SMALL, ScoreConfig(smoothing_sigma=0)).eval()
    m.reconstructor = _ZeroReconstructor()  # residual = f, so the scale is each channel's RMS
    c, (h, w) = m.channels, SMALL.grid_size
    f = torch.randn(5, c, h, w, generator=torch.Generator().manual_seed(0))
    f *= torch.arange(1, c + 1, dtype=torch.float32).view(1, c, 1, 1)  # channel k has RMS about k + 1
    m.set_residual_scale(f, batch_size=2)  # batches must add up to the whole-set RMS
    torch.testing.assert_close(m.residual_scale.flatten(), f.pow(2).mean(dim=(0, 2, 3)).sqrt())
    # After the division every channel weighs the same: the map of the training features is about 1.
    grid = torch.linalg.vector_norm(f / m.residual_scale, dim=1).pow(2).mean() / c
    assert float(grid) == pytest.approx(1.0, rel=1e-4)
    assert "residual_scale" in m.state_dict()


def test_runs_without_residual_norm_keep_the_plain_residual():
    old = RunConfig(model=SMALL).to_dict()
    del old["score"]["residual_norm"]  # a config.json written before the key existed
    cfg = RunConfig.from_dict(old)
    assert cfg.score.residual_norm == "none"
    m = ADTR(cfg.model, cfg.score)
    assert "residual_scale" not in m.state_dict()  # so its weights file still matches
    assert bool((m.residual_scale == 1).all())
    with pytest.raises(ValueError, match="residual_norm"):
        ScoreConfig(residual_norm="stage")
    # the smoothing of a config without the key is the sigma 4 of its time; a saved one is kept
    del old["score"]["smoothing_sigma"]
    assert RunConfig.from_dict(old).score.smoothing_sigma == 4.0 != ScoreConfig().smoothing_sigma
    old["score"]["smoothing_sigma"] = 1.5
    assert RunConfig.from_dict(old).score.smoothing_sigma == 1.5


def test_channel_position_standardises_the_grid_error_per_position():
    m = ADTR(SMALL, ScoreConfig(smoothing_sigma=0, residual_norm="channel_position")).eval()
    m.reconstructor = _ZeroReconstructor()
    c, (h, w) = m.channels, SMALL.grid_size
    f = torch.randn(6, c, h, w, generator=torch.Generator().manual_seed(3))
    f[:, :, 0, 0] *= 5  # one position errs much more on every good image
    m.set_residual_scale(f, batch_size=4)
    grids = torch.linalg.vector_norm(f / m.residual_scale, dim=1)  # (6, h, w)
    mean = 0.5 * grids.mean(0) + 0.5 * grids.mean()
    std = (0.5 * grids.var(0) + 0.5 * grids.var()).sqrt()
    torch.testing.assert_close(m.position_mean[0], mean)
    torch.testing.assert_close(m.position_std[0], std)
    out = m.score(f)
    # The map is the positive part of the standardised error, so position (0, 0) no longer
    # dominates the training images' maps as it does in the plain grid error.
    expected = ((grids - mean) / std).clamp_min(0)
    torch.testing.assert_close(out.anomaly_map, m.score_maps(expected).anomaly_map)
    assert {"residual_scale", "position_mean", "position_std"} <= set(m.state_dict())


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_the_image_scorer_weighs_its_per_position_statistics_by_scorer_position_weight(weight):
    """The scorer's grid error is standardised with its per-position training statistics
    weighted scorer_position_weight (the whole grid's 1 - w); the map's are weighted
    min(0.5, w) (map_position_weight unset: it follows the scorer's, at most half and half)."""
    class OddChannels(torch.nn.Module):  # rebuilds the even channels exactly: residual in the odd ones only
        def forward(self, f: torch.Tensor) -> torch.Tensor:
            out = f.clone()
            out[:, 1::2] = 0
            return out

    m = ADTR(dataclasses.replace(SMALL, image_scorer="cnn"), ScoreConfig(scorer_position_weight=weight)).eval()
    m.reconstructor, m.image_scorer = _ZeroReconstructor(), OddChannels()
    f = torch.randn(6, m.channels, *SMALL.grid_size, generator=torch.Generator().manual_seed(3))
    f[:, :, 0, 0] *= 5
    f[:, 1::2, 1, 1] *= 9  # the scorer's residual has a position of its own
    m.set_residual_scale(f, batch_size=4)
    map_grids = torch.linalg.vector_norm(f / m.residual_scale, dim=1)
    scorer_grids = torch.linalg.vector_norm(f[:, 1::2] / m.scorer_residual_scale[:, 1::2], dim=1)
    for buf_mean, buf_std, grids, w in ((m.scorer_position_mean, m.scorer_position_std, scorer_grids, weight),
                                        (m.position_mean, m.position_std, map_grids, min(0.5, weight))):  # fmt: skip
        torch.testing.assert_close(buf_mean[0], w * grids.mean(0) + (1 - w) * grids.mean())
        torch.testing.assert_close(buf_std[0], (w * grids.var(0) + (1 - w) * grids.var()).sqrt())
    assert m.score_cfg.map_position_weight == min(0.5, weight)  # recorded for the run's config
    old = RunConfig.from_dict({"schema_version": 1, "score": {"residual_norm": "channel_position"}})
    assert old.score.scorer_position_weight == 0.5  # runs saved before the setting: half and half
    assert old.score.map_position_weight == 0.5
    for bad in (1.5, -0.1, True, "1"):
        with pytest.raises(ValueError, match="scorer position weight"):
            ScoreConfig(scorer_position_weight=bad)
        with pytest.raises(ValueError, match="map position weight"):
            ScoreConfig(map_position_weight=bad)


@pytest.mark.parametrize(("scorer", "scorer_weight", "map_weight", "expected"), [
    ("cnn", 0.0, None, 0.0),  # parts anywhere: no per-position statistics in the map either
    ("cnn", 0.75, None, 0.5),  # aligned parts: the map keeps half and half
    (None, None, None, 0.5),  # no image scorer to follow
    ("cnn", 0.0, 0.75, 0.75),  # a weight given is used as it is
])  # fmt: skip
def test_the_maps_position_weight_follows_the_image_scorers_chosen_weight(scorer, scorer_weight, map_weight, expected):
    """map_position_weight None: set_residual_scale takes min(0.5, the scorer's weight), weighs
    the map's per-position statistics with it and records it; a number is used as it is."""
    m = ADTR(dataclasses.replace(SMALL, image_scorer=scorer),
             ScoreConfig(scorer_position_weight=scorer_weight, map_position_weight=map_weight)).eval()  # fmt: skip
    m.reconstructor = _ZeroReconstructor()
    if scorer is not None:
        m.image_scorer = _ZeroReconstructor()
    f = torch.randn(6, m.channels, *SMALL.grid_size, generator=torch.Generator().manual_seed(4))
    f[:, :, 1, 2] *= 6  # a position of its own, so that the weights give different statistics
    m.set_residual_scale(f, batch_size=4)
    assert m.score_cfg.map_position_weight == expected
    grids = torch.linalg.vector_norm(f / m.residual_scale, dim=1)
    mean, var = shrunk_position_stats(grids, expected)
    torch.testing.assert_close(m.position_mean[0], mean)
    torch.testing.assert_close(m.position_std[0], var.sqrt())
    other, _ = shrunk_position_stats(grids, 0.5 if expected != 0.5 else 0.0)
    assert not torch.allclose(m.position_mean[0], other)  # the weight shows in the statistics


def test_the_position_weight_is_chosen_on_held_out_images_aligned_parts_per_position():
    """choose_position_weight: grid errors with a fixed pattern over positions (an aligned part)
    choose the per-position statistics; errors without one (a part anywhere) the grid's."""
    from adtr.model import choose_position_weight

    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(4, 6, generator=g) * 5
    aligned = pattern + 0.3 * torch.randn(30, 4, 6, generator=g)
    assert choose_position_weight(aligned[:20], aligned[20:]) == 1.0
    anywhere = torch.rand(30, 4, 6, generator=g) * 5
    assert choose_position_weight(anywhere[:20], anywhere[20:]) <= 0.25


def test_an_unset_scorer_position_weight_is_chosen_and_recorded_by_set_residual_scale():
    """score.scorer_position_weight None: set_residual_scale chooses it on the held-out features
    and records it in score_cfg (the run's config); without held-out images it is 0.5."""
    assert ScoreConfig().scorer_position_weight is None
    m = ADTR(dataclasses.replace(SMALL, image_scorer="cnn")).eval()
    m.reconstructor, m.image_scorer = _ZeroReconstructor(), _ZeroReconstructor()
    g = torch.Generator().manual_seed(3)
    f = torch.randn(12, m.channels, *SMALL.grid_size, generator=g) * 0.3
    f[:, :, 0, 0] += 4  # every good image errs far more at one position: an aligned part
    m.set_residual_scale(f[:8], held=f[8:])
    assert m.score_cfg.scorer_position_weight == 1.0
    grids = torch.linalg.vector_norm(f[:8] / m.scorer_residual_scale, dim=1)
    torch.testing.assert_close(m.scorer_position_mean[0], grids.mean(0))
    alone = ADTR(dataclasses.replace(SMALL, image_scorer="cnn")).eval()
    alone.set_residual_scale(f[:8])
    assert alone.score_cfg.scorer_position_weight == 0.5


def test_an_unset_maps_position_weight_follows_the_weight_the_scorer_chooses():
    """With both weights unset the scorer's is chosen first (on held-out grids whose error lies
    anywhere: a small weight), then the map takes min(0.5, it); a scorer that scores nothing
    (pooled_residual: the reconstructor scores the image) leaves the map at 0.5."""
    g = torch.Generator().manual_seed(5)
    channels = ADTR(SMALL).channels
    f = torch.randn(24, channels, *SMALL.grid_size, generator=g) * 0.3
    h, w = SMALL.grid_size
    for i in range(len(f)):  # each good image errs at a position of its own: parts anywhere
        f[i, :, torch.randint(h, (1,), generator=g), torch.randint(w, (1,), generator=g)] += 4
    for image_score, expected in (("top_mean", None), ("pooled_residual", 0.5)):
        m = ADTR(dataclasses.replace(SMALL, image_scorer="cnn"), ScoreConfig(image_score=image_score)).eval()
        m.reconstructor, m.image_scorer = _ZeroReconstructor(), _ZeroReconstructor()
        m.set_residual_scale(f[:16], held=f[16:])
        chosen = m.score_cfg.scorer_position_weight
        if expected is None:
            assert chosen < 0.5  # the case where following the scorer matters
            expected = chosen
        assert m.score_cfg.map_position_weight == expected, image_score
        grids = torch.linalg.vector_norm(f[:16] / m.residual_scale, dim=1)
        torch.testing.assert_close(m.position_mean[0], shrunk_position_stats(grids, expected)[0])


def test_cli_image_scorer_option_keeps_the_presets_unless_given():
    from adtr.cli import _image_scorer

    cpu, paper = MODEL_PRESETS["cpu"], MODEL_PRESETS["paper"]
    assert (_image_scorer(None, cpu), _image_scorer(None, paper)) == ("cnn", None)
    assert (_image_scorer("off", cpu), _image_scorer("mlp", paper)) == (None, "mlp")


def _interpolate_then_blur(grid: torch.Tensor, size: tuple[int, int], kernel: torch.Tensor) -> torch.Tensor:
    """The map as SPEC section 1 states it: bilinear to size, then a reflect-padded 2-D Gaussian."""
    m = F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)
    r = kernel.numel() // 2
    k2 = kernel[:, None] * kernel[None, :]
    return F.conv2d(F.pad(m, (r, r, r, r), mode="reflect"), k2.view(1, 1, *k2.shape))


@pytest.mark.parametrize(("grid", "size", "sigma"), [((16, 16), (256, 256), 4.0), ((8, 20), (256, 640), 4.0),
                                                     ((5, 7), (33, 47), 2.0)])  # fmt: skip
def test_upsample_map_is_interpolation_then_gaussian(grid, size, sigma):
    g = torch.rand(3, *grid, generator=torch.Generator().manual_seed(0))
    want = _interpolate_then_blur(g, size, gaussian_kernel1d(sigma))
    got = upsample_map(g, size, gaussian_kernel1d(sigma))
    assert got.shape == (3, 1, *size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # without a kernel: the bilinear interpolation alone
    plain = F.interpolate(g[:, None], size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_map(g, size, None), plain, atol=1e-6, rtol=0)


def test_upsample_matrix_keeps_constants_and_refuses_wide_kernels():
    # interpolation and a normalised kernel with reflect padding keep a constant map constant
    a = upsample_matrix(16, 256, gaussian_kernel1d(4.0))
    assert a.shape == (256, 16)
    torch.testing.assert_close(a.sum(1), torch.ones(256))
    with pytest.raises(ValueError, match="radius 16 must be below the map size 16"):
        upsample_matrix(4, 16, gaussian_kernel1d(4.0))


def test_model_map_uses_the_upsampling_of_its_score_settings():
    cfg = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=(64, 96))
    model = ADTR(cfg, ScoreConfig(smoothing_sigma=2.0)).eval()
    grid = torch.rand(2, *cfg.grid_size)
    torch.testing.assert_close(model.upsample(grid), _interpolate_then_blur(grid, (64, 96), gaussian_kernel1d(2.0)),
                               atol=1e-5, rtol=0)  # fmt: skip
    unsmoothed = ADTR(cfg, ScoreConfig(smoothing_sigma=0.0))
    plain = F.interpolate(grid[:, None], size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(unsmoothed.upsample(grid), plain, atol=1e-6, rtol=0)


def test_image_scorer_runs_on_the_token_grid_of_a_finer_map():
    cfg = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=(64, 96), token_patch=2)
    model = ADTR(cfg).eval()
    assert isinstance(model.image_scorer, TokenGridReconstructor)
    assert model.scorer_position_mean.shape == (1, *cfg.grid_size) == (1, 8, 12)
    f = torch.randn(2, model.channels, *cfg.grid_size)
    with torch.no_grad():
        residual = f - model.image_scorer(f)
        pooled = torch.nn.functional.avg_pool2d(f, 2)
        want = pooled - model.image_scorer.inner(pooled)  # the token grid's residual (2, C, 4, 6)
    # every position of a 2 x 2 block carries its block's residual
    for dy in (0, 1):
        for dx in (0, 1):
            torch.testing.assert_close(residual[:, :, dy::2, dx::2], want, atol=1e-5, rtol=0)
    # the map keeps the finer grid; the scorer's weights are those of a CNN on the token grid
    assert model.score(f).anomaly_map.shape == (2, 64, 96)
    coarse = ADTR(dataclasses.replace(cfg, token_patch=1))
    inner = {k.removeprefix("image_scorer.inner."): v.shape for k, v in model.state_dict().items()
             if k.startswith("image_scorer.")}  # fmt: skip
    plain = {k.removeprefix("image_scorer."): v.shape for k, v in coarse.state_dict().items()
             if k.startswith("image_scorer.")}  # fmt: skip
    assert inner == plain


def test_token_patch_reconstructor_equals_the_pixel_shuffle_formulation():
    # ModelConfig.token_patch: tokens are p x p blocks (pixel unshuffle, 1x1 projections, pixel
    # shuffle back); the model runs the same maps as strided (transposed) convolutions
    cfg = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=(64, 96), token_patch=2)
    rec = ADTR(cfg).eval().reconstructor
    torch.nn.init.normal_(rec.proj_out.bias)  # a bias per offset (i, j), not one per channel
    f = torch.randn(2, rec.proj_in.in_channels // 4, *cfg.grid_size)
    with torch.no_grad():
        x = F.pixel_unshuffle(f, 2)
        b, _, h, w = x.shape
        tokens = rec.transformer(rec.proj_in(x).flatten(2).transpose(1, 2))
        want = F.pixel_shuffle(rec.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w)), 2)
        got = rec(f)
    assert got.shape == f.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_changed_score_settings_change_the_maps_smoothing():
    cfg = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=(64, 96))
    model = ADTR(cfg, ScoreConfig(smoothing_sigma=2.0)).eval()
    grid = torch.rand(2, *cfg.grid_size)
    plain = F.interpolate(grid[:, None], size=(64, 96), mode="bilinear", align_corners=False)
    # a copy with other score settings, and the settings set in place (bench/cifar10_sweep.py)
    copy = model.with_score(ScoreConfig(smoothing_sigma=0.0))
    torch.testing.assert_close(copy.upsample(grid), plain, atol=1e-6, rtol=0)
    model.score_cfg = ScoreConfig(smoothing_sigma=0.0)
    torch.testing.assert_close(model.upsample(grid), plain, atol=1e-6, rtol=0)
    model.score_cfg = ScoreConfig(smoothing_sigma=2.0)
    want = _interpolate_then_blur(grid, (64, 96), gaussian_kernel1d(2.0))
    torch.testing.assert_close(model.upsample(grid), want, atol=1e-5, rtol=0)


def test_presets_token_patch():
    assert MODEL_PRESETS["cpu"].token_patch == 2 and MODEL_PRESETS["paper"].token_patch == 1


def test_feature_pool_averages_each_position_with_its_neighbourhood():
    """feature_pool 3: each position is the mean of the 3x3 block around it in the aligned
    features, the border the mean of the positions it has (PatchCore's local aggregation)."""
    torch.manual_seed(0)
    plain = ADTR(ModelConfig(image_size=(64, 96), align="area", token_patch=2)).eval()
    pooled = ADTR(dataclasses.replace(plain.cfg, feature_pool=3)).eval()
    images = torch.rand(2, 3, 64, 96) * 255
    f, g = plain.extract(images), pooled.extract(images)
    assert g.shape == f.shape == (2, plain.channels, 8, 12)
    torch.testing.assert_close(g[:, :, 3, 5], f[:, :, 2:5, 4:7].mean(dim=(2, 3)))  # inside: 9 positions
    torch.testing.assert_close(g[:, :, 0, 0], f[:, :, :2, :2].mean(dim=(2, 3)))  # a corner: 4
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(feature_pool=2)


def test_feature_pool_off_keeps_the_fingerprint_of_runs_saved_before():
    """feature_pool 1 (off) is left out of the fingerprint, so graphs exported before the
    setting existed stay valid; any other value changes it."""
    import json

    from adtr.checkpoint import _state_hash, model_fingerprint

    cfg = ModelConfig(image_size=(64, 64), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4,
                      ffn_dim=64)  # fmt: skip
    torch.manual_seed(0)
    model = ADTR(cfg)
    pooled = ADTR(dataclasses.replace(cfg, feature_pool=3))
    pooled.load_state_dict(model.state_dict())
    assert model_fingerprint(pooled) != model_fingerprint(model)
    # the fingerprint as computed before the setting existed: settings without the key
    model_settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "feature_pool"}
    added = ("head_gain", "head_image_score", "head_image_gain", "scorer_position_weight", "map_position_weight",
             "feature_gaussian", "nearest_map", "head_bank_residual", "nearest_search_dims", "nearest_bank_rows")
    score = {k: v for k, v in dataclasses.asdict(model.score_cfg).items() if k not in added}
    before = json.dumps({"model": model_settings, "score": score}, sort_keys=True)
    assert model_fingerprint(model) == _state_hash(model.state_dict(), before.encode())


def test_align_features_area_averages_and_max_keeps_a_response_smaller_than_a_cell():
    # one hot entry in a stride-2 map (8x8) brought to a 2x2 grid: area divides it by the
    # cell's 16 entries, max keeps it whole; a coarser map (1x2) is upsampled bilinearly by both
    fine = torch.zeros(1, 1, 8, 8)
    fine[0, 0, 5, 2] = 16.0
    coarse = torch.tensor([[[[0.0, 4.0]]]])
    upsampled = torch.tensor([[0.0, 4.0], [0.0, 4.0]])
    for mode, hot in (("area", 1.0), ("max", 16.0)):
        out = align_features([fine, coarse], (2, 2), mode)
        assert out.shape == (1, 2, 2, 2)
        expected = torch.zeros(2, 2)
        expected[1, 0] = hot
        assert torch.equal(out[0, 0], expected)
        assert torch.equal(out[0, 1], upsampled)
    with pytest.raises(ValueError, match="unknown feature alignment"):
        align_features([fine], (2, 2), "median")
    with pytest.raises(ValueError, match="align must be one of"):
        ModelConfig(align="median")
