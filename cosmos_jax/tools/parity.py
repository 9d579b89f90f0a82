"""Run a reference parity case (the fixture formats of `tests/fixtures/*`) through the JAX port and write its output.

    python tools/parity.py dit --case tests/fixtures/dit_control/caseA --out /tmp/out.npz
    python tools/parity.py dit --case DIR --weights DIR/../dcp/converted/model_ema_fp32.pt --out OUT.npz
    python tools/parity.py loss --case tests/fixtures/train_loss/lossA --out /tmp/loss.npz
    python tools/parity.py sample --case tests/fixtures/sampler/sampleA --out /tmp/sample.npz
    python tools/parity.py vae --case tests/fixtures/wan_vae/caseA --out /tmp/vae.npz
    python tools/parity.py text --model-dir /ckpts/Cosmos-Reason1-7B --captions captions.json --out /tmp/text.npz
"""

from __future__ import annotations

import json
import os


import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.models import dit as dit_lib
from cosmos_jax.models.dit_config import DiTConfig

_INPUT_NAMES = ("x_B_C_T_H_W", "timesteps_B_T", "crossattn_emb", "latent_control_input",
                "condition_video_input_mask_B_C_T_H_W", "padding_mask", "view_indices_B_T")


def load_case_config(case_dir: str, **overrides) -> DiTConfig:
    path = os.path.join(case_dir, "case.json")
    with open(path) as f:
        case = json.load(f)
    # DiT cases hold the kwargs at the top, training-loss cases under "network"
    kwargs = case.get("constructor_kwargs_tiny", case.get("network", {}).get("constructor_kwargs_tiny"))
    if kwargs is None:
        raise KeyError(f"{path}: no 'constructor_kwargs_tiny' field (top level or under 'network')")
    return DiTConfig.from_reference_kwargs(kwargs, dtype=jnp.float32, **overrides)


def load_case_inputs(inputs_path: str) -> dict:
    """Forward kwargs of our DiT from a reference `inputs.npz` (control_context_scale -> control_weight)."""
    data = np.load(inputs_path)
    missing = [k for k in _INPUT_NAMES + ("control_context_scale",) if k not in data.files]
    if missing:
        raise KeyError(f"{inputs_path}: missing inputs {missing}")
    args = {k: jnp.asarray(data[k]) for k in _INPUT_NAMES}
    args["control_weight"] = float(data["control_context_scale"])
    return args


def load_case_params(case_dir: str, cfg: DiTConfig, weights: str | None = None):
    """(params, cfg) of a case: the config follows the weight file's RoPE buffer variant (bf16-rounded in the
    converter's `model_ema_bf16.pt`), since a case has no config of ours to say it."""
    import dataclasses

    from cosmos_jax.weights import keymap, torch_io

    path = weights or os.path.join(case_dir, "weights.safetensors")
    sd = torch_io.load_state_dict(path)
    variant = keymap.rope_ranges_of(sd, cfg, source=path)
    cfg = dataclasses.replace(cfg, rope_ranges_bf16=bool(variant))
    params, _ = keymap.reference_to_flax(sd, cfg, source=path)
    return params, cfg


def run_dit_case(case_dir: str, *, weights: str | None = None, inputs: str | None = None,
                 capture_intermediates: bool = False, **overrides):
    """fp32 forward of a parity case; returns out_B_C_T_H_W (and the sown intermediates when asked)."""
    cfg = load_case_config(case_dir, **overrides)
    params, cfg = load_case_params(case_dir, cfg, weights)
    args = load_case_inputs(inputs or os.path.join(case_dir, "inputs.npz"))
    model = dit_lib.MultiViewControlDiT(cfg)
    with jax.default_matmul_precision("highest"):
        if capture_intermediates:
            # the sown activations, plus each control block's (state, hint) output captured by Flax
            out, state = model.apply({"params": params}, **args, mutable=["intermediates"],
                                     capture_intermediates=lambda mdl, _: isinstance(mdl, dit_lib._ControlLayer))
            inter = jax.tree.map(np.asarray, state["intermediates"])
            if "control_blocks" in inter:  # [n_control_blocks, B, T, S, D] each
                state_c, hints = inter["control_blocks"].pop("__call__")[0]
                inter["control_blocks"].update(out_B_T_S_D=state_c, hint_B_T_S_D=hints)
            return np.asarray(out), inter
        return np.asarray(jax.jit(lambda p, a: model.apply({"params": p}, **a))(params, args))


