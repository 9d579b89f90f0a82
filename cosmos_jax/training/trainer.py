"""The post-training loop behind `python -m cosmos_jax.train`.

Stages, top to bottom: (1) check the config and set up processes, mesh and job directory; (2) build the data
source (offline cache, or raw videos encoded every step by the VAE and text encoder as the reference does) and its
Grain iterator for this process's data rank; (3) restore the latest complete checkpoint, or build the step-0 state
from the initial weights; (4) loop: next batch -> jitted step (state donated) -> metrics of the previous step read
back while this one runs -> checkpoint every `save_iter` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from cosmos_jax import atomic, build
from cosmos_jax.data import cache as cache_lib
from cosmos_jax.data import layout, pipeline
from cosmos_jax.models import dit as dit_lib
from cosmos_jax.ops import attention as attn_ops
from cosmos_jax.parallel import distributed, mesh as mesh_lib
from cosmos_jax.training import checkpoint as ckpt_lib
from cosmos_jax.training import flops as flops_lib
from cosmos_jax.training import metrics as metrics_lib
from cosmos_jax.training import optim
from cosmos_jax.training import step as step_lib
from cosmos_jax.training import train_stats

# DiT config fields a resumed run must share with the run that wrote the checkpoint (execution fields such as
# remat policy or attention backend may change between runs).
_ARCH_FIELDS = ("model_channels", "num_blocks", "num_heads", "adaln_lora_dim", "vace_block_every_n", "state_t",
                "crossattn_proj_in_channels", "crossattn_emb_channels", "rope_ranges_bf16", "weight_dtype")
# Peak dense bf16 rates for MFU in the logs (datasheet); `trainer.peak_tflops` overrides.
_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0, "GH200": 989.4}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, ...); the last good checkpoint is kept."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def job_dir(config) -> str:
    return os.path.join(config.job.output_root, config.job.project, config.job.group, config.job.name)


# ----------------------------------------------------------------------------------------------------------------
# (1) config checks


def sample_spec(config) -> layout.SampleSpec:
    d = config.data
    return layout.SampleSpec(num_frames=d.num_frames, stride=d.stride, height=d.height, width=d.width)


def check_config(config) -> None:
    """Errors that would otherwise surface deep inside the run, each naming its config field."""
    d, m, t = config.data, config.model, config.trainer
    want_frames = 4 * (m.state_t - 1) + 1
    if d.num_frames != want_frames:
        raise ConfigError(f"data.num_frames={d.num_frames}: the VAE turns 4k+1 frames into k+1 latent frames and the "
                          f"net has model.state_t={m.state_t}, so it needs {want_frames} frames")
    for name in ("height", "width"):
        if d[name] % 16:
            raise ConfigError(f"data.{name}={d[name]} must be a multiple of 16 (8x VAE, 2x2 patches)")
    if not d.cache_dir and not d.dataset_dir:
        raise ConfigError("give data.dataset_dir (raw videos) or data.cache_dir (tools/precompute.py output)")
    for name in ("cache_dir", "dataset_dir"):
        if d[name] and not os.path.isdir(d[name]):
            raise ConfigError(f"data.{name}={d[name]}: no such directory")
    if m.weights and not os.path.exists(m.weights):
        raise ConfigError(f"model.weights={m.weights}: no such file or directory")
    if not d.cache_dir and not config.text.model_dir:
        raise ConfigError("text.model_dir is empty: raw-video training embeds captions every step and needs the "
                          "local Cosmos-Reason1 directory (or train from a cache: data.cache_dir)")
    for name in ("max_iter", "save_iter", "logging_iter"):
        if t[name] <= 0:
            raise ConfigError(f"trainer.{name}={t[name]} must be positive")
    if abs(sum(config.loss.conditional_frames_probs) - 1.0) > 1e-6:
        raise ConfigError(f"loss.conditional_frames_probs={tuple(config.loss.conditional_frames_probs)} must sum to 1")
    probs = tuple(config.loss.conditional_frames_probs)
    if any(p > 0 for p in probs[int(config.model.state_t):]):
        raise ConfigError(f"loss.conditional_frames_probs={probs} draws up to {len(probs) - 1} conditioning latent "
                          f"frames but model.state_t={config.model.state_t}: a step conditioning every frame has "
                          "nothing to denoise (loss 0); give k >= state_t probability 0")


# ----------------------------------------------------------------------------------------------------------------
# (2) data: per-sample latents + text contexts -> the step's batch


def to_step_batch(entries: list[dict]) -> dict[str, np.ndarray]:
    """Cache-format entries (latent (V, t, h, w, 16), latent_control, context (V*512, C), view_indices_selection)
    -> the step's arrays: x0 / latent_control [B, 16, V*t, h, w], context [B, V*512, C], view_indices [B, V*t]."""
    def latent(a):
        v, t, h, w, c = a.shape
        return np.ascontiguousarray(np.transpose(a, (4, 0, 1, 2, 3)).reshape(c, v * t, h, w), np.float32)

    out = {"x0": [], "latent_control": [], "context": [], "view_indices": []}
    for e in entries:
        out["x0"].append(latent(e["latent"]))
        out["latent_control"].append(latent(e["latent_control"]))
        out["context"].append(np.asarray(e["context"], np.float32))
        out["view_indices"].append(np.repeat(np.asarray(e["view_indices_selection"], np.int32),
                                             e["latent"].shape[1]))
    return {k: np.stack(v) for k, v in out.items()}


