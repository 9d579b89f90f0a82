"""The multiview control DiT of Cosmos-Transfer2.5 auto/multiview (reference: `MultiViewControlDiT`).

Forward (reference `MultiViewControlDiT.forward`):
  1. x (16 ch) + condition mask + padding mask (nearest-resized) + view embedding  -> patchify -> x_embedder
     control latent zero-padded to (16+7)*8 ch + the same three extras            -> patchify -> control_embedder
     -> input_hint_block (7 x Linear+SiLU)
  2. text context -> crossattn_proj (Linear + GELU); timesteps * 0.001 -> sinusoid -> RMSNorm / adaLN-LoRA
  3. control branch: c = before_proj(hint_input) + x_embedded; each control block runs on c and emits a hint
  4. base blocks; block k in `control_layers` adds hint[mapping[k]] * control_weight after itself
  5. final adaLN layer -> unpatchify (channel last in the patch vector)
Blocks are stacked and run with `nn.scan` (parameters carry a leading layer axis) under a named remat policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cosmos_jax.models import rope as rope_lib
from cosmos_jax.models.blocks import AdaLNModulation, DiTBlock, RMSNorm, dense, layer_norm, x_axes
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.parallel.mesh import constrain, unsharded_activations, video_axes


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing policies (chosen by name in the config)
# ----------------------------------------------------------------------------------------------------------------
# names the fa3 attention wrapper gives its kernel's saved tensors (ops/flash.py `_flash_fwd`), per call site
# (`*_kernel_aux`: fp8_full's probability amax, a scalar per call)
FA3_SAVED = {site: (f"{site}_kernel_out", f"{site}_kernel_lse", f"{site}_kernel_aux")
             for site in ("self_attn", "cross_attn")}


def _is_attention_forward(prim, *_, **__) -> bool:
    # The cuDNN flash-attention forward primitive; saving its outputs (incl. the softmax statistics) lets the
    # backward pass skip recomputing attention, as the reference's "aggressive" SAC policy saves flash-attn outputs.
    name = getattr(prim, "name", "")
    return "dot_product_attention" in name and "bwd" not in name


def _is_self_attention_forward(cross_attn_keys: int):
    """The cuDNN forward of self-attention only.

    A policy sees a primitive, its input shapes and parameters, nothing that names the call site, and cuDNN's
    backward reads the forward's raw outputs (so a `checkpoint_name` on our side cannot mark them). The two calls
    differ in their key length: cross-attention always attends to the `cross_attn_keys` text tokens of a view
    (padded to 64), self-attention to all tokens of the sample (padded to 64). Should the sample have exactly that
    many padded tokens (toy sizes), its self-attention is recomputed as well: cross-attention is never saved.
    """
    cross_len = -(-cross_attn_keys // 64) * 64

    def policy(prim, *avals, **params) -> bool:
        key = avals[1] if len(avals) > 1 else None
        return (_is_attention_forward(prim, **params) and getattr(key, "ndim", 0) == 4
                and key.shape[1] != cross_len)

    return policy


def remat_policy(name: str, cross_attn_keys: int = 512, backend: str = "xla"):
    """None = no rematerialisation; otherwise a `jax.checkpoint` policy.

    With the fa3 backend the attention policies save the kernel's named output and log-sum-exp
    (`FA3_SAVED`, named inside our custom_vjp), so its backward kernel runs from them without a forward rerun.
    On GPU (cudnn backend) the attention policies also save the cuDNN forward outputs (attention output and
    softmax statistics, inside the Ulysses shard_map) so the backward pass does not rerun the attention kernel; the
    named `*_attn_out` tensors are the outputs after the back all-to-all, which the output projection needs. With
    the xla backend (CPU) there is no such primitive: only the named outputs are saved and the backward pass
    recomputes the softmax. `cross_attn_keys`: text tokens per view (DiTConfig.crossattn_tokens_per_view).

    save_self_attention, as seen on an H200 (jax 0.11.2, `jax.ad_checkpoint.print_saved_residuals` of one block,
    2 views x 4 frames x 300 tokens, 2 heads): saves the self-attention cuDNN output bf16[1,2432,2,128] and its
    softmax statistics f32[1,2,2432] plus the named 'self_attn_out'; nothing of the cross-attention (save_attention
    also keeps its cuDNN output, statistics and 'cross_attn_out'). Gradients agree with the other policies.
    With a kernel backend (cudnn, fa3) the named `*_attn_out` tensors are not saved as well: they are the
    kernel's output reshaped (sliced where cuDNN padded, and under Ulysses after the back all-to-all), so saving
    both stored every attention output twice (2 x 6.6 GB at 2 views; 2 x 23 GB at 7 views). The backward recomputes
    them from the saved kernel output (a reshape; under context parallelism one extra all-to-all per layer).
    """
    cp = jax.checkpoint_policies
    kernel = backend != "xla"
    self_names = FA3_SAVED["self_attn"] + (() if kernel else ("self_attn_out",))
    cross_names = FA3_SAVED["cross_attn"] + (() if kernel else ("cross_attn_out",))
    attention = cp.save_from_both_policies(cp.save_only_these_names(*self_names, *cross_names),
                                           _is_attention_forward)
    policies = {
        "none": None,
        "full": cp.nothing_saveable,
        # reference predict2_2b_720_aggressive: keep attention outputs, recompute everything else
        "save_attention": attention,
        # keep only the self-attention output + its kernel statistics; the cheap (512-key) cross-attention is
        # recomputed with everything else
        "save_self_attention": cp.save_from_both_policies(cp.save_only_these_names(*self_names),
                                                          _is_self_attention_forward(cross_attn_keys)),
        "save_dots": cp.dots_with_no_batch_dims_saveable,
        "save_attention_and_dots": cp.save_from_both_policies(attention, cp.dots_with_no_batch_dims_saveable),
        # save_attention's tensors, kept in pinned host memory instead of the GPU's (copied out during the forward,
        # back in the backward); only named tensors can be offloaded
        "offload_attention": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(*self_names, *cross_names),
            offload_src="device", offload_dst="pinned_host"),
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose from {sorted(policies)}")
    if name == "offload_attention" and backend == "cudnn":  # its saved forward outputs are matched by primitive
        raise ValueError("remat_policy 'offload_attention' needs named attention outputs: attention_backend "
                         "fa3, fp8, fp8_full or xla (cuDNN's are matched by primitive); use save_attention")
    return policies[name]


# ----------------------------------------------------------------------------------------------------------------
# Stacked layers
# ----------------------------------------------------------------------------------------------------------------
class _BaseLayer(nn.Module):
    """One base block (`MultiViewControlAwareDiTBlock`), adding its control hint after itself when it has one."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, layer_hint, hints, control_weight, emb, adaln_lora, context, rope_cos, rope_sin):
        x = DiTBlock(self.cfg, name="block")(x, emb, adaln_lora, context, rope_cos, rope_sin)
        if hints is not None:
            hint_index, hint_gate = layer_hint
            hint = jax.lax.dynamic_index_in_dim(hints, hint_index, axis=0, keepdims=False)
            x = x + (hint_gate * control_weight).astype(x.dtype) * hint
        self.sow("intermediates", "out_B_T_S_D", x)
        return x, None


