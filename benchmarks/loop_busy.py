"""Where a compiled generate call's wall time goes on the GPU: kernel time (union of intervals) against wall."""
import json, sys, time, collections
sys.path.insert(0, "benchmarks")
import torch
from generate_scale import llama, compose
U = {"options": {"triton.cudagraphs": True, "combo_kernels": True}}
concat = "--concat" in sys.argv
batch = 8 if "--b8" in sys.argv else 1
anchor = llama([2048, 22, 32, 4, 5632], 32000, torch.bfloat16, "cuda", 0)
augment = llama([1024, 16, 16, 4, 2816], 32000, torch.bfloat16, "cuda", 1)
composed = compose(anchor, augment, "shared", 4)
ids = torch.randint(3, 32000, (batch, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
kw = dict(cache=True, compile_step=U, concat_projections=concat)
t = time.perf_counter(); composed.generate(ids, 128, **kw); torch.cuda.synchronize(); print("first", time.perf_counter() - t)
for _ in range(3):
    composed.generate(ids, 128, **kw); composed.generate(ids, 1, **kw)
torch.cuda.synchronize()
walls = []
for n in (1, 128):
    torch.cuda.synchronize(); t = time.perf_counter(); composed.generate(ids, n, **kw); torch.cuda.synchronize()
    walls.append(time.perf_counter() - t)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    torch.cuda.synchronize(); t0 = time.perf_counter(); composed.generate(ids, 128, **kw); torch.cuda.synchronize()
    wall = time.perf_counter() - t0
ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
iv = sorted((e.time_range.start, e.time_range.end) for e in ev)
busy, cur = 0, None
for s, e in iv:
    if cur is None or s > cur[1]:
        if cur: busy += cur[1] - cur[0]
        cur = [s, e]
    else:
        cur[1] = max(cur[1], e)
if cur: busy += cur[1] - cur[0]
span = iv[-1][1] - iv[0][0]
names = collections.Counter(e.name for e in ev)
rare = {k: v for k, v in names.items() if v <= 300}
cpu = collections.Counter()
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(("aten::", "cuda")):
        cpu[e.name] += 1
out = {"batch": batch, "concat": concat, "wall_128_s": walls[1], "wall_1_s": walls[0], "prof_wall_s": wall,
       "gpu_span_us": span, "gpu_busy_us": busy, "kernels": len(ev), "kernels_per_token": len(ev) / 128,
       "sum_kernel_us": sum(e - s for s, e in iv),
       "kernel_names_seen_at_most_300_times": dict(sorted(rare.items(), key=lambda kv: -kv[1])[:40]),
       "cpu_ops": dict(cpu.most_common(30))}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
