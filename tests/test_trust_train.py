"""FineTuner's checkpoints: one format with `save_new` (spec included), old ones still load, and a bad
TrainConfig or checkpoint is refused before anything changes."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import calmgraph as cg
from calmgraph.demo.models import TinyLM
from calmgraph.checkpoint import FILE as NEW_PARAMS
from calmgraph.train import FineTuner, TrainConfig, list_checkpoints

PLAIN = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
         "edges": [{"source": "aug", "target": "base", "layers": [[-1, 0]]}]}
torch.manual_seed(0)
MODELS = {"base": TinyLM(vocab=64, dim=24, depth=2, heads=2), "aug": TinyLM(vocab=64, dim=16, depth=2, heads=2)}


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"input_ids": torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(i))}


def config(tmp_path, **kw):
    return TrainConfig(**{**dict(max_steps=2, batch_size=4, lr=1e-2, progress=False, shuffle=False, cpu=True,
                                 save_every=2, output_dir=str(tmp_path)), **kw})


def new_params(composed):
    return {n: p.detach().clone() for n, p in composed.named_new_parameters()}


def test_a_finetuner_checkpoint_is_a_save_new_checkpoint_with_its_spec(tmp_path):
    composed = cg.compile(PLAIN, models=MODELS)
    FineTuner(composed, Tokens(), config(tmp_path)).train()
    step = list_checkpoints(tmp_path)[-1]
    assert cg.CompositionSpec.from_json((step / "spec.json").read_text()) == composed.spec
    fresh = cg.compile(PLAIN, models=MODELS)
    cg.load_new(fresh, step)  # the library's loader reads a training checkpoint: same files, same checks
    trained = new_params(composed)
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_new_parameters())
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trained.items() if "to_out" in n)
    other = cg.compile({**PLAIN, "cross_attention": {"norm": "layer"}}, models=MODELS)
    with pytest.raises(cg.CheckpointError, match="saved from a different spec"):
        cg.load_new(other, step)


def test_an_old_checkpoint_without_a_spec_still_resumes(tmp_path):
    composed = cg.compile(PLAIN, models=MODELS)
    FineTuner(composed, Tokens(), config(tmp_path)).train()
    step = list_checkpoints(tmp_path)[-1]
    (step / "spec.json").unlink()  # as the FineTuner of before wrote it: tensors only, no metadata
    save_file(load_file(step / "new_params.safetensors"), step / "new_params.safetensors")
    fresh = cg.compile(PLAIN, models=MODELS)
    tuner = FineTuner(fresh, Tokens(), config(tmp_path))
    tuner.load_checkpoint(step)
    trained = new_params(composed)
    assert tuner.step == 2 and all(torch.equal(p, trained[n]) for n, p in fresh.named_new_parameters())
    assert json.loads((step / "state.json").read_text())["step"] == 2


# -- TrainConfig: validated like the spec -------------------------------------------------------------------
@pytest.mark.parametrize("changes, loc, message", [
    ({"keep_last": -1}, "keep_last", "greater than 0"),
    ({"keep_last": 0}, "keep_last", "greater than 0"),
    ({"grad_accum_steps": 0}, "grad_accum_steps", "greater than 0"),
    ({"save_every": -1}, "save_every", "greater than or equal to 0"),
    ({"max_steps": True}, "max_steps", "valid integer"),
    ({"batch_size": 2.0}, "batch_size", "valid integer"),
    ({"lr": float("nan")}, "lr", "finite number"),
    ({"betas": (0.9, 1.5)}, "betas[1]", "less than 1"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "'auto', 'no', 'bf16' or 'fp16'"),
    ({"keep_lats": 2}, "keep_lats", "unknown key"),
])
def test_a_bad_train_config_is_a_located_config_error(changes, loc, message):
    with pytest.raises(cg.ConfigError) as e:
        TrainConfig(**{"max_steps": 4, **changes})
    assert isinstance(e.value, ValueError) and message in {p.loc: p.msg for p in e.value.problems}[loc]


def test_an_assignment_is_validated_too():
    c = TrainConfig(max_steps=4)
    c.max_steps = 6
    with pytest.raises(cg.ConfigError, match="keep_last: Input should be greater than 0"):
        c.keep_last = -1
    assert (c.max_steps, c.keep_last) == (6, 3)


# -- load_checkpoint: everything checked before anything changes ------------------------------------------------
def trained(tmp_path):
    composed = cg.compile(PLAIN, models=MODELS)
    FineTuner(composed, Tokens(), config(tmp_path)).train()
    return list_checkpoints(tmp_path)[-1]


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/calmgraph-evil-ran.txt", "w"))


def tamper(step, case):
    tensors = load_file(step / "new_params.safetensors")
    key = next(k for k in tensors if k.endswith("to_q.weight"))
    if case == "missing":
        tensors.pop(key)
    elif case == "extra":
        tensors["xattn.extra"] = torch.zeros(2)
    elif case == "shape":
        tensors[key] = torch.zeros(3, 3)
    if case in ("missing", "extra", "shape"):
        save_file(tensors, step / "new_params.safetensors")
    elif case == "pickle":
        torch.save({"state": {}, "param_groups": [], "evil": Evil()}, step / "optimizer.pt")
    elif case == "rng":
        (step / "rng_rank0.pt").unlink()
    elif case == "optimizer":
        opt = torch.load(step / "optimizer.pt", weights_only=True)
        opt["state"][0]["exp_avg"] = torch.zeros(5)
        torch.save(opt, step / "optimizer.pt")
    elif case == "state":
        (step / "state.json").write_text("[1, 2")
    return key


@pytest.mark.parametrize("case, message", [
    ("missing", "missing 1 tensor(s)"), ("extra", "1 tensor(s) the model does not train: xattn.extra"),
    ("shape", "shape (3, 3) in the checkpoint"), ("pickle", "optimizer.pt: unreadable (UnpicklingError"),
    ("rng", "rng_rank0.pt: missing"), ("optimizer", "optimizer.pt: exp_avg of parameter 0 has shape (5,)"),
    ("state", "state.json: unreadable (JSONDecodeError"), ("spec", "saved from a different spec"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, case, message):
    import pathlib
    step = trained(tmp_path / "run")
    tamper(step, case)
    spec = {**PLAIN, "cross_attention": {"gate": "tanh"}} if case == "spec" else PLAIN
    target = cg.compile(spec, models=MODELS)
    tuner = FineTuner(target, Tokens(), config(tmp_path / "other"))
    params, opt, rng = new_params(target), json.dumps(str(tuner.optimizer.state_dict())), torch.get_rng_state()
    with pytest.raises(cg.CheckpointError, match="cannot be resumed; nothing was loaded") as e:
        tuner.load_checkpoint(step)
    assert message in str(e.value), str(e.value)
    assert all(torch.equal(p, params[n]) for n, p in target.named_new_parameters())
    assert json.dumps(str(tuner.optimizer.state_dict())) == opt and torch.equal(torch.get_rng_state(), rng)
    assert tuner.step == 0 and not pathlib.Path("/tmp/calmgraph-evil-ran.txt").exists()


# -- resume: the log lists each step once, leftovers are cleaned ----------------------------------------------
class Crashing(Tokens):
    def __init__(self, after):
        self.after, self.seen = after, 0

    def __getitem__(self, i):
        self.seen += 1
        if self.seen > self.after:
            raise RuntimeError("simulated crash")
        return super().__getitem__(i)


def test_after_a_crash_and_resume_the_log_lists_each_step_once(tmp_path):
    c = dict(max_steps=5, save_every=3, keep_last=2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # in step 5, the second epoch's first batch
        FineTuner(cg.compile(PLAIN, models=MODELS), Crashing(after=4 * 4 + 2), config(tmp_path, **c)).train()
    log = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4] and list_checkpoints(tmp_path)[-1].name == "step-00000003"
    (tmp_path / ".trash-step-00000000").mkdir()  # as a kill during rotation leaves it
    (tmp_path / ".trash-step-00000000" / "optimizer.pt").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    FineTuner(cg.compile(PLAIN, models=MODELS), Tokens(), config(tmp_path, **c)).train(resume_from="latest")
    log = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-00000003", "step-00000005",
                                                         "train_log.jsonl"]


# -- resume is bit-exact when the dataset draws from the global RNG, across a real SIGKILL -----------------
TRAIN_SCRIPT = '''
import os, signal, sys
import torch
import calmgraph as cg
from calmgraph.demo.models import TinyLM
from calmgraph.train import FineTuner, TrainConfig

torch.set_num_threads(1)
out, kill_after = sys.argv[1], int(sys.argv[2])


class RandomMasks(torch.utils.data.Dataset):
    """Random tokens and a random label mask from the global RNG, as augmenting datasets do."""
    seen = 0

    def __len__(self):
        return 12

    def __getitem__(self, i):
        RandomMasks.seen += 1
        if RandomMasks.seen == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"input_ids": torch.randint(0, 64, (6,)), "label_mask": (torch.rand(6) < 0.7).long()}


torch.manual_seed(0)
models = {"base": TinyLM(vocab=64, dim=24, depth=2, heads=2), "aug": TinyLM(vocab=64, dim=16, depth=2, heads=2)}
spec = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
        "edges": [{"source": "aug", "target": "base", "layers": [[-1, 0]]}]}
composed = cg.compile(spec, models=models)
for p in composed.new_parameters():  # away from the identity start, so every step's gradient is nonzero
    torch.nn.init.normal_(p, std=0.05)
config = TrainConfig(max_steps=7, batch_size=4, lr=1e-2, progress=False, shuffle=True, cpu=True, save_every=1,
                     keep_last=2, output_dir=out)
FineTuner(composed, RandomMasks(), config).train(resume_from="latest")
'''


def test_resume_after_sigkill_is_bit_exact_with_a_dataset_drawing_from_the_global_rng(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}

    def run(out, kill_after):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_after)], env=env,
                              capture_output=True, text=True, timeout=120)

    def finished(out):
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        return log, load_file(list_checkpoints(out)[-1] / NEW_PARAMS)

    assert run(tmp_path / "whole", 0).returncode == 0
    killed = run(tmp_path / "killed", 5 * 4 + 2)  # mid-epoch 2 (3 batches an epoch), as the loader reads ahead
    saved = [p.name for p in list_checkpoints(tmp_path / "killed")]
    assert killed.returncode == -signal.SIGKILL and saved[-1] in ("step-00000004", "step-00000005")
    assert run(tmp_path / "killed", 0).returncode == 0
    (want_log, want), (got_log, got) = finished(tmp_path / "whole"), finished(tmp_path / "killed")
    assert [r["step"] for r in got_log] == list(range(1, 8))
    assert [(r["loss"], r["grad_norm"]) for r in got_log] == [(r["loss"], r["grad_norm"]) for r in want_log]
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
