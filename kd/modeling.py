"""A network as data: a train-mode skeleton, an eval-mode skeleton, and its initial params/buffers.

Skeletons are plain modules used only as the structure for ``torch.func.functional_call``; the weights
that matter travel in the train state. One skeleton per mode keeps a compiled step from recompiling
when evaluation flips ``.training``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import tree as T
from .config import ModelConfig
from .errors import ConfigError
from .models import build_model, num_parameters


@dataclass
class Net:
    arch: str
    num_classes: int
    train_skeleton: nn.Module
    eval_skeleton: nn.Module
    params: T.Tree
    buffers: T.Tree

    def meta(self, cfg: ModelConfig, dataset: str) -> dict[str, Any]:
        """Metadata stored with this network's weights; loading checks ``arch`` and ``num_classes``."""
        return {"arch": self.arch, "num_classes": self.num_classes, "small_input": cfg.small_input,
                "dataset": dataset, "num_parameters": num_parameters(self.train_skeleton)}


def build_net(cfg: ModelConfig, num_classes: int, device: torch.device, *, channels_last: bool = False,
              seed: int | None = None, flag: str = "--MODEL") -> Net:
    """The network of ``cfg``; ``flag`` is the recipe's name for it (``--student``), which errors name."""
    if seed is not None:
        torch.manual_seed(seed)
    try:
        module = build_model(cfg.arch, num_classes, small_input=cfg.small_input, pretrained=cfg.pretrained)
    except (ValueError, RuntimeError) as exc:  # unknown arch, no pretrained weights, offline download
        message = str(exc).splitlines()[0].replace("--MODEL.", f"{flag}.")
        raise ConfigError(f"cannot build {cfg.arch!r}: {message}") from None
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    train_skeleton = module.train()
    eval_skeleton = copy.deepcopy(module).eval()
    return Net(cfg.arch, num_classes, train_skeleton, eval_skeleton, params, buffers)
