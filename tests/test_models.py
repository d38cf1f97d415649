"""Model zoo: stateless forwards, feature shapes, torchvision compatibility, published sizes."""

import functools
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.func import functional_call

from kd.models import ARCHS, STAGES, _locate_generic_features, _TracedNode, build_model, feature_shapes, num_parameters

GENERIC = "convnext_tiny"  # the student of the original work, reached through the generic fx path
NUM_CLASSES = 10
BATCH = 2
# 16x16 images keep the file fast on CPU and still leave every net a stage4 with BatchNorm statistics
# over more than one value; ConvNeXt's 4x4 patchify and three 2x2 downsamplings need 32x32.
IMAGE_SIZE = {GENERIC: 32}


@functools.cache
def _model(arch: str) -> nn.Module:
    """One instance per arch for the whole file; tests set the mode they need and never load into it."""
    torch.manual_seed(0)
    return build_model(arch, NUM_CLASSES)


def _images(arch: str, seed: int = 0) -> torch.Tensor:
    size = IMAGE_SIZE.get(arch, 16)
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_outputs_equal(got, expected):
    got_logits, got_features = got
    expected_logits, expected_features = expected
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-6, rtol=0)
    assert got_features.keys() == expected_features.keys()
    for name in expected_features:
        torch.testing.assert_close(got_features[name], expected_features[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("arch", [*ARCHS, GENERIC])
def test_eval_forward_is_functional_and_matches_feature_shapes(arch):
    model = _model(arch).eval()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    images = _images(arch)
    with torch.no_grad():
        logits, features = model(images)
        _assert_outputs_equal(functional_call(model, (params, buffers), (images,)), (logits, features))
    shapes = feature_shapes(model, tuple(images.shape))
    assert shapes == {"logits": tuple(logits.shape), **{k: tuple(v.shape) for k, v in features.items()}}
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert set(features) == {*STAGES, "pooled"}
    assert all(features[stage].dim() == 4 for stage in STAGES)
    assert features["pooled"].shape == (BATCH, features["stage4"].shape[1])
    spatial = [features[stage].shape[2] * features[stage].shape[3] for stage in STAGES]
    assert spatial == sorted(spatial, reverse=True), spatial


@pytest.mark.parametrize("arch", [*ARCHS, GENERIC])
def test_functional_forward_matches_module_train(arch):
    model = _model(arch).train()
    params = dict(model.named_parameters())
    initial_buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    functional_buffers = {name: buffer.clone() for name, buffer in initial_buffers.items()}
    images = _images(arch)
    with torch.no_grad():
        torch.manual_seed(1)  # dropout / stochastic depth draw the same numbers in both runs
        functional_out = functional_call(model, (params, functional_buffers), (images,))
        torch.manual_seed(1)
        module_out = model(images)
    _assert_outputs_equal(functional_out, module_out)
    # Both started from the same statistics and must have taken the same BatchNorm update; the
    # functional run updated only the copies it was handed.
    module_buffers = dict(model.named_buffers())
    for name, buffer in functional_buffers.items():
        torch.testing.assert_close(buffer, module_buffers[name], atol=1e-6, rtol=0, msg=name)
    running_means = [name for name in initial_buffers if name.endswith("running_mean")]
    if arch == GENERIC:  # convnext normalises with LayerNorm: no running statistics to update
        assert not running_means
    else:
        assert running_means
        assert any(not torch.equal(functional_buffers[n], initial_buffers[n]) for n in running_means)


def test_stage_shapes_at_32x32():
    assert feature_shapes(build_model("resnet8x4", 100)) == {
        "logits": (1, 100),
        "stage1": (1, 32, 32, 32),
        "stage2": (1, 64, 32, 32),
        "stage3": (1, 128, 16, 16),
        "stage4": (1, 256, 8, 8),
        "pooled": (1, 256),
    }
    assert feature_shapes(_model("resnet152")) == {
        "logits": (1, NUM_CLASSES),
        "stage1": (1, 256, 32, 32),
        "stage2": (1, 512, 16, 16),
        "stage3": (1, 1024, 8, 8),
        "stage4": (1, 2048, 4, 4),
        "pooled": (1, 2048),
    }
    assert feature_shapes(_model("efficientnet_b2")) == {
        "logits": (1, NUM_CLASSES),
        "stage1": (1, 24, 16, 16),
        "stage2": (1, 48, 8, 8),
        "stage3": (1, 120, 4, 4),
        "stage4": (1, 1408, 2, 2),
        "pooled": (1, 1408),
    }


def _keys_and_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


@pytest.mark.parametrize("arch", ["resnet152", "efficientnet_b2"])
def test_teacher_is_torchvision_model(arch):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(arch, num_classes=NUM_CLASSES).eval()
    model = build_model(arch, NUM_CLASSES, small_input=False).eval()
    assert _keys_and_shapes(model) == _keys_and_shapes(reference)
    model.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(images)
        torch.testing.assert_close(logits, reference(images), atol=1e-5, rtol=1e-5)


def test_small_input_resnet152_keeps_torchvision_keys():
    small = _model("resnet152")
    assert isinstance(small.maxpool, nn.Identity) and small.conv1.stride == (1, 1)
    torch.manual_seed(0)
    full = torchvision.models.resnet152(num_classes=NUM_CLASSES)
    small_entries, full_entries = _keys_and_shapes(small), _keys_and_shapes(full)
    assert [name for name, _ in small_entries] == [name for name, _ in full_entries]
    differing = {name for (name, shape), (_, full_shape) in zip(small_entries, full_entries) if shape != full_shape}
    assert differing == {"conv1.weight"}
    assert small.state_dict()["conv1.weight"].shape == (64, 3, 3, 3)
    # Everything but the new 3x3 stem loads strictly into the plain torchvision model.
    full.load_state_dict({**small.state_dict(), "conv1.weight": full.conv1.weight}, strict=True)
    torch.testing.assert_close(full.layer4[2].conv3.weight, small.layer4[2].conv3.weight, atol=0, rtol=0)


def test_small_input_efficientnet_b2_keeps_torchvision_state():
    small = _model("efficientnet_b2")
    assert small.features[0][0].stride == (1, 1)
    reference = torchvision.models.efficientnet_b2(num_classes=NUM_CLASSES)
    assert _keys_and_shapes(small) == _keys_and_shapes(reference)
    small_copy = build_model("efficientnet_b2", NUM_CLASSES)
    small_copy.load_state_dict(reference.state_dict(), strict=True)


def test_generic_model_keeps_torchvision_names_and_outputs():
    torch.manual_seed(0)
    reference = torchvision.models.get_model(GENERIC, num_classes=NUM_CLASSES).eval()
    model = _model(GENERIC).eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        model.load_state_dict(reference.state_dict(), strict=True)
        images = _images(GENERIC)
        with torch.no_grad():
            torch.testing.assert_close(model(images)[0], reference(images), atol=1e-5, rtol=1e-5)
    finally:
        model.load_state_dict(saved)


def test_generic_locator_finds_stages_of_a_conv_trunk_and_only_pooled_for_tokens():
    conv_net = [  # ResNet-like graph at 224x224: the stem, then layer1..4, with a block-internal node
        _TracedNode("conv1", (2, 64, 112, 112)),
        _TracedNode("maxpool", (2, 64, 56, 56)),
        _TracedNode("layer1.0.relu", (2, 64, 56, 56)),
        _TracedNode("layer2.0.conv1", (2, 128, 56, 56)),
        _TracedNode("layer2.0.relu", (2, 128, 28, 28)),
        _TracedNode("layer3.0.relu", (2, 256, 14, 14)),
        _TracedNode("layer4.0.relu", (2, 512, 7, 7)),
        _TracedNode("avgpool", (2, 512, 1, 1)),
        _TracedNode("flatten", (2, 512)),
        _TracedNode("fc", (2, 10)),
    ]
    assert _locate_generic_features(conv_net) == {
        "fc": "logits",
        "flatten": "pooled",
        "layer1.0.relu": "stage1",
        "layer2.0.relu": "stage2",
        "layer3.0.relu": "stage3",
        "layer4.0.relu": "stage4",
    }
    vision_transformer = [  # patch embedding, then tokens: no map is pooled into the class vector
        _TracedNode("conv_proj", (2, 768, 14, 14)),
        _TracedNode("reshape", (2, 768, 196)),
        _TracedNode("encoder.ln", (2, 197, 768)),
        _TracedNode("getitem", (2, 768)),
        _TracedNode("heads.head", (2, 10)),
    ]
    assert _locate_generic_features(vision_transformer) == {"heads.head": "logits", "getitem": "pooled"}


def test_generic_model_without_a_pooled_vector_is_refused():
    with pytest.raises(ValueError, match="squeezenet1_0: .*not supported"):
        build_model("squeezenet1_0", NUM_CLASSES)


# Published sizes for 100 classes (CRD, Tian et al. 2020, and the RepDistiller / mdistiller model code).
PUBLISHED_MILLIONS = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet20": 0.28,
    "resnet56": 0.86,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
    "mobilenet_v2": 0.81,
}


@pytest.mark.parametrize("arch", PUBLISHED_MILLIONS)
def test_parameter_counts_match_published(arch):
    with torch.device("meta"):
        model = build_model(arch, 100)
    assert num_parameters(model) == pytest.approx(PUBLISHED_MILLIONS[arch] * 1e6, rel=0.02)


def test_unknown_arch_lists_names_in_one_line():
    with pytest.raises(ValueError) as error:
        build_model("resnet9000", NUM_CLASSES)
    message = str(error.value)
    assert "\n" not in message and "resnet8x4" in message and "efficientnet_b2" in message and GENERIC in message


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "arch, filename",
    [("resnet152", "resnet152-f82ba261.pth"), ("efficientnet_b2", "efficientnet_b2_rwightman-c35c1473.pth")],
)
def test_pretrained_offline_raises_clear_error(arch, filename, empty_hub, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as error:
        build_model(arch, NUM_CLASSES, pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    assert "--MODEL.pretrained False" in message  # kd.modeling.build_net names the recipe's own flag
    assert str(empty_hub / "checkpoints" / filename) in message


@pytest.mark.parametrize("arch", ["resnet152", "efficientnet_b2"])
def test_pretrained_loads_imagenet_weights_then_adapts(arch, empty_hub, monkeypatch):
    torch.manual_seed(0)
    imagenet = torchvision.models.get_model(arch, num_classes=1000)

    def download(url, dst, *args, **kwargs):  # stands in for the real file, without the network
        torch.save(imagenet.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model = build_model(arch, NUM_CLASSES, pretrained=True)
    loaded, expected = model.state_dict(), imagenet.state_dict()
    head = "fc" if arch == "resnet152" else "classifier.1"
    assert loaded[f"{head}.weight"].shape[0] == NUM_CLASSES
    replaced = {f"{head}.weight", f"{head}.bias"} | ({"conv1.weight"} if arch == "resnet152" else set())
    for name in expected.keys() - replaced:
        assert torch.equal(loaded[name], expected[name]), name
    if arch == "resnet152":
        assert loaded["conv1.weight"].shape == (64, 3, 3, 3)
    else:  # the stem keeps its ImageNet kernel, only the stride changes
        assert model.features[0][0].stride == (1, 1)


def test_gradients_reach_every_parameter_of_resnet8x4():
    model = _model("resnet8x4").train()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    images, labels = _images("resnet8x4"), torch.tensor([1, 7])

    def cross_entropy(params, buffers):  # buffers are an input: the BatchNorm update mutates them
        logits, _ = functional_call(model, (params, buffers), (images,))
        return F.cross_entropy(logits, labels)

    grads = torch.func.grad(cross_entropy)(params, buffers)
    assert grads.keys() == params.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_functional_forward_traces_as_one_graph():
    # Dynamo tracing only (every zoo family passes too, but the teachers take ~30 s each on CPU).
    arch = "resnet8x4"
    model = _model(arch).eval()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def forward(params, buffers, images):
        return functional_call(model, (params, buffers), (images,))

    compiled = torch.compile(forward, fullgraph=True, backend="eager")  # graph breaks raise here
    images = _images(arch)
    with torch.no_grad():
        _assert_outputs_equal(compiled(params, buffers, images), model(images))


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "mobilenet_v2"])
def test_folded_teacher_equals_the_teacher(arch):
    """kd.teachers.fold_batchnorm: the same eval forward (logits and every feature) with BatchNorm statistics
    far from the identity, and fewer BatchNorm modules left (all of them where each follows a conv)."""
    from kd.config import ModelConfig
    from kd.modeling import build_net
    from kd.teachers import fold_batchnorm

    net = build_net(ModelConfig(arch=arch), 10, torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(1)
    for name, buffer in net.buffers.items():
        if name.endswith("running_mean"):
            buffer.copy_(torch.rand(buffer.shape, generator=g) - 0.5)
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=g) * 1.5 + 0.5)
    folded = fold_batchnorm(net)
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = torch.func.functional_call(net.eval_skeleton, (net.params, net.buffers), (x,))
        got = torch.func.functional_call(folded.eval_skeleton, (folded.params, folded.buffers), (x,))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-4, atol=1e-5, msg=key)
    count = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert count(folded.eval_skeleton) < count(net.eval_skeleton)
    if arch == "resnet8":
        assert count(folded.eval_skeleton) == 0


def test_teacher_benchmark_times_every_variant():
    from recipes import bench_teachers

    rows = bench_teachers.run(bench_teachers.BenchTeachersConfig(teachers=("resnet8",), batch_size=8, steps=1,
                                                                  rounds=2, device="cpu"))
    assert [r["variant"] for r in rows] == ["as loaded", "BN folded", "BN folded + channels-last",
                                            bench_teachers.SHARED]
    # each ratio is its variant's rate over the first variant's (the table's x columns say so)
    for r in rows:
        assert 0 < r["forward"] < float("inf") and 0 < r["kd_step"] < float("inf")
        assert r["forward_x"] == pytest.approx(r["forward"] / rows[0]["forward"])
        assert r["kd_step_x"] == pytest.approx(r["kd_step"] / rows[0]["kd_step"])
