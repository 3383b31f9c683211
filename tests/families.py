"""Small models of every causal-LM family transformers can build from a config here, found programmatically.

`causal_lm_families()` lists transformers' causal-LM architectures; `small_model(family)` builds one with
random weights and a small config (hidden 32, 2 layers, 4 heads, vocab 96), or raises `Unbuildable`
saying why (multimodal wrappers, encoder-decoder halves, configs that cannot be shrunk, missing kernels).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

VOCAB = 96
DIM, DEPTH, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 4, 2, 8

# Every config attribute that sets a size, and its small value. Only keys a config already has are set.
SMALL = {
    "hidden_size": DIM, "n_embd": DIM, "d_model": DIM, "embed_dim": DIM, "dim": DIM, "model_dim": DIM,
    "num_hidden_layers": DEPTH, "n_layer": DEPTH, "num_layers": DEPTH, "n_layers": DEPTH, "decoder_layers": DEPTH,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS, "decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS, "num_kv_heads": KV_HEADS,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_size": HEAD_DIM, "head_size": HEAD_DIM,
    "intermediate_size": 2 * DIM, "n_inner": 2 * DIM, "ffn_dim": 2 * DIM, "decoder_ffn_dim": 2 * DIM,
    "ffn_hidden_size": 2 * DIM, "d_ff": 2 * DIM, "inner_hidden_size": 2 * DIM, "mlp_dim": 2 * DIM,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_seq_len": 64,
    "seq_length": 64, "block_size": 64,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_k": 2, "top_k": 2, "moe_topk": 2, "moe_intermediate_size": DIM, "shared_expert_intermediate_size": DIM,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    # multi-head latent attention
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM,
    "v_head_dim": HEAD_DIM, "qk_head_dim": 2 * HEAD_DIM,
    # linear attention / state space
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_n_groups": 1, "time_step_rank": 4, "sliding_window": 32,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
}

# Per family, values the generic ones leave meaningless or that calmgraph refuses.
FAMILY_OVERRIDES = {
    # dory keeps its default section sizes (8 input, 8 output layers) whatever the depth, so every block of
    # a 2-layer model ran twice: 1 input block, 1 looped block (run twice a forward), 1 output block
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
             "n_recurrent_loops": 2},
    # RWKV divides some weights in place in its first eval forward unless rescale_every is 0; compile refuses
    # a forward that writes its weights (tests/test_trace_checks.py), and says to set this
    "rwkv": {"rescale_every": 0},
}


class Unbuildable(Exception):
    """Why a family is left out of the sweep: it cannot be built or run from a small config here."""


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _hf():
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    return transformers


def small_config(family: str, **overrides):
    t = _hf()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]
    if "ConditionalGeneration" in arch:
        raise Unbuildable(f"{arch} is a multimodal wrapper (needs more than token ids); compose its text model")
    try:
        default = t.CONFIG_MAPPING[family]()
    except Exception as e:  # noqa: BLE001 - the reason is the record
        raise Unbuildable(f"default config does not build: {type(e).__name__}: {str(e)[:120]}") from None
    if getattr(default, "is_encoder_decoder", False) and not hasattr(default, "num_hidden_layers"):
        raise Unbuildable("encoder-decoder config")
    if any(isinstance(getattr(default, k, None), t.PreTrainedConfig) for k in ("text_config", "decoder")):
        raise Unbuildable("config wraps sub-configs (multimodal or encoder-decoder); compose its text model")
    small = {**SMALL, **FAMILY_OVERRIDES.get(family, {}), **overrides}
    try:  # only keys the config has, and may be set (not derived)
        kwargs = {k: v for k, v in small.items()
                  if hasattr(default, k) and not isinstance(getattr(type(default), k, None), property)}
    except Exception as e:  # noqa: BLE001 - e.g. per-layer configs that refuse global reads
        raise Unbuildable(f"config cannot be shrunk generically: {type(e).__name__}: {str(e)[:120]}") from None
    depth = kwargs.get("num_hidden_layers", kwargs.get("n_layer", DEPTH))
    n_default = next((getattr(default, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                      if isinstance(getattr(default, k, None), int)), None)
    for key, value in default.to_dict().items():  # per-layer lists: keep the first `depth` entries
        if isinstance(value, list) and n_default and len(value) == n_default and key not in kwargs:
            kwargs[key] = value[:depth]
    try:
        cfg = type(default)(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise Unbuildable(f"small config rejected: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    for k in ("use_cache", "tie_word_embeddings"):
        if hasattr(cfg, k):
            setattr(cfg, k, False)
    if hasattr(cfg, "is_decoder"):  # BERT-like families: the causal-LM head needs the decoder flag
        cfg.is_decoder = True
    return cfg


def small_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A small `<Family>ForCausalLM` in eval mode (sdpa attention, or eager where sdpa is not supported)."""
    t = _hf()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = getattr(t, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family], None)
    if cls is None:
        raise Unbuildable(f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]} is not importable here")
    reasons = []
    # some attention kinds (latent attention, ...) want as many key-value heads as query heads
    for attention, kv in (("sdpa", KV_HEADS), ("eager", KV_HEADS), ("sdpa", HEADS), ("eager", HEADS)):
        kv_keys = {k: kv for k in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")}
        cfg = small_config(family, **{**kv_keys, **overrides})
        cfg._attn_implementation = attention
        torch.manual_seed(seed)
        try:
            model = cls(cfg).eval()
            with torch.no_grad():
                out = model(torch.zeros(1, 5, dtype=torch.long), use_cache=False)
            break
        except Exception as e:  # noqa: BLE001 - the reason is the record
            text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            reasons.append(f"{type(e).__name__}: {text}")
    else:
        raise Unbuildable(f"does not build or run from a small config: {reasons[-1]}")
    if getattr(out, "logits", None) is None or out.logits.shape[-1] != cfg.vocab_size:
        raise Unbuildable("forward(input_ids) returns no (batch, seq, vocab) logits")
    return model


# -- composing a family with a partner ---------------------------------------------------------------------
def partner(seed: int = 1) -> nn.Module:
    """The other side of each composition: a hand-written decoder of another width and depth."""
    from calmgraph.demo.models import TinyLM
    torch.manual_seed(seed)
    return TinyLM(vocab=VOCAB, dim=48, depth=3, heads=4).eval()


def family_spec() -> dict:
    return {"anchor": {"name": "base"}, "augments": [{"name": "other"}],
            "edges": [{"source": "other", "target": "base", "layers": [[0, 1], [-1, 0]]}]}


def family_models(model: nn.Module, role: str) -> dict[str, nn.Module]:
    """role: which side the family model is on (anchor `base` or shared augment `other`)."""
    return {"base": model, "other": partner()} if role == "anchor" else {"base": partner(), "other": model}


def check(family: str, role: str) -> dict:
    """Compose one family in one role and run every check the tests run; a record for docs/families.md."""
    import time

    import calmgraph as cg
    from reference import config_block_list, eager_reference, randomize_new_parameters, run_model
    from calmgraph.blocks import find_blocks
    started = time.perf_counter()
    try:
        model = small_model(family)
    except Unbuildable as e:
        return {"status": "skipped", "detail": str(e)}
    record = {"arch": type(model).__name__, "blocks": config_block_list(model)[0]}
    try:
        detected = find_blocks(model)[0].name.rpartition(".")[0]
        models = family_models(model, role)
        composed = cg.compile(family_spec(), models)
        ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            identity = torch.equal(composed(ids), run_model(models["base"], ids))
            randomize_new_parameters(composed)
            diff = (composed(ids) - eager_reference(composed, models, None, ids)).abs().max().item()
        record.update(frontend=composed.frontends["base" if role == "anchor" else "other"],
                      detected=detected, identity=identity, diff=diff)
        ok = identity and diff <= 1e-5 and detected == record["blocks"]
        record["status"] = "works" if ok else "wrong"
    except cg.CalmGraphError as e:
        record.update(status="calmgraph error", detail=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a crash outside calmgraph's errors is a bug to record
        record.update(status="crash", detail=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def check_generate(family: str, role: str, new: int = 5) -> dict:
    """Generate from one family in one role, beside a small Llama (both with transformers caches, the
    family's cache turned on), with the new parameters randomised: which path `generate` takes (a KV cache
    for which models, or recomputing, and why), whether its greedy tokens are those of full forwards, and
    whether rows of 6 and 4 prompt tokens (left-padded) decoded together get the tokens each gets alone."""
    import time

    import calmgraph as cg
    from reference import randomize_new_parameters
    from calmgraph.generation import generate as generation
    started = time.perf_counter()
    try:
        model, llama = small_model(family), small_model("llama", seed=1)
    except Unbuildable as e:
        return {"status": "skipped", "detail": str(e)}
    for m in (model, llama):
        m.config.use_cache = True
    record = {"arch": type(model).__name__}
    try:
        models = {"base": model, "other": llama} if role == "anchor" else {"base": llama, "other": model}
        composed = cg.compile(family_spec(), models)
        randomize_new_parameters(composed)
        ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            expected = ids
            for _ in range(new):
                expected = torch.cat([expected, composed(expected)[:, -1].argmax(-1, keepdim=True)], 1)
            got = composed.generate(ids, new)
            mask = torch.ones_like(ids)
            mask[1, :2] = 0                                     # row 1: a prompt of 4 tokens, left-padded
            together = composed.generate(ids, new, attention_mask=mask)[:, -new:]
            alone = torch.cat([composed.generate(ids[:1], new)[:, -new:],
                               composed.generate(ids[1:, 2:], new)[:, -new:]])
        said = [str(w.message) for w in caught]
        fallback = [m for m in said if "without the anchor's KV cache" in m]
        demoted = [m for m in said if m.startswith("decoding the anchor alone")]   # a shared augment failed
        unsound = [m for m in said if "off the recomputing path's" in m]       # the first-use check failed
        entry = generation._entry(composed)
        record.update(cached=[] if fallback else list(entry.get("models", ())), ragged=bool(entry.get("ragged")),
                      recomputes=(fallback or [m.split(": ", 1)[-1] for m in demoted] or [None])[0],
                      greedy=torch.equal(got, expected), padded=torch.equal(together, alone))
        if unsound:
            record["unsound"] = unsound[0][:300]
        if not record["greedy"]:   # a near-tie of the full forward's logits, or a wrong step
            at = int((got != expected).any(0).nonzero()[0])
            with torch.no_grad():
                top = composed(expected[:, :at])[:, -1].topk(2).values
            record["margin"] = float((top[:, 0] - top[:, 1]).min())
        record["status"] = "works" if record["greedy"] and record["padded"] else "wrong"
    except cg.CalmGraphError as e:
        record.update(status="calmgraph error", detail=f"{type(e).__name__}: {e}"[:300])
    except Exception as e:  # noqa: BLE001 - a crash outside calmgraph's errors is a bug to record
        record.update(status="crash", detail=f"{type(e).__name__}: {e}"[:300])
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def check_isolated(family: str, role: str, timeout: float = 120, memory_gb: int = 6, check=check) -> dict:
    """`check` in a forked process with a time and memory limit: one family cannot stall the sweep."""
    import multiprocessing as mp
    import resource

    def work(queue):
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
        try:
            queue.put(check(family, role))
        except BaseException as e:  # noqa: BLE001 - outside calmgraph (e.g. a config that cannot be read)
            queue.put({"status": "skipped", "detail": f"test harness: {type(e).__name__}: {str(e)[:160]}"})

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=work, args=(queue,))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"status": "skipped", "detail": f"over {timeout:.0f} s to build, compile and check on this CPU"}
    if queue.empty():
        return {"status": "skipped", "detail": f"process died (exit code {proc.exitcode}; memory limit {memory_gb} GB)"}
    return queue.get()


def table(records: list[dict]) -> str:
    """The markdown table of docs/families.md: one row a family, both roles."""
    by_family: dict[str, dict] = {}
    for r in records:
        by_family.setdefault(r["family"], {})[r["role"]] = r
    rows = ["| family | architecture | blocks (detected) | front end | as anchor | as augment | notes |",
            "|---|---|---|---|---|---|---|"]

    def verdict(r):
        if r["status"] == "works":
            return "works"
        if r["status"] == "wrong":
            return f"identity {'exact' if r['identity'] else 'NOT exact'}, max diff {r['diff']:.1e}"
        return r["status"]

    for fam in sorted(by_family):
        a, g = by_family[fam].get("anchor"), by_family[fam].get("augment")
        if a is None or g is None:
            continue
        first = a if a["status"] != "skipped" else g
        note = ""
        if a["status"] not in ("works",) or g["status"] not in ("works",):
            note = (first.get("detail") or "").replace("\n", " ").replace("|", "/")[:220]
        rows.append(f"| {fam} | {first.get('arch', '')} | {first.get('detected', first.get('blocks', ''))} | "
                    f"{first.get('frontend', '')} | {verdict(a)} | {verdict(g)} | {note} |")
    return "\n".join(rows)


def generation_table(records: list[dict]) -> str:
    """The generation section's tables of docs/families.md (records of `check_generate`)."""
    import re
    by_family: dict[str, dict] = {}
    for r in records:
        by_family.setdefault(r["family"], {})[r["role"]] = r

    def path(r):
        if r["status"] == "skipped":
            return "skipped"
        if r["status"] != "works":
            return r["status"]
        if ("base" if r["role"] == "anchor" else "other") not in r["cached"]:   # the family's own model
            return "recomputes"
        return "cached" + ("" if r.get("ragged") else ", a decoder per length")

    def why(r):   # the reason, without the per-model name and sizes
        text = r.get("recomputes") or r.get("detail") or \
            "takes no cache generate decodes with (no cache argument, or an attention that reads ahead)"
        text = text.removeprefix("generating without the anchor's KV cache: ").replace("\n", " ")
        text = re.sub(r"(model )?'(base|other)'", "the model", text).split("; generate(")[0]
        return re.sub(r"\d+", "N", text).replace("|", "/")[:160]

    rows = ["| family | as anchor | as augment |", "|---|---|---|"]
    reasons: dict[str, list[str]] = {}
    for fam in sorted(by_family):
        a, g = by_family[fam].get("anchor"), by_family[fam].get("augment")
        if a is None or g is None or a["status"] == g["status"] == "skipped":
            continue
        rows.append(f"| {fam} | {path(a)} | {path(g)} |")
        for r in (a, g):
            if path(r) not in ("cached", "cached, a decoder per length", "skipped"):
                reasons.setdefault(f"{path(r)}: {why(r)}", []).append(f"{fam} ({r['role']})")
    lines = ["| why | families |", "|---|---|"]
    lines += [f"| {k} | {', '.join(v)} |" for k, v in sorted(reasons.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(rows) + "\n\n" + "\n".join(lines)


if __name__ == "__main__":  # python tests/families.py [family ...] > sweep.jsonl: one JSON record a line
    import json
    import sys
    if sys.argv[1:2] in (["--table"], ["--generation-table"]):  # ... tests/families.py --table sweep.jsonl > table.md
        records = [json.loads(line) for path in sys.argv[2:] for line in open(path) if line.startswith("{")]
        print((table if sys.argv[1] == "--table" else generation_table)(records))
        sys.exit()
    import transformers  # noqa: F401 - imported once, before forking
    import calmgraph  # noqa: F401
    how = check_generate if sys.argv[1:2] == ["--generate"] else check  # ... tests/families.py --generate [family ...]
    for fam in [a for a in sys.argv[1:] if a != "--generate"] or causal_lm_families():
        for side in ("anchor", "augment"):
            print(json.dumps({"family": fam, "role": side, **check_isolated(fam, side, check=how)}), flush=True)
