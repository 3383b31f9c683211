"""Exact-match accuracy with greedy decoding on the held-out expressions.

Scored on the final result: the part of an answer after its last `;` (the whole answer where it has none,
as in every direct-protocol answer and every substitution). The same rule for every model, data set and
protocol; `part="full"` scores the whole answer instead (the scratchpad too).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

import torch

from examples.kv_arithmetic.data import EOS_ID, SEP, KVDataset, KVWorld, decode, encode

EVAL_TASKS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")


@torch.no_grad()
def greedy_complete(model: Callable[[torch.Tensor], torch.Tensor], prompts: list[str], max_new: int,
                    device: torch.device | str, batch_size: int = 1000) -> list[str]:
    """Greedy continuation of each prompt up to EOS (or `max_new` tokens).

    `model(ids) -> logits (B, T, vocab)`. Prompts are batched by length, so no padding ever enters a
    model with absolute positions and no attention mask.
    """
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out = [""] * len(prompts)
    for length, idx in by_len.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            ids = torch.tensor([encode(prompts[i]) for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new):
                nxt = model(ids)[:, -1].argmax(-1)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == EOS_ID
                if done.all():
                    break
            for i, row in zip(chunk, ids[:, length:].tolist()):
                out[i] = decode(row)
    return out


def answers(model, world: KVWorld, task: str, device, batch_size: int = 1000) -> list[tuple[str, str, str]]:
    """(prompt, reference, greedy answer) for every held-out expression."""
    pairs = [world.example(e, task) for e in world.eval_exprs]
    got = greedy_complete(model, [p for p, _ in pairs], world.max_answer_len, device, batch_size)
    return [(p, ref, a) for (p, ref), a in zip(pairs, got)]


def chain_answers(m_A, m_B, world: KVWorld, device) -> list[tuple[str, str, str]]:
    """(prompt, reference, answer) for every held-out KV-arithmetic expression, answered by the chain
    baseline: m_A substitutes the prompt's keys (its own `>` task), and m_B is asked to compute what m_A wrote
    (`<m_A's answer>=`). No trained parameters beyond the two base models."""
    pairs = [world.example(e, "kv_arithmetic") for e in world.eval_exprs]
    copies = greedy_complete(m_A, [p[:-1] + ">" for p, _ in pairs], world.max_answer_len, device)
    longest = world.max_len - world.max_answer_len - 1  # m_B's prompt and answer must fit its positions
    got = greedy_complete(m_B, [c.removesuffix(SEP)[:longest] + "=" for c in copies], world.max_answer_len, device)
    return [(p, ref, a) for (p, ref), a in zip(pairs, got)]


def bound_accuracy(model, world: KVWorld, device, n: int = 1000) -> float:
    """% of `n` `bound_arithmetic` items (`qz:127;wp:30;qz+15-wp=`, names that are no keys; data.KVWorld.bound)
    answered right by the final result: whether m_B has the route from a name to the number bound to it that
    a composition is meant to feed for a key. Drawn from seeds of their own (training's are `kv-bound/...`)."""
    pairs = [world.bound(random.Random(f"kv-bound-eval/{world.cfg.seed}/{i}"), "bound_arithmetic") for i in range(n)]
    got = greedy_complete(model, [p for p, _ in pairs], world.max_answer_len, device)
    return 100.0 * sum(hit(ref, a) for (_, ref), a in zip(pairs, got)) / n


def result_given_scratchpad(model, world: KVWorld, task: str, device) -> float:
    """% of held-out `task` results right when the right scratchpad and its separator are given (teacher-forced):
    the anchor's arithmetic on values it reads from its own context, whatever wrote them."""
    pairs = [world.example(e, task) for e in world.eval_exprs]
    forced = [p + ref[:ref.index(SEP) + 1] for p, ref in pairs]
    got = greedy_complete(model, forced, world.max_len - max(map(len, forced)), device)  # room for the result
    return 100.0 * sum(a == final_result(ref) for (_, ref), a in zip(pairs, got)) / len(pairs)


def val_accuracy(model, world: KVWorld, device, n: int = 500) -> dict[str, float]:
    """Exact match on `n` expressions of the validation split (the composition's keys, each expression with at
    least one validation key, none held out) for KV-substitution and KV-arithmetic: what hyperparameters are
    chosen by, never the held-out expressions."""
    row = {}
    for task in ("kv_substitution", "kv_arithmetic"):
        ds = KVDataset(world, task, "val", size=n)
        pairs = [world.example(ds.expr_and_task(i)[0], task) for i in range(n)]
        got = greedy_complete(model, [p for p, _ in pairs], world.max_answer_len, device)
        row[task] = 100.0 * sum(hit(ref, a) for (_, ref), a in zip(pairs, got)) / n
    return row


def compose_key_accuracy(model, world: KVWorld, device, n: int = 500) -> float:
    """KV-substitution exact match on `n` expressions over the composition's own keys (its training
    distribution, items past any run's reach; no held-out expression): how well it learned its data,
    as distinct from how it generalises. Never used to choose anything."""
    ds = KVDataset(world, "kv_substitution", "compose", size=10**9)
    pairs = [world.example(*ds.expr_and_task(10**9 - 1 - i)) for i in range(n)]
    got = greedy_complete(model, [p for p, _ in pairs], world.max_answer_len, device)
    return 100.0 * sum(a == ref for (_, ref), a in zip(pairs, got)) / n


def final_result(answer: str) -> str:
    """What follows the answer's last `;` (all of it if it has none; a `;` that ends it is dropped first)."""
    return answer.removesuffix(SEP).rsplit(SEP, 1)[-1]  # a trailing separator ends nothing: dropped


def hit(reference: str, answer: str, part: str = "final") -> bool:
    if part not in ("final", "full"):
        raise ValueError(f"part must be 'final' or 'full', not {part!r}")
    return answer == reference if part == "full" else final_result(answer) == final_result(reference)


def exact_match(model, world: KVWorld, task: str, device, batch_size: int = 1000, part: str = "final") -> float:
    """Percentage of held-out expressions whose greedy answer's final result (or, `part="full"`, whole
    answer) equals the reference's exactly."""
    scored = answers(model, world, task, device, batch_size)
    return 100.0 * sum(hit(ref, a, part) for _, ref, a in scored) / len(scored)


def accuracy_row(model, world: KVWorld, device, part: str = "final") -> dict[str, float]:
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    row = {task: exact_match(model, world, task, device, part=part) for task in EVAL_TASKS}
    if was_training:
        model.train()
    return row


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one column per model, one row per data set (the paper's Table 1 layout)."""
    names = list(rows)
    lines = ["| data set | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in EVAL_TASKS:
        lines.append(f"| {task} | " + " | ".join(f"{rows[n][task]:.1f}" for n in names) + " |")
    return "\n".join(lines)
