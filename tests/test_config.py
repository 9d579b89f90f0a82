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
    assert real.control_layers == (0, 7, 14, 21) and real.attention_backend == "cudnn"
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


def test_vae_sections_build_the_right_vae(vae_case_a):
    from cosmos_jax.models import wan_vae

    real = build.vae_config_from(cfg_file.get_config("post_train_example").vae)
    assert real == wan_vae.WanVAEConfig.real(batch_chunk=1)
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
