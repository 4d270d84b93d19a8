"""Hostile recipes and weights files: each bomb gets one error line and costs bounded memory.

Every bomb is a real file crafted in tmp_path and handed to `python -m gaborprune` in a child that
reports its own peak resident memory (`ru_maxrss`) above its import-only baseline (gaborprune's CLI
and torch imported). The bound is `BOUND`: before these checks the same files took 1 to 4 GB (a
stride-0 view materialised, a deflated entry inflated, a model built at its recorded arguments).
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune import _load
from gaborprune._validate import MEMORY_ENV
from gaborprune.errors import ModelSourceError, RecipeError
from helpers import one_line_error, run

BOUND = 400 * 2**20  # peak resident memory above the import-only baseline, in bytes

DRIVER = """
import json, os, resource, sys
import torch, gaborprune.cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = 0
try:
    sys.argv = ["gaborprune", *sys.argv[1:]]
    gaborprune.cli.main()
except SystemExit as e:
    code = e.code
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(os.environ["RSS_REPORT"], "w") as f:
    json.dump({"above": (peak - base) * 1024, "code": code}, f)
"""


def cli(tmp_path, *args, env=None):
    """Run the CLI in a child: (exit code, stderr lines, bytes of peak memory above the baseline)."""
    report = tmp_path / "rss.json"
    done = subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"RSS_REPORT": str(report)} | (env or {}))
    measured = json.loads(report.read_text())
    return measured["code"], done.stderr.strip().splitlines(), measured["above"]


def refused(tmp_path, *args, fragment, env=None):
    code, lines, above = cli(tmp_path, *args, env=env)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]
    assert above < BOUND, f"{above / 2**20:.0f} MB above the baseline"
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A plain resnet20 recipe (3x32x32, 10 classes) and its raw payload."""
    d = tmp_path_factory.mktemp("hostile")
    model, recipe = gp.load_model("resnet20")
    path = gp.save_recipe(d / "good.pt", model, recipe)
    return path, torch.load(path, weights_only=True)


def variant(tmp_path, good, name, **changes):
    payload = dict(good[1]) | changes
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def with_state(good, **tensors):
    return dict(good[1]["state_dict"]) | tensors


def deflated(path, name, chunks):
    """`path`'s entry `name` replaced by `chunks`, deflated (zip's own compression, which torch reads)."""
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(str(path) + ".bomb", "w") as zout:
        for info in zin.infolist():
            if info.filename.split("/", 1)[1] != name:
                zout.writestr(info, zin.read(info))
                continue
            target = zipfile.ZipInfo(info.filename)
            target.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(target, "w", force_zip64=True) as f:
                for chunk in chunks:
                    f.write(chunk)
    return str(path) + ".bomb"


# -- the bombs of issue 24 ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(20000, 15000), (10**6, 10**6)])
def test_a_stride_0_view_is_refused_before_it_is_materialised(tmp_path, good, shape):
    path = variant(tmp_path, good, "s0.pt", state_dict=with_state(good, **{"fc.weight": torch.zeros(1).expand(*shape)}))
    assert path.stat().st_size < 2 * good[0].stat().st_size  # one stored value
    refused(tmp_path, "inspect", path, fragment="stride 0 (one stored value broadcast) at ['state_dict']['fc.weight']")


def test_an_overlapping_view_is_refused(tmp_path, good):
    overlapping = torch.zeros(2000).as_strided((1000, 1000), (1, 1))  # a million values read from 2,000
    path = variant(tmp_path, good, "ov.pt", state_dict=with_state(good, **{"fc.weight": overlapping}))
    refused(tmp_path, "inspect", path, fragment="overlapping strides [1, 1]")


def test_a_deflated_storage_entry_is_never_inflated(tmp_path, good):
    zeros = bytes(2**24)
    bomb = deflated(good[0], "data/0", (zeros for _ in range(96)))  # 1.5 GB of zeros in a few MB
    assert os.path.getsize(bomb) < 8 * 2**20
    refused(tmp_path, "inspect", bomb, fragment="would inflate to 1.5 GB")


