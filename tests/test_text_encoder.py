"""The Qwen2.5-VL text encoder and the caption-embedding recipe against Hugging Face transformers (fp32, CPU)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.models import text_encoder as te
from cosmos_jax.text import embed as text_embed
from cosmos_jax.text import tokenizer as text_tok
from cosmos_jax.weights import hf_io
from tests import tiny_qwen

TOL = 1e-4
LONG = " ".join(["a white truck passes a cyclist at the crossing"] * 120)  # > 512 tokens
CAPTIONS = ["A white truck passes a cyclist at a crossing.", LONG, ""]
# Reference literals (written out here, not imported from the code under test):
# predict2/text_encoders/text_encoder.py L130-220 system prompt, and predict2_multiview/datasets/multiview.py
# DEFAULT_CAPTION_PREFIXES (L63-71) in DEFAULT_CAMERAS order (view index 0..6).
REFERENCE_SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
REFERENCE_CAPTION_PREFIXES = (
    "The video is captured from a camera mounted on a car. The camera is facing forward.",
    "The video is captured from a camera mounted on a car. The camera is facing to the right.",
    "The video is captured from a camera mounted on a car. The camera is facing the rear right side.",
    "The video is captured from a camera mounted on a car. The camera is facing backwards.",
    "The video is captured from a camera mounted on a car. The camera is facing the rear left side.",
    "The video is captured from a camera mounted on a car. The camera is facing to the left.",
    "The video is captured from a telephoto camera mounted on a car. The camera is facing forward.",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen") / "tiny")
    tiny_qwen.build(d)
    return d


@pytest.fixture(scope="module")
def embedder(model_dir):
    return text_embed.TextEmbedder.from_dir(model_dir, dtype=jnp.float32, param_dtype=jnp.float32)


def _hf_hidden(model_dir, ids):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # the reference passes token ids only: no attention mask, positions 0..S-1
        out = model.model.language_model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def _hf_recipe(model_dir, ids):
    """The reference recipe on HF's hidden states 1..L: each (h - mean) / (unbiased std + 1e-8), concatenated."""
    import torch

    hs = [torch.from_numpy(h) for h in _hf_hidden(model_dir, ids)]
    return torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hs[1:]], -1).numpy()


