"""FineTuner at scale: the user's own Accelerator (trackers), periodic eval loss, activation checkpointing,
and FSDP2, and DeepSpeed ZeRO-3 where deepspeed is installed, over 2 CPU processes equal to one process with
the same global batch, saved and resumed."""
import json

import pytest
import torch

import calmgraph as cg
from calmgraph.demo.models import TinyLM
from calmgraph.train import FineTuner, TrainConfig, list_checkpoints, next_token_loss
from tests.torchrun import launch

SPEC = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
        "edges": [{"source": "aug", "target": "base", "layers": [[0, 0], [-1, 1]]}]}
BATCH, STEPS = 4, 3  # per process; the single-process reference takes 2 * BATCH


def composition():
    torch.manual_seed(0)
    models = {"base": TinyLM(vocab=64, dim=24, depth=2, heads=2), "aug": TinyLM(vocab=64, dim=16, depth=2, heads=2)}
    composed = cg.compile(SPEC, models=models)
    with torch.no_grad():  # non-zero gates: every new parameter gets a gradient from the first step
        for p in composed.new_parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return composed


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seed=0):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        return {"input_ids": torch.randint(0, 64, (7,), generator=g),
                "label_mask": torch.rand(7, generator=g) > 0.3}  # uneven target counts per sequence


def config(out, **kw):
    return TrainConfig(**{**dict(max_steps=STEPS, batch_size=2 * BATCH, lr=1e-2, progress=False, shuffle=False,
                                 cpu=True, save_every=1, keep_last=5, eval_every=1,
                                 output_dir=None if out is None else str(out)), **kw})


def eval_reference(composed, data) -> float:
    """The mean loss over all target tokens of `data`, in float64 from one forward per sequence."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            ids, mask = item["input_ids"][None], item["label_mask"][None]
            total += float(next_token_loss(composed(ids), ids, mask, reduction="sum").double())
            count += int(mask[:, 1:].sum())
    return total / count


# -- the user's Accelerator, trackers, eval ----------------------------------------------------------


def test_the_users_accelerator_logs_to_its_trackers_and_eval_loss_is_periodic(tmp_path):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()
            self.logs, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, dict(values)))

    recorder = Recorder()
    accelerator = Accelerator(cpu=True, log_with=[recorder])
    composed, evalset = composition(), Tokens(n=5, seed=50)  # 5: the last eval batch is short
    tuner = FineTuner(composed, Tokens(), config(tmp_path, eval_every=2, batch_size=4), eval_dataset=evalset,
                      accelerator=accelerator)
    assert tuner.accelerator is accelerator
    history = tuner.train()
    assert [("eval_loss" in r) for r in history] == [False, True, True]  # every 2 steps and at the end
    assert recorder.config["eval_every"] == 2
    assert [step for step, _ in recorder.logs] == [1, 2, 3]
    assert recorder.logs[1][1]["eval_loss"] == history[1]["eval_loss"] and recorder.logs[0][1]["loss"] == history[0]["loss"]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == history
    # the eval loss is that of the model at that step, against a float64 reference over every sequence
    assert history[-1]["eval_loss"] == pytest.approx(eval_reference(composed.eval(), evalset), rel=1e-5)
    assert history[1]["eval_loss"] != history[2]["eval_loss"]


def test_a_config_contradicting_the_accelerator_or_eval_without_data_is_refused(tmp_path):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    with pytest.raises(cg.ConfigError, match="mixed_precision='bf16'.*contradicts the Accelerator's 'no'"):
        FineTuner(composition(), Tokens(), config(tmp_path, mixed_precision="bf16"), accelerator=accelerator)
    with pytest.raises(cg.ConfigError, match="eval_every=1 needs an eval_dataset="):
        FineTuner(composition(), Tokens(), config(tmp_path))
    with pytest.raises(cg.ConfigError, match="accelerator= takes an accelerate.Accelerator"):
        FineTuner(composition(), Tokens(), config(tmp_path, eval_every=0), accelerator="cpu")
    with pytest.raises(cg.ConfigError, match="parallel"):
        TrainConfig(max_steps=1, parallel="zero3")


# -- activation checkpointing and FSDP ------------------------------------------------------------------

# Tolerances against one process: the same math with the token-sum reduced in another order (each rank's
# half, then the all-reduce / reduce-scatter), float32.
LOSS_RTOL = 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the global batch (2 * BATCH), plain and with activation checkpointing."""
    out = tmp_path_factory.mktemp("single")
    runs = {}
    for name, ac in (("plain", False), ("ac", True)):
        tuner = FineTuner(composition(), Tokens(), config(out / name, activation_checkpointing=ac),
                          eval_dataset=Tokens(n=6, seed=100))
        runs[name] = {"history": tuner.train(), "params": tuner.trainable_state(), "dir": out / name}
    return runs


def test_activation_checkpointing_recomputes_and_trains_identically(single):
    composed = composition()
    from calmgraph.parallel import checkpointed
    tuner = FineTuner(composed, Tokens(), config(None, activation_checkpointing=True, eval_every=0, save_every=0))
    assert checkpointed(tuner.model) != []
    plain, ac = single["plain"], single["ac"]
    assert [r["loss"] for r in ac["history"]] == [r["loss"] for r in plain["history"]]
    assert [r["grad_norm"] for r in ac["history"]] == [r["grad_norm"] for r in plain["history"]]
    for n, p in plain["params"].items():
        assert torch.equal(ac["params"][n], p), n


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch("finetune_worker.py", str(out))
    return out, torch.load(out / "rank0.pt", weights_only=False)


