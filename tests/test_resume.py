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


def test_resume_continues_exactly(tmp_path, monkeypatch):
    ce.run(_config(tmp_path, "straight"))

    original_save = kd.loop.save_train_state
    saves = {"n": 0}

    def save_then_crash(*args, **kwargs):
        original_save(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 1:
            raise KeyboardInterrupt  # as if the machine went away after epoch 1's checkpoint

    monkeypatch.setattr(kd.loop, "save_train_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ce.run(_config(tmp_path, "interrupted"))
    torch.manual_seed(12345)  # the resumed process starts with a different RNG state
    # As on the command line: flags apply over the run's saved config (here: none that differ from it).
    ce.main(["--resume", str(tmp_path / "interrupted"), "--disable-tqdm", "True"])

    straight = T.flatten(load_checkpoint(tmp_path / "straight" / "last.safetensors")[0]["state"])
    resumed = T.flatten(load_checkpoint(tmp_path / "interrupted" / "last.safetensors")[0]["state"])
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
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
