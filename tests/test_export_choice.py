"""Export chooses its form by measurement: never the slower one, plain dense unless another is faster
beyond the noise; no all-zero bias maps; bias maps counted; the CPU block read from cpuinfo; a plain
line when kernel-level pruning cannot become time. Every timing here is injected."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import gaborprune as gp
import tiny_models
from gaborprune import cpu
from gaborprune.cpu import cpu_block
from gaborprune.export import MapBias, lower, search as search_module
from gaborprune.export.api import KERNELS_NOT_TIME, ExportConfig, export_model, speed_note
from gaborprune.export.macs import onnx_counts
from gaborprune.export.runtime import Latency, run, session
from gaborprune.export.search import Form, Lowerings, decide
from gaborprune.recipe import Recipe, save_recipe
from helpers import SHAPE, pruned_family, randomize_norms, run as cli

torch.set_grad_enabled(True)


def fake_times(factor, noise=0.03, seed=0):
    """A stand-in for `time_interleaved`: run i of session k takes base_i * factor(k) * (1 +- noise),
    base_i shared by the run (the machine's drift, which the per-run ratio cancels)."""
    rng = np.random.default_rng(seed)

    def time_interleaved(sessions, x, warmup, runs):
        base = rng.uniform(0.8, 1.6, size=runs)  # ms; a heavy spread, like a shared CPU's
        return [Latency.of(list(base * factor(k, s) * (1 + rng.uniform(-noise, noise, runs)) / 1e3)) for k, s in enumerate(sessions)]
    return time_interleaved


@pytest.fixture
def timed(monkeypatch):
    """Inject timings by candidate position (0: the baseline), fix the CPU block at 16 and profile
    every layer flat (no layer is faster split), so no real timing picks the candidates."""
    monkeypatch.setattr(cpu, "cpu_block", lambda cpuinfo=None: 16)
    monkeypatch.setattr(search_module, "profile", lambda blob, proto, x, layers, threads: dict.fromkeys(layers, 1.0))

    def use(factors):
        monkeypatch.setattr(search_module, "time_interleaved", fake_times(lambda k, s: factors[k]))
    return use


def kept(report):
    [c] = [c for c in report.candidates if c["kept"]]
    return c


def forms(report):
    return [(c["cut"], c["pad"], tuple(c["split"])) for c in report.candidates]


# vgg-chain after the recipe's prune: g1 keeps 5 channels, two of them a constant 0.5 into conv2
# (zero-padded: cut at export only with a bias map). Candidates, in order: plain dense, plain padded
# to x16, cut (with the map), cut and padded.
CHAIN_FORMS = [(False, 0, ()), (False, 16, ()), (True, 0, ()), (True, 16, ())]


@given(st.lists(st.sampled_from([0.7, 0.85, 1.0, 1.15, 1.3]), min_size=1, max_size=4), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_decide_keeps_the_fastest_only_beyond_noise(factors, seed):
    factors = [1.0, *factors]
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.8, 1.6, size=60)
    samples = [base * f * (1 + rng.uniform(-0.03, 0.03, 60)) for f in factors]
    k = decide(samples)
    assert factors[k] == min(factors)  # never a slower one; the baseline when none is faster
    assert decide(samples, [True] + [False] * (len(factors) - 1)) == 0


def test_timings_within_noise_keep_plain_dense(timed, tmp_path):
    model, recipe = pruned_family("vgg-chain", sparsify=False)
    timed([1.0, 1.0, 1.0, 1.0])
    report = export_model(model, SHAPE, tmp_path / "a.onnx", ExportConfig(threads=1))
    assert forms(report) == CHAIN_FORMS and report.pad_block == 16
    assert kept(report)["form"] == "plain dense" and "no candidate faster than plain dense beyond the noise" in report.lowering_note
    assert all(c["ratio"]["low"] <= 1 <= c["ratio"]["high"] for c in report.candidates[1:])
    assert not report.channels_cut and not report.bias_maps and not report.padded
    assert {n.op_type for n in onnx.load(tmp_path / "a.onnx").graph.node}.isdisjoint({"Add", "Pad"})


@pytest.fixture(scope="module")
def chain():
    """The vgg-chain forms, lowered and exported once for the tests that call `search` directly."""
    model, recipe = pruned_family("vgg-chain", sparsify=False)
    return Lowerings(model, SHAPE, 1)


def test_a_slower_candidate_is_never_kept(timed, chain):
    timed([1.0, 1.25, 1.3, 1.1])
    found = search_module.search(chain, threads=1)
    assert found.form == Form() and found.candidates[0].kept and not any(c.kept for c in found.candidates[1:])


def test_a_candidate_faster_beyond_noise_is_kept(timed, tmp_path):
    model, recipe = pruned_family("vgg-chain", sparsify=False)
    timed([1.0, 0.8, 1.0, 0.95])
    report = export_model(model, SHAPE, tmp_path / "a.onnx", ExportConfig(threads=1))
    assert kept(report) == report.candidates[1] and kept(report)["ratio"]["high"] < 1
    assert report.pad == 16 and report.padded == ["g1"] and "padded to x16 kept" in report.lowering_note
    weights = {t.name: list(t.dims) for t in onnx.load(tmp_path / "a.onnx").graph.initializer}
    assert weights["g1.weight"][0] == 16 and weights["conv2.weight"][1] == 16  # grown with zero channels
    assert report.max_abs_diff <= 1e-4


def test_an_int8_export_chooses_its_form_on_int8_timings(timed, monkeypatch, tmp_path):
    # a form faster in float can be slower in int8 (a split layer was, 0.82x): the file written is int8, so time int8
    from gaborprune.export.bench_models import precision_of

    model, recipe = pruned_family("vgg-chain", sparsify=False)
    timed([1.0, 0.8, 1.0, 0.95])
    timed_precisions, real_session = [], search_module.session
    monkeypatch.setattr(search_module, "session", lambda blob, threads=None: timed_precisions.append(precision_of(onnx.load_from_string(blob)))
                        or real_session(blob, threads))
    report = export_model(model, SHAPE, tmp_path / "q.onnx", ExportConfig(threads=1, quantize=True))
    assert len(timed_precisions) == len(report.candidates) > 1 and set(timed_precisions) == {"int8"}
    assert precision_of(onnx.load(tmp_path / "q.onnx")) == "int8" and kept(report) == report.candidates[1]


def test_a_faster_but_bigger_candidate_is_not_kept(timed, chain):
    timed([1.0, 1.1, 0.7, 0.7])  # the cut forms are faster, but their bias map outweighs what they cut
    found = search_module.search(chain, threads=1)
    assert found.form == Form() and "are bigger" in found.reason
    assert found.candidates[2].params > found.candidates[0].params
    timed([1.0, 0.9, 1.0, 0.8])  # the fastest is bigger: the next fastest, faster than plain dense, is kept
    assert search_module.search(chain, threads=1).form == Form(pad=16)


def test_an_explicit_pad_applies_to_every_form_and_0_is_off(timed, chain):
    timed([1.0, 1.0])
    found = search_module.search(chain, pad=0, threads=1)
    assert [c.form for c in found.candidates] == [Form(), Form(cut=True)] and found.block == 0
    found = search_module.search(chain, pad=8, threads=1)
    assert [c.form for c in found.candidates] == [Form(pad=8), Form(cut=True, pad=8)]
    assert chain.lower(found.form)[1].padded == ["g1"]


class Maps(nn.Module):
    """Five constant channels of c1 into c2, a zero-padded 3x3 conv: 0 (relu of -1), one c2 ignores,
    one c2 reads through its centre taps only, and two whose contributions cancel."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        y = F.relu(self.bn2(self.c2(y)))
        return self.head(y.mean((2, 3)))


def maps_model():
    torch.manual_seed(0)
    m = randomize_norms(Maps()).eval()
    with torch.no_grad():
        m.c1.weight[:5] = 0
        m.bn1.running_mean[:5] = 0
        m.bn1.bias[:5] = torch.tensor([-1.0, 0.5, 0.5, 0.5, 0.5])
        m.c2.weight[:, 1] = 0
        centre = m.c2.weight[:, 2, 1, 1].clone()
        m.c2.weight[:, 2] = 0
        m.c2.weight[:, 2, 1, 1] = centre
        m.c2.weight[:, 4] = -m.c2.weight[:, 3]
    return m


def test_no_all_zero_or_constant_bias_map_is_emitted(tmp_path):
    model = maps_model()
    deploy, report = lower(model, SHAPE, cut=True)
    assert report.channels_cut["c1"]["out"] == [0, 1, 2, 3, 4]
    assert report.bias_maps == [] and report.biases_folded == ["c2"]  # the centre taps see the constant everywhere: a bias
    assert not any(isinstance(m, MapBias) for m in deploy.modules())
    export = export_model(model, SHAPE, tmp_path / "m.onnx", ExportConfig(lowering="sparse"))
    assert export.channels_cut and not export.bias_maps
    assert "Add" not in {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        np.testing.assert_allclose(run(session(str(tmp_path / "m.onnx"), 1), x[:1].numpy()), model(x[:1]).numpy(), atol=1e-5, rtol=0)
        assert (deploy(x) - model(x)).abs().max().item() <= 1e-5


def test_bias_map_parameters_are_counted(tmp_path):
    model, recipe = pruned_family("vgg-chain", sparsify=False)
    cut = export_model(model, SHAPE, tmp_path / "cut.onnx", ExportConfig(lowering="sparse"))
    plain = export_model(model, SHAPE, tmp_path / "plain.onnx", ExportConfig(lowering="dense"))
    assert cut.bias_maps == ["conv2"] and not plain.bias_maps
    # the map (16 x 8 x 8) in, two of g1's five channels (weights and bias) and conv2's columns for them out
    assert cut.params - plain.params == 16 * 8 * 8 - (2 * 3 * 9 + 2) - 16 * 2 * 9
    assert cut.params == onnx_counts(onnx.load(tmp_path / "cut.onnx")).params == cut.candidates[0]["params"]
    assert cut.file_bytes > plain.file_bytes


@pytest.mark.parametrize("text,block", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq\n", 16),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2\n", 8),
    ("flags\t\t: fpu sse2 avx avx512_bf16\n", 0),  # no avx512f, no avx2
    ("Features\t: fp asimd evtstrm aes\n", 0),
    ("", 0),
])
def test_cpu_block_reads_the_flags_line(text, block):
    assert cpu_block(text) == block


def test_kernels_removed_inside_kept_channels_get_a_note(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Chain()).eval()
    with torch.no_grad():
        model.g1.mask[:, 0] = 0  # a third of the kernels, every channel kept
    recipe = Recipe(gp.ModelSource("tiny_models:Chain"), SHAPE)
    report = export_model(model, SHAPE, tmp_path / "k.onnx", ExportConfig(lowering="dense"), provenance=recipe.provenance())
    assert report.note == KERNELS_NOT_TIME and "`structure` channel" in report.note
    save_recipe(tmp_path / "k.pt", model, recipe)
    printed = cli("export", tmp_path / "k.pt", "--trust-factory", "-o", tmp_path / "k2.onnx", "--lowering", "dense").stdout
    assert f"note: {KERNELS_NOT_TIME}" in printed and "[yellow]" not in printed  # the CLI prints it verbatim
    assert report.macs < report.macs_executed
    pruned, precipe = pruned_family("vgg-chain")  # channels removed by the recipe, kernels inside the others too
    assert any(step.plan.channels for step in precipe.prunes)
    channel = export_model(pruned, SHAPE, tmp_path / "c.onnx", ExportConfig(lowering="dense"), provenance=precipe.provenance())
    assert channel.note == "" and speed_note(pruned, precipe.provenance()["channels_pruned"], channel) == ""
    assert speed_note(pruned, recipe.provenance()["channels_pruned"], channel) == KERNELS_NOT_TIME  # the same model, without the recipe's prune: the note
    dense = export_model(randomize_norms(tiny_models.Chain()).eval(), SHAPE, tmp_path / "d.onnx", ExportConfig(lowering="dense"),
                         provenance=recipe.provenance())
    assert dense.note == ""  # nothing pruned: nothing to say


class Untraceable(nn.Module):
    """torch.fx cannot trace a branch on a shape; torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.relu() if y.shape[0] > 0 else y


def test_steps_skipped_on_an_untraceable_model_are_reported(tmp_path):
    model = randomize_norms(Untraceable()).eval()
    deploy, report = lower(model, SHAPE, pad=16)
    assert report.skipped[0].startswith("BatchNorms not folded: torch.fx could not trace the model")
    assert report.skipped[1].startswith("channels not padded to a multiple of 16") and report.batchnorms_folded == 0
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert (deploy(x) - model(x)).abs().max().item() <= 1e-6
    export = export_model(model, SHAPE, tmp_path / "u.onnx", ExportConfig(lowering="dense"))
    assert export.skipped and "could not trace" in export.skipped[0]


def test_cli_prints_each_candidate_and_the_choice(timed, tmp_path):
    model, recipe = pruned_family("vgg-chain", sparsify=False)
    save_recipe(tmp_path / "r.pt", model, recipe)
    timed([1.0, 1.0, 1.0, 1.0])
    result = cli("export", tmp_path / "r.pt", "--trust-factory", "-o", tmp_path / "r.onnx", "--threads", "1", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "params" in line and "ms [" in line]
    assert len(lines) == 4 and lines[0].lstrip().startswith("kept  plain dense:") and "(baseline)" in lines[0]
    assert all("time ratio" in line for line in lines[1:])
    assert "lowering: plain dense kept: no candidate faster" in result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [c["kept"] for c in saved["candidates"]] == [True, False, False, False] and saved["pad_block"] == 16


def test_the_block_can_be_set_for_another_cpu(monkeypatch):
    """GABORPRUNE_CPU_BLOCK names the target CPU's block (the suite pins it to 8); a bad value is one line."""
    monkeypatch.setenv("GABORPRUNE_CPU_BLOCK", "16")
    assert cpu_block() == 16 and cpu_block("flags\t: avx2\n") == 8  # an explicit cpuinfo text is read as given
    monkeypatch.setenv("GABORPRUNE_CPU_BLOCK", "0")
    assert cpu_block() == 0
    monkeypatch.setenv("GABORPRUNE_CPU_BLOCK", "avx512")
    with pytest.raises(gp.GaborPruneError, match="GABORPRUNE_CPU_BLOCK='avx512' is not a channel count"):
        cpu_block()


@pytest.mark.parametrize("block", [0, 8, 16])
def test_every_default_that_reads_the_block_follows_it(monkeypatch, chain, block):
    """No block, AVX2, AVX-512: pruning rounds to the block and export tries padding to it; with no
    block, neither rounds nor pads."""
    from gaborprune.prune import PruneSpec
    from gaborprune.workflows import _prune_spec

    monkeypatch.setenv("GABORPRUNE_CPU_BLOCK", str(block))
    assert _prune_spec(PruneSpec(scope="all"), None).round_to == (block or None)
    monkeypatch.setattr(search_module, "profile", lambda blob, proto, x, layers, threads: dict.fromkeys(layers, 1.0))
    monkeypatch.setattr(search_module, "time_interleaved", fake_times(lambda k, s: 1.0))
    found = search_module.search(chain, threads=1)
    assert found.block == block and {c.form.pad for c in found.candidates} == ({0, block} if block > 1 else {0})
