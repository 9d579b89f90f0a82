"""Checkpoint export (cosmos_jax/weights/export.py, tools/export.py) and its inverse (build.load_network_params).

DCP: the three files equal the reference converter's (fixture checksums, shipped files byte for byte), multi-chunk
DCPs equal torch's own reader. Orbax: the reference key set/order/shapes, bit-exact round trips of the regular and
EMA weights, the same bytes from a state saved on 8 devices as on 1. Atomic outputs (an exception or SIGKILL midway
leaves the previous export untouched), named errors for bad input.
"""

import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import transfer2_auto_multiview as config_lib
from cosmos_jax import build
from cosmos_jax import cli as cli_lib
from cosmos_jax.models.dit_config import DiTConfig
from cosmos_jax.training import checkpoint as ckpt_lib
from cosmos_jax.training import step as step_lib
from cosmos_jax.weights import dcp_io, export, keymap, torch_io, torch_save
from tools import export as export_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
FILES = (export.MODEL_PT, export.EMA_FP32_PT, export.EMA_BF16_PT)


def _sha(arr) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _digest_files(d: pathlib.Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------ torch.save writer

def test_streamed_writer_writes_the_bytes_of_torch_save(tmp_path):
    import torch

    sd = {"w": torch.randn(3, 5), "b16": torch.randn(4, 2).bfloat16(), "count": torch.tensor(7, dtype=torch.int64),
          "extra": torch.empty(0, dtype=torch.uint8), "empty": torch.empty(2, 0, 3), "flag": torch.tensor([True]),
          "half": torch.randn(6).half(), "hours": torch.tensor(0.125), "i32": torch.arange(5, dtype=torch.int32)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(sd, tmp_path / "a" / "model.pt")
    arrays = {k: torch_io._torch_to_numpy(v) for k, v in sd.items()}
    w = torch_save.TorchSaveWriter(tmp_path / "b" / "model.pt", [(k, a.dtype, a.shape) for k, a in arrays.items()])
    for k, a in arrays.items():
        assert w.write(k, a) == _sha(a)
    w.close()
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    back = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_writer_refuses_out_of_order_or_missing_tensors(tmp_path):
    w = torch_save.TorchSaveWriter(tmp_path / "x.pt", [("a", np.float32, (2,)), ("b", np.float32, (3,))])
    with pytest.raises(torch_save.TorchSaveError, match="declared a float32"):
        w.write("b", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(torch_save.TorchSaveError, match=r"1 of 2 tensors"):
        w.close()


# ------------------------------------------------------------------------------------------------ DCP

@pytest.fixture(scope="module")
def dcp(dit_parity):
    d = dit_parity / "dcp"
    return d, json.loads((d / "dcp_fixture.json").read_text())


def _check_against_converter(out: pathlib.Path, dcp_dir: pathlib.Path, fixture: dict, manifest: dict):
    import torch

    for name in FILES:
        want = fixture["converter_outputs"][name]
        got = manifest["files"][name]["tensors"]
        assert [(t["key"], t["dtype"], t["shape"], t["sha256"]) for t in got] == \
               [(t["key"], t["dtype"], t["shape"], t["sha256"]) for t in want], name
        sd = torch.load(out / name, map_location="cpu", weights_only=True)  # what a reference loader reads
        assert list(sd) == [t["key"] for t in want], name
        for t in want:
            v = sd[t["key"]]
            assert str(v.dtype).removeprefix("torch.") == t["dtype"] and list(v.shape) == t["shape"], t["key"]
            assert _sha(torch_io._torch_to_numpy(v)) == t["sha256"], t["key"]
    for name in (export.EMA_FP32_PT, export.EMA_BF16_PT):  # the shipped converter outputs, tensor for tensor
        ref = torch.load(dcp_dir / "converted" / name, map_location="cpu", weights_only=True)
        mine = torch.load(out / name, map_location="cpu", weights_only=True)
        assert list(mine) == list(ref)
        for k in ref:
            assert mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]), (name, k)
        # the same file, byte for byte (torch's zip records, same archive name)
        assert (out / name).read_bytes() == (dcp_dir / "converted" / name).read_bytes(), name


def test_dcp_seed_form_cli_equals_reference_converter(dcp, tmp_path):
    dcp_dir, fixture = dcp
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"),
                           str(dcp_dir / "checkpoints" / "iter_000000010" / "model"), str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["source"]["kind"] == "dcp" and manifest["source"]["step"] == 10
    assert manifest["network"]["inferred_from_tensor_shapes"] == {
        "model_channels": 64, "num_blocks": 4, "num_control_blocks": 2, "vace_block_every_n": 2, "num_heads": 4,
        "adaln_lora_dim": 16, "crossattn_emb_channels": 32, "crossattn_proj_in_channels": 48}
    _check_against_converter(out, dcp_dir, fixture, manifest)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES + (export.MANIFEST,))  # no temporary left


