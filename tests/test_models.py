import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ltsearch.build import model_from_config
from ltsearch.config import ModelConfig
from ltsearch.models import (
    CLASSIFIER_BN,
    CLASSIFIERS,
    MODELS,
    ClassScale,
    CosineLinear,
    LTClassifier,
    NormalizedBatchNorm2d,
    SharedScale,
    ZeroPadShortcut,
    build_model,
    nbn_parameters,
)
from ltsearch.regularizers import tau_normalize

NUM_CLASSES = 10
# Defaults are 32x32 inputs, batch 4; the big models get smaller inputs to keep the suite fast.
IMAGENET_MODELS = ("resnet50", "resnext50_32x4d")  # 224 px backbones, tested at 64 px
INPUT_SIZE = dict.fromkeys(IMAGENET_MODELS, 64)
BATCH_SIZE = {**dict.fromkeys(IMAGENET_MODELS, 2), "resnet34_cifar": 2}
LAST_STAGE = {"resnet32": "layer3", "resnet32_a": "layer3", **dict.fromkeys(IMAGENET_MODELS, "layer4")}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(name: str = "resnet32", batch_size: int | None = None) -> torch.Tensor:
    size = INPUT_SIZE.get(name, 32)
    return torch.randn(batch_size or BATCH_SIZE.get(name, 4), 3, size, size)


def nbn_layers(model: nn.Module) -> dict[str, NormalizedBatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NormalizedBatchNorm2d)}


def randomize_affine(model: nn.Module) -> None:
    """BN biases start at zero, so their normalised direction is not observable until randomised."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()


@pytest.mark.parametrize("nbn", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name, nbn):
    model = build_model(name, NUM_CLASSES, nbn=nbn)
    x = images(name)
    logits = model(x)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.weight.shape == (NUM_CLASSES, model.feature_dim)
    assert model.features(x).shape == (x.shape[0], model.feature_dim)
    logits.sum().backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert (len(nbn_layers(model)) > 0) == nbn
    assert len(nbn_parameters(model)) == int(nbn)


def test_resnet32_param_count():
    model = build_model("resnet32", 100)
    num_params = sum(p.numel() for p in model.parameters())
    # Option B: 470,004 (option A, derivation above) + 2,752 for the two projection shortcuts.
    assert num_params == 472_756


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_backbones_have_torchvisions_parameter_count(name):
    """With 1,000 classes: the count torchvision publishes for its ImageNet weights (ResNet-50 25,557,032,
    ResNeXt-50 32x4d 25,028,904); with 100 classes: torchvision's own constructor; NBN adds alpha only."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    published = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta["num_params"]
    assert count(build_model(name, 1000)) == published
    assert count(build_model(name, 100)) == count(torchvision.models.get_model(name, weights=None, num_classes=100))
    assert count(build_model(name, 100, nbn=True, nbn_all_bn=True)) == count(build_model(name, 100)) + 1


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_backbone_nbn_trains_its_scale(name):
    """The NBN layers sit in layer4 (3 Bottlenecks: each bn3 and the first block's shortcut BN); a training
    step at 64 px gives logits of (batch, classes) and a gradient on the shared scale and on every layer."""
    model = model_from_config(ModelConfig(name=name, nbn=True), NUM_CLASSES)  # the config admits the name
    assert sorted(nbn_layers(model)) == ["features.layer4.0.bn3", "features.layer4.0.downsample.1",
                                         "features.layer4.1.bn3", "features.layer4.2.bn3"]
    assert model.feature_dim == 2048
    logits = model(images(name))
    assert logits.shape == (2, NUM_CLASSES)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert model.nbn_scale.alpha.grad.isfinite() and model.nbn_scale.alpha.grad.abs().item() > 0
    assert all(layer.weight.grad.abs().sum() > 0 for layer in nbn_layers(model).values())