# ----------------------------------------------------------------------------------------------------------------
# Training-loss cases (`tests/fixtures/train_loss/*`: case.json with the net under "network", weights.safetensors,
# inputs.npz with x0, eps, u, k, text-dropout flags and the net's conditions)

def _load_net_case(case_dir: str, weights: str | None, inputs: str | None, names):
    """(cfg, params, inputs npz, model) of a case that runs the DiT (loss and sampler cases): its network, weights
    (or `weights`) and inputs (or `inputs`), which must hold every array in `names`."""
    cfg = load_case_config(case_dir)
    params, cfg = load_case_params(case_dir, cfg, weights)
    inputs_path = inputs or os.path.join(case_dir, "inputs.npz")
    data = np.load(inputs_path)
    missing = [k for k in names if k not in data.files]
    if missing:
        raise KeyError(f"{inputs_path}: missing inputs {missing}")
    return cfg, params, data, dit_lib.MultiViewControlDiT(cfg)


_LOSS_INPUT_NAMES = ("x0_B_C_T_H_W", "epsilon_B_C_T_H_W", "u_B", "num_conditional_frames_B", "text_dropped_B",
                     "latent_control_input", "crossattn_emb", "padding_mask", "view_indices_B_T", "control_weight")


def run_loss_case(case_dir: str, *, weights: str | None = None, inputs: str | None = None) -> dict[str, np.ndarray]:
    """fp32 reference training loss of a case (`flow.training_loss` on its net); every array of its output.npz."""
    from cosmos_jax.diffusion import flow

    cfg, params, data, model = _load_net_case(case_dir, weights, inputs, _LOSS_INPUT_NAMES)
    d = {k: jnp.asarray(data[k]) for k in _LOSS_INPUT_NAMES}

    def loss_fn(p, d):
        return flow.training_loss(
            lambda **kw: model.apply({"params": p}, **kw), d["x0_B_C_T_H_W"], d["epsilon_B_C_T_H_W"], d["u_B"],
            d["num_conditional_frames_B"], ~d["text_dropped_B"], crossattn_emb=d["crossattn_emb"],
            latent_control_input=d["latent_control_input"], padding_mask=d["padding_mask"],
            view_indices_B_T=d["view_indices_B_T"], control_weight=d["control_weight"], state_t=cfg.state_t,
            compute_dtype=jnp.float32)

    with jax.default_matmul_precision("highest"):
        _, aux = jax.jit(loss_fn)(params, d)
    return {k: np.asarray(v) for k, v in aux.items()}


# ----------------------------------------------------------------------------------------------------------------
# Sampler cases (`tests/fixtures/sampler/*`: case.json with the net under "network" and the sampler settings,
# weights.safetensors, inputs.npz with the initial noise, gt, conditioning mask, control latent, text embeddings)

_SAMPLE_INPUT_NAMES = ("noise_B_C_T_H_W", "gt_B_C_T_H_W", "condition_video_input_mask_B_C_T_H_W",
                       "latent_control_input", "crossattn_emb", "neg_crossattn_emb", "padding_mask",
                       "view_indices_B_T", "guidance", "control_weight", "num_steps", "shift")


def run_sample_case(case_dir: str, *, weights: str | None = None, inputs: str | None = None,
                    batch_branches: bool = True) -> dict[str, np.ndarray]:
    """The reference sampling loop of a case (UniPC, CFG with the negative-prompt uncondition, conditioning
    frames) on its fp32 net; every array of its output.npz (final latent, grid, per-step debug arrays)."""
    from cosmos_jax.diffusion import sampling

    cfg, params, data, model = _load_net_case(case_dir, weights, inputs, _SAMPLE_INPUT_NAMES)
    num_steps, shift = int(data["num_steps"]), float(data["shift"])
    shared = {k: jnp.asarray(data[k]) for k in ("latent_control_input", "padding_mask", "view_indices_B_T")}
    mask = jnp.asarray(data["condition_video_input_mask_B_C_T_H_W"])
    shared["condition_video_input_mask_B_C_T_H_W"] = mask
    cond = dict(shared, crossattn_emb=jnp.asarray(data["crossattn_emb"]))
    uncond = dict(shared, crossattn_emb=jnp.asarray(data["neg_crossattn_emb"]))

    def run(p, noise, gt, mask, cond, uncond, guidance, control_weight):
        def net_fn(x, timesteps_B_T, **kw):
            return model.apply({"params": p}, x_B_C_T_H_W=x, timesteps_B_T=timesteps_B_T,
                               control_weight=control_weight, **kw)

        velocity_fn = sampling.branch_velocity_fn(net_fn, cond, uncond, batch_branches=batch_branches)
        return sampling.sample(velocity_fn, noise, num_steps=num_steps, shift=shift, guidance=guidance, gt=gt,
                               condition_mask=mask, aux=True)

    with jax.default_matmul_precision("highest"):
        x, aux = jax.jit(run)(params, jnp.asarray(data["noise_B_C_T_H_W"]), jnp.asarray(data["gt_B_C_T_H_W"]),
                              mask, cond, uncond, jnp.float32(data["guidance"]), jnp.float32(data["control_weight"]))
    outs = {"samples_B_C_T_H_W": np.asarray(x)}
    outs.update({k: np.asarray(v) for k, v in aux.items()})
    for k in ("timesteps", "net_timesteps_per_step", "predictor_order_per_step"):
        outs[k] = outs[k].astype(np.int64)  # the reference's int64
    return outs


