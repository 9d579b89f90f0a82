"""The post-training step over several GPUs: mesh layouts compared on the same devices.

    python bench/bench_multigpu.py                                    # 8 GPUs: c8, f2c4, d2c4, f8 at 7 views, 720p
    python bench/bench_multigpu.py --layouts c8,c4d2 --profile --ckpt /tmp/bench_ckpt
    python bench/bench_multigpu.py --variant tiny --fake_devices 8 --layouts c4,f2c2,d2c4 --views 3 --height 8 \
        --width 12 --iters 1                                          # CPU smoke run of the whole script

A layout names mesh axis sizes: d (data), f (fsdp), c (context), t (tensor), e.g. `f2c4` = fsdp 2 x context 4; their
product is the number of devices used (the first N). Each layout runs in its own process (its own peak memory): the
trainer's own state shardings and jitted step (cosmos_jax.training: loss, control-branch gradients, clipping, AdamW on
fp32 masters, EMA), synthetic latents, one sample per data x fsdp shard (global batch = data x fsdp, so s/sample is
the comparable figure). Per layout: compile time, step time, s/sample, peak memory per device (the largest), model
TFLOP/s per device and its ratio to the bf16 matmul rate measured in the same run (`--matmul`; nominal 785 otherwise).
`--profile`: one profiled step, GPU kernel time by kind (bench/profile_step.py), with collectives (NCCL kernels:
all-to-all, all-gather, reduce-scatter, all-reduce) as their own kind and their share of the step. `--ckpt DIR`: the
Orbax save (until committed) and restore time of the sharded train state. Rows are printed with their ratio to the
first layout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NOMINAL = 785e12
AXES = {"d": "data", "f": "fsdp", "c": "context", "t": "tensor"}


def parse_layout(text: str) -> dict:
    """'f2c4' -> {'data': 1, 'fsdp': 2, 'context': 4, 'tensor': 1}."""
    parts = re.findall(r"([dfct])(\d+)", text)
    if not parts or "".join(a + n for a, n in parts) != text:
        raise ValueError(f"layout {text!r}: expected axis letters d/f/c/t each followed by a size, e.g. f2c4")
    sizes = {name: 1 for name in AXES.values()}
    for letter, n in parts:
        sizes[AXES[letter]] = int(n)
    return sizes


def child(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from bench.common import emit, time_steps
    from bench.profile_step import count_ops, profile_once
    from configs import transfer2_auto_multiview as cfg_file
    from cosmos_jax import build
    from cosmos_jax.models import dit as dit_lib
    from cosmos_jax.ops import attention as attn_ops
    from cosmos_jax.parallel import distributed, mesh as mesh_lib
    from cosmos_jax.training import flops as flops_lib
    from cosmos_jax.training import step as step_lib
    from cosmos_jax.training import trainer as trainer_lib

    sizes = parse_layout(args.layout)
    n = int(np.prod(list(sizes.values())))
    row = {"layout": args.layout, "devices": n, **sizes, "views": args.views, "remat": args.remat}
    try:
        if n > jax.device_count():
            raise ValueError(f"layout {args.layout} needs {n} devices, {jax.device_count()} visible")
        config = cfg_file.get_config(args.variant)
        config.unlock()
        config.model.remat_policy = args.remat
        config.model.attention_backend = args.attention
        cfg = build.dit_config_from(config.model)
        row["attention"] = cfg.attention_backend
        step_cfg = step_lib.step_config_from(config)
        optimizer = step_lib.optimizer_from(config)
        mesh = mesh_lib.make_mesh(**sizes, devices=jax.devices()[:n])
        v, t, h, w = args.views, cfg.state_t, args.height, args.width
        batch_size = sizes["data"] * sizes["fsdp"]
        row["batch"] = batch_size
        row["model_tflop_per_step"] = batch_size * flops_lib.train_step_flops(cfg, v, t, h, w) / 1e12
        with jax.set_mesh(mesh):
            abstract_boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(cfg, jax.random.key(0)))
            param_sh = mesh_lib.param_shardings(abstract_boxed, mesh)
            init_fn = lambda p: step_lib.init_state(p, cfg, step_cfg, optimizer, 0)  # noqa: E731
            abstract_state = jax.eval_shape(init_fn, nn.unbox(abstract_boxed))
            state_sh = trainer_lib.state_shardings(abstract_state, param_sh, mesh, optimizer)
            state = jax.jit(init_fn, out_shardings=state_sh)(build.init_params(cfg, mesh, seed=0))
            ks = jax.random.split(jax.random.key(1), 3)
            shapes = {"x0": (batch_size, 16, v * t, h, w), "latent_control": (batch_size, 16, v * t, h, w),
                      "context": (batch_size, v * 512, cfg.crossattn_emb_channels)}
            batch = {k: jax.device_put(jax.random.normal(kk, s, jnp.float32),
                                       distributed.batch_sharding(mesh, len(s)))
                     for kk, (k, s) in zip(ks, shapes.items())}
            batch["view_indices"] = jax.device_put(
                jnp.tile(jnp.repeat(jnp.arange(v, dtype=jnp.int32), t)[None], (batch_size, 1)),
                distributed.batch_sharding(mesh, 2))
            batch_sh = {k: x.sharding for k, x in batch.items()}
            step_fn = jax.jit(step_lib.make_train_step(cfg, step_cfg, optimizer), in_shardings=(state_sh, batch_sh),
                              out_shardings=(state_sh, None), donate_argnums=0,
                              compiler_options=attn_ops.compiler_options(cfg.attention_backend))
            t0 = time.perf_counter()
            compiled = step_fn.lower(state, batch).compile()
            row["compile_s"] = time.perf_counter() - t0
            hlo = compiled.as_text()
            row["hlo_collectives"] = count_ops(hlo, ("all-to-all", "all-gather", "reduce-scatter", "all-reduce"))
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            state, m, times = time_steps(compiled, state, batch, args.iters)
            row["step_s"] = times[len(times) // 2]
            row["s_per_sample"] = row["step_s"] / batch_size
            row["loss"] = float(m["loss"])
            peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat]
            row["peak_gib_max"] = max(peaks) / 2 ** 30
            row["tflops_per_device"] = row["model_tflop_per_step"] / row["step_s"] / n
            if args.profile:
                state, prof = profile_once(compiled, state, batch)
                row["by_kind_s"] = prof.get("by_kind_s")
                busy = sum((prof.get("by_kind_s") or {}).values())
                if busy:
                    row["collective_share"] = (prof["by_kind_s"].get("collective", 0.0)) / busy
                with open(os.path.join(args.out, f"profile_multigpu_{args.layout}.json"), "w") as fh:
                    json.dump(prof, fh, indent=1)
            if args.ckpt:
                from cosmos_jax.training import checkpoint as ckpt_lib

                directory = os.path.join(args.ckpt, args.layout)
                with ckpt_lib.Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
                    t0 = time.perf_counter()
                    ckpt.save(1, state, config=json.loads(config.to_json()), force=True)
                    ckpt.wait()
                    row["ckpt_save_s"] = time.perf_counter() - t0
                    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                          state)
                    t0 = time.perf_counter()
                    restored, _ = ckpt.restore(1, target)
                    jax.block_until_ready(restored)
                    row["ckpt_restore_s"] = time.perf_counter() - t0
                    row["ckpt_restore_equal"] = bool(all(jax.tree.leaves(jax.tree.map(
                        lambda a, b: bool(jnp.array_equal(a, b)), restored["model"]["trainable"],
                        state["model"]["trainable"]))))
    except Exception as e:  # OOM, a layout that cannot split the shapes, ...: report and let the parent go on
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    emit(row)


def parent(args) -> None:
    from bench.common import run_isolated

    out = os.path.join(args.out, "bench_multigpu.jsonl")
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    mm = NOMINAL
    if args.matmul:
        base = run_isolated(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py"),
                            ["--matmul"], "matmul", out)[0]
        mm = base["matmul_tflops"] * 1e12
        print(f"device: {base['device']}, jax {base['jax']}; best bf16 matmul per device in this run "
              f"{mm / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for layout in args.layouts.split(","):
        parse_layout(layout)  # a typo stops here, before any child runs
        argv = ["--child", "--layout", layout, "--views", str(args.views), "--remat", args.remat,
                "--attention", args.attention, "--variant", args.variant, "--iters", str(args.iters),
                "--height", str(args.height), "--width", str(args.width), "--out", args.out]
        if args.profile:
            argv.append("--profile")
        if args.ckpt:
            argv += ["--ckpt", args.ckpt]
        for r in run_isolated(__file__, argv, f"layout {layout}", out):
            if "step_s" in r:
                r["mfu_vs_matmul"] = r["tflops_per_device"] * 1e12 / mm
            rows.append(r)
            print(json.dumps(r), flush=True)
    ok = [r for r in rows if "step_s" in r]
    first = ok[0]["s_per_sample"] if ok else None
    print(f"\n{'layout':>8} {'dev':>3} {'batch':>5} {'compile s':>9} {'step s':>8} {'s/sample':>8} {'x first':>7} "
          f"{'peak GiB':>8} {'TFLOP/s/dev':>11} {'MFU':>5} {'coll.':>6} {'save s':>7} {'restore s':>9}")
    for r in rows:
        if "step_s" not in r:
            print(f"{r['layout']:>8} {r['devices']:>3} {r.get('error', '?')[:100]}")
            continue
        coll = f"{r['collective_share']:.3f}" if "collective_share" in r else "-"
        save = f"{r['ckpt_save_s']:.1f}" if "ckpt_save_s" in r else "-"
        restore = f"{r['ckpt_restore_s']:.1f}" if "ckpt_restore_s" in r else "-"
        print(f"{r['layout']:>8} {r['devices']:>3} {r['batch']:>5} {r['compile_s']:>9.1f} {r['step_s']:>8.2f} "
              f"{r['s_per_sample']:>8.2f} {first / r['s_per_sample']:>7.3f} {r['peak_gib_max']:>8.1f} "
              f"{r['tflops_per_device']:>11.1f} {r['mfu_vs_matmul']:>5.3f} {coll:>6} {save:>7} {restore:>9}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="c8,f2c4,d2c4,f8", help="comma list of mesh layouts (first = baseline)")
    ap.add_argument("--views", type=int, default=7)
    ap.add_argument("--remat", default="save_attention")
    ap.add_argument("--attention", default="auto", help="attention backend (auto: fa3 on Hopper with the wheel)")
    ap.add_argument("--variant", default="post_train_example", help="config variant (tiny: a CPU smoke run)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--height", type=int, default=90, help="latent height (720p -> 90)")
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--profile", action="store_true", help="profile one step per layout (GPU kernel time by kind)")
    ap.add_argument("--ckpt", default="", help="folder for the Orbax save / restore timing (a fresh one)")
    ap.add_argument("--matmul", action="store_true", help="time the in-run bf16 matmul baseline (GPU runs)")
    ap.add_argument("--fake_devices", type=int, default=0, help="run on N fake CPU devices (smoke runs)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
