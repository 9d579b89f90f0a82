"""Build the DiT and its parameters from a config: random init or reference weights, placed on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from cosmos_jax.models import dit as dit_lib, wan_vae
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.ops import attention as attn_ops
from cosmos_jax.parallel import mesh as mesh_lib
from cosmos_jax.weights import keymap, torch_io, vae_keymap

_ARCH_FIELDS = ("model_channels", "num_blocks", "num_heads", "adaln_lora_dim", "vace_block_every_n", "state_t",
                "crossattn_proj_in_channels", "crossattn_emb_channels", "rope_ranges_bf16")


def mesh_from(mesh_cfg):
    """The device mesh of the `mesh` config section; `num_devices` > 0 uses only the first that many devices
    (single-process runs; e.g. one GPU of a machine, or a 1-device run in tests)."""
    kw = dict(mesh_cfg)
    n = kw.pop("num_devices", 0)
    devices = None
    if n:
        if jax.process_count() > 1:
            raise ValueError("mesh.num_devices is for single-process runs; a multi-process run uses every device")
        if n > jax.device_count():
            raise ValueError(f"mesh.num_devices={n} but only {jax.device_count()} devices are visible")
        devices = jax.devices()[:n]
    return mesh_lib.make_mesh(**kw, devices=devices)


def dit_config_from(model_cfg) -> DiTConfig:
    """DiTConfig from the `model` section of an ml_collections config; attention_backend 'auto' is resolved for
    this process's devices (ops/attention.py resolve_backend: fa3 on Hopper when installed, else cudnn on GPUs,
    else xla), and an explicit backend that cannot run here is an error naming the field."""
    kw = {k: model_cfg[k] for k in _ARCH_FIELDS}
    try:
        backend = attn_ops.resolve_backend(model_cfg.attention_backend)
    except attn_ops.AttentionBackendError as e:
        raise ValueError(f"model.attention_backend: {e}") from None
    return DiTConfig.real_2b(**kw, dtype=model_cfg.dtype, attention_backend=backend,
                             remat_policy=model_cfg.remat_policy)


def load_reference_params(path: str, cfg: DiTConfig, prefix: str = "net."):
    """(params as fp32 numpy, accum extras) from a reference weight file that matches `cfg` (else WeightsError)."""
    sd = torch_io.load_state_dict(path)
    return keymap.reference_to_flax(sd, cfg, source=path, prefix=prefix)


def init_params(cfg: DiTConfig, mesh, *, seed: int = 0, weights: str = ""):
    """Parameters sharded on `mesh` by the logical rules; from `weights` when given, else random.

    `weights`: anything `load_network_params` reads (a reference .pt/.safetensors, a DCP checkpoint, or an Orbax
    checkpoint of ours: its regular weights). It must match `cfg` (shapes, and the RoPE buffer variant
    `cfg.rope_ranges_bf16`); nothing in `cfg` is taken from the file.
    """
    if weights:
        return place_params(load_network_params(weights, cfg)[0], cfg, mesh)
    init = jax.jit(lambda: nn.unbox(dit_lib.init_boxed_params(cfg, jax.random.key(seed))),
                   out_shardings=_param_shardings(cfg, mesh))
    return init()


def _param_shardings(cfg: DiTConfig, mesh):
    abstract_boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(cfg, jax.random.key(0)))
    return mesh_lib.param_shardings(abstract_boxed, mesh)


def place_params(numpy_params, cfg: DiTConfig, mesh):
    """Host parameters (the full Flax tree, e.g. from `load_network_params`) as `cfg.param_dtype` arrays sharded
    on `mesh` by the logical rules."""
    return jax.tree.map(lambda a, s: jax.device_put(a.astype(cfg.param_dtype), s), numpy_params,
                        _param_shardings(cfg, mesh))


# Reference `freeze_base_model` (transfer2 model L568-637): everything of `net` is frozen except these modules.
TRAINABLE_PREFIXES = ("control_blocks.", "control_embedder.", "input_hint_block.")


def trainable_names(cfg: DiTConfig) -> frozenset[str]:
    """Top-level Flax parameter names that post-training updates, derived from the reference key names (this
    includes `control_blocks.0.before_proj`, our `control_before_proj`)."""
    out = set()
    for name, ref_keys in keymap.reference_names(cfg).items():
        verdicts = {k.startswith(TRAINABLE_PREFIXES) for k in ref_keys}
        if len(verdicts) != 1:
            raise AssertionError(f"parameter group {name} mixes trained and frozen reference keys: {ref_keys}")
        if verdicts.pop():
            out.add(name)
    return frozenset(out)


def split_params(params: dict, cfg: DiTConfig) -> tuple[dict, dict]:
    """(trainable, frozen) top-level subtrees of a full parameter tree."""
    names = trainable_names(cfg)
    return ({k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names})


def merge_params(trainable: dict, frozen: dict) -> dict:
    overlap = set(trainable) & set(frozen)
    if overlap:
        raise ValueError(f"parameters {sorted(overlap)} are both trainable and frozen")
    return {**frozen, **trainable}


def vae_config_from(vae_cfg) -> wan_vae.WanVAEConfig:
    """WanVAEConfig from the `vae` section of an ml_collections config."""
    return wan_vae.WanVAEConfig(dim=vae_cfg.dim, dtype=jnp.dtype(vae_cfg.dtype), conv_impl=vae_cfg.conv_impl,
                                encode_chunk=vae_cfg.encode_chunk, decode_chunk=vae_cfg.decode_chunk,
                                batch_chunk=vae_cfg.batch_chunk)


def init_vae_params(cfg: wan_vae.WanVAEConfig, *, seed: int = 0, weights: str = ""):
    """Replicated VAE parameters in the compute dtype, from `weights` (tokenizer.pth / .safetensors) or random."""
    params = vae_keymap.load_vae_params(weights, cfg)[0] if weights else wan_vae.init_params(cfg, seed)
    return jax.tree.map(lambda a: jnp.asarray(a, cfg.dtype), params)


def load_network_params(path, cfg: DiTConfig, *, ema: bool = False, step: int | None = None):
    """(params: the full Flax tree as fp32 numpy, info) from any checkpoint of this network.

    `path`: a reference `.pt`/`.pth`/`.safetensors` file (keys `net.*`, or unprefixed); a DCP checkpoint of the
    reference trainer (a `model/` dir with `.metadata`, an `iter_*` dir, or a `checkpoints/` dir with
    `latest_checkpoint.txt`); or an Orbax checkpoint of ours (a step dir, or a checkpoints/job dir -> the latest
    complete step, or `step`). Regular weights by default: `net.*` (files, DCP) or trainable fp32 master + frozen
    (Orbax); `ema=True`: `net_ema.*` (files, DCP) or EMA + frozen (Orbax). The released `*_ema_bf16.pt` and our
    `model_ema_*.pt` hold the EMA under `net.*`: load them with ema=False.
    The checkpoint must match `cfg` (keys, shapes, RoPE buffer variant; for Orbax the saved architecture fields):
    otherwise a ValueError (keymap.WeightsError, CheckpointError, DcpError) naming the file. Nothing in `cfg` is
    taken from the checkpoint. info: {"format", "path", "step", "ema", "extras" (reference accum_* scalars)}.
    """
    import os
    import pathlib

    import numpy as np

    from cosmos_jax.weights import dcp_io, export as export_lib

    p = pathlib.Path(os.fspath(path))
    prefix = "net_ema." if ema else "net."
    info = {"path": str(p), "step": None, "ema": ema, "extras": {}}
    if p.is_file() or p.suffix in (".pt", ".pth", ".safetensors"):
        sd = torch_io.load_state_dict(p)
        if ema and not any(k.startswith(prefix) for k in sd):
            raise keymap.WeightsError(f"{p}: holds no EMA weights (no {prefix}* keys); files that hold only the EMA "
                                      "(model_ema_*.pt, the released *_ema_bf16.pt) keep it under net.*: load "
                                      "them with ema=False")
        params, extras = keymap.reference_to_flax(sd, export_lib.shape_config(cfg), source=str(p), prefix=prefix)
        info.update(format=p.suffix.lstrip("."), extras=extras)
        return params, info
    ref = export_lib.detect_source(p, step)
    if ref.kind == "dcp":
        sd, model_dir, found = dcp_io.load_state_dict(ref.path, prefix=prefix)
        if not sd:
            raise keymap.WeightsError(f"{model_dir}: holds no {prefix}* tensors"
                                      + (" (no EMA was saved)" if ema else ""))
        params, extras = keymap.reference_to_flax(sd, export_lib.shape_config(cfg), source=str(model_dir),
                                                  prefix=prefix)
        info.update(format="dcp", path=str(model_dir), step=found, extras=extras)
        return params, info

    from cosmos_jax.training import checkpoint as ckpt_lib

    model, config, found = ckpt_lib.read_model(ref.path, step)
    where = f"{ref.path} (step {found})"
    saved = export_lib.dit_config_of_run(config, where)
    diff = [f"model.{k}: {getattr(saved, k)!r} in the checkpoint vs {getattr(cfg, k)!r} here" for k in _ARCH_FIELDS
            if getattr(saved, k) != getattr(cfg, k)]
    if diff:
        raise keymap.WeightsError(f"{where}: written by a different network: " + "; ".join(diff))
    if ema and "ema" not in model:
        raise keymap.WeightsError(f"{where}: holds no EMA weights (the run had ema.enabled=False)")
    params = merge_params(model["ema"] if ema else model["trainable"], model["frozen"])
    del model

    def to_f32(tree: dict) -> None:  # leaf by leaf, in place: each bf16 source is freed as soon as it is converted
        for k, v in tree.items():
            if isinstance(v, dict):
                to_f32(v)
            else:
                tree[k] = np.asarray(v, np.float32)

    to_f32(params)
    export_lib.check_tree(params, export_lib.param_shapes(cfg), where)
    stats = ckpt_lib.read_stats(ckpt_lib.resolve_step_dir(ref.path, found))
    info.update(format="orbax", step=found, extras=stats["net_ema" if ema else "net"] if stats else {})
    return params, info
