"""FineTuner: loss, schedule, accumulation, checkpoints, resume, two-process data parallel (all on CPU).

The composed model is stood in for by `ToyComposed`, which has the compiled model's interface:
`forward(input_ids, **extra_inputs) -> logits` and `new_parameters()`.
"""
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import calmgraph.train as train_mod
from calmgraph.errors import InputError
from calmgraph.train import FineTuner, TrainConfig, list_checkpoints, next_token_loss, warmup_cosine
from tests.torchrun import finish, launch

VOCAB = 13


class ToyComposed(nn.Module):
    """Frozen 'anchor' (embedding, head) and 'augment' (side embedding); trainable 'cross' mixing."""

    def __init__(self, dim: int = 8, dropout: float = 0.0):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, dim), nn.Linear(dim, VOCAB)
        self.side = nn.Embedding(VOCAB, dim)
        self.cross = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids, side_ids=None):
        h = self.emb(input_ids)
        ctx = h.cumsum(1) / torch.arange(1, h.size(1) + 1).view(1, -1, 1)  # causal mean
        if side_ids is not None:
            ctx = ctx + self.side(side_ids).mean(1, keepdim=True)
        return self.head(h + self.drop(self.cross(ctx)))

    def new_parameters(self):
        yield from self.cross.parameters()


class ToyData(torch.utils.data.Dataset):
    """Item i is fixed by i; answers start at different offsets so micro-batches hold different token counts."""

    def __init__(self, n: int = 24, seq: int = 7, side: bool = False, fail_after: int | None = None):
        self.n, self.seq, self.side, self.fail_after, self.seen = n, seq, side, fail_after, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen.append(i)
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, VOCAB, (self.seq,), generator=g)
        item = {"input_ids": ids, "label_mask": torch.arange(self.seq) >= 1 + i % 4}
        if self.side:
            item["side_ids"] = torch.randint(0, VOCAB, (3,), generator=g)
        return item


def make_model(seed: int = 0, dropout: float = 0.0) -> ToyComposed:
    torch.manual_seed(seed)
    return ToyComposed(dropout=dropout)


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=1, progress=False, shuffle=False, cpu=True)
    return TrainConfig(**{**base, **kw})


def new_params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.new_parameters()]


# -------------------------------------------------------------------------------------------- loss


def test_next_token_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    ids = torch.tensor([[0, 1, 2, 0]])

    def nll(row, target):  # -log softmax(row)[target], by hand
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    rows = logits[0].tolist()
    per_pos = [nll(rows[t], ids[0, t + 1].item()) for t in range(3)]  # position t predicts token t+1
    assert next_token_loss(logits, ids).item() == pytest.approx(sum(per_pos) / 3, abs=1e-6)
    # Mask: only tokens 2 and 3 are targets, so only positions 1 and 2 count.
    mask = torch.tensor([[1, 1, 1, 1]]) * torch.tensor([[0, 0, 1, 1]])
    assert next_token_loss(logits, ids, mask).item() == pytest.approx((per_pos[1] + per_pos[2]) / 2, abs=1e-6)
    assert next_token_loss(logits, ids, mask, reduction="sum").item() == pytest.approx(per_pos[1] + per_pos[2], abs=1e-6)
    # ignore_index as a pad id: the targets are 1, 2, 0, so ignoring 0 drops the last position.
    assert next_token_loss(logits, ids, ignore_index=0).item() == pytest.approx((per_pos[0] + per_pos[1]) / 2, abs=1e-6)


# ---------------------------------------------------------------------------------------- schedule


def test_warmup_cosine_values():
    # warm-up 4 steps to the peak, cosine over steps 4..12 down to 0.1, flat after.
    expected = {0: 0.2, 1: 0.4, 3: 0.8, 4: 1.0, 8: 0.55, 12: 0.1, 30: 0.1,
                6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))}
    for step, value in expected.items():
        assert warmup_cosine(step, 4, 12, 0.1) == pytest.approx(value, abs=1e-12), step


def test_trainer_uses_the_schedule_per_optimizer_step():
    c = cfg(max_steps=6, warmup_steps=2, min_lr_ratio=0.1, grad_accum_steps=2, batch_size=2)
    hist = FineTuner(make_model(), ToyData(), c).train()
    assert [h["lr"] for h in hist] == pytest.approx([1e-2 * warmup_cosine(s, 2, 6, 0.1) for s in range(6)], abs=1e-12)


