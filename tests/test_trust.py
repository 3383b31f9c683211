"""Trust: a spec runs no code without consent, a write replaces nothing it was not told to, and hostile
specs (bombs, odd keys, odd numbers, reserved names) are refused with a clear, located error."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import calmgraph as cg
from calmgraph.demo.models import TinyLM

ROOT = Path(__file__).resolve().parent.parent
TINY = {"python": "calmgraph.demo.models:TinyLM", "kwargs": {"vocab": 64, "dim": 24, "depth": 2, "heads": 2}}


def spec(augment_source, anchor_source=TINY, name="aug"):
    return {"anchor": {"name": "base", "source": anchor_source},
            "augments": [{"name": name, "source": augment_source}],
            "edges": [{"source": name, "target": "base", "layers": [[-1, 0]]}]}


def calmgraph(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "calmgraph.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# -- 1. python: sources run only with consent -----------------------------------------------------------
SIDE_EFFECT = """
from pathlib import Path
Path(__file__).with_name("imported.txt").write_text("ran")   # import-time code
from calmgraph.demo.models import TinyLM
def small():
    Path(__file__).with_name("called.txt").write_text("ran")
    return TinyLM(vocab=64, dim=16, depth=2, heads=2)
"""


@pytest.fixture
def factory_file(tmp_path):
    (tmp_path / "factories.py").write_text(SIDE_EFFECT)
    return tmp_path


def ran(folder):
    return [p.name for p in folder.iterdir() if p.name in ("imported.txt", "called.txt")]


@pytest.mark.parametrize("call", [
    lambda s, d: cg.load_models(s, base_dir=d),
    lambda s, d: cg.compile(s),
])
def test_a_file_source_is_neither_imported_nor_called_without_consent(factory_file, call):
    before = set(sys.modules)
    with pytest.raises(cg.SpecError) as e:
        call(spec({"python": "factories.py:small"}), factory_file)
    assert [p.loc for p in e.value.problems] == ["augments[0].source.python"]
    assert "trust_code=True" in str(e.value) and "'factories.py:small'" in str(e.value)
    assert ran(factory_file) == []
    assert not [m for m in set(sys.modules) - before if "factories" in m]


def test_with_consent_the_file_source_runs(factory_file):
    models = cg.load_models(spec({"python": "factories.py:small"}), base_dir=factory_file, trust_code=True)
    assert models["aug"].tok.embedding_dim == 16 and sorted(ran(factory_file)) == ["called.txt", "imported.txt"]


@pytest.mark.parametrize("python", [
    "subprocess:getoutput",
    "calmgraph.bench:subprocess.getoutput",      # a name calmgraph imports is not a calmgraph factory
    "calmgraph.demo.models:torch.nn.Linear",     # nor is a path through calmgraph into another module
    "calmgraph.cli:main",                        # nor a calmgraph function that is not a model factory
])
def test_a_module_source_is_never_called_without_consent(python, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "getoutput", lambda *a, **k: calls.append((a, k)))
    with pytest.raises(cg.SpecError) as e:
        cg.compile(spec({"python": python, "kwargs": {"cmd": f"touch {tmp_path}/owned.txt"}}))
    assert [p.loc for p in e.value.problems] == ["augments[0].source.python"] and "trust_code=True" in str(e.value)
    assert calls == [] and not (tmp_path / "owned.txt").exists()


def test_every_untrusted_source_is_listed_at_once():
    with pytest.raises(cg.SpecError) as e:
        cg.load_models(spec({"python": "os:system"}, anchor_source={"python": "m.py:f"}))
    assert [p.loc for p in e.value.problems] == ["anchor.source.python", "augments[0].source.python"]


def test_calmgraphs_own_factories_and_passed_models_need_no_consent():
    seeded = spec({**TINY, "seed": 1}, anchor_source={**TINY, "seed": 0})
    composed = cg.compile(seeded)
    anchor = cg.load_models(seeded)["base"]
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(composed(ids), anchor(ids))  # built from the sources, the anchor at init
    mine = TinyLM(vocab=64, dim=16, depth=2, heads=2)
    # a passed model wins, so its untrusted source is never looked at
    assert cg.load_models(spec({"python": "os:system"}), models={"aug": mine})["aug"] is mine


def test_hf_sources_never_run_a_folders_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    # the folder asks for its own code (auto_map), which would write a file on import
    (tmp_path / "llama" / "modeling_evil.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('evil_ran.txt').write_text('x')\n"
        "from transformers import LlamaForCausalLM as Evil\n")
    cfg = tmp_path / "llama" / "config.json"
    data = json.loads(cfg.read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.Evil"}
    cfg.write_text(json.dumps(data))
    models = cg.load_models(spec(TINY, anchor_source={"hf": str(tmp_path / "llama")}))
    assert type(models["base"]).__name__ == "LlamaForCausalLM"
    assert not (tmp_path / "llama" / "evil_ran.txt").exists()
    with_map = {**{k: v for k, v in config.to_dict().items() if k in ("hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")},
                "model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil--modeling_evil.Evil"}}
    built = cg.load_models(spec(TINY, anchor_source={"hf_config": with_map}))["base"]
    assert type(built).__name__ == "LlamaForCausalLM"


def write_untrusted_spec(folder):
    (folder / "factories.py").write_text(SIDE_EFFECT)
    path = folder / "spec.yaml"
    path.write_text(textwrap.dedent("""
        anchor: {name: base, source: {python: "calmgraph.demo.models:TinyLM", kwargs: {vocab: 64, dim: 24, depth: 2, heads: 2}}}
        augments: [{name: aug, source: {python: "factories.py:small"}}]
        edges: [{source: aug, target: base, layers: [[-1, 0]]}]
    """))
    return path


@pytest.mark.parametrize("command, options", [("validate", []), ("inspect", []), ("compile", ["--out", "out"]),
                                              ("bench", ["--quick", "--no-compile"])])
def test_the_cli_runs_no_spec_code_without_trust_code(tmp_path, command, options):
    run = calmgraph(command, write_untrusted_spec(tmp_path), *options, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    text = run.stdout + run.stderr
    assert "augments[0].source.python" in text and "--trust-code" in text and "Traceback" not in text
    assert ran(tmp_path) == [] and not (tmp_path / "out").exists()


def test_the_cli_runs_spec_code_with_trust_code(tmp_path):
    run = calmgraph("validate", write_untrusted_spec(tmp_path), "--trust-code")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid (2 models, 1 edge, 1 layer pairs)" in run.stdout and "imported.txt" in ran(tmp_path)


# -- 2. writes replace nothing they were not told to, never through a link, each file whole -------------
PLAIN = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
         "edges": [{"source": "aug", "target": "base", "layers": [[-1, 0]]}]}
torch.manual_seed(0)
MODELS = {"base": TinyLM(vocab=64, dim=24, depth=2, heads=2), "aug": TinyLM(vocab=64, dim=16, depth=2, heads=2)}


@pytest.fixture(scope="module")
def composed():
    composed = cg.compile(PLAIN, models=MODELS)
    with torch.no_grad():
        for p in composed.new_parameters():
            p.normal_(0, 0.2)
    return composed


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_refuses_to_replace_a_users_files_and_writes_nothing(composed, tmp_path):
    (tmp_path / "model.py").write_text("# my own code\n")
    before = contents(tmp_path)
    with pytest.raises(cg.WriteError, match=r"'.*model\.py' already exists; pass overwrite=True to replace it"):
        composed.export(tmp_path / "model.pt2")
    assert contents(tmp_path) == before  # not even the artifact: every target is checked first


def test_an_artifact_is_never_its_own_code_listing(composed, tmp_path):
    with pytest.raises(cg.ExportError, match="would be overwritten by its own code listing"):
        composed.export(tmp_path / "model.py")
    assert list(tmp_path.iterdir()) == []


def test_two_exports_in_one_folder_share_no_file_and_overwrite_replaces_only_when_told(composed, tmp_path):
    a = composed.export(tmp_path / "a.pt2")
    composed.export(tmp_path / "b.pt2")
    assert sorted(contents(tmp_path)) == ["a.pt2", "a.py", "a.spec.json", "b.pt2", "b.py", "b.spec.json"]
    assert cg.CompositionSpec.from_json((tmp_path / "a.spec.json").read_text()) == composed.spec
    assert "# For reading; the runnable artifact is a.pt2" in (tmp_path / "a.py").read_text()
    before = contents(tmp_path)
    with pytest.raises(cg.WriteError, match="a.pt2' already exists"):
        composed.export(a)
    assert contents(tmp_path) == before
    composed.export(a, overwrite=True)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert torch.allclose(torch.export.load(str(a)).module()(input_ids=ids), composed(ids), atol=1e-6)
    assert sorted(contents(tmp_path)) == sorted(before)  # no temporary file left over


def test_a_symlink_is_never_written_through_even_with_overwrite(composed, tmp_path):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.safetensors").symlink_to(victim)
    for overwrite in (False, True):
        with pytest.raises(cg.WriteError, match="is a symbolic link; calmgraph never writes through one"):
            composed.save_new(tmp_path / "out" / "x.safetensors", overwrite=overwrite)
    assert victim.read_text() == "precious" and (tmp_path / "out" / "x.safetensors").is_symlink()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.safetensors"]


def test_save_new_to_a_file_keeps_a_folder_checkpoints_spec(composed, tmp_path):
    composed.save_new(tmp_path)                                  # new_params.safetensors + spec.json
    folder_spec = (tmp_path / "spec.json").read_bytes()
    other = cg.compile({**PLAIN, "cross_attention": {"norm": "layer"}}, models=MODELS)
    other.save_new(tmp_path / "x.safetensors")                   # x.safetensors + x.spec.json
    assert (tmp_path / "spec.json").read_bytes() == folder_spec
    assert cg.CompositionSpec.from_json((tmp_path / "x.spec.json").read_text()) == other.spec
    fresh = cg.compile(PLAIN, models=MODELS)
    cg.load_new(fresh, tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(fresh.new_parameters(), composed.new_parameters()))
    with pytest.raises(cg.WriteError, match="new_params.safetensors' already exists"):
        composed.save_new(tmp_path)


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(composed, tmp_path, monkeypatch):
    import calmgraph.checkpoint as checkpoint
    file = composed.save_new(tmp_path / "c.safetensors")
    before = contents(tmp_path)

    def half_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", half_then_crash)
    with pytest.raises(cg.WriteError, match=r"could not write '.*c\.safetensors': disk full"):
        composed.save_new(file, overwrite=True)
    assert contents(tmp_path) == before


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_and_a_live_ones_is_kept(tmp_path):
    from calmgraph.files import TMP_PREFIX, _tmp_name, write_text
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from calmgraph.files import write_with
        def slow(tmp):
            tmp.write_bytes(b"half a file")
            time.sleep(600)
        write_with({str(tmp_path / "big.bin")!r}, slow)
        """)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:  # until the writer is mid-write
            if any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir()):
                break
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.wait()
    (leftover,) = tmp_path.iterdir()
    assert leftover.read_bytes() == b"half a file" and not (tmp_path / "big.bin").exists()
    in_progress = tmp_path / _tmp_name("other.bin")   # this process's: a write still running
    in_progress.write_bytes(b"being written")
    foreign = tmp_path / f"{TMP_PREFIX}0000000.1.abcd-x.bin"  # another host's (or an older calmgraph's)
    foreign.write_bytes(b"not ours to judge")
    write_text(tmp_path / "note.txt", "hello")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([in_progress.name, foreign.name, "note.txt"])


