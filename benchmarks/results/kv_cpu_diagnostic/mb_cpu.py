"""CPU diagnostic: retrain m_B of a saved world (argv[1]) with data overrides (argv[3], JSON) into argv[2]."""
import json, sys, time, torch
from pathlib import Path
from safetensors.torch import save_model
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.handwritten_gpt.gpt import GPTConfig
from examples.kv_arithmetic.train_base import train_base
from examples.kv_arithmetic.evaluate import answers
torch.set_num_threads(2)
src, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = json.loads((src / "config.json").read_text()); cfg["data"].update(json.loads(sys.argv[3]))
out.mkdir(exist_ok=True); (out / "config.json").write_text(json.dumps(cfg))
world = KVWorld(KVConfig(**cfg["data"]))
t = time.time()
m, _, run = train_base("m_B", GPTConfig(**cfg["models"]["m_B"]), world, steps=3000, batch_size=128, lr=2e-3, cpu=True, progress=False)
save_model(m, str(out / "m_B.safetensors")); print("m_B", run["final_loss"], round(time.time() - t), flush=True)
for task in ("kv_substitution", "numeric_arithmetic", "kv_arithmetic"):
    sc = answers(m.eval(), world, task, "cpu"); print(task, sum(a == r for _, r, a in sc) / len(sc), sc[:3], flush=True)