@pytest.mark.parametrize("form", ["checkpoints", "checkpoints/iter_000000010"])
def test_dcp_checkpoints_and_step_forms(dcp, tmp_path, form):
    dcp_dir, fixture = dcp
    manifest = export.export(dcp_dir / form, tmp_path, progress=False)
    assert manifest["source"]["step"] == 10
    assert manifest["source"]["path"] == str(dcp_dir / "checkpoints" / "iter_000000010" / "model")
    _check_against_converter(tmp_path, dcp_dir, fixture, manifest)


def test_dcp_no_ema_writes_model_pt_only_as_the_converter(dcp, tmp_path):
    dcp_dir, fixture = dcp
    for name in (export.EMA_FP32_PT, export.EMA_BF16_PT):
        (tmp_path / name).write_bytes(b"stale")
    manifest = export.export(dcp_dir / "checkpoints", tmp_path, ema=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [export.MANIFEST, export.MODEL_PT]
    assert [t["sha256"] for t in manifest["files"][export.MODEL_PT]["tensors"]] == \
           [t["sha256"] for t in fixture["converter_outputs"][export.MODEL_PT]]


def _write_multichunk_dcp(d: pathlib.Path):
    """A DCP as FSDP ranks write it: tensors split into chunks over two .distcp files (torch's own classes)."""
    import io

    import torch
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    g = torch.Generator().manual_seed(0)
    full = {"net.a": torch.randn(6, 5, generator=g), "net.b": torch.randn(4, 8, generator=g).bfloat16(),
            "net.c": torch.arange(3, dtype=torch.int64), "net_ema.a": torch.randn(6, 5, generator=g)}
    splits = {"net.a": [((0, 0), (4, 5)), ((4, 0), (2, 5))], "net.b": [((0, 0), (4, 3)), ((0, 3), (4, 5))],
              "net.c": [((0,), (3,))], "net_ema.a": [((0, 0), (3, 5)), ((3, 0), (3, 5))]}
    d.mkdir(parents=True)
    files = {0: io.BytesIO(), 1: io.BytesIO()}
    sdm, storage = {}, {}
    for key, chunks in splits.items():
        metas = []
        for i, (off, size) in enumerate(chunks):
            part = full[key]
            for dim, (o, s) in enumerate(zip(off, size)):
                part = part.narrow(dim, o, s)
            rank = i % 2
            buf = io.BytesIO()
            torch.save(part.clone(), buf)
            start = files[rank].tell()
            files[rank].write(buf.getvalue())
            storage[md.MetadataIndex(key, torch.Size(off), i)] = _StorageInfo(f"__{rank}_0.distcp", start,
                                                                               len(buf.getvalue()))
            metas.append(md.ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)))
        sdm[key] = md.TensorStorageMetadata(md.TensorProperties(dtype=full[key].dtype), full[key].shape, metas)
    for rank, buf in files.items():
        (d / f"__{rank}_0.distcp").write_bytes(buf.getvalue())
    with open(d / ".metadata", "wb") as f:
        import pickle

        pickle.dump(md.Metadata(state_dict_metadata=sdm, planner_data={k: (k,) for k in sdm}, storage_data=storage),
                    f)
    return full


def test_multichunk_dcp_equals_torch_dcp_to_torch_save(tmp_path):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    full = _write_multichunk_dcp(tmp_path / "iter_000000004" / "model")
    (tmp_path / "ref").mkdir()
    dcp_to_torch_save(tmp_path / "iter_000000004" / "model", tmp_path / "ref" / "model.pt")
    manifest = export.export(tmp_path / "iter_000000004", tmp_path / "out", progress=False)
    assert manifest["source"]["step"] == 4
    ref = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    mine = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert list(mine) == list(ref) == list(full)
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]) and torch.equal(mine[k], full[k]), k
    assert (tmp_path / "out" / "model.pt").read_bytes() == (tmp_path / "ref" / "model.pt").read_bytes()
    ema = torch.load(tmp_path / "out" / export.EMA_BF16_PT, weights_only=True)
    assert list(ema) == ["net.a"] and torch.equal(ema["net.a"], full["net_ema.a"].bfloat16())


