"""Model zoo: CIFAR students, torchvision teachers and any torchvision classifier by name.

Every model's ``forward(images)`` returns ``(logits, features)``:

- ``logits``: (N, num_classes)
- ``features["stage1"] .. features["stage4"]``: (N, C, H, W) maps, the last four feature maps at
  increasing depth (ends of the last four resolution groups); ``stage4`` is the map that is globally
  pooled.
- ``features["pooled"]``: (N, D), the vector that feeds the final classifier.

Models are skeletons used statelessly, ``torch.func.functional_call(model, (params, buffers), (x,))``,
so every forward is a pure function of params, buffers and input (BatchNorm updates the running
statistics of the buffers it is given; dropout / stochastic depth draw from the global RNG in train
mode). Parameter names follow torchvision: the teachers' ``state_dict`` keys are exactly
torchvision's, so a torchvision checkpoint loads with ``strict=True``.

Registry names (``ARCHS``) win over torchvision's: ``mobilenet_v2`` is the CIFAR student, not
torchvision's ImageNet MobileNetV2. Other torchvision classifiers keep torchvision's module; the ResNet and
EfficientNet families get the same small-input surgery and stages as the teachers, the rest is traced with
torch.fx and its stage maps are located on the graph (``_locate_generic_features``; ConvNeXt, MobileNetV3,
RegNet, ShuffleNetV2, MNASNet). Where no conv trunk is pooled into the classifier (ViT, Swin, VGG,
DenseNet) only ``pooled`` is returned; ``feature_shapes`` tells which features a model has. Nets whose
traced graph drops parameters (GoogLeNet, Inception v3, MaxViT) or that have no pooled vector before the
classifier (SqueezeNet) are refused with a ValueError.
"""

from __future__ import annotations

import http.client
import itertools
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    import torchvision

__all__ = ["ARCHS", "STAGES", "build_model", "feature_shapes", "num_parameters"]



def _torchvision():
    """torchvision, imported on first use: a CIFAR network needs none of it, and importing it (with the parts of
    torch it pulls in) costs about a second at every start."""
    import torchvision
    import torchvision.models.feature_extraction  # noqa: F401  (create_feature_extractor, get_graph_node_names)
    return torchvision


STAGES = ("stage1", "stage2", "stage3", "stage4")
Features = dict[str, torch.Tensor]


