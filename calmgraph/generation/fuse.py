"""Rewrites of a decode graph that cut the ops (on a GPU, kernel launches) of each eager decode step.

An eager step at LLM shapes is bound by launches, not arithmetic (benchmarks/README.md, "At LLM shapes"),
and torch.export leaves each model's code as it was written, op by op. Each rewrite here matches one traced
pattern and leaves any graph it does not match unchanged:

- `drop_noop_casts`: `x.to(dtype)` where x has that dtype already (an alias, no op). This one and the next
  judge dtypes as traced, so a step run under autocast is built without them (`fuse(traced_dtypes=False)`).
- `fuse_rms_norm`: transformers' RMSNorm, `x * rsqrt(mean(x ** 2, -1) + eps)` in float32 and cast back, is
  `aten.rms_norm` (one `_fused_rms_norm` kernel on CUDA), on the model's own dtype: the fused op computes in
  float32 and rounds once, as the decomposition does. Its weight is folded in only where no rounding lies
  between them (a float32 or float64 norm), so the result is the decomposition's up to the order of the sum.
- `read_positions`: transformers' `StaticCache` keeps a length counter per layer, set from `cache_position`
  at each step (`CachedEntry.forward`), and the model rebuilds its positions as `arange(n) + counter` for every
  layer. Those are `cache_position` (consecutive positions, as every caller passes), so the graph reads it,
  and the counters' writes go with their last reader.
- `roll_rotary`: rotary's `cat(-x2, x1) * sin` (neg, cat, mul) becomes `roll(x) * sin'`, with sin' = sin with
  its first half negated made once per model; exact (a sign moves from one factor to the other).

Two rewrites of the attention over a KV cache are applied to one step each (`decode.build_decoder`):
- `sdpa_gqa` (grouped queries read the KV cache as it is, through SDPA's `enable_gqa`), to the eager step:
  with a mask, CUDA's SDPA then runs its math kernel (in fp32) rather than cuDNN's, which made an eager step
  8-9% faster on an H200.
- `grouped_attention`, to the step torch.compile gets, whose attention is traced as math (`MathAttention`):
  SDPA's math casts the keys and values to fp32 and repeats them to every query head, two copies of the
  whole cache a layer a step; transformers' eager attention (matmuls in the model's dtype, softmax in fp32)
  on the query heads of each KV head, stacked as rows, reads the cache as it is. With
  `decode.FLEX_ATTENTION` (off: on an H100 the step ran 0.82-0.85x as fast), `flex_grouped_attention`
  instead: torch's flex_attention, which inductor makes one kernel where the math is a product, a softmax and
  a product.

`concat_projections` (generate's `concat_projections=True`) makes a compiled step's q/k/v and gate/up one
product each, over a copy of their weights: at 8 rows, where inductor leaves each product to cuBLAS, fewer
and larger calls. `scale_past_products` (with `decode.SCALE_PAST_PRODUCTS`, off until timed in a whole step)
applies each RMSNorm's per-row scale to the products that read it rather than to their input, so that a
compiled one-row step need not run the norm as a kernel of its own before them.
"""
from __future__ import annotations

import operator
from operator import attrgetter

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _cast_dtype(node) -> torch.dtype | None:
    """The dtype `to.dtype(x, dtype)` casts to (None for any other node or a cast with other options)."""
    if not _is(node, aten.to.dtype) or len(node.args) != 2 or node.kwargs:
        return None
    return node.args[1]


def _replace(old: fx.Node, new: fx.Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k not in new.meta})
    old.replace_all_uses_with(new)


def drop_noop_casts(graph: fx.Graph) -> int:
    """Casts to the dtype their input already has go; returns how many."""
    count = 0
    for node in list(graph.nodes):
        dtype, source = _cast_dtype(node), node.args[0] if node.args else None
        if dtype is not None and _val(source) is not None and _val(source).dtype == dtype:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            count += 1
    return count