def test_dcp_metadata_unpickling_is_allow_listed(tmp_path):
    import pickle

    d = tmp_path / "model"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(print))  # a pickle referring to anything else is refused
    with pytest.raises(dcp_io.DcpError, match=r"refers to builtins.print"):
        dcp_io.read_metadata(d)


def test_load_network_params_from_dcp(dcp, case_a):
    dcp_dir, _ = dcp
    cfg = DiTConfig.tiny()
    want, _ = keymap.reference_to_flax(torch_io.load_state_dict(case_a / "weights.safetensors"), cfg)
    got, info = build.load_network_params(dcp_dir / "checkpoints", cfg)
    _assert_trees_equal(got, want)  # net.* of the DCP = caseA's weights
    assert info["format"] == "dcp" and info["step"] == 10 and int(info["extras"]["accum_iteration"]) == 10
    ema, _ = build.load_network_params(dcp_dir / "checkpoints" / "iter_000000010" / "model", cfg, ema=True)
    ema_pt, _ = build.load_network_params(dcp_dir / "converted" / export.EMA_FP32_PT, cfg)
    _assert_trees_equal(ema, ema_pt)
    with pytest.raises(keymap.WeightsError, match=r"converted/model_ema_fp32.pt: holds no EMA"):
        build.load_network_params(dcp_dir / "converted" / export.EMA_FP32_PT, cfg, ema=True)
    with pytest.raises(keymap.WeightsError, match=r"iter_000000010/model: does not match the network"):
        build.load_network_params(dcp_dir / "checkpoints", DiTConfig.tiny(num_blocks=6, vace_block_every_n=3))


# ------------------------------------------------------------------------------------------------ Orbax (ours)

def _tiny_config(weight_dtype="bfloat16"):
    config = config_lib.get_config("tiny")
    config.model.weight_dtype = weight_dtype
    return config


def _tiny_state(config, case_a, mesh=None):
    """A post-training state of the tiny network: caseA weights, trained and EMA weights moved apart."""
    cfg = build.dit_config_from(config.model)
    params, _ = keymap.reference_to_flax(torch_io.load_state_dict(case_a / "weights.safetensors"), cfg)
    state = step_lib.init_state(params, cfg, step_lib.step_config_from(config), step_lib.optimizer_from(config), 0)
    model = state["model"]
    n = iter(range(10**6))
    noise = lambda x, s: x + s * jax.random.normal(jax.random.fold_in(jax.random.key(1), next(n)), x.shape)  # noqa
    model["trainable"] = jax.tree.map(lambda x: noise(x, 1e-3), model["trainable"])
    model["ema"] = jax.tree.map(lambda x: noise(x, 1e-2), model["trainable"])
    if mesh is not None:
        from cosmos_jax.models import dit as dit_lib
        from cosmos_jax.parallel import mesh as mesh_lib

        boxed = jax.eval_shape(lambda: dit_lib.init_boxed_params(cfg, jax.random.key(0)))
        sh = mesh_lib.param_shardings(boxed, mesh)
        model = {item: {n: jax.device_put(v, sh[n]) for n, v in tree.items()} for item, tree in model.items()}
    else:
        dev = jax.devices()[0]
        model = jax.tree.map(lambda x: jax.device_put(x, dev), model)
    return cfg, model


def _save(directory, step, model, config):
    with ckpt_lib.Checkpointer(directory, async_save=False) as c:
        c.save(step, {"model": model}, config=config.to_dict())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, case_a):
    config = _tiny_config()
    cfg, model = _tiny_state(config, case_a)
    root = tmp_path_factory.mktemp("tiny_job")
    _save(root / "checkpoints", 3, model, config)
    out = root / "export"
    manifest = export.export(root / "checkpoints", out, progress=False)
    host = jax.tree.map(np.asarray, model)
    return {"config": config, "cfg": cfg, "model": host, "ckpt": root / "checkpoints", "out": out,
            "manifest": manifest}


