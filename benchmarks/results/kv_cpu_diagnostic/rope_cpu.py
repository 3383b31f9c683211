"""CPU diagnostic: does RoPE in the cross-attention let the composition read m_A instead of memorising?"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
import torch
from safetensors.torch import save_model
from examples.kv_arithmetic.data import protocol_config, KVWorld
from examples.kv_arithmetic.train_base import MODELS, train_base, write_config, load_base
from examples.kv_arithmetic.compose import compose, train_composition
from examples.kv_arithmetic.evaluate import answers, hit
from collections import defaultdict

torch.set_num_threads(2)
out = Path(sys.argv[1]); n_keys = int(sys.argv[2]); base_steps = int(sys.argv[3]); calm_steps = int(sys.argv[4])
kv = protocol_config("scratchpad", n_keys=n_keys, n_eval=300, reread_letters=0.5)
world = KVWorld(kv)
models = {"m_A": replace(MODELS["m_A"], n_layer=3, n_head=4, n_embd=96), "m_B": replace(MODELS["m_B"], n_layer=3, n_head=4, n_embd=128)}
models = write_config(out, world, models)
base = {}
for name in ("m_A", "m_B"):
    f = out / f"{name}.safetensors"
    if f.exists():
        base[name] = load_base(out, name); continue
    t = time.time()
    base[name], _, run = train_base(name, models[name], world, steps=base_steps, batch_size=128, lr=2e-3, cpu=True, progress=False)
    save_model(base[name], str(f)); print(name, run["final_loss"], round(time.time()-t), flush=True)

def score(model, tag):
    model.eval(); ck = set(world.compose_keys); res = {}
    for task in ("kv_substitution", "numeric_arithmetic", "kv_arithmetic"):
        sc = answers(model, world, task, "cpu")
        hits = [hit(r, a) for _, r, a in sc]
        g = defaultdict(list)
        for (keys, _), h in zip(world.eval_exprs, hits): g[sum(k not in ck for k in keys)].append(h)
        res[task] = [round(100*sum(hits)/len(hits),1), {k: round(100*sum(v)/len(v),1) for k,v in sorted(g.items())}, sc[:2]]
    print(tag, json.dumps(res), flush=True)
for name in ("m_A", "m_B"): score(base[name], name)
for pos in sys.argv[5].split(","):
    for data in sys.argv[6].split(","):
        t = time.time()
        c = compose(base["m_A"], base["m_B"], "every1", pos)
        c, _, run = train_composition(c, world, data, steps=calm_steps, batch_size=128, lr=1e-3, cpu=True, progress=False)
        print(pos, data, run["final_loss"], round(time.time()-t), flush=True)
        score(c, f"calm[{pos},{data}]")
