"""Multiview inference: spec sample -> videos -> latents -> guided UniPC sampling -> decoded views -> mp4.

The reference path is `cosmos_transfer2/multiview.py` (data preparation, outputs) and
`_src/transfer2_multiview/inference/inference.py` (generation, autoregressive chunks). Per chunk of
4*(state_t-1)+1 pixel frames per view (29 for the 2B model):
  1. the control videos of every active view -> VAE latents (views spread over this process's devices);
  2. the first conditioning frames of every view -> VAE latents `gt`, a per-view mask of their latent frames
     (only those pixel frames are encoded: the causal VAE gives the same first latents as the whole clip);
  3. text: the prompt on the primary view and " " on the others; the unconditional branch puts the built-in
     negative prompt on the primary view; each caption is embedded once and projected by the DiT's crossattn_proj;
  4. noise from numpy's RandomState(seed + chunk), `sampling.sample` (UniPC, shift 5, guidance
     v_c + g (v_c - v_u)) with the DiT on the run's mesh (both guidance branches in one batch of 2);
  5. the latents decoded per view, ((x+1)/2).clip(0,1)*255 truncated to uint8 as the reference's writer.
Autoregressive mode chains chunks that start every chunk-overlap frames; the generated frames replace the input
frames so the next chunk is conditioned on its first `chunk_overlap` generated frames; seed + c for chunk c.

`sample_during_training` is the same generation from the training state on one held-out step batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cosmos_jax import atomic, build
from cosmos_jax.data import video
from cosmos_jax.diffusion import sampling
from cosmos_jax.inference import spec as spec_lib
from cosmos_jax.models import dit as dit_lib, wan_vae
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.ops import attention as attn_ops
from cosmos_jax.parallel import mesh as mesh_lib
from cosmos_jax.text import embed as text_embed

SHIFT = 5.0  # the sampler's sigma shift (reference generate_samples_from_batch default; not a spec field)
GRID = 3     # the reference's 3x3 grid video
LATENT_CHANNELS = 16


class InferenceConfigError(ValueError):
    """A run config that cannot generate; the message names the config field."""


# ----------------------------------------------------------------------------------------------------------------
# Small pure helpers


def chunk_frames(state_t: int) -> int:
    """Pixel frames per view of one generation: 4 * (state_t - 1) + 1 (29 for state_t 8)."""
    return wan_vae.pixel_frames(state_t)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Decoded pixels (about [-1, 1]) -> uint8 as the reference's writer: ((x+1)/2).clip(0,1)*255, truncated."""
    return (np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid_video(views: np.ndarray) -> np.ndarray:
    """(V <= 9, T, H, W, 3) -> (T, 3H, 3W, 3): view i at row i//3, column i%3, empty cells black."""
    v, t, h, w, c = views.shape
    if v > GRID * GRID:
        raise ValueError(f"{v} views do not fit a {GRID}x{GRID} grid")
    out = np.zeros((t, GRID * h, GRID * w, c), views.dtype)
    for i in range(v):
        r, col = divmod(i, GRID)
        out[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = views[i]
    return out


def condition_mask(k_per_view: Sequence[int], t: int, h: int, w: int) -> np.ndarray:
    """[1, 1, V*t, h, w] float32: 1 on the first k[v] latent frames of view v (frames view-major)."""
    m = np.zeros((1, 1, len(k_per_view) * t, h, w), np.float32)
    for v, k in enumerate(k_per_view):
        m[0, 0, v * t:v * t + k] = 1.0
    return m


def views_to_dit(a: np.ndarray) -> np.ndarray:
    """Per-view latents (V, t, h, w, C) -> the DiT layout [1, C, V*t, h, w]."""
    v, t, h, w, c = a.shape
    return np.ascontiguousarray(np.transpose(a, (4, 0, 1, 2, 3)).reshape(1, c, v * t, h, w), np.float32)


def dit_to_views(a: np.ndarray, n_views: int) -> np.ndarray:
    """[1, C, V*t, h, w] -> (V, t, h, w, C)."""
    _, c, vt, h, w = a.shape
    return np.ascontiguousarray(np.transpose(np.asarray(a)[0].reshape(c, n_views, vt // n_views, h, w),
                                             (1, 2, 3, 4, 0)))


def check_config(config) -> None:
    """Config errors that would otherwise surface deep inside a run, each naming its field."""
    d = config.data
    for name in ("height", "width"):
        if d[name] % 16:
            raise InferenceConfigError(f"data.{name}={d[name]} must be a multiple of 16 (8x VAE, 2x2 patches)")
    if not config.text.model_dir:
        raise InferenceConfigError("text.model_dir is empty: inference embeds the prompt with the local "
                                   "Cosmos-Reason1 directory (--config.text.model_dir=DIR)")
    if not config.vae.weights and config.get("variant") != "tiny":
        raise InferenceConfigError("vae.weights is empty: inference needs the Wan2.1 VAE weights "
                                   "(--config.vae.weights=/ckpts/tokenizer.pth); only the tiny config runs a "
                                   "random VAE")
    if config.vae.weights and not os.path.exists(config.vae.weights):
        raise InferenceConfigError(f"vae.weights={config.vae.weights}: no such file")
    step_cache_from(config)


def step_cache_from(config) -> sampling.StepCache | None:
    """The config's `sampler` section -> a StepCache, or None when it is off (or the config has no section)."""
    s = config.get("sampler")
    if s is None or not s.step_cache_threshold:
        return None
    if s.step_cache_threshold < 0 or s.step_cache_max_skips < 1 or s.step_cache_warmup < 2 or s.step_cache_final < 1:
        raise InferenceConfigError(f"sampler: step_cache_threshold={s.step_cache_threshold} needs threshold >= 0, "
                                   f"step_cache_max_skips >= 1, step_cache_warmup >= 2, step_cache_final >= 1")
    return sampling.StepCache(threshold=float(s.step_cache_threshold), max_skips=int(s.step_cache_max_skips),
                              warmup=int(s.step_cache_warmup), final=int(s.step_cache_final))


# ----------------------------------------------------------------------------------------------------------------
# Compiled pieces (cached by their static configuration)


@functools.lru_cache(maxsize=None)
def _sampler(dit_cfg: DiTConfig, mesh: Mesh, num_steps: int, two_branches: bool,
             cache: sampling.StepCache | None = None):
    """jit(params, noise, gt, mask, ctx_cond, ctx_uncond, control, view_ids, control_weight, guidance) -> latent,
    replicated on the mesh (every process can read it). Contexts are already projected."""
    model = dit_lib.MultiViewControlDiT(dit_cfg)
    dtype = dit_cfg.dtype

    def run(params, noise, gt, mask, ctx_cond, ctx_uncond, control, view_ids, control_weight, guidance):
        def net_fn(x, timesteps_B_T, *, crossattn_emb, latent_control_input, condition_video_input_mask_B_C_T_H_W,
                   view_indices_B_T):
            return model.apply({"params": params}, x_B_C_T_H_W=x.astype(dtype), timesteps_B_T=timesteps_B_T,
                               crossattn_emb=crossattn_emb, latent_control_input=latent_control_input.astype(dtype),
                               control_weight=control_weight,
                               condition_video_input_mask_B_C_T_H_W=condition_video_input_mask_B_C_T_H_W.astype(dtype),
                               view_indices_B_T=view_indices_B_T, context_projected=True)

        cond = dict(crossattn_emb=ctx_cond, latent_control_input=control,
                    condition_video_input_mask_B_C_T_H_W=mask, view_indices_B_T=view_ids)
        if two_branches:
            velocity_fn = sampling.branch_velocity_fn(net_fn, cond, {**cond, "crossattn_emb": ctx_uncond})
        else:  # guidance 0: v = v_cond, the unconditional branch is not run
            def velocity_fn(x, t):
                v = net_fn(x, t, **cond)
                return v, v
        return sampling.sample(velocity_fn, noise, num_steps=num_steps, shift=SHIFT, guidance=guidance, gt=gt,
                               condition_mask=mask, cache=cache)

    return jax.jit(run, out_shardings=NamedSharding(mesh, P()),
                   compiler_options=attn_ops.compiler_options(dit_cfg.attention_backend))


@functools.lru_cache(maxsize=None)
def _projector(dit_cfg: DiTConfig):
    return jax.jit(lambda p, e: dit_lib.project_text(p, e, dit_cfg))


@functools.lru_cache(maxsize=None)
def _vae_fn(vae_cfg: wan_vae.WanVAEConfig, kind: str):
    if kind == "encode":
        return jax.jit(lambda p, x: wan_vae.encode(p, wan_vae.uint8_to_unit(x, vae_cfg.dtype), vae_cfg))
    return jax.jit(lambda p, z: wan_vae.decode(p, z, vae_cfg))


class ViewVAE:
    """The frozen VAE over this process's devices: a batch of views is cut into groups of one view per device
    (the reference runs view v on context-parallel rank v, so it needs as many GPUs as views; here any number
    works). One device: the config's batch_chunk decides how many views run at once."""

    def __init__(self, vae_cfg: wan_vae.WanVAEConfig, params, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self.mesh = Mesh(np.asarray(self.devices), ("views",))
        n = len(self.devices)
        self.cfg = vae_cfg if n == 1 else dataclasses.replace(vae_cfg, batch_chunk=0)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

    def _run(self, kind: str, x: np.ndarray) -> np.ndarray:
        fn, n = _vae_fn(self.cfg, kind), len(self.devices)
        if n == 1:
            return np.asarray(fn(self.params, jax.device_put(x, self.devices[0])))
        outs = []
        for i in range(0, len(x), n):
            part = x[i:i + n]
            pad = n - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            out = fn(self.params, jax.device_put(part, NamedSharding(self.mesh, P("views"))))
            outs.append(np.asarray(out)[: n - pad])
        return np.concatenate(outs)

    def encode(self, frames_u8: np.ndarray) -> np.ndarray:
        """uint8 (V, T, H, W, 3) -> normalised latents (V, 1 + (T-1)//4, H/8, W/8, 16) float32."""
        return self._run("encode", np.asarray(frames_u8, np.uint8))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(V, t, h, w, 16) -> pixels (V, 4(t-1)+1, 8h, 8w, 3) float32, about [-1, 1]."""
        return self._run("decode", np.asarray(latents, np.float32))


@functools.lru_cache(maxsize=2)
def vae_params(vae_cfg: wan_vae.WanVAEConfig, weights: str, seed: int):
    """The frozen VAE's parameters (loaded or, without weights, randomly initialised) once per process."""
    return jax.device_get(build.init_vae_params(vae_cfg, seed=seed, weights=weights))


def _local_devices(mesh: Mesh) -> list:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def place_params(numpy_params: dict, dit_cfg: DiTConfig, mesh: Mesh, weight_dtype) -> dict:
    """Host fp32 parameters -> device arrays in `weight_dtype`, sharded on `mesh` by the logical rules."""
    boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(dit_cfg, jax.random.key(0)))
    shardings = mesh_lib.param_shardings(boxed, mesh)
    dtype = jnp.dtype(weight_dtype)
    return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a).astype(dtype), s), numpy_params, shardings)