def test_orbax_export_has_the_reference_keys_shapes_and_dtypes(tiny, dcp, case_a):
    _, fixture = dcp
    m = tiny["manifest"]
    assert m["source"] == {"kind": "orbax", "path": str(tiny["ckpt"] / "iter_000000003"), "step": 3}
    for name in FILES:  # the tiny config is the network of the DCP fixture: same keys, same order, same shapes
        got = [(t["key"], t["shape"]) for t in m["files"][name]["tensors"]]
        assert got == [(t["key"], t["shape"]) for t in fixture["converter_outputs"][name]], name
    ref = torch_io.load_state_dict(case_a / "weights.safetensors")  # the reference network's state dict
    ema = torch_io.load_state_dict(tiny["out"] / export.EMA_FP32_PT)
    no_extra = {k[len("net."):]: v for k, v in ema.items() if not k.endswith("._extra_state")}
    assert {k: v.shape for k, v in no_extra.items()} == {k: v.shape for k, v in ref.items()}
    extra = sorted(k for k in ema if k.endswith("._extra_state"))
    assert extra == sorted(f"net.{k}" for k in fixture_keys_extra(fixture))

    def dtypes(name, prefix):
        return {t["dtype"] for t in m["files"][name]["tensors"] if t["key"].startswith(prefix)
                and not t["key"].endswith("_extra_state") and "counter" not in t["key"]
                and t["key"] != f"{prefix}accum_iteration"}

    assert dtypes(export.MODEL_PT, "net.") == {"bfloat16"}  # as the reference trainer holds net (incl. buffers)
    assert dtypes(export.MODEL_PT, "net_ema.") == {"float32"}
    assert dtypes(export.EMA_FP32_PT, "net.") == {"float32"}
    assert dtypes(export.EMA_BF16_PT, "net.") == {"bfloat16"}
    for name in FILES:
        for t in m["files"][name]["tensors"]:
            if t["key"].endswith("_extra_state"):
                assert (t["dtype"], t["shape"]) == ("uint8", [0])
            elif "counter" in t["key"] or t["key"].endswith("accum_iteration"):
                assert (t["dtype"], t["shape"]) == ("int64", [])
    kw = m["network"]["reference_kwargs"]
    assert DiTConfig.from_reference_kwargs(kw, rope_ranges_bf16=tiny["cfg"].rope_ranges_bf16, dtype=tiny["cfg"].dtype,
                                           attention_backend=tiny["cfg"].attention_backend) == tiny["cfg"]


def fixture_keys_extra(fixture):
    return [t["key"][len("net."):] for t in fixture["converter_outputs"][export.EMA_FP32_PT]
            if t["key"].endswith("._extra_state")]


def test_orbax_round_trip_is_bit_identical(tiny):
    cfg, model, out = tiny["cfg"], tiny["model"], tiny["out"]
    f32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)  # noqa: E731
    bf16 = lambda t: jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), t)  # noqa: E731
    assert all(a.dtype == ml_dtypes.bfloat16 for a in jax.tree.leaves(model["frozen"]))
    regular = f32(build.merge_params(bf16(model["trainable"]), model["frozen"]))  # what the trainer's forward sees
    ema = f32(build.merge_params(model["ema"], model["frozen"]))
    got, info = build.load_network_params(out / export.MODEL_PT, cfg)
    _assert_trees_equal(got, regular)
    assert info["format"] == "pt" and int(info["extras"]["accum_iteration"]) == 0
    _assert_trees_equal(build.load_network_params(out / export.MODEL_PT, cfg, ema=True)[0], ema)
    _assert_trees_equal(build.load_network_params(out / export.EMA_FP32_PT, cfg)[0], ema)
    _assert_trees_equal(build.load_network_params(out / export.EMA_BF16_PT, cfg)[0], f32(bf16(ema)))
    # the Orbax checkpoint itself: fp32 master weights, and the EMA
    got, info = build.load_network_params(tiny["ckpt"], cfg)
    _assert_trees_equal(got, f32(build.merge_params(model["trainable"], model["frozen"])))
    assert (info["format"], info["step"]) == ("orbax", 3)
    _assert_trees_equal(build.load_network_params(tiny["ckpt"] / "iter_000000003", cfg, ema=True)[0], ema)


