"""Cosmos-Transfer2.5 auto/multiview (HDMap / world-scenario control) post-training configs.

    python -m cosmos_jax.train                                      # = --config configs/transfer2_auto_multiview.py:tiny
    python -m cosmos_jax.train --config configs/transfer2_auto_multiview.py:post_train_example \
        --config.model.weights=/ckpts/4ecc66e9-..._ema_bf16.pt --config.data.cache_dir=/data/cache
    python -m cosmos_jax.train --config configs/transfer2_auto_multiview.py:tiny --config.trainer.max_iter=10

Variants:
  tiny                 the parity-fixture network (64 wide, 4 blocks, 2 control blocks), a random width-8 VAE and the
                       shipped tiny random text encoder; trains on the shipped sample dataset at 64x96 on a CPU in a
                       few minutes. The hyper-parameters are the reference's except a short warm-up and a larger lr,
                       so the loss visibly falls within 50 steps.
  post_train_example   the reference experiment `transfer2_auto_multiview_post_train_example` (alias of that name):
                       the real 2B net, 7 views x 29 frames at 720p, every hyper-parameter of the reference.

Every field is documented where it is defined below; `--config.x.y=v` overrides any of them (a typo is an error).
Print the resolved config with `python -m cosmos_jax.train --config ...:VARIANT --print_config`.
"""

from __future__ import annotations

import os

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIASES = {"transfer2_auto_multiview_post_train_example": "post_train_example"}


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
    # The RoPE range buffers of the released *_ema_bf16.pt are bf16-rounded and the reference computes with them
    # as loaded; weight import checks the file against this field and never changes it.
    m.rope_ranges_bf16 = True
    # execution
    m.dtype = "bfloat16"               # compute dtype of the blocks
    m.weight_dtype = "bfloat16"        # the weights the forward uses: the reference trainer holds the net in bf16
    #                                    (trainable weights keep fp32 master copies in the optimizer state)
    m.attention_backend = "auto"       # auto: fa3 on Hopper with flash-attn3-jax, else cudnn on GPUs, else xla
    #                                    | "fa3" | "cudnn" | "xla" (any device) | "fp8" (Hopper, opt-in:
    #                                    self-attention forward in fp8, bf16 backward; ops/fp8_attention.py)
    #                                    | "fp8_full" (Hopper, opt-in: forward and backward in fp8)
    m.remat_policy = "save_attention"  # none | full | save_attention | save_self_attention | save_dots | ...
    #                                    | offload_attention (save_attention's tensors in pinned host memory)
    m.weights = ""                     # initial weights: reference .pt / .safetensors, or an Orbax checkpoint of ours
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


