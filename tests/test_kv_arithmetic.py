"""The key-value arithmetic example: what guards the table (splits, answers, what m_B may see, scoring) and
smoke runs of the pipeline."""
import json
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.kv_arithmetic.data import (EOS_ID, PAD_ID, SEP, VOCAB_SIZE, KVConfig, KVDataset, KVWorld, collate,
                                         decode, encode, protocol_config)
from examples.kv_arithmetic.evaluate import exact_match, final_result, greedy_complete, hit

ROOT = Path(__file__).resolve().parents[1]
CFG = KVConfig(n_keys=60, min_operands=3, max_operands=5, n_eval=300, seed=3)


@pytest.fixture(scope="module")
def world():
    return KVWorld(CFG)


def split_prompt(prompt: str) -> tuple[list[str], str]:
    """Operands of a prompt ("ab+cd*ef=") and its task char, by regex rather than the data code."""
    body, task = prompt[:-1], prompt[-1]
    return re.split(r"[+\-*]", body), task


def reference_answer(world, prompt: str) -> str:
    """What the answer must be, from Python's own parser and a fresh key -> value dict."""
    table = dict(zip(world.keys, world.values))
    operands, task = split_prompt(prompt)
    body = prompt[:-1]
    if operands[0].isalpha():  # each run of letters is one whole key
        body = re.sub(r"[a-z]+", lambda m: str(table[m.group()]), body)
    if task == ">":
        return body
    return (body + ";" if world.cfg.protocol == "scratchpad" else "") + str(eval(body))


@pytest.fixture(scope="module")
def pad_world():
    # The table's data options: m_B's rereads and half its copies have prompts it cannot read.
    return KVWorld(protocol_config("scratchpad", n_keys=60, min_operands=3, max_operands=5, n_eval=300, seed=3,
                                   reread_letters=0.5, reread_copy=0.5, augment_markers=">="))


def test_keys_values_and_splits(world):
    assert len(set(world.keys)) == CFG.n_keys
    assert all(2 <= len(k) <= 6 and k.isalpha() and k.islower() for k in world.keys)
    assert sorted(world.values) == list(range(1, CFG.n_keys + 1))  # unique integers in [1, N_KV]
    again = KVWorld(CFG)
    assert (again.keys, again.values, again.compose_keys, again.eval_exprs) == \
        (world.keys, world.values, world.compose_keys, world.eval_exprs)
    assert KVWorld(replace(CFG, seed=4)).keys != world.keys


def test_composition_data_uses_only_its_20_percent_of_keys(world):
    assert len(world.compose_keys) == round(0.2 * CFG.n_keys)
    allowed = {world.keys[i] for i in world.compose_keys}
    used = set()
    ds = KVDataset(world, "kv_substitution", "compose", size=2000)
    for i in range(len(ds)):
        operands, task = split_prompt(decode(ds[i]["input_ids"].tolist()).split(">")[0] + ">")
        assert task == ">"
        used |= set(operands)
    assert used == allowed  # only those keys, and all of them


@pytest.mark.parametrize("fixture", ["world", "pad_world"])
def test_evaluation_expressions_never_appear_in_training(fixture, request):
    w = request.getfixturevalue(fixture)
    eval_exprs = set(w.eval_exprs)
    assert len(eval_exprs) == w.cfg.n_eval
    tasks = {"kv_substitution": 1, "numeric_arithmetic": 1, "numeric_copy": 1}
    for split in ("train", "compose"):
        ds = KVDataset(w, tasks, split, size=3000)
        assert not {ds.expr_and_task(i)[0] for i in range(len(ds))} & eval_exprs


@pytest.mark.parametrize("task", ["kv_substitution", "numeric_arithmetic", "kv_arithmetic", "numeric_copy"])
@pytest.mark.parametrize("fixture", ["world", "pad_world"])
def test_answers_match_python(fixture, task, request):
    w = request.getfixturevalue(fixture)
    ds_eval = KVDataset(w, task, "eval")
    for i in range(len(ds_eval)):
        item = ds_eval[i]
        ids, mask = item["input_ids"].tolist(), item["label_mask"].tolist()
        text = decode(ids)
        prompt = text[:text.index(">" if task.endswith(("substitution", "copy")) else "=") + 1]
        answer = text[len(prompt):]
        assert answer == reference_answer(w, prompt), text
        targets = [t for t, m in zip(ids, mask) if m]  # the loss covers exactly the answer and its EOS
        assert targets == encode(answer) + [EOS_ID]
        assert ids[len(prompt) + len(answer) + 1:] == [PAD_ID] * (w.max_len - len(prompt) - len(answer) - 1)