# Parameters of the option-A ResNet-(6n+2) with C classes, counted by hand (convs have no bias; a BN has
# 2 parameters per channel; the shortcut has none):
#   stem     3x3 conv 3->16 + BN(16)                                    432 + 32               =     464
#   stage 1  n blocks of 2 convs 16->16 + 2 BN(16)                      n x (2 x 2,304 + 64)   = n x 4,672
#   stage 2  first block: convs 16->32 and 32->32 + 2 BN(32)            4,608 + 9,216 + 128    =  13,952
#            n - 1 blocks of 2 convs 32->32 + 2 BN(32)                  2 x 9,216 + 128        =  18,560 each
#   stage 3  first block: convs 32->64 and 64->64 + 2 BN(64)            18,432 + 36,864 + 256  =  55,552
#            n - 1 blocks of 2 convs 64->64 + 2 BN(64)                  2 x 36,864 + 256       =  73,984 each
#   head     Linear(64, C)                                              64 C + C
# ResNet-32 (n = 5), C = 10: 464 + 23,360 + 88,192 + 351,488 + 650 = 464,154, the count kaidic/LDAM-DRW's
# `models/resnet_cifar.py` prints for its resnet32 (its docstring: 0.46M; ResNet-20 0.27M, -56 0.85M).
# Option B adds two projections (16x32 + 64 and 32x64 + 128 = 2,752): 472,756 with C = 100, as above.
@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("resnet20_a", 10, 269_722),
        ("resnet20_a", 100, 275_572),
        ("resnet32_a", 10, 464_154),
        ("resnet32_a", 100, 470_004),
        ("resnet44_a", 10, 658_586),
        ("resnet56_a", 10, 853_018),
    ],
)
def test_option_a_param_count(name, num_classes, expected):
    model = build_model(name, num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", ["resnet20_a", "resnet32_a"])
def test_option_a_shortcut_is_parameter_free(name):
    features = build_model(name, NUM_CLASSES).features
    shortcuts = [m for m in features.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2  # entering stages 2 and 3; every other block has the identity shortcut
    assert [block.downsample is None for block in features.layer1] == [True] * len(features.layer1)
    for stage in (features.layer2, features.layer3):
        assert isinstance(stage[0].downsample, ZeroPadShortcut)
        assert all(block.downsample is None for block in stage[1:])
    for shortcut in shortcuts:
        assert list(shortcut.parameters()) == [] and list(shortcut.buffers()) == []
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in features.modules())


def test_zero_pad_shortcut_matches_reference_lambda():
    x = torch.randn(2, 16, 32, 32)
    planes = 32
    # The reference's LambdaLayer, written out.
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
    actual = ZeroPadShortcut(16, planes, stride=2)(x)
    assert actual.shape == (2, 32, 16, 16)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual[:, 8:24], x[:, :, ::2, ::2])
    assert actual[:, :8].abs().sum() == 0 and actual[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet20_a", "resnet32_a"])
def test_option_a_stage_shapes(name):
    model = build_model(name, 100)
    x = images(name)
    shapes = {}
    for stage in ("stem", "layer1", "layer2", "layer3"):
        getattr(model.features, stage).register_forward_hook(
            lambda m, i, out, stage=stage: shapes.__setitem__(stage, tuple(out.shape[1:]))
        )
    assert model(x).shape == (4, 100)
    assert shapes == {"stem": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16),
                      "layer3": (64, 8, 8)}
    assert model.feature_dim == 64


def test_option_a_init_is_kaiming_normal_fan_in():
    """The reference's `_weights_init`: kaiming_normal_ (fan_in, ReLU gain) on every conv AND the linear
    classifier; BN at PyTorch's defaults. Per-layer tolerance 12%: the smallest tensor (the stem, 432
    weights) has a std estimate with ~3.4% relative sd."""
    model = build_model("resnet32_a", NUM_CLASSES)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 32  # 31 convs + the classifier: ResNet-32's 32 weighted layers
    for layer in layers:
        fan_in = layer.weight[0].numel()
        expected = (2.0 / fan_in) ** 0.5
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.12), layer
        assert abs(layer.weight.mean().item()) < 0.2 * expected
    # fan_out would give the stride-2 convs 16->32 and 32->64 a std smaller by sqrt(2).
    for conv in (model.features.layer2[0].conv1, model.features.layer3[0].conv1):
        fan_out_std = (2.0 / (conv.out_channels * 9)) ** 0.5
        assert conv.weight.std().item() > 1.25 * fan_out_std
    # PyTorch's default Linear init has std 1/sqrt(3 fan_in) = 0.072 here; kaiming-normal 0.177.
    assert model.classifier.weight.std().item() > 0.15
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bool((bn.weight == 1).all()) and bool((bn.bias == 0).all())


def test_option_a_nbn_forward_and_alpha():
    model = build_model("resnet32_a", NUM_CLASSES, nbn=True)
    layers = nbn_layers(model)
    assert sorted(layers) == [f"features.layer3.{i}.bn2" for i in range(5)]
    F.cross_entropy(model(images()), torch.arange(4)).backward()
    assert model.nbn_scale.alpha.grad is not None and model.nbn_scale.alpha.grad.abs().item() > 0
    # The classifier init hook survives NBN conversion.
    assert model.classifier.weight.std().item() > 0.15