def test_the_cli_replaces_its_outputs_only_with_overwrite(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(textwrap.dedent("""
        anchor: {name: base, source: {python: "calmgraph.demo.models:TinyLM", kwargs: {vocab: 64, dim: 24, depth: 2, heads: 2}}}
        augments: [{name: aug, source: {python: "calmgraph.demo.models:TinyLM", kwargs: {vocab: 64, dim: 16, depth: 2, heads: 2}}}]
        edges: [{source: aug, target: base, layers: [[-1, 0]]}]
    """))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.txt").write_text("my notes")
    run = calmgraph("compile", spec_path, "--out", tmp_path / "out")
    assert run.returncode == 1 and "summary.txt' already exists; pass --overwrite to replace it" in run.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.txt"]
    assert "building" not in run.stderr  # refused before anything was built
    (tmp_path / "c.svg").write_text("mine")
    run = calmgraph("inspect", spec_path, "--draw", tmp_path / "c.svg")
    assert run.returncode == 1 and "c.svg' already exists; pass --overwrite" in run.stderr
    assert (tmp_path / "c.svg").read_text() == "mine"
    run = calmgraph("compile", spec_path, "--out", tmp_path / "out", "--overwrite")
    assert run.returncode == 0, run.stderr
    assert "resolved pairs" in (tmp_path / "out" / "summary.txt").read_text()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# -- 3. bombs are refused quickly, located, and never echoed ----------------------------------------------
LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + LAUGHS  # 9**9 strings
VALID = textwrap.dedent("""
    anchor: {name: base}
    augments: [{name: aug}]
    edges: [{source: aug, target: base, layers: [[-1, 0]]}]
""")


def refused_quickly(load, text):
    import time
    started = time.perf_counter()
    with pytest.raises(cg.SpecError) as e:
        load(text)
    assert time.perf_counter() - started < 10  # a guard against the hang, not a speed target
    assert len(str(e.value)) < 1000  # the expansion is never echoed
    return e.value


def test_an_alias_bomb_is_refused_without_expanding_it():
    assert len(BOMB) < 450
    e = refused_quickly(cg.CompositionSpec.from_yaml, BOMB + VALID)
    assert "expands to more than 100,000 values" in str(e) and e.problems[0].loc.startswith("i[")


def test_an_alias_bomb_inside_hf_config_is_refused_at_its_location(tmp_path):
    nested = ("anchor:\n  name: base\n  source:\n    hf_config:\n      model_type: llama\n      junk:\n"
              + textwrap.indent(BOMB, "        ") + VALID.split("\n", 2)[2])
    e = refused_quickly(cg.CompositionSpec.from_yaml, nested)
    assert e.problems[0].loc.startswith("anchor.source.hf_config.junk.")
    (tmp_path / "bomb.yaml").write_text(nested)
    run = calmgraph("validate", tmp_path / "bomb.yaml")
    assert run.returncode == 1 and "expands to more than" in run.stdout and len(run.stdout) < 1000


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, "a: " + "{b: " * 3000 + "1" + "}" * 3000])
def test_deep_yaml_is_refused(text):
    refused_quickly(cg.CompositionSpec.from_yaml, text)


