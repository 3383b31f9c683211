"""Generation from a composed model: the fused graph split into stages (`stage.py`), the anchor's KV-cache
decode graph (`decode.py`), the weight copies it decodes on (`copies.py`), and the sampling loop
(`generate.py`: `generate`), which stops as `stopping.py` says."""
