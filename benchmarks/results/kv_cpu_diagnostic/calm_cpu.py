"""CPU diagnostic: a same-token composition of m_A's last block on saved bases, scored with run_all's details.
argv: BASE STEPS DATA [null] [noeos]"""
import json, sys, time
from pathlib import Path
import torch
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.kv_arithmetic.train_base import load_base
from examples.kv_arithmetic.compose import compose, train_composition
from examples.kv_arithmetic.run_all import _score
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
out = Path(sys.argv[1]); steps = int(sys.argv[2]); data = sys.argv[3]; flags = sys.argv[4:]
world = KVWorld(KVConfig(**json.loads((out / "config.json").read_text())["data"]))
t0 = time.time()
if "bases" in flags:
    for name in ("m_A", "m_B"):
        run = {}; _score(name, load_base(out, name), world, "cpu", run)
        print(name, json.dumps(run), flush=True)
c = compose(load_base(out, "m_A"), load_base(out, "m_B"), "last", "none", 1, null_kv="null" in flags)
c, _, run = train_composition(c, world, data, steps=steps, batch_size=128, lr=1e-3, cpu=True, progress=False,
                              eos_loss="noeos" not in flags)
print(data, flags, run["final_loss"], run["loss_at_step"], round(time.time() - t0), flush=True)
row, full, detail = _score("calm", c, world, "cpu", run)
for task, d in detail.items():
    print(task, json.dumps({k: v for k, v in d.items()}), flush=True)
