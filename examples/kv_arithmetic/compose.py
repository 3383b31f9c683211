"""Compose the trained base models with calmgraph and train only the cross-attention (CALM §4.1).

    python -m examples.kv_arithmetic.compose --base runs/kv                   # after train_base; one GPU
    python -m examples.kv_arithmetic.compose --base runs/kv --smoke            # CPU, seconds

The anchor m_B reads the augment m_A through causal cross-attention: both read the same tokens, and
by default every m_A block feeds one m_B block (the paper taps every 4th layer of much deeper models; m_A
has 4).
Both base models stay frozen. The composition trains on `--data`:

    substitution   KV-substitution over the 20% of keys in `world.compose_keys` (the paper's protocol)
    kv_mix         KV-substitution and KV-arithmetic, half each, over the same 20% of keys (a fallback that
                   departs from the paper: the composition sees the `=` task on keys, never the other 80%)
    *_replay       half the same, half m_B's own task mix (`compose_tasks`): no key in it

Writes `calm_<data>.safetensors` (the new parameters only), `calm_<data>_spec.json` and
`calm_<data>_eval.json` (exact-match %, the CALM column of Table 1) under --base.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import calmgraph as cg
from calmgraph.train import FineTuner, TrainConfig
from examples.handwritten_gpt.gpt import GPT
from examples.kv_arithmetic.data import KVConfig, KVDataset, KVWorld, collate, expression_writes
from examples.kv_arithmetic.evaluate import accuracy_row, compose_key_accuracy, format_table
from examples.kv_arithmetic.train_base import load_base, task_mix, train_steps

# All over the composition's 20% of keys. "<data>_replay" is half <data>, half the anchor's own task mix
# (expressions over the values of those keys, or prompts of letters that are no key): nothing new, but the
# composition is asked to leave what m_B knows intact, there included where m_B computes after a prompt it
# cannot read.
COMPOSE_DATA = {
    "substitution": {"kv_substitution": 1.0},
    "kv_mix": {"kv_substitution": 0.5, "kv_arithmetic": 0.5},
}
DATA_CHOICES = [*COMPOSE_DATA, *(f"{d}_replay" for d in COMPOSE_DATA)]


def compose_tasks(data: str, cfg: KVConfig) -> dict[str, float]:
    """The task mix of composition data `data` (one of DATA_CHOICES) in a world of config `cfg`."""
    own = COMPOSE_DATA[data.removesuffix("_replay")]
    if not data.endswith("_replay"):
        return dict(own)
    mix = {task: w / 2 for task, w in own.items()}
    for task, w in task_mix(cfg, "m_B").items():
        mix[task] = mix.get(task, 0.0) + w / 2
    return mix


# Layer choices: every m_A block (0->1 1->2 2->4 3->5 for 4 and 6 blocks), or only m_A's last block (whose
# states at the answer hold m_A's next character) into m_B's last.
LAYERS = {"every1": {"every": 1}, "every2": {"every": 2}, "last": [[-1, -1]]}


def layer_choice(name: str):
    """A LAYERS name, or explicit block pairs "S:T,S:T" (m_A block S feeds m_B block T; negative from the end)."""
    if name in LAYERS:
        return LAYERS[name]
    try:
        return [[int(i) for i in pair.split(":")] for pair in name.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name!r} is neither one of {list(LAYERS)} nor pairs like -1:3,1:2") from None


def spec(layers: str = "every1", positions: str = "none", window: int | None = None, null_kv: bool = False,
         writes: str = "all") -> dict:
    """m_A (augment, shared tokens) -> m_B (anchor) at the layer pairs `layer_choice(layers)`. The paper's blocks attend
    to every earlier token by content; `positions="rotary"` adds relative positions (RoPE), `window=w` reads
    only the last w tokens (1: m_A at the same token), `null_kv` lets a head read nothing, `writes="masked"`
    lets the blocks write only where the call's write_mask says (here: over the prompt's expression)."""
    return {"anchor": {"name": "m_B"},
            "augments": [{"name": "m_A", "input": "shared"}],
            "edges": [{"source": "m_A", "target": "m_B", "layers": layer_choice(layers)}],
            "cross_attention": {"positions": positions, "window": window, "null_kv": null_kv, "writes": writes}}


def compose(m_A: GPT, m_B: GPT, layers: str = "every1", positions: str = "none",
            window: int | None = None, null_kv: bool = False, writes: str = "all") -> cg.ComposedModel:
    return cg.compile(spec(layers, positions, window, null_kv, writes), models={"m_A": m_A, "m_B": m_B})


class ExpressionWrites(torch.nn.Module):
    """A composition with `writes: masked`, called as `model(ids)` like the base models: its blocks write over
    each prompt's expression (`data.expression_writes`), so the answer is m_B's own reading of it."""

    def __init__(self, composed: cg.ComposedModel):
        super().__init__()
        self.composed = composed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.composed(input_ids=ids, write_mask=expression_writes(ids))


def takes_writes(composed: cg.ComposedModel) -> bool:
    return "write_mask" in composed.input_names  # its blocks have `writes: masked`


def callable_model(composed: cg.ComposedModel):
    """What the scoring functions call: the composition, or `ExpressionWrites` of it where it takes a write_mask."""
    return ExpressionWrites(composed) if takes_writes(composed) else composed


def train_composition(composed: cg.ComposedModel, world: KVWorld, data: str, *, steps: int, batch_size: int,
                      lr: float, seed: int = 0, cpu: bool = False, progress: bool = True,
                      num_workers: int = 0, eos_loss: bool = True
                      ) -> tuple[cg.ComposedModel, FineTuner, dict]:
    """Train the composition's new parameters on `compose_tasks(data)` over the composition's keys (with
    `eos_loss=False`, without the loss on the EOS that ends a KV-substitution answer)."""
    torch.manual_seed(seed)
    dataset = KVDataset(world, compose_tasks(data, world.cfg), "compose", size=10**9, eos_loss=eos_loss,
                        write_mask=takes_writes(composed))
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                      weight_decay=0.01, shuffle=False, seed=seed, cpu=cpu, progress=progress,
                      num_workers=num_workers)
    tuner = FineTuner(composed, dataset, cfg, collate_fn=collate)  # new_parameters(): the cross-attention only
    run = train_steps(tuner)
    # Without the autocast wrapper Accelerate put on forward: compiled again or scored in fp32 after this.
    return tuner.accelerator.unwrap_model(tuner.model, keep_fp32_wrapper=False), tuner, run


def layers_arg(name: str) -> str:
    layer_choice(name)  # refused here, at parse time
    return name


def save_composition(composed: cg.ComposedModel, out: Path, tag: str) -> None:
    save_file({n: p.detach().float().cpu().contiguous() for n, p in composed.named_new_parameters()},
              str(out / f"{tag}.safetensors"))
    (out / f"{tag}_spec.json").write_text(composed.spec.to_json())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="train_base's --out: base models and config.json")
    ap.add_argument("--data", choices=DATA_CHOICES, default="substitution")
    ap.add_argument("--smoke", action="store_true", help="a few steps on the CPU")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", default="every1", type=layers_arg, help=f"which blocks are connected: {list(LAYERS)} "
                                                                    "or pairs S:T,... (m_A block S -> m_B block T)")
    ap.add_argument("--positions", choices=["none", "rotary"], default="none",
                    help="cross-attention positions (rotary: RoPE on queries and keys)")
    ap.add_argument("--window", type=int, help="each anchor token reads m_A's last WINDOW tokens (default: all)")
    ap.add_argument("--null-kv", action="store_true", help="a learned null key/value: a head may read nothing")
    ap.add_argument("--no-eos", action="store_true", help="no loss on the EOS of KV-substitution answers: where "
                                                          "they end is left to the anchor")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size = 4, 8

    base = Path(args.base)
    world = KVWorld(KVConfig(**json.loads((base / "config.json").read_text())["data"]))
    composed = compose(load_base(base, "m_A"), load_base(base, "m_B"), args.layers, args.positions, args.window,
                       args.null_kv)
    print(composed.summary())
    composed, tuner, run = train_composition(composed, world, args.data, steps=args.steps, batch_size=args.batch_size,
                                             lr=args.lr, seed=args.seed, cpu=args.smoke, progress=not args.smoke,
                                             eos_loss=not args.no_eos)
    if not tuner.accelerator.is_main_process:
        return {}
    tag = f"calm_{args.data}"
    save_composition(composed, base, tag)
    row = accuracy_row(composed, world, tuner.device)
    run["kv_substitution_own_keys"] = compose_key_accuracy(composed, world, tuner.device, n=20 if args.smoke else 500)
    (base / f"{tag}_eval.json").write_text(json.dumps({"calm": row, **run, "data": args.data}, indent=1))
    print(format_table({"calm": row}))
    return row


if __name__ == "__main__":
    main()