def test_a_resume_with_a_longer_run_follows_the_new_schedule_from_its_first_step(tmp_path):
    c = dict(warmup_steps=1, min_lr_ratio=0.1, save_every=2, output_dir=str(tmp_path))
    FineTuner(make_model(), ToyData(), cfg(max_steps=4, **c)).train()
    resumed = FineTuner(make_model(), ToyData(), cfg(max_steps=8, lr=2e-2, **c)).train(resume_from="latest")
    assert [h["lr"] for h in resumed] == pytest.approx([2e-2 * warmup_cosine(s, 1, 8, 0.1) for s in range(4, 8)],
                                                       abs=1e-12)


# ------------------------------------------------------------------------------------ accumulation


def test_accumulating_two_micro_batches_equals_one_batch():
    full, acc = make_model(), make_model()
    anchor_before = full.emb.weight.clone()
    h_full = FineTuner(full, ToyData(), cfg(max_steps=3, batch_size=4)).train()
    h_acc = FineTuner(acc, ToyData(), cfg(max_steps=3, batch_size=2, grad_accum_steps=2)).train()
    assert [h["loss"] for h in h_acc] == pytest.approx([h["loss"] for h in h_full], abs=1e-6)
    for a, b in zip(new_params(full), new_params(acc)):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(full.emb.weight, anchor_before)  # the frozen part did not move
    assert not torch.equal(new_params(full)[0], new_params(make_model())[0])  # the new part did


def test_optimizer_holds_only_new_parameters():
    model = make_model()
    tuner = FineTuner(model, ToyData(), cfg())
    in_opt = {id(p) for g in tuner.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.new_parameters()}
    assert tuner.param_names == ["cross.weight", "cross.bias"]


# ------------------------------------------------------------------------------------- checkpoints


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_keep_last_k(tmp_path):
    FineTuner(make_model(), ToyData(), cfg(max_steps=5, save_every=1, keep_last=2, output_dir=str(tmp_path))).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005", "train_log.jsonl"]
    ckpt = tmp_path / "step-00000005"
    assert {f.name for f in ckpt.iterdir()} == {"new_params.safetensors", "optimizer.pt", "scheduler.pt",
                                                "state.json", "rng_rank0.pt"}
    assert json.loads((ckpt / "state.json").read_text())["step"] == 5


def test_a_kill_mid_write_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    tuner = FineTuner(make_model(), ToyData(), cfg(max_steps=4, save_every=2, keep_last=2, output_dir=str(tmp_path)))
    tuner.train()
    before = {p.name: _digest(p) for p in list_checkpoints(tmp_path)}
    assert list(before) == ["step-00000002", "step-00000004"]

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the optimizer is written, then the process "dies" on the scheduler
        if str(f).endswith("scheduler.pt"):
            Path(f).write_bytes(b"half a file")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train_mod.torch, "save", dying_save)
    tuner.config.max_steps = 6
    with pytest.raises(KeyboardInterrupt):
        tuner.train()
    assert {p.name: _digest(p) for p in list_checkpoints(tmp_path)} == before  # untouched, and no step 6
    assert not (tmp_path / "step-00000006").exists()

    monkeypatch.setattr(train_mod.torch, "save", real_save)
    tuner.save_checkpoint()  # the next save clears the half-written temp dir and rotates
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_continues_the_same_run(tmp_path):
    # Shuffled, accumulated, with dropout: resuming needs the data position, the optimizer and the RNG.
    c = dict(max_steps=8, batch_size=4, grad_accum_steps=2, shuffle=True, save_every=2, keep_last=5)
    full = FineTuner(make_model(dropout=0.2), ToyData(), cfg(**c, output_dir=str(tmp_path / "a"))).train()

    crashing = ToyData(fail_after=4 * 2 * 5 + 3)  # dies during step 6; 3 steps make an epoch of 24 items
    with pytest.raises(RuntimeError, match="simulated crash"):
        FineTuner(make_model(dropout=0.2), crashing, cfg(**c, output_dir=str(tmp_path / "b"))).train()
    assert list_checkpoints(tmp_path / "b")[-1].name == "step-00000004"  # mid-epoch: epoch 1, after 2 batches

    model = make_model(dropout=0.2)  # same frozen parts; the new ones must come from the checkpoint
    with torch.no_grad():
        for p in model.new_parameters():
            p.zero_()
    resumed = FineTuner(model, ToyData(), cfg(**c, output_dir=str(tmp_path / "b"))).train(resume_from="latest")
    assert [h["step"] for h in resumed] == [5, 6, 7, 8]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full[4:]], abs=1e-6)
    assert [h["lr"] for h in resumed] == pytest.approx([h["lr"] for h in full[4:]], abs=1e-12)


