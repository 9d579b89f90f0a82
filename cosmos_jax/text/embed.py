"""Caption embeddings of the reference recipe, per-view assembly, and the projected-context shortcut.

Recipe (`TextEncoder.compute_text_embeddings_online`, FULL_CONCAT): 512 token ids -> Qwen2.5-VL LM -> hidden states
1..28 (layer outputs, the last after the final norm) -> each `(h - mean) / (std + 1e-8)` over features with the
unbiased std -> concatenated: (512, 28 * 3584 = 100352) per caption.

Per-view assembly (`predict2_multiview/models/multiview_vid2vid_model_rectified_flow.py`): training embeds 7 strings
(camera prefix + caption on the front view, prefix only elsewhere); inference embeds the prompt on the primary view
and `" "` on the others, with the built-in negative prompt on the primary view of the unconditional branch. Views
are concatenated along tokens in view order: (V * 512, 100352).

The DiT's `crossattn_proj` (100352 -> 1024, + GELU) is frozen in post-training, so caches may store its output
instead (`project_context`); a dropped caption (CFG text dropout zeroes the embedding) is then `dropped_context`.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax import cameras as cams
from cosmos_jax.models import text_encoder as te
from cosmos_jax.parallel import mesh as mesh_lib

NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky movements, "
    "low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, fake elements, "
    "unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. Overall, the video is of "
    "poor quality."
)
EMPTY_PROMPT = " "  # what the reference embeds for "no caption"


def normalize_hidden(hidden_L_B_S_D: jax.Array, out_dtype) -> jax.Array:
    """(L, B, S, D) -> (B, S, L * D): per layer `(h - mean) / (std_unbiased + 1e-8)` over D (fp32), concatenated."""
    h = hidden_L_B_S_D.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.sum(jnp.square(h - mean), axis=-1, keepdims=True) / (h.shape[-1] - 1)
    y = ((h - mean) / (jnp.sqrt(var) + 1e-8)).astype(out_dtype)
    n_layers, b, s, d = y.shape
    return jnp.transpose(y, (1, 2, 0, 3)).reshape(b, s, n_layers * d)


@functools.partial(jax.jit, static_argnums=0)
def embed_ids(cfg: te.QwenTextConfig, params, input_ids) -> jax.Array:
    """Token ids (B, 512) -> recipe embeddings (B, 512, L * D) in cfg.dtype."""
    hidden = te.QwenTextModel(cfg).apply({"params": params}, input_ids)
    return normalize_hidden(hidden, cfg.dtype)


def abstract_boxed_params(cfg: te.QwenTextConfig):
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda: te.QwenTextModel(cfg).init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype)))[
        "params"]


def place_params(params, cfg: te.QwenTextConfig, mesh=None):
    """numpy params -> device arrays; FSDP-sharded over `mesh` by the logical rules (a 7B model on small GPUs)."""
    if not cfg.scan_layers:
        params = te.unstack_layers(params, cfg.num_hidden_layers)
    if mesh is None:
        return jax.tree.map(lambda a: jnp.asarray(a, cfg.param_dtype), params)
    shardings = mesh_lib.param_shardings(abstract_boxed_params(cfg), mesh)
    return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a).astype(cfg.param_dtype), s), params, shardings)


def init_params(cfg: te.QwenTextConfig, seed: int = 0):
    """Random parameters (tests, benchmarks)."""
    from flax import linen as nn

    ids = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(jax.jit(te.QwenTextModel(cfg).init)(jax.random.key(seed), ids)["params"])


class TextEmbedder:
    """The encoder, its weights and tokenizer: `embedder(captions)` -> (N, 512, L * D) embeddings."""

    def __init__(self, cfg: te.QwenTextConfig, params, tokenizer, *, batch_size: int = 8):
        self.cfg, self.params, self.tokenizer, self.batch_size = cfg, params, tokenizer, batch_size

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, *, mesh=None, batch_size: int = 8, **cfg_overrides):
        from cosmos_jax.text.tokenizer import CaptionTokenizer
        from cosmos_jax.weights import hf_io

        cfg = hf_io.load_config(model_dir, **cfg_overrides)
        tokenizer = CaptionTokenizer(model_dir)
        params = place_params(hf_io.load_params(model_dir, cfg), cfg, mesh)
        return cls(cfg, params, tokenizer, batch_size=batch_size)

    @classmethod
    def from_config(cls, text_cfg, *, mesh=None):
        """From the `text` section of an ml_collections config (model_dir, dtype, attention_backend, ...)."""
        if not text_cfg.model_dir:
            raise ValueError("config.text.model_dir is empty: give the local Cosmos-Reason1 / Qwen2.5-VL directory")
        dtype = jnp.dtype(text_cfg.dtype)
        return cls.from_dir(text_cfg.model_dir, mesh=mesh, batch_size=text_cfg.batch_size, dtype=dtype,
                            param_dtype=dtype, attention_backend=text_cfg.attention_backend,
                            scan_layers=text_cfg.scan_layers)

    def embed_token_ids(self, ids: np.ndarray) -> np.ndarray:
        """(N, 512) ids -> (N, 512, L * D), `batch_size` captions per call (the last batch padded, then cut)."""
        outs = []
        for start in range(0, len(ids), self.batch_size):
            chunk = np.asarray(ids[start:start + self.batch_size])
            n = len(chunk)
            if n < self.batch_size and len(ids) > self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)])
            outs.append(np.asarray(embed_ids(self.cfg, self.params, jnp.asarray(chunk)))[:n])
        return np.concatenate(outs)

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        return self.embed_token_ids(self.tokenizer.ids(list(captions)))


# ----------------------------------------------------------------------------------------------------------------
# Per-view captions and assembly


def training_view_captions(caption: str, cameras: Sequence[str] = cams.CAMERAS,
                           caption_camera: str = cams.CAPTION_CAMERA) -> list[str]:
    """The 7 strings of a training sample: `"{prefix} {caption}"` on the caption camera, `"{prefix} "` elsewhere."""
    unknown = [c for c in cameras if c not in cams.CAMERAS]
    if unknown:
        raise ValueError(f"no caption prefix for cameras {unknown}; known: {list(cams.CAPTION_PREFIXES)}")
    return cams.training_view_captions(caption, [cams.CAMERAS.index(c) for c in cameras],
                                       list(cameras).index(caption_camera))


def inference_view_captions(prompt: str, n_views: int, primary: int = 0) -> list[str]:
    """Inference: the prompt (no prefix) on the primary view, `" "` on the others."""
    return [prompt if v == primary else EMPTY_PROMPT for v in range(n_views)]


def negative_view_captions(n_views: int, primary: int = 0) -> list[str]:
    """The unconditional branch: the built-in negative prompt on the primary view, `" "` on the others."""
    return inference_view_captions(NEGATIVE_PROMPT, n_views, primary)


def assemble_views(per_view: np.ndarray | jax.Array):
    """(V, 512, E) per-view embeddings -> (V * 512, E), views in order (the DiT's crossattn_emb of one sample)."""
    v, s, e = per_view.shape
    return per_view.reshape(v * s, e)


# ----------------------------------------------------------------------------------------------------------------
# Projected contexts (the DiT's frozen crossattn_proj applied once, offline)


def project_context(crossattn_proj_params, embeddings, dit_cfg) -> jax.Array:
    """GELU(embeddings @ W + b) with the DiT's own projection layer: what the DiT computes from the embeddings."""
    from cosmos_jax.models import dit as dit_lib

    return dit_lib.project_text(crossattn_proj_params, embeddings, dit_cfg)


def context_is_projected(context_width: int, dit_cfg) -> bool:
    """Text contexts come raw (crossattn_proj_in_channels wide) or already projected (crossattn_emb_channels)."""
    if context_width == dit_cfg.crossattn_emb_channels and context_width != dit_cfg.crossattn_proj_in_channels:
        return True
    if context_width == dit_cfg.crossattn_proj_in_channels:
        return False
    raise ValueError(f"text context width {context_width} is neither the raw embedding width "
                     f"{dit_cfg.crossattn_proj_in_channels} nor the projected width {dit_cfg.crossattn_emb_channels}")


def dropped_context(crossattn_proj_params, dit_cfg, n_tokens: int) -> jax.Array:
    """The projected context of a dropped caption: the projection of zeros (n_tokens, crossattn_emb_channels)."""
    zeros = jnp.zeros((1, n_tokens, dit_cfg.crossattn_proj_in_channels), dit_cfg.dtype)
    return project_context(crossattn_proj_params, zeros, dit_cfg)[0]