def _hf_token_ids(model_dir, captions, n=512):
    """Token ids as the reference makes them, with transformers alone: apply_chat_template(tokenize=True) of the
    system + user content lists, truncated to the first n or right-padded with the tokenizer's pad id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    out = np.full((len(captions), n), tok.pad_token_id, np.int64)
    for row, caption in enumerate(captions):
        chat = [{"role": "system", "content": [{"type": "text", "text": REFERENCE_SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": caption}]}]
        ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, add_vision_id=False)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)[:n]
        out[row, :len(ids)] = ids
    return out


def test_token_ids_follow_the_reference_recipe(embedder):
    tok = embedder.tokenizer
    assert tok.text("hi there") == (f"<|im_start|>system\n{REFERENCE_SYSTEM_PROMPT}<|im_end|>\n"
                                    "<|im_start|>user\nhi there<|im_end|>\n")
    ids = tok.ids(CAPTIONS)
    assert ids.shape == (3, 512) and ids.dtype == np.int32
    full = [tok.tokenizer(tok.text(c))["input_ids"] for c in CAPTIONS]
    assert len(full[1]) > 512 and list(ids[1]) == full[1][:512]  # truncated to the first 512
    for row in (0, 2):  # right-padded with the pad id
        n = len(full[row])
        assert list(ids[row, :n]) == full[row] and (ids[row, n:] == tok.pad_id).all()
    assert tok.pad_id == tok.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_hidden_states_match_transformers(model_dir, embedder):
    ids = embedder.tokenizer.ids(CAPTIONS)
    want = _hf_hidden(model_dir, ids)
    assert len(want) == embedder.cfg.num_hidden_layers + 1
    with jax.default_matmul_precision("highest"):
        got = np.asarray(te.QwenTextModel(embedder.cfg).apply({"params": embedder.params}, jnp.asarray(ids)))
    for layer in range(got.shape[0]):  # ours = HF hidden_states[1:] (the last one after the final norm)
        err = np.max(np.abs(got[layer] - want[layer + 1]))
        assert err <= TOL, f"hidden state {layer + 1}: max |diff| {err}"


def test_recipe_embeddings_match_transformers(model_dir, embedder):
    ids = embedder.tokenizer.ids(CAPTIONS)
    want = _hf_recipe(model_dir, ids)
    with jax.default_matmul_precision("highest"):
        got = embedder(CAPTIONS)
    assert got.shape == (3, 512, 3 * 64) == want.shape
    assert np.max(np.abs(got - want)) <= TOL
    # batching (batch 2 over 3 captions: padded last batch) changes nothing
    embedder2 = text_embed.TextEmbedder(embedder.cfg, embedder.params, embedder.tokenizer, batch_size=2)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(embedder2(CAPTIONS), got, atol=1e-5)


def test_unrolled_layers_equal_the_scan(model_dir, embedder):
    import dataclasses

    assert not embedder.cfg.scan_layers and "layers_2" in embedder.params and "layers" not in embedder.params
    cfg = dataclasses.replace(embedder.cfg, scan_layers=True)
    params = text_embed.place_params(hf_io.load_params(model_dir, cfg), cfg)
    assert params["layers"]["down_proj"]["kernel"].shape == (3, 96, 64)
    ids = jnp.asarray(embedder.tokenizer.ids(CAPTIONS[:1]))
    with jax.default_matmul_precision("highest"):
        a = text_embed.embed_ids(embedder.cfg, embedder.params, ids)
        b = text_embed.embed_ids(cfg, params, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_flat_released_config_and_sharded_checkpoint_load_the_same(model_dir, embedder, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    d = tmp_path / "released"
    shutil.copytree(model_dir, d)
    tiny_qwen.to_flat_config(str(d))
    assert hf_io.load_config(d, dtype=jnp.float32, param_dtype=jnp.float32) == embedder.cfg
    # current-transformers names (model.language_model.*) in two shards with an index
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        state = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: f.get_tensor(k)
                 for k in f.keys()}
    os.remove(d / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / fname))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    params = text_embed.place_params(hf_io.load_params(d, embedder.cfg), embedder.cfg)
    jax.tree.map(np.testing.assert_array_equal, params, embedder.params)


def test_missing_or_wrong_files_are_named(model_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(model_dir, d)
    cfg = hf_io.load_config(d)
    os.remove(d / "model.safetensors")
    with pytest.raises(hf_io.CheckpointDirError, match="model.safetensors"):
        hf_io.load_params(d, cfg)
    os.remove(d / "tokenizer.json")
    with pytest.raises(text_tok.TokenizerFilesError, match="tokenizer.json"):
        text_tok.CaptionTokenizer(d)
    os.remove(d / "config.json")
    with pytest.raises(hf_io.CheckpointDirError, match="config.json"):
        hf_io.load_config(d)
    with pytest.raises(hf_io.CheckpointDirError, match="missing"):  # weights of another size
        hf_io.load_params(model_dir, te.QwenTextConfig.tiny(num_hidden_layers=4))
    with pytest.raises(ValueError, match="not a Qwen2"):
        te.QwenTextConfig.from_hf_config({"model_type": "llama", "hidden_size": 8})


def test_fsdp_sharded_encoder_equals_single_device(embedder):
    from cosmos_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(fsdp=8)
    sharded = text_embed.place_params(jax.tree.map(np.asarray, embedder.params), embedder.cfg, mesh)
    assert not sharded["layers_0"]["gate_up_proj"]["kernel"].sharding.is_fully_replicated
    assert not sharded["embed_tokens"].sharding.is_fully_replicated
    ids = jnp.asarray(embedder.tokenizer.ids(CAPTIONS[:2]))
    with jax.default_matmul_precision("highest"):
        a = text_embed.embed_ids(embedder.cfg, embedder.params, ids)
        b = text_embed.embed_ids(embedder.cfg, sharded, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_per_view_captions_and_assembly():
    train = text_embed.training_view_captions("A truck.")
    # reference ExtractFramesAndCaptions: f"{prefix} {caption}" on the front-wide camera, f"{prefix} " elsewhere
    assert train == [REFERENCE_CAPTION_PREFIXES[0] + " A truck."] + [p + " " for p in REFERENCE_CAPTION_PREFIXES[1:]]
    assert train[3] == "The video is captured from a camera mounted on a car. The camera is facing backwards. "
    assert text_embed.inference_view_captions("go", 3) == ["go", " ", " "]
    neg = text_embed.negative_view_captions(2, primary=1)
    assert neg[0] == " " and neg[1].startswith("The video captures a series of frames showing ugly scenes")
    per_view = np.arange(3 * 4 * 2).reshape(3, 4, 2)
    flat = text_embed.assemble_views(per_view)
    assert flat.shape == (12, 2) and (flat[4:8] == per_view[1]).all()
    with pytest.raises(ValueError, match="caption prefix"):
        text_embed.training_view_captions("x", cameras=("camera_roof",))


def test_projected_context_shortcut(case_a):
    from tools import parity

    cfg = parity.load_case_config(str(case_a))
    params, cfg = parity.load_case_params(str(case_a), cfg)
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    from cosmos_jax.models import dit as dit_lib

    model = dit_lib.MultiViewControlDiT(cfg)
    with jax.default_matmul_precision("highest"):
        ref = model.apply({"params": params}, **args)
        ctx = text_embed.project_context(params["crossattn_proj"], args["crossattn_emb"], cfg)
        got = model.apply({"params": params}, **{**args, "crossattn_emb": ctx}, context_projected=True)
        dropped = text_embed.dropped_context(params["crossattn_proj"], cfg, n_tokens=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)
    gelu_bias = jax.nn.gelu(jnp.asarray(params["crossattn_proj"]["bias"]), approximate=False)
    np.testing.assert_allclose(np.asarray(dropped), np.broadcast_to(gelu_bias, dropped.shape), atol=1e-7)


def test_embedder_from_config_section(model_dir, embedder):
    from configs import transfer2_auto_multiview as cfg_file

    cfg = cfg_file.get_config("tiny")
    with cfg.unlocked():
        cfg.text.model_dir = ""
    with pytest.raises(ValueError, match="model_dir"):
        text_embed.TextEmbedder.from_config(cfg.text)
    with cfg.unlocked():
        cfg.text.model_dir = model_dir
        cfg.text.batch_size = 3
    emb = text_embed.TextEmbedder.from_config(cfg.text)
    assert emb.batch_size == 3 and emb.cfg == embedder.cfg
    assert cfg_file.get_config("post_train_example").text.attention_backend == "cudnn"


def test_parity_cli_text(model_dir, tmp_path):
    """The CLI's token ids and embeddings against transformers alone (HF tokenizer + chat template, HF model)."""
    from tools import parity

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(CAPTIONS))
    out = tmp_path / "text.npz"
    parity.main(["text", "--model-dir", model_dir, "--captions", str(captions), "--out", str(out)])
    data = np.load(out)
    want_ids = _hf_token_ids(model_dir, CAPTIONS)
    assert want_ids[0, -1] == want_ids[2, -1] != want_ids[1, -1]  # short captions padded, the long one truncated
    np.testing.assert_array_equal(data["token_ids"], want_ids)
    want = _hf_recipe(model_dir, want_ids)
    assert data["embeddings"].shape == want.shape == (3, 512, 3 * 64)
    assert np.max(np.abs(data["embeddings"] - want)) <= TOL