def test_deep_json_and_deep_python_are_refused():
    refused_quickly(cg.CompositionSpec.from_json, '{"anchor": ' + "[" * 5000 + "]" * 5000 + "}")
    deep = "x"
    for _ in range(100):
        deep = {"k": deep}
    data = {**PLAIN, "anchor": {"name": "base", "source": {"hf_config": {"model_type": "llama", "x": deep}}}}
    e = refused_quickly(cg.load_spec, data)
    assert "nested more than 32 levels deep" in str(e) and e.problems[0].loc.startswith("anchor.source.hf_config.x.k")


def test_sources_built_in_python_are_bounded_like_spec_files():
    from calmgraph.spec import HfConfigSource, PythonSource
    deep = "x"
    for _ in range(100):
        deep = {"k": deep}
    for build in (lambda: HfConfigSource(hf_config={"model_type": "llama", "x": deep}),
                  lambda: PythonSource(python="calmgraph.demo.models:TinyLM", kwargs={"x": deep}),
                  lambda: HfConfigSource(hf_config={"model_type": "llama", "x": ["y" * 1000] * 2000})):
        with pytest.raises(cg.SpecError, match="nested more than 32 levels deep|expand to more than"):
            build()


def test_a_huge_spec_file_is_not_read(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(50_000_000)  # sparse: cheap to make; reading it would not be
    e = refused_quickly(cg.load_spec, big)
    assert "bytes; a spec has at most 1,000,000 characters" in str(e)


def test_a_checkpoint_with_deep_spec_metadata_is_refused_and_changes_nothing(composed, tmp_path):
    from safetensors.torch import save_file
    tensors = {n: p.detach().clone() for n, p in composed.named_new_parameters()}
    save_file(tensors, tmp_path / "deep.safetensors", metadata={"calmgraph_spec": "[" * 5000 + "]" * 5000})
    before = {n: p.clone() for n, p in composed.named_new_parameters()}
    with pytest.raises(cg.CheckpointError, match="its spec metadata is not valid JSON"):
        cg.load_new(composed, tmp_path / "deep.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in composed.named_new_parameters())


# -- 4. odd keys, numbers and names: located spec errors, never a crash --------------------------------------
def located(data):
    with pytest.raises(cg.SpecError) as e:
        cg.load_spec(data)
    assert len(str(e.value)) < 2000
    return {p.loc: p.msg for p in e.value.problems}


def test_a_key_that_is_not_a_string_is_located():
    assert "key 1 is a int; every key of a spec is a string" in located({1: 2, **PLAIN})[""]
    data = {**PLAIN, "anchor": {"name": "base", "source": {"hf_config": {"model_type": "llama", None: 3}}}}
    assert "key None is a NoneType" in located(data)["anchor.source.hf_config"]
    assert "key 1 is a int" in located_yaml("1: 2\n" + VALID)[""]


def located_yaml(text):
    with pytest.raises(cg.SpecError) as e:
        cg.CompositionSpec.from_yaml(text)
    return {p.loc: p.msg for p in e.value.problems}


def test_huge_integers_are_refused_in_yaml_json_and_python():
    digits = "9" * 5000
    for text in (VALID.replace("[[-1, 0]]", f"{{every: {digits}}}"), VALID.replace("[[-1, 0]]", f"[[{'9' * 4000}, 0]]")):
        assert len(located_yaml(text)) == 1
    with pytest.raises(cg.SpecError, match="not a valid spec"):
        cg.CompositionSpec.from_json('{"anchor": {"name": "base", "seed": ' + digits + '}}')
    problems = located({**PLAIN, "edges": [{"source": "aug", "target": "base", "layers": [[10**5000, 0]]}]})
    assert "a number of about 5,001 digits" in problems["edges[0].layers[0][0]"]


@pytest.mark.parametrize("edge, loc, message", [
    ({"layers": {"every": True}}, "edges[0].layers.every", "valid integer"),
    ({"layers": {"every": 2.0}}, "edges[0].layers.every", "valid integer"),
    ({"layers": [[-1, 0]], "cross_attention": {"heads": 1e20}}, "edges[0].cross_attention.heads", "valid integer"),
    ({"layers": [[-1, 0]], "cross_attention": {"dim_head": 1e9}}, "edges[0].cross_attention.dim_head", "valid integer"),
    ({"layers": [[-1, 0]], "cross_attention": {"dim_head": 10**9}}, "edges[0].cross_attention.dim_head", "less than or equal to 1024"),
    ({"layers": [[-1, 0]], "cross_attention": {"heads": 512, "dim_head": 512}}, "edges[0].cross_attention", "heads * dim_head is 262,144"),
    ({"layers": [[-1, 0]], "cross_attention": {"window": True}}, "edges[0].cross_attention.window", "valid integer"),
    ({"layers": [[True, 0]]}, "edges[0].layers[0][0]", "a layer is a block index"),
    ({"layers": [[-1, "x" * 600]]}, "edges[0].layers[0][1]", "1 to 500 characters"),
])
def test_numbers_are_strict_ints_within_sane_bounds(edge, loc, message):
    problems = located({**PLAIN, "edges": [{"source": "aug", "target": "base", **edge}]})
    assert message in problems[loc], problems


def test_the_spec_wide_default_and_an_edges_override_are_bounded_together():
    data = {**PLAIN, "cross_attention": {"dim_head": 1024},
            "edges": [{"source": "aug", "target": "base", "layers": [[-1, 0]], "cross_attention": {"heads": 128}}]}
    assert "heads * dim_head is 131,072" in located(data)["edges[0].cross_attention"]


def named(anchor="base", augment="aug", prompt=False):
    return {"anchor": {"name": anchor}, "augments": [{"name": augment, **({"input": "prompt"} if prompt else {})}],
            "edges": [{"source": augment, "target": anchor, "layers": [[-1, 0]]}]}


def test_every_reserved_name_is_refused_at_validation():
    import keyword
    from calmgraph.graph import reserved_names
    names = reserved_names()
    assert {"class", "def", "None", "lambda", "forward", "training", "to", "graph", "spec", "links", "meta", "xattn",
            "loss", "generate", "export", "summary", "code", "state_dict", "type"} <= names
    for name in sorted(names):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            continue
        expected = "Python keyword" if keyword.iskeyword(name) else "attribute or method of the composed model"
        assert expected in located(named(augment=name))["augments[0].name"]
        assert expected in located(named(anchor=name))["anchor.name"]


def check_names_compile(anchor, augment):
    torch.manual_seed(0)
    base, aug = TinyLM(vocab=32, dim=16, depth=2, heads=2), TinyLM(vocab=32, dim=8, depth=1, heads=2)
    composed = cg.compile(named(anchor, augment, prompt=True), models={anchor: base, augment: aug})
    with torch.no_grad():
        for p in composed.new_parameters():
            p.normal_(0, 0.3)
    ids, prompt = torch.randint(0, 32, (2, 5)), torch.randint(0, 32, (2, 3))
    with torch.no_grad():
        fused = composed(ids, **{f"{augment}_input_ids": prompt})
        assert torch.equal(fused, composed(ids, prompt))
        assert not torch.allclose(fused, base(ids))  # the augment is read, through its own name
    return composed


ALLOWED = ["torch", "self", "getattr", "operator", "input_ids", "input", "mask", "match", "case", "print", "x",
           "Module", "Tensor", "root", "kwargs", "docs_input_ids", "model", "typing", "math", "inf"]


@pytest.mark.parametrize("anchor, augment", list(zip(ALLOWED[::2], ALLOWED[1::2])))
def test_a_sample_of_allowed_names_compiles_and_runs(anchor, augment):
    check_names_compile(anchor, augment)


def test_every_public_name_of_a_compiled_composition_is_reserved():
    from calmgraph.graph import reserved_names
    composed = check_names_compile("anchor", "docs")
    public = {n for n in dir(composed) if not n.startswith("_")} - {"anchor", "docs"}
    assert public <= reserved_names(), sorted(public - reserved_names())


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

IDENTIFIERS = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,11}", fullmatch=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anchor=IDENTIFIERS, augment=IDENTIFIERS)
def test_any_name_the_rule_allows_compiles(anchor, augment):
    from calmgraph.graph import name_problem
    if anchor == augment or name_problem(anchor) or name_problem(augment):
        return
    check_names_compile(anchor, augment)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["base", "aug", "prompt", "shared", "every", "class", "forward"]))