def sample_latent(params, dit_cfg: DiTConfig, mesh: Mesh, *, noise, gt, mask, ctx_cond, ctx_uncond, control,
                  view_ids, control_weight: float, guidance: float, num_steps: int,
                  cache: sampling.StepCache | None = None) -> np.ndarray:
    """The guided UniPC loop on the mesh; every argument in the DiT layout (batch 1). ctx_uncond None or guidance
    0 runs the conditional branch only. Returns the final latent [1, C, V*t, h, w] (host).

    The net's batch (the two guidance branches) must split over mesh.data x mesh.fsdp: when that is more than 2,
    the sample runs as identical copies, one per batch shard (the same wall time as one copy; the devices of the
    context axis share each copy's work)."""
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    two = ctx_uncond is not None and guidance != 0
    copies = n_batch // 2 if two and n_batch % 2 == 0 else n_batch

    def rep(a):
        return np.repeat(np.asarray(a), copies, axis=0)

    fn = _sampler(dit_cfg, mesh, int(num_steps), two, cache)
    with jax.set_mesh(mesh):
        out = fn(params, rep(noise), rep(gt), rep(mask), rep(ctx_cond), rep(ctx_uncond) if two else None,
                 rep(control), rep(view_ids), jnp.float32(control_weight), jnp.float32(guidance))
        return np.asarray(out[:1])


