"""The sparsity measure: invariant to the scale BatchNorm absorbs, and it really sparsifies."""

import contextlib
import math

import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.convert import GaborConv2d
from gaborprune.sparsity import GaborSparsity, following_norms, kernel_strength, l1_l2_ratio


class ConvBN(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.conv = GaborConv2d(3, 8, 5, padding=2, bias=not bn)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.act = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def test_l1_l2_ratio_closed_form():
    assert float(l1_l2_ratio(torch.ones(16))) == pytest.approx(4.0)
    assert float(l1_l2_ratio(torch.tensor([0.0, 3.0, 0.0]))) == pytest.approx(1.0)
    assert float(l1_l2_ratio(torch.tensor([3.0, 4.0]))) == pytest.approx(7 / 5)


def test_following_norms_by_dataflow():
    assert following_norms(ConvBN(), (3, 8, 8)) == {"conv": "bn"}
    assert following_norms(ConvBN(bn=False), (3, 8, 8)) == {}
    model, recipe = gp.load_model("resnet20_altered")
    assert following_norms(model, recipe.input_shape) == {"conv1": "bn1", "conv2": "bn2"}
    tv, r = gp.load_model("torchvision:mobilenet_v3_small")
    gp.gaborize_(tv, gp.ConversionSpec(first=2, init="random"), r.input_shape)
    assert following_norms(tv, (3, 64, 64)) == {"features.0.0": "features.0.1", "features.1.block.0.0": "features.1.block.0.1"}


def test_shrinking_a_channel_under_batchnorm_is_not_sparsity():
    torch.manual_seed(0)
    model = ConvBN()
    nn.init.uniform_(model.bn.weight, 0.5, 1.5)
    sparsity = GaborSparsity(model, (3, 8, 8))
    before_s, before_p = sparsity.relative_strengths()["conv"].clone(), sparsity.penalty().item()
    with torch.no_grad():
        model.conv.amplitude[2] *= 1e-3  # BN would divide this out: the function is unchanged
        model.conv.amplitude[5] *= 40.0
    torch.testing.assert_close(sparsity.relative_strengths()["conv"], before_s, rtol=1e-5, atol=1e-7)
    assert sparsity.penalty().item() == pytest.approx(before_p, rel=1e-5)
    # ...whereas the BN gain is the channel's real strength: zero it and the channel is dead
    with torch.no_grad():
        model.bn.weight[2] = 0
    assert (sparsity.relative_strengths()["conv"][2] == 0).all()
    assert sparsity.alive()["conv"] == 8 * 3 - 3


def test_without_batchnorm_raw_strength_and_layer_scale_invariance():
    torch.manual_seed(0)
    model = ConvBN(bn=False)
    sparsity = GaborSparsity(model, (3, 8, 8))
    torch.testing.assert_close(kernel_strength(model.conv), model.conv.weight.flatten(2).norm(dim=2))
    p = sparsity.penalty().item()
    with torch.no_grad():
        model.conv.amplitude *= 7.0
    assert sparsity.penalty().item() == pytest.approx(p, rel=1e-5)


def test_masked_kernels_count_as_dead():
    model = ConvBN()
    model.conv.mask[0] = 0
    assert GaborSparsity(model, (3, 8, 8)).alive()["conv"] == 24 - 3


def test_the_penalty_concentrates_strength_in_few_kernels():
    torch.manual_seed(0)
    model = ConvBN()
    sparsity = GaborSparsity(model, (3, 8, 8))
    start = sparsity.penalty().item()
    assert start > 0.8 * math.sqrt(24) and sparsity.alive()["conv"] == 24
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        sparsity.penalty().backward()
        opt.step()
    assert sparsity.penalty().item() < 0.5 * start
    alive = sparsity.alive()["conv"]
    assert 1 <= alive <= 8, alive
    assert sparsity.relative_strengths()["conv"].max() == 1.0


def test_penalty_reuses_the_forward_kernels_inside_track_forward():
    """The same value and gradients as computing the kernels again, with one kernel evaluation per
    bank per step; a second penalty computes them afresh."""
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20")
    gp.gaborize_(model, gp.ConversionSpec(first=2, init="random"), recipe.input_shape)
    sparsity = GaborSparsity(model, recipe.input_shape)
    x = torch.randn(2, 3, 32, 32)

    def step(track: bool):
        model.zero_grad()
        calls = []
        original = GaborConv2d.weight.fget
        GaborConv2d.weight = property(lambda self: calls.append(1) or original(self))
        try:
            with sparsity.track_forward() if track else contextlib.nullcontext():
                loss = model(x).square().mean() + sparsity.penalty()
                again = sparsity.penalty()  # the forward's kernels served the first penalty
        finally:
            GaborConv2d.weight = property(original)
        loss.backward()
        return float(loss.detach()), float(again.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss, again, grads, calls = step(track=True)
    loss_ref, again_ref, grads_ref, calls_ref = step(track=False)
    assert loss == loss_ref and again == again_ref
    assert (calls, calls_ref) == (2 * 2, 3 * 2)  # forward + second penalty, vs forward + two penalties
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)  # summed before or after the kernel function
    assert all(m.take_weight() is None for m in sparsity.layers.values())  # nothing kept after the context
