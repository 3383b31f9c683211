"""CPU diagnostic: same-token composition of m_A's last block with a learned null key/value (a head may attend to nothing)."""
import json, sys, time
from pathlib import Path
from collections import defaultdict
import torch, torch.nn as nn, torch.nn.functional as F
from einops import rearrange
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.kv_arithmetic.train_base import load_base
from examples.kv_arithmetic.compose import compose, train_composition
from examples.kv_arithmetic.evaluate import answers, hit
from calmgraph.cross_attention import CrossAttention
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
out = Path(sys.argv[1]); steps = int(sys.argv[2]); data = sys.argv[3]; eos = sys.argv[4] == "eos"
world = KVWorld(KVConfig(**json.loads((out / "config.json").read_text())["data"]))

def attend(self, x, k, v, context_mask=None):
    q = rearrange(self.to_q(self.norm(x)), "b t (h d) -> b h t d", h=self.heads)
    t, s = q.shape[-2], k.shape[-2]
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t).triu(s - t - self.window + 1)
    b = q.shape[0]
    k = torch.cat([self.null_k.expand(b, -1, -1, -1).to(k.dtype), k], 2)
    v = torch.cat([self.null_v.expand(b, -1, -1, -1).to(v.dtype), v], 2)
    mask = torch.cat([torch.ones(t, 1, dtype=torch.bool), mask], 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.to_out(rearrange(out, "b h t d -> b t (h d)"))
t0 = time.time()
c = compose(load_base(out, "m_A"), load_base(out, "m_B"), "last", "none", 1)
for blk in c.xattn.modules():
    if isinstance(blk, CrossAttention):
        d = blk.to_q.out_features // blk.heads
        blk.null_k = nn.Parameter(torch.randn(1, blk.heads, 1, d) * 0.02)
        blk.null_v = nn.Parameter(torch.zeros(1, blk.heads, 1, d))
CrossAttention.attend = attend  # after compile's shape check
print([n for n, _ in c.named_new_parameters()])
c, _, run = train_composition(c, world, data, steps=steps, batch_size=128, lr=1e-3, cpu=True, progress=False, eos_loss=eos)
print("null", data, eos, run["final_loss"], run["loss_at_step"], round(time.time() - t0), flush=True)
c.eval(); ck = set(world.compose_keys); res = {}
for task in ("kv_substitution", "numeric_arithmetic", "kv_arithmetic"):
    sc = answers(c, world, task, "cpu")
    hits = [hit(r, a) for _, r, a in sc]
    g = defaultdict(list)
    for (keys, _), h in zip(world.eval_exprs, hits): g[sum(k not in ck for k in keys)].append(h)
    pad = [a.split(";")[0] == r.split(";")[0] for _, r, a in sc]
    res[task] = [round(100*sum(hits)/len(hits),1), {k: round(100*sum(v)/len(v),1) for k,v in sorted(g.items())},
                 round(100*sum(pad)/len(pad),1), sc[:4]]
print(json.dumps(res), flush=True)