def _unbatch(raw: dict) -> list[dict]:
    n = len(raw["__key__"])
    return [{k: v[i] for k, v in raw.items()} for i in range(n)]


class OnlineEncoder:
    """Raw samples -> latents and projected text contexts, every step (the reference's online path).

    The VAE batch (views of video and control) is split over this process's devices; the text encoder is
    FSDP-sharded over them. Contexts are projected by the DiT's frozen crossattn_proj here, once per sample.
    """

    def __init__(self, config, dit_cfg, proj_params, n_views: int, mesh):
        from cosmos_jax.text import embed as text_embed

        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self.local_mesh = mesh_lib.make_mesh(data=len(local), fsdp=1, devices=local)
        replicated = NamedSharding(self.local_mesh, P())
        with jax.set_mesh(self.local_mesh):  # every array of the encoders lives on this process's devices
            self.vae_cfg = build.vae_config_from(config.vae)
            self.vae_params = jax.device_put(
                build.init_vae_params(self.vae_cfg, seed=config.seed, weights=config.vae.weights), replicated)
            self.embedder = text_embed.TextEmbedder.from_config(config.text, mesh=self.local_mesh)
            self.proj_params = jax.device_put(jax.tree.map(np.asarray, proj_params), replicated)
        width = self.embedder.cfg.num_hidden_layers * self.embedder.cfg.hidden_size
        if width != dit_cfg.crossattn_proj_in_channels:
            raise ConfigError(f"text.model_dir={config.text.model_dir}: embeddings are {width} wide, the net's "
                              f"crossattn_proj takes model.crossattn_proj_in_channels="
                              f"{dit_cfg.crossattn_proj_in_channels}")
        self.dit_cfg, self.n_views = dit_cfg, n_views
        self._negative = None

    def negative_context(self) -> np.ndarray:
        """The built-in negative prompt's ONE-view context (512, crossattn_emb_channels), embedded and projected
        like the samples' contexts; computed on first use (only when samples are generated) and kept."""
        if self._negative is None:
            with jax.set_mesh(self.local_mesh):
                self._negative = cache_lib.negative_context(self.embedder, self.proj_params, self.dit_cfg)
        return self._negative

    def __call__(self, raw: dict) -> dict[str, np.ndarray]:
        with jax.set_mesh(self.local_mesh):  # this process's devices only, whatever the training mesh spans
            entries = [cache_lib.encode_entry(s, vae_params=self.vae_params, vae_cfg=self.vae_cfg,
                                              n_views=self.n_views, embedder=self.embedder,
                                              proj_params=self.proj_params, dit_cfg=self.dit_cfg, mesh=self.local_mesh)
                       for s in _unbatch(raw)]
        return to_step_batch(entries)


def _cached_encoder(raw: dict) -> dict[str, np.ndarray]:
    return to_step_batch(_unbatch(raw))


def open_cache(config, spec: layout.SampleSpec):
    """The offline cache of data.cache_dir, checked against this run: same sample spec, and text contexts projected
    by the weights this run starts from (or raw)."""
    root = config.data.cache_dir
    path = os.path.join(root, cache_lib.MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(f"data.cache_dir={root}: no {cache_lib.MANIFEST} (make the cache with tools/precompute.py)")
    with open(path) as f:
        manifest = json.load(f)
    want = json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(spec).items())}))
    diff = [f"{k}: cache {manifest.get('spec', {}).get(k)!r} vs data.{k}={v!r}" for k, v in want.items()
            if manifest.get("spec", {}).get(k) != v]
    if diff:
        raise ConfigError(f"{path}: the cache was made for other samples: " + "; ".join(diff))
    if (manifest.get("text") or {}).get("weights") is None:
        raise ConfigError(f"{path}: the cache holds no text contexts (precompute it with --text-dir)")
    projected_by = (manifest.get("text") or {}).get("projected_by")
    if projected_by is not None and projected_by != cache_lib.fingerprint(config.model.weights):
        raise ConfigError(f"{path}: its text contexts were projected by {projected_by.get('path') or 'random'} "
                          f"weights, but model.weights={config.model.weights or '(random init)'}")
    return cache_lib.Cache(root, manifest)


