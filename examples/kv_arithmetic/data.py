"""The key-value arithmetic data of CALM §4.1 (Bansal et al. 2024), small enough to train in minutes.

Keys are random lowercase strings of 2-6 characters, each mapped to a unique integer in [1, n_keys].
An expression joins 3 (paper: 3-6) keys with +, - and * (the paper's x; written * so it is not a key
letter). From one expression come the paper's three data sets, plus one skill of the anchor's own:

    kv_substitution      "ab+cde*fg>"  ->  "10+22*24"     m_A learns this (it memorises the keys)
    numeric_arithmetic   "10+22*24="   ->  "538"          m_B learns this
    kv_arithmetic        "ab+cde*fg="  ->  "538"          nobody trains on it: the composition's test
    numeric_copy         "10+22*24>"   ->  "10+22*24"     m_B learns this too (see below)

The last prompt character names the task: `>` rewrite the expression with numbers, `=` compute it.
The paper's anchor is a pretrained LM that can be asked for either; a model trained from scratch on
arithmetic alone could not be asked to rewrite anything, so the composition (trained on substitution)
would have nothing in the anchor to steer. Giving the anchor the numeric `>` skill keeps it ignorant of
keys while giving it the same two "instructions" the paper's anchor understands.

How the anchor sees keys at all: both models share this character vocabulary, so key letters have rows
in the anchor's embedding, but the anchor never saw one in training (its letter embeddings are only
pushed down as outputs). In the composition both models read the same sequence, and the anchor's only
route to a key's value is cross-attention to m_A's hidden states at the key's characters.

Splits are fixed by `KVConfig.seed`: the evaluation expressions are drawn first and every training
sampler rejects them; the composition trains on substitution over `compose_key_frac` (20%) of the keys.

Two protocols (`KVConfig.protocol`):

    direct        the above: `=` answers with the result alone (the paper's format; the first attempt)
    scratchpad    `=` first copies the expression with numbers, then gives the result after `;`:
                      numeric_arithmetic   "10+22-24="  ->  "10+22-24;8"
                      kv_arithmetic        "ab+cde-fg=" ->  "10+22-24;8"
                  and m_B also learns numeric_reread (below). The `=` task then starts with the `>` task,
                  so the composition, which learns on substitution to make the anchor's copy write values
                  for keys, puts the values where the anchor's own arithmetic reads them: in its output.

    numeric_reread       "31-7+60="     ->  "10+22-24;8"    loss on ";8" only (scratchpad only)
    copy_reread          "31-7+60>"     ->  "10+22-24"      loss on the EOS only (scratchpad only)

numeric_reread teaches m_B that the result is a function of its scratchpad, not of the prompt: the
prompt shows another expression and the copy part is given (teacher-forced, no loss), so the result can
only be read from the copy. Without it m_B may compute from the prompt's digits, which on a key prompt are
letters. It is numbers only: m_B still never sees a key. With `reread_letters` > 0 that share of its
prompts are letter strings that are not keys (`"qzv+owkr-xyi="`): m_B learns to ignore a prompt of letters
it cannot read, and still learns nothing of any key. copy_reread (`reread_copy` > 0) does the same for the `>`
task: m_B learns where a copy ends (after as many numbers as the prompt has operands) without reading the
prompt, so on a key prompt the anchor itself knows when the values are written. With fixed widths that is
the only signal it needs: a composition need not be told where a substitution ends (`eos_loss=False`).

With `augment_markers=">="` m_A's substitution prompts end in either marker (it substitutes either way):
m_A then reads a KV-arithmetic prompt as it reads its own data. Trained on `>` alone it has never read `=`
and garbles what follows it (`niydb+uij+nxxqq=` -> `====;;;;;74+74+...`). It still knows nothing of arithmetic.

With `anchor_mix="broad"` m_B learns, instead of the mixes above, numbers and copies after bindings it does
not use, and expressions of names bound to numbers earlier in the prompt (`KVWorld.bound`):

    bound_arithmetic     "qz:127;wp:30;qz+15-wp="  ->  "112"        names: random, never a key
    bound_copy           "qz:127;wp:30;qz+15-wp>"  ->  "127+15-30"

`val_key_frac` keeps that share of the composition's keys out of its training data (split "compose"), to
choose its hyperparameters on (split "val": expressions over the composition's keys with at least one of them).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

# Character tokenizer shared by both models: 0 pads, 1 ends the answer.
CHARS = string.digits + string.ascii_lowercase + "+-*=>;:"  # ":" binds a name to a number (bound_*)
PAD_ID, EOS_ID = 0, 1
VOCAB_SIZE = len(CHARS) + 2
STOI = {ch: i + 2 for i, ch in enumerate(CHARS)}

TASKS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic", "numeric_copy", "numeric_reread", "copy_reread",
         "bound_arithmetic", "bound_copy")
PROTOCOLS = ("direct", "scratchpad")
ANCHOR_MIXES = ("narrow", "broad")
SEP = ";"  # ends the scratchpad, before the result
Expr = tuple[tuple[int, ...], tuple[str, ...]]  # (key indices, operators between them)


@dataclass(frozen=True)
class KVConfig:
    n_keys: int = 100           # N_KV; values are a permutation of 1..n_keys (paper: 25K)
    min_operands: int = 3       # paper: 3-6 keys per expression
    max_operands: int = 3
    ops: str = "+-*"
    compose_key_frac: float = 0.2  # the composition trains on substitution over this share of the keys
    n_eval: int = 1000          # held-out expressions, the same for every task
    seed: int = 0
    protocol: str = "direct"    # or "scratchpad": `=` answers "<expression with numbers>;<result>"
    reread_letters: float = 0.0  # share of numeric_reread prompts written in letters that are no key
    augment_markers: str = ">"  # m_A's substitution prompts end in one of these at random (">=": either)
    fixed_width: bool = False   # numbers in expressions written with leading zeros to one width ("010+022")
    reread_copy: float = 0.0    # share of m_B's copy items that are copy_reread (scratchpad only)
    anchor_mix: str = "narrow"  # m_B's tasks: "narrow" (numbers only) or "broad" (+ bound names; train_base.py)
    anchor_operands: tuple[int, int] | None = None  # operands of m_B's own expressions (None: as the eval's)
    val_key_frac: float = 0.0   # this share of the composition's keys validates it instead of training it


# What each protocol changes beyond the answer format. The scratchpad run drops * (the first attempt's m_B
# computed only 37% of +,-,* expressions; the scratchpad tests the composition, so the anchor's own skill
# should be solid).
PROTOCOL_DEFAULTS = {"direct": {"ops": "+-*"}, "scratchpad": {"ops": "+-"}}


def protocol_config(protocol: str, **overrides) -> KVConfig:
    """The KVConfig of a protocol: its defaults, then `overrides`."""
    if protocol not in PROTOCOL_DEFAULTS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    return KVConfig(**{**PROTOCOL_DEFAULTS[protocol], **overrides, "protocol": protocol})


def encode(text: str) -> list[int]:
    return [STOI[ch] for ch in text]


def decode(ids: Sequence[int]) -> str:
    """Characters up to the first EOS, pads dropped."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i != PAD_ID:
            out.append(CHARS[i - 2])
    return "".join(out)


