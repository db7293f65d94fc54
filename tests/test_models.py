"""models.py of both folders against SPEC §3, §4 and §7: sizes, FLOPs, outputs, init, the pair."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_folder

AUX_PREFIXES = ("aux1.", "aux2.")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_on_meta(factory):
    """Build without allocating or initialising weights: parameter counts and FLOPs depend only on shapes."""
    with torch.device("meta"):
        return factory()


def forward_gflop(model, device):
    """GFLOP (2 x multiply-adds) of one forward pass on one 32x32 image."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32, device=device))
    return counter.get_total_flops() / 1e9


def decimals(text):
    return len(text.split(".")[1]) if "." in text else 0


def backbone_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(AUX_PREFIXES)}


def randomise_bn_statistics(model, generator):
    # Default running stats (0, 1) would hide a head that reads the wrong BN buffers.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


# --- sizes against the paper ----------------------------------------------------------------------

def test_wrn_28_10_has_36_5m_parameters_without_aux(folder):
    models = load_folder(folder).models
    n = count_parameters(build_on_meta(lambda: models.wrn(28, 10, 100, aux=False)))
    assert round(n / 1e6, 1) == 36.5
    assert n == 36_536_884


def test_mobilenet_has_3_31m_parameters_without_aux():
    models = load_folder("wrn_mobi").models
    n = count_parameters(build_on_meta(lambda: models.mobilenet(100, aux=False)))
    assert round(n / 1e6, 2) == 3.31
    assert n == 3_309_476


def test_aux_branches_add_parameters_only_under_aux_prefixes(folder):
    models = load_folder(folder).models
    with_aux, without_aux = models.wrn(16, 1, 10, aux=True), models.wrn(16, 1, 10, aux=False)
    assert set(backbone_state(with_aux)) == set(without_aux.state_dict())
    assert count_parameters(with_aux) > count_parameters(without_aux)


# --- forward cost, SPEC §7 --------------------------------------------------------------------------

SMALL_WRN_GFLOP = [(16, 1, False, "0.053"), (16, 1, True, "0.139"), (16, 2, False, "0.20"), (16, 2, True, "0.55")]


@pytest.mark.parametrize("depth,width,aux,expected", SMALL_WRN_GFLOP)
def test_small_wrn_forward_gflop_matches_spec(folder, depth, width, aux, expected):
    models = load_folder(folder).models
    gflop = forward_gflop(models.wrn(depth, width, 100, aux), torch.device("cpu"))
    assert round(gflop, decimals(expected)) == float(expected), gflop
    assert gflop == pytest.approx(float(expected), rel=0.015)


@pytest.mark.parametrize("aux,expected", [(False, "10.5"), (True, "29.5")])
def test_wrn_28_10_forward_gflop_matches_spec(folder, aux, expected):
    models = load_folder(folder).models
    # On the meta device: the count is the same as on the CPU, without 10-30 GFLOP of work.
    gflop = forward_gflop(build_on_meta(lambda: models.wrn(28, 10, 100, aux)), torch.device("meta"))
    assert round(gflop, decimals(expected)) == float(expected), gflop
    assert gflop == pytest.approx(float(expected), rel=0.01)


@pytest.mark.parametrize("aux,expected", [(False, "1.22"), (True, "2.58")])
def test_mobilenet_forward_gflop_matches_spec(aux, expected):
    models = load_folder("wrn_mobi").models
    gflop = forward_gflop(build_on_meta(lambda: models.mobilenet(100, aux)), torch.device("meta"))
    assert round(gflop, decimals(expected)) == float(expected), gflop
    assert gflop == pytest.approx(float(expected), rel=0.01)


# --- outputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,width,num_classes,aux", [
    (16, 1, 10, True), (16, 1, 10, False), (22, 2, 100, True), (16, 4, 7, True), (10, 1, 5, False)])