class _ControlLayer(nn.Module):
    """One control block (`MultiViewControlEncoderDiTBlock`): runs on the control state, emits a hint."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, c, _, emb, adaln_lora, context, rope_cos, rope_sin):
        c, hint = DiTBlock(self.cfg, with_after_proj=True, name="block")(c, emb, adaln_lora, context, rope_cos,
                                                                         rope_sin)
        return c, hint


def _stack(layer_cls, cfg: DiTConfig, length: int, n_broadcast: int, name: str):
    policy = remat_policy(cfg.remat_policy, cfg.crossattn_tokens_per_view, cfg.attention_backend)
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=False)
    scanned = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                      in_axes=(0,) + (nn.broadcast,) * n_broadcast, length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, name=name)


# ----------------------------------------------------------------------------------------------------------------
# Input preparation
# ----------------------------------------------------------------------------------------------------------------
def _crossattn_proj(cfg: DiTConfig, name: str | None = None) -> nn.Dense:
    return dense(cfg.crossattn_emb_channels, ("text_in", "kv_embed"), fan_in=cfg.crossattn_proj_in_channels,
                 use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def project_text(crossattn_proj_params, crossattn_emb, cfg: DiTConfig):
    """The DiT's text projection alone (same layer as inside the net): GELU(crossattn_emb @ W + b), cfg.dtype."""
    out = _crossattn_proj(cfg).apply({"params": crossattn_proj_params}, crossattn_emb)
    return nn.gelu(out, approximate=False)


