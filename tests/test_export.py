"""Export: a `.pt2` that runs in a fresh process with neither calmgraph nor the models' libraries importable,
an ONNX file that onnxruntime runs, both at shapes other than the ones exported with."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import calmgraph as cg
from calmgraph.demo.models import TinyEncoder, demo_models
from calmgraph.demo.run import demo_spec_path

SPEC = {
    "anchor": {"name": "base"},
    "augments": [{"name": "xt"}, {"name": "notes", "input": "prompt"}],
    "edges": [{"source": "xt", "target": "base", "layers": {"every": 1}},
              {"source": "notes", "target": "base", "layers": [[-1, 1]]}],
}
VOCAB = 64
DEMO_SPEC = str(demo_spec_path())

# The fresh process: isolated (-I: no PYTHONPATH, no user site, no cwd), and every import of calmgraph,
# transformers or x_transformers fails. It runs the artifact on saved inputs and saves the outputs.
LOADER = r"""
import importlib.abc, sys
BLOCKED = ("calmgraph", "transformers", "x_transformers")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Blocker())
import torch
from safetensors.torch import load_file, save_file
program = torch.export.load(sys.argv[1]).module()
inputs = load_file(sys.argv[2])
outputs = {}
for shape in sorted({k.split("/")[0] for k in inputs}):
    named = {k.split("/")[1]: v for k, v in inputs.items() if k.startswith(shape + "/")}
    outputs[shape] = program(**named).contiguous()
    again = program(**dict(reversed(list(named.items()))))  # keywords in any order
    assert torch.equal(again, outputs[shape])
    try:  # the README says torch refuses positional inputs to a program exported with keywords
        program(*named.values())
        raise AssertionError("positional inputs were accepted")
    except ValueError as e:
        assert "keyword" in str(e)