def test_m_B_never_sees_a_key_and_learns_only_what_it_cannot_read_from_the_prompt(pad_world):
    from examples.kv_arithmetic.train_base import task_mix
    ds = KVDataset(pad_world, task_mix(pad_world.cfg, "m_B"), "train", size=600)
    seen = set()
    for i in range(len(ds)):
        ids, mask = ds[i]["input_ids"].tolist(), ds[i]["label_mask"].tolist()
        text, task = decode(ids), ds.expr_and_task(i)[1]
        seen.add(task)
        prompt, answer = re.split("([>=])", text, maxsplit=1)[0], text[len(re.split("[>=]", text)[0]) + 1:]
        assert not set(re.findall("[a-z]+", text)) & set(pad_world.keys), text  # letters, but never a key
        marked = decode([t for t, m in zip(ids, mask) if m] + [EOS_ID])
        if task == "numeric_reread":  # the given scratchpad has no loss: the result must be read from it
            copy, result = answer.split(SEP)
            assert marked == SEP + result and result == str(eval(copy))
        elif task == "copy_reread":  # the given copy has no loss, only its end (as many operands as the prompt)
            assert marked == "" and len(re.split("[-+]", answer)) == len(re.split("[-+]", prompt))
        else:
            assert marked == answer
    assert seen == {"numeric_arithmetic", "numeric_reread", "numeric_copy", "copy_reread"}
    with pytest.raises(ValueError, match="reread_copy is a share of items, between 0 and 1; got 2.0"):
        KVWorld(replace(pad_world.cfg, reread_copy=2.0))
    with pytest.raises(ValueError, match="only in the scratchpad protocol"):
        KVWorld(replace(pad_world.cfg, protocol="direct"))


def test_broad_anchor_mix_binds_names_that_are_no_keys_and_answers_right():
    from examples.kv_arithmetic.train_base import task_mix
    w = KVWorld(protocol_config("direct", ops="+-", n_keys=60, n_eval=100, seed=3, anchor_mix="broad",
                                anchor_operands=(2, 4)))
    ds = KVDataset(w, task_mix(w.cfg, "m_B"), "train", size=800)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[1] <= w.max_len and (batch["input_ids"][:, -1] != PAD_ID).any()
    tasks, starts = set(), set()
    for i in range(len(ds)):
        ids, mask = ds[i]["input_ids"].tolist(), ds[i]["label_mask"].tolist()
        text, task = decode(ids), ds.expr_and_task(i)[1]
        tasks.add(task)
        *bindings, question = text.split(";")
        table = dict(b.split(":") for b in bindings)
        assert not (set(table) | set(re.findall("[a-z]+", question))) & set(w.keys), text  # never a key
        expr, answer = re.split("[>=]", question)
        assert 2 <= len(re.split("[-+]", expr)) <= 4
        numbers = re.sub("[a-z]+", lambda m: table[m.group()], expr)  # every name is bound
        assert answer == (numbers if ">" in question else str(eval(numbers))), text
        assert decode([t for t, m in zip(ids, mask) if m]) == answer  # the loss on the answer (and EOS) only
        starts.add(len(text) - len(question))
    assert tasks == {"numeric_arithmetic", "numeric_copy", "bound_arithmetic", "bound_copy"}
    assert 0 in starts and len(starts) > 10  # expressions at varied positions, the test's included
    with pytest.raises(ValueError, match="unknown anchor_mix 'wide'"):
        KVWorld(replace(w.cfg, anchor_mix="wide"))