def test_orbax_export_equals_keymap_and_its_manifest(tiny):
    """Every exported tensor (RoPE buffers and accum scalars included) is keymap.flax_to_reference's value; the
    manifest's checksums are those of the files."""
    cfg, model, out = tiny["cfg"], tiny["model"], tiny["out"]
    ema = build.merge_params(model["ema"], jax.tree.map(lambda a: np.asarray(a, np.float32), model["frozen"]))
    want = keymap.flax_to_reference(ema, cfg, dtype=np.float32)
    got = torch_io.load_state_dict(out / export.EMA_FP32_PT)
    assert set(got) - {f"net.{k}" for k in want} == {f"net.{k}" for k in export.extra_state_keys(cfg)}
    for k, v in want.items():
        assert got[f"net.{k}"].dtype == v.dtype and np.array_equal(got[f"net.{k}"], v), k
    for name in FILES:
        sd = torch_io.load_state_dict(out / name)
        tensors = tiny["manifest"]["files"][name]["tensors"]
        assert [t["key"] for t in tensors] == list(sd)
        assert all(t["sha256"] == _sha(sd[t["key"]]) for t in tensors), name
        assert tiny["manifest"]["files"][name]["bytes"] == (out / name).stat().st_size
    assert json.loads((out / export.MANIFEST).read_text()) == tiny["manifest"]


def test_rope_buffers_follow_the_run_config(tiny, tmp_path, case_a):
    """rope_ranges_bf16=True (the real config): the fp32 EMA file holds the bf16-rounded ranges, and loads back."""
    config = _tiny_config("float32")
    config.model.model_channels = 4 * 128  # head_dim 128: k/42 is not exact in bf16
    config.model.rope_ranges_bf16 = True
    config.model.attention_backend = "cudnn"  # as a GPU run saves it: the export still runs on this CPU
    cfg = build.dit_config_from(config.model)
    params = {}
    for path, shape in export.param_shapes(cfg).items():
        tree = params
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = np.full(shape, 0.5, np.float32)
    state = step_lib.init_state(params, cfg, step_lib.step_config_from(config), step_lib.optimizer_from(config), 0)
    _save(tmp_path / "checkpoints", 1, state["model"], config)
    export.export(tmp_path / "checkpoints", tmp_path / "out", progress=False)
    sd = torch_io.load_state_dict(tmp_path / "out" / export.EMA_FP32_PT)
    assert keymap.rope_ranges_of(sd, cfg) is True
    assert sd["net.blocks.0.mlp.layer1.weight"].dtype == np.float32  # weight_dtype float32: net.* stays fp32
    build.load_network_params(tmp_path / "out" / export.MODEL_PT, cfg)
    with pytest.raises(keymap.WeightsError, match="rope_ranges_bf16"):
        build.load_network_params(tmp_path / "out" / export.EMA_FP32_PT,
                                  build.dit_config_from(_with(config, rope_ranges_bf16=False).model))
    with pytest.raises(keymap.WeightsError, match=r"different network: model.rope_ranges_bf16"):
        build.load_network_params(tmp_path / "checkpoints",
                                  build.dit_config_from(_with(config, rope_ranges_bf16=False).model))


def _with(config, **model):
    c = config.copy_and_resolve_references()
    for k, v in model.items():
        c.model[k] = v
    return c


def test_sharded_checkpoint_exports_the_same_bytes(tiny, tmp_path, case_a):
    from cosmos_jax.parallel import mesh as mesh_lib

    assert jax.device_count() == 8
    config = tiny["config"]
    mesh = mesh_lib.make_mesh(data=1, fsdp=8, context=1, tensor=1)
    _, sharded = _tiny_state(config, case_a, mesh=mesh)
    assert any(not x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
               for x in jax.tree.leaves(sharded))
    _save(tmp_path / "checkpoints", 3, sharded, config)
    export.export(tmp_path / "checkpoints", tmp_path / "out", progress=False)
    for name in FILES:
        assert (tmp_path / "out" / name).read_bytes() == (tiny["out"] / name).read_bytes(), name


def test_orbax_no_ema_and_ema_disabled_runs(tiny, tmp_path, case_a):
    m = export.export(tiny["ckpt"], tmp_path / "a", ema=False, progress=False)
    assert list(m["files"]) == [export.MODEL_PT]
    assert all(t["key"].startswith("net.") for t in m["files"][export.MODEL_PT]["tensors"])
    assert m["files"][export.MODEL_PT]["tensors"] == [t for t in tiny["manifest"]["files"][export.MODEL_PT]["tensors"]
                                                      if t["key"].startswith("net.")]
    config = tiny["config"].copy_and_resolve_references()
    config.ema.enabled = False
    _, model = _tiny_state(config, case_a)
    del model["ema"]
    _save(tmp_path / "noema", 2, model, config)
    with pytest.raises(export.ExportError, match=r"iter_000000002: holds no EMA weights .* --no-ema"):
        export.export(tmp_path / "noema", tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / export.MODEL_PT).exists()
    export.export(tmp_path / "noema", tmp_path / "b", ema=False, progress=False)
    assert (tmp_path / "b" / export.MODEL_PT).exists()


