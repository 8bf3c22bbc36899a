"""Backbones and the long-tail classifier wrapper, with optional Normalized BatchNorm (NBN).

Every backbone in `MODELS` maps an image batch to features of shape (B, feature_dim), exposes that
width as a `feature_dim` attribute, and names its residual stages `layer1..layerN` (torchvision's
convention), which is how NBN finds the last stage. A backbone may also carry an `init_classifier`
function, which `LTClassifier` applies to the linear classifier it adds.

Two families of CIFAR ResNets:
  resnet{8,20,32,56}, resnet34_cifar   "option B" projection shortcuts (1x1 conv + BN), torchvision-style
                                       init (kaiming-normal, fan_out) of the convs
  resnet{20,32,44,56}_a                the ResNets of He et al. (2016) for CIFAR as the long-tail literature
                                       trains them: the `ResNet_s` of kaidic/LDAM-DRW `models/resnet_cifar.py`
                                       (after Y. Idelbayev), with parameter-free "option A" shortcuts and
                                       kaiming-normal (fan_in) init of every conv and of the classifier
and torchvision's ImageNet backbones for 224 px images (the normalized-BN paper's ImageNet-LT models):
  resnet50, resnext50_32x4d            torchvision's constructors with weights=None, 2,048-d features
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "CLASSIFIERS", "CLASSIFIER_BN", "MODELS", "ClassScale", "CosineLinear", "LTClassifier", "NormalizedBatchNorm2d",
    "SharedScale", "ZeroPadShortcut", "build_model", "cifar_resnet", "cifar_resnet_a", "convert_last_stage_to_nbn",
    "nbn_parameters", "torchvision_resnet",
]

# Added to the L2 norms in NBN, as in the paper's reference code. BN biases start at zero, and
# d(b / (||b|| + eps)) / db = 1 / eps there, so a tiny eps (say 1e-12) would make the first bias
# gradient so large that the bias direction is effectively frozen after one optimiser step.
NBN_NORM_EPS = 1e-6

# The BatchNorm that closes the residual branch of each block type (before the shortcut is added).
CLOSING_BN_NAME = {BasicBlock: "bn2", Bottleneck: "bn3"}


class SharedScale(nn.Module):
    """The one learnable scalar alpha that all NBN layers of a model multiply their affine params by."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))


class NormalizedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose affine params are used as `alpha * weight / ||weight||_2` and
    `alpha * bias / ||bias||_2`, with alpha taken from a `SharedScale`.

    Running statistics behave exactly as in `nn.BatchNorm2d`. The scale is held by a plain
    (unregistered) reference: the model that owns the `SharedScale` registers it once, so
    `state_dict()` and `parameters()` hold alpha once, and `.to()` / deepcopy / pickling keep the
    sharing. Referencing the module rather than the parameter keeps sharing intact even when
    `.to()` replaces parameter objects.
    """

    def __init__(self, bn: nn.BatchNorm2d, scale: SharedScale) -> None:
        super().__init__(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            track_running_stats=bn.track_running_stats,
            device=bn.weight.device,
            dtype=bn.weight.dtype,
        )
        self.load_state_dict(bn.state_dict())
        self.train(bn.training)
        object.__setattr__(self, "_scale", scale)

    def effective_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self._scale.alpha
        weight = alpha * self.weight / (self.weight.norm() + NBN_NORM_EPS)
        bias = alpha * self.bias / (self.bias.norm() + NBN_NORM_EPS)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same running-statistics logic as `nn.BatchNorm2d.forward`, with the normalised affine params."""
        self._check_input_dim(x)
        running_stats_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                running_stats_factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        weight, bias = self.effective_affine()
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            use_batch_stats,
            running_stats_factor,
            self.eps,
        )


def _last_stage(backbone: nn.Module) -> nn.Module:
    stages = [module for name, module in backbone.named_children() if name.startswith("layer")]
    return stages[-1]


def _nbn_target_names(block: nn.Module, all_bn: bool) -> list[str]:
    """Names (relative to `block`) of the BatchNorms that NBN normalises in one residual block."""
    if all_bn:
        return [name for name, module in block.named_modules() if isinstance(module, nn.BatchNorm2d)]
    names = [CLOSING_BN_NAME[type(block)]]
    if block.downsample is not None:
        names += [
            f"downsample.{name}"
            for name, module in block.downsample.named_modules()
            if isinstance(module, nn.BatchNorm2d)
        ]
    return names


def convert_last_stage_to_nbn(backbone: nn.Module, scale: SharedScale, all_bn: bool = False) -> None:
    """Replace, in place, the last stage's branch-closing and shortcut BNs (or all its BNs) by NBN.
    A parameter-free (option-A) shortcut has no BN to replace."""
    for block in _last_stage(backbone):
        for name in _nbn_target_names(block, all_bn):
            block.set_submodule(name, NormalizedBatchNorm2d(block.get_submodule(name), scale))


