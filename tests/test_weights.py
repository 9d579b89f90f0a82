"""Reference state dict <-> Flax params: exact round trip, prefixes, and clear errors for bad files."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from tools import parity
from cosmos_jax.weights import keymap, torch_io


@pytest.fixture(scope="module")
def case(case_a):
    cfg = parity.load_case_config(str(case_a))
    sd = torch_io.load_state_dict(case_a / "weights.safetensors")
    return cfg, sd


def test_round_trip_reproduces_every_reference_tensor(case):
    cfg, sd = case
    params, extras = keymap.reference_to_flax(sd, cfg)
    back = keymap.flax_to_reference(params, cfg, extras=extras)
    assert set(back) == set(sd)
    for key, val in sd.items():
        assert back[key].dtype == val.dtype, key
        np.testing.assert_array_equal(back[key], val, err_msg=key)


def test_pt_with_net_prefix_and_extra_state(case, tmp_path):
    import torch

    cfg, sd = case
    tsd = {f"net.{k}": torch.from_numpy(np.array(v)) for k, v in sd.items()}
    tsd["net.blocks.0.self_attn.q_norm._extra_state"] = torch.empty(0, dtype=torch.uint8)
    tsd["net_ema.x_embedder.proj.1.weight"] = torch.zeros(1)  # other prefix: must be ignored
    path = tmp_path / "model.pt"
    torch.save(tsd, path)
    params, _ = keymap.reference_to_flax(torch_io.load_state_dict(path), cfg)
    np.testing.assert_array_equal(params["x_embedder"]["kernel"], sd["x_embedder.proj.1.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["block"]["mlp"]["layer1"]["kernel"][3],
                                  sd["blocks.3.mlp.layer1.weight"].T)


def test_bf16_rope_buffers_are_recognised(case):
    cfg, sd = case
    big = dataclasses.replace(cfg, model_channels=cfg.num_heads * 128)  # head_dim 128: k/42 is not exact in bf16
    spatial, temporal = keymap.rope_lib.rope_ranges(big)
    rounded = {f"pos_embedder_options.n_cameras_{n}.{name}": arr.astype(ml_dtypes.bfloat16)
               for n in range(1, 8)
               for name, arr in (("dim_spatial_range", spatial), ("dim_temporal_range", temporal),
                                 ("seq", np.arange(big.rope_max_len, dtype=np.float32)))}
    assert keymap.rope_ranges_of(rounded, big, source="x") is True
    exact = {k: v.astype(np.float32) if "seq" in k else v for k, v in rounded.items()}
    exact.update({f"pos_embedder_options.n_cameras_{n}.dim_spatial_range": spatial for n in range(1, 8)})
    with pytest.raises(keymap.WeightsError, match="partly bf16-rounded"):
        keymap.rope_ranges_of(exact, big, source="x")


def test_import_checks_the_rope_variant_against_the_config_and_never_changes_it(case):
    cfg, sd = case
    big = dataclasses.replace(cfg, model_channels=cfg.num_heads * 128)
    spatial, _ = keymap.rope_lib.rope_ranges(big)
    assert not np.array_equal(spatial.astype(ml_dtypes.bfloat16).astype(np.float32), spatial)
    # the fixture's own buffers (head_dim 16) are exact: a config that claims bf16-rounded buffers is refused,
    # unless both variants coincide at this head_dim (then either setting is accepted)
    variant = keymap.rope_ranges_of(sd, cfg)
    if variant is None:
        keymap.reference_to_flax(sd, dataclasses.replace(cfg, rope_ranges_bf16=True))
    else:
        with pytest.raises(keymap.WeightsError, match="model.rope_ranges_bf16"):
            keymap.reference_to_flax(sd, dataclasses.replace(cfg, rope_ranges_bf16=not variant), source="w.pt")
    rounded = {k: (v.astype(ml_dtypes.bfloat16).astype(np.float32) if "range" in k else v) for k, v in sd.items()}
    if keymap.rope_ranges_of(rounded, cfg):
        with pytest.raises(keymap.WeightsError, match="rope_ranges_bf16=True"):
            keymap.reference_to_flax(rounded, cfg, source="w.pt")
        keymap.reference_to_flax(rounded, dataclasses.replace(cfg, rope_ranges_bf16=True))


def test_equal_configs_hash_equal_whatever_the_dtype_spelling():
    import jax.numpy as jnp

    from cosmos_jax.models.dit_config import DiTConfig

    a, b = DiTConfig.tiny(dtype=jnp.bfloat16), DiTConfig.tiny(dtype="bfloat16")
    assert a == b and hash(a) == hash(b)
    assert DiTConfig.tiny(dtype=jnp.float32) != a


@pytest.mark.parametrize("mutate,pattern", [
    (lambda sd: sd.pop("blocks.2.mlp.layer2.weight"), r"missing 1 keys: \['blocks.2.mlp.layer2.weight'\]"),
    (lambda sd: sd.__setitem__("blocks.9.mlp.layer2.weight", np.zeros((4, 4))), "unexpected 1 keys"),
    (lambda sd: sd.__setitem__("view_embeddings.weight", np.zeros((6, 7), np.float32)),
     r"view_embeddings.weight: checkpoint \(6, 7\) vs network \(7, 7\)"),
    (lambda sd: sd.__setitem__("pos_embedder_options.n_cameras_2.dim_spatial_range", np.ones(2, np.float32)),
     "RoPE buffer pos_embedder_options.n_cameras_2.dim_spatial_range"),
])
def test_bad_state_dicts_name_the_problem(case, mutate, pattern):
    cfg, sd = case
    sd = dict(sd)
    mutate(sd)
    with pytest.raises(keymap.WeightsError, match=pattern):
        keymap.reference_to_flax(sd, cfg, source="ckpt.pt")


def test_wrong_architecture_lists_all_differences(case):
    cfg, sd = case
    with pytest.raises(keymap.WeightsError) as err:
        keymap.reference_to_flax(sd, dataclasses.replace(cfg, num_blocks=6), source="ckpt.pt")
    # 2 extra base blocks x 20 tensors + 1 extra control block x 22 tensors, all counted
    assert "missing 62 keys" in str(err.value) and "blocks.4." in str(err.value) and "ckpt.pt" in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(torch_io.WeightFileError, match="no such weight file"):
        torch_io.load_state_dict(tmp_path / "absent.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(torch_io.WeightFileError, match="bad.safetensors"):
        torch_io.load_state_dict(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(torch_io.WeightFileError, match="junk.pt"):
        torch_io.load_state_dict(junk)
    other = tmp_path / "w.bin"
    other.write_bytes(b"")
    with pytest.raises(torch_io.WeightFileError, match="unknown weight file type"):
        torch_io.load_state_dict(other)


def test_pt_that_is_not_a_state_dict(tmp_path):
    import torch

    path = tmp_path / "nested.pt"
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(torch_io.WeightFileError, match="not tensors"):
        torch_io.load_state_dict(path)


# local (per-device) shapes on a data 1 x fsdp 2 x context 4 mesh, derived by hand from the sharding table in
# parallel/mesh.py: "embed" / "kv_embed" / "text_in" / "modulation" -> fsdp x context (8 ways, first use only),
# "heads" / "mlp" / "embed_out" -> tensor (1), "layers" / "lora" / "norm" / "views" / "patch_in" -> whole
MESH_LOCAL_SHAPES = {
    ("blocks", "block", "mlp", "layer1", "kernel"): (4, 8, 256),        # layers, embed, mlp
    ("blocks", "block", "mlp", "layer2", "kernel"): (4, 256, 8),        # layers, mlp, embed
    ("blocks", "block", "self_attn", "q_proj", "kernel"): (4, 8, 64),   # layers, embed, heads
    ("blocks", "block", "cross_attn", "k_proj", "kernel"): (4, 4, 64),  # layers, kv_embed (32 / 8), heads
    ("blocks", "block", "adaln_modulation_mlp", "up", "kernel"): (4, 16, 24),  # layers, lora, modulation
    ("blocks", "block", "self_attn", "q_norm", "scale"): (4, 16),       # layers, norm
    ("control_blocks", "block", "after_proj", "kernel"): (2, 8, 64),    # layers, embed, embed_out
    ("control_blocks", "block", "after_proj", "bias"): (2, 64),
    ("crossattn_proj", "kernel"): (6, 32),                              # text_in (48 / 8), kv_embed: axes used
    ("t_embedder_linear_2", "kernel"): (8, 192),                        # embed, modulation: axes already used
    ("final_linear", "kernel"): (8, 64),                                # embed, patch_out
    ("control_embedder", "kernel"): (772, 64),                          # patch_in, embed_out
    ("view_embeddings",): (7, 7),                                       # views, norm
}


def test_case_a_weights_on_an_fsdp_context_mesh(case, case_a):
    """caseA's weights placed by build.init_params on 8 devices (FSDP x context): the expected shards, the file's
    values, and a sharded forward (batch over fsdp, frames over context, Ulysses attention) equal to the fixture."""
    import jax

    from cosmos_jax import build
    from cosmos_jax.models import dit as dit_lib
    from cosmos_jax.parallel import mesh as mesh_lib

    cfg, sd = case
    mesh = mesh_lib.make_mesh(fsdp=2, context=4)
    params = build.init_params(cfg, mesh, weights=str(case_a / "weights.safetensors"))
    flat = {tuple(k.key for k in path): a for path, a in jax.tree_util.tree_leaves_with_path(params)}
    for path, local in MESH_LOCAL_SHAPES.items():
        a = flat[path]
        assert a.sharding.mesh == mesh and a.sharding.shard_shape(a.shape) == local, (path, a.sharding.spec)
        assert a.sharding.is_fully_replicated == (local == a.shape), path
    total = sum(a.size for a in flat.values())
    per_device = sum(int(np.prod(a.sharding.shard_shape(a.shape))) for a in flat.values())
    assert per_device < 0.25 * total  # FSDP: a device holds a fraction of the weights (embedders stay whole)
    # the values are the file's: Linear weights transposed, stacked blocks in order
    np.testing.assert_array_equal(np.asarray(flat[("blocks", "block", "mlp", "layer1", "kernel")])[3],
                                  sd["blocks.3.mlp.layer1.weight"].T)
    np.testing.assert_array_equal(np.asarray(flat[("crossattn_proj", "kernel")]), sd["crossattn_proj.0.weight"].T)
    np.testing.assert_array_equal(np.asarray(flat[("control_blocks", "block", "after_proj", "bias")])[1],
                                  sd["control_blocks.1.after_proj.bias"])

    # forward on the mesh: the case's sample twice (the batch splits over fsdp 2), its 4 frames over context 4
    args = parity.load_case_inputs(str(case_a / "inputs.npz"))
    weight = args.pop("control_weight")
    args = {k: np.concatenate([np.asarray(v)] * 2) for k, v in args.items()}
    model = dit_lib.MultiViewControlDiT(cfg)
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh):
        out = jax.jit(lambda p, a: model.apply({"params": p}, **a, control_weight=weight))(params, args)
    assert out.sharding.shard_shape(out.shape)[0] == 1 and not out.sharding.is_fully_replicated
    ref = np.load(case_a / "output.npz")["out_B_C_T_H_W"]
    out = np.asarray(out)
    for i in range(2):
        assert np.max(np.abs(out[i:i + 1] - ref)) <= 1e-4, i
