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


def test_float32_models_compiled_on_the_cpu_run_under_cuda_autocast():
    """transformers' rotary embeddings compute their angles with autocast off, a region a trace on the CPU
    without autocast does not hold (`frontends.exported_module`). With the gates at zero, the anchor's logits
    under CUDA autocast are the anchor's own run eagerly there (on the CPU, tests/test_compile.py)."""
    from tests.test_compile import _gates_closed
    composed, anchor = _gates_closed("llama", torch.float32)
    composed, anchor = composed.to("cuda"), anchor.to("cuda")
    ids = torch.randint(3, 96, (2, 60), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused, eager = composed(ids), anchor(ids).logits
    torch.testing.assert_close(fused.float(), eager.float(), atol=2 ** -7 * eager.abs().max().item(), rtol=0)
