"""Offline cache of VAE latents and text contexts (the reference re-encodes every step; we encode once).

Layout: `CACHE/manifest.json` says what produced the entries (VAE config + weight fingerprint, text encoder + weight
fingerprint, whether contexts are projected by the DiT's frozen crossattn_proj, sample spec); `CACHE/<name>.npz`
holds one sample: `latent` and `latent_control` (V, t, h, w, 16) float32, `context` (V * 512, C) float32 (C = 1024
projected, 100352 raw), `view_indices_selection`, `fps`; `CACHE/negative_context.npy` (optional) holds the built-in
negative prompt's ONE-view context (512, C) float32, raw or projected like the entries' `context` (the training
hook's unconditional branch tiles it to every view, as the reference's `neg_t5_text_embeddings`; a cache without it
is still valid - a re-run of tools/precompute.py on it adds it). Entries are written atomically; a run skips the ones
that exist (resumable). Opening a cache whose manifest differs from what the current config would produce is an error
naming the differing fields, never a silent use of stale latents.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from cosmos_jax import atomic

MANIFEST = "manifest.json"
NEGATIVE = "negative_context.npy"
FORMAT = 1


class CacheError(ValueError):
    """A stale, foreign or damaged cache (the message names the file and what differs)."""


def fingerprint(path: str) -> dict:
    """Identity of a weight file or directory without hashing gigabytes: names, sizes, mtimes, + a short hash."""
    if not path:
        return {"path": "", "random_init": True}
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, path) if f != path else os.path.basename(f)}:{st.st_size}:{int(st.st_mtime)}"
                 .encode())
    return {"path": os.path.abspath(path), "files": len(files), "digest": h.hexdigest()[:16]}


def producer(*, vae_cfg, vae_weights: str, text_cfg, text_dir: str, projected_by: str | None, spec) -> dict:
    """What a cache entry depends on; compared field by field on open."""
    def plain(obj):
        return {k: (str(v) if not isinstance(v, (int, float, bool, str, tuple, list, type(None))) else v)
                for k, v in sorted(vars(obj).items())} if obj is not None else None

    return {"format": FORMAT,
            "vae": {"config": {k: v for k, v in plain(vae_cfg).items()
                               if k not in ("encode_chunk", "decode_chunk", "batch_chunk", "conv_impl")},
                    "weights": fingerprint(vae_weights)},
            "text": {"config": {k: v for k, v in plain(text_cfg).items()
                                if k not in ("attention_backend", "scan_layers")} if text_cfg else None,
                     "weights": fingerprint(text_dir) if text_cfg else None,
                     "projected_by": fingerprint(projected_by) if projected_by is not None else None},
            "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(spec).items())}}


def _normalise(obj):
    return json.loads(json.dumps(obj))


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [f"{prefix[:-1]}: cache {a!r} vs now {b!r}"] if a != b else []


class Cache:
    """Open (or create) a cache directory for one producer description."""

    def __init__(self, root: str, expected: dict, *, create: bool = False):
        self.root = os.fspath(root)
        self.expected = _normalise(expected)
        path = os.path.join(self.root, MANIFEST)
        if os.path.isfile(path):
            with open(path) as f:
                found = json.load(f)
            diff = _diff(found, self.expected)
            if diff:
                raise CacheError(f"{path}: cache was made by another model/config; refusing it "
                                 f"(delete it or point to another directory):\n  " + "\n  ".join(diff[:12]))
        elif create:
            os.makedirs(self.root, exist_ok=True)
            atomic.write_bytes(path, json.dumps(self.expected, indent=1).encode())
        else:
            raise CacheError(f"{path}: missing (not a cache directory; make one with tools/precompute.py)")

    def path(self, name: str) -> str:
        return os.path.join(self.root, f"{name}.npz")

    def has(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def write(self, name: str, arrays: dict) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic.write_bytes(self.path(name), buf.getvalue())

    def negative_path(self) -> str:
        return os.path.join(self.root, NEGATIVE)

    def write_negative(self, context) -> None:
        """Store the negative prompt's one-view context (512, C) (atomically, float32)."""
        arr = np.asarray(context, np.float32)
        if arr.ndim != 2:
            raise ValueError(f"negative-prompt context of shape {arr.shape}: want one view (512, C)")
        atomic.save_npy(self.negative_path(), arr)

    def read_negative(self) -> np.ndarray | None:
        """The negative prompt's one-view context (512, C) float32, or None when the cache has none (older caches)."""
        path = self.negative_path()
        if not os.path.isfile(path):
            return None
        try:
            arr = np.load(path)
        except Exception as e:
            raise CacheError(f"{path}: damaged negative-prompt context ({e}); delete it and re-run "
                             "tools/precompute.py on this cache") from e
        if arr.ndim != 2:
            raise CacheError(f"{path}: negative-prompt context of shape {arr.shape}, want (512, C)")
        return arr

    def read(self, name: str) -> dict:
        path = self.path(name)
        if not os.path.isfile(path):
            raise CacheError(f"{path}: missing cache entry for sample {name} (run tools/precompute.py)")
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception as e:
            raise CacheError(f"{path}: damaged cache entry ({e})") from e