def _init_conv_bn(module: nn.Module) -> None:
    """He init (fan_out) for convs, identity BatchNorm: the init of the CIFAR KD papers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, the 6n+2 family with a projection shortcut where shapes change)
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(residual + shortcut)


class CifarResNet(nn.Module):
    """``widths = (stem, group1, group2, group3)``; ``depth = 6n + 2`` with n blocks per group."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_group = (depth - 2) // 6
        stem_width, *group_widths = widths
        self.conv1 = _conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_channels = stem_width
        for index, (channels, stride) in enumerate(zip(group_widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_channels, channels, stride)]
            blocks += [BasicBlock(channels, channels) for _ in range(blocks_per_group - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = channels
        self.fc = nn.Linear(in_channels, num_classes)
        _init_conv_bn(self)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        stem = F.relu(self.bn1(self.conv1(images)))  # (N, stem, 32, 32)
        group1 = self.layer1(stem)  # (N, C1, 32, 32)
        group2 = self.layer2(group1)  # (N, C2, 16, 16)
        group3 = self.layer3(group2)  # (N, C3, 8, 8)
        pooled = group3.mean(dim=(2, 3))  # (N, C3)
        features = {"stage1": stem, "stage2": group1, "stage3": group2, "stage4": group3, "pooled": pooled}
        return self.fc(pooled), features


# ---------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, depth = 6n + 4
# ---------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preactivated = F.relu(self.bn1(x))
        residual = self.conv2(F.relu(self.bn2(self.conv1(preactivated))))
        # The projection sees the pre-activated input, the identity the raw one (as in the paper's code).
        shortcut = x if self.shortcut is None else self.shortcut(preactivated)
        return residual + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks_per_group = (depth - 4) // 6
        self.conv1 = _conv3x3(3, 16)
        in_channels = 16
        for index, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
            channels = width * widen_factor
            blocks = [WideBasicBlock(in_channels, channels, stride)]
            blocks += [WideBasicBlock(channels, channels) for _ in range(blocks_per_group - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = channels
        self.final_bn = nn.BatchNorm2d(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        stem = self.conv1(images)  # (N, 16, 32, 32); pre-activation nets have no BN+ReLU here
        group1 = self.layer1(stem)  # (N, 16k, 32, 32)
        group2 = self.layer2(group1)  # (N, 32k, 16, 16)
        group3 = F.relu(self.final_bn(self.layer3(group2)))  # (N, 64k, 8, 8)
        pooled = group3.mean(dim=(2, 3))
        features = {"stage1": stem, "stage2": group1, "stage3": group2, "stage4": group3, "pooled": pooled}
        return self.fc(pooled), features


# ---------------------------------------------------------------------------------------------
# CIFAR MobileNetV2 of the KD tables (CRD's ``mobile_half``: width 0.5, expansion 6, 1280 head)
# ---------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        # The KD-table variant keeps the 1x1 expansion even when expansion == 1 (torchvision drops it).
        self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))  # linear bottleneck
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """The CIFAR MobileNetV2 of the published KD tables (CRD / mdistiller ``mobile_half``): width 0.5 and a
    stride-2 stem (head map 2x2), so its numbers are comparable with those tables. ``stem_stride=1``
    keeps 32x32 through the first groups (head map 4x4, about 4x the compute, same parameters)."""

    # (expansion, channels, blocks, stride) of MobileNetV2, channels before the width multiplier
    SETTINGS = (
        (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
    )

    def __init__(self, num_classes: int, width_mult: float = 0.5, stem_stride: int = 2, head_channels: int = 1280):
        super().__init__()
        in_channels = int(32 * width_mult)
        self.conv1 = nn.Conv2d(3, in_channels, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        for index, (expansion, channels, num_blocks, stride) in enumerate(self.SETTINGS, start=1):
            out_channels = int(channels * width_mult)
            blocks = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(in_channels, out_channels, block_stride, expansion))
                in_channels = out_channels
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.conv2 = nn.Conv2d(in_channels, head_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.fc = nn.Linear(head_channels, num_classes)
        _init_conv_bn(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        x = F.relu(self.bn1(self.conv1(images)))
        x = self.layer1(x)
        stage1 = self.layer2(x)  # end of the full-resolution group, (N, 12, 32, 32) at stem stride 1
        stage2 = self.layer3(stage1)  # (N, 16, 16, 16)
        stage3 = self.layer5(self.layer4(stage2))  # (N, 48, 8, 8)
        x = self.layer7(self.layer6(stage3))
        stage4 = F.relu(self.bn2(self.conv2(x)))  # (N, 1280, 4, 4)
        pooled = stage4.mean(dim=(2, 3))
        features = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage4": stage4, "pooled": pooled}
        return self.fc(pooled), features


# ---------------------------------------------------------------------------------------------
# torchvision ResNet / EfficientNet: the torchvision modules, re-registered under their own names
# ---------------------------------------------------------------------------------------------


def _adopt_children(wrapper: nn.Module, base: nn.Module) -> None:
    """Register ``base``'s children on ``wrapper`` under the same names, so state_dict keys match."""
    if next(base.named_parameters(recurse=False), None) or next(base.named_buffers(recurse=False), None):
        raise ValueError(f"{type(base).__name__} holds tensors outside its children; cannot adopt it")
    for name, child in base.named_children():
        wrapper.add_module(name, child)


class ResNetFeatures(nn.Module):
    """torchvision ``ResNet`` (any depth, ResNeXt, Wide ResNet) with stages = layer1..layer4."""

    def __init__(self, base: torchvision.models.ResNet, small_input: bool):
        super().__init__()
        _adopt_children(self, base)
        if small_input:
            # A 7x7/2 conv and a 3x3/2 max-pool would shrink 32x32 to 8x8 before layer1; the 7x7 kernel
            # cannot be reused for a 3x3 one, so conv1 is new. The max-pool has no parameters.
            self.conv1 = nn.Conv2d(3, self.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        stage1 = self.layer1(x)  # (N, 256, 32, 32) for resnet152 on small 32x32 input
        stage2 = self.layer2(stage1)  # (N, 512, 16, 16)
        stage3 = self.layer3(stage2)  # (N, 1024, 8, 8)
        stage4 = self.layer4(stage3)  # (N, 2048, 4, 4)
        pooled = torch.flatten(self.avgpool(stage4), 1)
        features = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage4": stage4, "pooled": pooled}
        return self.fc(pooled), features


class EfficientNetFeatures(nn.Module):
    """torchvision ``EfficientNet`` (B0-B7, V2); stages end the last four resolution groups."""

    def __init__(self, base: torchvision.models.EfficientNet, small_input: bool):
        super().__init__()
        _adopt_children(self, base)
        if small_input:
            # Only the stride changes, so the pretrained 3x3 stem kernel is kept.
            self.features[0][0].stride = (1, 1)
        # A block ends a resolution group when the next one downsamples; the conv head ends the last.
        blocks = list(self.features)
        group_ends = [i for i in range(1, len(blocks) - 1) if _downsamples(blocks[i + 1])] + [len(blocks) - 1]
        self.stage_of_block = dict(zip(group_ends[-4:], STAGES))  # blocks 2, 3, 5, 8 for B0-B7

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        features: Features = {}
        x = images
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.stage_of_block:
                features[self.stage_of_block[index]] = x
        features["pooled"] = torch.flatten(self.avgpool(x), 1)  # (N, 1408) for B2
        return self.classifier(features["pooled"]), features


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in module.modules())


# ---------------------------------------------------------------------------------------------
# Any other torchvision classifier: torch.fx graph with the outputs rewired, names unchanged
# ---------------------------------------------------------------------------------------------


class _TracedNode(NamedTuple):
    name: str  # torchvision's qualified node name, e.g. "features.3.1.add"
    shape: tuple[int, ...]


def _probe_graph(model: nn.Module) -> list[_TracedNode]:
    """Every tensor ``model``'s traced forward computes on a 224x224 meta input, in execution order."""
    _, node_names = _torchvision().models.feature_extraction.get_graph_node_names(model)  # eval-mode names, all present in the train graph too
    every_node = _torchvision().models.feature_extraction.create_feature_extractor(
        model, return_nodes={name: name for name in node_names[1:]}, suppress_diff_warning=True
    )
    output_node = next(node for node in every_node.graph.nodes if node.op == "output")
    computed = {name: node.op != "get_attr" for name, node in output_node.args[0].items()}
    values = _meta_forward(every_node, (2, 3, 224, 224))
    return [
        _TracedNode(name, tuple(value.shape))
        for name, value in values.items()
        if computed[name] and isinstance(value, torch.Tensor)
    ]


def _locate_generic_features(nodes: list[_TracedNode]) -> dict[str, str]:
    """Map graph node names to 'logits', 'pooled' and, when the net has a conv trunk, the stages.

    - logits: the last node; pooled: the first (N, D) node after the last 4-D one.
    - stage4: the last map with spatial extent > 1 that only pooling / normalisation separates from
      ``pooled`` (same channels, no reshaping into tokens), e.g. ConvNeXt's ``features.7.2.add``.
    - stage1..3: the trunk is the sequence of sibling modules ending at stage4 (``features.0..7`` for
      ConvNeXt, ``conv1..layer4`` for ResNet); a unit ends a resolution group when the next unit is at
      a smaller resolution. The deepest container whose units span four resolution groups wins.
    """
    located = {nodes[-1].name: "logits"}
    last_map = max((i for i, node in enumerate(nodes) if len(node.shape) == 4), default=None)
    pooled = next((i for i in range(last_map or 0, len(nodes)) if len(nodes[i].shape) == 2), None)
    if last_map is None or pooled is None or pooled == len(nodes) - 1:
        raise ValueError("cannot locate the pooled vector feeding the classifier")
    located[nodes[pooled].name] = "pooled"

    # "Spatial extent > 1" is read from sizes, not dims: ConvNeXt's head permutes to (N, 1, 1, C).
    pooled_dim = nodes[pooled].shape[1]
    maps = [i for i in range(pooled) if len(nodes[i].shape) == 4 and _per_sample(nodes[i].shape) > pooled_dim]
    if not maps:
        return located
    stage4 = maps[-1]
    _, channels, height, width = nodes[stage4].shape
    only_pooling = pooled_dim == channels and all(
        len(node.shape) == 4 and _per_sample(node.shape) in (channels, channels * height * width)
        for node in nodes[stage4 + 1 : pooled]
    )
    group_ends = _resolution_group_ends(nodes, stage4) if only_pooling else None
    if group_ends is not None:
        located.update({nodes[i].name: stage for i, stage in zip(group_ends, STAGES)})
    return located


def _per_sample(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def _resolution_group_ends(nodes: list[_TracedNode], stage4: int) -> list[int] | None:
    path = nodes[stage4].name.split(".")
    for depth in range(len(path) - 1, -1, -1):  # deepest container first
        container = path[:depth]
        unit_outputs: dict[str, int] = {}  # unit name -> index of its last node
        for i in range(stage4 + 1):
            parts = nodes[i].name.split(".")
            if len(parts) > depth and parts[:depth] == container:
                unit_outputs[parts[depth]] = i
        if unit_outputs.get(path[depth]) != stage4:  # stage4 must be a unit's output
            continue
        maps = [i for i in sorted(unit_outputs.values()) if len(nodes[i].shape) == 4]
        ends = [a for a, b in itertools.pairwise(maps) if nodes[a].shape[2:] != nodes[b].shape[2:]] + [stage4]
        sizes = [nodes[i].shape[2] * nodes[i].shape[3] for i in ends]
        if len(ends) >= 4 and all(a > b for a, b in itertools.pairwise(sizes)):
            return ends[-4:]
    return None


def _traced_feature_model(model: nn.Module, arch: str) -> nn.Module:
    """``model``'s torch.fx graph (torchvision's feature extractor) returning ``(logits, features)``."""
    try:
        located = _locate_generic_features(_probe_graph(model))
    except ValueError as error:
        raise ValueError(f"{arch}: {error}; not supported") from None
    traced = _torchvision().models.feature_extraction.create_feature_extractor(model, return_nodes=located,
                                                                              suppress_diff_warning=True)
    for graph in (traced.train_graph, traced.eval_graph):
        output_node = next(node for node in graph.nodes if node.op == "output")
        outputs = output_node.args[0]
        features = {name: outputs[name] for name in (*STAGES, "pooled") if name in outputs}
        output_node.args = ((outputs["logits"], features),)
        graph.lint()
    traced.recompile()
    if set(traced.state_dict()) != set(model.state_dict()):
        # e.g. GoogLeNet / Inception, whose auxiliary heads are pruned from the graph
        raise ValueError(f"{arch}: the traced graph does not keep every torchvision parameter; not supported")
    return traced


# ---------------------------------------------------------------------------------------------
# Pretrained weights and builders
# ---------------------------------------------------------------------------------------------


def _torchvision_classifier(
    arch: str, num_classes: int, pretrained: bool, weights: torchvision.models.WeightsEnum | None = None
) -> nn.Module:
    """torchvision's ``arch``; when pretrained, ImageNet weights with a fresh ``num_classes`` head."""
    if not pretrained:
        return _torchvision().models.get_model(arch, num_classes=num_classes)
    weights = weights or _torchvision().models.get_model_weights(arch).DEFAULT
    try:
        model = _torchvision().models.get_model(arch, weights=weights)
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, refused connections
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        reason = " ".join(str(error).split())
        raise RuntimeError(
            f"cannot fetch pretrained {arch} weights ({weights}: {reason}); pass `--MODEL.pretrained False` "
            f"or put the file at {cached}"
        ) from error
    last_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last_linear:
        raise ValueError(f"{arch} has no Linear classifier to replace for {num_classes} classes")
    model.set_submodule(last_linear[-1], nn.Linear(model.get_submodule(last_linear[-1]).in_features, num_classes))
    return model


def _feature_model(model: nn.Module, arch: str, small_input: bool) -> nn.Module:
    if isinstance(model, _torchvision().models.ResNet):
        return ResNetFeatures(model, small_input)
    if isinstance(model, _torchvision().models.EfficientNet):
        return EfficientNetFeatures(model, small_input)
    return _traced_feature_model(model, arch)  # small_input has no effect here


def _teacher(arch: str, weights: str) -> Callable[..., nn.Module]:
    """``weights``: a torchvision weights enum member by name, e.g. ``"ResNet152_Weights.IMAGENET1K_V2"``."""
    def build(num_classes: int, *, small_input: bool = True, pretrained: bool = False) -> nn.Module:
        enum, member = weights.split(".")
        resolved = getattr(getattr(_torchvision().models, enum), member)
        base = _torchvision_classifier(arch, num_classes, pretrained, resolved)
        return _feature_model(base, arch, small_input)

    build.__doc__ = f"torchvision {arch}; pretrained = {weights}, loaded before the small-input surgery."
    return build


def _cifar(make: Callable[[int], nn.Module], description: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, *, small_input: bool = True, pretrained: bool = False) -> nn.Module:
        if pretrained:
            raise ValueError(f"no pretrained weights for the CIFAR {description}")
        return make(num_classes)  # designed for 32x32; small_input changes nothing

    build.__doc__ = f"CIFAR {description}, trained from scratch."
    return build


_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)

ARCHS: dict[str, Callable[..., nn.Module]] = {
    **{
        f"resnet{depth}": _cifar(lambda n, d=depth: CifarResNet(d, _RESNET_WIDTHS, n), f"ResNet-{depth}")
        for depth in (8, 14, 20, 32, 56, 110)
    },
    "resnet8x4": _cifar(lambda n: CifarResNet(8, _RESNET_X4_WIDTHS, n), "ResNet-8x4"),
    "resnet32x4": _cifar(lambda n: CifarResNet(32, _RESNET_X4_WIDTHS, n), "ResNet-32x4"),
    **{
        f"wrn_{depth}_{k}": _cifar(lambda n, d=depth, k=k: WideResNet(d, k, n), f"WRN-{depth}-{k}")
        for depth, k in ((16, 1), (16, 2), (40, 1), (40, 2))
    },
    "mobilenet_v2": _cifar(lambda n: CifarMobileNetV2(n), "MobileNetV2 (width 0.5)"),
    "resnet152": _teacher("resnet152", "ResNet152_Weights.IMAGENET1K_V2"),
    "efficientnet_b2": _teacher("efficientnet_b2", "EfficientNet_B2_Weights.IMAGENET1K_V1"),
}


def build_model(arch: str, num_classes: int, *, small_input: bool = True, pretrained: bool = False) -> nn.Module:
    """A model whose ``forward(images)`` returns ``(logits, features)``; see the module docstring.

    ``arch`` is a key of ``ARCHS`` or any torchvision classification model name (ResNet and EfficientNet
    families get the small-input surgery and named stages; others are traced with torch.fx).
    """
    if arch in ARCHS:
        return ARCHS[arch](num_classes, small_input=small_input, pretrained=pretrained)
    torchvision_names = _torchvision().models.list_models(module=_torchvision().models)
    if arch not in torchvision_names:
        raise ValueError(
            f"unknown arch {arch!r}; available: {', '.join(ARCHS)}; "
            f"or any torchvision classifier: {', '.join(torchvision_names)}"
        )
    base = _torchvision_classifier(arch, num_classes, pretrained)
    return _feature_model(base, arch, small_input)


def feature_shapes(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, tuple[int, ...]]:
    """Shape of ``logits`` and of every feature, from a forward on the meta device (no compute).

    The forward runs in the model's current mode and never touches the model's own tensors. In train
    mode BatchNorm wants more than one value per channel: use an eval-mode skeleton or N > 1.
    """
    logits, features = _meta_forward(model, input_shape)
    return {"logits": tuple(logits.shape), **{name: tuple(value.shape) for name, value in features.items()}}


def _meta_forward(model: nn.Module, input_shape: tuple[int, ...]):
    state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    with torch.no_grad():
        return torch.func.functional_call(model, state, (torch.empty(input_shape, device="meta"),))


def num_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
