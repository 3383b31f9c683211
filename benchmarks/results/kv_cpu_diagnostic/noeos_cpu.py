"""CPU diagnostic: same-token composition of m_A's last block, trained on the paper's data without the loss on the EOS."""
import json, sys, time
from pathlib import Path
from collections import defaultdict
import torch
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.kv_arithmetic.train_base import load_base
from examples.kv_arithmetic.compose import compose, train_composition
from examples.kv_arithmetic.evaluate import answers, hit
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
out = Path(sys.argv[1]); steps = int(sys.argv[2]); data = sys.argv[3]
world = KVWorld(KVConfig(**json.loads((out / "config.json").read_text())["data"]))
t = time.time()
c = compose(load_base(out, "m_A"), load_base(out, "m_B"), "last", "none", 1)
c, _, run = train_composition(c, world, data, steps=steps, batch_size=128, lr=1e-3, cpu=True, progress=False, eos_loss=False)
print("no-eos", data, run["final_loss"], run["loss_at_step"], round(time.time() - t), flush=True)
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