# ----------------------------------------------------------------------------------------------------------------
# Wan2.1 VAE cases (`tests/fixtures/wan_vae/*`: manifest.json, weights.safetensors, io.npz with x in NCTHW)


def load_vae_case_config(case_dir: str, **overrides):
    from cosmos_jax.models import wan_vae

    path = os.path.join(case_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    if "model_config_effective" not in manifest:
        raise KeyError(f"{path}: no 'model_config_effective' field")
    overrides.setdefault("dtype", jnp.float32)
    return wan_vae.WanVAEConfig.from_reference_kwargs(manifest["model_config_effective"], **overrides)


def _ncthw_to_nthwc(a):
    return np.moveaxis(np.asarray(a), 1, -1)


def _nthwc_to_ncthw(a):
    return np.moveaxis(np.asarray(a), -1, 1)


def run_vae_case(case_dir: str, *, x: np.ndarray | None = None, **overrides) -> dict[str, np.ndarray]:
    """fp32 encode then decode of a VAE case; returns mu_raw, logvar_raw, latent, recon in the reference NCTHW."""
    from cosmos_jax.models import wan_vae
    from cosmos_jax.weights import vae_keymap

    cfg = load_vae_case_config(case_dir, **overrides)
    params, cfg = vae_keymap.load_vae_params(os.path.join(case_dir, "weights.safetensors"), cfg)
    io_path = os.path.join(case_dir, "io.npz")
    if x is None:
        data = np.load(io_path)
        if "x" not in data.files:
            raise KeyError(f"{io_path}: no 'x' array")
        x = data["x"]
    x = jnp.asarray(_ncthw_to_nthwc(x), jnp.float32)
    mean, inv_std = wan_vae.latent_scale()
    with jax.default_matmul_precision("highest"):
        mu, logvar = jax.jit(wan_vae.encode_moments, static_argnums=2)(params, x, cfg)
        latent = (mu - mean) * inv_std
        recon = jax.jit(wan_vae.decode, static_argnums=2)(params, latent, cfg)
    return {"mu_raw": _nthwc_to_ncthw(mu), "logvar_raw": _nthwc_to_ncthw(logvar),
            "latent": _nthwc_to_ncthw(latent), "recon": _nthwc_to_ncthw(recon)}


def vae_case_intermediates(case_dir: str, **overrides) -> dict[str, np.ndarray]:
    """Whole-clip (unchunked) activations named like the case's `intermediates.npz` (NCTHW)."""
    from cosmos_jax.models import wan_vae
    from cosmos_jax.weights import vae_keymap

    cfg = load_vae_case_config(case_dir, **overrides)
    params, cfg = vae_keymap.load_vae_params(os.path.join(case_dir, "weights.safetensors"), cfg)
    x = jnp.asarray(_ncthw_to_nthwc(np.load(os.path.join(case_dir, "io.npz"))["x"]), jnp.float32)
    model = wan_vae.WanVAE(cfg)
    mean, inv_std = wan_vae.latent_scale()
    with jax.default_matmul_precision("highest"):
        (mu, _, _), enc = model.apply({"params": params}, x, method=wan_vae.WanVAE.encode_chunk,
                                      mutable=["intermediates"])
        z = ((mu - mean) * inv_std) / inv_std + mean
        _, dec = model.apply({"params": params}, z, method=wan_vae.WanVAE.decode_chunk, mutable=["intermediates"])
    acts = {"dec_z_unnorm": z}
    for tree in (enc["intermediates"], dec["intermediates"]):
        for kp, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda a: isinstance(a, tuple))[0]:
            acts[".".join(k.key for k in kp).removesuffix(".out")] = v[0]
    return {name: _nthwc_to_ncthw(v) for name, v in acts.items()}