# ----------------------------------------------------------------------------------------------------------------
# The spec pipeline


@dataclasses.dataclass
class SampleResult:
    name: str
    frames: np.ndarray     # uint8 (V, N, H, W, 3)
    paths: list[str]
    seconds: float


class MultiviewPipeline:
    """The network, VAE and text encoder of a run config with weights from a checkpoint; `generate` one sample."""

    def __init__(self, config, checkpoint_path: str, *, ema: bool = True):
        check_config(config)
        self.config = config
        self.dit_cfg = build.dit_config_from(config.model)
        self.mesh = build.mesh_from(config.mesh)
        self.height, self.width = int(config.data.height), int(config.data.width)
        self.chunk_frames = chunk_frames(self.dit_cfg.state_t)
        local = _local_devices(self.mesh)

        # weights: files hold the weights to use under net.* (the released *_ema_bf16.pt, our model_ema_*.pt);
        # checkpoint directories (Orbax, DCP) hold both: the EMA by default, as the reference's model_ema files
        path = os.fspath(checkpoint_path)
        use_ema = ema and os.path.isdir(path)
        try:
            host, info = build.load_network_params(path, self.dit_cfg, ema=use_ema)
        except ValueError as e:
            hint = " (load the regular weights with --noema)" if use_ema and "EMA" in str(e) else ""
            raise InferenceConfigError(f"checkpoint_path: {e}{hint}") from None
        self.checkpoint_info = {k: v for k, v in info.items() if k != "extras"}
        self.params = place_params(host, self.dit_cfg, self.mesh, config.model.weight_dtype)
        del host

        vae_cfg = build.vae_config_from(config.vae)
        self.vae = ViewVAE(vae_cfg, vae_params(vae_cfg, config.vae.weights, int(config.seed)), local)
        self.text_mesh = mesh_lib.make_mesh(data=1, fsdp=len(local), devices=local)
        with jax.set_mesh(self.text_mesh):
            self.embedder = text_embed.TextEmbedder.from_config(config.text, mesh=self.text_mesh)
        width = self.embedder.cfg.num_hidden_layers * self.embedder.cfg.hidden_size
        if width != self.dit_cfg.crossattn_proj_in_channels:
            raise InferenceConfigError(f"text.model_dir={config.text.model_dir}: embeddings are {width} wide, the "
                                       f"net takes model.crossattn_proj_in_channels="
                                       f"{self.dit_cfg.crossattn_proj_in_channels}")
        self._caption_cache: dict[str, np.ndarray] = {}
        self.step_cache = step_cache_from(config)

    # -- inputs ------------------------------------------------------------------------------------------------
    def plan(self, sample: spec_lib.SampleSpec) -> spec_lib.FramePlan:
        return spec_lib.plan_frames(sample, self.chunk_frames)

    def _read(self, sample, key: str, field: str, n: int, stride: int) -> np.ndarray:
        path = getattr(sample.views[key], field)
        try:
            frames = video.read_frames(path, [i * stride for i in range(n)])
        except video.VideoError as e:
            raise spec_lib.SpecError(f"{sample.source}: {key}.{field}: {e}") from None
        return video.resize(frames, (self.height, self.width))

    def read_videos(self, sample: spec_lib.SampleSpec, plan: spec_lib.FramePlan):
        """(controls uint8 (V, N, H, W, 3), inputs uint8 (V, n_cond, H, W, 3) or None), views in order."""
        controls = np.stack([self._read(sample, k, "control_path", plan.frames, plan.stride)
                             for k in sample.active_views])
        inputs = None
        if plan.input_frames:
            inputs = np.stack([self._read(sample, k, "input_path", plan.input_frames, plan.stride)
                               for k in sample.active_views])
        return controls, inputs

    def _projected(self, caption: str) -> np.ndarray:
        """(512, crossattn_emb_channels): one caption embedded and projected by the DiT's crossattn_proj."""
        if caption not in self._caption_cache:
            with jax.set_mesh(self.text_mesh):
                emb = self.embedder([caption])
            with jax.set_mesh(self.mesh):
                proj = _projector(self.dit_cfg)(self.params["crossattn_proj"], jnp.asarray(emb, self.dit_cfg.dtype))
                self._caption_cache[caption] = np.asarray(proj[0])
        return self._caption_cache[caption]

    def contexts(self, prompt: str, n_views: int, primary: int) -> tuple[np.ndarray, np.ndarray]:
        """Projected text contexts [1, V*512, D] of the conditional and unconditional branches."""
        cond = text_embed.inference_view_captions(prompt, n_views, primary)
        uncond = text_embed.negative_view_captions(n_views, primary)
        ctx = [text_embed.assemble_views(np.stack([self._projected(c) for c in caps]))[None] for caps in (cond, uncond)]
        return ctx[0], ctx[1]

    # -- generation --------------------------------------------------------------------------------------------
    def generate_chunk(self, *, controls: np.ndarray, cond_frames: np.ndarray | None, k_per_view: Sequence[int],
                       view_ids: Sequence[int], ctx_cond, ctx_uncond, seed: int, guidance: float,
                       control_weight: float, num_steps: int) -> np.ndarray:
        """One chunk: controls uint8 (V, L, H, W, 3), cond_frames uint8 (V, >= pixel frames of max k, H, W, 3) ->
        decoded pixels float32 (V, L, H, W, 3)."""
        n_views = controls.shape[0]
        lat_control = self.vae.encode(controls)
        _, t, h, w, c = lat_control.shape
        gt = np.zeros_like(lat_control)
        k_max = max(k_per_view)
        if k_max:
            gt[:, :k_max] = self.vae.encode(cond_frames[:, :wan_vae.pixel_frames(k_max)])
        latent = sample_latent(
            self.params, self.dit_cfg, self.mesh,
            noise=sampling.initial_noise(seed % 2 ** 32, (1, c, n_views * t, h, w)), gt=views_to_dit(gt),
            mask=condition_mask(k_per_view, t, h, w), ctx_cond=ctx_cond, ctx_uncond=ctx_uncond,
            control=views_to_dit(lat_control),
            view_ids=np.repeat(np.asarray(view_ids, np.int32), t)[None], control_weight=control_weight,
            guidance=guidance, num_steps=num_steps, cache=self.step_cache)
        return self.vae.decode(dit_to_views(latent, n_views))

    def generate(self, sample: spec_lib.SampleSpec, plan: spec_lib.FramePlan, progress=None) -> np.ndarray:
        """All chunks of a sample -> uint8 (V, plan.frames, H, W, 3) (reference generate_from_batch /
        generate_autoregressive_from_batch)."""
        controls, inputs = self.read_videos(sample, plan)
        n_views, length, overlap = len(sample.active_views), plan.chunk_frames, sample.chunk_overlap
        ctx_cond, ctx_uncond = self.contexts(sample.prompt, n_views, sample.primary)
        first = sample.conditional_frames()
        # the input video, overwritten by generated frames as chunks complete (only frames that condition a chunk
        # are ever read: the first chunk's from the files, later ones generated)
        current = np.zeros((n_views, plan.frames) + controls.shape[2:], np.uint8)
        if inputs is not None:
            current[:, :inputs.shape[1]] = inputs
        pieces = []
        starts = spec_lib.chunk_starts(length, overlap, plan.num_chunks)
        for c, start in enumerate(starts):
            end = start + length
            k = [spec_lib.latent_frames(n) for n in first] if c == 0 else [spec_lib.latent_frames(overlap)] * n_views
            pixels = self.generate_chunk(
                controls=controls[:, start:end], cond_frames=current[:, start:end], k_per_view=k,
                view_ids=sample.view_ids, ctx_cond=ctx_cond, ctx_uncond=ctx_uncond, seed=sample.seed + c,
                guidance=sample.guidance, control_weight=sample.control_weight, num_steps=sample.num_steps)
            frames = to_uint8(pixels)
            pieces.append(frames if c == 0 else frames[:, overlap:])
            if c + 1 < len(starts):  # generated frames replace the input from the conditioning frames on
                keep = max(first) if c == 0 else overlap
                current[:, start + keep:end] = frames[:, keep:]
            if progress is not None:
                progress.update(1)
        return np.concatenate(pieces, axis=1)

    # -- outputs -----------------------------------------------------------------------------------------------
    @staticmethod
    def write_outputs(sample: spec_lib.SampleSpec, frames: np.ndarray, out_dir: str) -> list[str]:
        """`<name>.mp4` (views one after another in time) or `<name>_<view>.mp4` + `<name>_grid.mp4`, then
        `<name>.json`; every file is written atomically, the spec last."""
        base = os.path.join(out_dir, sample.name)
        paths = []
        if sample.save_combined_views:
            paths.append(f"{base}.mp4")
            video.write_video(paths[-1], frames.reshape((-1,) + frames.shape[2:]), sample.fps)
        else:
            for key, view in zip(sample.active_views, frames):
                paths.append(f"{base}_{key}.mp4")
                video.write_video(paths[-1], view, sample.fps)
            paths.append(f"{base}_grid.mp4")
            video.write_video(paths[-1], grid_video(frames), sample.fps)
        paths.append(f"{base}.json")
        atomic.write_text(paths[-1], json.dumps(sample.to_dict(), indent=1))
        return paths


