"""Build the DiT and its parameters from a config: random init or reference weights, placed on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from cosmos_jax.models import dit as dit_lib, wan_vae
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.parallel import mesh as mesh_lib
from cosmos_jax.weights import keymap, torch_io, vae_keymap

_ARCH_FIELDS = ("model_channels", "num_blocks", "num_heads", "adaln_lora_dim", "vace_block_every_n", "state_t",
                "crossattn_proj_in_channels", "crossattn_emb_channels", "rope_ranges_bf16")


def dit_config_from(model_cfg) -> DiTConfig:
    """DiTConfig from the `model` section of an ml_collections config."""
    kw = {k: model_cfg[k] for k in _ARCH_FIELDS}
    return DiTConfig.real_2b(**kw, dtype=jnp.dtype(model_cfg.dtype), attention_backend=model_cfg.attention_backend,
                             remat_policy=model_cfg.remat_policy)


def load_reference_params(path: str, cfg: DiTConfig, prefix: str = "net."):
    """(params as fp32 numpy, accum extras) from a reference weight file that matches `cfg` (else WeightsError)."""
    sd = torch_io.load_state_dict(path)
    return keymap.reference_to_flax(sd, cfg, source=path, prefix=prefix)


def init_params(cfg: DiTConfig, mesh, *, seed: int = 0, weights: str = ""):
    """Parameters sharded on `mesh` by the logical rules; from `weights` when given, else random.

    The file must match `cfg` (shapes, and the RoPE buffer variant `cfg.rope_ranges_bf16`); nothing in `cfg` is
    taken from the file.
    """
    abstract_boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(cfg, jax.random.key(seed)))
    shardings = mesh_lib.param_shardings(abstract_boxed, mesh)
    if weights:
        numpy_params, _ = load_reference_params(weights, cfg)
        return jax.tree.map(lambda a, s: jax.device_put(a.astype(cfg.param_dtype), s), numpy_params, shardings)
    init = jax.jit(lambda: nn.unbox(dit_lib.init_boxed_params(cfg, jax.random.key(seed))), out_shardings=shardings)
    return init()


def vae_config_from(vae_cfg) -> wan_vae.WanVAEConfig:
    """WanVAEConfig from the `vae` section of an ml_collections config."""
    return wan_vae.WanVAEConfig(dim=vae_cfg.dim, dtype=jnp.dtype(vae_cfg.dtype), conv_impl=vae_cfg.conv_impl,
                                encode_chunk=vae_cfg.encode_chunk, decode_chunk=vae_cfg.decode_chunk,
                                batch_chunk=vae_cfg.batch_chunk)


def init_vae_params(cfg: wan_vae.WanVAEConfig, *, seed: int = 0, weights: str = ""):
    """Replicated VAE parameters in the compute dtype, from `weights` (tokenizer.pth / .safetensors) or random."""
    params = vae_keymap.load_vae_params(weights, cfg)[0] if weights else wan_vae.init_params(cfg, seed)
    return jax.tree.map(lambda a: jnp.asarray(a, cfg.dtype), params)
