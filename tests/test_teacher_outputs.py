"""Shared frozen-teacher outputs (kd.teacher_outputs): computed once, read back only for the same images."""

import torch

from kd.config import ModelConfig
from kd.modeling import build_net
from kd.step import apply_model
from kd.step import batch_key, frozen_teacher
from kd.teacher_outputs import TeacherOutputs

DEVICE = torch.device("cpu")


def teacher(arch="resnet8", seed=0):
    net = build_net(ModelConfig(arch=arch, pretrained=False), 10, DEVICE, seed=seed)
    net.eval_skeleton.eval()
    return net


def stream(seed, steps=3, batch=4):
    def batches(epoch):
        g = torch.Generator().manual_seed(seed * 100 + epoch)
        for _ in range(steps):
            yield {"x": torch.randn(batch, 3, 32, 32, generator=g), "y_a": torch.zeros(batch, dtype=torch.long)}
    return batches


def direct(net, x):
    with torch.no_grad():
        logits, features, _ = apply_model(net.eval_skeleton, net.params, net.buffers, x, train=False)
    return logits, features["pooled"]


def test_first_run_computes_and_stores_later_runs_read_the_same_values(tmp_path):
    nets = {"teacher1": teacher("resnet8", 0), "teacher2": teacher("wrn_16_1", 1)}
    first = TeacherOutputs(tmp_path, nets, {"id": 1}, device=DEVICE)
    seen = [b for epoch in (0, 1) for b in first.wrap(stream(0))(epoch)]
    assert (first.hits, first.misses) == (0, 6)
    assert first.path(0).is_file() and first.path(1).is_file()
    for b in seen:  # what the step receives is what the teachers compute on those images
        for name, net in nets.items():
            logits, pooled = direct(net, b["x"])
            torch.testing.assert_close(b[batch_key(name, "logits")], logits, rtol=0, atol=0)
            torch.testing.assert_close(b[batch_key(name, "pooled")], pooled, rtol=0, atol=0)
    again = TeacherOutputs(tmp_path, nets, {"id": 1}, device=DEVICE)
    reread = [b for epoch in (0, 1) for b in again.wrap(stream(0))(epoch)]
    assert (again.hits, again.misses) == (6, 0)
    for a, b in zip(seen, reread):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert again.report()["teacher_outputs_hits"] == 6


def test_other_images_or_identity_are_recomputed_never_reused(tmp_path):
    nets = {"teacher": teacher()}
    list(TeacherOutputs(tmp_path, nets, {"seed": 0}, device=DEVICE).wrap(stream(0))(0))
    other_images = TeacherOutputs(tmp_path, nets, {"seed": 0}, device=DEVICE)
    for b in other_images.wrap(stream(7))(0):  # same directory, different batches: every hash differs
        torch.testing.assert_close(b[batch_key("teacher", "logits")], direct(nets["teacher"], b["x"])[0], rtol=0, atol=0)
    assert (other_images.hits, other_images.misses) == (0, 3)
    other_identity = TeacherOutputs(tmp_path, nets, {"seed": 1}, device=DEVICE)
    assert other_identity.dir != other_images.dir
    list(other_identity.wrap(stream(0))(0))
    assert (other_identity.hits, other_identity.misses) == (0, 3)


def test_a_corrupt_or_truncated_epoch_file_is_recomputed_and_rewritten(tmp_path):
    nets = {"teacher": teacher()}
    first = TeacherOutputs(tmp_path, nets, {}, device=DEVICE)
    list(first.wrap(stream(0))(0))
    first.path(0).write_bytes(first.path(0).read_bytes()[:100])
    second = TeacherOutputs(tmp_path, nets, {}, device=DEVICE)
    list(second.wrap(stream(0))(0))
    assert (second.hits, second.misses) == (0, 3)
    third = TeacherOutputs(tmp_path, nets, {}, device=DEVICE)
    list(third.wrap(stream(0))(0))
    assert (third.hits, third.misses) == (3, 0)


def test_an_interrupted_epoch_is_not_stored(tmp_path):
    outputs = TeacherOutputs(tmp_path, {"teacher": teacher()}, {}, device=DEVICE)
    it = outputs.wrap(stream(0))(0)
    next(it)
    it.close()
    assert not outputs.path(0).exists()


def test_frozen_teacher_reads_the_batch_unless_the_loss_needs_feature_maps():
    net = teacher()
    frozen = {"teacher": {"params": net.params, "buffers": net.buffers}}
    x = torch.randn(2, 3, 32, 32)
    marker_logits, marker_pooled = torch.full((2, 10), 7.0), torch.full((2, 64), 3.0)
    batch = {"x": x, batch_key("teacher", "logits"): marker_logits, batch_key("teacher", "pooled"): marker_pooled}
    logits, features = frozen_teacher("teacher", net, frozen, batch)
    assert logits is marker_logits and features == {"pooled": marker_pooled}
    logits, features = frozen_teacher("teacher", net, frozen, batch, maps=True)  # AT / FitNet / feature term
    torch.testing.assert_close(logits, direct(net, x)[0], rtol=0, atol=0)
    assert any(v.dim() == 4 for v in features.values())
    logits, _ = frozen_teacher("teacher", net, frozen, {"x": x})  # nothing shared: the forward runs
    torch.testing.assert_close(logits, direct(net, x)[0], rtol=0, atol=0)


def test_a_directory_that_cannot_be_made_is_one_error_before_training(tmp_path):
    import pytest

    from kd.errors import OutputError

    taken = tmp_path / "a_file"
    taken.write_text("x")
    with pytest.raises(OutputError, match="--teacher-cache"):
        TeacherOutputs(taken, {"teacher": teacher()}, {}, device=DEVICE)


def test_outputs_too_large_for_the_limit_are_read_but_not_stored(tmp_path, capsys):
    nets = {"teacher": teacher()}
    small = TeacherOutputs(tmp_path, nets, {}, device=DEVICE, max_bytes=1000, images_per_run=4 * 3 * 100)
    batches = list(small.wrap(stream(0))(0))
    assert "not stored" in capsys.readouterr().out and not small.path(0).exists()
    assert all(batch_key("teacher", "logits") in b for b in batches)  # the run itself still gets them
    roomy = TeacherOutputs(tmp_path, nets, {}, device=DEVICE, max_bytes=1e9, images_per_run=4 * 3 * 100)
    list(roomy.wrap(stream(0))(0))
    assert roomy.path(0).exists()
