"""Probe (docs/generate_scale_history.md, section 12): a CUDA-graphed compiled prefill at several prompt lengths,
batch 1, shared mode, at generate_scale.py's shapes: each length's first call, then its time to the first token."""
import json, os, sys, time
import torch
sys.path.insert(0, "benchmarks")
import generate_scale as gs

out = {}
def sync(): torch.cuda.synchronize()
def timed(f):
    sync(); t = time.perf_counter(); r = f(); sync(); return time.perf_counter() - t, r

STEP = {"options": {"triton.cudagraphs": True, "combo_kernels": True}}
dtype = torch.bfloat16
anchor = gs.llama([2048, 22, 32, 4, 5632], 32000, dtype, "cuda", 0)
augment = gs.llama([1024, 16, 16, 4, 2816], 32000, dtype, "cuda", 1)
lengths = [128, 96, 200, 64]
for name, prefill in (("cudagraph", {"options": {"triton.cudagraphs": True}}),):
    composed = gs.compose(anchor, augment, "shared", 4)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 32000, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
        first, _ = timed(lambda: composed.generate(ids, 1, cache=True, compile_step=STEP, compile_prefill=prefill))
        again = sorted(timed(lambda: composed.generate(ids, 1, cache=True, compile_step=STEP, compile_prefill=prefill))[0] for _ in range(3))[1]
        rows.append({"prompt": n, "first_call_s": round(first, 3), "ttft_s": round(again, 4)})
        print(name, rows[-1], flush=True)
    out[name] = rows
    json.dump(out, open(os.environ["OUT"] + "/prefill_probe.json", "w"), indent=1)
if os.environ.get('FP32'):
    # fp32: the CUDA-graphed prefill's tokens against the eager cached path's
    torch.backends.cuda.matmul.allow_tf32 = False
    anchor, augment = anchor.float(), augment.float()
    composed = gs.compose(anchor, augment, "shared", 4)
    ids = torch.randint(3, 32000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    eager = composed.generate(ids, 24, cache=True)
    graphed = composed.generate(ids, 24, cache=True, compile_step=STEP, compile_prefill={"options": {"triton.cudagraphs": True}})
    recompute = composed.generate(ids, 24, cache=False)
    out["fp32_tokens"] = {"graphed_equal_eager": float((graphed == eager).float().mean()),
                          "eager_equal_recompute": float((eager == recompute).float().mean())}
    print(out["fp32_tokens"], flush=True)
    json.dump(out, open(os.environ["OUT"] + "/prefill_probe.json", "w"), indent=1)
