"""When generation stops: verdicts read a few steps late (`stopping.Verdicts`) give the tokens verdicts read at
once give, and run at most `lag` steps past the finish. The reference is the loop that reads each verdict at
once (lag 0, what `generate` does on CPU and for eager steps)."""
from __future__ import annotations

import pytest
import torch

import calmgraph.generation.generate as generate
from calmgraph.generation.stopping import FINISH_LAG, Verdicts, finish_lag
from tests.support import VOCAB
from tests.test_generate import hf, prompt, tokens

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def composition():
    return hf()


STEPS = 12


def _loop(verdicts, finished):
    """generate's use of `verdicts` over STEPS steps, `finished(step)` the rows' state: (the step whose `add`
    named the finish, None where `last` did; the finish)."""
    for step in range(STEPS):
        found = verdicts.add(step, finished(step))
        if found is not None:
            return step, found
    return None, verdicts.last()


@pytest.mark.parametrize("lag", [0, 1, 3, 10])
@pytest.mark.parametrize("finish", [0, 4, 9, None])
def test_a_late_verdict_names_the_step_every_row_finished_within_lag_steps(lag, finish):
    """Rows finish one by one; the finish is the first step at which all have. `add` returns it `lag` steps
    after it (on CPU no verdict lands early), or `last` when the loop ends first; never a wrong step."""
    step, found = _loop(Verdicts(lag), lambda step: torch.tensor([finish is not None and step >= finish - 2,
                                                                 finish is not None and step >= finish]))
    assert found == finish
    assert step == (finish + lag if finish is not None and finish + lag < STEPS else None)


def test_the_lag_is_for_compiled_steps_on_a_gpu():
    assert finish_lag(torch.device("cuda"), compiled=True) == FINISH_LAG > 0
    assert finish_lag(torch.device("cuda"), compiled=False) == 0   # eager: launch-bound, a step past costs the host
    assert finish_lag(torch.device("cpu"), compiled=True) == 0


def _generate(composed, ids, n, lag, monkeypatch, **kwargs):
    """generate with its verdicts read `lag` steps late (what a compiled step on a GPU does); the steps it ran."""
    ran = []
    next_step = generate.CachedSteps.next
    monkeypatch.setattr(generate, "finish_lag", lambda device, compiled: lag)
    monkeypatch.setattr(generate.CachedSteps, "next", lambda self, token, step: ran.append(step) or next_step(self, token, step))
    out = composed.generate(ids, n, **kwargs)
    monkeypatch.undo()
    return out, len(ran)


@pytest.mark.parametrize("lag", [1, 3, 40])
def test_late_verdicts_give_the_same_tokens_and_run_at_most_lag_steps_past_the_finish(composition, lag, monkeypatch):
    composed, _, name = composition
    ids, prompts, n = tokens((3, 6), 21), prompt(name), 20
    free = composed.generate(ids, n, **prompts)
    eos = sorted({int(free[0, 6 + 2]), int(free[1, 6 + 5]), int(free[2, 6 + 7])})  # each row ends by its step
    at_once, ran_at_once = _generate(composed, ids, n, 0, monkeypatch, eos_token_id=eos, pad_token_id=-1, **prompts)
    late, ran_late = _generate(composed, ids, n, lag, monkeypatch, eos_token_id=eos, pad_token_id=-1, **prompts)
    finish = at_once.shape[1] - 6 - 1              # the step at which every row had an eos
    assert finish <= 7 and ran_at_once == finish   # stopped early: steps 0..finish-1 made the next logits
    assert torch.equal(late, at_once)
    assert ran_late == min(finish + lag, n - 1)  # the verdict of the finish read lag steps late


def test_a_compiled_step_with_late_verdicts_gives_the_same_tokens(composition, monkeypatch):
    """The path a GPU takes: the step through torch.compile (dynamo's eager backend here), verdicts 3 steps late."""
    composed, _, name = composition
    ids, prompts, n = tokens((3, 6), 21), prompt(name), 20
    free = composed.generate(ids, n, **prompts)
    eos = sorted({int(free[0, 6 + 2]), int(free[1, 6 + 5]), int(free[2, 6 + 7])})
    at_once, _ = _generate(composed, ids, n, 0, monkeypatch, eos_token_id=eos, **prompts)
    late, ran = _generate(composed, ids, n, FINISH_LAG, monkeypatch, eos_token_id=eos,
                          compile_step={"backend": "eager"}, **prompts)
    assert torch.equal(late, at_once) and ran == at_once.shape[1] - 6 - 1 + FINISH_LAG


@pytest.mark.parametrize("lag", [1, 3])
def test_rows_that_never_finish_run_to_max_new_tokens_alike(composition, lag, monkeypatch):
    composed, _, name = composition
    ids, prompts, n = tokens((2, 6), 22), prompt(name, batch=2), 9
    free = composed.generate(ids, n, **prompts)
    eos = next(i for i in range(VOCAB) if not (free[:, 6:] == i).any())   # an id these rows never emit
    at_once, ran_at_once = _generate(composed, ids, n, 0, monkeypatch, eos_token_id=eos, **prompts)
    late, ran_late = _generate(composed, ids, n, lag, monkeypatch, eos_token_id=eos, **prompts)
    assert torch.equal(late, at_once) and torch.equal(at_once, free) and ran_late == ran_at_once == n - 1


def test_a_streamer_or_a_criterion_reads_each_verdict_at_once(composition, monkeypatch):
    """They see every step they are given, so no step runs past the finish for them."""
    composed, _, name = composition
    ids, prompts, n = tokens((3, 6), 21), prompt(name), 20
    free = composed.generate(ids, n, **prompts)
    eos = sorted({int(free[0, 6 + 2]), int(free[1, 6 + 5]), int(free[2, 6 + 7])})

    class Streamer:
        def __init__(self):
            self.puts = 0

        def put(self, value):
            self.puts += 1

        def end(self):
            pass

    streamer = Streamer()
    at_once, ran_at_once = _generate(composed, ids, n, 0, monkeypatch, eos_token_id=eos, **prompts)
    streamed, ran_streamed = _generate(composed, ids, n, 3, monkeypatch, eos_token_id=eos, streamer=streamer, **prompts)
    assert torch.equal(streamed, at_once) and ran_streamed == ran_at_once
    assert streamer.puts == 1 + at_once.shape[1] - 6          # the prompt, then each kept step: none dropped
    never = lambda seen, scores: torch.zeros(seen.shape[0], dtype=torch.bool)  # noqa: E731
    judged, ran_judged = _generate(composed, ids, n, 3, monkeypatch, eos_token_id=eos, stopping_criteria=never,
                                   **prompts)
    assert torch.equal(judged, at_once) and ran_judged == ran_at_once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("finish", [0, 5, None])
def test_on_a_gpu_verdicts_land_through_pinned_copies_and_events(finish):
    """On CUDA a verdict may be read as soon as its copy lands: between 0 and lag steps late."""
    def finished(step):
        torch.cuda._sleep(1_000_000)  # a step's work, queued before its verdict
        return torch.full((2,), finish is not None and step >= finish, device="cuda")
    step, found = _loop(Verdicts(FINISH_LAG), finished)
    assert found == finish
    assert step is None if finish is None else finish <= step <= finish + FINISH_LAG
