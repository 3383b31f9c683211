"""The key-value arithmetic example: data properties, greedy exact-match scoring, and a smoke run of train_base."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.kv_arithmetic.data import (EOS_ID, PAD_ID, SEP, VOCAB_SIZE, KVConfig, KVDataset, KVWorld, decode,
                                         encode, protocol_config)
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
    return KVWorld(protocol_config("scratchpad", n_keys=60, min_operands=3, max_operands=5, n_eval=300, seed=3))


def test_keys_and_values(world):
    assert len(set(world.keys)) == CFG.n_keys
    assert all(2 <= len(k) <= 6 and k.isalpha() and k.islower() for k in world.keys)
    assert sorted(world.values) == list(range(1, CFG.n_keys + 1))  # unique integers in [1, N_KV]


def test_splits_are_deterministic(world):
    again = KVWorld(CFG)
    assert (again.keys, again.values, again.compose_keys, again.eval_exprs) == \
        (world.keys, world.values, world.compose_keys, world.eval_exprs)
    other = KVWorld(KVConfig(**{**CFG.__dict__, "seed": 4}))
    assert other.keys != world.keys
    ds = KVDataset(world, "kv_substitution", "compose", size=50)
    assert all(torch.equal(ds[i]["input_ids"], KVDataset(again, "kv_substitution", "compose", size=50)[i]["input_ids"])
               for i in range(50))


def test_composition_data_uses_only_its_20_percent_of_keys(world):
    assert len(world.compose_keys) == round(0.2 * CFG.n_keys)
    allowed = {world.keys[i] for i in world.compose_keys}
    used = set()
    ds = KVDataset(world, "kv_substitution", "compose", size=2000)
    for i in range(len(ds)):
        prompt = world.example(*ds.expr_and_task(i))[0]
        operands, task = split_prompt(prompt)
        assert task == ">"
        used |= set(operands)
    assert used == allowed  # only those keys, and all of them
    train_keys = set()
    for i in range(2000):
        train_keys |= set(split_prompt(world.example(*KVDataset(world, "kv_substitution", "train", 2000).expr_and_task(i))[0])[0])
    assert len(train_keys) == CFG.n_keys  # m_A's data spans every key


def test_evaluation_expressions_never_appear_in_training(world):
    eval_prompts = {world.example(e, "kv_arithmetic")[0][:-1] for e in world.eval_exprs}
    assert len(eval_prompts) == CFG.n_eval
    for split in ("train", "compose"):
        ds = KVDataset(world, "kv_substitution", split, size=3000)
        seen = {decode(ds[i]["input_ids"].tolist()).split(">")[0] for i in range(len(ds))}
        assert not seen & eval_prompts


@pytest.mark.parametrize("task", ["kv_substitution", "numeric_arithmetic", "kv_arithmetic", "numeric_copy"])
def test_answers_match_python(world, task):
    ds_eval = KVDataset(world, task, "eval")
    for i in range(len(ds_eval)):
        item = ds_eval[i]
        ids, mask = item["input_ids"].tolist(), item["label_mask"].tolist()
        text = decode(ids)
        prompt = text[:text.index(">" if task.endswith(("substitution", "copy")) else "=") + 1]
        answer = text[len(prompt):]
        assert answer == reference_answer(world, prompt), text
        # The mask covers exactly the answer and its EOS.
        targets = [t for t, m in zip(ids, mask) if m]
        assert targets == encode(answer) + [EOS_ID]
        assert ids[len(prompt) + len(answer) + 1:] == [PAD_ID] * (world.max_len - len(prompt) - len(answer) - 1)


@pytest.mark.parametrize("task", ["numeric_arithmetic", "kv_arithmetic"])
def test_scratchpad_answers_copy_then_compute(pad_world, task):
    assert pad_world.cfg.ops == "+-"  # the scratchpad protocol's scale-down
    table = dict(zip(pad_world.keys, pad_world.values))
    for prompt, answer in (pad_world.example(e, task) for e in pad_world.eval_exprs):
        assert prompt.endswith("=") and answer.count(";") == 1
        copy, result = answer.split(";")
        # The scratchpad is the prompt with numbers for keys, i.e. the substitution (or copy) answer...
        assert copy == re.sub(r"[a-z]+", lambda m: str(table[m.group()]), prompt[:-1])
        assert set(copy) <= set("0123456789+-")
        # ...and the result is Python's value of it, which is also the direct protocol's whole answer.
        assert result == str(eval(copy))
        assert final_result(answer) == result


def test_scratchpad_leaves_the_other_tasks_and_splits_alone(pad_world):
    direct = KVWorld(KVConfig(**{**pad_world.cfg.__dict__, "protocol": "direct"}))
    assert direct.eval_exprs == pad_world.eval_exprs and direct.keys == pad_world.keys
    for e in pad_world.eval_exprs[:50]:
        for task in ("kv_substitution", "numeric_copy"):
            assert pad_world.example(e, task) == direct.example(e, task)
        assert pad_world.example(e, "kv_arithmetic")[1].split(";")[1] == direct.example(e, "kv_arithmetic")[1]
    longest = max(len(pad_world.tensors(*pad_world.example(e, "kv_arithmetic"))["input_ids"]) for e in pad_world.eval_exprs)
    assert longest == pad_world.max_len  # every item fits the models' positions


def test_numeric_reread_puts_the_loss_on_the_result_only(pad_world):
    ds = KVDataset(pad_world, "numeric_reread", "train", size=200)
    n_differ = 0
    for i in range(len(ds)):
        item = ds[i]
        ids, mask = item["input_ids"].tolist(), item["label_mask"].tolist()
        text = decode(ids)
        prompt, answer = text.split("=", 1)
        copy, result = answer.split(";")
        assert prompt.replace("+", "").replace("-", "").isdigit()  # numbers only: m_B never sees a key
        assert result == str(eval(copy))
        n_differ += prompt != copy
        # The loss covers ";<result>" and the EOS, not the given scratchpad.
        assert [t for t, m in zip(ids, mask) if m] == encode(";" + result) + [EOS_ID]
    assert n_differ > 190  # the prompt is (almost always) another expression: the result must be reread
    with pytest.raises(ValueError, match="only in the scratchpad protocol"):
        KVDataset(KVWorld(CFG), "numeric_reread", "train", size=1)[0]
    with pytest.raises(ValueError, match="unknown protocol 'chain'"):
        KVWorld(KVConfig(protocol="chain"))


def test_copy_reread_puts_the_loss_on_the_end_of_a_given_copy(pad_world):
    from examples.kv_arithmetic.train_base import task_mix
    lettered = KVWorld(replace(pad_world.cfg, reread_letters=0.5, reread_copy=0.5))
    ds = KVDataset(lettered, "copy_reread", "train", size=200)
    n_letters = 0
    for i in range(len(ds)):
        ids, mask = ds[i]["input_ids"].tolist(), ds[i]["label_mask"].tolist()
        prompt, copy = decode(ids).split(">", 1)
        assert re.fullmatch(r"\d+([-+]\d+)*", copy) and copy.count("+") + copy.count("-") == len(re.split("[-+]", prompt)) - 1
        assert [t for t, m in zip(ids, mask) if m] == [EOS_ID]   # only where the given copy ends
        n_letters += prompt.replace("+", "").replace("-", "").isalpha()
        assert not set(re.split("[-+]", prompt)) & set(lettered.keys)  # letters or numbers, never a key
    assert 60 < n_letters < 140
    mix = task_mix(lettered.cfg, "m_B")
    assert mix["copy_reread"] == mix["numeric_copy"] == 0.125 and sum(mix.values()) == 1.0
    assert task_mix(pad_world.cfg, "m_B") == {"numeric_arithmetic": 0.5, "numeric_reread": 0.25, "numeric_copy": 0.25}
    with pytest.raises(ValueError, match="only in the scratchpad protocol"):
        KVDataset(KVWorld(CFG), "copy_reread", "train", size=1)[0]
    with pytest.raises(ValueError, match="reread_copy is a share of items, between 0 and 1; got 2.0"):
        KVWorld(replace(pad_world.cfg, reread_copy=2.0))


def test_reread_letters_prompts_hold_no_key_and_leave_the_rest_alone(pad_world):
    lettered = KVWorld(replace(pad_world.cfg, reread_letters=0.5))
    plain, mixed = (KVDataset(w, "numeric_reread", "train", size=300) for w in (pad_world, lettered))
    n_letters = 0
    for i in range(len(mixed)):
        prompt, answer = decode(mixed[i]["input_ids"].tolist()).split("=", 1)
        assert answer == decode(plain[i]["input_ids"].tolist()).split("=", 1)[1]   # same scratchpad and result
        if prompt.replace("+", "").replace("-", "").isalpha():
            n_letters += 1
            assert not set(re.split("[-+]", prompt)) & set(lettered.keys)            # m_B never sees a key
    assert 110 < n_letters < 190                                                       # about half of them
    other = KVDataset(lettered, "kv_substitution", "train", size=50)
    same = KVDataset(pad_world, "kv_substitution", "train", size=50)
    assert all(torch.equal(other[i]["input_ids"], same[i]["input_ids"]) for i in range(50))


def test_augment_markers_change_only_the_marker_of_m_As_substitution_prompts(pad_world):
    both = KVWorld(replace(pad_world.cfg, augment_markers=">="))
    for split in ("train", "compose"):
        plain, mixed = (KVDataset(w, "kv_substitution", split, size=300) for w in (pad_world, both))
        markers = []
        for i in range(len(mixed)):
            a, b = (decode(d[i]["input_ids"].tolist()) for d in (plain, mixed))
            prompt_end = len(re.match(r"[a-z+\-]+", a).group())  # the marker follows the keys
            assert a[:prompt_end] == b[:prompt_end] and a[prompt_end + 1:] == b[prompt_end + 1:]  # same keys, values
            assert torch.equal(plain[i]["label_mask"], mixed[i]["label_mask"])
            markers.append(b[prompt_end])
        # m_A's training data ends in either marker, about half each; the composition's stays ">"
        assert (110 < markers.count("=") < 190) if split == "train" else set(markers) == {">"}
    other = KVDataset(both, "numeric_arithmetic", "train", size=50)
    same = KVDataset(pad_world, "numeric_arithmetic", "train", size=50)
    assert all(torch.equal(other[i]["input_ids"], same[i]["input_ids"]) for i in range(50))


def test_closed_copies_fixed_widths_and_m_As_end(pad_world):
    closed = KVWorld(replace(pad_world.cfg, close_copy=True))
    wide = KVWorld(replace(pad_world.cfg, fixed_width=True))
    no_end = KVWorld(replace(pad_world.cfg, augment_eos=False))
    for expr in pad_world.eval_exprs[:50]:
        for task in ("kv_substitution", "numeric_copy"):  # `>` answers: closed with the separator
            assert closed.example(expr, task)[1] == pad_world.example(expr, task)[1] + SEP
        for task in ("numeric_arithmetic", "kv_arithmetic"):
            assert closed.example(expr, task) == pad_world.example(expr, task)
        ref = pad_world.example(expr, "numeric_arithmetic")[1]
        padded = wide.example(expr, "numeric_arithmetic")[1]
        assert padded.split(SEP)[1] == ref.split(SEP)[1]                          # the result is not padded
        numbers = re.split("[-+]", padded.split(SEP)[0])
        assert all(len(n) == 2 for n in numbers) and [int(n) for n in numbers] == [int(n) for n in
                                                                                   re.split("[-+]", ref.split(SEP)[0])]
    for i in range(20):  # m_A's loss leaves out the EOS, and only that
        a, b = KVDataset(pad_world, "kv_substitution", "train", size=20)[i], KVDataset(no_end, "kv_substitution", "train", size=20)[i]
        end = int(a["label_mask"].nonzero().max())
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"][end] == EOS_ID
        assert not b["label_mask"][end] and torch.equal(a["label_mask"][:end], b["label_mask"][:end])
    kept = KVDataset(no_end, "kv_substitution", "compose", size=5)[0]  # the composition's data keeps it
    assert kept["label_mask"][int(kept["label_mask"].nonzero().max())] and kept["input_ids"][int(kept["label_mask"].nonzero().max())] == EOS_ID
    assert hit("10+22;", "10+22;") and not hit("10+22;", "10+23;") and not hit("10+22;5", "10+22;")


def test_eos_loss_off_drops_the_end_of_substitutions_only(pad_world):
    # --compose-no-eos: the same items; KV-substitution answers lose the loss on their EOS, nothing else changes.
    tasks = {"kv_substitution": 0.5, "kv_scratchpad": 0.25, "kv_arithmetic": 0.25}
    with_end, without = (KVDataset(pad_world, tasks, "compose", size=40, eos_loss=e) for e in (True, False))
    dropped = 0
    for i in range(40):
        a, b = with_end[i], without[i]
        end = int((a["input_ids"] == EOS_ID).nonzero())
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["label_mask"][:end], b["label_mask"][:end])
        if with_end.expr_and_task(i)[1] == "kv_substitution":
            assert a["label_mask"][end] and not b["label_mask"][end]
            dropped += 1
        else:
            assert torch.equal(a["label_mask"], b["label_mask"])
    assert 10 < dropped < 30


def test_replay_is_half_the_anchors_own_mix(pad_world):
    from examples.kv_arithmetic.compose import compose_tasks
    from examples.kv_arithmetic.train_base import task_mix
    cfg = replace(pad_world.cfg, reread_letters=0.5, reread_copy=0.5)
    assert compose_tasks("substitution", cfg) == {"kv_substitution": 1.0}
    replay = compose_tasks("substitution_replay", cfg)
    assert replay == {"kv_substitution": 0.5, **{t: w / 2 for t, w in task_mix(cfg, "m_B").items()}}
    assert abs(sum(replay.values()) - 1) < 1e-12 and "numeric_reread" in replay and "copy_reread" in replay
    assert compose_tasks("kv_mix_replay", cfg)["kv_arithmetic"] == 0.25


def test_kv_scratchpad_shows_the_separator_and_no_result(pad_world):
    pads, full = (KVDataset(pad_world, task, "compose", size=40) for task in ("kv_scratchpad", "kv_arithmetic"))
    for i in range(40):
        a, b = pads[i], full[i]
        assert torch.equal(a["input_ids"], b["input_ids"])
        text = decode(a["input_ids"].tolist())
        marked = [t for t, m in zip(a["input_ids"].tolist(), a["label_mask"].tolist()) if m]
        assert decode(marked) == text.split("=", 1)[1].split(SEP)[0] + SEP   # scratchpad and separator, no result
        assert a["label_mask"].sum() < b["label_mask"].sum()
    with pytest.raises(ValueError, match="only in the scratchpad protocol"):
        KVDataset(KVWorld(CFG), "kv_scratchpad", "compose", size=1)[0]


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
    proc = run("examples.kv_arithmetic.run_all", "--out", str(tmp_path), "--smoke", "--compositions",
               "replay_same_token,paper", "--json", str(table))
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
    assert len(outs) == len(fresh.links) == 2  # every block of the 2-block smoke m_A feeds m_B
    assert all(new[n].abs().sum() == 0 for n in outs)  # a fresh composition starts at the anchor...
    assert all(saved[n].abs().sum() > 0 for n in outs)  # ...the saved one was trained away from it