def make_source(config, spec: layout.SampleSpec):
    """The Grain source of the configured data path: cached entries, or raw samples (encoded by OnlineEncoder)."""
    if config.data.cache_dir:
        cache = open_cache(config, spec)
        if config.data.dataset_dir:
            names = [s.name for s in layout.index_dataset(config.data.dataset_dir, spec, skip_bad=config.data.skip_bad,
                                                          probe=False)]
        else:
            names = sorted(f[:-4] for f in os.listdir(cache.root) if f.endswith(".npz"))
        return cache_lib.CachedSource(cache, names)
    return pipeline.make_source(config.data.dataset_dir, spec, skip_bad=config.data.skip_bad)


# ----------------------------------------------------------------------------------------------------------------
# (3) state: shardings, initial weights, restore


def state_shardings(abstract_state, param_sh: dict, mesh, optimizer):
    """Shardings of the state pytree: weights by the logical rules, optimizer moments like their weights,
    everything else (counters, keys) replicated."""
    replicated = NamedSharding(mesh, P())
    model = {k: {n: param_sh[n] for n in v} for k, v in abstract_state["model"].items()}
    trainable_sh = model["trainable"]
    return {"model": model,
            "optim": optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["optim"],
                                           trainable_sh, transform_non_params=lambda _: replicated,
                                           is_leaf=lambda x: isinstance(x, NamedSharding)),
            "trainer": jax.tree.map(lambda _: replicated, abstract_state["trainer"])}


def _check_arch(saved_config: dict | None, config, where: str) -> None:
    if not saved_config:
        return
    saved = saved_config.get("model", {})
    diff = [f"model.{k}: {saved.get(k)!r} there vs {config.model[k]!r} now" for k in _ARCH_FIELDS
            if k in saved and saved.get(k) != config.model[k]]
    if diff:
        raise ConfigError(f"{where} was written by a different network: " + "; ".join(diff))


# ----------------------------------------------------------------------------------------------------------------
# (4) the loop


@dataclasses.dataclass
class _Pending:
    step: int
    metrics: dict
    t_dispatch: float


def _peak_flops(config) -> float | None:
    if config.trainer.get("peak_tflops", 0):
        return config.trainer.peak_tflops * 1e12
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return None
    for name, tf in _PEAK_TFLOPS.items():
        if name in dev.device_kind:
            return tf * 1e12
    return None


