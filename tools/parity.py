"""Run a reference parity case through the JAX port and write its output.

    python tools/parity.py dit --case ../shared/parity/dit_control/caseA --out /tmp/out.npz
    python tools/parity.py dit --case DIR --weights DIR/../dcp/converted/model_ema_fp32.pt --out OUT.npz
    python tools/parity.py vae --case ../shared/parity/wan_vae/caseA --out /tmp/vae.npz
    python tools/parity.py text --model-dir /ckpts/Cosmos-Reason1-7B --captions captions.json --out /tmp/text.npz
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from cosmos_jax import parity  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    dit = sub.add_parser("dit", help="multiview control DiT forward (fp32)")
    dit.add_argument("--case", required=True, help="folder with case.json, weights.safetensors, inputs.npz")
    dit.add_argument("--out", required=True, help="output .npz (key out_B_C_T_H_W)")
    dit.add_argument("--weights", default=None, help="other weight file (.safetensors/.pt) instead of the case's")
    dit.add_argument("--inputs", default=None, help="other inputs.npz instead of the case's")
    vae = sub.add_parser("vae", help="Wan2.1 VAE encode + decode (fp32)")
    vae.add_argument("--case", required=True, help="folder with manifest.json, weights.safetensors, io.npz (x)")
    vae.add_argument("--out", required=True, help="output .npz (mu_raw, logvar_raw, latent, recon; NCTHW)")
    text = sub.add_parser("text", help="caption embeddings of the reference recipe (fp32)")
    text.add_argument("--model-dir", required=True, help="local Hugging Face Qwen2.5-VL directory (config, "
                      "safetensors, tokenizer files)")
    text.add_argument("--captions", required=True, help="JSON list of caption strings")
    text.add_argument("--out", required=True, help="output .npz (embeddings [N, 512, layers*hidden], token_ids)")
    args = ap.parse_args(argv)
    if args.what == "text":
        outs = parity.run_text_case(args.model_dir, args.captions)
        np.savez(args.out, **outs)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in outs.items()))
        return
    if args.what == "vae":
        outs = parity.run_vae_case(args.case)
        np.savez(args.out, **outs)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in outs.items()))
        return
    out = parity.run_dit_case(args.case, weights=args.weights, inputs=args.inputs)
    np.savez(args.out, out_B_C_T_H_W=out)
    print(f"wrote {args.out}: out_B_C_T_H_W {out.shape} mean {out.mean():.6f} std {out.std():.6f}")


if __name__ == "__main__":
    main()