KEYS = st.one_of(st.sampled_from(["anchor", "augments", "edges", "name", "source", "target", "layers", "every",
                                  "cross_attention", "heads", "dim_head", "hf_config", "python", "input"]),
                 st.text(max_size=6), st.integers(), st.none(), st.booleans())
DATA = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(KEYS, inner, max_size=4)), max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(data=DATA)
def test_any_data_is_a_spec_or_a_spec_error(data):
    try:
        cg.load_spec(data) if isinstance(data, dict) else cg.CompositionSpec.from_dict(data)
    except cg.SpecError as e:
        assert all(isinstance(p.loc, str) for p in e.problems) and len(str(e)) < 20_000


def test_a_key_named_self_is_an_unknown_key():
    """Found by the fuzz test below: the specs' `__init__(self, **data)` took a key "self" for its own
    argument (a TypeError, exit 3 on the command line)."""
    from calmgraph.train import TrainConfig
    for build in (lambda: cg.load_spec({"self": "base", "anchor": {"name": "a"}}),
                  lambda: cg.CompositionSpec(self=1), lambda: cg.spec.CrossAttentionSpec(self=2)):
        with pytest.raises(cg.SpecError, match="self: unknown key"):
            build()
    with pytest.raises(cg.errors.ConfigError, match="self: unknown key"):
        TrainConfig(self=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=DATA)
