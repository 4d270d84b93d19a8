"""Helpers the test modules share: the CLI runner and its one-line error check, the pruning families
with dead channels and their masked oracle, BatchNorm randomizing, a pruned family model, and the
ranked model and fake timer of the prune-to-target tests."""

import copy

import torch
from torch import nn
from typer.testing import CliRunner

import gaborprune as gp
import tiny_models
from gaborprune.cli import app
from gaborprune.prune import PruneSpec, prune_model_
from gaborprune.recipe import Recipe

# -- the command line (was in test_cli.py) ---------------------------------------------------------
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- pruning (was in test_prune.py) ----------------------------------------------------------------
SHAPE = (3, 16, 16)
ONLY_DEAD = PruneSpec(threshold=1e-6)  # removes exactly the kernels of channels whose BN gain is 0


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def kill(norm, channels, beta):
    """Make channels dead: BN gain 0 gives their kernels strength 0; the channel then emits act(beta)."""
    with torch.no_grad():
        norm.weight[channels] = 0
        norm.bias[channels] = beta


def masked_reference(model, plan):
    """The oracle: the original model with the plan's kernels masked, nothing cut out."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, pairs in plan.kernels.items():
            for o, i in pairs:
                modules[name].mask[o, i] = 0
    return ref


def setup_chain(m):
    kill(m.bn1, [0, 1, 2], -1.0)  # relu(-1) = 0: removable
    kill(m.bn1, [3, 4], 0.5)  # 0.5 into a zero-padded 3x3 conv: kept
    return {"g1": (5, 3), "bn1": 5, "conv2": (16, 5)}, {("g1", 3), ("g1", 4)}


def setup_folds(m):
    kill(m.bn1, [0, 1], -1.0)
    kill(m.bn1, [2, 3], 0.5)  # folds into g2's bias (1x1, no padding)
    kill(m.bn2, [0], -1.0)
    kill(m.bn2, [1, 2], 0.5)  # folds into bn3's running mean (p has no bias) and the head's bias
    return {"g1": (4, 3), "g2": (5, 4), "bn2": 5, "p": (8, 5), "head": 13}, set()


def setup_residual(m):
    kill(m.bn1, [0, 1, 2], -1.0)
    kill(m.bn2, [0, 1, 3], -1.0)  # 0 and 1 are dead on both sides of the addition: removable
    return {"g1": (6, 3), "bn1": 6, "g2": (6, 6), "bn2": 6, "conv3": (16, 6), "shortcut": (16, 6)}, {("g1", 2), ("g2", 3)}


def setup_dense(m):
    kill(m.norm0, [0, 1], -1.0)
    kill(m.norm0, [2], 0.5)  # reaches only 1x1 convs after BN + ReLU: folds everywhere
    return {"stem": (5, 3), "layers.0.norm1": 5, "layers.0.conv1": (8, 5), "layers.1.norm1": 9,
            "layers.1.conv1": (8, 9), "norm_t": 13, "conv_t": (8, 13)}, set()


def setup_mobile(m):
    kill(m.stem[1], [0, 1], -1.0)  # 0 through the depthwise conv stays 0, then folds into pw's BN
    kill(m.stem[1], [2], 0.5)  # a zero-padded depthwise conv makes the constant uneven: kept
    return {"stem.0": (6, 3), "stem.1": 6, "dw.0": (6, 6), "dw.1": 6, "pw.0": (16, 6)}, {("stem.0", 2)}


FAMILIES = {
    "vgg-chain": (tiny_models.Chain, setup_chain),
    "folds": (tiny_models.Folds, setup_folds),
    "resnet-residual": (tiny_models.Residual, setup_residual),
    "densenet-concat": (tiny_models.Dense, setup_dense),
    "mobilenet-depthwise": (tiny_models.Mobile, setup_mobile),
}


# -- structure (was in test_structure.py) ----------------------------------------------------------
def scale_channels_with_their_norms_(changes) -> None:
    """For each (bank, BatchNorm, output channel o, factor k): scale the channel's amplitudes by k and
    the BatchNorm's statistics to match, which leaves the function unchanged (eps 0)."""
    for bank, bn, o, k in changes:
        bank.amplitude[o] *= k
        bn.running_mean[o] *= k
        bn.running_var[o] *= k * k


# -- export (was in test_export.py) ----------------------------------------------------------------
def pruned_family(family, seed=0, sparsify=True):
    """A family model with its dead channels pruned and (sparsify) random kernels of its Gabor banks masked."""
    build, setup = FAMILIES[family]
    torch.manual_seed(seed)
    model = randomize_norms(build()).eval()
    setup(model)
    recipe = Recipe(gp.ModelSource(f"tiny_models:{build.__name__}"), SHAPE, (prune_model_(model, SHAPE, ONLY_DEAD).step,))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules() if sparsify else []:
            if isinstance(m, gp.GaborConv2d):
                m.mask.mul_((torch.rand(m.mask.shape, generator=g) > 0.5).float())  # kernel-sparse inside live channels
    return model, recipe


# -- prune to a target (was in test_prune_target.py) -----------------------------------------------
BASE_MS = 0.26  # the fake time of the unpruned model (conv1 has 16 output channels)


def ranked_model(num_classes: int = 10):
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20_altered", input_shape=SHAPE, num_classes=num_classes)
    with torch.no_grad():
        model.bn1.weight.copy_((torch.arange(16) + 1) / 16)
    return model.eval(), recipe


class FakeTimer:
    """Times from conv1's output channels; a flat or given profile."""

    def __init__(self, model=None, shape=None, batch=1, threads=1, *, penalty=0.0, profile=None):
        self.penalty, self._profile = penalty, profile or {"conv1": 0.0, "other": 1.0}
        self.timed: list[int] = []

    def cost(self, model) -> float:
        c = model.conv1.out_channels
        return 0.1 + 0.01 * c + (self.penalty if c % 4 else 0.0)

    def profile(self, layers):
        return dict(self._profile)

    def time(self, candidate):
        self.timed.append(candidate.conv1.out_channels)
        c = self.cost(candidate)
        return [BASE_MS] * 40, [c * (1 + 0.01 * ((i % 5) - 2)) for i in range(40)]