def test_bound_accuracy_scores_names_bound_in_the_prompt():
    from examples.kv_arithmetic.evaluate import bound_accuracy
    w = KVWorld(protocol_config("direct", ops="+-", n_keys=60, n_eval=100, seed=3, anchor_mix="broad",
                                anchor_operands=(2, 4)))

    def reader(offset=0):  # reads each name's number from the prompt and computes in Python
        def model(ids):
            logits = torch.full((*ids.shape, VOCAB_SIZE), -1e9)
            for b, row in enumerate(ids.tolist()):
                text = decode(row)
                *bindings, question = text[:text.index("=") + 1].split(";")
                table = dict(x.split(":") for x in bindings)
                numbers = re.sub("[a-z]+", lambda m: str(int(table[m.group()])), question[:-1])
                answer = str(eval(numbers) + offset) + "\0"
                nxt = answer[len(text) - text.index("=") - 1]
                logits[b, -1, EOS_ID if nxt == "\0" else encode(nxt)[0]] = 0.0
            return logits
        return model

    assert bound_accuracy(reader(), w, "cpu", n=200) == 100.0
    assert bound_accuracy(reader(offset=1), w, "cpu", n=200) == 0.0
    from examples.kv_arithmetic.train_base import task_mix
    ds = KVDataset(w, task_mix(w.cfg, "m_B"), "train", size=800)
    trained = {decode(ds[i]["input_ids"].tolist()).split("=")[0] for i in range(len(ds))}
    scored = {w.bound(random.Random(f"kv-bound-eval/{w.cfg.seed}/{i}"), "bound_arithmetic")[0][:-1] for i in range(200)}
    assert not scored & trained                                   # drawn apart from m_B's training items


def test_validation_keys_are_the_compositions_and_never_its_training_data():
    w = KVWorld(replace(CFG, val_key_frac=0.25))
    assert set(w.val_keys) | set(w.fit_keys) == set(w.compose_keys) and not set(w.val_keys) & set(w.fit_keys)
    assert len(w.val_keys) == 3 and KVWorld(CFG).eval_exprs == w.eval_exprs  # the held-out set stays
    fit = KVDataset(w, "kv_substitution", "compose", size=1000)
    val = KVDataset(w, "kv_arithmetic", "val", size=300)
    assert all(set(fit.expr_and_task(i)[0][0]) <= set(w.fit_keys) for i in range(len(fit)))
    for i in range(len(val)):
        keys = set(val.expr_and_task(i)[0][0])
        assert keys <= set(w.compose_keys) and keys & set(w.val_keys)
        assert not w.is_held_out(val.expr_and_task(i)[0])
    with pytest.raises(ValueError, match="val split needs validation keys"):
        KVDataset(KVWorld(CFG), "kv_arithmetic", "val", size=10)


def test_eos_loss_off_drops_the_end_of_substitutions_only(pad_world):
    tasks = {"kv_substitution": 0.5, "numeric_arithmetic": 0.5}
    with_end, without = (KVDataset(pad_world, tasks, "compose", size=40, eos_loss=e) for e in (True, False))
    for i in range(40):
        a, b = with_end[i], without[i]
        end = int((a["input_ids"] == EOS_ID).nonzero())
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["label_mask"][:end], b["label_mask"][:end])
        assert a["label_mask"][end] and b["label_mask"][end] == (with_end.expr_and_task(i)[1] != "kv_substitution")


def test_expression_writes_cover_the_expression_and_nothing_after(pad_world):
    """write_mask of the `writes: masked` compositions: 1 on every character before the task marker, 0 on
    the marker, the answer and the padding; checked against the decoded text."""
    from examples.kv_arithmetic.data import decode, expression_writes
    ds = KVDataset(pad_world, {"kv_substitution": 0.5, "numeric_arithmetic": 0.5}, "compose", size=30, write_mask=True)
    for i in range(30):
        item = ds[i]
        text = decode(item["input_ids"].tolist())
        marker = min(text.index(c) for c in ">=" if c in text)
        assert item["write_mask"].tolist() == [1] * marker + [0] * (len(item["input_ids"]) - marker), text
        assert torch.equal(expression_writes(item["input_ids"][None])[0], item["write_mask"])
    assert "write_mask" not in KVDataset(pad_world, "kv_substitution", "compose", size=1)[0]