# ---------------------------------------------------------------------------------- batch checking


def test_dict_and_tuple_batches_feed_extra_inputs_by_name():
    data = ToyData(side=True)
    h_dict = FineTuner(make_model(), data, cfg(max_steps=2)).train()

    class AsTuples(ToyData):
        def __getitem__(self, i):
            d = super().__getitem__(i)
            return d["input_ids"], d["side_ids"], d["label_mask"]  # forward order, then the mask

    h_tuple = FineTuner(make_model(), AsTuples(side=True), cfg(max_steps=2)).train()
    assert [h["loss"] for h in h_tuple] == pytest.approx([h["loss"] for h in h_dict], abs=1e-7)
    h_no_side = FineTuner(make_model(), ToyData(), cfg(max_steps=2)).train()
    assert h_no_side[0]["loss"] != pytest.approx(h_dict[0]["loss"], abs=1e-4)  # side_ids did reach forward


class Reshaped(ToyData):
    def __init__(self, change):
        super().__init__()
        self.change = change

    def __getitem__(self, i):
        return self.change(super().__getitem__(i))


@pytest.mark.parametrize("change, message", [
    (lambda d: {"input_id": d["input_ids"]}, "did you mean 'input_ids'"),
    (lambda d: {**d, "label_mask": d["label_mask"][:-1]}, "label_mask must have the shape"),
    (lambda d: {**d, "input_ids": d["input_ids"].float()}, "integer tensor"),
    (lambda d: {**d, "input_ids": d["input_ids"][None]}, "integer tensor"),
    (lambda d: {**d, "sideids": d["input_ids"]}, "did you mean 'side_ids'"),
    (lambda d: (d["input_ids"], d["input_ids"], d["label_mask"], d["label_mask"]), "1 to 3 tensors"),
])
def test_a_wrong_batch_fails_at_the_first_batch(change, message):
    model = make_model()
    before = new_params(model)
    tuner = FineTuner(model, Reshaped(change), cfg())
    with pytest.raises(InputError, match=message) as err:
        tuner.train()
    assert isinstance(err.value, ValueError)
    assert tuner.step == 0 and all(torch.equal(a, b) for a, b in zip(before, new_params(model)))


def test_a_forward_of_star_args_gets_input_ids_first():
    class StarArgs(ToyComposed):  # what a generated module may look like
        def forward(self, *args):
            return super().forward(*args)

    torch.manual_seed(0)
    h_star = FineTuner(StarArgs(), ToyData(), cfg(max_steps=2)).train()
    h_named = FineTuner(make_model(), ToyData(), cfg(max_steps=2)).train()
    assert [h["loss"] for h in h_star] == pytest.approx([h["loss"] for h in h_named], abs=1e-7)


def test_an_input_with_another_batch_size_is_refused():
    def collate(items):  # a collate that gets the batch wrong
        batch = torch.utils.data.default_collate(items)
        return {**batch, "side_ids": batch["side_ids"][:1]}

    with pytest.raises(InputError, match="'side_ids' must have the batch size 4"):
        FineTuner(make_model(), ToyData(side=True), cfg(), collate_fn=collate).train()


# ------------------------------------------------------------------------------- two CPU processes


def test_two_processes_shard_the_data_and_agree(tmp_path):
    # torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; Accelerate on the CPU then uses gloo. (`accelerate
    # launch --cpu` hands multi-CPU runs to mpirun, which CI machines lack.)
    launch("test_train.py", tmp_path, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    seen = [set(r["seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # different shards
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # identical parameters on both ranks
    # ...and what one process gets by accumulating the two shards' batches.
    single = make_model()
    FineTuner(single, ToyData(), cfg(**WORKER_CFG, batch_size=2, grad_accum_steps=2)).train()
    for a, b in zip(ranks[0]["params"], new_params(single)):
        assert torch.allclose(a, b, atol=1e-6)


WORKER_CFG = dict(max_steps=3, warmup_steps=1)


def _worker(out_dir: str) -> None:
    """One rank of `accelerate launch --num_processes 2`: train, then record what it saw and ended with."""
    data = ToyData()
    model = make_model()
    tuner = FineTuner(model, data, cfg(**WORKER_CFG, batch_size=2))
    state = tuner.accelerator.state
    assert state.num_processes == 2 and state.backend == "gloo", "not two gloo processes"
    seen_before = len(data.seen)
    tuner.train()
    rank = tuner.accelerator.process_index
    torch.save({"seen": data.seen[seen_before:], "params": new_params(model)}, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(sys.argv[1])
    finish()