def run(config, samples: Sequence[spec_lib.SampleSpec], out_dir: str, checkpoint_path: str, *, ema: bool = True,
        log=print) -> list[SampleResult]:
    """Generate every sample into out_dir. All samples (spec, videos' fps and lengths) are checked before the
    model loads; a bad one raises SpecError and nothing is written for it."""
    from tqdm import tqdm

    check_config(config)
    state_t = int(config.model.state_t)
    plans = [spec_lib.plan_frames(s, chunk_frames(state_t)) for s in samples]
    for s, p in zip(samples, plans):
        if s.enable_autoregressive and p.num_chunks < s.num_chunks:
            log(f"{s.name}: num_chunks={s.num_chunks} needs more frames than the control videos have "
                f"({p.available} per view at fps {s.fps}); generating {p.num_chunks}")
    pipe = MultiviewPipeline(config, checkpoint_path, ema=ema)
    is_main = jax.process_index() == 0
    info = pipe.checkpoint_info
    if is_main:
        log(f"weights: {info['path']} ({info['format']}{', step ' + str(info['step']) if info['step'] else ''}"
            f"{', EMA' if info['ema'] else ''}); mesh {dict(pipe.mesh.shape)}")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    results = []
    bar = tqdm(total=sum(p.num_chunks for p in plans), unit="chunk", dynamic_ncols=True, disable=not is_main)
    try:
        for s, p in zip(samples, plans):
            bar.set_description(s.name)
            t0 = time.perf_counter()
            frames = pipe.generate(s, p, progress=bar)
            paths = pipe.write_outputs(s, frames, out_dir) if is_main else []
            if is_main and not results:  # the run's config, once a sample is written (a failed run leaves the
                atomic.write_text(os.path.join(out_dir, "config.json"), config.to_json(indent=1))  # old one intact)
            results.append(SampleResult(s.name, frames, paths, time.perf_counter() - t0))
            if is_main:
                bar.write(f"{s.name}: {len(s.active_views)} views x {p.frames} frames at {s.fps} fps in "
                          f"{results[-1].seconds:.1f} s -> {', '.join(os.path.basename(q) for q in paths)}")
    finally:
        bar.close()
    return results


