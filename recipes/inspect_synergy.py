"""Inspect an IB-KD run's distillation targets: the MBM's synergy logits against the teachers' average.

For the run's teachers and its trained MBM (``mbm_stage<k>.safetensors``), on clean validation images and
on stage-B training batches (crop, flip, mixup/CutMix as the student sees them): accuracy against the
(first) label, the mean largest probability (confidence) and the mean per-sample standard deviation of the
logits (sharpness). Sharper targets than the teachers' carry less of the teachers' "dark knowledge".

    python launch.py recipes.inspect_synergy runs/ibkd-...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.checkpoint import load_checkpoint
from kd.config import from_dict, resolve_device, upgrade_saved
from kd.data import eval_batches, load_splits, train_batches
from kd.errors import ConfigError
from kd.methods.ibkd import MBM, IBKDConfig, logit_spread, teacher_average
from kd.models import feature_shapes
from kd.step import apply_model, call_stateless
from kd.teachers import load_teacher

from ._cli import parse


@dataclass(frozen=True)
class InspectConfig:
    """Which IB-KD run, and how many batches to look at."""

    run: str = ""
    """An IB-KD run directory (config.json and mbm_stage<k>.safetensors)."""
    stage: int = 1
    """Which stage's MBM."""
    batches: int = 8
    """Batches of each kind."""
    device: str = "cpu"
    """'auto', 'cpu' or 'cuda'."""


CONFIG = InspectConfig()


def run(cfg: InspectConfig) -> dict:
    root = Path(cfg.run)
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root} is not an IB-KD run directory (no config.json)")
    run_cfg = from_dict(IBKDConfig, upgrade_saved({k: v for k, v in json.loads((root / "config.json").read_text()).items()
                                                   if k != "recipe"}))
    if run_cfg.mbm.kind in ("attn", "avg"):
        raise ConfigError(f"{root} fuses its teachers with mbm.kind {run_cfg.mbm.kind}: this inspection compares a "
                          f"gate or vib MBM's synergy (which needs no student) with the teachers' average")
    device = resolve_device(cfg.device)
    splits = load_splits(run_cfg.data, run_cfg.seed)
    teachers = tuple(load_teacher(spec, spec.ckpt, splits.num_classes, device, dataset=splits.name)
                     for spec in run_cfg.teachers)
    tree, _ = load_checkpoint(root / f"mbm_stage{cfg.stage}.safetensors", device=device)
    dims = tuple(feature_shapes(t.eval_skeleton)["pooled"][1] for t in teachers)
    mbm = MBM(run_cfg.mbm, dims, splits.num_classes, adapters=run_cfg.stage_a.teacher_adapters).to(device).eval()
    params = tree["params"]["mbm"]
    # stage_b.synergy_scale "teachers": the divisor stage B applied (recorded in the run's summary)
    summary_path = root / "summary.json"
    scale = json.loads(summary_path.read_text()).get(f"stage{cfg.stage}_synergy_scale") if summary_path.is_file() else None

    def stats(batches) -> dict[str, dict[str, float]]:
        names = ["teacher average", "synergy (MBM)"] + ([f"synergy / {scale:.3f} (stage B's targets)"] if scale else [])
        sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in names}
        count = 0
        for _, batch in zip(range(cfg.batches), batches):
            with torch.no_grad():
                outputs = [apply_model(t.eval_skeleton, t.params, t.buffers, batch["x"], train=False) for t in teachers]
                logits, pooled = [out[0] for out in outputs], [out[1]["pooled"] for out in outputs]
                synergy = call_stateless(mbm, params, {}, *pooled, train=False)[0]["logits"]
            targets = [teacher_average(logits), synergy] + ([synergy.float() / scale] if scale else [])
            for name, lg in zip(names, targets):
                lg = lg.float()
                sums[name][0] += float((lg.argmax(1) == batch["y_a"]).float().mean())
                sums[name][1] += float(F.softmax(lg, 1).max(1).values.mean())
                sums[name][2] += float(logit_spread(lg))  # what stage_b.synergy_scale equalises
            count += 1
        return {k: {"accuracy": v[0] / count, "confidence": v[1] / count, "logit_std": v[2] / count}
                for k, v in sums.items()}

    result = {"clean validation": stats(eval_batches(splits.val, splits, run_cfg.data, device=device)),
              "stage-B training batches": stats(train_batches(splits, run_cfg.data, seed=run_cfg.seed, epoch=0,
                                                              device=device))}
    print(f"\n{root}: {cfg.batches} batches each\n")
    print("| images | targets | accuracy (first label) | mean max probability | mean logit std |\n|---|---|---|---|---|")
    for images, per in result.items():
        for name, s in per.items():
            print(f"| {images} | {name} | {100 * s['accuracy']:.1f} % | {s['confidence']:.3f} | {s['logit_std']:.2f} |")
    return result


def main(argv=None, prog="launch.py recipes.inspect_synergy"):
    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):
        argv = ["--run", *argv]
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
