"""Configs, the DiTConfig constructors, and the forward demo."""

import json

import numpy as np
import pytest

from configs import transfer2_auto_multiview as cfg_file
from cosmos_jax import forward
from cosmos_jax import build
from cosmos_jax.models.dit_config import DiTConfig


def test_variants_build_the_right_networks():
    tiny = build.dit_config_from(cfg_file.get_config("tiny").model)
    real = build.dit_config_from(cfg_file.get_config("post_train_example").model)
    assert (tiny.model_channels, tiny.num_blocks, tiny.control_layers) == (64, 4, (0, 2))
    assert (real.model_channels, real.num_blocks, real.num_heads, real.head_dim) == (2048, 28, 16, 128)
    assert real.control_layers == (0, 7, 14, 21)
    # 'auto' resolves by machine: fa3 on Hopper GPUs with the wheel, cudnn on other GPUs, xla here (CPU)
    assert cfg_file.get_config("post_train_example").model.attention_backend == "auto"
    assert real.attention_backend == "xla"
    assert (real.control_padded_channels, real.control_in_channels, real.x_in_channels) == (184, 193, 25)
    with pytest.raises(ValueError, match="unknown config variant"):
        cfg_file.get_config("nope")
    # the reference experiment name is an alias of post_train_example, with the reference's job names and recipe
    alias = cfg_file.get_config("transfer2_auto_multiview_post_train_example")
    assert alias.variant == "post_train_example" and alias.model.weight_dtype == "bfloat16"
    assert (alias.job.project, alias.job.group, alias.job.name) == (
        "cosmos_transfer_v2p5", "auto_multiview", "2b_cosmos_multiview_post_train_example")
    assert (alias.optimizer.lr, alias.optimizer.weight_decay, alias.optimizer.clip_norm) == (8.63e-5, 1e-3, 0.1)
    assert (alias.trainer.max_iter, alias.trainer.save_iter, alias.trainer.logging_iter) == (5000, 200, 100)
    assert (alias.data.num_frames, alias.data.height, alias.data.width) == (29, 720, 1280)


def test_post_train_example_hyper_parameters_are_the_reference_values():
    """Every training hyper-parameter of post_train_example against the reference's values, written out here (not
    read from our defaults). Sources: docs/reference_pipeline.md (file / line of the reference given there)."""
    from cosmos_jax.training import ema as ema_lib, optim
    from cosmos_jax.training import step as step_lib

    c = cfg_file.get_config("post_train_example")
    # §2.8: FusedAdam in AdamW mode, base experiment L72-76 + common/defaults/optimizer.py; GradClip(clip_norm=0.1)
    # (experiment L159-161)
    assert c.optimizer.to_dict() == dict(lr=8.63e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-3, clip_norm=0.1)
    # §2.8: LambdaLinearScheduler, experiment L77-82
    assert c.scheduler.to_dict() == dict(warm_up_steps=1000, f_start=1e-6, f_max=0.5, f_min=0.2, cycle_length=100000)
    # §2.9: EMAConfig(enabled=True, rate=0.10) (predict2/configs/common/defaults/ema.py)
    assert (c.ema.enabled, c.ema.rate) == (True, 0.1)
    # §2.2 shift 5 (rectified_flow.py L130-135); §2.4 conditional_frames_probs {0: .5, 1: .25, 2: .25} (experiment
    # L88-93); §2.5 text dropout 0.2 (experiment L128-131); control weight fixed to 1.0
    assert (c.loss.shift, tuple(c.loss.conditional_frames_probs), c.loss.text_dropout, c.loss.control_weight) == (
        5.0, (0.5, 0.25, 0.25), 0.2, 1.0)
    # §1.2: AugmentationConfig (dataloader_local.py L239-252): 29 frames at 720x1280, fps_downsample_factor 1;
    # §2.11: global batch 1
    assert (c.data.num_frames, c.data.stride, c.data.height, c.data.width, c.data.batch_size) == (29, 1, 720, 1280, 1)
    # §2.11: example L28-47; §2.12 every_n_sample_reg/_ema: every 200 iterations, 35 UniPC steps
    assert (c.trainer.max_iter, c.trainer.logging_iter, c.trainer.save_iter) == (5000, 100, 200)
    assert (c.trainer.sample_iter, c.trainer.sample_steps) == (200, 35)
    # §2.1: state_t 8; text projection 100352 -> 1024 (base experiment L117-119); trained in bf16 (§2.10)
    assert (c.model.state_t, c.model.crossattn_proj_in_channels, c.model.crossattn_emb_channels) == (8, 100352, 1024)
    assert (c.model.dtype, c.model.weight_dtype) == ("bfloat16", "bfloat16")

    # what the trainer derives from these sections, against the reference's numbers (§2.8, §2.9)
    step_cfg = step_lib.step_config_from(c)
    assert abs(step_cfg.ema_gamma - 6.9372) < 1e-4 and step_cfg.clip_norm == 0.1 and step_cfg.shift == 5.0
    betas = np.asarray(ema_lib.beta(np.array([0, 10, 100, 1000, 5000]), step_cfg.ema_gamma))
    np.testing.assert_allclose(betas, [0.0, 0.469, 0.924, 0.992, 0.998], atol=1e-3)
    schedule = optim.lr_schedule(c.optimizer.lr, **c.scheduler.to_dict())
    # lr(n) = 8.63e-5 f(n); f = 1e-6 + (0.5 - 1e-6) n / 1000 below n = 1000, then 0.2 + 0.3 (100000 - n) / 99000
    for n, want in ((0, 8.63e-5 * 1e-6), (500, 8.63e-5 * (1e-6 + (0.5 - 1e-6) * 0.5)), (1000, 4.315e-5),
                    (5000, 8.63e-5 * (0.2 + 0.3 * 95000 / 99000)), (100000, 8.63e-5 * 0.2)):
        assert abs(float(schedule(n)) / want - 1) < 1e-5, (n, float(schedule(n)), want)