# ------------------------------------------------------------------------------------------------ atomic outputs

def test_failure_midway_leaves_the_previous_export(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(tiny["out"], out)
    before = _digest_files(out)
    calls = {"n": 0}
    write = export.TorchSaveWriter.write

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 300:
            raise OSError(28, "No space left on device")
        return write(self, *a, **kw)

    monkeypatch.setattr(export.TorchSaveWriter, "write", failing)
    for target in (out, tmp_path / "fresh"):
        calls["n"] = 0
        with pytest.raises(OSError, match="No space"):
            export.export(tiny["ckpt"], target, progress=False)
    assert _digest_files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_killed_export_leaves_no_partial_file(tiny, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny["out"], out)
    before = _digest_files(out)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from cosmos_jax.weights import export
from tools import export as cli
write, n = export.TorchSaveWriter.write, [0]
def killing(self, *a, **kw):
    n[0] += 1
    if n[0] == 300:
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, *a, **kw)
export.TorchSaveWriter.write = killing
cli.main([{str(tiny['ckpt'])!r}, {str(out)!r}, "--no-progress"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _digest_files(out) == before
    stale = [p for p in out.iterdir() if p.name.startswith(".export-tmp-")]
    assert len(stale) == 1 and any(stale[0].iterdir())  # the partial files are only in the temporary directory
    export.export(tiny["ckpt"], out, progress=False)  # the next export removes it
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    for name in FILES:
        assert (out / name).read_bytes() == (tiny["out"] / name).read_bytes()


# ------------------------------------------------------------------------------------------------ bad input

def _cli_error(capsys, *argv) -> str:
    assert cli_lib.run(export_cli.main, [*map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_malformed_inputs_give_named_errors(tiny, dcp, tmp_path, capsys):
    dcp_dir, _ = dcp
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    assert f"{missing}: no such file or directory" in _cli_error(capsys, missing, out)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: not a checkpoint" in _cli_error(capsys, empty, out)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    assert f"{a_file}: is a file" in _cli_error(capsys, a_file, out)

    step = tmp_path / "orbax" / "iter_000000003"
    shutil.copytree(tiny["ckpt"] / "iter_000000003", step)
    (step / ckpt_lib.COMMIT_MARKER).unlink()
    msg = _cli_error(capsys, step, out)
    assert str(step) in msg and "incomplete" in msg and ckpt_lib.COMMIT_MARKER in msg

    model = tmp_path / "dcp" / "iter_000000010" / "model"
    model.mkdir(parents=True)
    shutil.copy(dcp_dir / "checkpoints" / "iter_000000010" / "model" / "__0_0.distcp", model)
    assert f"{model}: DCP directory without .metadata" in _cli_error(capsys, model, out)
    assert f"{model}: DCP directory without .metadata" in _cli_error(capsys, model.parent, out)
    (model.parent.parent / "latest_checkpoint.txt").write_text("iter_000000010\n")
    assert f"{model}: DCP directory without .metadata" in _cli_error(capsys, model.parent.parent, out)

    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(dcp_io.DcpError):
        cli_lib.run(export_cli.main, [str(model), str(out), "--debug"])


def test_load_network_params_refuses_mismatched_files(tiny, tmp_path):
    other = DiTConfig.tiny(num_blocks=6, vace_block_every_n=3)
    with pytest.raises(keymap.WeightsError, match=r"model_ema_bf16.pt: does not match the network"):
        build.load_network_params(tiny["out"] / export.EMA_BF16_PT, other)
    with pytest.raises(keymap.WeightsError, match=r"written by a different network: model.num_blocks"):
        build.load_network_params(tiny["ckpt"], other)
    with pytest.raises(torch_io.WeightFileError, match=r"missing.pt: no such weight file"):
        build.load_network_params(tmp_path / "missing.pt", tiny["cfg"])


def test_reference_kwargs_are_the_reference_constructor_call(case_a):
    case = json.loads((case_a / "case.json").read_text())
    assert export.reference_kwargs(DiTConfig.real_2b()) == case["constructor_kwargs_real_2B"]
    tiny = export.reference_kwargs(DiTConfig.tiny())
    assert {**tiny, "atten_backend": "torch"} == case["constructor_kwargs_tiny"]
    cfg = DiTConfig.real_2b(rope_ranges_bf16=True)
    assert DiTConfig.from_reference_kwargs(export.reference_kwargs(cfg), rope_ranges_bf16=True) == cfg
