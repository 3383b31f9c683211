"""CALM-pytorch's own `CALM` on copies of the same models: the seed the fused graph replaces."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ._internals import ComposedModel, ModelError, model_device, writes_masked

NOT_INSTALLED = "CALM-pytorch is not installed (pip install \"calmgraph[bench]\")"


def calm_pytorch_installed() -> bool:
    try:
        import CALM_pytorch  # noqa: F401
        import x_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def calm_pytorch_unfit(composed: ComposedModel, models: dict[str, nn.Module]) -> str | None:
    """Why CALM-pytorch cannot run this composition (not installed, or a composition it cannot express);
    None when it can."""
    if not calm_pytorch_installed():
        return NOT_INSTALLED
    from x_transformers import TransformerWrapper
    spec = composed.spec
    not_xt = [n for n, m in models.items() if not isinstance(m, TransformerWrapper)]
    if not_xt or any(e.target != spec.anchor.name for e in spec.edges) or len(spec.edges) != len(spec.augments):
        return ("CALM-pytorch takes x-transformers TransformerWrapper models with one edge from each "
                f"augment to the anchor (not x-transformers: {not_xt})")
    if writes_masked(spec):
        return "CALM-pytorch's cross-attention writes at every position; this composition has writes: masked"
    return None


def calm_pytorch_composition(composed: ComposedModel, models: dict[str, nn.Module]):
    """CALM-pytorch's `CALM` on copies of the models, wired by the spec's layer pairs, with cross-attention
    heads sized like the fused model's (everything else its defaults). Returns None when CALM-pytorch is not
    installed; raises ModelError for compositions it cannot express."""
    if not calm_pytorch_installed():
        return None
    unfit = calm_pytorch_unfit(composed, models)
    if unfit:
        raise ModelError(unfit)
    from CALM_pytorch import CALM, AugmentParams
    spec = composed.spec
    link = composed.links[0]
    device, dtype = model_device(models[spec.anchor.name]), next(models[spec.anchor.name].parameters()).dtype
    cpu = {n: copy.deepcopy(m).to("cpu", torch.float32) for n, m in models.items()}  # CALM builds on the CPU
    augments = [AugmentParams(model=cpu[e.source], mask_kwarg="mask",
                              connections=tuple((l.source_layer + 1, l.target_layer + 1)  # its indices are 1-based
                                                for l in composed.links if l.edge == i))
                for i, e in enumerate(spec.edges)]
    calm = CALM(cpu[spec.anchor.name], augments, attn_kwargs=dict(linear_project_context=True, pre_rmsnorm=True,
                                                                 flash=True, heads=link.heads, dim_head=link.dim_head))
    return calm.to(device, dtype)


def calm_pytorch_leak(calm) -> list:
    """The lists CALM-pytorch's anchor recorder hooks append every block output to, never emptied."""
    from CALM_pytorch.CALM import Recorder
    return [h.output for m in calm.anchor_llm.modules() for h in m._forward_hooks.values() if isinstance(h, Recorder)]


def calm_pytorch_call(calm, spec, inputs: dict[str, torch.Tensor], train: bool):
    prompts = tuple(inputs[f"{a.name}_input_ids"] if a.is_prompt else inputs["input_ids"] for a in spec.augments)
    masks = tuple(inputs[f"{a.name}_mask"].bool() if a.is_prompt else torch.ones_like(inputs["input_ids"]).bool()
                  for a in spec.augments)
    seq = inputs["input_ids"] if train else inputs["input_ids"][:, :-1]  # its loss drops the last token itself
    out = calm(seq, prompt=prompts, prompt_mask=masks, return_loss=train)
    for leak in calm_pytorch_leak(calm):  # keep its memory leak out of long benchmarks (reported apart)
        leak.clear()
    return out


def calm_leak_mb(calm, spec, inputs) -> float:
    """Memory CALM-pytorch's recorder hooks keep after one forward (it never frees them)."""
    with torch.no_grad():
        calm(inputs["input_ids"][:, :-1], prompt=tuple(inputs[f"{a.name}_input_ids"] if a.is_prompt
                                                         else inputs["input_ids"][:, :-1] for a in spec.augments),
             return_loss=False)
    leaks = calm_pytorch_leak(calm)
    kept = sum(t.numel() * t.element_size() for leak in leaks for t in leak)
    for leak in leaks:
        leak.clear()
    return kept / 2**20