def test_vae_sections_build_the_right_vae(vae_case_a):
    real = build.vae_config_from(cfg_file.get_config("post_train_example").vae)
    # the reference's `_video_vae` cfg, written out (wan_vae.md §1: dim is hard-coded 96; the VAE is cast to bf16)
    assert (real.dim, real.z_dim, real.dim_mult, real.num_res_blocks, real.temperal_downsample) == (
        96, 16, (1, 2, 4, 4), 2, (False, True, True))
    assert real.dtype == np.dtype("bfloat16") and real.decode_chunk == 1  # the reference decodes 1 latent frame a step
    tiny_cfg = cfg_file.get_config("tiny").vae
    tiny = build.vae_config_from(tiny_cfg)
    assert tiny.dim == 8 and tiny.dtype == np.float32
    params = build.init_vae_params(tiny, weights=str(vae_case_a / "weights.safetensors"))
    assert params["decoder"]["head_2"]["kernel"].shape == (3, 3, 3, 8, 3)


def test_reference_kwargs_match_named_constructors(case_a):
    case = json.loads((case_a / "case.json").read_text())
    assert DiTConfig.from_reference_kwargs(case["constructor_kwargs_real_2B"]) == DiTConfig.real_2b()
    assert DiTConfig.from_reference_kwargs(case["constructor_kwargs_tiny"]) == DiTConfig.tiny(dtype=DiTConfig.dtype)


@pytest.mark.parametrize("option,value", [("rope_enable_fps_modulation", True), ("pos_emb_cls", "sincos"),
                                          ("vace_has_mask", True), ("extra_per_block_abs_pos_emb", True)])
def test_unsupported_reference_options_are_refused(case_a, option, value):
    kw = json.loads((case_a / "case.json").read_text())["constructor_kwargs_tiny"]
    kw[option] = value
    with pytest.raises(NotImplementedError, match=option):
        DiTConfig.from_reference_kwargs(kw)


def test_unknown_reference_kwarg_is_refused():
    with pytest.raises(ValueError, match="unknown reference DiT kwargs"):
        DiTConfig.from_reference_kwargs({"model_channel": 64})


def test_forward_demo_runs_tiny():
    out = forward.run(cfg_file.get_config("tiny"))
    assert out.shape == (1, 16, 6, 8, 12) and np.isfinite(out).all() and out.std() > 0.1