def test_alpha_stored_once():
    model = build_model("resnet32", NUM_CLASSES, nbn=True)
    assert [k for k in model.state_dict() if "alpha" in k] == ["nbn_scale.alpha"]
    assert [k for k, _ in model.named_parameters() if "alpha" in k] == ["nbn_scale.alpha"]
    assert nbn_parameters(model) == [model.nbn_scale.alpha]
    assert nbn_parameters(build_model("resnet32", NUM_CLASSES)) == []


@pytest.mark.parametrize(
    "name, all_bn, expected",
    [
        ("resnet32", False, 6),  # 5 blocks' bn2 + 1 downsample BN
        ("resnet32", True, 11),  # 5 blocks x (bn1, bn2) + 1 downsample BN
        ("resnet50", False, 4),  # 3 blocks' bn3 + 1 downsample BN
        ("resnet50", True, 10),  # 3 blocks x (bn1, bn2, bn3) + 1 downsample BN
        ("resnext50_32x4d", False, 4),  # the same Bottleneck layout, grouped 3x3 convs
        ("resnext50_32x4d", True, 10),
        ("resnet32_a", False, 5),  # 5 blocks' bn2; the option-A shortcut has no BN
        ("resnet32_a", True, 10),  # 5 blocks x (bn1, bn2)
    ],
)
def test_nbn_layers_are_in_last_stage_and_share_alpha(name, all_bn, expected):
    model = build_model(name, NUM_CLASSES, nbn=True, nbn_all_bn=all_bn)
    layers = nbn_layers(model)
    assert len(layers) == expected
    assert all(n.startswith(f"features.{LAST_STAGE[name]}.") for n in layers)
    assert all(layer._scale is model.nbn_scale for layer in layers.values())
    if not all_bn:
        closing = "bn3" if name in IMAGENET_MODELS else "bn2"
        assert all(n.endswith((closing, "downsample.1")) for n in layers)


def test_alpha_scales_every_nbn_layer():
    model = build_model("resnet32", NUM_CLASSES, nbn=True).eval()
    randomize_affine(model)
    layers = nbn_layers(model)
    outputs = {}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out))
    x = images()
    with torch.no_grad():
        model(x)
        before_outputs = dict(outputs)
        before_affine = {n: layer.effective_affine() for n, layer in layers.items()}
        model.nbn_scale.alpha.mul_(2)
        model(x)
    for name, layer in layers.items():
        weight, bias = layer.effective_affine()
        torch.testing.assert_close(weight, 2 * before_affine[name][0])
        torch.testing.assert_close(bias, 2 * before_affine[name][1])
        assert not torch.allclose(outputs[name], before_outputs[name])


def test_effective_affine_has_norm_alpha():
    model = build_model("resnet32", NUM_CLASSES, nbn=True)
    randomize_affine(model)
    with torch.no_grad():
        model.nbn_scale.alpha.fill_(0.7)
    for layer in nbn_layers(model).values():
        weight, bias = layer.effective_affine()
        assert weight.norm().item() == pytest.approx(0.7, rel=1e-5)
        assert bias.norm().item() == pytest.approx(0.7, rel=1e-5)


def test_gradient_reaches_alpha():
    model = build_model("resnet32", NUM_CLASSES, nbn=True)
    F.cross_entropy(model(images()), torch.arange(4)).backward()
    assert model.nbn_scale.alpha.grad is not None
    assert model.nbn_scale.alpha.grad.abs().item() > 0


def test_deepcopy_shares_the_copys_alpha():
    model = build_model("resnet32", NUM_CLASSES, nbn=True)
    clone = copy.deepcopy(model)
    assert clone.nbn_scale is not model.nbn_scale
    assert all(layer._scale is clone.nbn_scale for layer in nbn_layers(clone).values())


def test_loaded_alpha_reaches_every_nbn_layer():
    source = build_model("resnet8", NUM_CLASSES, nbn=True)
    with torch.no_grad():
        source.nbn_scale.alpha.fill_(3.0)
    target = build_model("resnet8", NUM_CLASSES, nbn=True)
    target.load_state_dict(source.state_dict())
    assert all(layer._scale.alpha.item() == 3.0 for layer in nbn_layers(target).values())


