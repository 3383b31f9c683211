"""Train the new parameters of a composed model: `FineTuner`, built on Hugging Face Accelerate.

The composed model is any `nn.Module` whose `forward(input_ids, **extra_inputs)` returns logits
`(batch, seq, vocab)` and whose `new_parameters()` yields the parameters to train (the cross-attention);
everything else stays frozen. A base model can be trained in full by passing `params=model.parameters()`.

    tuner = FineTuner(composed, dataset, TrainConfig(max_steps=1000, output_dir="runs/kv"))
    history = tuner.train(resume_from="latest")

Run it on several processes with `accelerate launch --num_processes N script.py` (or torchrun): the
optimizer, data loader and scheduler are `accelerator.prepare`d, so each process trains on its own shard;
the model is replicated (DDP), or with `TrainConfig(parallel="fsdp")` sharded block by block (FSDP2,
`calmgraph.parallel.shard`), or by DeepSpeed ZeRO-3 when `accelerator=` carries a stage-3 DeepSpeed plugin.
A composition compiled on the meta device is loaded by FineTuner, each process reading only its shards
(`calmgraph.parallel.load_sharded`). `activation_checkpointing=True` recomputes each block in backward.
Pass your own `accelerator=` (plugins, mixed precision, trackers) and an `eval_dataset=` for the eval loss
every `eval_every` steps.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Sampler

from calmgraph.checkpoint import FILE as NEW_PARAMS, tensor_problems, write_new
from calmgraph.errors import CheckpointError, ConfigError, DependencyError, InputError, Problem
from calmgraph.files import write_text
from calmgraph.limits import short
from calmgraph.spec import CompositionSpec, spec_error_from

_CKPT_RE = re.compile(r"^step-(\d{8})$")


# ----------------------------------------------------------------------------------------------------
# loss and schedule: plain functions, usable without the trainer


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor | None = None,
                    ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t.

    `label_mask[b, t]` is true where token t is a target (e.g. the answer after a prompt); the first token
    is never a target. Targets equal to `ignore_index` are skipped too, so passing the pad id as
    `ignore_index` masks padding without a mask. `reduction="sum"` returns the summed loss, which the
    trainer divides by the token count of the whole (accumulated, all-process) batch.
    """
    targets = input_ids[:, 1:].clone()
    if label_mask is not None:
        targets[~label_mask[:, 1:].bool()] = ignore_index
    logits = logits[:, :-1].float()  # a bf16 softmax over the vocab loses precision
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up to 1, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)  # never 0, so no step is wasted (as nanoGPT)
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------
# config


Count = Annotated[int, Strict(), Field(ge=0)]        # strict: `True` is not 1, 2.0 is not 2
Positive = Annotated[int, Strict(), Field(gt=0)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TrainConfig(BaseModel):
    """How FineTuner trains. Validated like the spec: unknown keys, wrong types and values out of range
    (`keep_last=0`, `grad_accum_steps=0`, `lr=nan`) are a `ConfigError` naming each, at construction and
    at assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_steps: Count                    # optimizer steps; the cosine schedule ends here
    batch_size: Positive = 8            # sequences per micro-batch, per process
    grad_accum_steps: Positive = 1      # micro-batches per optimizer step
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3   # peak learning rate
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1         # the cosine decays to lr * min_lr_ratio
    warmup_steps: Count = 0
    weight_decay: Rate = 0.0            # applied to matrices only, not to biases or norms
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = 1.0   # None: no clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # "auto": bf16 on GPUs that support it, else fp32
    shuffle: Annotated[bool, Strict()] = True   # reshuffle each epoch with a seed derived from (seed, epoch)
    seed: Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)] = 0
    output_dir: str | None = None       # checkpoints and train_log.jsonl go here
    save_every: Count = 0               # checkpoint every N optimizer steps (0: never)
    keep_last: Positive = 3             # checkpoints kept (at least the latest); older ones are deleted
    num_workers: Count = 0
    progress: Annotated[bool, Strict()] = True  # tqdm bar on the main process
    cpu: Annotated[bool, Strict()] = False      # force the CPU even where a GPU is present
    eval_every: Count = 0               # eval loss on the eval dataset every N optimizer steps (0: at the end only)
    parallel: Literal["ddp", "fsdp"] = "ddp"    # several processes: replicate (DDP) or shard each block (FSDP2)
    activation_checkpointing: Annotated[bool, Strict()] = False  # recompute each block in backward

    @field_validator("output_dir", mode="before")
    @classmethod
    def _path(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    def __init__(self, /, **data: Any):  # `self` positional-only: a key named "self" is an unknown key
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(spec_error_from(e).problems) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError(spec_error_from(e).problems) from None


class EpochSampler(Sampler[int]):
    """Indices in a fixed order per epoch: a permutation seeded by (seed, epoch), or 0..n-1.

    The order depends on nothing but the seed and the epoch, so a resumed run sees the same batches as an
    uninterrupted one. Accelerate shards the batches this sampler produces across processes.
    """

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class SeededItems(Dataset):
    """`dataset`, each item fetched under torch (CPU), Python and NumPy RNGs seeded from (seed, epoch, index),
    then the RNGs put back as they were.

    A dataset that draws at random in `__getitem__` (a random mask) draws the same for the same item in a
    resumed run, whatever the loader read ahead before the checkpoint or how many workers fetch; and data
    loading leaves the global RNG, which the model's dropout draws from, untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        item_seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index)) % 2**63
        state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])