def test_wrn_returns_one_logits_tensor_per_classifier(folder, depth, width, num_classes, aux):
    models = load_folder(folder).models
    torch.manual_seed(0)
    outputs = models.wrn(depth, width, num_classes, aux)(torch.randn(3, 3, 32, 32))
    assert isinstance(outputs, list)
    assert len(outputs) == (3 if aux else 1)
    for logits in outputs:
        assert logits.shape == (3, num_classes)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("num_classes,aux", [(10, True), (100, False)])
def test_mobilenet_returns_one_logits_tensor_per_classifier(num_classes, aux):
    models = load_folder("wrn_mobi").models
    torch.manual_seed(0)
    outputs = models.mobilenet(num_classes, aux)(torch.randn(2, 3, 32, 32))
    assert isinstance(outputs, list)
    assert [o.shape for o in outputs] == [(2, num_classes)] * (3 if aux else 1)


def test_outputs_are_ordered_shallow_to_deep_with_the_final_classifier_last(folder):
    models = load_folder(folder).models
    torch.manual_seed(0)
    model = models.wrn(16, 1, 10, aux=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        aux1, aux2, final = model(x)
        assert torch.equal(aux1, model.aux1(model.group0(model.conv0(x))))
        assert torch.equal(aux2, model.aux2(model.group1(model.group0(model.conv0(x)))))
        assert torch.equal(final, model.head(model.group2(model.group1(model.group0(model.conv0(x))))))


# --- invalid depths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [15, 20, 4, 0, -2])
def test_wrn_rejects_depths_that_are_not_6n_plus_4(folder, depth):
    models = load_folder(folder).models
    for aux in (True, False):
        with pytest.raises(ValueError, match=rf"6n\+4.*got {depth}"):
            models.wrn(depth, 1, 10, aux)


def test_wrn_10_cannot_carry_aux_branches_but_works_without(folder):
    models = load_folder(folder).models
    with pytest.raises(ValueError, match=r"(?i)WRN-10.*aux"):
        models.wrn(10, 1, 10, aux=True)
    assert len(models.wrn(10, 1, 10, aux=False)(torch.zeros(1, 3, 32, 32))) == 1


# --- the deployed network: aux=False loads the backbone of aux=True --------------------------------

def assert_backbone_transfer(build, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trained = build(True)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    randomise_bn_statistics(trained, generator)
    deployed = build(False)
    deployed.load_state_dict(backbone_state(trained), strict=True)
    trained.eval(), deployed.eval()
    x = torch.randn(4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = trained(x)[-1]
        (actual,) = deployed(x)
    assert torch.equal(actual, expected)


def test_wrn_without_aux_loads_backbone_and_matches_final_logits(folder):
    models = load_folder(folder).models
    assert_backbone_transfer(lambda aux: models.wrn(16, 2, 10, aux), seed=3)


def test_mobilenet_without_aux_loads_backbone_and_matches_final_logits():
    models = load_folder("wrn_mobi").models
    assert_backbone_transfer(lambda aux: models.mobilenet(10, aux), seed=4)


# --- initialisation, SPEC §4 ------------------------------------------------------------------------

def test_wrn_batchnorm_init_is_uniform_weight_and_zero_bias(folder):
    models = load_folder(folder).models
    torch.manual_seed(0)
    model = models.wrn(16, 2, 10, aux=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    weights = torch.cat([bn.weight.detach() for bn in bns])
    assert (weights >= 0).all() and (weights < 1).all()
    # U[0, 1) over thousands of values spans nearly the whole interval; a constant init does not.
    assert weights.min() < 0.05 and weights.max() > 0.95
    assert weights.mean().item() == pytest.approx(0.5, abs=0.05)
    for bn in bns:
        assert torch.count_nonzero(bn.bias) == 0


def test_wrn_fc_bias_is_zero(folder):
    models = load_folder(folder).models
    torch.manual_seed(0)
    fcs = [m for m in models.wrn(16, 1, 10, aux=True).modules() if isinstance(m, nn.Linear)]
    assert len(fcs) == 3
    for fc in fcs:
        assert torch.count_nonzero(fc.bias) == 0


def test_wrn_conv_and_fc_weights_are_kaiming_normal_fan_in(folder):
    models = load_folder(folder).models
    torch.manual_seed(0)
    model = models.wrn(16, 4, 100, aux=True)
    checked = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.numel() >= 20_000:
            weight = module.weight.detach()
            fan_in = weight[0].numel()
            expected_std = math.sqrt(2 / fan_in)
            assert weight.std().item() == pytest.approx(expected_std, rel=0.1), name
            assert abs(weight.mean().item()) < 0.1 * expected_std, name
            checked.append(name)
    # Convs that change width are where fan_in and fan_out (the wrong mode) differ.
    widening = [n for n in checked if isinstance(model.get_submodule(n), nn.Conv2d)
                and model.get_submodule(n).in_channels != model.get_submodule(n).out_channels]
    assert widening
    assert "head.fc" in checked
    # 590k weights: the sample std is within 0.2% of the true one.
    big_conv = model.group2[1].conv1.weight.detach()
    assert big_conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)


def test_wrn_convs_have_no_bias(folder):
    models = load_folder(folder).models
    convs = [m for m in models.wrn(16, 1, 10, aux=True).modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.bias is None for conv in convs)


@pytest.mark.parametrize("aux,num_depthwise", [(False, 13), (True, 13 + 6 + 2)])
def test_mobilenet_convs_are_biasless_and_depthwise_separable(aux, num_depthwise):
    models = load_folder("wrn_mobi").models
    convs = [m for m in build_on_meta(lambda: models.mobilenet(10, aux)).modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is None for conv in convs)
    stem, blocks = convs[0], convs[1:]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 32, (3, 3), (1, 1))
    depthwise = [c for c in blocks if c.kernel_size == (3, 3)]
    pointwise = [c for c in blocks if c.kernel_size == (1, 1)]
    assert len(depthwise) == len(pointwise) == num_depthwise
    assert len(depthwise) + len(pointwise) == len(blocks)
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels
    for conv in pointwise:
        assert conv.groups == 1


def test_mobilenet_keeps_pytorch_default_batchnorm_init():
    models = load_folder("wrn_mobi").models
    bns = [m for m in models.mobilenet(10, aux=False).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# --- the pair each folder trains --------------------------------------------------------------------

def test_wrn_folder_pairs_two_identical_wrns():
    models = load_folder("wrn").models
    torch.manual_seed(0)
    net1, net2 = models.build_pair(16, 2, 10, True)
    assert type(net1) is models.WideResNet and type(net2) is models.WideResNet
    assert count_parameters(net1) == count_parameters(net2) == count_parameters(models.wrn(16, 2, 10, True))
    assert net1 is not net2
    assert not torch.equal(net1.conv0.weight, net2.conv0.weight)  # independently initialised
    assert models.pair_names(16, 2) == ("wrn-16-2", "wrn-16-2")


def test_wrn_mobi_folder_pairs_wrn_with_mobilenet():
    models = load_folder("wrn_mobi").models
    net1, net2 = build_on_meta(lambda: models.build_pair(16, 2, 10, True))
    assert type(net1) is models.WideResNet and type(net2) is models.MobileNet
    assert count_parameters(net1) == count_parameters(build_on_meta(lambda: models.wrn(16, 2, 10, True)))
    assert count_parameters(net2) == count_parameters(build_on_meta(lambda: models.mobilenet(10, True)))
    assert models.pair_names(16, 2) == ("wrn-16-2", "mobilenet")


@pytest.mark.parametrize("aux", [True, False])
def test_build_pair_respects_aux(folder, aux):
    models = load_folder(folder).models
    nets = build_on_meta(lambda: models.build_pair(16, 1, 10, aux))
    for net in nets:
        assert (net.aux1 is not None) == aux and (net.aux2 is not None) == aux
        assert len(net(torch.zeros(1, 3, 32, 32, device="meta"))) == (3 if aux else 1)
