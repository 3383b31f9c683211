"""Probe: an RMSNorm before a one-row product, as its own kernel (A), folded into the product with the
norm's scale applied after it (B), and with the sum of squares in the product's own iteration space (C),
under STEP_COMPILE (CUDA graphs, coordinate-descent tuning, combo kernels). L Llama MLP blocks
(norm -> gate/up concatenated -> silu * up -> down -> residual), weights larger than L2."""
import json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

dev, dt, eps = "cuda", torch.bfloat16, 1e-5
OPTS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "combo_kernels": True}
out_path = os.path.join(os.environ.get("OUT", "."), "normfold.json")
results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}


class MLPs(nn.Module):
    def __init__(self, K, I, L, variant):
        super().__init__()
        self.K, self.I, self.L, self.variant = K, I, L, variant
        p = lambda t: nn.Parameter(t, requires_grad=False)
        self.g = nn.ParameterList([p(1 + 0.1 * torch.randn(K, device=dev, dtype=dt)) for _ in range(L)])
        self.gu = nn.ParameterList([p(torch.randn(2 * I, K, device=dev, dtype=dt) * K ** -0.5) for _ in range(L)])
        self.d = nn.ParameterList([p(torch.randn(K, I, device=dev, dtype=dt) * I ** -0.5) for _ in range(L)])
        # folded copies: W * g (rounded once to bf16)
        self.guf = nn.ParameterList([p((w.float() * g.float()).to(dt)) for w, g in zip(self.gu, self.g)])

    def normed_product(self, h, l):
        x = h.float()
        if self.variant == "A":
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return F.linear(self.g[l] * (x * r).to(dt), self.gu[l])
        if self.variant == "B":
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        else:  # C: the sum of squares over (K, N), as the one-row product's reduction is
            N = self.guf[l].shape[0]
            r = torch.rsqrt(x.unsqueeze(-1).pow(2).expand(*x.shape, N).sum(-2) / self.K + eps)
        return (F.linear(h, self.guf[l]).float() * r).to(dt)

    def forward(self, h):
        for l in range(self.L):
            gate, up = self.normed_product(h, l).split([self.I, self.I], -1)
            h = h + F.linear(F.silu(gate) * up, self.d[l])
        return h


def reference(m, h):  # float64, the unfolded math
    h = h.double()
    for l in range(m.L):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * m.g[l].double()
        gate, up = F.linear(x, m.gu[l].double()).split([m.I, m.I], -1)
        h = h + F.linear(F.silu(gate) * up, m.d[l].double())
    return h


def timed(fn, h, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn(h)
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3  # us a call


for K, I, L, name in [(2048, 5632, 16, "anchor"), (1024, 2816, 16, "augment")]:
    torch.manual_seed(0)
    h = torch.randn(1, 1, K, device=dev, dtype=dt)
    base = MLPs(K, I, L, "A")
    ref = reference(base, h)
    fns, row = {}, {"shape": name, "K": K, "I": I, "L": L}
    for v in ("A", "B", "C"):
        m = MLPs(K, I, L, v); m.load_state_dict(base.state_dict())
        t0 = time.time()
        fn = torch.compile(m, options=OPTS)
        got, (code, *_) = run_and_get_code(fn, h)
        row[f"{v}_compile_s"] = round(time.time() - t0, 1)
        row[f"{v}_launches"] = code.count(".run(") + code.count("extern_kernels.")
        row[f"{v}_rel_err_vs_fp64"] = float((got.double() - ref).norm() / ref.norm())
        for _ in range(3):
            fn(h)
        fns[v] = fn
        print(name, v, row, flush=True)
    times = {v: [] for v in fns}
    for _ in range(7):
        for v, fn in fns.items():
            times[v].append(timed(fn, h, 200))
    for v in fns:
        row[f"{v}_us_median"] = round(sorted(times[v])[3], 2)
        row[f"{v}_us_rounds"] = [round(t, 2) for t in times[v]]
    results["runs"].append(row)
    print(json.dumps(row), flush=True)
    json.dump(results, open(out_path, "w"), indent=1)