# ----------------------------------------------------------------------------------------------------
# the trainer


class FineTuner:
    """AdamW on the new parameters with warm-up + cosine, clipping, accumulation, mixed precision,
    atomic keep-last-K checkpoints and exact resume, data parallel through Accelerate.

    `dataset` yields dicts (`input_ids`, optional `label_mask`, and any other inputs of the model's forward
    by name) or tuples (`input_ids`, the model's other inputs in forward order, then optionally `label_mask`).
    The loss is the mean over target tokens of the whole optimizer step (all micro-batches, all processes),
    so splitting a batch into micro-batches or processes does not change the gradient.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, config: TrainConfig,
                 params: Iterable[nn.Parameter] | None = None, collate_fn=None, *,
                 eval_dataset: Dataset | None = None, accelerator=None):
        from .extras import require
        require("train", "FineTuner", DependencyError)  # calmgraph itself does not need accelerate

        self.config = c = config
        self.accelerator = acc = _accelerator(c, accelerator)
        self.device = acc.device
        if c.eval_every and eval_dataset is None:
            raise _problem("eval_every", f"eval_every={c.eval_every} needs an eval_dataset= to evaluate on")

        # Freeze everything but the trainable set; name each trainable parameter for the checkpoint.
        params = list(model.new_parameters() if params is None else params)
        if not params:
            raise ValueError("nothing to train: the model's new_parameters() (or params=) is empty")
        wanted = {id(p) for p in params}
        self.param_names = [n for n, p in model.named_parameters() if id(p) in wanted]
        if len(self.param_names) != len(wanted):
            raise ValueError("params= holds tensors that are not parameters of the model")
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        self.input_names, self.required_inputs, self.open_inputs = _forward_inputs(model)
        on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        # checkpointing, FSDP2, loading: before the optimizer sees the parameters
        self.sharded = self._scale(model, on_meta)
        if self.sharded or on_meta:
            named = dict(model.named_parameters())  # sharding (DTensors) or loading replaced them
            params = [named[n] for n in self.param_names]

        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.zero3 = acc.distributed_type == "DEEPSPEED"  # checked by _deepspeed_config: ZeRO stage 3
        self.groups = [decay, no_decay]  # the parameter objects stay; ZeRO-3 partitions their data in place
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=c.betas)
        # A prepared scheduler is stepped once per process at each optimizer step (Accelerate assumes a
        # schedule counted in single-process batches); divide that back out so the schedule is in optimizer steps.
        n_proc = acc.num_processes
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: warmup_cosine(k // n_proc, c.warmup_steps, c.max_steps, c.min_lr_ratio))
        self.sampler = EpochSampler(len(dataset), c.shuffle, c.seed)
        # The loader's own generator: creating an iterator draws a worker seed from it, which would
        # otherwise come from the global RNG and shift dropout after a resume.
        self.loader_rng = torch.Generator()
        loader = DataLoader(SeededItems(dataset, c.seed), batch_size=c.batch_size, sampler=self.sampler,
                            drop_last=True, num_workers=c.num_workers, collate_fn=collate_fn, generator=self.loader_rng)
        if self.sharded:  # already distributed: Accelerate must not wrap it in DDP as well
            self.model = model
            self.optimizer, self.loader, self.scheduler = acc.prepare(optimizer, loader, scheduler)
        else:
            self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        self.eval_loader = None if eval_dataset is None else acc.prepare(DataLoader(
            eval_dataset, batch_size=c.batch_size, shuffle=False, num_workers=c.num_workers, collate_fn=collate_fn))
        if len(self.loader) == 0:
            raise ValueError(f"the dataset ({len(dataset)} items) is smaller than one batch per process "
                             f"({c.batch_size} x {n_proc} processes)")
        self.step = 0  # optimizer steps done
        self.history: list[dict[str, float]] = []

    def _scale(self, model: nn.Module, on_meta: bool) -> bool:
        """Apply `activation_checkpointing` and `parallel="fsdp"` (calmgraph.parallel); whether it is sharded.
        A model compiled on the meta device is loaded here (`load_sharded`): after sharding, each process
        reads only its shards of the weights."""
        from torch.distributed.fsdp import FSDPModule

        from .parallel import checkpoint_blocks, load_sharded, shard
        c, acc = self.config, self.accelerator
        if c.activation_checkpointing:
            checkpoint_blocks(model)
        sharded = isinstance(model, FSDPModule)  # sharded (and perhaps loaded) by the caller
        if not sharded and c.parallel == "fsdp" and acc.num_processes > 1:  # one process: nothing to shard over
            if not on_meta:
                model.to(acc.device)
            shard(model)
            sharded = True
        if on_meta:
            load_sharded(model, device=acc.device)
        return sharded

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Mean next-token loss over the target tokens of the whole eval dataset (every process's part;
        the samples Accelerate repeats to even out the last batch are counted once). Every process calls it."""
        if self.eval_loader is None:
            raise _problem("eval_dataset", "evaluate needs the FineTuner built with eval_dataset=")
        acc = self.accelerator
        sums, counts = [], []
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in self.eval_loader:
                    ids, mask, extra = self._split(batch)
                    with acc.autocast():
                        out = self.model(ids, **extra)
                    logits = out.logits if hasattr(out, "logits") else out
                    per_token = next_token_loss(logits, ids, mask, reduction="none").view(ids.size(0), -1)
                    n = (mask[:, 1:].bool() if mask is not None else torch.ones_like(ids[:, 1:], dtype=torch.bool))
                    loss, count = acc.gather_for_metrics((per_token.sum(1), n.sum(1).float()))
                    sums.append(loss.float().cpu())
                    counts.append(count.cpu())
        finally:
            if self.sharded:  # FSDP keeps the root's weights gathered after a forward that has no backward
                self.model.reshard()
            self.model.train()
        return float(torch.cat(sums).sum() / torch.cat(counts).sum().clamp(min=1))

    # -- batches -------------------------------------------------------------------------------------

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(input_ids, label_mask, other model inputs) from a dict or tuple batch, checked against forward."""
        if isinstance(batch, (tuple, list)):
            names = self.input_names + ["label_mask"]
            if not 1 <= len(batch) <= len(names):
                raise InputError(f"a tuple batch must hold 1 to {len(names)} tensors {tuple(names)}, got {len(batch)}")
            batch = dict(zip(names, batch))
        if not isinstance(batch, dict):
            raise InputError(f"a batch must be a dict or a tuple, got {type(batch).__name__}")
        known = set(self.input_names) | {"label_mask"}
        for key in batch:
            if key not in known and not self.open_inputs:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                raise InputError(f"batch key {key!r} is not an input of the model; expected some of {sorted(known)}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        missing = [k for k in self.required_inputs if k not in batch]
        if missing:
            raise InputError(f"batch is missing the model input(s) {missing}; it has {sorted(batch)}")
        ids = batch["input_ids"]
        if not (torch.is_tensor(ids) and ids.dim() == 2 and not ids.is_floating_point()):
            got = f"{tuple(ids.shape)} {ids.dtype}" if torch.is_tensor(ids) else type(ids).__name__
            raise InputError(f"input_ids must be an integer tensor (batch, seq), got {got}")
        mask = batch.get("label_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.shape != ids.shape):
            got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise InputError(f"label_mask must have the shape of input_ids {tuple(ids.shape)}, got {got}")
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "label_mask")}
        for k, v in extra.items():
            if torch.is_tensor(v) and (v.dim() == 0 or v.size(0) != ids.size(0)):
                raise InputError(f"input {k!r} must have the batch size {ids.size(0)} as its first dim, "
                                 f"got shape {tuple(v.shape)}")
        return ids, mask, extra

    def _n_targets(self, ids: torch.Tensor, mask: torch.Tensor | None) -> int:
        return int(mask[:, 1:].bool().sum()) if mask is not None else ids[:, 1:].numel()

    def _batches(self) -> Iterator[Any]:
        """Micro-batches from the current position on, across epochs; skips what a resumed run already saw."""
        from accelerate import skip_first_batches

        done = self.step * self.config.grad_accum_steps
        epoch, skip = divmod(done, len(self.loader))
        while True:
            self.loader.set_epoch(epoch)  # reaches EpochSampler through Accelerate's shard wrapper
            self.loader.dataset.set_epoch(epoch)  # SeededItems: the items' RNG seeds
            self.loader_rng.manual_seed(self.config.seed * 1_000_003 + epoch)
            yield from (skip_first_batches(self.loader, skip) if skip else self.loader)
            epoch, skip = epoch + 1, 0

    # -- training ------------------------------------------------------------------------------------

    def train(self, resume_from: str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Train to `config.max_steps`; `resume_from` is a checkpoint dir, or "latest" in `output_dir`.

        Returns the per-step history (loss, lr, grad_norm) of this call.
        """
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        if resume_from == "latest":
            found = list_checkpoints(c.output_dir) if c.output_dir else []
            resume_from = found[-1] if found else None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if c.output_dir and acc.is_main_process:
            Path(c.output_dir).mkdir(parents=True, exist_ok=True)
            _clean_leftovers(Path(c.output_dir))
            _trim_log(Path(c.output_dir) / "train_log.jsonl", self.step)
        self.model.train()
        batches = self._batches()
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not (c.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        t0, tokens = time.perf_counter(), 0
        while self.step < c.max_steps:
            window = [self._split(next(batches)) for _ in range(c.grad_accum_steps)]
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            loss, grad_norm = self._optimizer_step(window)
            tokens += sum(ids.numel() for ids, _, _ in window) * acc.num_processes
            self.step += 1
            rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            if self.eval_loader is not None and (self.step == c.max_steps
                                                 or (c.eval_every and self.step % c.eval_every == 0)):
                rec["eval_loss"] = self.evaluate()
            self.history.append(rec)
            acc.log({k: v for k, v in rec.items() if k != "step"}, step=self.step)  # the Accelerator's trackers
            if acc.is_main_process and c.output_dir:
                with open(Path(c.output_dir) / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}",
                            tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
            if c.save_every and c.output_dir and (self.step % c.save_every == 0 or self.step == c.max_steps):
                self.save_checkpoint()
        bar.close()
        return self.history

    def _optimizer_step(self, window) -> tuple[float, float]:
        acc = self.accelerator
        # Normalise by the target tokens of the whole step on all processes: DDP averages gradients over
        # processes, hence the factor num_processes.
        n_local = sum(self._n_targets(ids, mask) for ids, mask, _ in window)
        n_global = acc.reduce(torch.tensor(float(n_local), device=self.device), reduction="sum").clamp(min=1)
        scale = acc.num_processes / n_global
        total = torch.zeros((), device=self.device)
        for i, (ids, mask, extra) in enumerate(window):
            # Only the last micro-batch all-reduces gradients.
            with acc.no_sync(self.model) if i < len(window) - 1 else nullcontext():
                with acc.autocast() if self.sharded else nullcontext():  # a prepared model autocasts itself
                    out = self.model(ids, **extra)
                logits = out.logits if hasattr(out, "logits") else out
                loss_sum = next_token_loss(logits, ids, mask, reduction="sum")
                acc.backward(loss_sum * scale)
            total += loss_sum.detach()
        grad_norm = float("nan")
        if self.config.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            grad_norm = float(_full(norm))  # sharded: a DTensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(total, reduction="sum") / n_global), grad_norm

    # -- checkpoints ---------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters by name (what a checkpoint and a release hold), whole, on the CPU. Sharded
        (`parallel="fsdp"`), each is gathered from every process: all processes call it."""
        named = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        if self.zero3:
            return _z3_gathered(named, self.param_names)
        return {n: _full(named[n].detach()).float().cpu().contiguous() for n in self.param_names}

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict with every sharded tensor gathered whole (all processes call it): the
        file a sharded run writes is the one a single process would, and loads in one process."""
        if self.zero3:
            return _z3_optimizer_state(self.optimizer, self.groups, self.step)
        state = self.optimizer.state_dict()
        if not self.sharded:
            return state
        return {**state, "state": {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
                                   for i, entry in state["state"].items()}}

    def save_checkpoint(self) -> Path:
        """Write `output_dir/step-<8-digit step>` atomically: build it under a temporary name, then rename.

        A kill at any point leaves either the complete checkpoint or none under that name; older
        checkpoints are untouched until the new one is in place.
        """
        acc, root = self.accelerator, Path(self.config.output_dir)
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_rank{acc.process_index}.pt")  # each process has its own
        trained, optimizer = self.trainable_state(), self.optimizer_state()  # every process: shards are gathered
        if acc.is_main_process:  # the new parameters and the spec, as composed.save_new writes them
            unwrapped = acc.unwrap_model(self.model)
            spec = unwrapped.recorded_spec() if hasattr(unwrapped, "recorded_spec") else getattr(unwrapped, "spec", None)
            write_new(trained, tmp / NEW_PARAMS, spec if isinstance(spec, CompositionSpec) else None)
            torch.save(optimizer, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            cfg = self.config.model_dump(mode="json")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "num_processes": acc.num_processes,
                                                        "param_names": self.param_names, "config": cfg}, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            if final.exists():  # the same step written by an earlier, interrupted run of this training
                _remove_dir(final)
            os.replace(tmp, final)
            _fsync(root)
            for old in list_checkpoints(root)[:-self.config.keep_last]:
                _remove_dir(old)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore parameters, optimizer, scheduler, step and this process's RNG state. Every file is read
        and checked first (names, shapes, dtypes, the spec, the optimizer's state; nothing unpickled but
        tensors and plain data): a checkpoint that does not fit is a `CheckpointError` and changes nothing."""
        acc, path = self.accelerator, Path(path)
        problems: list[str] = []
        state = _read(path / "state.json", lambda f: json.loads(f.read_text()), problems)
        if isinstance(state, dict):
            if state.get("num_processes") != acc.num_processes:
                problems.append(f"written by {state.get('num_processes')} processes, this run has {acc.num_processes}: "
                                "the data order would differ, so it cannot resume exactly")
            if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
                problems.append(f"state.json: step {short(state.get('step'))} is not a step count")
        elif state is not None:
            problems.append("state.json: not a JSON object")
        tensors = _read(path / NEW_PARAMS, lambda f: load_file(str(f)), problems)
        named = dict(acc.unwrap_model(self.model).named_parameters())
        if tensors is not None:
            problems += tensor_problems(tensors, {n: _whole_like(named[n]) for n in self.param_names}, "the model",
                                        "the model does not train")
            problems += _spec_mismatch(path / NEW_PARAMS, acc.unwrap_model(self.model))
        load = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731 - tensors and plain data only
        optimizer = _read(path / "optimizer.pt", load, problems)
        if optimizer is not None:
            problems += _optimizer_problems(optimizer, [[_whole_like(p) for p in g] for g in self.groups] if self.zero3
                                            else [g["params"] for g in self.optimizer.param_groups])
        scheduler = _read(path / "scheduler.pt", load, problems)
        rng = _read(path / f"rng_rank{acc.process_index}.pt", load, problems)
        if rng is not None and not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng)):
            problems.append(f"rng_rank{acc.process_index}.pt: not an RNG state written by FineTuner")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be resumed; nothing was loaded:\n{lines}")

        if self.zero3:
            _z3_load(named, self.param_names, tensors, self.optimizer, self.groups, optimizer)
        else:
            with torch.no_grad():
                for name in self.param_names:
                    named[name].copy_(_like(tensors[name].to(named[name].dtype), named[name]))
        if self.sharded:  # each process keeps its shard of the whole state the file holds
            ours = [p for g in self.optimizer.param_groups for p in g["params"]]
            optimizer = {**optimizer, "state": {i: {k: _like(v, ours[i]) if torch.is_tensor(v) and v.dim() else v
                                                    for k, v in entry.items()} for i, entry in optimizer["state"].items()}}
        if not self.zero3:
            self.optimizer.load_state_dict(optimizer)  # moves the state to the parameters' device
        self.scheduler.load_state_dict(scheduler)
        self._follow_schedule()
        _set_rng_state(rng)
        self.step = state["step"]

    def _follow_schedule(self) -> None:
        """After a resume, the rates of this run's config (`lr`, `max_steps`, warm-up) at the step resumed
        from: the files hold the old run's rates, which its scheduler would otherwise keep for one step."""
        scheduler = getattr(self.scheduler, "scheduler", self.scheduler)  # Accelerate wraps it
        scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for group, rate in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * rate(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _read(file: Path, read, problems: list[str]):
    """`read(file)`, or None with the reason appended to `problems`."""
    if not file.is_file():
        problems.append(f"{file.name}: missing")
        return None
    try:
        return read(file)
    except Exception as e:  # noqa: BLE001 - a damaged file raises whatever its reader raises
        problems.append(f"{file.name}: unreadable ({type(e).__name__}: {str(e).strip()[:200]})")
        return None


def _spec_mismatch(file: Path, model: nn.Module) -> list[str]:
    """A composition's checkpoint carries its spec (older ones do not): it must be this model's."""
    from safetensors import safe_open

    from calmgraph.checkpoint import SPEC_KEY, _spec_problems
    if not isinstance(getattr(model, "spec", None), CompositionSpec):
        return []
    with safe_open(str(file), framework="pt") as f:
        return _spec_problems((f.metadata() or {}).get(SPEC_KEY), model)


def _optimizer_problems(saved: Any, groups: list[list[torch.Tensor]]) -> list[str]:
    """What `optimizer.load_state_dict` would refuse halfway, or accept wrongly (a state of another shape),
    for an optimizer over these groups of parameters."""
    if not (isinstance(saved, dict) and isinstance(saved.get("param_groups"), list) and isinstance(saved.get("state"), dict)):
        return ["optimizer.pt: not an optimizer state"]
    ours = [p for g in groups for p in g]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in saved["param_groups"]]
    if sizes != [len(g) for g in groups]:
        return [f"optimizer.pt: parameter groups of sizes {sizes}, the optimizer has {[len(g) for g in groups]}"]
    problems = []
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(ours) or not isinstance(entry, dict):
            return [f"optimizer.pt: a state for parameter {short(index)}, which the optimizer does not have"]
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(ours[index].shape):
                problems.append(f"optimizer.pt: {key} of parameter {index} has shape {tuple(value.shape)}, "
                                f"the parameter {tuple(ours[index].shape)}")
    return problems


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a temporary or half-deleted dir never matches)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name))


