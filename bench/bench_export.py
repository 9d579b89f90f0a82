"""Peak memory and wall time of `tools/export.py` on a real-size Orbax checkpoint, on the CPU.

    python bench/bench_export.py --dir /tmp/bench_export                 # real 2B network, random weights
    python bench/bench_export.py --dir /tmp/bench_export --num-blocks 7  # a smaller network (scaling rows)
    python bench/bench_export.py --dir /tmp/bench_export --source dcp    # the reference trainer's DCP, 2B

`--source dcp`: the same for a DCP `model/` dir as the reference trainer's 8 FSDP ranks write it (every key of the
reference network, net.* bf16 + net_ema.* fp32, tensors split over 8 rank files).

Phase 1 (own process): an Orbax training checkpoint of the post_train_example network written with the trainer's
Checkpointer, as a real run leaves it: "trainable" (control branch, fp32 master weights), "ema" (fp32) and "frozen"
(the base, bf16), random values. Phase 2 (own process, so its peak RSS is its own): export.export() of that
checkpoint -> model.pt + model_ema_fp32.pt + model_ema_bf16.pt + manifest.json. Prints the checkpoint's weight
bytes, the bytes written, wall time, throughput and the export's peak RSS (ru_maxrss), also relative to the
checkpoint's weight bytes (the design bound: about one copy of the model beyond the interpreter and libraries).
The outputs are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _config(num_blocks: int | None):
    from configs import transfer2_auto_multiview as config_lib

    config = config_lib.get_config("post_train_example")
    if num_blocks:
        config.model.num_blocks = num_blocks
    return config


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_phase(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.common import emit
    from cosmos_jax import build
    from cosmos_jax.training import checkpoint as ckpt_lib
    from cosmos_jax.weights import export

    config = _config(args.num_blocks)
    cfg = build.dit_config_from(config.model)
    shapes = export.param_shapes(cfg)
    names = build.trainable_names(cfg)
    model = {"trainable": {}, "frozen": {}, "ema": {}}
    t0 = time.perf_counter()
    # random values made in place by XLA on the CPU (no temporaries), saved as jax arrays like the trainer's state
    normal = jax.jit(jax.random.normal, static_argnums=(1, 2))
    for i, (path, shape) in enumerate(shapes.items()):
        key = jax.random.fold_in(jax.random.key(0), i)
        if path[0] in names:
            build_leaf(model["trainable"], path, normal(key, shape, jnp.float32))
            build_leaf(model["ema"], path, normal(jax.random.fold_in(key, 1), shape, jnp.float32))
        else:
            build_leaf(model["frozen"], path, normal(key, shape, jnp.bfloat16))
    jax.block_until_ready(model)
    t_gen = time.perf_counter() - t0
    nbytes = sum(a.nbytes for a in jax.tree.leaves(model))
    t0 = time.perf_counter()
    ckpt_dir = os.path.join(args.dir, "checkpoints")
    with ckpt_lib.Checkpointer(ckpt_dir, async_save=False) as c:
        c.save(200, {"model": model}, config=config.to_dict())
    emit({"phase": "write", "num_blocks": cfg.num_blocks,
          "params": int(sum(np.prod(s) for s in shapes.values())),
          "trainable_params": int(sum(np.prod(s) for p, s in shapes.items() if p[0] in names)),
          "weight_bytes": int(nbytes), "generate_s": round(t_gen, 1), "save_s": round(time.perf_counter() - t0, 1),
          "peak_rss_gib": round(_peak_rss_gib(), 2)})


def write_dcp_phase(args) -> None:
    """A DCP `model/` dir as the reference trainer's FSDP ranks leave it: `net.*` bf16 + `net_ema.*` fp32 (every
    key of the reference network), each tensor split over 8 rank files along dim 0, written tensor by tensor."""
    import io
    import pickle

    import numpy as np
    import torch
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from bench.common import emit
    from cosmos_jax import build
    from cosmos_jax.weights import export, keymap

    config = _config(args.num_blocks)
    cfg = build.dit_config_from(config.model)
    shapes = {}
    for e in keymap._entries(cfg):
        shape = export.param_shapes(cfg)[tuple(e.flax_path)][1 if e.stack is not None else 0:]
        shapes[e.ref_key] = tuple(reversed(shape)) if e.kind == "linear" else shape
    for n in range(1, keymap.N_ROPE_OPTIONS + 1):
        shapes.update({f"pos_embedder_options.n_cameras_{n}.seq": (cfg.rope_max_len,),
                       f"pos_embedder_options.n_cameras_{n}.dim_spatial_range": (cfg.rope_dims[1] // 2,),
                       f"pos_embedder_options.n_cameras_{n}.dim_temporal_range": (cfg.rope_dims[0] // 2,)})
    shapes.update({k: () for k in keymap.ACCUM_KEYS})
    shapes.update({k: (0,) for k in export.extra_state_keys(cfg)})
    d = os.path.join(args.dir, "checkpoints", "iter_000000200", "model")
    os.makedirs(d)
    ranks = 8
    files = [open(os.path.join(d, f"__{r}_0.distcp"), "wb") for r in range(ranks)]
    sdm, storage, nbytes = {}, {}, 0
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for prefix, dtype in (("net.", torch.bfloat16), ("net_ema.", torch.float32)):
        for key in export.reference_order(shapes):
            shape = shapes[key]
            if key.endswith("_extra_state"):
                t = torch.empty(0, dtype=torch.uint8)
            elif key in keymap.ACCUM_KEYS and key != "accum_train_in_hours":
                t = torch.tensor(0, dtype=torch.int64)
            else:
                t = torch.randn(shape, generator=g).to(dtype)
            nbytes += t.numel() * t.element_size()
            splits = ranks if t.ndim and t.shape[0] >= ranks and t.shape[0] % ranks == 0 else 1
            chunks = []
            for r in range(splits):
                part = t.narrow(0, r * t.shape[0] // splits, t.shape[0] // splits) if splits > 1 else t
                off = (r * t.shape[0] // splits,) + (0,) * (t.ndim - 1) if t.ndim else ()
                buf = io.BytesIO()
                torch.save(part.clone(), buf)
                start = files[r].tell()
                files[r].write(buf.getvalue())
                storage[md.MetadataIndex(prefix + key, torch.Size(off), r)] = _StorageInfo(
                    f"__{r}_0.distcp", start, len(buf.getvalue()))
                chunks.append(md.ChunkStorageMetadata(offsets=torch.Size(off), sizes=part.shape))
            sdm[prefix + key] = md.TensorStorageMetadata(md.TensorProperties(dtype=t.dtype), t.shape, chunks)
            del t
    for f in files:
        f.close()
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md.Metadata(state_dict_metadata=sdm, planner_data={k: (k,) for k in sdm},
                                storage_data=storage), f)
    with open(os.path.join(args.dir, "checkpoints", "latest_checkpoint.txt"), "w") as f:
        f.write("iter_000000200\n")
    emit({"phase": "write", "source": "dcp", "num_blocks": cfg.num_blocks,
          "params": int(sum(np.prod(s) for s in shapes.values())), "trainable_params": 0,
          "weight_bytes": int(nbytes), "generate_s": 0.0, "save_s": round(time.perf_counter() - t0, 1),
          "peak_rss_gib": round(_peak_rss_gib(), 2)})


def build_leaf(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def export_phase(args) -> None:
    from bench.common import emit
    from cosmos_jax.weights import export
    import torch  # noqa: F401  (imported before the baseline: every export needs it)
    import orbax.checkpoint  # noqa: F401

    base = _peak_rss_gib()
    out = os.path.join(args.dir, "export")
    t0 = time.perf_counter()
    manifest = export.export(os.path.join(args.dir, "checkpoints"), out, progress=args.progress)
    wall = time.perf_counter() - t0
    written = sum(f["bytes"] for f in manifest["files"].values())
    emit({"phase": "export", "wall_s": round(wall, 1), "written_bytes": int(written),
          "write_gib_per_s": round(written / 2**30 / wall, 3), "peak_rss_gib": round(_peak_rss_gib(), 2),
          "rss_after_imports_gib": round(base, 2),
          "files": {n: f["bytes"] for n, f in manifest["files"].items()}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench_export")
    ap.add_argument("--num-blocks", type=int, default=0, help="0 = the real 28")
    ap.add_argument("--phase", choices=("all", "write", "export"), default="all")
    ap.add_argument("--source", choices=("orbax", "dcp"), default="orbax",
                    help="the checkpoint to export: ours (Orbax) or the reference trainer's (DCP, 8 rank files)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the exported files")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default="", help="append the result records (JSON lines) to this file")
    args = ap.parse_args()
    if args.phase == "write":
        return write_dcp_phase(args) if args.source == "dcp" else write_phase(args)
    if args.phase == "export":
        return export_phase(args)

    from bench.common import run_isolated

    if os.path.exists(args.dir):
        shutil.rmtree(args.dir)
    os.makedirs(args.dir)
    common = (["--dir", args.dir, "--num-blocks", str(args.num_blocks), "--source", args.source]
              + (["--progress"] if args.progress else []))
    try:
        w = run_isolated(__file__, ["--phase", "write"] + common, "write checkpoint", args.out or None)
        if not w:
            raise SystemExit("writing the checkpoint failed")
        e = run_isolated(__file__, ["--phase", "export"] + common, "export", args.out or None)
        if not e:
            raise SystemExit("the export failed")
        w, e = w[0], e[0]
        gib = 2**30
        what = ("trainable fp32 + ema fp32 + frozen bf16" if args.source == "orbax"
                else "DCP: net.* bf16 + net_ema.* fp32, 8 rank files")
        print(f"network: {w['num_blocks']} blocks, {w['params'] / 1e9:.3f} B params "
              f"({w['trainable_params'] / 1e9:.3f} B trainable); checkpoint weights {w['weight_bytes'] / gib:.2f} GiB "
              f"({what}); written in {w['save_s']} s, peak RSS {w['peak_rss_gib']} GiB")
        print(f"export: {e['wall_s']} s wall, {e['written_bytes'] / gib:.2f} GiB written "
              f"({e['write_gib_per_s']} GiB/s); peak RSS {e['peak_rss_gib']} GiB = "
              f"{e['peak_rss_gib'] * gib / w['weight_bytes']:.2f} x the checkpoint's weight bytes "
              f"({e['rss_after_imports_gib']} GiB after imports)")
        for name, size in e["files"].items():
            print(f"  {name}: {size / gib:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
