import json, time, torch
from dataclasses import replace
from pathlib import Path
from safetensors.torch import save_model
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.handwritten_gpt.gpt import GPTConfig
from examples.kv_arithmetic.train_base import train_base
torch.set_num_threads(2)
cfg = json.loads(Path("/tmp/exp/r100/config.json").read_text())
cfg["data"]["augment_markers"] = ">="
Path("/tmp/exp/r100m/config.json").write_text(json.dumps(cfg))
world = KVWorld(KVConfig(**cfg["data"]))
t = time.time()
m, _, run = train_base("m_A", GPTConfig(**cfg["models"]["m_A"]), world, steps=3000, batch_size=128, lr=2e-3, cpu=True, progress=False)
save_model(m, "/tmp/exp/r100m/m_A.safetensors"); print("m_A", run["final_loss"], round(time.time() - t), flush=True)
from examples.kv_arithmetic.evaluate import answers
for task in ("kv_substitution", "kv_arithmetic"):
    sc = answers(m.eval(), world, task, "cpu"); print(task, sum(a == r.split(";")[0] for _, r, a in sc) / len(sc), sc[:3], flush=True)
