"""Multiview inference on one GPU: seconds per guided UniPC step at 1, 2 and 7 views (720p), peak memory, and a
35-step sample end to end (control encode + sampling + VAE decode + uint8 + mp4 writing).

    python bench/bench_infer.py --views 1,2,7                  # parent: matmul baseline + one child per row
    python bench/bench_infer.py --views 1 --e2e_views 1        # also run the whole 35-step sample at 1 view

Real 2B config (`post_train_example`: 28 blocks + 4 control blocks, bf16 weights), random weights, random VAE
weights of the real Wan2.1 width, random uint8 control videos (29 frames per view at 1280x720), random projected
text contexts (the text encoder runs once per sample: see bench_text.py). The code timed is the product's:
`inference.pipeline.sample_latent` (one jitted `lax.scan` over the steps, both CFG branches as one batch of 2),
`ViewVAE.encode/decode` and `MultiviewPipeline.write_outputs`.

Per row: the sampler is compiled for `--steps` steps and timed once (seconds per step = time / steps; the UniPC
arithmetic around the net is a few elementwise ops), the control encode / latent decode / mp4 writing are timed
once each after a compile call. `e2e_35_s` composes them: encode + 35 x step + decode + write; with --e2e_views
the real 35-step sample is also run in one go (`e2e_measured_s`) to check that composition. FLOPs are model FLOPs of
the two forward passes per step (cosmos_jax/training/flops.py); every rate is printed as a ratio against the best
bf16 matmul measured in the same run. Each row runs in its own process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NOMINAL = 785e12
STEPS = 35


def child(args) -> None:
    import jax
    import numpy as np
    from flax import linen as nn

    from bench.common import emit
    from configs import transfer2_auto_multiview as cfg_file
    from cosmos_jax import build
    from cosmos_jax.diffusion import sampling
    from cosmos_jax.inference import pipeline as pipe_lib
    from cosmos_jax.inference import spec as spec_lib
    from cosmos_jax.models import dit as dit_lib
    from cosmos_jax.ops import attention as attn_ops
    from cosmos_jax.training import flops as flops_lib

    config = cfg_file.get_config(args.variant)
    config.unlock()
    config.model.attention_backend = args.attention
    cfg = build.dit_config_from(config.model)
    v, t = int(args.views), cfg.state_t
    height, width = int(config.data.height), int(config.data.width)
    h, w = height // 8, width // 8
    n_frames = pipe_lib.chunk_frames(t)
    row = {"views": v, "attention": args.attention, "steps_timed": args.steps, "tokens": v * t * (h // 2) * (w // 2)}
    fwd = flops_lib.forward_flops(cfg, v, t, h, w)
    row["model_tflop_per_step"] = 2 * fwd / 1e12  # both CFG branches
    mesh = build.mesh_from(config.mesh)
    try:
        print(f"[child] {v} views: params", flush=True)
        host = jax.device_get(jax.jit(lambda: nn.unbox(dit_lib.init_boxed_params(cfg, jax.random.key(0))))())
        params = pipe_lib.place_params(host, cfg, mesh, config.model.weight_dtype)
        del host
        vae_cfg = build.vae_config_from(config.vae)
        vae = None if args.sampler_only else pipe_lib.ViewVAE(
            vae_cfg, pipe_lib.vae_params(vae_cfg, "", 0), jax.local_devices()[:1])

        rng = np.random.default_rng(0)
        controls = rng.integers(0, 256, (v, n_frames, height, width, 3), dtype=np.uint8)
        ctx = rng.standard_normal((2, 1, v * 512, cfg.crossattn_emb_channels)).astype(np.float32)
        k = [1] * v  # one conditioning latent frame per view (num_conditional_frames_per_view 1)
        inputs = rng.integers(0, 256, (v, 1, height, width, 3), dtype=np.uint8)

        def encode():
            lat = vae.encode(controls)
            gt = np.zeros_like(lat)
            gt[:, :1] = vae.encode(inputs)
            return lat, gt

        def sample(lat, gt, steps, cache=None, dit_cfg=None):
            return pipe_lib.sample_latent(
                params, dit_cfg or cfg, mesh, noise=sampling.initial_noise(0, (1, 16, v * t, h, w)),
                gt=pipe_lib.views_to_dit(gt), mask=pipe_lib.condition_mask(k, t, h, w), ctx_cond=ctx[0],
                ctx_uncond=ctx[1], control=pipe_lib.views_to_dit(lat),
                view_ids=np.repeat(np.arange(v, dtype=np.int32), t)[None], control_weight=1.0, guidance=7.0,
                num_steps=steps, cache=cache)

        def decode(latent):
            return pipe_lib.to_uint8(vae.decode(pipe_lib.dit_to_views(latent, v)))

        spec = spec_lib.SampleSpec(**{**spec_lib.DEFAULTS, "name": "bench", "prompt": "x"}, views={
            key: spec_lib.ViewSpec(control_path="control.mp4" if i < v else None)
            for i, key in enumerate(spec_lib.VIEW_KEYS)})  # save_combined_views as the spec default

        has_av = importlib.util.find_spec("av") is not None  # mp4 writing needs PyAV; the rest does not
        row["mp4_written"] = has_av

        def write(frames, out_dir):  # [] without PyAV: the timings then leave the mp4 writing out
            return pipe_lib.MultiviewPipeline.write_outputs(spec, frames, out_dir) if has_av else []

        if args.sampler_only:  # latents of the encoder's shape, no VAE
            lat = rng.standard_normal((v, t, h, w, vae_cfg.z_dim)).astype(np.float32)
            gt = np.zeros_like(lat)
            gt[:, :1] = lat[:, :1]
        else:
            t0 = time.perf_counter()
            lat, gt = encode()
            row["encode_compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            lat, gt = encode()
            row["encode_s"] = time.perf_counter() - t0

        print(f"[child] {v} views: compiling the {args.steps}-step sampler", flush=True)
        t0 = time.perf_counter()
        latent = sample(lat, gt, args.steps)
        row["sampler_first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latent = sample(lat, gt, args.steps)
        row["sampler_s"] = time.perf_counter() - t0
        row["step_s"] = row["sampler_s"] / args.steps
        row["model_tflops"] = 2 * fwd / row["step_s"] / 1e12
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_gib_sampler"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30

        if args.sampler_only:
            emit(row)
            return
        t0 = time.perf_counter()
        frames = decode(latent)
        row["decode_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = decode(latent)
        row["decode_s"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            paths = write(frames, d)
            row["write_s"] = time.perf_counter() - t0
            row["outputs"] = [os.path.basename(p) for p in paths]
        row["e2e_35_s"] = row["encode_s"] + STEPS * row["step_s"] + row["decode_s"] + row["write_s"]
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30

        if args.e2e:
            print(f"[child] {v} views: the whole {STEPS}-step sample", flush=True)
            sample(lat, gt, STEPS)  # compile the 35-step scan outside the timing
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                lat, gt = encode()
                frames = decode(sample(lat, gt, STEPS))
                write(frames, d)
                row["e2e_measured_s"] = time.perf_counter() - t0
            def against_exact(other_sample):
                """(seconds, exact seconds, PSNR, SSIM) of another 35-step sample + decode against this backend's
                exact one (same seed and weights), each compiled outside the timing."""
                other_sample()
                t0 = time.perf_counter()
                other = decode(other_sample())
                other_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                exact = decode(sample(lat, gt, STEPS))
                return other_s, time.perf_counter() - t0, psnr(other, exact), ssim(other, exact)

            row["vs_references"] = []
            for ref_name in [b for b in args.reference_attention.split(",") if b and b != args.attention]:
                # the same sample with another attention backend: its time and the distance between the outputs
                # (several: one bf16 backend against another is the noise floor the others are read against)
                ref_cfg = dataclasses.replace(cfg, attention_backend=attn_ops.resolve_backend(ref_name))
                ref_s, this_s, p, s = against_exact(lambda: sample(lat, gt, STEPS, dit_cfg=ref_cfg))
                row["vs_references"].append({"attention": ref_name, "sample_s": ref_s, "this_sample_s": this_s,
                                             "psnr_db": p, "ssim": s})
            if args.cache > 0:  # the same sample with the step cache: its time and distance to the exact one
                cache = sampling.StepCache(threshold=args.cache)
                row["cache_threshold"] = args.cache
                (row["cache_sample_s"], row["exact_sample_s"], row["cache_psnr_db"],
                 row["cache_ssim"]) = against_exact(lambda: sample(lat, gt, STEPS, cache))
    except Exception as e:  # OOM etc.: report and let the parent go on
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    emit(row)


def psnr(a, b) -> float:
    import numpy as np

    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a, b, win: int = 7) -> float:
    """Mean SSIM of the grey-level frames (uniform win x win windows, the usual constants for 8-bit images)."""
    import numpy as np

    def grey(x):
        return np.asarray(x, np.float64).reshape((-1,) + x.shape[-3:]) @ np.array([0.299, 0.587, 0.114])

    def box(x):  # mean over win x win windows (valid part), via cumulative sums
        c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (1, 0), (1, 0))), 1), 2)
        return (c[:, win:, win:] - c[:, :-win, win:] - c[:, win:, :-win] + c[:, :-win, :-win]) / win ** 2

    x, y = grey(a), grey(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx ** 2, box(y * y) - my ** 2, box(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))))


def parent(args) -> None:
    from bench.common import run_isolated

    # the parent never touches the GPU: a JAX client there would hold most of its memory while the children run
    out = os.path.join(args.out, "bench_infer.jsonl")
    base = run_isolated(__file__, ["--matmul"], "matmul", out)[0]
    mm = base["matmul_tflops"] * 1e12
    print(f"device: {base['device']}, jax {base['jax']}; best bf16 matmul in this run {mm / 1e12:.1f} TFLOP/s "
          f"({mm / NOMINAL:.3f} of 785)", flush=True)
    e2e = {int(x) for x in args.e2e_views.split(",") if x}
    rows = []
    first_step = {}  # views -> s/step of the first backend listed (the baseline of x_first)
    for v in [int(x) for x in args.views.split(",")]:
        for backend in args.attention.split(","):
            argv = ["--child", "--views", str(v), "--steps", str(args.steps), "--attention", backend,
                    "--variant", args.variant] + (["--sampler_only"] if args.sampler_only else [])
            if v in e2e:
                argv += ["--e2e", "--cache", str(args.cache), "--reference_attention", args.reference_attention]
            for r in run_isolated(__file__, argv, f"{v} views {backend}", out):
                if "step_s" in r:
                    r["x_matmul"] = r["model_tflops"] * 1e12 / mm
                    first_step.setdefault(v, (backend, r["step_s"]))
                    r["first_attention"] = first_step[v][0]
                    r["x_first"] = first_step[v][1] / r["step_s"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    for r in rows:
        for x in r.get("vs_references", []):
            print(f"{r['views']} views, 35 steps + decode: {x['attention']} {x['sample_s']:.1f} s vs "
                  f"{r['attention']} {x['this_sample_s']:.1f} s ({x['this_sample_s'] / x['sample_s']:.3f}x); "
                  f"PSNR {x['psnr_db']:.2f} dB, SSIM {x['ssim']:.4f} of the {x['attention']} sample against the "
                  f"{r['attention']} one (same seed)")
        if "cache_sample_s" in r:
            print(f"{r['views']} views, step cache {r['cache_threshold']}: 35 steps + decode in "
                  f"{r['cache_sample_s']:.1f} s vs {r['exact_sample_s']:.1f} s exact "
                  f"({r['exact_sample_s'] / r['cache_sample_s']:.2f}x); "
                  f"PSNR {r['cache_psnr_db']:.2f} dB, SSIM {r['cache_ssim']:.4f} against the exact sample")
    if any(r.get("mp4_written") is False for r in rows):
        print("PyAV is not installed: the mp4 writing is left out of every time below (write_s 0)")
    print(f"\n{'views':>5} {'attention':>9} {'tokens':>7} {'s/step':>7} {'x first':>7} {'TFLOP/s':>8} {'x matmul':>8} "
          f"{'peak GiB':>8} "
          f"{'enc s':>6} {'dec s':>6} {'mp4 s':>6} {'35-step e2e':>11} {'measured':>8}")
    for r in rows:
        if "step_s" in r and "e2e_35_s" not in r:  # --sampler_only
            print(f"{r['views']:>5} {r['attention']:>9} {r['tokens']:>7} {r['step_s']:>7.2f} {r['x_first']:>7.3f} "
                  f"{r['model_tflops']:>8.1f} {r['x_matmul']:>8.3f} {r['peak_gib_sampler']:>8.1f}")
            continue
        if "e2e_35_s" not in r:
            print(f"{r['views']:>5} {r['attention']:>9} {r['tokens']:>7} {r.get('error', '?')[:90]}")
            continue
        meas = f"{r['e2e_measured_s']:.0f} s" if "e2e_measured_s" in r else "-"
        print(f"{r['views']:>5} {r['attention']:>9} {r['tokens']:>7} {r['step_s']:>7.2f} {r['x_first']:>7.3f} "
              f"{r['model_tflops']:>8.1f} {r['x_matmul']:>8.3f} {r['peak_gib']:>8.1f} {r['encode_s']:>6.1f} "
              f"{r['decode_s']:>6.1f} {r['write_s']:>6.1f} "
              f"{r['e2e_35_s'] / 60:>8.1f} min {meas:>8}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", default="1,2,7", help="comma list of view counts (720p, 29 frames each)")
    ap.add_argument("--steps", type=int, default=2, help="sampler steps per timed call (seconds per step = time/steps)")
    ap.add_argument("--e2e_views", default="", help="comma list of view counts that also run the whole 35-step sample")
    ap.add_argument("--attention", default="cudnn", help="comma list of attention backends of the DiT, one row each "
                    "per view count; rows carry x_first, their step rate against the first one's (first_attention)")
    ap.add_argument("--cache", type=float, default=0.0, help="also run the e2e views' 35-step sample with the "
                    "step cache at this threshold (sampling.StepCache): its time, PSNR and SSIM against the exact one")
    ap.add_argument("--reference_attention", default="", help="e2e views: also run the 35-step sample with each of "
                    "these backends (comma list; same seed and weights): its time, and PSNR/SSIM of its output "
                    "against this backend's")
    ap.add_argument("--sampler_only", action="store_true", help="time the sampler steps only: random latents "
                    "instead of the VAE encode, no decode or mp4 (the e2e columns stay empty); 7-view rows in a "
                    "few device minutes")
    ap.add_argument("--variant", default="post_train_example", help="config variant (tiny: a CPU smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_infer.jsonl")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--e2e", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.matmul:
        from bench.common import emit_matmul_baseline

        emit_matmul_baseline()
    else:
        (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