def _data(**kw) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Exactly one of dataset_dir (raw videos, VAE + text encoder run every step, as the reference) and cache_dir
    # (latents + text contexts from tools/precompute.py; recommended for real runs) is used; cache_dir wins.
    d.dataset_dir = ""
    d.cache_dir = ""
    d.num_frames = 29        # pixel frames per view (frames 0, s, 2s, ...); 4 * (state_t - 1) + 1
    d.stride = 1             # fps_downsample_factor
    d.height = 720
    d.width = 1280
    d.batch_size = 1         # global batch (samples per step over all devices); the reference uses 1
    d.shuffle = True
    d.num_workers = 0        # Grain worker processes per host (0: reader threads in the training process)
    d.read_threads = 4
    d.prefetch = 2
    d.skip_bad = False       # skip unusable samples with a warning instead of stopping
    d.update(kw)
    return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = ALIASES.get(arg or "tiny", arg or "tiny")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    # mesh: data x fsdp x context x tensor; -1 fills the remaining devices
    # num_devices > 0: use only the first that many devices (single process); 0 = all
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1, num_devices=0))
    # sample shape for the forward demo / benchmarks
    c.shape = ml_collections.ConfigDict(dict(batch=1, views=7, height=90, width=160))

    c.job = ml_collections.ConfigDict()
    # job dir = <output_root>/<project>/<group>/<name>/ (checkpoints/, metrics.jsonl, tensorboard/, config.json)
    c.job.output_root = (os.environ.get("COSMOS_JAX_OUTPUT_ROOT") or os.environ.get("IMAGINAIRE_OUTPUT_ROOT")
                         or "/tmp/cosmos_jax-output")
    c.job.project = "cosmos_transfer_v2p5"
    c.job.group = "auto_multiview"
    c.job.name = "2b_cosmos_multiview_post_train_example"
    # JAX's persistent compilation cache (train, infer): a restarted or resumed job skips recompiling.
    # "auto" = <output_root>/xla_cache, "" = off, or a path; JAX_COMPILATION_CACHE_DIR in the environment wins
    c.job.compilation_cache_dir = "auto"

    c.loss = ml_collections.ConfigDict()
    c.loss.shift = 5.0                                   # sigma = shift*u / (1 + (shift-1)*u), u ~ logit-normal
    c.loss.conditional_frames_probs = (0.5, 0.25, 0.25)  # P(k latent conditioning frames per view), k = 0, 1, 2
    c.loss.text_dropout = 0.2                            # per-sample CFG dropout (embedding zeroed)
    c.loss.control_weight = 1.0

    c.optimizer = ml_collections.ConfigDict()
    # FusedAdam in AdamW mode, fp32 master weights; all trainable parameters decay (reference)
    c.optimizer.lr = 8.63e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-3
    c.optimizer.clip_norm = 0.1   # global L2 norm after non-finite gradients are zeroed

    c.scheduler = ml_collections.ConfigDict()
    # LambdaLinearScheduler: lr * f(n); f rises f_start -> f_max over warm_up_steps, then falls linearly to f_min
    # at cycle_length (and stays there)
    c.scheduler.warm_up_steps = 1000
    c.scheduler.f_start = 1e-6
    c.scheduler.f_max = 0.5
    c.scheduler.f_min = 0.2
    c.scheduler.cycle_length = 100000

    c.ema = ml_collections.ConfigDict()
    c.ema.enabled = True
    c.ema.rate = 0.1              # power EMA: beta(n) = (1 - 1/(n+1))^(gamma+1), gamma from the rate

    c.trainer = ml_collections.ConfigDict()
    c.trainer.max_iter = 5000
    c.trainer.save_iter = 200
    c.trainer.logging_iter = 100
    c.trainer.resume = True       # continue from the job's latest complete checkpoint when there is one
    c.trainer.max_to_keep = 5     # checkpoints kept (the reference keeps all); 0 = keep all
    c.trainer.async_checkpointing = True
    c.trainer.max_nonfinite_steps = 20  # consecutive non-finite losses before training stops with an error
    # every sample_iter steps generate the first sample of the step's batch with the regular and the EMA weights
    # (the reference's every_n_sample_reg/_ema callbacks: guidance 7, 35 steps) into <job>/samples/ + TensorBoard
    c.trainer.sample_iter = 200   # 0 = off
    c.trainer.sample_steps = 35

    # inference sampler (python -m cosmos_jax.infer): opt-in step cache (diffusion/sampling.py StepCache), off at 0:
    # skip the net while the accumulated |1 - magnitude ratio| of its velocities stays under the threshold
    c.sampler = ml_collections.ConfigDict(dict(step_cache_threshold=0.0, step_cache_max_skips=2,
                                               step_cache_warmup=4, step_cache_final=2))

    if variant == "tiny":
        c.model = _model(model_channels=64, num_blocks=4, num_heads=4, adaln_lora_dim=16, vace_block_every_n=2,
                         state_t=2, crossattn_proj_in_channels=48, crossattn_emb_channels=32, dtype="float32",
                         weight_dtype="float32", attention_backend="xla", remat_policy="none",
                         rope_ranges_bf16=False)
        c.vae = _vae(dim=8, dtype="float32", batch_chunk=0)
        c.text = _text(model_dir=os.path.join(_REPO, "assets", "tiny_text_encoder"), dtype="float32",
                       attention_backend="xla", batch_size=7)
        c.data = _data(dataset_dir=os.path.join(_REPO, "assets", "multiview_hdmap_posttrain_dataset"),
                       num_frames=5, height=64, width=96, read_threads=2)
        c.shape.update(dict(views=3, height=8, width=12))
        c.mesh.update(dict(fsdp=1, num_devices=1))  # one device (a CPU); e.g. --config.mesh.num_devices=0
        #                                            --config.mesh.context=4 spreads it over 4 devices
        c.job.name = "tiny"
        c.optimizer.lr = 2e-3
        # state_t 2: k = 2 conditioning frames would condition every frame (a step with nothing to denoise, loss 0)
        c.loss.conditional_frames_probs = (0.5, 0.5)
        c.scheduler.warm_up_steps = 10
        c.scheduler.f_start = 0.1
        c.scheduler.cycle_length = 1000
        c.trainer.update(dict(max_iter=50, save_iter=25, logging_iter=5, sample_iter=0))
    elif variant == "post_train_example":
        c.model = _model()
        c.vae = _vae()
        c.text = _text()
        c.data = _data(dataset_dir=os.path.join(_REPO, "assets", "multiview_hdmap_posttrain_dataset"))
        c.mesh.update(dict(fsdp=1, context=-1))  # all GPUs in one context-parallel group, as the reference
    else:
        raise ValueError(f"unknown config variant {variant!r}; choose tiny or post_train_example "
                         f"(alias {', '.join(ALIASES)})")
    c.lock()
    return c
