"""The teachers are one list (``--teachers.0.*``, ``--teachers.1.*``, ...): the flags of the earlier separate
fields get a one-line hint, a method takes the number of teachers it can use, and a multi-teacher baseline
runs with more teachers than SPEC's two."""

import dataclasses
import json
import re

import pytest
import torch

from kd.checkpoint import read_metadata, save_weights
from kd.config import ModelConfig
from kd.data import DataConfig
from kd.errors import ConfigError
from kd.methods import REGISTRY
from kd.modeling import build_net
from kd.teachers import TeacherSpec
from recipes import ce, compare, ensemble_kd, ibkd, kd, teacher
from recipes._cli import parse


@pytest.mark.parametrize("recipe,args,hint", [
    (ibkd, ["--teacher1.arch", "resnet20"], "--teacher1.arch is now --teachers.0.arch"),
    (ibkd, ["--teacher2-ckpt", "x.safetensors"], "--teacher2-ckpt is now --teachers.1.ckpt"),
    (ibkd, ["--teacher2_ckpt=x.safetensors"], "--teacher2_ckpt is now --teachers.1.ckpt"),
    (kd, ["--teacher.pretrained", "False"], "--teacher.pretrained is now --teachers.0.pretrained"),
    (kd, ["--teacher-ckpt", "x.safetensors"], "--teacher-ckpt is now --teachers.0.ckpt"),
    (compare, ["--single-teacher", "teacher2"], "--single-teacher teacher2 is now --single-teacher 1"),
])
def test_a_renamed_teacher_flag_names_its_replacement(recipe, args, hint):
    with pytest.raises(ConfigError) as raised:
        parse(recipe.CONFIG, args, prog="p", description="")
    assert str(raised.value).startswith(hint) and "\n" not in str(raised.value)


def test_the_new_flags_set_the_list_and_recipes_teacher_keeps_its_own_flag():
    cfg = parse(ibkd.CONFIG, ["--teachers.1.arch", "wrn_16_2", "--teachers.1.ckpt", "w.safetensors",
                              "--teachers.0.pretrained", "False"], prog="p", description="")
    assert cfg.teachers[1] == TeacherSpec(arch="wrn_16_2", pretrained=True, ckpt="w.safetensors")
    assert cfg.teachers[0] == dataclasses.replace(ibkd.CONFIG.teachers[0], pretrained=False)
    # the teacher recipe trains the network --teacher.* describes: nothing renamed there
    assert parse(teacher.CONFIG, ["--teacher.arch", "resnet8"], prog="p", description="").teacher.arch == "resnet8"


def test_a_method_takes_only_the_number_of_teachers_it_can_use(tmp_path):
    one, three = kd.CONFIG.teachers, ibkd.CONFIG.teachers + kd.CONFIG.teachers
    assert list(REGISTRY["kd"].teacher_specs(kd.CONFIG)) == ["teacher"]
    assert list(REGISTRY["ibkd"].teacher_specs(ibkd.CONFIG)) == ["teacher1", "teacher2"]
    assert list(REGISTRY["camkd"].teacher_specs(dataclasses.replace(ibkd.CONFIG, teachers=three))) == [
        "teacher1", "teacher2", "teacher3"]
    assert REGISTRY["ce"].teacher_specs(ce.CONFIG) == {}
    for method, teachers, wanted in (("ibkd", three, "from 2 teachers, --teachers lists 3"),
                                     ("kd", ibkd.CONFIG.teachers, "from 1 teacher, --teachers lists 2"),
                                     ("ensemble_kd", one, "from at least 2 teachers, --teachers lists 1")):
        with pytest.raises(ConfigError, match=wanted):
            REGISTRY[method].teacher_specs(dataclasses.replace(ibkd.CONFIG, teachers=teachers))
    with pytest.raises(ConfigError, match=r"--teachers.0.ckpt must name"):
        dataclasses.replace(kd.CONFIG, teachers=(TeacherSpec(arch="resnet8", ckpt=""),))


def test_ensemble_kd_distils_from_three_teachers_given_in_a_config_file(tmp_path):
    """A --config file may list more teachers than the recipe's default; every one is loaded, fine-tuned when
    missing, hashed and recorded."""
    paths = []
    for i, arch in enumerate(("resnet8", "wrn_16_1", "resnet8")):
        net = build_net(ModelConfig(arch=arch), 10, torch.device("cpu"), seed=20 + i)
        path = tmp_path / f"t{i}.safetensors"
        save_weights(path, {"teacher": net.params}, {"teacher": net.buffers},
                     {"arch": arch, "num_classes": 10, "dataset": "synthetic", "val_acc": 10.0})
        paths.append(path)
    (tmp_path / "three.json").write_text(json.dumps({"teachers": [
        {"arch": arch, "pretrained": False, "ckpt": str(p)} for arch, p in zip(("resnet8", "wrn_16_1", "resnet8"),
                                                                                 paths)]}))
    cfg = parse(ensemble_kd.CONFIG, ["--config", str(tmp_path / "three.json"), "--teachers.2.arch", "resnet8"],
                prog="p", description="")
    assert [t.arch for t in cfg.teachers] == ["resnet8", "wrn_16_1", "resnet8"]
    cfg = dataclasses.replace(
        cfg, student=ModelConfig(arch="resnet8"), epochs=1, compile=False, device="cpu", disable_tqdm=True,
        kernels="reference", log_every=1, out_dir=str(tmp_path / "runs"), run_name="three",
        data=DataConfig(name="synthetic", synthetic_size=48, val_size=16, batch_size=16, eval_batch_size=32,
                        prefetch=False))
    summary = ensemble_kd.run(cfg)
    assert summary["teachers"] == ["resnet8", "wrn_16_1", "resnet8"]
    run = tmp_path / "runs" / "three"
    assert [t["ckpt"] for t in json.loads((run / "config.json").read_text())["teachers"]] == [str(p) for p in paths]
    hashes = json.loads(read_metadata(run / "last.safetensors")["teacher_sha256"])
    assert sorted(hashes) == ["teacher1", "teacher2", "teacher3"] and hashes["teacher1"] != hashes["teacher3"]
    with pytest.raises(ConfigError, match="from 2 teachers, --teachers lists 3"):
        ibkd.run(dataclasses.replace(ibkd.CONFIG, teachers=cfg.teachers, device="cpu", out_dir=str(tmp_path / "no")))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("teachers,message", [
    ([{"arch": 5, "ckpt": "a.safetensors"}], "teachers.0.arch is 5, expected str"),
    ("x", "teachers is 'x', expected tuple"),
    ([{"arch": "resnet8", "ckpt": "a.safetensors", "bogus": 1}], "unknown field teachers.0.bogus for TeacherSpec"),
    ([{"arch": "resnet8", "ckpt": ""}], "--teachers.0.ckpt must name"),
    (None, "teacher1 is now part of one list, teachers: ["),  # an earlier version's field without its _ckpt
])
def test_a_bad_teacher_list_in_a_config_file_is_one_line_naming_the_entry(tmp_path, teachers, message):
    data = {"teachers": teachers} if teachers is not None else {"teacher1": {"arch": "resnet20"}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        parse(ibkd.CONFIG, ["--config", str(tmp_path / "c.json")], prog="p", description="")
    assert "\n" not in str(raised.value)