def test_a_masked_composition_is_scored_with_expression_writes(pad_world):
    """callable_model passes write_mask = expression_writes(ids), so scoring calls it like a base model."""
    from examples.kv_arithmetic.compose import callable_model, compose
    from examples.kv_arithmetic.data import encode, expression_writes
    from examples.handwritten_gpt.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    m_A, m_B = (GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=40, n_layer=2, n_head=2, n_embd=32)) for _ in "ab")
    composed = compose(m_A, m_B, "every1", writes="masked")
    with torch.no_grad():
        for p in composed.new_parameters():
            p.normal_(0, 0.3)
    ids = torch.tensor([encode("ab+cd>12+3"), encode("12+30=4" + "2" * 3)])
    with torch.no_grad():
        got = callable_model(composed)(ids)
        torch.testing.assert_close(got, composed(input_ids=ids, write_mask=expression_writes(ids)))
        assert not torch.allclose(got, composed(input_ids=ids, write_mask=torch.zeros_like(ids)))  # it writes
    assert callable_model(compose(m_A, m_B, "every1")).__class__.__name__ == "ComposedModel"


def test_final_result_scoring():
    assert final_result("10+22-24;8") == "8" and final_result("-12") == "-12" and final_result("1;2;3") == "3"


def test_multiplication_binds_tighter(world):
    # An operator string with * in the middle: 2 + 3 * 4 - 5 = 9, not 15.
    from examples.kv_arithmetic.data import solve
    assert solve([2, 3, 4, 5], ["+", "*", "-"]) == 9
    assert solve([7, 3, 2], ["-", "-"]) == 2


def _oracle(world, rewrite=lambda ref: ref):
    """A 'model' that knows every answer (`rewrite` of it): its logits put all mass on the right next character."""
    def model(ids):
        logits = torch.full((*ids.shape, VOCAB_SIZE), -1e9)
        for b, row in enumerate(ids.tolist()):
            text = decode(row)
            cut = max(text.find(">"), text.find("=")) + 1
            answer = rewrite(reference_answer(world, text[:cut])) + "\0"
            nxt = answer[len(text) - cut]
            logits[b, -1, EOS_ID if nxt == "\0" else encode(nxt)[0]] = 0.0
        return logits
    return model


def test_exact_match_with_greedy_decoding(world, pad_world):
    assert exact_match(_oracle(world), world, "kv_arithmetic", "cpu", batch_size=64) == 100.0
    assert exact_match(_oracle(pad_world), pad_world, "kv_arithmetic", "cpu", part="full") == 100.0
    # A model that skips the scratchpad and writes only the result: right by the final result, wrong in full.
    skip = _oracle(pad_world, lambda ref: ref.split(";")[1])
    assert exact_match(skip, pad_world, "numeric_arithmetic", "cpu") == 100.0
    assert exact_match(skip, pad_world, "numeric_arithmetic", "cpu", part="full") == 0.0
    always_eos = lambda ids: torch.nn.functional.one_hot(torch.full(ids.shape, EOS_ID), VOCAB_SIZE).float()
    assert exact_match(always_eos, world, "numeric_arithmetic", "cpu") == 0.0
    prompts = ["ab+cd=", "7*8>"]
    assert greedy_complete(always_eos, prompts, 5, "cpu") == ["", ""]


def test_chain_baseline_feeds_m_As_substitution_to_m_B(pad_world):
    from examples.kv_arithmetic.evaluate import chain_answers
    oracle = _oracle(pad_world)
    got = chain_answers(oracle, oracle, pad_world, "cpu")
    assert [a for _, _, a in got] == [ref for _, ref, _ in got]  # right values in, right results out
    assert got[0][0].endswith("=") and got[0][0][0].isalpha()
    # An m_A that gets the first value wrong (another first digit): every result is wrong, as m_B computes it.
    wrong = _oracle(pad_world, lambda ref: ref if SEP in ref else ("2" if ref[0] == "1" else "1") + ref[1:])
    assert not any(hit(ref, a) for _, ref, a in chain_answers(wrong, oracle, pad_world, "cpu"))


def test_train_base_smoke(tmp_path):
    # A subprocess: one CPU thread (faster for tiny models) and a fresh Accelerate state.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "examples.kv_arithmetic.train_base", "--out", str(tmp_path), "--smoke",
                           "--protocol", "direct"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "base_eval.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["data"]["protocol"] == "direct"
    for name in ("m_A", "m_B"):
        assert set(report[name]) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic"}
        assert all(0.0 <= v <= 100.0 for v in report[name].values())

    from examples.kv_arithmetic.train_base import load_base
    model = load_base(tmp_path, "m_B")
    assert model.lm_head.weight is model.wte.weight  # tying survives the round trip
    saved = load_file(str(tmp_path / "m_B.safetensors"))
    assert saved and all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert model.cfg.n_embd == cfg["models"]["m_B"]["n_embd"]
    assert model(torch.tensor([encode("12+3=")])).shape == (1, 5, VOCAB_SIZE)


