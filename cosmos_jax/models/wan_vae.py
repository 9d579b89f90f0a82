"""Wan2.1 VAE (Cosmos-Transfer2.5 `wan2pt1_tokenizer`): causal 3D conv encoder/decoder, 8x spatial, 4x temporal.

Reference: `cosmos_transfer2/_src/predict2/tokenizers/wan2pt1.py` (`WanVAE_`, `Encoder3d`, `Decoder3d`, `Resample`,
`ResidualBlock`, `AttentionBlock`, `CausalConv3d`, `RMS_norm`); notes in `docs/wan_vae.md`.

Layout here is channels-last, `x_B_T_H_W_C`. Every module takes `(x, cache)` and returns `(y, cache)`: `cache=None`
means "first call of a clip" (zero history, and the first-frame rules of the temporal resamples); otherwise it
holds the last input frames each causal conv needs. Calling once on the whole clip and calling on frame 0 then on
chunks are the same computation (the reference streams chunks; `encode`/`decode` below do the same under
`lax.scan` so memory is bounded by one chunk, not by the clip).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Array = jax.Array

# WanVAE.__init__ (wan2pt1.py): the Wan2.1 latent statistics. The reference stores them as bf16 tensors and the
# inverse std as bf16(1 / bf16(std)); using the unrounded values moves latents by ~3e-3 (wan_vae.md §6).
_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CONV_IMPLS = ("conv3d", "fold2d")
FOLD2D_MAX_BYTES = 3 * 2 ** 29  # fold2d uses the 3-D conv when its stacked taps would exceed this (peak memory)


def latent_scale() -> tuple[np.ndarray, np.ndarray]:
    """(mean, inv_std) exactly as the reference uses them: bf16-rounded, returned as float32 (16,)."""
    bf16 = ml_dtypes.bfloat16
    mean = np.asarray(_LATENT_MEAN, np.float32).astype(bf16)
    std = np.asarray(_LATENT_STD, np.float32).astype(bf16)
    inv_std = (1.0 / std.astype(np.float32)).astype(bf16)
    return mean.astype(np.float32), inv_std.astype(np.float32)


def latent_frames(t_pixel: int) -> int:
    return 1 + (t_pixel - 1) // 4


def pixel_frames(t_latent: int) -> int:
    return 4 * (t_latent - 1) + 1


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.1 VAE hyper-parameters (reference `_video_vae` cfg names) plus how we run it."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # reference spelling
    dtype: Any = jnp.bfloat16  # compute and parameter dtype in production (the reference casts the VAE to bf16)
    conv_impl: str = "fold2d"  # "conv3d": one 3-D conv; "fold2d": the 3 time taps folded into a 2-D conv's channels
    encode_chunk: int = 4  # pixel frames per encoder call after frame 0 (multiple of 4); 0 = whole clip at once
    decode_chunk: int = 1  # latent frames per decoder call after frame 0 (reference: 1); 0 = whole clip at once
    batch_chunk: int = 0  # videos encoded/decoded at once (views of a sample, samples); 0 = all

    def __post_init__(self):
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"WanVAEConfig.conv_impl={self.conv_impl!r}: expected one of {CONV_IMPLS}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("WanVAEConfig.temperal_downsample needs len(dim_mult) - 1 entries")
        if self.encode_chunk < 0 or self.encode_chunk % 4:
            raise ValueError(f"WanVAEConfig.encode_chunk={self.encode_chunk}: must be 0 or a multiple of 4")
        if self.decode_chunk < 0 or self.batch_chunk < 0:
            raise ValueError("WanVAEConfig.decode_chunk and batch_chunk must be >= 0")
        if sum(self.temperal_downsample) != 2 or len(self.dim_mult) != 4:
            # 4x temporal / 8x spatial is what latent_frames() and the chunking below assume (real Wan2.1 config)
            raise ValueError("WanVAEConfig: only the Wan2.1 layout (4 stages, 2 temporal downsamples) is supported")

    @classmethod
    def real(cls, **kw) -> "WanVAEConfig":
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "WanVAEConfig":
        """The parity fixtures' width (dim 8); everything else as the real model."""
        kw.setdefault("dim", 8)
        return cls(**kw)

    @classmethod
    def from_reference_kwargs(cls, kw: dict, **overrides) -> "WanVAEConfig":
        """From the reference `_video_vae`/`WanVAE_` kwargs; refuses options this port does not implement."""
        kw = dict(kw)
        if kw.pop("attn_scales", []) not in ([], ()):
            raise ValueError("WanVAE attn_scales other than [] (attention outside the mid blocks) is not supported")
        if float(kw.pop("dropout", 0.0)) != 0.0:
            raise ValueError("WanVAE dropout != 0 is not supported (inference-only VAE)")
        kw.pop("temporal_window", None)  # a memory device of the reference; results do not depend on it
        known = {"dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"}
        unknown = set(kw) - known
        if unknown:
            raise ValueError(f"WanVAE kwargs not understood: {sorted(unknown)}")
        for k in ("dim_mult", "temperal_downsample"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw, **overrides)

    @property
    def encoder_dims(self) -> list[int]:
        return [self.dim * u for u in (1,) + tuple(self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.dim * u for u in (self.dim_mult[-1],) + tuple(self.dim_mult[::-1])]


# ----------------------------------------------------------------------------------------------------------------
# Ops


def _conv(x: Array, kernel: Array, *, strides, padding, impl: str) -> Array:
    """Cross-correlation, channels-last. x (N, [T,] H, W, C); kernel ([kt,] kh, kw, I, O); time is never padded here."""
    if kernel.ndim == 4:
        return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kt = kernel.shape[0]
    st = strides[0]
    n, tp = x.shape[:2]
    t_out = (tp - kt) // st + 1
    if impl == "fold2d" and x.size // tp * kt * t_out * x.dtype.itemsize > FOLD2D_MAX_BYTES:
        impl = "conv3d"  # the 720p stage: stacking 3 taps of 4+ frames would add >1.5 GB to the peak
    if impl == "conv3d" or kt == 1:
        if kt == 1 and st == 1 and impl != "conv3d":
            y = _conv(x.reshape((n * tp,) + x.shape[2:]), kernel[0], strides=strides[1:], padding=padding, impl=impl)
            return y.reshape((n, tp) + y.shape[1:])
        return jax.lax.conv_general_dilated(x, kernel, strides, ((0, 0),) + tuple(padding),
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    # fold2d: stack the kt time taps along channels and run one 2-D conv over (N * T_out) frames: faster than
    # cuDNN's 3-D conv at every VAE shape on H200 (bench/bench_vae.py), but the stacked input is kt x the conv's.
    taps = [jax.lax.slice_in_dim(x, k, k + st * (t_out - 1) + 1, stride=st, axis=1) for k in range(kt)]
    xs = jnp.concatenate(taps, axis=-1)
    xs = xs.reshape((n * t_out,) + xs.shape[2:])
    kh, kw, ci, co = kernel.shape[1:]
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * ci, co)
    y = jax.lax.conv_general_dilated(xs, k2, strides[1:], padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape((n, t_out) + y.shape[1:])


def _per_frame(fn, x: Array) -> Array:
    n, t = x.shape[:2]
    y = fn(x.reshape((n * t,) + x.shape[2:]))
    return y.reshape((n, t) + y.shape[1:])


def _silu(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


# ----------------------------------------------------------------------------------------------------------------
# Modules


class CausalConv3d(nn.Module):
    """Conv3d with 2*pt zero frames in front (or the cached history) and symmetric zero padding in H, W."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    stride_t: int = 1
    first_frame_passthrough: bool = False  # encoder downsample3d time_conv: frame 0 skips the conv on the first call
    impl: str = "fold2d"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cache: Array | None = None) -> tuple[Array, Array | None]:
        kt, kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kt, kh, kw, x.shape[-1], self.features), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        x = x.astype(self.dtype)
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        if kt == 1:
            return _conv(x, kernel, strides=(1, 1, 1), padding=pad, impl=self.impl) + bias, None
        hist = kt - 1 if self.stride_t == 1 else 1
        if self.first_frame_passthrough:
            # wan2pt1.py Resample.forward (downsample3d): on the first chunk frame 0 is kept as is and only cached;
            # later outputs are valid stride-2 windows (s_{2j-2}, s_{2j-1}, s_{2j}) that include frame 0.
            if cache is None:
                rest = (_conv(x, kernel, strides=(self.stride_t, 1, 1), padding=pad, impl=self.impl) + bias
                        if x.shape[1] >= kt else x[:, :0])
                return jnp.concatenate([x[:, :1], rest], axis=1), x[:, -hist:]
            xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        else:
            if cache is None:
                cache = jnp.zeros((x.shape[0], hist) + x.shape[2:], x.dtype)
            xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        y = _conv(xp, kernel, strides=(self.stride_t, 1, 1), padding=pad, impl=self.impl) + bias
        return y, xp[:, -hist:]


class Conv2d(nn.Module):
    """Per-frame 2-D conv (kernel (kh, kw, I, O)); `padding` as for lax.conv."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple = ((1, 1), (1, 1))
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            self.kernel_size + (x.shape[-1], self.features), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        conv = lambda f: _conv(f, kernel, strides=self.strides, padding=self.padding, impl="") + bias  # noqa: E731
        return _per_frame(conv, x.astype(self.dtype))


class RMSNorm(nn.Module):
    """`F.normalize(x, dim=channels) * sqrt(C) * gamma`: x / max(||x||_2, 1e-12), no mean, no eps in a sqrt."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, 1e-12) * (math.sqrt(c) * gamma)).astype(self.dtype)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> conv3, plus a 1x1x1 shortcut when the width changes."""

    features: int
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, cache):
        c0, c1 = cache if cache is not None else (None, None)
        h = (CausalConv3d(self.features, (1, 1, 1), impl=self.impl, dtype=self.dtype, name="shortcut")(x)[0]
             if x.shape[-1] != self.features else x)
        r = _silu(RMSNorm(self.dtype, name="residual_0")(x))
        r, c0 = CausalConv3d(self.features, impl=self.impl, dtype=self.dtype, name="residual_2")(r, c0)
        r = _silu(RMSNorm(self.dtype, name="residual_3")(r))
        r, c1 = CausalConv3d(self.features, impl=self.impl, dtype=self.dtype, name="residual_6")(r, c1)
        return (r + h).astype(self.dtype), (c0, c1)


class AttentionBlock(nn.Module):
    """Single-head (width C) self-attention over the h*w positions of each frame; no attention across time."""

    dtype: Any

    @nn.compact
    def __call__(self, x: Array, cache=None):
        n, t, hh, ww, c = x.shape
        y = RMSNorm(self.dtype, name="norm")(x)
        qkv = Conv2d(3 * c, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="to_qkv")(y)
        qkv = qkv.reshape(n * t, hh * ww, 3, 1, c)

        def one_frame(f):  # one frame at a time: the (hw)^2 logits of a 720p frame are ~0.8 GB in fp32
            q, k, v = f[:, 0], f[:, 1], f[:, 2]
            logits = jnp.einsum("qhc,khc->hqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
            p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            return jnp.einsum("hqk,khc->qhc", p, v)

        o = jax.lax.map(one_frame, qkv).reshape(n, t, hh, ww, c)
        o = Conv2d(c, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="proj")(o)
        return (o + x).astype(self.dtype), None


class Resample(nn.Module):
    """`downsample2d` | `downsample3d` (spatial then time) | `upsample2d` | `upsample3d` (time then spatial)."""

    mode: str
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, cache):
        c = x.shape[-1]
        if self.mode.startswith("downsample"):
            # ZeroPad2d((0, 1, 0, 1)) then a 3x3 stride-2 conv: pad right/bottom only.
            x = Conv2d(c, (3, 3), (2, 2), ((0, 1), (0, 1)), dtype=self.dtype, name="resample_1")(x)
            if self.mode == "downsample3d":
                x, cache = CausalConv3d(c, (3, 1, 1), stride_t=2, first_frame_passthrough=True, impl=self.impl,
                                        dtype=self.dtype, name="time_conv")(x, cache)
            return x, cache
        if self.mode == "upsample3d":
            x, cache = self._time_upsample(x, cache)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact x2 = pixel repeat
        return Conv2d(c // 2, (3, 3), dtype=self.dtype, name="resample_1")(x), cache

    def _time_upsample(self, x: Array, cache):
        # wan2pt1.py Resample.forward (upsample3d): on the first chunk frame 0 passes through un-doubled and the
        # cache is the "Rep" sentinel, i.e. frames 1.. see zeros, never frame 0, as their history.
        conv = CausalConv3d(2 * x.shape[-1], (3, 1, 1), impl=self.impl, dtype=self.dtype, name="time_conv")
        if cache is None:
            head, x = x[:, :1], x[:, 1:]
            if x.shape[1] == 0:
                return head, jnp.zeros((head.shape[0], 2) + head.shape[2:], head.dtype)
        else:
            head = None
        y, cache = conv(x, cache)
        n, t, hh, ww, c2 = y.shape
        # output frame 2t+s takes channels [s*C:(s+1)*C] (channel-block major)
        y = y.reshape(n, t, hh, ww, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(n, 2 * t, hh, ww, c2 // 2)
        return (y if head is None else jnp.concatenate([head, y], axis=1)), cache


def _run_seq(module, layers, x, cache):
    """Apply named sub-layers in order, threading their caches; sow each output under its reference name."""
    new = {}
    for name, layer in layers:
        x, new[name] = layer(x, None if cache is None else cache[name])
        module.sow("intermediates", name.replace("_", ".") + ".out", x)
    return x, new


class Encoder3d(nn.Module):
    cfg: WanVAEConfig

    @nn.compact
    def __call__(self, x: Array, cache=None):
        cfg, kw = self.cfg, dict(impl=self.cfg.conv_impl, dtype=self.cfg.dtype)
        dims = cfg.encoder_dims
        layers = [("conv1", CausalConv3d(dims[0], name="conv1", **kw))]
        i = 0
        for stage, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                layers.append((f"downsamples_{i}", ResidualBlock(out_dim, name=f"downsamples_{i}", **kw)))
                i += 1
            if stage != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[stage] else "downsample2d"
                layers.append((f"downsamples_{i}", Resample(mode, name=f"downsamples_{i}", **kw)))
                i += 1
        c = dims[-1]
        layers += [("middle_0", ResidualBlock(c, name="middle_0", **kw)),
                   ("middle_1", AttentionBlock(cfg.dtype, name="middle_1")),
                   ("middle_2", ResidualBlock(c, name="middle_2", **kw))]
        x, new = _run_seq(self, layers, x, cache)
        x = _silu(RMSNorm(cfg.dtype, name="head_0")(x))
        x, new["head_2"] = CausalConv3d(2 * cfg.z_dim, name="head_2", **kw)(x, None if cache is None else cache["head_2"])
        self.sow("intermediates", "head.out", x)
        return x, new


class Decoder3d(nn.Module):
    cfg: WanVAEConfig

    @nn.compact
    def __call__(self, x: Array, cache=None):
        cfg, kw = self.cfg, dict(impl=self.cfg.conv_impl, dtype=self.cfg.dtype)
        dims = cfg.decoder_dims
        temperal_upsample = cfg.temperal_downsample[::-1]
        c = dims[0]
        layers = [("conv1", CausalConv3d(c, name="conv1", **kw)),
                  ("middle_0", ResidualBlock(c, name="middle_0", **kw)),
                  ("middle_1", AttentionBlock(cfg.dtype, name="middle_1")),
                  ("middle_2", ResidualBlock(c, name="middle_2", **kw))]
        i = 0
        for stage, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append((f"upsamples_{i}", ResidualBlock(out_dim, name=f"upsamples_{i}", **kw)))
                i += 1
            if stage != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[stage] else "upsample2d"
                layers.append((f"upsamples_{i}", Resample(mode, name=f"upsamples_{i}", **kw)))
                i += 1
        x, new = _run_seq(self, layers, x, cache)
        x = _silu(RMSNorm(cfg.dtype, name="head_0")(x))
        x, new["head_2"] = CausalConv3d(3, name="head_2", **kw)(x, None if cache is None else cache["head_2"])
        return x, new


class WanVAE(nn.Module):
    """`WanVAE_`: encoder + 1x1x1 `conv1` (-> mu, logvar), 1x1x1 `conv2` + decoder. One chunk per call."""

    cfg: WanVAEConfig

    def setup(self):
        kw = dict(impl=self.cfg.conv_impl, dtype=self.cfg.dtype)
        self.encoder = Encoder3d(self.cfg)
        self.decoder = Decoder3d(self.cfg)
        self.conv1 = CausalConv3d(2 * self.cfg.z_dim, (1, 1, 1), **kw)
        self.conv2 = CausalConv3d(self.cfg.z_dim, (1, 1, 1), **kw)

    def encode_chunk(self, x: Array, cache=None):
        """Pixels in [-1, 1] (N, T, H, W, 3) -> (mu_raw, logvar_raw) float32 (N, T', h, w, z), cache."""
        h, cache = self.encoder(x, cache)
        h = self.conv1(h)[0].astype(jnp.float32)
        return h[..., : self.cfg.z_dim], h[..., self.cfg.z_dim:], cache

    def decode_chunk(self, z_raw: Array, cache=None):
        """Un-normalised latents (N, t, h, w, z) -> pixels (N, T, H, W, 3) in the compute dtype, cache."""
        z = self.conv2(z_raw)[0]
        self.sow("intermediates", "conv2.out", z)
        return self.decoder(z, cache)

    def __call__(self, x: Array):  # for init: both halves on a one-frame clip
        mu, _, _ = self.encode_chunk(x)
        return self.decode_chunk(mu)[0]


# ----------------------------------------------------------------------------------------------------------------
# Whole-clip encode / decode (chunked under lax.scan), shape checks, init


class VAEShapeError(ValueError):
    """A clip the Wan VAE cannot take exactly (the reference silently truncates some of these)."""


def check_pixel_shape(shape, what: str = "video") -> None:
    if len(shape) != 5 or shape[-1] != 3:
        raise VAEShapeError(f"{what}: expected (N, T, H, W, 3) channels-last pixels, got shape {tuple(shape)}")
    _, t, h, w, _ = shape
    if t < 1 or (t - 1) % 4:
        raise VAEShapeError(f"{what}: T={t} frames; the Wan VAE needs T = 4k+1 (1, 5, 9, ..., 29, ..., 93)")
    if h % 8 or w % 8 or h == 0 or w == 0:
        raise VAEShapeError(f"{what}: H x W = {h} x {w}; both must be positive multiples of 8")


def check_latent_shape(shape, z_dim: int, what: str = "latent") -> None:
    if len(shape) != 5 or shape[-1] != z_dim or shape[1] < 1:
        raise VAEShapeError(f"{what}: expected (N, t>=1, h, w, {z_dim}) channels-last latents, got {tuple(shape)}")


def init_params(cfg: WanVAEConfig, seed: int = 0) -> dict:
    """Random float32 parameters (benchmarks, tests); real weights come from `weights.vae_keymap`."""
    model = WanVAE(dataclasses.replace(cfg, dtype=jnp.float32))
    x = jnp.zeros((1, 5, 16, 16, 3), jnp.float32)  # 5 frames: every temporal resample path runs its conv
    try:  # one program whatever mesh the caller has set (its compile is ~12 s on a CPU)
        no_mesh = jax.set_mesh(None)
    except ValueError:  # called inside a jit trace: part of the caller's program
        no_mesh = contextlib.nullcontext()
    with no_mesh:
        return jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]


def _stream(step, x: Array, size: int) -> Array:
    """Frame 0 alone, then `size`-frame chunks under lax.scan (causal caches as the carry), then the remainder;
    size 0 = the whole clip in one call."""
    if size == 0:
        return step(x, None)[0]
    y, cache = step(x[:, :1], None)
    outs, rest = [y], x[:, 1:]
    k = rest.shape[1] // size
    if k:
        body = rest[:, : k * size].reshape((rest.shape[0], k, size) + rest.shape[2:]).swapaxes(0, 1)
        cache, ys = jax.lax.scan(lambda c, xc: step(xc, c)[::-1], cache, body)
        outs.append(ys.swapaxes(0, 1).reshape((ys.shape[1], -1) + ys.shape[3:]))
    if rest.shape[1] % size:
        outs.append(step(rest[:, k * size:], cache)[0])
    return jnp.concatenate(outs, axis=1)


def _over_batch(fn, x: Array, batch_chunk: int) -> Array:
    """fn over `batch_chunk` videos at a time (lax.map: one compiled body, memory of one group), then the rest."""
    n = x.shape[0]
    if batch_chunk == 0 or batch_chunk >= n:
        return fn(x)
    k = n // batch_chunk
    body = x[: k * batch_chunk].reshape((k, batch_chunk) + x.shape[1:])
    ys = jax.lax.map(fn, body)
    ys = ys.reshape((k * batch_chunk,) + ys.shape[2:])
    return ys if n == k * batch_chunk else jnp.concatenate([ys, fn(x[k * batch_chunk:])], axis=0)


def encode_moments(params, x: Array, cfg: WanVAEConfig) -> tuple[Array, Array]:
    """Pixels in [-1, 1], (N, T, H, W, 3) -> raw (mu, logvar), float32 (N, 1+(T-1)/4, H/8, W/8, z_dim) each."""
    check_pixel_shape(x.shape)
    model = WanVAE(cfg)
    p = jax.tree.map(lambda a: a.astype(cfg.dtype), params)

    def step(xc, cache):
        mu, logvar, cache = model.apply({"params": p}, xc, cache, method=WanVAE.encode_chunk)
        return jnp.concatenate([mu, logvar], axis=-1), cache

    h = _over_batch(lambda xb: _stream(step, xb.astype(cfg.dtype), cfg.encode_chunk), x, cfg.batch_chunk)
    return h[..., : cfg.z_dim], h[..., cfg.z_dim:]


def encode(params, x: Array, cfg: WanVAEConfig) -> Array:
    """Pixels in [-1, 1], (N, T, H, W, 3) -> normalised latents (mu - mean) * inv_std, float32 (N, T', H/8, W/8, 16).

    No sampling (the reference returns the mean only). N folds views and samples; the reference encodes per view.
    """
    mu, _ = encode_moments(params, x, cfg)
    mean, inv_std = latent_scale()
    return (mu - mean) * inv_std


def decode(params, latent: Array, cfg: WanVAEConfig) -> Array:
    """Normalised latents (N, t, h, w, 16) -> pixels (N, 4(t-1)+1, 8h, 8w, 3), float32, unclamped (≈ [-1, 1])."""
    check_latent_shape(latent.shape, cfg.z_dim)
    model = WanVAE(cfg)
    p = jax.tree.map(lambda a: a.astype(cfg.dtype), params)
    mean, inv_std = latent_scale()
    z = latent.astype(jnp.float32) / inv_std + mean  # the reference divides by the bf16 reciprocal

    def step(zc, cache):
        y, cache = model.apply({"params": p}, zc, cache, method=WanVAE.decode_chunk)
        return y, cache

    y = _over_batch(lambda zb: _stream(step, zb, cfg.decode_chunk), z, cfg.batch_chunk)
    return y.astype(jnp.float32)


def uint8_to_unit(frames: Array, dtype=jnp.bfloat16) -> Array:
    """uint8 [0, 255] -> [-1, 1] as the reference model does (`x / 127.5 - 1` in the compute dtype)."""
    return frames.astype(dtype) / jnp.asarray(127.5, dtype) - jnp.asarray(1.0, dtype)


def unit_to_uint8(x: Array) -> Array:
    """[-1, 1] -> uint8: `x * 127.5 + 127.5` clamped to [0, 255] (reference `normalized_float_to_uint8`)."""
    return jnp.clip(x.astype(jnp.float32) * 127.5 + 127.5, 0, 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------------------------
# FLOP count (convs + attention matmuls, 2 x MACs), for benchmarks


def flops(cfg: WanVAEConfig, t: int, h: int, w: int, which: str) -> float:
    """Analytic FLOPs of `encode` (which="encode", t pixel frames) or `decode` (t latent frames) of one video.

    Counts every conv and the two attention matmuls as 2 x MACs (norms, SiLU, softmax excluded), walking the
    same structure as the modules; wan_vae.md §10 checked this count against torch's FlopCounterMode.
    """
    model = WanVAE(dataclasses.replace(cfg, dtype=jnp.float32))
    if which == "encode":
        x = jax.ShapeDtypeStruct((1, t, h, w, 3), jnp.float32)
        fn = lambda p, a: model.apply({"params": p}, a, method=WanVAE.encode_chunk)  # noqa: E731
    else:
        x = jax.ShapeDtypeStruct((1, t, h, w, cfg.z_dim), jnp.float32)
        fn = lambda p, a: model.apply({"params": p}, a, method=WanVAE.decode_chunk)  # noqa: E731
    params = jax.eval_shape(functools.partial(init_params, cfg))
    jaxpr = jax.make_jaxpr(fn)(params, x)
    return _count_flops(jaxpr.jaxpr)


def _count_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        for sub in jax_core.jaxprs_in_params(eqn.params):
            mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            total += mult * _count_flops(sub)
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            k = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            rhs_spec = dn.rhs_spec  # (out_feature_dim, in_feature_dim, spatial...)
            kin = k[rhs_spec[1]]
            kspatial = np.prod([k[d] for d in rhs_spec[2:]])
            total += 2.0 * np.prod(out) * kin * kspatial / eqn.params.get("feature_group_count", 1)
        elif name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            a = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * np.prod(out) * np.prod([a[d] for d in lc])
    return total

