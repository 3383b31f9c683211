import json, sys, torch
from pathlib import Path
from examples.kv_arithmetic.data import KVConfig, KVWorld
from examples.kv_arithmetic.train_base import load_base
from examples.kv_arithmetic.evaluate import result_given_scratchpad
torch.set_num_threads(2)
out = Path(sys.argv[1]); world = KVWorld(KVConfig(**json.loads((out / "config.json").read_text())["data"]))
m = load_base(out, "m_B").eval()
print({t: result_given_scratchpad(m, world, t, "cpu") for t in ("numeric_arithmetic", "kv_arithmetic")})