def solve(values: Sequence[int], ops: Sequence[str]) -> int:
    """The value of v0 op0 v1 op1 ... with * before + and -."""
    terms, signs = [values[0]], []
    for op, v in zip(ops, values[1:]):
        if op == "*":
            terms[-1] *= v
        else:
            terms.append(v)
            signs.append(op)
    total = terms[0]
    for sign, t in zip(signs, terms[1:]):
        total = total + t if sign == "+" else total - t
    return total


class KVWorld:
    """The keys, their values, the composition's key subset and the held-out expressions, all from one seed."""

    def __init__(self, cfg: KVConfig = KVConfig()):
        if cfg.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {cfg.protocol!r}; known: {PROTOCOLS}")
        if cfg.reread_copy and cfg.protocol != "scratchpad":
            raise ValueError("reread_copy (copy_reread items) exists only in the scratchpad protocol; set it to 0")
        if cfg.anchor_mix not in ANCHOR_MIXES:
            raise ValueError(f"unknown anchor_mix {cfg.anchor_mix!r}; known: {ANCHOR_MIXES}")
        for name in ("reread_letters", "reread_copy", "val_key_frac"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} is a share of items, between 0 and 1; got {getattr(cfg, name)}")
        self.cfg = cfg
        rng = random.Random(f"kv-world/{cfg.seed}")
        keys: dict[str, None] = {}  # insertion-ordered set
        while len(keys) < cfg.n_keys:
            keys["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))] = None
        self.keys = list(keys)
        self._key_set = set(keys)
        self.values = rng.sample(range(1, cfg.n_keys + 1), cfg.n_keys)  # unique, in [1, n_keys]
        n_compose = max(1, round(cfg.compose_key_frac * cfg.n_keys))
        self.compose_keys = sorted(rng.sample(range(cfg.n_keys), n_compose))
        # A stream of its own, so that worlds without a validation split stay as they were.
        val_rng = random.Random(f"kv-val/{cfg.seed}")
        self.val_keys = sorted(val_rng.sample(self.compose_keys, round(cfg.val_key_frac * n_compose)))
        self.fit_keys = sorted(set(self.compose_keys) - set(self.val_keys))  # what the composition trains on

        eval_rng = random.Random(f"kv-eval/{cfg.seed}")
        held_out: dict[Expr, None] = {}
        while len(held_out) < cfg.n_eval:
            held_out[self.sample(eval_rng, range(cfg.n_keys))] = None
        self.eval_exprs = list(held_out)
        self._eval_set = set(held_out)

        # Longest sequence: prompt, the longest answer, EOS.
        k, digits = cfg.max_operands, len(str(cfg.n_keys))
        prompt = 6 * k + (k - 1) + 1
        expression, result = digits * k + (k - 1), 1 + len(str(cfg.n_keys ** k))
        answer = expression + 1 + result if cfg.protocol == "scratchpad" else max(expression, result)  # + 1: the ;
        self.max_answer_len = answer + 1
        self.max_len = prompt + answer + 1
        if cfg.anchor_mix == "broad":  # bound_* items: up to k + 1 bindings "name:value;" before the expression
            k = max(k, self.anchor_operands[1])
            expression, result = digits * k + (k - 1), 1 + len(str(cfg.n_keys ** k))
            answer = expression + 1 + result if cfg.protocol == "scratchpad" else max(expression, result)
            self.max_len = max(self.max_len, (k + 1) * (6 + 1 + digits + 1) + 6 * k + (k - 1) + 1 + answer + 1)

    @property
    def anchor_operands(self) -> tuple[int, int]:
        return tuple(self.cfg.anchor_operands or (self.cfg.min_operands, self.cfg.max_operands))

    def sample(self, rng: random.Random, key_pool: Sequence[int], n: int | None = None) -> Expr:
        n = rng.randint(self.cfg.min_operands, self.cfg.max_operands) if n is None else n
        return tuple(rng.choice(key_pool) for _ in range(n)), tuple(rng.choice(self.cfg.ops) for _ in range(n - 1))

    def is_held_out(self, expr: Expr) -> bool:
        return expr in self._eval_set

    def _join(self, parts: Sequence[str], ops: Sequence[str]) -> str:
        return parts[0] + "".join(op + p for op, p in zip(ops, parts[1:]))

    def _nums(self, expr: Expr) -> str:
        width = len(str(self.cfg.n_keys)) if self.cfg.fixed_width else 0
        return self._join([str(self.values[i]).zfill(width) for i in expr[0]], expr[1])

    def name(self, rng: random.Random) -> str:
        """A random name of 2-6 letters that is no key (a key's length distribution)."""
        while True:
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))
            if word not in self._key_set:
                return word

    def bound(self, rng: random.Random, task: str) -> tuple[str, str]:
        """(prompt, answer) of a bound_* item: numbers bound to random names that are no keys, then an
        expression of names and numbers (`qz:127;wp:30;qz+15-wp=` -> `112`; `>`: `127+15-30`). m_B learns to
        read a name's number from elsewhere in its context: a route from a name to a number that a composition
        can feed for a key. Never a key, never a held-out expression (those hold keys)."""
        n = rng.randint(*self.anchor_operands)
        top = self.cfg.n_keys
        names: list[str] = []
        while len(names) < n:
            word = self.name(rng)
            if word not in names:
                names.append(word)
        is_name = [rng.random() < 0.6 for _ in range(n)]
        if not any(is_name):
            is_name[rng.randrange(n)] = True
        values = [rng.randint(1, top) for _ in range(n)]
        ops = [rng.choice(self.cfg.ops) for _ in range(n - 1)]
        bindings = [(w, v) for w, v, b in zip(names, values, is_name) if b]
        if rng.random() < 0.5:  # a binding the expression does not use
            bindings.append((self.name(rng), rng.randint(1, top)))
        rng.shuffle(bindings)
        prefix = "".join(f"{w}:{self._num(v)};" for w, v in bindings)
        shown = self._join([w if b else self._num(v) for w, v, b in zip(names, values, is_name)], ops)
        nums = self._join([self._num(v) for v in values], ops)
        if task == "bound_copy":
            return prefix + shown + ">", nums
        result = str(solve(values, ops))
        return prefix + shown + "=", (nums + SEP + result if self.cfg.protocol == "scratchpad" else result)

    def distractor_bindings(self, rng: random.Random) -> str:
        """0-2 bindings of names the expression after them does not use: its numbers start at varied positions."""
        return "".join(f"{self.name(rng)}:{self._num(rng.randint(1, self.cfg.n_keys))};"
                       for _ in range(rng.randint(0, 2)))

    def _num(self, v: int) -> str:
        return str(v).zfill(len(str(self.cfg.n_keys)) if self.cfg.fixed_width else 0)

    def letters(self, rng: random.Random, n: int | None = None) -> str:
        """An expression of letter strings that are not keys (`n` of them): a prompt m_B cannot read."""
        keys, words = set(self.keys), []
        while len(words) < (rng.randint(self.cfg.min_operands, self.cfg.max_operands) if n is None else n) or not words:
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))
            if word not in keys:
                words.append(word)
        return self._join(words, [rng.choice(self.cfg.ops) for _ in words[1:]])

    def example(self, expr: Expr, task: str, distractor: Expr | str | None = None) -> tuple[str, str]:
        """(prompt, answer) of `expr` for `task`; numeric_reread's prompt is `distractor`'s numbers (an
        expression) or `distractor` itself (a text, from `letters`)."""
        idx, ops = expr
        keys_text = self._join([self.keys[i] for i in idx], ops)
        nums_text = self._nums(expr)
        result = str(solve([self.values[i] for i in idx], ops))
        copy = nums_text
        if self.cfg.protocol == "scratchpad":
            result = nums_text + SEP + result
        elif task in ("numeric_reread", "copy_reread"):
            raise ValueError(f"{task} exists only in the scratchpad protocol")
        if task in ("numeric_reread", "copy_reread"):
            if distractor is None:
                raise ValueError(f"{task} needs a distractor expression for its prompt")
            shown = distractor if isinstance(distractor, str) else self._nums(distractor)
            return (shown + "=", result) if task == "numeric_reread" else (shown + ">", copy)
        return {
            "kv_substitution": (keys_text + ">", copy),
            "numeric_arithmetic": (nums_text + "=", result),
            "kv_arithmetic": (keys_text + "=", result),
            "numeric_copy": (nums_text + ">", copy),
        }[task]

    def tensors(self, prompt: str, answer: str, loss_from: int = 0) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids` and a `label_mask` that is true on answer[loss_from:] and the EOS."""
        ids = encode(prompt) + encode(answer) + [EOS_ID]
        pad = self.max_len - len(ids)
        mask = [False] * (len(prompt) + loss_from) + [True] * (len(answer) - loss_from + 1) + [False] * pad
        # numpy first: torch.tensor on a list is slow, and data loading bounds these small models' steps
        return {"input_ids": torch.from_numpy(np.array(ids + [PAD_ID] * pad, dtype=np.int64)),
                "label_mask": torch.from_numpy(np.array(mask, dtype=np.bool_))}


class KVDataset(Dataset):
    """Examples of one or more tasks.

    split "train": expressions over all keys; "compose": over the composition's 20% of keys only; both
    drawn afresh for each index (item i is fixed by (seed, split, i)) and never a held-out expression.
    split "eval": the held-out expressions, in order (one task).
    `tasks` maps task -> sampling weight, or names one task. With `eos_loss=False` no KV-substitution item
    has a loss on its EOS: a composition trained on them writes the values but leaves where the answer ends
    to the anchor.
    With `write_mask=True` every item has a `write_mask` (`expression_writes`).
    """

    def __init__(self, world: KVWorld, tasks: str | dict[str, float], split: str = "train", size: int | None = None,
                 eos_loss: bool = True, write_mask: bool = False):
        self.world, self.split, self.eos_loss, self.write_mask = world, split, eos_loss, write_mask
        self.tasks = {tasks: 1.0} if isinstance(tasks, str) else dict(tasks)
        unknown = set(self.tasks) - set(TASKS)
        if unknown or split not in ("train", "compose", "val", "eval"):
            raise ValueError(f"unknown task(s) {sorted(unknown)} or split {split!r}; tasks: {TASKS}")
        if split == "eval":
            if len(self.tasks) != 1:
                raise ValueError("an eval split holds one task")
            self.size = len(world.eval_exprs)
        else:
            if size is None:
                raise ValueError("a training split needs a size (items are generated, not stored)")
            self.size = size
        self.pool = {"compose": world.fit_keys, "val": world.compose_keys}.get(split, range(world.cfg.n_keys))
        if split == "val" and not world.val_keys:
            raise ValueError("a val split needs validation keys: set KVConfig.val_key_frac > 0")

    def __len__(self) -> int:
        return self.size

    def expr_and_task(self, i: int) -> tuple[Expr, str]:
        """Item i's expression and task (numeric_reread's prompt expression: `distractor(i)`)."""
        if self.split == "eval":
            return self.world.eval_exprs[i], next(iter(self.tasks))
        rng = random.Random(f"kv-{self.split}/{self.world.cfg.seed}/{i}")
        task = rng.choices(list(self.tasks), weights=list(self.tasks.values()))[0]
        n = None  # the eval's operand count, or m_B's own (anchor_operands) for its numeric tasks
        if self.world.cfg.anchor_operands and task.startswith(("numeric_", "copy_")) and self.split == "train":
            n = rng.randint(*self.world.anchor_operands)
        val = set(self.world.val_keys)
        while True:
            expr = self.world.sample(rng, self.pool, n)
            if not self.world.is_held_out(expr) and (self.split != "val" or val & set(expr[0])):
                return expr, task

    def distractor(self, i: int, n: int | None = None) -> Expr | str:
        """What a reread item's prompt shows: another expression's numbers (any expression: it is never
        scored) or, for a `reread_letters` share of items, letters that are no key; `n` operands (copy_reread:
        as many as the copy, whose end they tell)."""
        rng = random.Random(f"kv-{self.split}-distractor/{self.world.cfg.seed}/{i}")
        expr = self.world.sample(rng, self.pool, n)  # drawn first: items with reread_letters=0 stay as they were
        return self.world.letters(rng, n) if rng.random() < self.world.cfg.reread_letters else expr

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        expr, task = self.expr_and_task(i)
        item = self._item(i, expr, task)
        if not self.eos_loss and task == "kv_substitution":
            item["label_mask"][(item["input_ids"] == EOS_ID).nonzero()[0]] = False
        if self.write_mask:
            item["write_mask"] = expression_writes(item["input_ids"])
        return item

    def _item(self, i: int, expr: Expr, task: str) -> dict[str, torch.Tensor]:
        cfg = self.world.cfg
        if task.startswith("bound_"):
            return self.world.tensors(*self.world.bound(random.Random(f"kv-bound/{cfg.seed}/{self.split}/{i}"), task))
        if task in ("numeric_arithmetic", "numeric_copy") and cfg.anchor_mix == "broad" and self.split == "train":
            prompt, answer = self.world.example(expr, task)  # after 0-2 bindings it does not use
            prefix = self.world.distractor_bindings(random.Random(f"kv-prefix/{cfg.seed}/{i}"))
            return self.world.tensors(prefix + prompt, answer)
        if task in ("numeric_reread", "copy_reread"):  # the copy is given, not learned here
            n = len(expr[0]) if task == "copy_reread" else None
            prompt, answer = self.world.example(expr, task, self.distractor(i, n))
            return self.world.tensors(prompt, answer, loss_from=answer.index(SEP) if task == "numeric_reread"
                                      else len(answer))
        prompt, answer = self.world.example(expr, task)
        if task == "kv_substitution" and self.split == "train" and cfg.augment_markers != ">":  # m_A's own data
            prompt = prompt[:-1] + random.Random(f"kv-marker/{cfg.seed}/{i}").choice(cfg.augment_markers)
        return self.world.tensors(prompt, answer)


def expression_writes(ids: torch.Tensor) -> torch.Tensor:
    """1 over each prompt's expression, before its first `>` or `=`; 0 from there on (the answer included):
    the `write_mask` of a composition whose blocks may only change how the expression reads (`writes:
    masked`), never write the answer themselves. ids: (..., T)."""
    marker = (ids == STOI[">"]) | (ids == STOI["="])
    return (marker.cumsum(-1) == 0).long()


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch and cut the padding columns every item has (positions are absolute from 0, so the
    right padding carries nothing)."""
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    width = int((batch["input_ids"] != PAD_ID).any(0).nonzero().max()) + 1
    return {k: v[:, :width] for k, v in batch.items()}