def close_runs(got: dict, want: dict) -> None:
    assert got["history"][-1]["step"] == STEPS
    for g, w in zip(got["history"], want["history"][-len(got["history"]):], strict=True):  # a resumed run: its steps
        assert g["step"] == w["step"] and g["lr"] == w["lr"]
        assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=PARAM_RTOL)
        if "eval_loss" in w:
            assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=LOSS_RTOL)
    assert got["params"].keys() == want["params"].keys()
    for n, p in want["params"].items():
        assert torch.allclose(got["params"][n], p, rtol=PARAM_RTOL, atol=PARAM_ATOL), (n, (got["params"][n] - p).abs().max())


@pytest.mark.parametrize("variant", ["fsdp", "fsdp_ac", "resumed"])
def test_fsdp_on_two_processes_trains_as_one_process(sharded, single, variant):
    _, results = sharded
    close_runs(results[variant], single["plain"])


def test_fsdp_shards_the_frozen_weights_and_its_checkpoint_loads_in_one_process(sharded, single):
    out, results = sharded
    ranks, composed = results["fsdp"]["ranks"], composition()
    frozen = sum(p.numel() for p in composed.parameters()) - sum(p.numel() for p in composed.new_parameters())
    assert sum(r["frozen"] for r in ranks) == frozen
    assert all(abs(r["frozen"] - frozen / 2) < 0.05 * frozen for r in ranks)  # dim-0 shards, a few rows apart
    # the checkpoint holds every rank's shards: whole tensors, loaded in this one process
    step = list_checkpoints(out / "fsdp")[-1]
    cg.load_new(composed, step)
    for n, p in composed.named_new_parameters():
        assert torch.allclose(p, single["plain"]["params"][n], rtol=PARAM_RTOL, atol=PARAM_ATOL), n
    optimizer = torch.load(step / "optimizer.pt", weights_only=True)
    theirs = torch.load(list_checkpoints(single["plain"]["dir"])[-1] / "optimizer.pt", weights_only=True)
    assert optimizer["state"].keys() == theirs["state"].keys()
    for i, entry in theirs["state"].items():
        for k, v in entry.items():
            assert torch.allclose(optimizer["state"][i][k], v, rtol=1e-4, atol=1e-7), (i, k)
    # a single-process FineTuner still refuses to resume it: its data order would differ
    tuner = FineTuner(composition(), Tokens(), config(out / "fsdp", max_steps=STEPS + 1, eval_every=0))
    with pytest.raises(cg.CheckpointError, match="written by 2 processes"):
        tuner.load_checkpoint(step)  # the data order would differ: refused, as for DDP


# -- DeepSpeed ZeRO-3 through the user's Accelerator ------------------------------------------------------


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed); CI does not install it")
    out = tmp_path_factory.mktemp("zero3")
    launch("deepspeed_worker.py", str(out), env={"DS_ACCELERATOR": "cpu"})
    return out, torch.load(out / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("variant", ["zero3", "resumed"])
def test_deepspeed_zero3_on_two_processes_trains_as_one_process(zero3, single, variant):
    _, results = zero3
    close_runs(results[variant], single["plain"])


def test_deepspeed_zero3_partitions_the_frozen_weights_and_its_checkpoint_loads_in_one_process(zero3, single):
    out, results = zero3
    composed = composition()
    frozen = sum(p.numel() for p in composed.parameters()) - sum(p.numel() for p in composed.new_parameters())
    tensors = len(list(composed.parameters())) - len(list(composed.new_parameters()))
    half, other = results["frozen_local"]
    assert half == other and frozen <= 2 * half <= frozen + tensors  # each tensor split in two, padded to even
    step = list_checkpoints(out / "zero3")[-1]
    cg.load_new(composed, step)
    for n, p in composed.named_new_parameters():
        assert torch.allclose(p, single["plain"]["params"][n], rtol=PARAM_RTOL, atol=PARAM_ATOL), n
    optimizer = torch.load(step / "optimizer.pt", weights_only=True)  # one process's AdamW state, whole
    theirs = torch.load(list_checkpoints(single["plain"]["dir"])[-1] / "optimizer.pt", weights_only=True)
    assert optimizer["state"].keys() == theirs["state"].keys()
    for i, entry in theirs["state"].items():
        assert entry.keys() == optimizer["state"][i].keys()
        for k, v in entry.items():
            assert torch.allclose(optimizer["state"][i][k], v, rtol=1e-4, atol=1e-7), (i, k)


def test_deepspeed_accelerators_that_would_train_wrongly_are_refused(zero3):
    _, results = zero3
    # without a CPU backend Accelerate counts 1 process of 2: each would train alone on the unsharded batch
    assert "counts 1 process(es) of the 2 started" in results["refused"]
    assert "InitProcessGroupKwargs(backend='gloo')" in results["refused"]
    # a second model on one Accelerator: its backward would step the first engine
    assert "already drives a model" in results["reused"]
    said = results["refusals"]
    assert "grad_accum_steps: gradient accumulation under DeepSpeed is not supported" in said["grad_accum"]
    assert "parallel: parallel='fsdp' with a DeepSpeed Accelerator" in said["fsdp"]
    assert "max_grad_norm: TrainConfig(max_grad_norm=1.0) contradicts" in said["clipping"]
    assert "gradient_clipping=0.5" in said["clipping"]
    assert "DeepSpeed fp16 is not supported" in said["fp16"]