save_file(outputs, sys.argv[3])
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED)))
"""


def models():
    import transformers
    from x_transformers import Decoder, TransformerWrapper
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=VOCAB)
    return {"base": transformers.LlamaForCausalLM(config).eval(),
            "xt": TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(dim=24, depth=3, heads=2)).eval(),
            "notes": TinyEncoder(vocab=VOCAB, dim=16, depth=2, heads=2).eval()}


@pytest.fixture(scope="module")
def composed():
    composed = cg.compile(SPEC, models=models())
    with torch.no_grad():  # non-zero new parameters, so the augments matter to the output
        for p in composed.new_parameters():
            p.normal_(0, 0.2)
    return composed


def inputs_at(batch, seq, prompt, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    notes = torch.randint(0, VOCAB, (batch, prompt), generator=g)
    mask = torch.ones_like(notes)
    mask[0, prompt // 2:] = 0  # the first prompt is padded
    return ids, notes, mask


@pytest.fixture(scope="module")
def exported(composed, tmp_path_factory):
    return composed.export(tmp_path_factory.mktemp("export") / "composed.pt2")


SHAPES = {"a": (3, 11, 4), "b": (1, 5, 7)}  # neither is the shape export traced with (2, 8, 5)


def test_pt2_runs_in_a_fresh_process_without_calmgraph_or_model_libraries(composed, exported, tmp_path):
    path = exported
    inputs = {k: inputs_at(*shape, seed=i) for i, (k, shape) in enumerate(SHAPES.items())}
    save_file({f"{k}/{name}": t for k, args in inputs.items() for name, t in zip(composed.input_names, args)},
              tmp_path / "in.safetensors")
    (tmp_path / "loader.py").write_text(LOADER)
    run = subprocess.run([sys.executable, "-I", "loader.py", str(path), "in.safetensors", "out.safetensors"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imported: []" in run.stdout
    outputs = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        for k, args in inputs.items():
            expected = composed(*args)
            assert outputs[k].shape == expected.shape == (*args[0].shape, VOCAB)
            assert torch.allclose(outputs[k], expected, atol=1e-5, rtol=1e-5), (k, (outputs[k] - expected).abs().max())
    # the augments do change the result: parity is not parity with the anchor alone
    with torch.no_grad():
        anchor = models()["base"](inputs["a"][0], use_cache=False).logits
    assert not torch.allclose(outputs["a"], anchor, atol=1e-3)


def test_export_writes_code_and_spec_beside_the_artifact(composed, exported):
    folder = exported.parent
    assert sorted(p.name for p in folder.iterdir()) == ["composed.pt2", "composed.py", "composed.spec.json"]
    assert "def forward(self, input_ids, notes_input_ids, notes_mask" in (folder / "composed.py").read_text()
    assert cg.CompositionSpec.from_json((folder / "composed.spec.json").read_text()) == composed.spec
    program = torch.export.load(exported)
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert user_inputs == ["input_ids", "notes_input_ids", "notes_mask"]  # the mask is required in the artifact


def test_onnx_passes_the_checker_and_matches_onnxruntime(composed, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = composed.export(tmp_path / "composed.onnx", format="onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "notes_input_ids": ["batch", "notes_seq"],
                    "notes_mask": ["batch", "notes_seq"]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, shape in enumerate(SHAPES.values()):
        args = inputs_at(*shape, seed=10 + i)
        (logits,) = session.run(None, {n: a.numpy() for n, a in zip(composed.input_names, args)})
        with torch.no_grad():
            expected = composed(*args)
        assert logits.shape == tuple(expected.shape)
        assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)


def test_unknown_format_is_refused(composed, tmp_path):
    with pytest.raises(cg.ExportError, match="unknown export format 'tflite'; choose one of pt2, onnx"):
        composed.export(tmp_path / "x.tflite", format="tflite")
    assert not any(tmp_path.iterdir())


def test_meta_weights_are_refused_with_what_to_do(tmp_path):
    with torch.device("meta"):
        m = demo_models()
    composed = cg.compile(DEMO_SPEC, models=m)  # compiling needs no real weights ...
    with pytest.raises(cg.ExportError, match=r"weights are on the meta device .* load them"):
        composed.export(tmp_path / "composed.pt2")  # ... an artifact does


@pytest.mark.parametrize("null_kv", [False, True], ids=["", "null_kv"])
def test_windowed_rotary_blocks_export_and_run_at_other_shapes(tmp_path, null_kv):
    """Positions (RoPE) and windows are computed from the sequence length inside the graph: the `.pt2`
    must give the composition's logits at lengths other than the one it was exported with."""
    from examples.handwritten_gpt.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    models = {"base": GPT(GPTConfig(vocab_size=VOCAB, block_size=40, n_layer=2, n_head=2, n_embd=64)).eval(),
              "aug": GPT(GPTConfig(vocab_size=VOCAB, block_size=40, n_layer=2, n_head=2, n_embd=32)).eval()}
    composed = cg.compile({"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
                           "edges": [{"source": "aug", "target": "base", "layers": {"every": 1}}],
                           "cross_attention": {"positions": "rotary", "window": 3, "null_kv": null_kv}}, models=models)
    with torch.no_grad():
        for p in composed.new_parameters():
            p.normal_(0, 0.2)
    program = torch.export.load(str(composed.export(tmp_path / "composed.pt2"))).module()
    for shape in [(2, 11), (3, 17), (1, 1)]:
        ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(program(input_ids=ids), composed(ids), rtol=1e-5, atol=1e-5)


def test_pt2_of_a_float32_composition_runs_under_autocast_as_the_composition(tmp_path):
    """torch.export writes a dtype assert before each cast, pinning the trace's dtypes; Qwen3's q/k norms cast
    a projection's output, which autocast makes bf16, so the `.pt2` refused to run under autocast. They are
    dropped as in the composition's own graph: under CPU bf16 autocast the artifact gives the composition's
    logits exactly."""
    from tests.test_compile import _gates_closed
    composed, _ = _gates_closed("qwen3", torch.float32)
    path = composed.export(tmp_path / "c.pt2")
    program = torch.export.load(str(path)).module()
    assert torch.ops.aten._assert_tensor_metadata.default not in [n.target for n in program.graph.nodes]
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        assert torch.equal(program(input_ids=ids), composed(ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(program(input_ids=ids), composed(ids))
