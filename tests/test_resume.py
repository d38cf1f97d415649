"""A run stopped after an epoch and resumed with --resume ends exactly where an uninterrupted run ends."""

import dataclasses

import pytest
import torch

import kd.loop
from kd import tree as T
from kd.checkpoint import load_checkpoint
from kd.config import ModelConfig
from kd.data import DataConfig
from recipes import ce


def _config(tmp_path, name):
    return dataclasses.replace(
        ce.CONFIG, student=ModelConfig(arch="resnet8"), epochs=3, compile=False, device="cpu", disable_tqdm=True,
        data=DataConfig(name="synthetic", synthetic_size=96, val_size=32, batch_size=32, mixup_alpha=0.2,
                        cutmix_alpha=0.5, prefetch=False),
        out_dir=str(tmp_path), run_name=name, log_every=1)


def interrupted_after_epoch_one(monkeypatch, run) -> None:
    """``run()`` stopped as if the machine went away right after epoch 1's checkpoint."""
    original_save = kd.loop.save_train_state
    saves = {"n": 0}

    def save_then_crash(*args, **kwargs):
        original_save(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(kd.loop, "save_train_state", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            run()


def assert_same_train_state(run_a, run_b) -> None:
    """The two runs' last.safetensors hold bit-identical train states."""
    a = T.flatten(load_checkpoint(run_a / "last.safetensors")[0]["state"])
    b = T.flatten(load_checkpoint(run_b / "last.safetensors")[0]["state"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    ce.run(_config(tmp_path, "straight"))
    interrupted_after_epoch_one(monkeypatch, lambda: ce.run(_config(tmp_path, "interrupted")))
    torch.manual_seed(12345)  # the resumed process starts with a different RNG state
    # As on the command line: flags apply over the run's saved config (here: none that differ from it).
    ce.main(["--resume", str(tmp_path / "interrupted"), "--disable-tqdm", "True"])

    assert_same_train_state(tmp_path / "straight", tmp_path / "interrupted")
    epochs = [line for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == 3


def test_resume_in_code_refuses_fields_that_differ_from_the_run(tmp_path):
    from kd.errors import ConfigError
    ce.run(dataclasses.replace(_config(tmp_path, "done"), epochs=1))
    with pytest.raises(ConfigError, match="--student.arch") as raised:  # ce.CONFIG is not the run's config
        ce.run(dataclasses.replace(ce.CONFIG, resume=str(tmp_path / "done")))
    assert "--epochs (" not in str(raised.value)  # more epochs (90 > 1) may change


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path):
    from kd.errors import ConfigError
    with pytest.raises(ConfigError, match="config.json does not exist"):
        ce.run(dataclasses.replace(ce.CONFIG, resume=str(tmp_path / "nope")))


def test_a_run_saved_before_a_recipe_field_was_added_still_resumes(tmp_path):
    """Runs saved before --teacher-cache existed lack it: they resume with its default; another recipe's
    run (CE's fields are a subset of KD's) is still refused."""
    import json

    from kd.config import load_run_config, to_dict
    from kd.errors import ConfigError
    from recipes import kd as kd_recipe

    old = {**to_dict(kd_recipe.CONFIG), "recipe": "kd"}
    del old["teacher_cache"], old["teacher_cache_max_gb"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    loaded = load_run_config(kd_recipe.KDConfig, tmp_path / "old")
    assert loaded.teacher_cache == "" and loaded.temperature == kd_recipe.CONFIG.temperature
    (tmp_path / "ce").mkdir()
    (tmp_path / "ce" / "config.json").write_text(json.dumps({**to_dict(ce.CONFIG), "recipe": "ce"}))
    with pytest.raises(ConfigError, match="recipes.ce"):
        load_run_config(kd_recipe.KDConfig, tmp_path / "ce")


def _old_format(data: dict) -> dict:
    """A config saved before the teachers became one list: ``teacher`` + ``teacher_ckpt`` for one teacher,
    ``teacher1`` + ``teacher1_ckpt``, ``teacher2`` + ``teacher2_ckpt`` for two."""
    data = dict(data)
    teachers = data.pop("teachers")
    names = ["teacher"] if len(teachers) == 1 else [f"teacher{i + 1}" for i in range(len(teachers))]
    for name, spec in zip(names, teachers):
        spec = dict(spec)
        data[f"{name}_ckpt"] = spec.pop("ckpt")
        data[name] = spec
    return data


def test_a_run_saved_with_separate_teacher_fields_still_loads(tmp_path):
    """config.json of the earlier versions (teacher / teacher1 / teacher2 and their _ckpt fields): resume and
    --config read it as the one teachers list, in order."""
    import json

    from kd.config import apply_config_file, load_run_config, to_dict
    from recipes import ensemble_kd, ibkd, kd as kd_recipe

    for name, recipe, cls in (("kd", kd_recipe, kd_recipe.KDConfig), ("ibkd", ibkd, ibkd.IBKDConfig),
                              ("ensemble_kd", ensemble_kd, ensemble_kd.EnsembleKDConfig)):
        cfg = dataclasses.replace(recipe.CONFIG, teachers=tuple(
            dataclasses.replace(spec, arch=f"resnet{8 + 12 * i}", ckpt=f"ck/t{i}.safetensors")
            for i, spec in enumerate(recipe.CONFIG.teachers)))
        old = _old_format({**to_dict(cfg), "recipe": name})
        assert "teachers" not in old and ("teacher_ckpt" in old or "teacher2_ckpt" in old)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(old))
        assert load_run_config(cls, tmp_path / name) == cfg
        assert apply_config_file(recipe.CONFIG, tmp_path / name / "config.json") == cfg


def test_an_interrupted_run_saved_with_separate_teacher_fields_resumes_exactly(tmp_path, monkeypatch):
    """A KD run stopped after epoch 1 whose config.json has the earlier format finishes under --resume exactly
    as an uninterrupted run does (its recorded teacher hash, under the teacher's unchanged name, still matches)."""
    import json

    from kd.checkpoint import save_weights
    from kd.modeling import build_net
    from kd.teachers import TeacherSpec
    from recipes import kd as kd_recipe

    net = build_net(ModelConfig(arch="resnet8"), 10, torch.device("cpu"), seed=7)
    ckpt = tmp_path / "teacher.safetensors"
    save_weights(ckpt, {"teacher": net.params}, {"teacher": net.buffers},
                 {"arch": "resnet8", "num_classes": 10, "dataset": "synthetic", "val_acc": 10.0})
    base = _config(tmp_path, "straight")
    cfg = kd_recipe.KDConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                                if f.name not in ("label_smoothing",)},
                             teachers=(TeacherSpec(arch="resnet8", pretrained=False, ckpt=str(ckpt)),))
    kd_recipe.run(cfg)
    interrupted_after_epoch_one(monkeypatch, lambda: kd_recipe.run(dataclasses.replace(cfg, run_name="interrupted")))
    path = tmp_path / "interrupted" / "config.json"
    path.write_text(json.dumps(_old_format(json.loads(path.read_text()))))
    kd_recipe.main(["--resume", str(tmp_path / "interrupted"), "--disable-tqdm", "True"])

    assert_same_train_state(tmp_path / "straight", tmp_path / "interrupted")