def test_run_all_and_compose_smoke(tmp_path):
    # The whole pipeline (both base models, the chain baseline, two compositions, the tables), then
    # compose.py alone on its output.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                                       text=True, timeout=300)
    table = tmp_path / "kv.json"
    proc = run("examples.kv_arithmetic.run_all", "--preset", "same_token", "--out", str(tmp_path), "--smoke",
               "--compositions", "replay_same_token,paper", "--json", str(table))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(table.read_text())
    assert [(t["protocol"], t["composition"]) for t in report["tables"]] == \
        [("replay_same_token", "replay_same_token"), ("paper", "paper")]
    paper = report["tables"][1]
    assert report["protocol"] == "paper" and report["calm"] == paper["calm"] and report["m_B"] == paper["m_B"]
    assert not any("composition data" in d for d in paper["departures"])
    assert any("composition data" in d for d in report["tables"][0]["departures"])
    assert 0.0 <= report["chain_baseline"]["kv_arithmetic"] <= 100.0
    for name in ("m_A", "m_B", "paper", "replay_same_token"):
        assert set(report["full_answer"][name]) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic"}
        assert all(0.0 <= v <= 100.0 for v in report["full_answer"][name].values())
        assert report["runs"][name]["steps"] == 4
    sample = report["details"]["m_B"]["kv_arithmetic"]["samples"][0]
    assert sample[0].endswith("=") and ";" in sample[1]  # (prompt, scratchpad;result reference, answer)
    assert report["device"] == "cpu" and report["command"].endswith("replay_same_token,paper --json " + str(table))

    proc = run("examples.kv_arithmetic.compose", "--base", str(tmp_path), "--smoke", "--data", "substitution")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import calmgraph as cg
    from examples.kv_arithmetic.compose import spec
    from examples.kv_arithmetic.train_base import load_base
    fresh = cg.compile(spec(), models={"m_A": load_base(tmp_path, "m_A"), "m_B": load_base(tmp_path, "m_B")})
    saved = load_file(str(tmp_path / "calm_substitution.safetensors"))
    new = dict(fresh.named_new_parameters())
    assert set(saved) == set(new)  # the cross-attention and nothing of the base models
    outs = [n for n in new if n.endswith("to_out.weight")]
    assert len(outs) == len(fresh.links) == 4  # every block of the 4-block m_A feeds m_B
    assert all(new[n].abs().sum() == 0 for n in outs)  # a fresh composition starts at the anchor...
    assert all(saved[n].abs().sum() > 0 for n in outs)  # ...the saved one was trained away from it


def test_run_all_input_side_chooses_on_validation_keys_smoke(tmp_path):
    # The default preset: direct answers, m_B's broad mix, candidates chosen on the validation keys.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    table = tmp_path / "kv.json"
    proc = subprocess.run([sys.executable, "-m", "examples.kv_arithmetic.run_all", "--out", str(tmp_path), "--smoke",
                           "--compositions", "input_mid_short,input_deep", "--json", str(table)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(table.read_text())
    assert report["data"]["protocol"] == "direct" and report["data"]["anchor_mix"] == "broad"
    assert report["data"]["val_key_frac"] == 0.2 and report["models"]["m_B"]["n_layer"] == 8
    tables = report["tables"]
    assert [t["composition"] for t in tables] == ["input_mid_short", "input_deep"]
    assert all(t["protocol"] == "paper" and set(t["validation"]) == {"kv_substitution", "kv_arithmetic"} for t in tables)
    best = max(tables, key=lambda t: (t["validation"]["kv_arithmetic"], t["validation"]["kv_substitution"]))
    assert [t["selected"] for t in tables].count(True) == 1 and best["selected"]
    assert report["calm"] == best["calm"] and report["protocol"] == "paper"
    assert all(0 <= report["details"][n]["bound_arithmetic"] <= 100 for n in ("m_B", "input_mid_short", "input_deep"))
    assert "bound_arithmetic" not in report["details"]["m_A"]
    assert any("validate" in d for d in best["departures"]) and report["versions"]["torch"] == torch.__version__
