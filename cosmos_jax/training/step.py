"""One post-training step: loss on the control branch only, AdamW on fp32 master weights, power EMA.

Order, as the reference trainer (`imaginaire/trainer.py` L355-393): forward -> backward -> non-finite gradients
zeroed -> global-norm clip -> optimizer step (lr of this step's count) -> EMA update with the pre-increment
iteration -> iteration + 1.

The state is one pytree of plain dicts, the same items a checkpoint holds (training/checkpoint.py):
  model    {"trainable": fp32 master weights of the control branch, "frozen": the base net (weight_dtype),
            "ema": fp32 EMA of the trainable weights (absent when EMA is off; the EMA of a frozen weight is the
            weight itself, so it is stored once, in "frozen")}
  optim    optax AdamW state of the trainable weights
  trainer  {"step": int32, "rng": uint32 key data (the run's base key), "nonfinite_steps": int32 (consecutive)}
Randomness of step n comes from fold_in(base key, n): a resumed run draws exactly what an uninterrupted one does,
on any mesh (jax's partitionable threefry gives the same numbers however the arrays are sharded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cosmos_jax import build
from cosmos_jax.diffusion import flow
from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.text import embed as text_embed
from cosmos_jax.training import ema as ema_lib
from cosmos_jax.training import optim


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the step needs besides the network config and the optimizer (built at the edge)."""
    shift: float = 5.0
    conditional_frames_probs: tuple[float, ...] = (0.5, 0.25, 0.25)
    text_dropout: float = 0.2
    control_weight: float = 1.0
    weight_dtype: Any = jnp.bfloat16   # the weights the forward sees (the reference's net is bf16)
    clip_norm: float = 0.1
    ema_enabled: bool = True
    ema_gamma: float = 6.9372

    def __post_init__(self):
        object.__setattr__(self, "weight_dtype", jnp.dtype(self.weight_dtype))
        object.__setattr__(self, "conditional_frames_probs", tuple(float(p) for p in self.conditional_frames_probs))


def step_config_from(config) -> StepConfig:
    """StepConfig from the run config (loss, model, optimizer, ema sections)."""
    return StepConfig(shift=config.loss.shift, conditional_frames_probs=tuple(config.loss.conditional_frames_probs),
                      text_dropout=config.loss.text_dropout, control_weight=config.loss.control_weight,
                      weight_dtype=config.model.weight_dtype, clip_norm=config.optimizer.clip_norm,
                      ema_enabled=config.ema.enabled, ema_gamma=float(ema_lib.gamma_from_rate(config.ema.rate)))


def optimizer_from(config) -> optax.GradientTransformation:
    o, s = config.optimizer, config.scheduler
    return optim.make_optimizer(lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                warm_up_steps=s.warm_up_steps, f_start=s.f_start, f_max=s.f_max, f_min=s.f_min,
                                cycle_length=s.cycle_length)


def init_state(params: dict, cfg: DiTConfig, step_cfg: StepConfig, optimizer, seed: int) -> dict:
    """The step-0 state from a full parameter tree (fp32)."""
    trainable, frozen = build.split_params(params, cfg)
    trainable = jax.tree.map(lambda p: p.astype(jnp.float32), trainable)
    model = {"trainable": trainable, "frozen": jax.tree.map(lambda p: p.astype(step_cfg.weight_dtype), frozen)}
    if step_cfg.ema_enabled:
        model["ema"] = jax.tree.map(jnp.copy, trainable)
    return {"model": model, "optim": optimizer.init(trainable),
            "trainer": {"step": jnp.zeros((), jnp.int32),
                        "rng": jax.random.key_data(jax.random.key(seed)),
                        "nonfinite_steps": jnp.zeros((), jnp.int32)}}


def make_train_step(cfg: DiTConfig, step_cfg: StepConfig, optimizer: optax.GradientTransformation):
    """`train_step(state, batch) -> (state, metrics)`, to be jitted by the caller.

    batch: x0 and latent_control [B, 16, V*T, H, W] (latents, frames view-major), context [B, V*512, C] (raw or
    projected text), view_indices [B, V*T] (the view id of every latent frame).
    """
    model = dit_lib.MultiViewControlDiT(cfg)

    def train_step(state, batch):
        tr = state["trainer"]
        key = jax.random.fold_in(jax.random.wrap_key_data(tr["rng"]), tr["step"])
        k_draw, k_eps = jax.random.split(key)
        x0 = batch["x0"]
        b = x0.shape[0]
        draws = flow.draw(k_draw, b, probs=step_cfg.conditional_frames_probs, text_dropout=step_cfg.text_dropout)
        eps = flow.noise(k_eps, x0.shape)
        projected = text_embed.context_is_projected(batch["context"].shape[-1], cfg)
        frozen = state["model"]["frozen"]
        dropped = None
        if projected:  # the projection of a zeroed (dropped) embedding: GELU(bias), the same for every token
            dropped = jnp.broadcast_to(text_embed.dropped_context(frozen["crossattn_proj"], cfg, 1),
                                       batch["context"].shape).astype(batch["context"].dtype)

        def loss_fn(trainable):
            weights = jax.tree.map(lambda p: p.astype(step_cfg.weight_dtype), trainable)
            params = build.merge_params(weights, frozen)

            def apply_fn(**kw):
                return model.apply({"params": params}, **kw, context_projected=projected)

            loss, aux = flow.training_loss(
                apply_fn, x0, eps, draws["u_B"], draws["k_B"], draws["text_keep_B"],
                crossattn_emb=batch["context"], dropped_crossattn_emb=dropped,
                latent_control_input=batch["latent_control"], padding_mask=None,
                view_indices_B_T=batch["view_indices"], control_weight=step_cfg.control_weight,
                shift=step_cfg.shift, state_t=cfg.state_t, compute_dtype=cfg.dtype)
            return loss, aux["per_sample_loss"]

        trainable = state["model"]["trainable"]
        (loss, per_sample), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        nonfinite_grads = optim.count_nonfinite(grads)
        grads, grad_norm = optim.clip_by_global_norm(optim.zero_nonfinite(grads), step_cfg.clip_norm)
        updates, opt_state = optimizer.update(grads, state["optim"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        model_state = {"trainable": trainable, "frozen": frozen}
        if step_cfg.ema_enabled:
            model_state["ema"] = ema_lib.update(state["model"]["ema"], trainable, tr["step"], step_cfg.ema_gamma,
                                                source_dtype=step_cfg.weight_dtype)
        bad = ~jnp.isfinite(loss)
        new_state = {"model": model_state, "optim": opt_state,
                     "trainer": {"step": tr["step"] + 1, "rng": tr["rng"],
                                 "nonfinite_steps": jnp.where(bad, tr["nonfinite_steps"] + 1, 0)}}
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite_grads": nonfinite_grads,
                   "nonfinite_steps": new_state["trainer"]["nonfinite_steps"],
                   "conditional_frames": jnp.mean(draws["k_B"].astype(jnp.float32)),
                   "text_kept": jnp.mean(draws["text_keep_B"].astype(jnp.float32)),
                   "per_sample_loss_max": jnp.max(per_sample)}
        return new_state, metrics

    return train_step