def test_the_cli_never_exits_3_on_a_spec_file(data, tmp_path_factory, capsys):
    import yaml
    from calmgraph.cli import main
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    assert main(["validate", str(path)]) in (0, 1)
    assert "internal error" not in capsys.readouterr().err


@pytest.mark.parametrize("text, args", [
    ("anchor: {name: class}\naugments: [{name: forward}]\nedges: [{source: forward, target: class, layers: [[0, 0]]}]", []),
    ("1: 2\n" + VALID, []),
    (BOMB + VALID, []),
    (VALID.replace("[[-1, 0]]", "{every: true}"), []),
    ("\udcff", []),
    ("anchor: " + "[" * 2000, []),
])
def test_the_cli_exits_1_with_one_located_error_on_hostile_specs(tmp_path, capsys, text, args):
    from calmgraph.cli import main
    path = tmp_path / "spec.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["validate", str(path), *args]) == 1
    out = capsys.readouterr()
    assert "internal error" not in out.err and "Traceback" not in out.out + out.err and len(out.out) < 2000


def test_a_folder_that_cannot_be_made_is_a_write_error_not_a_crash(tmp_path, capsys):
    from calmgraph.cli import main
    (tmp_path / "file.txt").write_text("in the way")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(VALID.replace("{name: base}", "{name: base, source: %s}" % json.dumps(TINY))
                         .replace("{name: aug}", "{name: aug, source: %s}" % json.dumps(TINY)))
    assert main(["compile", str(spec_path), "--out", str(tmp_path / "file.txt" / "out")]) == 1
    err = capsys.readouterr().err
    assert "calmgraph: error: could not write" in err and "Not a directory" in err
    assert (tmp_path / "file.txt").read_text() == "in the way"