# ----------------------------------------------------------------------------------------------------
# helpers


def _forward_inputs(model: nn.Module) -> tuple[list[str], list[str], bool]:
    """(input names, required names, accepts **kwargs) of `model.forward`; the first input is `input_ids`
    whatever forward calls it (the hand-written GPT calls it `idx`)."""
    params = inspect.signature(model.forward).parameters.values()
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    varargs = {p.kind for p in params} & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    if not named and not varargs:
        raise ValueError(f"{type(model).__name__}.forward takes no input; it must take input_ids first")
    names = ["input_ids"] + [p.name for p in named[1:]]
    required = ["input_ids"] + [p.name for p in named[1:] if p.default is p.empty]
    return names, required, bool(varargs)  # forward(*args / **kwargs): names cannot be checked


def _accelerator(c: TrainConfig, given):
    """The user's Accelerator (its plugins, mixed precision and trackers), or one built from the config;
    a config setting that contradicts the given Accelerator is refused rather than silently ignored."""
    from accelerate import Accelerator
    if given is None:
        mp = c.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and not c.cpu and torch.cuda.is_bf16_supported() else "no"
        return Accelerator(cpu=c.cpu, mixed_precision=mp)
    if not isinstance(given, Accelerator):
        raise _problem("accelerator", f"accelerator= takes an accelerate.Accelerator, got {type(given).__name__}")
    if c.mixed_precision != "auto" and c.mixed_precision != str(given.mixed_precision):
        raise _problem("mixed_precision", f"TrainConfig(mixed_precision={c.mixed_precision!r}) contradicts the Accelerator's "
                          f"{str(given.mixed_precision)!r}; leave it 'auto' and set it on the Accelerator")
    if c.cpu and given.device.type != "cpu":
        raise _problem("cpu", f"TrainConfig(cpu=True) contradicts the Accelerator on {given.device}; "
                          "pass Accelerator(cpu=True) instead")
    if given.distributed_type == "DEEPSPEED":
        _deepspeed_config(c, given)
    if given.log_with and not given.trackers:  # trackers asked for but not started: start them with the config
        given.init_trackers("calmgraph", config=c.model_dump(mode="json"))
    return given


