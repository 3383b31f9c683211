"""Train a composition of transformers models end to end: compile, train, save, reload, generate.

A Llama anchor reads, through cross-attention, every 2nd block of a Qwen2 augment over the same tokens
(both from small configs with random weights: nothing is downloaded). The task is copying: a sequence of
letters, a separator, the same letters again; only the copy is scored. The frozen models never saw it, so
what the loss learns is learnt by the new cross-attention blocks alone.

    python examples/train_transformers/train.py                          # a few steps on the CPU
    python examples/train_transformers/train.py --steps 2000 --device cuda --out runs/copy

Needs the [hf] and [train] extras: pip install -e ".[hf,train]".
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset

import calmgraph as cg

VOCAB, LETTERS, SEP = 64, 16, 63  # the copied letters are tokens 0..15; 63 separates prompt and copy
INIT = 0.2  # weights of std 0.2 rather than 0.02: random models whose logits can be confident

SPEC = """
anchor: {name: llama}
augments:
  - {name: qwen, input: shared}       # reads the anchor's own tokens: causal cross-attention
edges:
  - {source: qwen, target: llama, layers: {every: 2}}
"""


def make_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=INIT))
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=INIT))
    return {"llama": llama.eval(), "qwen": qwen.eval()}


class Copy(Dataset):
    """`letters, SEP, letters`: a dict of one sample's inputs by name, with the copy as the scored part."""

    def __init__(self, n: int, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        letters = torch.randint(0, LETTERS, (n, length), generator=g)
        self.ids = torch.cat([letters, torch.full((n, 1), SEP), letters], dim=1)
        self.label_mask = torch.zeros_like(self.ids)
        self.label_mask[:, length + 1:] = 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "label_mask": self.label_mask[i]}


def copy_loss(composed, data: Copy) -> float:
    with torch.no_grad():
        device = next(composed.new_parameters()).device
        return composed.loss(data.ids.to(device), label_mask=data.label_mask.to(device)).item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100: seconds on a CPU)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of the new parameters")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--out", default="runs/train_transformers", help="checkpoints and the trained new parameters")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # calmgraph's line per traced model

    models = make_models()
    composed = cg.compile(cg.CompositionSpec.from_yaml(SPEC), models=models)
    composed.print_trainable_parameters()
    train, held_out = Copy(4096, seed=0), Copy(64, seed=1)
    before = copy_loss(composed, held_out)

    config = cg.TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 10,
                            output_dir=args.out, save_every=max(1, args.steps // 2), cpu=args.device == "cpu",
                            progress=False)
    started = time.perf_counter()
    history = cg.FineTuner(composed, train, config).train(resume_from="latest")
    composed.cpu()
    after = copy_loss(composed, held_out)
    print(f"trained {len(history)} steps in {time.perf_counter() - started:.1f} s on {args.device}: "
          f"held-out copy loss {before:.3f} -> {after:.3f}")

    # the new parameters alone are the release: rebuild the composition from the same models and load them
    composed.save_new(Path(args.out) / "final")
    again = cg.compile(cg.CompositionSpec.from_yaml(SPEC), models=models)
    cg.load_new(again, Path(args.out) / "final")
    print(f"reloaded from {Path(args.out) / 'final'}: held-out copy loss {copy_loss(again, held_out):.3f}")

    prompt = held_out.ids[:2, :13]  # the letters and the separator; greedy decoding writes the copy
    out = again.generate(prompt, 12, temperature=0)
    print("prompt:", prompt[0].tolist())
    print("copy:  ", out[0, 13:].tolist())


if __name__ == "__main__":
    main()