@pytest.mark.parametrize("models", [[MODELS["base"], MODELS["aug"]], MODELS["base"], {1: MODELS["base"]}])
def test_models_given_as_anything_but_a_dict_of_names_is_a_model_error(models):
    with pytest.raises(cg.ModelError, match=r"models= is a \w+; pass a dict of the spec's model names"):
        cg.compile(PLAIN, models=models)


def test_long_strings_are_refused_and_never_echoed_whole():
    data = {**PLAIN, "anchor": {"name": "base", "source": {"python": "m" * 100_000 + ":f"}},
            "edges": [{"source": "aug" * 50_000, "target": "base", "layers": [[0, "layers." + "9" * 100_000]]}]}
    problems = located(data)
    assert set(problems) == {"anchor.source.python", "edges[0].source", "edges[0].layers[0][1]"}
    assert all(len(msg) < 300 for msg in problems.values())


def test_the_demo_into_a_used_folder_is_refused_before_it_runs(tmp_path, capsys):
    from calmgraph.cli import main
    (tmp_path / "spec.json").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "spec.json' already exists; pass --overwrite" in out.err and "identity at init" not in out.out
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"] and (tmp_path / "spec.json").read_text() == "mine"


MODULE_PATHS = st.one_of(st.sampled_from(["os", "subprocess", "calmgraph", "calmgraph.bench", "calmgraph.cli",
                                          "calmgraph.demo.models", "calmgraph.demo", "json", "m.py", "../x.py"]),
                         st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,15}", fullmatch=True))