# ----------------------------------------------------------------------------------------------------------------
# Training hook


_HOOK_VAE: dict = {}


def _hook_vae(config, mesh: Mesh) -> ViewVAE:
    vae_cfg = build.vae_config_from(config.vae)
    key = (vae_cfg, config.vae.weights, int(config.seed), tuple(_local_devices(mesh)))
    if key not in _HOOK_VAE:
        _HOOK_VAE[key] = ViewVAE(vae_cfg, vae_params(*key[:3]), _local_devices(mesh))
    return _HOOK_VAE[key]


def sample_during_training(model_state: dict, config, batch: dict, step: int, out_dir: str, *, mesh: Mesh | None = None,
                           vae: ViewVAE | None = None, num_steps: int = 35, guidance: float = 7.0, seed: int = 0,
                           conditional_latent_frames: int = 1, control_weight: float = 1.0, fps: int = 10,
                           uncond_context=None) -> dict[str, np.ndarray]:
    """Generate the first sample of a training step batch with the regular and (if present) EMA weights, write
    `<out_dir>/sample_{reg,ema}_iter_{step:09d}.mp4` (the 3x3 view grid) and return {"reg"/"ema": uint8 grid
    frames (T, 3H, 3W, 3)} (e.g. for a TensorBoard image of frame 0). The reference's every_n_sample_reg/_ema
    callbacks: 35 steps, guidance 7, fps 10.

    model_state: the training state's "model" item {"trainable", "frozen", optional "ema"}. batch: the trainer's
    step batch (x0, latent_control [B, 16, V*T, h, w], context [B, V*512, raw or projected], view_indices
    [B, V*T]; host or device arrays). The first `conditional_latent_frames` latent frames of every view come from
    x0. The unconditional branch uses `uncond_context` ([V*512, C] or [1, V*512, C], raw or projected - raw ones are
    projected like the batch context; the trainer passes the built-in negative prompt on every view, as the
    reference's `neg_t5_text_embeddings`) or, by default, the context of a dropped caption (the projection of
    zeros) that training's CFG dropout teaches. Every process must call it (the DiT runs on the mesh); process 0
    writes.
    """
    dit_cfg = build.dit_config_from(config.model)
    mesh = build.mesh_from(config.mesh) if mesh is None else mesh
    vae = _hook_vae(config, mesh) if vae is None else vae
    weight_dtype = jnp.dtype(config.model.weight_dtype)
    frozen = model_state["frozen"]
    with jax.set_mesh(mesh):
        x0 = np.asarray(jax.device_get(batch["x0"]))[:1].astype(np.float32)
        control = np.asarray(jax.device_get(batch["latent_control"]))[:1].astype(np.float32)
        view_ids = np.asarray(jax.device_get(batch["view_indices"]))[:1].astype(np.int32)
        context = jnp.asarray(np.asarray(jax.device_get(batch["context"]))[:1], dit_cfg.dtype)
        _, c, vt, h, w = x0.shape
        n_views = vt // dit_cfg.state_t
        if not text_embed.context_is_projected(context.shape[-1], dit_cfg):  # raw embeddings: project them once
            context = _projector(dit_cfg)(frozen["crossattn_proj"], context)
        if uncond_context is None:  # a dropped caption: the projection of zeros, the same for every token
            uncond_context = jnp.broadcast_to(text_embed.dropped_context(frozen["crossattn_proj"], dit_cfg, 1),
                                              context.shape)
        else:  # e.g. the negative prompt on every view: raw or projected, [V*512, C] or [1, V*512, C]
            uncond = np.asarray(jax.device_get(uncond_context))
            uncond = uncond[None] if uncond.ndim == 2 else uncond[:1]
            if uncond.ndim != 3 or uncond.shape[1] != context.shape[1]:
                raise ValueError(f"uncond_context of shape {np.shape(uncond_context)}: want [{context.shape[1]}, C] "
                                 f"or [1, {context.shape[1]}, C] (the batch context's {context.shape[1]} tokens)")
            uncond_context = jnp.asarray(uncond, dit_cfg.dtype)
            if not text_embed.context_is_projected(uncond_context.shape[-1], dit_cfg):
                uncond_context = _projector(dit_cfg)(frozen["crossattn_proj"], uncond_context)
        context, uncond_context = np.asarray(context), np.asarray(uncond_context)
    k = min(int(conditional_latent_frames), dit_cfg.state_t)
    mask = condition_mask([k] * n_views, dit_cfg.state_t, h, w)
    out: dict[str, np.ndarray] = {}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
    for tag, weights in (("reg", model_state["trainable"]), ("ema", model_state.get("ema"))):
        if weights is None:
            continue
        params = build.merge_params(jax.tree.map(lambda p: p.astype(weight_dtype), weights), frozen)
        latent = sample_latent(params, dit_cfg, mesh, noise=sampling.initial_noise(seed, x0.shape), gt=x0,
                               mask=mask, ctx_cond=context, ctx_uncond=uncond_context, control=control,
                               view_ids=view_ids, control_weight=control_weight, guidance=guidance,
                               num_steps=num_steps)
        grid = grid_video(to_uint8(vae.decode(dit_to_views(latent, n_views))))
        out[tag] = grid
        if jax.process_index() == 0:
            video.write_video(os.path.join(out_dir, f"sample_{tag}_iter_{step:09d}.mp4"), grid, fps)
    return out
