# Probe as run on an H200 (2026-12-05): python benchmarks/one_row_products.py OUT.json; removed in the next commit.
"""Bandwidth of one-row (and 8-row) products at the benchmark's shapes, under CUDA graphs, weights rotated
through copies larger than L2: cuBLAS (eager F.linear) against inductor's coordinate-descent reduction."""
import json, sys, time
import torch, torch.nn.functional as F
import torch._inductor.config as ic

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
SHAPES = {"anchor_q_o": (2048, 2048), "anchor_kv": (256, 2048), "anchor_gate_up": (5632, 2048),
          "anchor_down": (2048, 5632), "anchor_gate_up_concat": (11264, 2048), "lm_head": (32000, 2048),
          "augment_q_o": (1024, 1024), "augment_gate_up": (2816, 1024), "augment_down": (1024, 2816)}


def timed(fn, args_list, reps=20):
    for a in args_list[:2]:
        fn(*a)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for a in args_list:
            fn(*a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for a in args_list:
            fn(*a)
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / len(args_list))
    ts.sort()
    return ts[len(ts) // 2]


lin = lambda x, w: F.linear(x, w)
act = lambda g, u, w: F.linear(F.silu(g) * u, w)
with ic.patch(coordinate_descent_tuning=True):
    rows = []
    for name, (out, inn) in SHAPES.items():
        lin_cd = torch.compile(lambda x, w: F.linear(x, w), dynamic=False)
        act_cd = torch.compile(lambda g, u, w: F.linear(F.silu(g) * u, w), dynamic=False)
        nbytes = out * inn * 2
        n = max(4, min(64, (768 << 20) // nbytes))
        ws = [torch.randn(out, inn, device=dev, dtype=dt) * 0.02 for _ in range(n)]
        for m in (1, 8):
            x = torch.randn(m, inn, device=dev, dtype=dt)
            r = {"product": name, "out": out, "in": inn, "rows": m, "copies": n}
            r["cublas_us"] = timed(lin, [(x, w) for w in ws])
            if m == 1:
                t0 = time.time(); r["inductor_cd_us"] = timed(lin_cd, [(x, w) for w in ws]); r["compile_s"] = round(time.time() - t0, 1)
                if name.endswith("down"):
                    g, u = torch.randn(1, inn, device=dev, dtype=dt), torch.randn(1, inn, device=dev, dtype=dt)
                    r["inductor_cd_silu_prologue_us"] = timed(act_cd, [(g, u, w) for w in ws])
            for k in [k for k in r if k.endswith("_us")]:
                r[k.replace("_us", "_tbps")] = round(nbytes / (r[k] * 1e-6) / 1e12, 2)
                r[k] = round(r[k], 2)
            print(json.dumps(r), flush=True)
            rows.append(r)
        del ws
json.dump(rows, open(sys.argv[1], "w"), indent=1)
