# Probe as run on an H200 (2026-12-05): python benchmarks/one_row_prologue.py OUT.json; removed in the next commit.
"""The down product after silu(g) * u, one row, tuned reductions: the prologue fused (inductor's choice),
against ways to have it computed once."""
import json, sys
import torch, torch.nn.functional as F
import torch._inductor.config as ic
dev, dt = "cuda", torch.bfloat16


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


rows = []
for name, (out, inn) in {"anchor_down": (2048, 5632), "augment_down": (1024, 2816)}.items():
    n = max(4, min(64, (768 << 20) // (out * inn * 2)))
    ws = [torch.randn(out, inn, device=dev, dtype=dt) * 0.02 for _ in range(n)]
    g, u = torch.randn(1, inn, device=dev, dtype=dt), torch.randn(1, inn, device=dev, dtype=dt)
    buf = torch.empty(1, inn, device=dev, dtype=dt)
    r = {"product": name, "out": out, "in": inn}
    def plain(x, w): return F.linear(x, w)
    def fused(g, u, w): return F.linear(F.silu(g) * u, w)
    def mutated(g, u, w, buf):
        buf.copy_(F.silu(g) * u)
        return F.linear(buf, w)
    x = F.silu(g) * u
    for key, fn, args, patch in (("plain", plain, [(x, w) for w in ws], {}),
                                 ("prologue_fused", fused, [(g, u, w) for w in ws], {}),
                                 ("prologue_opcount0", fused, [(g, u, w) for w in ws], {"realize_opcount_threshold": 0}),
                                 ("prologue_into_buffer", mutated, [(g, u, w, buf) for w in ws], {})):
        torch._dynamo.reset()
        with ic.patch(coordinate_descent_tuning=True, **patch):
            r[key + "_us"] = round(timed(torch.compile(fn, dynamic=False), args), 2)
    print(json.dumps(r), flush=True)
    rows.append(r)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
