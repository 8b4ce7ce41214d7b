"""The training budget, schedule, losses and settings added for quality on harder sets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adtr.config import ModelConfig, RunConfig, ScoreConfig, TrainConfig, steps_for, with_overrides
from adtr.data.transforms import input_size_for
from adtr.engine import lr_factor, planned_epochs, use_bf16
from adtr.losses import reconstruction_loss
from adtr.transformer import Attention


def test_steps_become_whole_epochs():
    cfg = TrainConfig(steps=300, batch_size=16)
    assert planned_epochs(188, cfg) == 25  # 12 steps per epoch -> 300 / 12 = 25
    assert planned_epochs(49, cfg) == 75  # 4 steps per epoch
    assert planned_epochs(5000, cfg) == 1  # one epoch is already more than the budget
    assert planned_epochs(188, TrainConfig(steps=300, epochs=3)) == 3  # epochs override steps


def test_a_larger_input_trains_proportionally_fewer_steps():
    cfg = TrainConfig()  # 200 steps counted at 256x256
    assert steps_for(cfg, (256, 256)) == 200 and steps_for(cfg, None) == 200
    assert steps_for(cfg, (128, 128)) == 200  # a smaller input keeps the budget
    assert steps_for(cfg, (224, 544)) == 108  # bsdata: 200 x 65536 / 121856 = 107.6, rounded up
    assert steps_for(cfg, (512, 512)) == 50  # a quarter of the steps at four times the pixels
    assert steps_for(TrainConfig(step_pixels=None), (224, 544)) == 200  # off
    assert steps_for(TrainConfig(steps=1), (2048, 2048)) == 1  # never below one step
    assert planned_epochs(360, cfg, (224, 544)) == 5  # 23 steps per epoch: 108 -> 5 epochs (115 steps)
    assert planned_epochs(360, cfg) == 9  # 200 -> 9 epochs
    assert planned_epochs(360, TrainConfig(epochs=7), (224, 544)) == 7  # epochs override both
    for bad in (0, -1, 1.5, True, "65536"):
        with pytest.raises(ValueError, match="step pixels"):
            TrainConfig(step_pixels=bad)


def test_runs_saved_before_step_pixels_read_it_as_off_and_their_states_resume_where_the_plan_is_the_same():
    from adtr.checkpoint import _training_settings

    doc = RunConfig(ModelConfig(image_size=(256, 256))).to_dict()
    assert doc["train"]["step_pixels"] == 256 * 256
    old = json_copy(doc)
    del old["train"]["step_pixels"]
    assert RunConfig.from_dict(old).train.step_pixels is None
    assert _training_settings(old) == _training_settings(doc)  # 256x256: 200 steps either way
    for d in (old, doc):
        d["model"]["image_size"] = [224, 544]
    assert _training_settings(old) != _training_settings(doc)  # 200 steps against 108
    assert _training_settings(old)["train"]["reconstructor_steps"] == 200
    for d in (old, doc):  # with epochs given, step_pixels plans nothing
        d["train"]["epochs"] = 3
    assert _training_settings(old) == _training_settings(doc)


def json_copy(doc: dict) -> dict:
    import json

    return json.loads(json.dumps(doc))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(schedule="cosine", warmup_fraction=0.1)
    per_epoch, epochs = 10, 10  # 100 steps, 10 of warm-up
    f = [lr_factor(s, per_epoch, epochs, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[99] < 0.001
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # monotone decay after warm-up


def test_step_schedule_is_the_previous_one():
    cfg = TrainConfig(schedule="step", warmup_epochs=2, lr_drop_at=0.8)
    per_epoch, epochs = 5, 10
    assert lr_factor(0, per_epoch, epochs, cfg) == pytest.approx(0.5)  # epoch 1 of 2 warm-up epochs
    assert lr_factor(5, per_epoch, epochs, cfg) == pytest.approx(1.0)
    assert lr_factor(39, per_epoch, epochs, cfg) == pytest.approx(1.0)  # epoch 8
    assert lr_factor(40, per_epoch, epochs, cfg) == pytest.approx(0.1)  # epoch 9: dropped
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 1, 1, TrainConfig(schedule="linear"))


def test_input_size_keeps_the_aspect_ratio():
    assert input_size_for([(900, 900), (900, 900)]) == (256, 256)
    assert input_size_for([(460, 1130)] * 3) == (224, 544)  # bsdata: short side 256 would pass the cap
    assert input_size_for([(1130, 460)]) == (544, 224)  # portrait
    assert input_size_for([(480, 640)]) == (256, 352)  # 4:3 under the cap keeps the short side 256
    assert input_size_for([(500, 1000)]) == (224, 448)  # 2:1: 256x512 would pass the cap
    assert input_size_for([(460, 1130)], max_pixels=256 * 256) == (160, 384)  # a smaller cap, less
    h, w = input_size_for([(300, 2000)])
    assert h % 32 == 0 and w % 32 == 0 and abs(w / h - 2000 / 300) / (2000 / 300) < 0.25
    for ratio in (1.1, 1.5, 1.99, 2.0, 2.01, 3.0, 4.0, 5.1, 8.0, 20.0, 100.0):
        h, w = input_size_for([(1000, round(1000 * ratio))])
        assert h * w <= 120 * 1024, (ratio, h, w)  # never past the cap, whatever the rounding
        assert min(h, w) <= 256 and min(h, w) % 32 == 0 and max(h, w) % 32 == 0
        if ratio <= 1.5:
            assert min(h, w) == 256, (ratio, h, w)  # under the cap: the square image's short side
    assert input_size_for([(10, 10000)]) == (32, 32000)  # 1000:1 keeps the smallest short side, past the cap
    with pytest.raises(ValueError):
        input_size_for([])


def test_overrides_set_fields_and_refuse_unknown_names():
    cfg = with_overrides(RunConfig(), {"steps": 123, "hidden_dim": 64, "image_score": "top_mean", "strides": [4, 8]})
    assert cfg.train.steps == 123 and cfg.model.hidden_dim == 64 and cfg.score.image_score == "top_mean"
    assert cfg.model.strides == (4, 8)
    assert RunConfig().train.steps != 123  # the original is untouched
    with pytest.raises(ValueError, match="unknown setting 'hiddendim'"):
        with_overrides(RunConfig(), {"hiddendim": 64})


def test_hard_loss_weights_easy_positions_down():
    f = torch.zeros(1, 2, 1, 10)
    f_hat = torch.zeros(1, 2, 1, 10)
    f_hat[0, :, 0, 9] = 3.0  # one hard position: squared error 9, the nine others 0
    f_hat[0, :, 0, :9] = 1.0  # easy positions: squared error 1
    # quantile 0.9 of [1]*9 + [9] is 1.8: only the last is hard; (9 + 0.1 * 9) / (1 + 0.1 * 9)
    assert reconstruction_loss(f, f_hat, "hard", 0.9, 0.1).item() == pytest.approx(9.9 / 1.9)
    assert reconstruction_loss(f, f_hat, "mse").item() == pytest.approx((9 * 1 + 9) / 10)
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        reconstruction_loss(f, f_hat, "l1")


def test_attention_matches_torch_multihead_attention_and_loads_its_weights():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = Attention(32, 4).eval()
    ours.load_state_dict(reference.state_dict())  # a checkpoint from before the switch loads
    q, k = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    expected = reference(q, k, k, need_weights=False)[0]
    assert torch.allclose(ours(q, k, k), expected, atol=1e-5)


def test_precision_is_resolved_per_device():
    cpu = torch.device("cpu")
    assert use_bf16(TrainConfig(precision="fp32"), cpu) is False
    assert use_bf16(TrainConfig(precision="bf16"), cpu) is True
    assert use_bf16(TrainConfig(precision="auto"), cpu) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with pytest.raises(ValueError, match="precision"):
        use_bf16(TrainConfig(precision="fp16"), cpu)


def test_top_mean_image_score():
    from adtr.model import ADTR

    model = ADTR(ModelConfig(image_size=(64, 64), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                             num_heads=4, ffn_dim=64), ScoreConfig(image_score="top_mean", top_fraction=0.25,
                                                                    smoothing_sigma=0))  # fmt: skip
    grid = torch.zeros(1, 4, 4)
    grid[0, 0, :] = 8.0  # the top quarter of the grid
    out = model.score_maps(grid)
    # bilinear upsampling of a 4x4 grid to 64x64: the top quarter of the pixels average below 8
    expected = out.anomaly_map.flatten().topk(64 * 64 // 4).values.mean()
    assert out.anomaly_score.item() == pytest.approx(expected.item())
    assert 4.0 < out.anomaly_score.item() < 8.0


@pytest.mark.parametrize("bad", [{"steps": 0}, {"epochs": 0}, {"batch_size": 0}, {"lr": -1.0}, {"val_fraction": 1.5}])
def test_training_settings_are_checked(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_runs_saved_before_the_hard_loss_keep_the_mse():
    old = RunConfig().to_dict()
    del old["train"]["loss"]  # a config.json written before the key existed
    assert RunConfig.from_dict(old).train.loss == "mse"
    assert RunConfig.from_dict(RunConfig().to_dict()).train.loss == "hard" == TrainConfig().loss
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="l1")
