"""Cosmos-Transfer2.5 auto/multiview (HDMap control) configs.

    python -m cosmos_jax.forward --config configs/transfer2_auto_multiview.py:tiny
    python -m cosmos_jax.forward --config configs/transfer2_auto_multiview.py:post_train_example \
        --config.model.weights=/ckpts/4ecc66e9-..._ema_bf16.pt

Variants:
  tiny                 the parity-fixture sizes (64 wide, 4 blocks, 2 control blocks); CPU, fp32, seconds
  post_train_example   the real 2B net (28 blocks + 4 control blocks), bf16 compute, cuDNN attention,
                       7 views x 8 latent frames x 90x160 latent (720p)
"""

from __future__ import annotations

import ml_collections


def _model(**kw) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # architecture: reference MultiViewControlDiT kwargs (see cosmos_jax/models/dit_config.py)
    m.model_channels = 2048
    m.num_blocks = 28
    m.num_heads = 16
    m.adaln_lora_dim = 256
    m.vace_block_every_n = 7
    m.state_t = 8
    m.crossattn_proj_in_channels = 100352
    m.crossattn_emb_channels = 1024
    # execution
    m.dtype = "bfloat16"               # compute dtype of the blocks (params stay fp32)
    m.attention_backend = "cudnn"      # "cudnn" (GPU) | "xla" (any device)
    m.remat_policy = "save_attention"  # none | full | save_attention | save_dots | save_attention_and_dots
    m.weights = ""                     # reference .pt / .safetensors to load ("" = random init)
    m.update(kw)
    return m


def _vae(**kw) -> ml_collections.ConfigDict:
    v = ml_collections.ConfigDict()
    # Wan2.1 VAE (frozen): reference `_video_vae` width; everything else is the fixed Wan2.1 layout
    v.dim = 96
    v.dtype = "bfloat16"     # the reference casts the whole VAE to bf16
    v.conv_impl = "fold2d"   # "fold2d" (time taps folded into a 2-D conv; fastest on H200) | "conv3d"
    v.encode_chunk = 4       # pixel frames per encoder step after frame 0 (0 = whole clip; memory vs calls)
    v.decode_chunk = 1       # latent frames per decoder step after frame 0 (the reference streams 1)
    v.batch_chunk = 1        # videos (views) at a time; 0 = all at once (more memory, no faster at 720p)
    v.weights = ""           # tokenizer.pth (HF nvidia/Cosmos-Predict2.5-2B) or .safetensors; "" = random init
    v.update(kw)
    return v


def _text(**kw) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    # Cosmos-Reason1.1-7B (Qwen2.5-VL-7B LM): a local Hugging Face directory (config.json, safetensors, tokenizer)
    t.model_dir = ""                 # e.g. /ckpts/Cosmos-Reason1-7B; nothing is downloaded
    t.dtype = "bfloat16"
    t.attention_backend = "cudnn"    # "cudnn" | "xla"
    t.scan_layers = False            # unrolled layers: 1.4x faster at batch 1 on H200 (bench/bench_text.py)
    t.batch_size = 8                 # captions per encoder call
    t.update(kw)
    return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    # mesh: data x fsdp x context x tensor; -1 fills the remaining devices
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    # sample shape for the forward demo / benchmarks
    c.shape = ml_collections.ConfigDict(dict(batch=1, views=7, height=90, width=160))
    if variant == "tiny":
        c.model = _model(model_channels=64, num_blocks=4, num_heads=4, adaln_lora_dim=16, vace_block_every_n=2,
                         state_t=2, crossattn_proj_in_channels=48, crossattn_emb_channels=32, dtype="float32",
                         attention_backend="xla", remat_policy="none")
        c.vae = _vae(dim=8, dtype="float32", batch_chunk=0)
        c.text = _text(dtype="float32", attention_backend="xla", batch_size=2)
        c.shape.update(dict(views=3, height=8, width=12))
    elif variant == "post_train_example":
        c.model = _model()
        c.vae = _vae()
        c.text = _text()
        c.mesh.update(dict(fsdp=1, context=-1))  # all GPUs in one context-parallel group, as the reference
    else:
        raise ValueError(f"unknown config variant {variant!r}; choose tiny or post_train_example")
    c.lock()
    return c
