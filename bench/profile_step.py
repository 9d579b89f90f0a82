"""Where a train step's GPU time goes: one profiled step per attention backend, kernels summed by kind and name.

    python bench/profile_step.py --views 2 --remat save_attention --attention cudnn,fa3

Each backend runs in its own process (bench_train.setup: the trainer's step, real 2B config, synthetic latents):
compile, two warm-up steps, then one step under `jax.profiler.trace`. The perfetto trace's GPU events are summed
per kernel kind (attention forward / backward, GEMM, copies and transposes, other fusions) and per kernel name, with
the step's span and the GPU's idle time inside it, so two backends can be compared kernel by kernel. Writes
`profile_<views>v_<backend>.json` (and the optimised HLO, gzipped) under --out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KINDS = (  # first match wins; kernel names are lower-cased
    ("collective", re.compile(r"nccl|all_?to_?all|all_?gather|reduce_?scatter|all_?reduce|send_?recv")),
    ("attn_bwd", re.compile(r"flash.*bwd|bwd.*flash|bprop|dgrad.*attn|sdpa.*bwd|_bwd_kernel")),
    ("attn_fwd", re.compile(r"flash|fmha|sdpa|cudnn_generated|fprop.*attn")),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|sm90_|wgmma|cublas")),
    ("copy", re.compile(r"memcpy|memset|copy|transpose")),
    ("fusion", re.compile(r".")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pat in KINDS:
        if pat.search(low):
            return kind
    return "fusion"


def summarise(trace_path: str) -> dict:
    """GPU kernel time of one perfetto trace: totals per kind, top kernels, span and idle time."""
    with gzip.open(trace_path) as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
    if not kernels:
        return {"error": "no GPU events in the trace", "pids": sorted(map(str, gpu_pids))}
    by_name = collections.defaultdict(lambda: [0.0, 0])
    by_kind = collections.defaultdict(float)
    by_op = collections.defaultdict(float)
    for e in kernels:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
        by_kind[kind_of(e["name"])] += e["dur"]
        op = (e.get("args") or {}).get("hlo_op") or (e.get("args") or {}).get("long_name")
        if op:
            by_op[re.sub(r"\.\d+$", "", str(op))] += e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, t in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]
    return {"span_s": span / 1e6, "busy_s": busy / 1e6, "idle_s": (span - busy) / 1e6,
            "kernel_sum_s": sum(v[0] for v in by_name.values()) / 1e6, "n_kernels": len(kernels),
            "by_kind_s": {k: v / 1e6 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "s": v[0] / 1e6, "calls": v[1]} for n, v in top],
            "top_hlo_ops": [{"op": o, "s": v / 1e6} for o, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:40]],
            "event_args_example": sorted((kernels[0].get("args") or {}).keys())}


def count_ops(hlo: str, ops) -> dict:
    """How many instructions of each op (its async `-start` form included) an optimised HLO text holds; matches
    array- and tuple-typed results alike."""
    return {op: len(re.findall(rf"[\s)]{op}(?:-start)?\(", hlo)) for op in ops}


def hlo_counts(hlo: str) -> dict:
    """Counts in the optimised HLO that tell backends apart: custom-call targets, copies, transposes."""
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    return {"custom_calls": dict(targets), **count_ops(hlo, ("copy", "transpose"))}


def profile_once(compiled, state, batch):
    """Run the compiled step once under `jax.profiler.trace`: (state, `summarise` of its perfetto trace)."""
    import jax

    log_dir = tempfile.mkdtemp(prefix="prof_")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    traces = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    return state, (summarise(traces[0]) if traces else {"error": "no perfetto trace written"})


def child(args) -> None:
    from bench.bench_train import setup
    from bench.common import emit, time_steps

    step_fn, state, batch, flops, row = setup(args.views, args.remat, args.attention)
    compiled = step_fn.lower(state, batch).compile()
    hlo = compiled.as_text()
    row.update(hlo_counts(hlo))
    with gzip.open(os.path.join(args.out, f"hlo_{args.views}v_{args.attention}.txt.gz"), "wt") as fh:
        fh.write(hlo)
    state, _, _ = time_steps(compiled, state, batch, 2)  # warm-up
    state, _, (row["step_s"],) = time_steps(compiled, state, batch, 1)
    state, row["profile"] = profile_once(compiled, state, batch)
    with open(os.path.join(args.out, f"profile_{args.views}v_{args.attention}.json"), "w") as fh:
        json.dump(row, fh, indent=1)
    emit({k: v for k, v in row.items() if k != "profile"} | {"by_kind_s": row["profile"].get("by_kind_s"),
                                                             "span_s": row["profile"].get("span_s"),
                                                             "idle_s": row["profile"].get("idle_s")})


def parent(args) -> None:
    from bench.common import run_isolated

    rows = []
    for backend in args.attention.split(","):
        argv = ["--child", "--views", str(args.views), "--remat", args.remat, "--attention", backend,
                "--out", args.out]
        rows += run_isolated(__file__, argv, f"profile {args.views} views {backend}",
                             os.path.join(args.out, "profile_step.jsonl"))
    for r in rows:
        print(json.dumps(r), flush=True)
    kinds = sorted({k for r in rows for k in (r.get("by_kind_s") or {})})
    print(f"\n{'attn':>6} {'step s':>7} {'span s':>7} {'idle s':>7} " + " ".join(f"{k:>9}" for k in kinds))
    for r in rows:
        bk = r.get("by_kind_s") or {}
        print(f"{r['attention']:>6} {r.get('step_s', 0):>7.3f} {r.get('span_s') or 0:>7.3f} {r.get('idle_s') or 0:>7.3f} "
              + " ".join(f"{bk.get(k, 0):>9.3f}" for k in kinds))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--remat", default="save_attention")
    ap.add_argument("--attention", default="cudnn,fa3", help="comma list of attention backends")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