def train(config, *, stop_after: int | None = None) -> dict:
    """Run (or resume) the job of `config`; returns a summary. `stop_after`: leave the loop after that many steps
    of this call without a final save (tests: simulates a killed run)."""
    # (1) -------------------------------------------------------------------------------------------------------
    check_config(config)
    distributed.initialize()
    is_main = jax.process_index() == 0
    mesh = build.mesh_from(config.mesh)
    dit_cfg = build.dit_config_from(config.model)
    step_cfg = step_lib.step_config_from(config)
    optimizer = step_lib.optimizer_from(config)
    schedule = optim.lr_schedule(config.optimizer.lr, warm_up_steps=config.scheduler.warm_up_steps,
                                 f_start=config.scheduler.f_start, f_max=config.scheduler.f_max,
                                 f_min=config.scheduler.f_min, cycle_length=config.scheduler.cycle_length)
    shard = distributed.data_shard(mesh, config.data.batch_size)
    spec = sample_spec(config)
    jd = job_dir(config)
    ckpt_dir = os.path.join(jd, "checkpoints")
    config_dict = json.loads(config.to_json())
    if is_main:
        os.makedirs(jd, exist_ok=True)
        if not config.trainer.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
            aside = f"{ckpt_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(ckpt_dir, aside)  # starting over never deletes or overwrites a checkpoint
            print(f"trainer.resume=False: moved the existing checkpoints to {aside}")
        atomic.write_text(os.path.join(jd, "config.json"), json.dumps(config_dict, indent=1))

    with jax.set_mesh(mesh):
        # (2) ---------------------------------------------------------------------------------------------------
        source = make_source(config, spec)
        loader = pipeline.LoaderConfig(batch_size=shard.local_batch, seed=config.seed, shuffle=config.data.shuffle,
                                       num_workers=config.data.num_workers, read_threads=config.data.read_threads,
                                       prefetch=config.data.prefetch)
        data_it = iter(pipeline.make_dataset(source, loader, process_index=shard.rank, process_count=shard.count))

        # (3) ---------------------------------------------------------------------------------------------------
        abstract_boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(dit_cfg, jax.random.key(0)))
        param_sh = mesh_lib.param_shardings(abstract_boxed, mesh)
        abstract_params = nn.unbox(abstract_boxed)
        init_fn = lambda p: step_lib.init_state(p, dit_cfg, step_cfg, optimizer, config.seed)  # noqa: E731
        abstract_state = jax.eval_shape(init_fn, abstract_params)
        state_sh = state_shardings(abstract_state, param_sh, mesh, optimizer)
        checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.trainer.max_to_keep or None,
                                             async_save=config.trainer.async_checkpointing)
        latest = checkpointer.latest_step() if config.trainer.resume else None
        if latest is not None:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                  state_sh)
            # None: the latest complete step, falling back to the one before if it cannot be read
            state, saved_config = checkpointer.restore(None, target, data_iterator=data_it)
            _check_arch(saved_config, config, f"{ckpt_dir}")
            start = int(jax.device_get(state["trainer"]["step"]))
            stats = ckpt_lib.read_stats(checkpointer.step_dir(start))
            if stats is None:  # a checkpoint from before the bookkeeping was kept: as if counted from zero
                stats = train_stats.after_steps(train_stats.initial(), start, config.data.batch_size)
                if is_main:
                    print(f"{ckpt_lib.no_stats_note(checkpointer.step_dir(start))}: counted as from 0 at step 0 "
                          f"with batch {config.data.batch_size}")
            if is_main:
                print(f"resumed from {ckpt_dir} step {start}")
        else:
            # random, or model.weights: a reference .pt / DCP checkpoint / our Orbax checkpoint (regular weights),
            # whose accum_* bookkeeping the run continues (train_stats)
            if config.model.weights:
                host_params, info = build.load_network_params(config.model.weights, dit_cfg)
                params = build.place_params(host_params, dit_cfg, mesh)
                del host_params
                stats = train_stats.initial(info["extras"], config.model.weights)
            else:
                params = build.init_params(dit_cfg, mesh, seed=config.seed)
                stats = train_stats.initial()
            state = jax.jit(init_fn, out_shardings=state_sh)(params)
            del params
            start = int(jax.device_get(state["trainer"]["step"]))

        frozen_host = None
        if not config.data.cache_dir:
            from jax.experimental import multihost_utils

            proj = state["model"]["frozen"]["crossattn_proj"]
            frozen_host = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), proj)
            encode = OnlineEncoder(config, dit_cfg, frozen_host, len(spec.cameras), mesh)
        else:
            encode = _cached_encoder

        batch_sh = {k: distributed.batch_sharding(mesh, n) for k, n in
                    (("x0", 5), ("latent_control", 5), ("context", 3), ("view_indices", 2))}
        step_fn = jax.jit(step_lib.make_train_step(dit_cfg, step_cfg, optimizer),
                          in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0,
                          compiler_options=attn_ops.compiler_options(dit_cfg.attention_backend))

        # (4) ---------------------------------------------------------------------------------------------------
        logger = metrics_lib.MetricsLogger(jd, enabled=is_main)
        peak = _peak_flops(config)
        flops_per_sample = None
        pbar = None
        if is_main:
            from tqdm import tqdm

            pbar = tqdm(total=config.trainer.max_iter, initial=start, desc=config.job.name, unit="step",
                        dynamic_ncols=True)
        window: list[tuple[int, dict, float]] = []
        summary = {"job_dir": jd, "start_step": start, "losses": {}}
        pending: _Pending | None = None
        t_prev = time.perf_counter()
        max_bad = config.trainer.max_nonfinite_steps

        def finish(p: _Pending):
            nonlocal t_prev
            host = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            summary["losses"][p.step] = host["loss"]
            window.append((p.step, host, dt))
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{host['loss']:.4f}", s_per_step=f"{dt:.2f}")
            if host["nonfinite_steps"] >= max_bad:
                n, last = int(host["nonfinite_steps"]), checkpointer.latest_step()
                kept = f"the latest checkpoint {ckpt_lib.step_name(last)} is kept" if last else "no checkpoint yet"
                raise TrainingError(f"{n} consecutive non-finite losses (steps {p.step + 2 - n}..{p.step + 1}); "
                                    f"stopping ({kept} in {ckpt_dir}; the gradients of non-finite steps were "
                                    "zeroed, as the reference does, so saved weights stay finite)")
            if (p.step + 1) % config.trainer.logging_iter == 0 or p.step + 1 == config.trainer.max_iter:
                times = [w[2] for w in window if w[0] != start]  # the first step of a run includes compilation
                step_time = float(np.mean(times)) if times else dt
                scalars = {"loss": host["loss"], "loss_avg": float(np.mean([w[1]["loss"] for w in window])),
                           "lr": float(schedule(p.step)), "grad_norm": host["grad_norm"],
                           "step_time_s": step_time, "samples_per_s": config.data.batch_size / step_time,
                           "nonfinite_steps": host["nonfinite_steps"], "nonfinite_grads": host["nonfinite_grads"]}
                if peak and flops_per_sample:
                    scalars["mfu"] = flops_per_sample * config.data.batch_size / step_time / (peak * mesh.size)
                logger.write(p.step + 1, scalars)
                if is_main:
                    msg = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
                    (pbar.write if pbar is not None else print)(f"step {p.step + 1}: {msg}")
                window.clear()

        held_out = None
        # the samples' unconditional branch: the built-in negative prompt on every view (the reference's
        # neg_t5_text_embeddings); from the cache's negative_context.npy, or embedded by the online encoder
        cached_negative = None
        if config.trainer.sample_iter and config.data.cache_dir:
            cached_negative = source.cache.read_negative()
            if cached_negative is None and is_main:
                print(f"data.cache_dir={config.data.cache_dir} has no negative-prompt context "
                      f"({cache_lib.NEGATIVE}): the samples' unconditional branch uses a dropped caption; re-run "
                      "tools/precompute.py with the same flags on this cache to add it")

        def uncond_context(sample: dict) -> np.ndarray | None:
            negative = encode.negative_context() if isinstance(encode, OnlineEncoder) else cached_negative
            if negative is None:
                return None
            n_tokens = sample["context"].shape[1]
            if n_tokens % negative.shape[0]:
                raise ConfigError(f"the negative-prompt context has {negative.shape[0]} tokens, the samples' "
                                  f"contexts {n_tokens} (not a whole number of views)")
            return cache_lib.tile_views(negative, n_tokens // negative.shape[0])

        def generate_samples(n: int, sample: dict) -> None:
            # the reference's every_n_sample_reg / _ema callbacks (35 steps, guidance 7), on the run's mesh
            from cosmos_jax.inference import pipeline as infer_pipeline

            frames = infer_pipeline.sample_during_training(state["model"], config, sample, n,
                                                           os.path.join(jd, "samples"), mesh=mesh,
                                                           num_steps=config.trainer.sample_steps,
                                                           uncond_context=uncond_context(sample))
            for tag, video in frames.items():
                logger.write_image(n, f"samples/{tag}", video[0])

        try:
            for step in range(start, config.trainer.max_iter):
                if stop_after is not None and step - start >= stop_after:
                    break
                try:
                    raw = next(data_it)
                except StopIteration:
                    raise TrainingError("the data iterator ended (data.num_epochs is limited?)") from None
                local = encode(raw)
                if flops_per_sample is None:
                    _, _, vt, h, w = local["x0"].shape
                    n_views = vt // dit_cfg.state_t
                    flops_per_sample = flops_lib.train_step_flops(dit_cfg, n_views, dit_cfg.state_t, h, w)
                batch = {k: distributed.global_batch_array(v, mesh, config.data.batch_size) for k, v in local.items()}
                if held_out is None:
                    held_out = local  # the sample the periodic generations show (the first batch of this run)
                state, metrics = step_fn(state, batch)
                stats = train_stats.after_steps(stats, 1, config.data.batch_size)
                if pending is not None:
                    finish(pending)
                pending = _Pending(step, metrics, time.perf_counter())
                if config.trainer.sample_iter and (step + 1) % config.trainer.sample_iter == 0:
                    generate_samples(step + 1, held_out)
                if (step + 1) % config.trainer.save_iter == 0 or step + 1 == config.trainer.max_iter:
                    finish(pending)
                    pending = None
                    checkpointer.save(step + 1, state, data_iterator=data_it, config=config_dict, stats=stats)
            if pending is not None:
                finish(pending)
                pending = None
        finally:
            if stop_after is None:
                checkpointer.wait()
            checkpointer.close()
            logger.close()
            if pbar is not None:
                pbar.close()
        summary["end_step"] = int(jax.device_get(state["trainer"]["step"]))
        summary["state"] = state
        summary["stats"] = stats
        return summary