def vae_intermediate_key(fixture_name: str) -> str:
    """Fixture intermediate name (`enc_down5_resample3d`, `dec_mid1_attn`, ...) -> our module path."""
    import re

    fixed = {"enc_conv1": "encoder.conv1", "enc_head_out": "encoder.head", "dec_conv1": "decoder.conv1",
             "vae_conv2_out": "conv2", "dec_z_unnorm": "dec_z_unnorm"}
    if fixture_name in fixed:
        return fixed[fixture_name]
    m = re.match(r"(enc|dec)_(down|up|mid)(\d+)", fixture_name)
    if not m:
        raise KeyError(f"unknown VAE intermediate name {fixture_name!r}")
    side = {"enc": "encoder", "dec": "decoder"}[m.group(1)]
    group = {"down": "downsamples", "up": "upsamples", "mid": "middle"}[m.group(2)]
    return f"{side}.{group}.{m.group(3)}"


# ----------------------------------------------------------------------------------------------------------------
# Text encoder: a local Hugging Face Qwen2.5-VL directory + a JSON list of captions


def run_text_case(model_dir: str, captions_json: str) -> dict[str, np.ndarray]:
    """fp32 recipe embeddings [N, 512, layers*hidden] and token ids [N, 512] of every caption in the JSON list."""
    from cosmos_jax.text import embed as text_embed

    with open(captions_json) as f:
        captions = json.load(f)
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{captions_json}: expected a JSON list of strings")
    embedder = text_embed.TextEmbedder.from_dir(model_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    ids = embedder.tokenizer.ids(captions)
    with jax.default_matmul_precision("highest"):
        emb = embedder.embed_token_ids(ids)
    return {"embeddings": emb, "token_ids": ids}




PROG = "tools/parity.py"


def _check_inputs(args) -> None:
    """Every file the sub-command reads exists and parses, so that a bad one is one line naming it (cli_lib.UsageError)
    before any model work; the output folder exists."""
    from cosmos_jax import cli as cli_lib

    def need_file(path, what):
        if not os.path.isfile(path):
            raise cli_lib.UsageError(f"{path}: no such {what}" + (" (not a file)" if os.path.exists(path) else ""))

    def need_json(path, what):
        need_file(path, what)
        try:
            with open(path) as f:
                json.load(f)
        except (ValueError, UnicodeError) as e:
            raise cli_lib.UsageError(f"{path}: not a valid JSON {what} ({e})") from None

    def need_npz(path, what):
        import zipfile

        need_file(path, what)
        if not zipfile.is_zipfile(path):
            raise cli_lib.UsageError(f"{path}: not an .npz archive (a zip of .npy arrays)")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise ValueError("a single array, not an .npz archive")
        except Exception as e:  # noqa: BLE001 - numpy raises many types for a file that is not an .npz
            raise cli_lib.UsageError(f"{path}: not a readable .npz {what} ({type(e).__name__}: {e})") from None

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise cli_lib.UsageError(f"--out={args.out}: the folder {out_dir} does not exist")
    if args.what == "text":
        if not os.path.isdir(args.model_dir):
            raise cli_lib.UsageError(f"--model-dir={args.model_dir}: no such directory")
        need_json(args.captions, "captions file")
        return
    if not os.path.isdir(args.case):
        raise cli_lib.UsageError(f"--case={args.case}: no such case directory")
    if args.what == "vae":
        need_json(os.path.join(args.case, "manifest.json"), "case manifest")
        need_file(os.path.join(args.case, "weights.safetensors"), "weight file")
        need_npz(os.path.join(args.case, "io.npz"), "input file")
        return
    need_json(os.path.join(args.case, "case.json"), "case description")
    need_file(args.weights or os.path.join(args.case, "weights.safetensors"), "weight file")
    need_npz(args.inputs or os.path.join(args.case, "inputs.npz"), "input file")


def main(argv=None) -> int:
    """Run one case; errors propagate (the command line prints them as one line through `cli.run`)."""
    from cosmos_jax import cli as cli_lib

    def dit_case_args(parser, outputs: str) -> None:  # the flags of every case kind that runs the DiT
        parser.add_argument("--case", required=True, help="folder with case.json, weights.safetensors, inputs.npz")
        parser.add_argument("--out", required=True, help=f"output .npz ({outputs})")
        parser.add_argument("--weights", default=None,
                            help="other weight file (.safetensors/.pt) instead of the case's")
        parser.add_argument("--inputs", default=None, help="other inputs.npz instead of the case's")

    ap = cli_lib.ArgumentParser(prog=PROG, description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True, metavar="{dit,loss,sample,vae,text}",
                            help="which kind of case (each has its own --help)")
    dit = sub.add_parser("dit", help="multiview control DiT forward (fp32)", description="multiview control DiT "
                         "forward (fp32) of a tests/fixtures/dit_control case")
    dit_case_args(dit, "key out_B_C_T_H_W")
    loss = sub.add_parser("loss", help="rectified-flow training loss of the multiview control DiT (fp32)",
                          description="the reference training loss (fp32) of a tests/fixtures/train_loss case")
    dit_case_args(loss, "sigma, timesteps, x_t, v_target, net_x_input, net_out_raw, v_pred, per_sample_loss, loss, "
                  "crossattn_emb_fed, condition_mask")
    smp = sub.add_parser("sample", help="UniPC + CFG sampling loop on the multiview control DiT (fp32)",
                         description="the reference sampling loop (fp32) of a tests/fixtures/sampler case")
    dit_case_args(smp, "samples_B_C_T_H_W, sigmas, timesteps, x_after_step, velocity_cfg_per_step, "
                  "net_timesteps_per_step, predictor_order_per_step, v_cond_step0, v_uncond_step0, net_x_input_step0")
    vae = sub.add_parser("vae", help="Wan2.1 VAE encode + decode (fp32)",
                         description="Wan2.1 VAE encode + decode (fp32) of a tests/fixtures/wan_vae case")
    vae.add_argument("--case", required=True, help="folder with manifest.json, weights.safetensors, io.npz (x)")
    vae.add_argument("--out", required=True, help="output .npz (mu_raw, logvar_raw, latent, recon; NCTHW)")
    text = sub.add_parser("text", help="caption embeddings of the reference recipe (fp32)",
                          description="caption embeddings of the reference recipe (fp32)")
    text.add_argument("--model-dir", required=True, help="local Hugging Face Qwen2.5-VL directory (config, "
                      "safetensors, tokenizer files)")
    text.add_argument("--captions", required=True, help="JSON list of caption strings")
    text.add_argument("--out", required=True, help="output .npz (embeddings [N, 512, layers*hidden], token_ids)")
    args = ap.parse_args(argv)
    _check_inputs(args)
    # outputs are written through a temporary file: a failed run never leaves a partial or damaged .npz
    if args.what == "text":
        outs = run_text_case(args.model_dir, args.captions)
        path = cli_lib.atomic_savez(args.out, **outs)
        print(f"wrote {path}: " + ", ".join(f"{k} {v.shape}" for k, v in outs.items()))
        return 0
    if args.what == "loss":
        outs = run_loss_case(args.case, weights=args.weights, inputs=args.inputs)
        path = cli_lib.atomic_savez(args.out, **outs)
        print(f"wrote {path}: loss {float(outs['loss']):.8f}, per_sample_loss {outs['per_sample_loss']}")
        return 0
    if args.what == "sample":
        outs = run_sample_case(args.case, weights=args.weights, inputs=args.inputs)
        path = cli_lib.atomic_savez(args.out, **outs)
        x = outs["samples_B_C_T_H_W"]
        print(f"wrote {path}: samples_B_C_T_H_W {x.shape} mean {x.mean():.6f} std {x.std():.6f}, "
              f"timesteps {outs['timesteps'].tolist()}")
        return 0
    if args.what == "vae":
        outs = run_vae_case(args.case)
        path = cli_lib.atomic_savez(args.out, **outs)
        print(f"wrote {path}: " + ", ".join(f"{k} {v.shape}" for k, v in outs.items()))
        return 0
    out = run_dit_case(args.case, weights=args.weights, inputs=args.inputs)
    path = cli_lib.atomic_savez(args.out, out_B_C_T_H_W=out)
    print(f"wrote {path}: out_B_C_T_H_W {out.shape} mean {out.mean():.6f} std {out.std():.6f}")
    return 0


def cli() -> None:
    """The command line: errors as one line (cosmos_jax/cli.py)."""
    from cosmos_jax import cli as cli_lib

    cli_lib.entry(main)


if __name__ == "__main__":
    cli()
