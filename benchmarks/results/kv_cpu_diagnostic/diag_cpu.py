"""CPU diagnostic: compositions on saved bases with a patched attention bias (hard diagonal / ALiBi-like)."""
import json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from einops import rearrange
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.kv_arithmetic.train_base import load_base
from examples.kv_arithmetic.compose import compose, train_composition
from examples.kv_arithmetic.evaluate import answers, hit
from calmgraph.cross_attention import CrossAttention
from collections import defaultdict
import examples.kv_arithmetic.compose as C
C.LAYERS["last_to_0"] = [[-1, 0]]; C.LAYERS["last_to_1"] = [[-1, 1]]
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
out = Path(sys.argv[1]); mode = sys.argv[2]; layers = sys.argv[3]; steps = int(sys.argv[4])
world = KVWorld(KVConfig(**json.loads((out / "config.json").read_text())["data"]))

def attend(self, x, k, v, context_mask=None):
    q = rearrange(self.to_q(self.norm(x)), "b t (h d) -> b h t d", h=self.heads)
    t, s = q.shape[-2], k.shape[-2]
    d = torch.arange(t)[:, None] + (s - t) - torch.arange(s)[None]   # t - s distance >= 0 allowed
    if mode == "diag":
        bias = torch.where(d == 0, 0.0, float("-inf"))
    elif mode == "alibi":
        slopes = 2.0 ** (-torch.arange(self.heads, dtype=torch.float32))  # 1, 1/2, 1/4, ...
        bias = -slopes[:, None, None] * d.clamp(min=0) + torch.where(d < 0, float("-inf"), 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    return self.to_out(rearrange(out, "b h t d -> b t (h d)"))
if mode in ("diag", "alibi"):
    CrossAttention.attend = attend

def score(model, tag):
    model.eval(); ck = set(world.compose_keys); res = {}
    for task in ("kv_substitution", "numeric_arithmetic", "kv_arithmetic"):
        sc = answers(model, world, task, "cpu")
        hits = [hit(r, a) for _, r, a in sc]
        g = defaultdict(list)
        for (keys, _), h in zip(world.eval_exprs, hits): g[sum(k not in ck for k in keys)].append(h)
        pad = [a.split(";")[0] == r.split(";")[0] for _, r, a in sc]
        res[task] = [round(100*sum(hits)/len(hits),1), {k: round(100*sum(v)/len(v),1) for k,v in sorted(g.items())},
                     round(100*sum(pad)/len(pad),1), sc[:3]]
    print(tag, json.dumps(res), flush=True)
t = time.time()
c = compose(load_base(out, "m_A"), load_base(out, "m_B"), layers, "none", 1 if mode == "window1" else None)
c, _, run = train_composition(c, world, sys.argv[6] if len(sys.argv) > 6 else "substitution", steps=steps, batch_size=128, lr=1e-3, cpu=True, progress=False)
print(mode, layers, run["final_loss"], run["loss_at_step"], round(time.time()-t), flush=True)
score(c, f"calm[{mode},{layers}]")