ATTRS = st.one_of(st.sampled_from(["system", "getoutput", "main", "TinyLM", "torch.nn.Linear", "nn.Module",
                                   "_private", "demo_models", "Layer"]),
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True))


@settings(max_examples=60, deadline=None)
@given(module=MODULE_PATHS, attr=ATTRS)
def test_without_consent_no_source_imports_anything_but_calmgraphs_own_factories(module, attr):
    from calmgraph.sources import is_own_factory
    python = f"{module}:{attr}"
    before = set(sys.modules)
    try:
        cg.load_models(spec({"python": python}, anchor_source={"python": python}))
    except cg.SpecError as e:
        if {p.loc for p in e.problems} == {"anchor.source.python", "augments[0].source.python"}:
            assert "trust_code=True" in str(e) and not is_own_factory(python)
            assert set(sys.modules) <= before, sorted(set(sys.modules) - before)
            return
        assert "expected 'package.module:factory'" in str(e)  # malformed: refused by the spec itself
        return
    except cg.ModelError:
        pass  # an own factory that is not a model (demo_models returns a dict) or got no kwargs it needs
    assert is_own_factory(python) and module == "calmgraph.demo.models" and "." not in attr


# -- calmgraph's own factories run without consent, so a spec's kwargs for them are bounded ------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"dim": 10**9}, "dim must be a whole number from 1 to 16,384; got 1000000000"),
    ({"dim": 1e3}, "dim must be a whole number"),
    ({"depth": True}, "depth must be a whole number"),
    ({"vocab": 0}, "vocab must be a whole number from 1"),
    ({"max_len": -1}, "max_len must be a whole number"),
    ({"dim": 30, "heads": 4}, "heads (4) must divide dim (30)"),
    ({"vocab": 1_000_000, "dim": 16_384, "heads": 4}, "more than the 1,000,000,000"),
    ({"dim": 16_384, "depth": 512, "heads": 4}, "more than the 1,000,000,000"),
])
@pytest.mark.parametrize("factory", ["TinyLM", "TinyEncoder"])
def test_own_factory_sizes_are_bounded_before_anything_is_allocated(factory, kwargs, message):
    source = {"python": f"calmgraph.demo.models:{factory}", "kwargs": {**TINY["kwargs"], **kwargs}}
    with pytest.raises(cg.ModelError) as info:
        cg.load_models(spec(source))
    assert message in str(info.value) and "model 'aug'" in str(info.value)


def test_own_factory_in_bounds_builds_the_model_asked_for():
    source = {"python": "calmgraph.demo.models:TinyLM", "kwargs": {"vocab": 50, "dim": 32, "depth": 3, "heads": 4,
                                                                   "max_len": 20}}
    model = cg.load_models(spec(source))["aug"]
    assert (model.tok.num_embeddings, model.tok.embedding_dim, len(model.layers), model.pos.num_embeddings) == (50, 32, 3, 20)
