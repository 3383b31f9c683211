"""Inspect on a chain (augment -> augment -> anchor) compiled on the meta device: the text lists every
block and pair, the layout puts each model left of what it feeds, and the pictures are written."""
import pytest
import torch

import calmgraph as cg
from calmgraph import inspect as ci


def tiny(dim, depth, seed):
    return {"python": "calmgraph.demo.models:TinyLM", "kwargs": {"dim": dim, "depth": depth, "heads": 2}, "seed": seed}


@pytest.fixture(scope="module")
def chain():
    spec = {"anchor": {"name": "anchor", "source": tiny(64, 8, 0)},
            "augments": [{"name": "middle", "source": tiny(32, 4, 1)}, {"name": "far", "source": tiny(16, 3, 2)}],
            "edges": [{"source": "far", "target": "middle", "layers": [[2, 1]]},
                      {"source": "middle", "target": "anchor", "layers": {"every": 2}},
                      {"source": "far", "target": "anchor", "layers": [[0, 4]]}]}
    with torch.device("meta"):  # structure only: no weights are needed to inspect
        return cg.compile(spec)


def test_report_lists_blocks_with_hidden_sizes_and_every_pair(chain):
    text = ci.report(chain)
    assert "middle: augment (shared), 4 blocks, fx front end" in text
    assert "1      layers.1  32      <- far[2] -> anchor[3]" in text
    assert "3      layers.3  32      -> anchor[7]" in text
    assert "edges[1]  middle -> anchor  every 2        1->3, 3->7" in text
    assert [t.dim for t in chain.taps["far"]] == [16, 16, 16]


def test_layout_puts_each_model_left_of_what_it_feeds(chain):
    pos = ci._layout(chain)
    assert pos["far"][0] < pos["middle"][0] < pos["anchor"][0]


def test_mermaid_marks_the_anchor_and_labels_edges(chain):
    block = ci.mermaid(chain)
    assert block.startswith("```mermaid\nflowchart LR") and block.endswith("```")
    assert 'middle -->|"1→3, 3→7"| anchor' in block and "class anchor anchor" in block


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_draw_writes_the_picture(chain, tmp_path, suffix, magic):
    path = ci.draw(chain, tmp_path / f"chain{suffix}")
    assert path.read_bytes().startswith(magic)
