"""The benchmark scripts' own logic that runs without a GPU: the multi-GPU layout names, the profile summary
(GPU kernel time by kind, span and idle time) of a perfetto trace, and the fp8 loss-curve comparison."""

import gzip
import json

import pytest

from bench import bench_multigpu, fp8_loss_curve, profile_step


def test_layout_names_map_to_mesh_axes():
    assert bench_multigpu.parse_layout("c8") == {"data": 1, "fsdp": 1, "context": 8, "tensor": 1}
    assert bench_multigpu.parse_layout("f2c4") == {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}
    assert bench_multigpu.parse_layout("d2f2c2") == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
    for bad in ("", "x8", "c", "c8x", "8c", "c4 d2"):
        with pytest.raises(ValueError, match="layout"):
            bench_multigpu.parse_layout(bad)


def test_kernel_kinds():
    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128": "attn_fwd",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7": "attn_bwd",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<": "attn_fwd",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnBwdSm90<": "attn_bwd",
        "flash_bwd_convert_dq_kernel": "attn_bwd",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "gemm",
        "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "input_transpose_fusion": "copy",
        "loop_multiply_fusion_3": "fusion",
    }
    for name, kind in kinds.items():
        assert profile_step.kind_of(name) == kind, name


def test_profile_summary_of_a_trace(tmp_path):
    """Kernel time per kind and name, the span of the GPU events and the idle time inside it; host events and
    metadata are ignored."""
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 5000.0, "name": "PjitFunction(train_step)"},
        {"ph": "X", "pid": 7, "tid": 2, "ts": 100.0, "dur": 300.0, "name": "nvjet_tst_128x256"},
        {"ph": "X", "pid": 7, "tid": 2, "ts": 400.0, "dur": 1000.0, "name": "flash_fwd_kernel",
         "args": {"hlo_op": "ffi_call.6"}},
        {"ph": "X", "pid": 7, "tid": 3, "ts": 900.0, "dur": 200.0, "name": "ncclDevKernel_SendRecv"},
        {"ph": "X", "pid": 7, "tid": 2, "ts": 1600.0, "dur": 400.0, "name": "flash_fwd_kernel"},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    s = profile_step.summarise(str(path))
    assert s["n_kernels"] == 4
    assert s["span_s"] == pytest.approx(1900e-6)  # 100 .. 2000 us
    assert s["busy_s"] == pytest.approx(1700e-6)  # the collective overlaps the forward kernel
    assert s["idle_s"] == pytest.approx(200e-6)   # 1400 .. 1600 us
    assert s["by_kind_s"] == pytest.approx({"attn_fwd": 1400e-6, "gemm": 300e-6, "collective": 200e-6})
    assert s["top_kernels"][0] == {"name": "flash_fwd_kernel", "s": pytest.approx(1400e-6), "calls": 2}
    assert s["top_hlo_ops"] == [{"op": "ffi_call", "s": pytest.approx(1000e-6)}]


def test_profile_summary_without_gpu_events(tmp_path):
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
                                   {"ph": "X", "pid": 1, "ts": 0, "dur": 5, "name": "x"}]}, fh)
    assert "error" in profile_step.summarise(str(path))


def test_loss_curve_windows_and_comparison():
    assert fp8_loss_curve.windows([1.0, 3.0, 5.0, 7.0, 9.0], size=2) == [2.0, 6.0, 9.0]
    base = {"run": "fa3:0", "losses": [2.0] * 30 + [1.0] * 20}
    fp8 = {"run": "fp8:0", "losses": [2.0] * 30 + [1.1] * 20}   # windows 2.0, 1.28 (baseline 2.0, 1.2)
    seed = {"run": "fa3:1", "losses": [2.5] * 25 + [1.0] * 25}  # windows 2.5 (vs 2.0), 1.0
    failed = {"run": "fp8:1", "error": "OOM"}
    table, noise = fp8_loss_curve.compare([base, fp8, failed, seed])
    assert list(table) == ["fa3:0", "fp8:0", "fa3:1"]
    assert table["fa3:0"][1] == 0.0
    assert abs(table["fp8:0"][1] - 0.08) < 1e-9
    assert abs(noise - 0.5) < 1e-9  # the baseline backend's other seed
    table, noise = fp8_loss_curve.compare([base, fp8])
    assert noise is None  # no second seed of the baseline: no noise estimate
    table, _ = fp8_loss_curve.compare([base, dict(base)])
    assert list(table) == ["fa3:0#0", "fa3:0#1"]  # a repeated run keeps its own row


def test_loss_curve_pool_is_the_same_in_every_run_and_shaped_like_the_batch():
    import numpy as np

    like = {"x0": np.zeros((1, 16, 8, 6, 10)), "context": np.zeros((1, 512, 32)),
            "view_indices": np.zeros((1, 8), np.int32)}
    a, b = fp8_loss_curve.synthetic_pool(3, like), fp8_loss_curve.synthetic_pool(3, like)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert x["x0"].shape == like["x0"].shape and x["latent_control"].shape == like["x0"].shape
        assert x["context"].shape == like["context"].shape
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["x0"], a[1]["x0"])


def test_loss_curve_compare_reads_runs_saved_by_separate_invocations(tmp_path, capsys, monkeypatch):
    """--compare: rows of several fp8_loss_curve.jsonl files (one device call per run) in file order, the device
    header rows skipped, the first run the baseline."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"device": "NVIDIA H200"}) + "\n" +
                 json.dumps({"run": "fa3:0", "losses": [2.0] * 25 + [1.0] * 25, "step_s": 0.2,
                             "nonfinite_steps": 0}) + "\n")
    b.write_text(json.dumps({"run": "fp8_full:0", "losses": [2.0] * 25 + [1.3] * 25, "step_s": 0.3,
                             "nonfinite_steps": 0}) + "\n\n" +
                 json.dumps({"run": "fa3:1", "losses": [2.1] * 25 + [1.0] * 25, "step_s": 0.2,
                             "nonfinite_steps": 0}) + "\n")
    monkeypatch.setattr("sys.argv", ["fp8_loss_curve.py", "--compare", f"{a},{b}"])
    fp8_loss_curve.main()
    out = capsys.readouterr().out
    assert "largest window difference from fa3:0: fp8_full:0 0.3000, fa3:1 0.1000" in out
    assert "run-to-run noise (same backend, other seed) 0.1000" in out
    assert "25-49" in out and "fp8_full:0: 0.300 s/step" in out