def _rms_chain(node: fx.Node):
    """For `mul(x, rsqrt(add(mean(pow(x, 2), [-1], True), eps)))`: (x, eps), else None."""
    if not _is(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for x, r in (node.args, node.args[::-1]):
        if not (_is(r, aten.rsqrt.default) and _is(r.args[0], aten.add.Tensor)):
            continue
        mean, eps = r.args[0].args
        if not (_is(mean, aten.mean.dim) and isinstance(eps, float) and _is(mean.args[0], aten.pow.Tensor_Scalar)):
            continue
        dims, keep = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        square = mean.args[0]
        if square.args[0] is x and square.args[1] == 2 and keep and not mean.kwargs.get("dtype") \
                and _val(x) is not None and list(dims) in ([-1], [_val(x).ndim - 1]):
            return x, eps
    return None


def fuse_rms_norm(graph: fx.Graph, root: nn.Module) -> int:
    count = 0
    for node in list(graph.nodes):
        chain = _rms_chain(node)
        if chain is None:
            continue
        x, eps = chain
        if _val(x).dtype not in (torch.float32, torch.float64):
            continue  # the decomposition computes in x's dtype: fused, it would compute in float32
        out, source = node, x
        narrowed = [u for u in node.users if _cast_dtype(u) is not None]
        wide = _cast_dtype(x)
        if len(node.users) == 1 and narrowed and wide is not None and _val(x.args[0]) is not None \
                and _val(x.args[0]).dtype == narrowed[0].args[1]:
            out, source = narrowed[0], x.args[0]  # cast up, normalize, cast back: the fused op on the input
        with graph.inserting_before(out):
            fused = graph.call_function(aten.rms_norm.default, (source, [_val(x).shape[-1]], None, eps))
        fused.meta["val"] = _val(out)
        _replace(out, fused)
        _fold_weight(graph, root, fused)
        count += 1
    return count


def _fold_weight(graph: fx.Graph, root: nn.Module, norm: fx.Node) -> None:
    """rms_norm(x) * weight -> rms_norm(x, weight), when the norm rounds to nothing narrower than it computes in."""
    if len(norm.users) != 1 or _val(norm) is None or _val(norm).dtype not in (torch.float32, torch.float64):
        return
    (user,) = norm.users
    if not _is(user, aten.mul.Tensor) or len(user.args) != 2:
        return
    weight = user.args[0] if user.args[1] is norm else user.args[1]
    if not _is_norm_weight(weight, _val(norm), root):
        return
    norm.args = (*norm.args[:2], weight, norm.args[3])
    norm.meta["val"] = _val(user)
    user.replace_all_uses_with(norm)
    graph.erase_node(user)


def _is_norm_weight(weight, normed: torch.Tensor, root: nn.Module) -> bool:
    """Whether `weight` reads a 1-D attribute of `root` with the dtype and width of `normed`, a norm's output."""
    w = attrgetter(weight.target)(root) if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    return isinstance(w, torch.Tensor) and w.ndim == 1 and w.dtype == normed.dtype and w.shape[0] == normed.shape[-1]


def _counters(graph: fx.Graph, position: fx.Node) -> set[fx.Node]:
    """The buffers a step sets to its first position, `copy_(buffer, select(cache_position, 0, 0))`, and
    those writes (a graph may read the buffer through the write's result)."""
    found = set()
    for node in graph.nodes:
        if _is(node, aten.copy_.default):
            buffer, src = node.args[:2]
            if isinstance(buffer, fx.Node) and buffer.op == "get_attr" and _is(src, aten.select.int) \
                    and src.args == (position, 0, 0):
                found |= {buffer, node}
    return found


def read_positions(graph: fx.Graph, ids: fx.Node, position: fx.Node) -> int:
    """`arange(n) + counter` (n the new tokens, counter set to the first position) -> `cache_position`."""
    counters = _counters(graph, position)
    count = 0
    for node in list(graph.nodes):
        if not _is(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
            continue
        span, counter = node.args
        if _is(counter, aten.to.dtype_layout) and counter.kwargs.get("dtype") == torch.int64:
            counter = counter.args[0]
        new_tokens = _is(span, aten.arange.default) and len(span.args) == 1 \
            and _is(span.args[0], aten.sym_size.int) and span.args[0].args == (ids, 1) \
            and span.kwargs.get("dtype") in (None, torch.int64)
        if new_tokens and counter in counters and _val(counter) is not None and _val(counter).dtype == torch.int64:
            node.replace_all_uses_with(position)
            count += 1
    return count


def _rotate_half(cat: fx.Node):
    """For `cat([neg(slice(x, -1, h, end)), slice(x, -1, 0, h)], -1)`: (x, h), else None."""
    if not _is(cat, aten.cat.default) or len(cat.args) != 2 or cat.args[1] not in (-1, 3) or cat.kwargs:
        return None
    parts = cat.args[0]
    if len(parts) != 2 or not _is(parts[0], aten.neg.default):
        return None
    second, first = parts[0].args[0], parts[1]
    if not (_is(second, aten.slice.Tensor) and _is(first, aten.slice.Tensor)):
        return None
    x, val = first.args[0], _val(first.args[0])
    if val is None or second.args[0] is not x or val.ndim != 4:
        return None
    half = val.shape[-1] // 2
    if val.shape[-1] % 2 or first.args[1] not in (-1, 3) or first.args[2:] != (0, half) \
            or second.args[1] not in (-1, 3) or second.args[2] != half or len(second.args) != 4 \
            or second.args[3] < val.shape[-1] or first.kwargs or second.kwargs:
        return None
    return x, half


def roll_rotary(graph: fx.Graph) -> int:
    signed: dict[fx.Node, fx.Node] = {}   # sin (as multiplied) -> sin with its first half negated
    count = 0
    for node in list(graph.nodes):
        if not _is(node, aten.mul.Tensor) or len(node.args) != 2:
            continue
        cat, sin = node.args
        found = _rotate_half(cat)
        if found is None or not isinstance(sin, fx.Node) or _val(sin) is None or len(cat.users) != 1:
            continue
        x, half = found
        if _val(sin).ndim == 0 or _val(sin).shape[-1] != 2 * half:
            continue  # a sin broadcast along the last dim has no first half to negate
        if sin not in signed:
            signed[sin] = _negate_first_half(graph, sin, half)
        with graph.inserting_before(node):
            rolled = graph.call_function(aten.roll.default, (x, [half], [-1]))
        rolled.meta.update({k: v for k, v in cat.meta.items() if k != "val"}, val=_val(cat))
        node.args = (rolled, signed[sin])
        count += 1
    return count


def _negate_first_half(graph: fx.Graph, sin: fx.Node, half: int) -> fx.Node:
    with graph.inserting_before(sin.next):
        first = graph.call_function(aten.slice.Tensor, (sin, -1, 0, half))
        second = graph.call_function(aten.slice.Tensor, (sin, -1, half, 2 * half))
        negated = graph.call_function(aten.neg.default, (first,))
        out = graph.call_function(aten.cat.default, ([negated, second], -1))
    for node in (first, second, negated, out):
        node.meta.update({k: v for k, v in sin.meta.items() if k != "val"})
    out.meta["val"] = _val(sin)
    return out


def _repeated_kv(node) -> tuple[fx.Node, int] | None:
    """For transformers' `repeat_kv`, `reshape(expand(unsqueeze(x, 2), [b, h, n, s, d]), [b, h * n, s, d])`:
    (x, n), else None. Query head i then reads KV head i // n, as SDPA's `enable_gqa` pairs them."""
    if not (_is(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default) and len(node.args) == 2):
        return None
    expand = node.args[0]
    if not (_is(expand, aten.expand.default) and _is(expand.args[0], aten.unsqueeze.default)):
        return None
    x, dim = expand.args[0].args
    val = _val(x)
    if val is None or val.ndim != 4 or dim != 2 or len(expand.args[1]) != 5 or len(node.args[1]) != 4:
        return None
    b, h, n, s, d = expand.args[1]
    if [b, h, s, d] != list(val.shape) or list(node.args[1]) != [b, h * n, s, d]:
        return None
    return x, n


def sdpa_gqa(graph: fx.Graph) -> int:
    """`sdpa(q, repeat_kv(k), repeat_kv(v), ...)` -> `sdpa(q, k, v, ..., enable_gqa=True)`: the KV cache is
    read as it is, not copied to every query head first (two copies of the whole cache a layer a step)."""
    count = 0
    for node in list(graph.nodes):
        if not _is(node, aten.scaled_dot_product_attention.default) or len(node.args) < 3 \
                or node.kwargs.get("enable_gqa"):
            continue
        k, v = _repeated_kv(node.args[1]), _repeated_kv(node.args[2])
        if k is None or v is None or k[1] != v[1] or k[1] < 2:
            continue
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        count += 1
    return count


def grouped_attention(q, k, v, mask=None, scale=None):
    """`sdpa(q, repeat_kv(k), repeat_kv(v), mask, scale=scale)` as transformers' eager attention computes it
    (`eager_attention_forward`: products in q's dtype, softmax in fp32 or wider), with the n query heads of each KV head
    stacked as rows of one product, so that the cache is read as it is. q: (b, h, t, d); k, v: (b, h / n, s, d);
    mask: None, bool (True attends) or additive, broadcastable to (b, h, t, s), of one head or h. A row that
    attends to nothing is NaN (a decode step's query always attends to its own position)."""
    b, h, t, d = q.shape
    groups, length = k.shape[1], k.shape[2]
    n = h // groups
    rows = q.reshape(b, groups, n * t, d)
    scores = torch.matmul(rows, k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    scores = scores.view(b, groups, n, t, length)
    if mask is not None:
        if mask.ndim > 2:   # its heads (one, or h) as (groups, n), or one broadcast over both
            mask = mask.unflatten(-3, (groups, n)) if mask.shape[-3] == h else mask.unsqueeze(-3)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    probs = probs.to(q.dtype).view(b, groups, n * t, length)
    return torch.matmul(probs, v).view(b, h, t, d)


def flex_grouped_attention(q, k, v, mask=None, scale=None):
    """`grouped_attention` as torch's `flex_attention` (the KV heads read unrepeated, `enable_gqa`; the mask
    read by its score_mod), for torch.compile alone: on a GPU inductor makes it one kernel (its decoding
    kernel for few queries) where the math is several, a block (`decode.FLEX_ATTENTION`). Scores and the
    softmax in fp32, online; a row that attends to nothing is zeros. Eager, flex_attention is slow math."""
    from torch.nn.attention.flex_attention import flex_attention
    score_mod = None if mask is None else _score_mod(mask, q.shape[0], q.shape[2], k.shape[2])
    # one dtype, the cache's (under autocast a query may be in another): flex_attention takes no mix
    return flex_attention(q.to(k.dtype), k, v.to(k.dtype), score_mod=score_mod, scale=scale,
                          block_mask=_NOOP_BLOCK_MASKS.get(str(q.device)), enable_gqa=k.shape[1] != q.shape[1])


_NOOP_BLOCK_MASKS = {}   # str(device) -> BlockMask (`noop_block_mask`)


def noop_block_mask(device) -> None:
    """Make, outside any trace, the block mask `flex_grouped_attention` passes on `device`: flex_attention's
    own for no mask (one block as long as any sequence; the mask is the score_mod's). Left to flex_attention,
    each call in a compiled step builds it again: a few small kernels an attention (fills, a sort) where this
    one is a graph input, the same for every attention, at a fixed address (nothing copied into a CUDA graph)."""
    from torch.nn.attention.flex_attention import _create_empty_block_mask
    key = str(torch.device(device))
    if key in _NOOP_BLOCK_MASKS:
        return
    where = torch.empty(0, device=device)   # flex_attention's own default, made for this device
    made = _create_empty_block_mask(where, where)
    for tensor in made.as_tuple():
        if isinstance(tensor, torch.Tensor):
            torch._dynamo.mark_static_address(tensor)
    _NOOP_BLOCK_MASKS[key] = made


def _score_mod(mask, batch: int, queries: int, keys: int):
    """flex_attention's score_mod reading `mask` (bool: True attends; or additive), broadcastable to
    (batch, heads, queries, keys), of one head or every head."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    one_head = mask.shape[1] == 1
    mask = mask.expand(batch, mask.shape[1], queries, keys)

    def score_mod(score, b, h, i, j):
        m = mask[b, 0 if one_head else h, i, j]
        return torch.where(m, score, float("-inf")) if m.dtype == torch.bool else score + m
    return score_mod


def grouped_attention_of(graph: fx.Graph, attention=grouped_attention) -> int:
    """`sdpa(q, repeat_kv(k), repeat_kv(v)[, mask], scale=...)` -> `attention(q, k, v, mask, scale)`
    (`grouped_attention`, or `flex_grouped_attention`), where SDPA is called with no dropout, not causal and not
    already grouped; the count rewritten."""
    count = 0
    for node in list(graph.nodes):
        if not _is(node, aten.scaled_dot_product_attention.default) or len(node.args) < 3:
            continue
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        given = dict(zip(names, node.args[3:]), **node.kwargs)
        if given.get("dropout_p", 0.0) != 0.0 or given.get("is_causal") or given.get("enable_gqa") \
                or set(given) - set(names):
            continue
        k, v = _repeated_kv(node.args[1]), _repeated_kv(node.args[2])
        if k is None or v is None or k[1] != v[1] or k[1] < 2:
            continue
        with graph.inserting_before(node):
            grouped = graph.call_function(attention, (node.args[0], k[0], v[0], given.get("attn_mask"),
                                                      given.get("scale")))
        _replace(node, grouped)
        graph.erase_node(node)
        count += 1
    return count


def projection_groups(graph: fx.Graph, weight) -> list[list[fx.Node]]:
    """The bias-free linears that read one input with weights of one dtype, device and width (`weight(node)`
    is a linear's weight): a block's q/k/v, its gate/up. Groups of two or more, each in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _is(node, aten.linear.default) and len(node.args) == 2 and not node.kwargs \
                and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            groups.setdefault(node.args[0], []).append(node)
    return [linears for linears in groups.values() if len(linears) > 1
            and len({(w.dtype, w.device, w.shape[1]) for w in map(weight, linears)}) == 1]


def concat_projections(graph: fx.Graph, weight, concatenated) -> int:
    """Each of `projection_groups` as one linear over its weights concatenated, split after: fewer, larger
    products. `concatenated(weights)` returns the path of a tensor holding them (the caller keeps it); the
    count of groups rewritten."""
    groups = projection_groups(graph, weight)
    for linears in groups:
        weights = [weight(n) for n in linears]
        with graph.inserting_before(linears[0]):
            out = graph.call_function(aten.linear.default, (linears[0].args[0], graph.get_attr(concatenated(weights))))
            parts = graph.call_function(aten.split_with_sizes.default, (out, [w.shape[0] for w in weights], -1))
            for i, linear in enumerate(linears):
                _replace(linear, graph.call_function(operator.getitem, (parts, i)))
        for linear in linears:
            read = linear.args[1]
            graph.erase_node(linear)
            if not read.users:
                graph.erase_node(read)
    return len(groups)


def _norm_and_weight(norm: fx.Node, root: nn.Module):
    """For `aten.rms_norm(x, [d], w, eps)` (w folded in, or None) or its one reader `mul(g, norm)`, g a 1-D
    weight of x's dtype: (what the products read, the weight or None), else None."""
    x, shape, weight, _ = norm.args
    if _val(x) is None or list(shape) != [_val(x).shape[-1]]:
        return None
    out = norm
    if weight is None and len(norm.users) == 1:
        (user,) = norm.users
        if _is(user, aten.mul.Tensor) and len(user.args) == 2:
            weight, out = (user.args[0] if user.args[1] is norm else user.args[1]), user
    if weight is not None and not _is_norm_weight(weight, _val(x), root):
        return None
    return (out, weight) if _val(out) is not None else None


def scale_past_products(graph: fx.Graph, root: nn.Module) -> int:
    """`linear(rms_norm(x) * g, W, b)` -> `linear(x * g, W) * rsqrt(mean(x ** 2, -1) + eps) + b`, where every
    reader of the norm is a linear: a row's scale factors out of its products (exact up to rounding; in bf16
    as many roundings, in other places). The products then no longer wait for the norm's sum
    of squares, which a compiled one-row step computes beside them rather than as a kernel of its own
    (`decode.SCALE_PAST_PRODUCTS`). `root` holds the weights; the count of norms rewritten."""
    count = 0
    for norm in list(graph.nodes):
        if not _is(norm, aten.rms_norm.default) or len(norm.args) != 4 or norm.kwargs:
            continue
        found = _norm_and_weight(norm, root)
        if found is None:
            continue
        out, weight = found
        # its readers, through slices that keep every row (transformers' `hidden[:, -n:]` before the LM head)
        whole = [n for n in out.users if _is(n, aten.slice.Tensor) and _val(n) is not None
                 and _val(n).shape == _val(out).shape]
        linears = [n for r in out.users for n in (r.users if r in whole else (r,))]
        if not linears or not all(_is(n, aten.linear.default) and len(n.args) in (2, 3) and not n.kwargs
                                  and _val(n) is not None and (n.args[0] is out or n.args[0] in whole)
                                  for n in linears):
            continue
        x, eps = norm.args[0], norm.args[3]
        wide = torch.promote_types(_val(x).dtype, torch.float32)   # what the norm computes in
        with graph.inserting_before(out.next):
            xw = graph.call_function(aten.to.dtype, (x, wide)) if wide != _val(x).dtype else x
            square = graph.call_function(aten.pow.Tensor_Scalar, (xw, 2))
            mean = graph.call_function(aten.mean.dim, (square, [-1], True))
            scale = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (mean, eps)),))
            weighted = x if weight is None else graph.call_function(aten.mul.Tensor, (x, weight))
        for linear in linears:
            with graph.inserting_before(linear):
                product = graph.call_function(aten.linear.default, (weighted, linear.args[1]))
                scaled = graph.call_function(aten.mul.Tensor, (product, scale))
                if len(linear.args) == 3 and linear.args[2] is not None:    # the bias after the scale
                    scaled = graph.call_function(aten.add.Tensor, (scaled, linear.args[2]))
                if wide != _val(linear).dtype:
                    scaled = graph.call_function(aten.to.dtype, (scaled, _val(linear).dtype))
            _replace(linear, scaled)
            graph.erase_node(linear)
        for node in (*whole, *dict.fromkeys((out, norm))):   # out is norm where the weight is the norm's
            if not node.users:
                graph.erase_node(node)
        count += 1
    return count


def common_views(graph: fx.Graph) -> None:
    """One node per distinct view of a node (`unsqueeze(cos, 1)` is made again in every layer), so that what
    is derived from it once per model stays once per model."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if _is(node, aten.unsqueeze.default) and not node.kwargs:
            key = (node.target, node.args)
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
            else:
                seen[key] = node


def fuse(graph: fx.Graph, root: nn.Module, ids: fx.Node, position: fx.Node, traced_dtypes: bool = True
         ) -> dict[str, int]:
    """Every rewrite, in order (`root` holds the graph's attributes); how many times each applied. The caller
    removes what became dead. `traced_dtypes=False` (a step run under autocast) leaves out the two rewrites
    that read the traced dtypes: there a linear's output is narrower than traced, so a cast that is a no-op
    as traced is not (a Qwen3 or OLMo2 q/k norm casts a projection's output up), and the norm's input is no
    longer the float32 that the fused op may take for it."""
    counts = {"drop_noop_casts": drop_noop_casts(graph) if traced_dtypes else 0,
              "fuse_rms_norm": fuse_rms_norm(graph, root) if traced_dtypes else 0,
              "read_positions": read_positions(graph, ids, position)}
    common_views(graph)
    counts["roll_rotary"] = roll_rotary(graph)
    return counts


__all__ = ["fuse", "drop_noop_casts", "fuse_rms_norm", "read_positions", "roll_rotary", "sdpa_gqa",
           "grouped_attention", "flex_grouped_attention", "grouped_attention_of", "projection_groups",
           "concat_projections", "scale_past_products"]