def _deepspeed_config(c: TrainConfig, acc) -> None:
    """Check a DeepSpeed Accelerator against the config and fill its "auto" clipping from max_grad_norm."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    if acc.num_processes != world:  # each process would train alone on the whole, unsharded batch
        raise _problem("accelerator", f"the DeepSpeed Accelerator counts {acc.num_processes} process(es) of the {world} "
                       "started: on CPUs, build it with kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')]")
    if getattr(acc, "deepspeed_engine_wrapped", None) is not None:  # its backward would drive the older engine
        raise _problem("accelerator", "this DeepSpeed Accelerator already drives a model (Accelerate ties one engine to it); "
                       "call accelerator.free_memory() when that training is done, or build another Accelerator")
    if c.parallel != "ddp":
        raise _problem("parallel", f"parallel={c.parallel!r} with a DeepSpeed Accelerator: DeepSpeed shards the model "
                       "itself; leave parallel='ddp'")
    ds = acc.state.deepspeed_plugin
    stage = ds.deepspeed_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise _problem("accelerator", f"FineTuner drives DeepSpeed ZeRO stage 3 only, the plugin has stage {stage}")
    if c.grad_accum_steps != 1 or ds.deepspeed_config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise _problem("grad_accum_steps", "gradient accumulation under DeepSpeed is not supported yet: "
                       "use grad_accum_steps=1 and a larger batch_size")
    if ds.deepspeed_config.get("fp16", {}).get("enabled") is True:
        raise _problem("accelerator", "DeepSpeed fp16 is not supported: its loss scaler skips steps, which a checkpoint's "
                       "AdamW step count would not know; use bf16 or fp32")
    clip = 0.0 if c.max_grad_norm is None else c.max_grad_norm  # DeepSpeed: 0 is no clipping
    if ds.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        ds.deepspeed_config["gradient_clipping"] = clip
    elif ds.deepspeed_config["gradient_clipping"] != clip:
        raise _problem("max_grad_norm", f"TrainConfig(max_grad_norm={c.max_grad_norm}) contradicts the DeepSpeed config's "
                       f"gradient_clipping={ds.deepspeed_config['gradient_clipping']}; set it 'auto'")


def _problem(field: str, message: str) -> ConfigError:
    return ConfigError([Problem(field, message)])


# -- DeepSpeed ZeRO-3: each parameter's data is partitioned across processes, its fp32 copy and AdamW
# moments live in the ZeRO optimizer; a checkpoint holds them whole, as one process writes them.


def _whole_like(p: torch.Tensor) -> torch.Tensor:
    """An empty tensor of the whole parameter's shape and dtype (a ZeRO-3 parameter's own shape is (0,))."""
    return torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype, device="meta")


def _z3_gathered(named: dict[str, nn.Parameter], names: list[str]) -> dict[str, torch.Tensor]:
    import deepspeed
    params = [named[n] for n in names]
    with deepspeed.zero.GatheredParameters(params):  # a collective: every process calls it
        return {n: p.detach().float().cpu().clone() for n, p in zip(names, params)}


def _z3_optimizer_state(optimizer, groups: list[list[nn.Parameter]], step: int) -> dict[str, Any]:
    """AdamW's state dict as one process's optimizer would write it (gathered: every process calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state
    ours = [p for g in groups for p in g]
    keys = ("exp_avg", "exp_avg_sq")
    state = {} if step == 0 else {i: {"step": torch.tensor(float(step)),  # no step is skipped in fp32
                                      **{k: safe_get_full_optimizer_state(p, k).cpu().clone() for k in keys}}
                                  for i, p in enumerate(ours)}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    first = 0
    param_groups = []
    for h, g in zip(hyper, groups, strict=True):
        param_groups.append({**h, "params": list(range(first, first + len(g)))})
        first += len(g)
    return {"state": state, "param_groups": param_groups}


def _z3_set(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This process's partition of the fp32 parameter (key None) or of its optimizer state `key`, through
    DeepSpeed's local API (its full one cuts the last partition without the padding it holds)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param, safe_set_local_optimizer_state
    size = safe_get_local_fp32_param(param).numel()
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    part = value.detach().flatten()[size * rank:size * (rank + 1)]
    part = torch.cat([part, part.new_zeros(size - part.numel())])   # the last partition's padding
    if key is None:
        safe_set_local_fp32_param(param, part)
    else:
        safe_set_local_optimizer_state(param, part, key)


def _z3_load(named, names, tensors, optimizer, groups, saved) -> None:
    """The checkpoint's parameters (the model's partitions and their fp32 copies) and AdamW's moments."""
    import deepspeed
    params = [named[n] for n in names]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for n, p in zip(names, params):
            p.copy_(tensors[n].to(p.dtype))
    z3 = optimizer.optimizer  # DeepSpeedOptimizerWrapper -> DeepSpeedZeroOptimizer_Stage3
    for group, hyper in zip(z3.optimizer.param_groups, saved["param_groups"], strict=True):  # lr: where the schedule was
        group.update({k: v for k, v in hyper.items() if k != "params"})
    if saved["state"]:  # AdamW creates its state lazily, at its first step: create it to write into
        step = max(float(e["step"]) for e in saved["state"].values())
        for flat in z3.fp32_partitioned_groups_flat:
            z3.optimizer.state[flat] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(flat),
                                        "exp_avg_sq": torch.zeros_like(flat)}
    name_of = {id(p): n for n, p in zip(names, params)}
    with torch.no_grad():
        for i, p in enumerate(q for g in groups for q in g):
            _z3_set(p, tensors[name_of[id(p)]], None)
            for k, v in saved["state"].get(i, {}).items():
                if k != "step":
                    _z3_set(p, v, k)


def _full(t):
    """A sharded tensor (DTensor) gathered whole on every process (a collective); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(whole: torch.Tensor, ref):
    """`whole` laid out as `ref`: this process's shard where `ref` is a DTensor, else `whole` itself."""
    if not hasattr(ref, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(ref.device), ref.device_mesh, ref.placements)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_leftovers(root: Path) -> None:
    """Folders a kill left mid-rotation (`.trash-*`) or mid-write (`.tmp-*`): never a complete checkpoint."""
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink() and re.match(r"^\.(trash|tmp)-step-\d{8}$", p.name):
            shutil.rmtree(p, ignore_errors=True)


def _trim_log(log: Path, step: int) -> None:
    """Keep the log's records up to `step`, where this run continues: the steps after it (run before a
    crash, and about to run again) would otherwise be listed twice. A half-written last line goes too."""
    if not log.is_file():
        return
    kept, dropped = [], 0
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except json.JSONDecodeError:
            keep = False
        kept += [line] if keep else []
        dropped += not keep
    if dropped:
        write_text(log, "".join(f"{line}\n" for line in kept), overwrite=True)


def _remove_dir(path: Path) -> None:
    """Rename out of the checkpoint namespace first, so a kill mid-delete leaves no half checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)
