"""CPU diagnostic: scratchpad with closed copies (`>` answers end in ';'); train one base model (argv[2])."""
import json, sys, time, torch
from pathlib import Path
from safetensors.torch import save_model
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.handwritten_gpt.gpt import GPTConfig
from examples.kv_arithmetic.train_base import train_base
from examples.kv_arithmetic.evaluate import answers
torch.set_num_threads(2)
out = Path(sys.argv[1]); name = sys.argv[2]
cfg = json.loads(Path("/tmp/exp/r100/config.json").read_text())
cfg["data"].update(augment_markers=">=", fixed_width=True, augment_eos=False)
out.mkdir(exist_ok=True); (out / "config.json").write_text(json.dumps(cfg))
world = KVWorld(KVConfig(**cfg["data"]))
t = time.time()
m, _, run = train_base(name, GPTConfig(**cfg["models"][name]), world, steps=3000, batch_size=128, lr=2e-3, cpu=True, progress=False)
save_model(m, str(out / f"{name}.safetensors")); print(name, run["final_loss"], round(time.time() - t), flush=True)
for task in ("kv_substitution", "numeric_arithmetic", "kv_arithmetic"):
    sc = answers(m.eval(), world, task, "cpu"); print(task, sum(a == r for _, r, a in sc) / len(sc), sc[:3], flush=True)
import subprocess
subprocess.run([sys.executable, "/tmp/exp/diag_cpu.py", str(out), "window1", "last", "800", "2", "substitution"], check=True)
