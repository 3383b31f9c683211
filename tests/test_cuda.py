"""On a GPU: every eager refusal of a bad call happens on the host, before any kernel reads the ids, so the
process's CUDA context stays usable (a device-side assert would end it). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch
from tests.test_calls import BAD_CALLS, PROMPT, SMALL_VOCAB, composition, ids  # noqa: F401  (the fixture)

import calmgraph as cg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda(value):
    return value.cuda() if isinstance(value, torch.Tensor) else value


def test_eager_refusals_leave_the_cuda_context_usable(composition):
    composed, _ = composition
    x = ids()
    with torch.no_grad():
        expected = composed(x, PROMPT)
        on_gpu = composed.to("cuda")
        for case, (make, name, _) in BAD_CALLS.items():
            args, kwargs = make()
            with pytest.raises(cg.InputError, match=name):
                on_gpu(*map(cuda, args), **{k: cuda(v) for k, v in kwargs.items()})
            torch.cuda.synchronize()  # a device-side assert would surface here, and every later call would fail
        got = on_gpu(x.cuda(), PROMPT.cuda())
        torch.cuda.synchronize()
    composed.to("cpu")
    assert torch.allclose(got.cpu(), expected, atol=1e-4)


def test_generate_refuses_out_of_vocabulary_ids_on_the_host(composition):
    composed, _ = composition
    on_gpu = composed.to("cuda")
    with pytest.raises(cg.InputError, match="vocabulary"):
        on_gpu.generate((ids() + SMALL_VOCAB).cuda(), 4, docs_input_ids=PROMPT.cuda())
    out = on_gpu.generate(ids().cuda(), 4, docs_input_ids=PROMPT.cuda())
    torch.cuda.synchronize()
    composed.to("cpu")
    assert out.shape == (2, 5 + 4) and int(out.max()) < SMALL_VOCAB