def test_dtype_conversion_keeps_alpha_shared():
    model = build_model("resnet8", NUM_CLASSES, nbn=True).double()
    assert model.nbn_scale.alpha.dtype == torch.float64
    assert all(layer._scale.alpha is model.nbn_scale.alpha for layer in nbn_layers(model).values())
    assert model(images().double()).dtype == torch.float64


def make_bn_pair(alpha: float, momentum: float | None = 0.1) -> tuple[NormalizedBatchNorm2d, nn.BatchNorm2d]:
    """An NBN layer and a plain BN with the same state whose affine params are normalised by hand."""
    channels = 8
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    scale = SharedScale()
    with torch.no_grad():
        scale.alpha.fill_(alpha)
    nbn = NormalizedBatchNorm2d(bn, scale)
    reference = copy.deepcopy(bn)
    with torch.no_grad():
        reference.weight.mul_(alpha / bn.weight.norm())
        reference.bias.mul_(alpha / bn.bias.norm())
    return nbn, reference


def test_nbn_matches_normalised_batchnorm_in_eval():
    nbn, reference = make_bn_pair(alpha=1.5)
    nbn.eval()
    reference.eval()
    x = torch.randn(4, 8, 5, 5)
    by_hand = (x - nbn.running_mean[:, None, None]) / torch.sqrt(nbn.running_var[:, None, None] + nbn.eps)
    by_hand = by_hand * reference.weight[:, None, None] + reference.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(nbn(x), by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nbn(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_nbn_running_stats_match_batchnorm_in_train(momentum):
    nbn, reference = make_bn_pair(alpha=0.5, momentum=momentum)
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(nbn(x), reference(x), rtol=1e-5, atol=1e-5)
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(nbn, buffer), getattr(reference, buffer))


def test_nbn_running_stats_update_only_in_train():
    nbn, _ = make_bn_pair(alpha=1.0)
    x = torch.randn(4, 8, 5, 5) * 3 + 2
    before = {key: value.clone() for key, value in nbn.state_dict().items()}
    with torch.no_grad():
        nbn.eval()(x)
    for key, value in nbn.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with torch.no_grad():
        nbn.train()(x)
    assert not torch.allclose(nbn.running_mean, before["running_mean"])
    assert not torch.allclose(nbn.running_var, before["running_var"])
    assert nbn.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


@pytest.mark.parametrize("classifier_bn", sorted(CLASSIFIER_BN))
def test_classifier_bn(classifier_bn):
    model = build_model("resnet8", NUM_CLASSES, classifier_bn=classifier_bn)
    if classifier_bn == "none":
        assert isinstance(model.logit_bn, nn.Identity)
    else:
        assert isinstance(model.logit_bn, nn.BatchNorm1d)
        assert model.logit_bn.affine == (classifier_bn == "affine")
    assert model(images()).shape == (4, NUM_CLASSES)


def test_logits_from_features():
    model = build_model("resnet8", NUM_CLASSES, classifier_bn="affine").eval()
    x = images()
    with torch.no_grad():
        feats = model.features(x)
        torch.testing.assert_close(model.logits_from_features(feats), model(x))
        weight = torch.randn(NUM_CLASSES, model.feature_dim)
        bias = torch.zeros(NUM_CLASSES)
        torch.testing.assert_close(
            model.logits_from_features(feats, weight, bias), model.logit_bn(feats @ weight.T)
        )


def test_invalid_names_raise():
    with pytest.raises(ValueError, match="resnet1000") as error:
        build_model("resnet1000", NUM_CLASSES)
    assert str(sorted(MODELS)) in str(error.value)
    with pytest.raises(ValueError, match="layer"):
        build_model("resnet8", NUM_CLASSES, classifier_bn="layer")


def test_channels_last_matches_contiguous():
    model = build_model("resnet8", NUM_CLASSES, nbn=True, classifier_bn="affine")
    randomize_affine(model)
    x = images()
    model.train()(x)  # make running stats non-trivial
    model.eval()
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        actual = channels_last(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_distributed_data_parallel_step(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = build_model("resnet8", NUM_CLASSES, nbn=True)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        alpha_before = model.nbn_scale.alpha.item()
        F.cross_entropy(ddp(images()), torch.arange(4)).backward()
        optimizer.step()
        assert model.nbn_scale.alpha.item() != alpha_before
        assert all(layer._scale is model.nbn_scale for layer in nbn_layers(model).values())
    finally:
        torch.distributed.destroy_process_group()


def test_ltclassifier_wraps_any_backbone():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    backbone.feature_dim = 6
    model = LTClassifier(backbone, NUM_CLASSES, nn.Identity())
    assert model.feature_dim == 6
    assert model.nbn_scale is None
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, NUM_CLASSES)


# ---------------------------------------------------------------- cosine classifier and LWS scales

def test_cosine_classifier_hand_example():
    # rows w_0 = [1, 0], w_1 = [0, 2]; feature f = [3, 4] (|f| = 5): cos = [3/5, 8/10]; scale 10 -> [6, 8]
    layer = CosineLinear(2, 2, scale=10.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert layer(torch.tensor([[3.0, 4.0]])).tolist() == [pytest.approx([6.0, 8.0])]
    assert layer.bias is None and set(layer.state_dict()) == {"weight"}


@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_cosine_classifier_logits_are_bounded_by_its_scale(scale):
    model = build_model("resnet8", NUM_CLASSES, classifier="cosine", cosine_scale=scale)
    assert isinstance(model.classifier, CosineLinear) and model.classifier.scale == scale
    # rows start at unit length (LDAM-DRW's NormedLinear init: uniform(-1, 1), renormalised)
    assert model.classifier.weight.norm(dim=1).tolist() == pytest.approx([1.0] * NUM_CLASSES, rel=1e-5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):  # bounded after training steps too, whatever the weights' norms become
        logits = model(images("resnet8") * 50)
        assert logits.abs().max().item() <= scale * (1 + 1e-5)
        optimizer.zero_grad()
        F.cross_entropy(logits, torch.arange(4)).backward()
        optimizer.step()


def test_cosine_classifier_is_unchanged_by_tau_normalisation_and_skips_kaiming_init():
    model = build_model("resnet32_a", NUM_CLASSES, classifier="cosine", cosine_scale=5.0).eval()
    # option-A ResNets kaiming-init a LINEAR classifier only (the reference's _weights_init skips NormedLinear)
    assert model.classifier.weight.norm(dim=1).tolist() == pytest.approx([1.0] * NUM_CLASSES, rel=1e-5)
    with torch.no_grad():
        model.classifier.weight.mul_(torch.linspace(0.5, 3.0, NUM_CLASSES).unsqueeze(1))  # unequal norms
        x = images("resnet32_a")
        feats = model.features(x)
        plain = model.logits_from_features(feats)
        torch.testing.assert_close(plain, model(x))
        tau = model.logits_from_features(feats, weight=tau_normalize(model.classifier.weight, 1.0))
    torch.testing.assert_close(tau, plain)


def test_model_from_config_builds_the_configured_classifier():
    model = model_from_config(ModelConfig(name="resnet8", classifier="cosine", cosine_scale=30.0), NUM_CLASSES)
    assert isinstance(model.classifier, CosineLinear) and model.classifier.scale == 30.0
    assert isinstance(model_from_config(ModelConfig(name="resnet8"), NUM_CLASSES).classifier, nn.Linear)
    assert set(CLASSIFIERS) == {"linear", "cosine"}
    with pytest.raises(ValueError, match="'arc'"):
        build_model("resnet8", NUM_CLASSES, classifier="arc")


def test_class_scale_multiplies_each_class_logit():
    model = build_model("resnet8", 3).eval()
    scale = model.use_class_scale()
    assert isinstance(model.logit_bn, ClassScale) and model.use_class_scale() is scale
    feats = torch.randn(2, model.feature_dim)
    with torch.no_grad():
        scale.scale.copy_(torch.tensor([2.0, 0.5, -1.0]))
        expected = model.classifier(feats) * torch.tensor([2.0, 0.5, -1.0])
        torch.testing.assert_close(model.logits_from_features(feats), expected)
    with pytest.raises(TypeError, match="BatchNorm on the logits"):
        build_model("resnet8", 3, classifier_bn="affine").use_class_scale()


def test_a_state_with_class_scales_loads_into_a_fresh_model_and_one_without_removes_them():
    """A checkpoint of an LWS stage 2 has `logit_bn.scale`: a freshly built model (identity logit_bn) takes it,
    and a state without it (stage 1's) gives the plain logits back."""
    lws = build_model("resnet8", 3)
    lws.use_class_scale()
    with torch.no_grad():
        lws.logit_bn.scale.fill_(3.0)
    fresh = build_model("resnet8", 3)
    fresh.load_state_dict(lws.state_dict())
    assert isinstance(fresh.logit_bn, ClassScale) and fresh.logit_bn.scale.tolist() == [3.0, 3.0, 3.0]
    fresh.load_state_dict(build_model("resnet8", 3).state_dict())
    assert isinstance(fresh.logit_bn, nn.Identity)