def test_a_deflated_pickle_of_30_million_opcodes_is_never_unpickled(tmp_path, good):
    opcodes = b"\x80\x02]" + b"]a" * 15_000_000 + b"."  # an empty list appended 15M times
    bomb = deflated(good[0], "data.pkl", [opcodes])
    refused(tmp_path, "inspect", bomb, fragment="compressed zip entries that would inflate to")


def test_many_tensors_are_refused_while_surveyed(tmp_path, good):
    base = torch.zeros(4)
    extra = {f"extra.{i}": base[:2] for i in range(_load.MAX_TENSORS + 10)}  # views of one storage: a small file
    path = variant(tmp_path, good, "keys.pt", state_dict=with_state(good, **extra))
    refused(tmp_path, "inspect", path, fragment=f"holds more than {_load.MAX_TENSORS} tensors")


def test_deep_metadata_is_refused_with_the_reason(tmp_path, good):
    deep = []
    for _ in range(400):
        deep = [deep]
    path = variant(tmp_path, good, "deep.pt", metadata={"notes": deep})
    line = refused(tmp_path, "prune", path, "-o", tmp_path / "out.pt", fragment=f"nests data more than {_load.MAX_DEPTH} levels deep")
    assert "torch.save" not in line and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("source, kwargs, fragment", [
    ("resnet20_altered", {"channels": 4000}, "does not fit its own architecture"),
    ("cada_net", {"widths": [3000, 3000, 3000]}, "does not fit its own architecture"),
    ("torchvision:vit_b_16", {"image_size": 16000}, "does not fit its own architecture"),
])
def test_builder_arguments_are_estimated_before_the_model_is_built(tmp_path, good, source, kwargs, fragment):
    path = variant(tmp_path, good, "kw.pt", source={"spec": source, "num_classes": None, "kwargs": kwargs})
    refused(tmp_path, "inspect", path, fragment=fragment)


def test_a_recorded_input_shape_goes_through_the_memory_estimate(tmp_path, good):
    limit = {MEMORY_ENV: "2GB"}
    path = variant(tmp_path, good, "big.pt", input_shape=[3, 2048, 2048])
    refused(tmp_path, "inspect", path, fragment="for one 3x2048x2048 input, estimated before building), more than the 2.0 GB available", env=limit)
    code, lines, above = cli(tmp_path, "inspect", variant(tmp_path, good, "small.pt", input_shape=[3, 32, 32]), env=limit)
    assert code == 0, lines  # the same recipe at its usual size fits the same limit


def test_an_input_shape_too_large_for_memory_is_one_line_before_any_data(tmp_path):
    refused(tmp_path, "eval", "resnet20", "--input-shape", "3,4096,4096", "--data", "digits", fragment="for one 3x4096x4096 input",
            env={MEMORY_ENV: "8GB"})


# -- tracebacks of item 5 -------------------------------------------------------------------------
@pytest.mark.parametrize("make, fragment", [
    (lambda: torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.ones(1), (10, 64), check_invariants=True),
     "holds a sparse tensor at ['state_dict']['fc.weight']"),
    (lambda: torch.empty(10, 64, device="meta"), "holds a meta tensor"),
])
def test_sparse_and_meta_tensors_are_refused_in_recipes_and_weights(tmp_path, good, make, fragment):
    refused(tmp_path, "inspect", variant(tmp_path, good, "r.pt", state_dict=with_state(good, **{"fc.weight": make()})), fragment=fragment)
    weights = with_state(good, **{"fc.weight": make()})
    torch.save(weights, tmp_path / "w.pt")
    refused(tmp_path, "inspect", "resnet20", "--weights", tmp_path / "w.pt", fragment=fragment.replace("['state_dict']", ""))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_a_complex_or_integer_tensor_is_not_a_float_parameter(tmp_path, good, dtype):
    torch.save(with_state(good, **{"fc.weight": torch.zeros(10, 64, dtype=dtype)}), tmp_path / "w.pt")
    with pytest.raises(ModelSourceError, match=f"1 of another kind of number \\(e.g. fc.weight {str(dtype)[6:]} vs float32\\)"):
        gp.load_model("resnet20", weights=str(tmp_path / "w.pt"))