def nearest_resize_indices(n_in: int, n_out: int) -> np.ndarray:
    """torch `interpolate(mode='nearest')` source indices: floor(dst * (in/out)) in fp32, clamped."""
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def patchify(x_B_C_T_H_W, p: int, r: int):
    """einops 'b c (t r) (h m) (w n) -> b t h w (c r m n)'; returns [B, T', H'*W', C*r*m*n] and (T', H', W')."""
    b, c, t, h, w = x_B_C_T_H_W.shape
    if t % r or h % p or w % p:
        raise ValueError(f"latent T,H,W = {(t, h, w)} must be divisible by the patch sizes {(r, p, p)}")
    x = x_B_C_T_H_W.reshape(b, c, t // r, r, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, t // r, (h // p) * (w // p), c * r * p * p), (t // r, h // p, w // p)


def unpatchify(x_B_T_S_O, grid, p: int, r: int, c: int):
    """einops 'B T H W (p1 p2 t C) -> B C (T t) (H p1) (W p2)'."""
    b = x_B_T_S_O.shape[0]
    t, h, w = grid
    x = x_B_T_S_O.reshape(b, t, h, w, p, p, r, c)
    x = x.transpose(0, 7, 1, 6, 2, 4, 3, 5)
    return x.reshape(b, c, t * r, h * p, w * p)


def timestep_sinusoid(timesteps_B_T, dim: int):
    """Reference `Timesteps`: [cos | sin] of t * exp(-ln(10000) * i / (dim/2)), fp32."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    arg = timesteps_B_T.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


class MultiViewControlDiT(nn.Module):
    cfg: DiTConfig

    def _extras(self, x_B_C_T_H_W, cond_mask, padding_mask, view_indices_B_T, n_views):
        """Channels appended to x and to the control input: condition mask, resized padding mask, view embedding."""
        cfg = self.cfg
        b, _, t, h, w = x_B_C_T_H_W.shape
        dtype = x_B_C_T_H_W.dtype
        cond = jnp.zeros((b, 1, t, h, w), dtype) if cond_mask is None else cond_mask.astype(dtype)
        if padding_mask is None:
            pad = jnp.zeros((b, 1, t, h, w), dtype)
        else:
            if padding_mask.ndim == 3:
                padding_mask = padding_mask[:, None]
            ih = nearest_resize_indices(padding_mask.shape[-2], h)
            iw = nearest_resize_indices(padding_mask.shape[-1], w)
            pm = padding_mask[:, :1][:, :, ih][:, :, :, iw].astype(dtype)
            pad = jnp.broadcast_to(pm[:, :, None], (b, 1, t, h, w))
        if view_indices_B_T is None:  # reference default: view v of the sample gets camera id v
            view_indices_B_T = jnp.repeat(jnp.arange(n_views), t // n_views)[None].repeat(b, axis=0)
        view_ids = jnp.minimum(view_indices_B_T.astype(jnp.int32), cfg.n_cameras_emb - 1)
        table = self.param("view_embeddings", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("views", "norm")),
                           (cfg.n_cameras_emb, cfg.view_condition_dim), cfg.param_dtype)
        view = jnp.take(table, view_ids, axis=0).astype(dtype)  # [B, T, Dv]
        view = jnp.broadcast_to(view.transpose(0, 2, 1)[..., None, None], (b, cfg.view_condition_dim, t, h, w))
        return [cond, pad, view]

    def _patch_embed(self, video_B_C_T_H_W, extras, name: str):
        """Append the extra channels, patchify, project to model width (reference `PatchEmbed`)."""
        cfg = self.cfg
        tokens, grid = patchify(jnp.concatenate([video_B_C_T_H_W] + extras, axis=1), cfg.patch_spatial,
                                cfg.patch_temporal)
        out = dense(cfg.model_channels, ("patch_in", "embed_out"), fan_in=tokens.shape[-1], dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name=name)(tokens)
        out = constrain(out, x_axes(out))
        self.sow("intermediates", f"{name}_out_B_T_S_D", out)
        return out, grid

    @nn.compact
    def __call__(self, x_B_C_T_H_W, timesteps_B_T, crossattn_emb, latent_control_input=None, control_weight=1.0,
                 condition_video_input_mask_B_C_T_H_W=None, padding_mask=None, view_indices_B_T=None, fps=None,
                 context_projected: bool = False):
        """Velocity prediction [B, C, V*T, H, W].

        x_B_C_T_H_W: noisy latent, frames view-major (index v*T + t). timesteps_B_T: [B, V*T], [B, 1] or [B] in
        [0, 1000]. crossattn_emb: [B, V_text*512, C_text]. latent_control_input: control latent like x, or None for
        the base network alone (the reference always runs the control branch; control_weight 0 gives the same
        output). control_weight: scalar (may be traced). padding_mask: [B, 1, H_pix, W_pix]. fps: unused (the
        model's RoPE has no fps modulation). context_projected: crossattn_emb is already the output of
        `project_text` (crossattn_proj + GELU, frozen in post-training), e.g. from a projected-context cache.
        """
        del fps
        cfg = self.cfg
        b, c_in, t_total, h, w = x_B_C_T_H_W.shape
        if c_in != cfg.in_channels:
            raise ValueError(f"x_B_C_T_H_W has {c_in} channels, the net expects {cfg.in_channels}")
        if t_total % cfg.state_t:
            raise ValueError(f"{t_total} latent frames is not a whole number of views of state_t={cfg.state_t} frames")
        n_views = t_total // cfg.state_t
        if timesteps_B_T.ndim == 1:
            timesteps_B_T = timesteps_B_T[:, None]
        if timesteps_B_T.shape[1] not in (1, t_total):
            raise ValueError(f"timesteps_B_T must have 1 or {t_total} (V*T) entries per sample, "
                             f"got shape {timesteps_B_T.shape}")
        cond_mask = condition_video_input_mask_B_C_T_H_W

        # 1. patch embeddings -------------------------------------------------------------------------------
        extras = self._extras(x_B_C_T_H_W, cond_mask, padding_mask, view_indices_B_T, n_views)
        x, grid = self._patch_embed(x_B_C_T_H_W, extras, "x_embedder")
        t_tok, h_tok, w_tok = grid

        # 2. conditioning -----------------------------------------------------------------------------------
        if context_projected:
            context = crossattn_emb.astype(cfg.dtype)
        else:
            context = nn.gelu(_crossattn_proj(cfg, name="crossattn_proj")(crossattn_emb), approximate=False)
        self.sow("intermediates", "crossattn_proj_out_B_N_D", context)

        sinusoid = timestep_sinusoid(timesteps_B_T * cfg.timestep_scale, cfg.model_channels)  # fp32
        t_hidden = nn.silu(dense(cfg.model_channels, ("embed", "embed_out"), fan_in=cfg.model_channels,
                                 name="t_embedder_linear_1")(sinusoid))
        adaln_lora = dense(3 * cfg.model_channels, ("embed", "modulation"), fan_in=cfg.model_channels,
                           name="t_embedder_linear_2")(t_hidden)
        emb = RMSNorm(param_dtype=cfg.param_dtype, name="t_embedding_norm")(sinusoid)
        self.sow("intermediates", "t_embedder_out_0", sinusoid)
        self.sow("intermediates", "t_embedder_out_1", adaln_lora)
        self.sow("intermediates", "t_embedding_norm_out_B_T_D", emb)

        # [T, S, head_dim], laid out over the mesh as x_B_T_S_D is
        angles = rope_lib.rope_angles(cfg, n_views, t_tok // n_views, h_tok, w_tok).reshape(t_tok, h_tok * w_tok, -1)
        angles = constrain(angles, video_axes(t_tok, h_tok * w_tok)[1:] + (None,))
        rope_cos, rope_sin = jnp.cos(angles), jnp.sin(angles)
        control_weight = jnp.asarray(control_weight, jnp.float32)
        block_args = (emb, adaln_lora, context, rope_cos, rope_sin)

        # 3. control branch ---------------------------------------------------------------------------------
        hints = None
        if latent_control_input is not None:
            if latent_control_input.shape[0] != b or latent_control_input.shape[2:] != x_B_C_T_H_W.shape[2:]:
                raise ValueError(f"latent_control_input shape {latent_control_input.shape} does not match x "
                                 f"{x_B_C_T_H_W.shape} (batch, frames, H, W)")
            n_ctrl = latent_control_input.shape[1]
            if n_ctrl > cfg.control_padded_channels:
                raise ValueError(f"control input has {n_ctrl} channels, more than {cfg.control_padded_channels}")
            ctrl = latent_control_input.astype(x_B_C_T_H_W.dtype)
            ctrl = jnp.pad(ctrl, ((0, 0), (0, cfg.control_padded_channels - n_ctrl), (0, 0), (0, 0), (0, 0)))
            c, _ = self._patch_embed(ctrl, extras, "control_embedder")
            if cfg.use_input_hint_block:
                for i in range(cfg.hint_layers):
                    c = nn.silu(dense(cfg.model_channels, ("embed", "embed_out"), fan_in=cfg.model_channels,
                                      use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      name=f"input_hint_block_{i}")(c))
                self.sow("intermediates", "input_hint_block_out_B_T_S_D", c)
            c = dense(cfg.model_channels, ("embed", "embed_out"), fan_in=cfg.model_channels, use_bias=True,
                      zero_init=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="control_before_proj")(c)
            c = constrain(c + x, x_axes(x))
            control_stack = _stack(_ControlLayer, cfg, cfg.num_control_blocks, 5, "control_blocks")
            _, hints = control_stack(c, None, *block_args)  # hints [G, B, T, S, D]

        # 4. base blocks ------------------------------------------------------------------------------------
        mapping = {layer: i for i, layer in enumerate(cfg.control_layers)}
        hint_index = jnp.asarray([mapping.get(k, 0) for k in range(cfg.num_blocks)], jnp.int32)
        hint_gate = jnp.asarray([1.0 if k in mapping else 0.0 for k in range(cfg.num_blocks)], jnp.float32)
        base_stack = _stack(_BaseLayer, cfg, cfg.num_blocks, 7, "blocks")
        x, _ = base_stack(x, (hint_index, hint_gate), hints, control_weight, *block_args)

        # 5. final layer ------------------------------------------------------------------------------------
        shift, scale = AdaLNModulation(cfg, n_chunks=2, name="final_adaln_modulation")(emb, adaln_lora)
        y = layer_norm(x) * (1.0 + scale[:, :, None, :]) + shift[:, :, None, :]
        y = dense(cfg.patch_dim_out, ("embed", "patch_out"), fan_in=cfg.model_channels, name="final_linear",
                  param_dtype=cfg.param_dtype)(y)  # fp32, as the reference's final layer under wan fp32 autocast
        self.sow("intermediates", "final_layer_out_B_T_S_O", y)
        return unpatchify(y, grid, cfg.patch_spatial, cfg.patch_temporal, cfg.out_channels)


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def example_inputs(cfg: DiTConfig, *, batch: int = 1, n_views: int = 1, height: int | None = None,
                   width: int | None = None, dtype=jnp.float32) -> dict:
    """Zero inputs of the right shapes (for init / eval_shape); H, W default to one 2x2-token latent frame grid."""
    t = n_views * cfg.state_t
    h = height or 2 * cfg.patch_spatial
    w = width or 2 * cfg.patch_spatial
    return dict(
        x_B_C_T_H_W=jnp.zeros((batch, cfg.in_channels, t, h, w), dtype),
        timesteps_B_T=jnp.zeros((batch, t), jnp.float32),
        crossattn_emb=jnp.zeros((batch, n_views * cfg.crossattn_tokens_per_view, cfg.crossattn_proj_in_channels),
                                dtype),
        latent_control_input=jnp.zeros((batch, cfg.in_channels, t, h, w), dtype),
        condition_video_input_mask_B_C_T_H_W=jnp.zeros((batch, 1, t, h, w), dtype),
        padding_mask=jnp.zeros((batch, 1, 8 * h, 8 * w), dtype),
        view_indices_B_T=jnp.zeros((batch, t), jnp.int32),
    )


def random_inputs(cfg: DiTConfig, key, *, batch: int = 1, n_views: int = 1, height: int | None = None,
                  width: int | None = None, dtype=jnp.float32) -> dict:
    """Random inputs of `example_inputs`' shapes: N(0,1) tensors, timesteps in [0, 1000), view v on view v's frames."""
    inputs = example_inputs(cfg, batch=batch, n_views=n_views, height=height, width=width, dtype=dtype)
    keys = iter(jax.random.split(key, len(inputs)))
    # drawn flat and reshaped: the same numbers (threefry counters are flat indices), but XLA:CPU compiles a
    # many-dimensional draw very slowly (~20 s for [16, 4, 8, 12])
    out = {k: (jax.random.normal(next(keys), (v.size,), v.dtype).reshape(v.shape) if v.dtype == dtype else v)
           for k, v in inputs.items()}
    t_shape = out["timesteps_B_T"].shape
    out["timesteps_B_T"] = jax.random.uniform(next(keys), (batch * t_shape[1],), jnp.float32, 0.0,
                                              1000.0).reshape(t_shape)
    out["view_indices_B_T"] = jnp.tile(jnp.repeat(jnp.arange(n_views, dtype=jnp.int32), cfg.state_t), (batch, 1))
    return out


def init_boxed_params(cfg: DiTConfig, rng) -> dict:
    """Freshly initialised parameters, still boxed with their logical axis names (for sharding).

    Traced without activation sharding: the dummy inputs (one sample, one view) need not split over the mesh, and
    with the xla attention backend: the parameters do not depend on it, and the dummy inputs' lengths need not suit
    a kernel (fp8 takes multiples of 64 only)."""
    with unsharded_activations():
        model = MultiViewControlDiT(dataclasses.replace(cfg, attention_backend="xla"))
        return model.init(rng, **example_inputs(cfg))["params"]


def abstract_params(cfg: DiTConfig):
    """ShapeDtypeStructs of the (unboxed) parameter tree, without allocating anything."""
    return nn.unbox(jax.eval_shape(lambda: init_boxed_params(cfg, jax.random.key(0))))