class ZeroPadShortcut(nn.Module):
    """He et al.'s "option A" shortcut where a block changes shape: keep every `stride`-th pixel and pad the
    channels with zeros, half in front and half behind. No parameters and no BN.

    The reference (`LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)))`)
    pads planes // 4 on each side when the width doubles; that is (out - in) // 2 on each side here."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot narrow {in_channels} to {out_channels} channels")
        self.stride = stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.pad_front}, {self.pad_back})"


def _residual_stage(
    in_channels: int, width: int, num_blocks: int, stride: int, shortcut: str = "B"
) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_channels != width:
        if shortcut == "A":
            downsample = ZeroPadShortcut(in_channels, width, stride)
        else:  # "option B" of He et al.: a projection whenever the shape changes
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, width, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width),
            )
    # torchvision's BasicBlock is the reference's block: relu(bn1(conv1 x)) -> bn2(conv2 .) + shortcut -> relu,
    # 3x3 convs without bias, the stride on conv1.
    blocks = [BasicBlock(in_channels, width, stride, downsample)]
    blocks += [BasicBlock(width, width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _cifar_backbone(blocks_per_stage: Sequence[int], widths: Sequence[int], shortcut: str) -> nn.Sequential:
    """3x3 stride-1 stem, no max-pool, first stage at stride 1, the others at stride 2, then global
    average pooling. PyTorch's default init; the callers below set their own."""
    layers = OrderedDict(
        stem=nn.Sequential(
            nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
    )
    in_channels = widths[0]
    for index, (num_blocks, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
        stride = 1 if index == 0 else 2
        layers[f"layer{index + 1}"] = _residual_stage(in_channels, width, num_blocks, stride, shortcut)
        in_channels = width
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    backbone = nn.Sequential(layers)
    backbone.feature_dim = in_channels
    return backbone


def cifar_resnet(blocks_per_stage: Sequence[int], widths: Sequence[int]) -> nn.Sequential:
    """ResNet of BasicBlocks for small images with option-B (projection) shortcuts and torchvision's
    init: kaiming-normal (fan_out) convs, BN weight 1 and bias 0."""
    backbone = _cifar_backbone(blocks_per_stage, widths, shortcut="B")
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return backbone


def _kaiming_normal_weight(module: nn.Module) -> None:
    """The reference's `_weights_init`: `init.kaiming_normal_(m.weight)`, i.e. fan_in and ReLU gain,
    std = sqrt(2 / fan_in). Biases keep PyTorch's default init."""
    nn.init.kaiming_normal_(module.weight)


def cifar_resnet_a(depth: int) -> nn.Sequential:
    """The CIFAR ResNet-`depth` of He et al. (2016) as built by `ResNet_s` in kaidic/LDAM-DRW
    `models/resnet_cifar.py`: (depth - 2) / 6 BasicBlocks in each of 3 stages of widths 16/32/64, option-A
    (zero-padding, parameter-free) shortcuts, kaiming-normal (fan_in) init of every conv and, through
    `init_classifier`, of the linear classifier; BN keeps PyTorch's init (weight 1, bias 0).

    Parameters of resnet32_a with a 10-way head: 464,154, as the reference prints (derivation in
    tests/test_models.py)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
    backbone = _cifar_backbone([(depth - 2) // 6] * 3, (16, 32, 64), shortcut="A")
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            _kaiming_normal_weight(module)
    backbone.init_classifier = _kaiming_normal_weight
    return backbone


def torchvision_resnet(name: str) -> nn.Module:
    """torchvision's ImageNet ResNet or ResNeXt `name` (e.g. `resnet50`, `resnext50_32x4d`) for 224 px images,
    ending at pooled features. Randomly initialised with torchvision's init (`weights=None`: nothing is ever
    downloaded). Its blocks are torchvision `Bottleneck`s, so NBN treats them like the CIFAR ResNets' blocks:
    bn3 closes each residual branch, `downsample.1` is the shortcut's BN."""
    backbone = torchvision.models.get_model(name, weights=None)
    backbone.feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{
        f"resnet{depth}": partial(cifar_resnet, [(depth - 2) // 6] * 3, (16, 32, 64))
        for depth in (8, 20, 32, 56)
    },
    "resnet34_cifar": partial(cifar_resnet, [3, 4, 6, 3], (64, 128, 256, 512)),
    **{name: partial(torchvision_resnet, name) for name in ("resnet50", "resnext50_32x4d")},
    **{f"resnet{depth}_a": partial(cifar_resnet_a, depth) for depth in (20, 32, 44, 56)},
}  # the names of `catalog.MODEL_NAMES`, which a config is validated against

CLASSIFIER_BN: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda num_classes: nn.Identity(),
    "affine": lambda num_classes: nn.BatchNorm1d(num_classes, affine=True),
    "plain": lambda num_classes: nn.BatchNorm1d(num_classes, affine=False),
}


class CosineLinear(nn.Module):
    """Cosine classifier: logit_c = scale * cos(w_c, f), no bias. At scale 1 this is LDAM-DRW's `NormedLinear`
    (whose weight is stored transposed); its rows start as uniform(-1, 1) draws renormalised to unit length."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        weight = torch.empty(out_features, in_features).uniform_(-1, 1)
        self.weight = nn.Parameter(F.normalize(weight, dim=1))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


# The classifier on top of the backbone: (feature_dim, num_classes, cosine scale) -> module with `weight`
# (num_classes, feature_dim), `bias` (None for cosine), `in_features` and `out_features`.
CLASSIFIERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "linear": lambda in_features, num_classes, scale: nn.Linear(in_features, num_classes),
    "cosine": CosineLinear,
}


class ClassScale(nn.Module):
    """Learnable weight scaling (LWS, Kang et al. 2020): the logits times a learned per-class scale (init 1).
    Stage 2 in `lws` mode puts one in `LTClassifier.logit_bn`'s place, in front of a frozen classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale


def _follow_class_scale(module: LTClassifier, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state with LWS scales (`logit_bn.scale`) gets a `ClassScale` to load into,
    one without them the plain (identity) logits back, so a stage-2 LWS checkpoint resumes into a fresh model."""
    has_scale = f"{prefix}logit_bn.scale" in state_dict
    if has_scale and not isinstance(module.logit_bn, ClassScale):
        module.use_class_scale()
    elif not has_scale and isinstance(module.logit_bn, ClassScale):
        module.logit_bn = nn.Identity()


class LTClassifier(nn.Module):
    """Backbone features -> linear or cosine classifier -> optional BatchNorm on the logits (or, after an LWS
    stage 2, a per-class scale)."""

    def __init__(
        self,
        features: nn.Module,
        num_classes: int,
        logit_bn: nn.Module,
        nbn_scale: SharedScale | None = None,
        classifier: str = "linear",
        cosine_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = CLASSIFIERS[classifier](features.feature_dim, num_classes, cosine_scale)
        init_classifier = getattr(features, "init_classifier", None)
        if init_classifier is not None and isinstance(self.classifier, nn.Linear):  # as LDAM-DRW's _weights_init
            init_classifier(self.classifier)
        self.logit_bn = logit_bn
        self.nbn_scale = nbn_scale
        self.register_load_state_dict_pre_hook(_follow_class_scale)

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def use_class_scale(self) -> ClassScale:
        """Put a `ClassScale` (all ones) after the classifier, in place of the identity `logit_bn`; return it."""
        if isinstance(self.logit_bn, ClassScale):
            return self.logit_bn
        if not isinstance(self.logit_bn, nn.Identity):
            raise TypeError("learnable weight scaling needs a model without a BatchNorm on the logits")
        weight = self.classifier.weight
        self.logit_bn = ClassScale(self.classifier.out_features).to(weight.device)
        return self.logit_bn

    def logits_from_features(
        self,
        feats: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classify precomputed features; `weight`/`bias` replace the classifier's own (e.g. for
        post-hoc tau-normalisation). None keeps the classifier's parameter; pass zeros to drop the bias.
        A cosine classifier normalises whatever weight it gets (so tau-normalisation does not change it)."""
        if isinstance(self.classifier, CosineLinear):
            return self.logit_bn(self.classifier(feats, weight))
        weight = self.classifier.weight if weight is None else weight
        bias = self.classifier.bias if bias is None else bias
        return self.logit_bn(F.linear(feats, weight, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def build_model(
    name: str,
    num_classes: int,
    nbn: bool = False,
    nbn_all_bn: bool = False,
    classifier_bn: str = "none",
    classifier: str = "linear",
    cosine_scale: float = 1.0,
) -> LTClassifier:
    """Build `MODELS[name]` with a `num_classes` head. `nbn` normalises the last stage's
    branch-closing and shortcut BNs (`nbn_all_bn`: every BN of that stage; ignored without `nbn`)
    with one shared alpha. Option-A shortcuts have no BN, so there NBN takes the closing BNs only.
    `classifier` is `linear` or `cosine` (logits `cosine_scale` * cos(w_c, f), see `CosineLinear`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    if classifier_bn not in CLASSIFIER_BN:
        raise ValueError(f"unknown classifier_bn {classifier_bn!r}; available: {sorted(CLASSIFIER_BN)}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; available: {sorted(CLASSIFIERS)}")
    features = MODELS[name]()
    nbn_scale = None
    if nbn:
        nbn_scale = SharedScale()
        convert_last_stage_to_nbn(features, nbn_scale, all_bn=nbn_all_bn)
    return LTClassifier(features, num_classes, CLASSIFIER_BN[classifier_bn](num_classes), nbn_scale,
                        classifier=classifier, cosine_scale=cosine_scale)


def nbn_parameters(model: LTClassifier) -> list[nn.Parameter]:
    """The NBN alpha of `model` (empty without NBN), e.g. to exempt it from weight decay."""
    return [] if model.nbn_scale is None else [model.nbn_scale.alpha]