def test_metadata_prunes_that_is_not_a_list_is_one_line(tmp_path, good):
    path = variant(tmp_path, good, "p.pt", metadata={"prunes": 5})
    one_line_error(run("prune", path, "-o", tmp_path / "out.pt", "--threshold", "0.1"), "'metadata' has 'prunes' 5 (int), not a list of prune records")


def test_inspect_png_of_a_recipe_with_odd_finetune_metadata(tmp_path):
    model, recipe = gp.load_model("resnet20")
    recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(first=1, fit_steps=1), recipe.input_shape).step)
    path = gp.save_recipe(tmp_path / "c.pt", model, recipe.with_metadata(finetune=5))
    result = run("inspect", path, "--png", tmp_path / "banks.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "banks.png").stat().st_size > 0


def test_a_relative_module_spec_is_one_line():
    one_line_error(run("inspect", ".x:y"), "'.x' is not a module name")


def test_deep_metadata_is_refused_when_saving_with_the_reason(tmp_path):
    model, recipe = gp.load_model("resnet20")
    deep = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(RecipeError, match="its metadata must be plain data .* nested at most 16 levels deep; the entry 'notes'"):
        gp.save_recipe(tmp_path / "d.pt", model, recipe.with_metadata(notes=deep))
    assert not (tmp_path / "d.pt").exists()


# -- the checks themselves, and what they let through -----------------------------------------------
def test_containers_that_hold_themselves_or_nest_too_deep_are_refused_quickly():
    loop = []
    loop.append(loop)
    with pytest.raises(_load._BadFile, match="contains itself"):
        _load.walk({"metadata": loop}, lambda t, where: None)
    shared = []
    for _ in range(60):  # each level holds the one below twice: 2**60 paths, one walk each
        shared = [shared, shared]
    with pytest.raises(_load._BadFile, match="more than 32 levels deep"):
        _load.walk(shared, lambda t, where: None)
    fine = []
    for _ in range(20):
        fine = [fine, fine]
    assert _load.walk(fine, lambda t, where: None) == 0


def test_the_pickle_size_is_capped(tmp_path, good, monkeypatch):
    monkeypatch.setattr(_load, "MAX_PICKLE", 1000)
    with pytest.raises(RecipeError, match="has a pickle of .* more than the 1000 bytes read"):
        gp.read_recipe(good[0])


def test_legitimate_layouts_still_load(tmp_path, good):
    """Permuted (channels-last, transposed) views, tied tensors, half-precision weights, and storages
    larger than their view all hold each value once: they load as before."""
    model, _ = gp.load_model("resnet20")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.weight"] = state["conv1.weight"].contiguous(memory_format=torch.channels_last)
    state["fc.weight"] = state["fc.weight"].t().contiguous().t()  # strides (1, 10)
    state["fc.bias"] = torch.cat([state["fc.bias"], torch.zeros(5)])[:10]  # a view of a larger storage
    state["layer1.0.bn1.weight"] = state["layer1.0.bn1.weight"].half()
    torch.save(state, tmp_path / "w.pt")
    loaded, _ = gp.load_model("resnet20", weights=str(tmp_path / "w.pt"))
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)
    torch.testing.assert_close(loaded.conv1.weight, model.conv1.weight)
    tied = nn.Linear(4, 4)
    torch.save({"a": tied.weight, "b": tied.weight}, tmp_path / "tied.pt")
    assert _load.check_torch_file(tmp_path / "tied.pt") is True
    recipe, state = gp.read_recipe(good[0])
    assert recipe.input_shape == (3, 32, 32) and len(state) == len(good[1]["state_dict"])