class CachedSource:
    """Grain random-access source over cached samples (same keys the train step uses from the raw path)."""

    def __init__(self, cache: Cache, names):
        self.cache, self.names = cache, list(names)
        missing = [n for n in self.names if not cache.has(n)]
        if missing:
            raise CacheError(f"{cache.root}: no entries for {len(missing)} samples, e.g. {cache.path(missing[0])}")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        out = self.cache.read(self.names[i])
        out["__key__"] = np.asarray(self.names[i])
        return out


def encode_entry(sample: dict, *, vae_params, vae_cfg, n_views: int, embedder=None, proj_params=None,
                 dit_cfg=None, mesh=None) -> dict:
    """Cache arrays of one raw sample (`layout.load_sample`): VAE latents of every view and control view (one batch,
    sharded over `mesh`'s devices when given) and, with an embedder, the per-view text context (projected when
    `proj_params` - the DiT's crossattn_proj - are given)."""
    import dataclasses

    import jax

    frames = np.concatenate([sample["video"], sample["control_input_hdmap_bbox"]])
    t = frames.shape[0] // (2 * n_views)
    x = frames.reshape((2 * n_views, t) + frames.shape[1:])
    cfg = vae_cfg
    if mesh is not None and mesh.size > 1:
        pad = -len(x) % mesh.size
        x = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
        cfg = dataclasses.replace(vae_cfg, batch_chunk=0)  # the batch is split over devices instead
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names)))
    lat = np.asarray(_encode_jit(cfg)(vae_params, x))[: 2 * n_views]
    return entry_arrays(lat, sample, n_views=n_views, embedder=embedder, proj_params=proj_params, dit_cfg=dit_cfg)


def encode_clips(clips, *, vae_params, vae_cfg, mesh=None) -> np.ndarray:
    """VAE latents (N, t, h, w, 16) of uint8 clips (T, H, W, 3) drawn one group at a time from the iterable `clips`
    (a generator that decodes each clip when asked): one clip per local device of `mesh` per call (one clip
    without a mesh), so only one group of clips and its activations are ever in memory - unlike `encode_entry`,
    which holds every view of a sample at once. Same latents as `encode_entry`."""
    import dataclasses

    import jax

    group = mesh.size if mesh is not None and mesh.size > 1 else 1
    cfg = dataclasses.replace(vae_cfg, batch_chunk=0)
    sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names)) if group > 1
                else None)
    out, pending = [], []

    def flush():
        n = len(pending)
        x = np.stack(pending + [pending[-1]] * (group - n))  # pad the last group by repeating its last clip
        pending.clear()
        if sharding is not None:
            x = jax.device_put(x, sharding)
        out.append(np.asarray(_encode_jit(cfg)(vae_params, x))[:n])

    for clip in clips:
        pending.append(np.asarray(clip))
        if len(pending) == group:
            flush()
    if pending:
        flush()
    return np.concatenate(out)


def entry_arrays(latents: np.ndarray, sample: dict, *, n_views: int, embedder=None, proj_params=None,
                 dit_cfg=None) -> dict:
    """Cache arrays from the latents of a sample's views then control views (2 * n_views, t, h, w, 16) and its
    metadata (`layout.load_sample` or `layout.sample_info`: view_indices_selection, fps, ai_caption)."""
    from cosmos_jax.text import embed as text_embed

    lat = np.asarray(latents)
    out = {"latent": lat[:n_views], "latent_control": lat[n_views:],
           "view_indices_selection": np.asarray(sample["view_indices_selection"]),
           "fps": np.asarray(sample["fps"], np.float32)}
    if embedder is not None:
        context = text_embed.assemble_views(embedder(list(sample["ai_caption"])))
        out["context"] = project(context, proj_params, dit_cfg)
    return out


def project(context, proj_params=None, dit_cfg=None) -> np.ndarray:
    """A (tokens, raw width) context as the cache stores it: float32, projected by the DiT's crossattn_proj
    `proj_params` when given (else raw)."""
    import jax.numpy as jnp

    from cosmos_jax.text import embed as text_embed

    if proj_params is not None:
        context = np.asarray(text_embed.project_context(proj_params, jnp.asarray(context)[None], dit_cfg)[0])
    return np.asarray(context, np.float32)


def negative_context(embedder, proj_params=None, dit_cfg=None) -> np.ndarray:
    """The built-in negative prompt embedded once as ONE view (512, C), projected like `entry_arrays`' context when
    `proj_params` are given. The reference's training batch repeats it to every view (`tile_views`)."""
    from cosmos_jax.text import embed as text_embed

    return project(embedder([text_embed.NEGATIVE_PROMPT])[0], proj_params, dit_cfg)


def tile_views(context: np.ndarray, n_views: int) -> np.ndarray:
    """One view's context (512, C) -> the same on every view (n_views * 512, C), views in order."""
    return np.tile(np.asarray(context), (int(n_views), 1))


_ENCODERS: dict = {}


def _encode_jit(cfg):
    import jax

    from cosmos_jax.models import wan_vae

    if cfg not in _ENCODERS:
        _ENCODERS[cfg] = jax.jit(lambda p, x: wan_vae.encode(p, wan_vae.uint8_to_unit(x, cfg.dtype), cfg))
    return _ENCODERS[cfg]
