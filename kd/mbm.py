"""The Manifold Bridging Module (MBM): an information bottleneck that fuses two teachers (SPEC 6).

gate (default):
    p_i = W_i f_i                      (linear to c = max(C1, C2))
    g   = sigmoid(gate)                (a per-channel parameter, initialised at 0, so g = 0.5)
    h   = dropout(g * p1 + (1 - g) * p2)
vib:
    h   = dropout(concat(f1, f2))
both:
    mu = W_mu h,  logvar = clamp(W_lv h, -6, 2)
    training: z = mu + eps * exp(logvar / 2);  eval: z = mu (deterministic targets)
    synergy logits s = W_head z

The module is used statelessly through ``functional_call``; the sample and its KL come from
:func:`kernels.ib_reparam_kl` (fused on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

import kernels
from kernels import reference as kernel_reference

LOGVAR_MIN, LOGVAR_MAX = -6.0, 2.0


@dataclass(frozen=True)
class MBMConfig:
    """The bottleneck that fuses the teachers."""

    kind: Literal["gate", "vib", "avg"] = "gate"
    """'gate': per-channel sigmoid gate between projected teachers; 'vib': concatenated teacher features;
    'avg' (an ablation): no MBM at all, the synergy logits are the teachers' average logits, no stage A
    and no latent term."""
    z_dim: int = 512
    """Bottleneck (latent) width."""
    dropout: float = 0.1
    """Dropout on the fused representation (training only)."""


class MBM(nn.Module):
    def __init__(self, cfg: MBMConfig, teacher_dims: tuple[int, int], num_classes: int, *,
                 backend: str | None = None):
        super().__init__()
        if cfg.kind == "avg":
            raise ValueError("mbm.kind 'avg' has no MBM module (the teachers' logits are averaged instead)")
        self.kind = cfg.kind
        self.backend = backend  # kernels backend of the reparameterisation + KL (None = $KD_KERNELS / auto)
        c1, c2 = teacher_dims
        if cfg.kind == "gate":
            width = max(c1, c2)
            self.proj1 = nn.Linear(c1, width)
            self.proj2 = nn.Linear(c2, width)
            self.gate = nn.Parameter(torch.zeros(width))
        else:
            width = c1 + c2
        self.dropout = nn.Dropout(cfg.dropout)
        self.mu = nn.Linear(width, cfg.z_dim)
        self.logvar = nn.Linear(width, cfg.z_dim)
        self.head = nn.Linear(cfg.z_dim, num_classes)

    def forward(self, teacher1_pooled: Tensor, teacher2_pooled: Tensor, eps: Tensor | None = None
                ) -> dict[str, Tensor]:
        """Returns ``mu``, ``logvar``, ``z``, ``kl`` (per sample) and ``logits``. ``eps`` (N, z_dim) is
        the reparameterisation noise: given in training, ``None`` means the deterministic ``z = mu``."""
        if self.kind == "gate":
            g = torch.sigmoid(self.gate)
            fused = g * self.proj1(teacher1_pooled) + (1 - g) * self.proj2(teacher2_pooled)
        else:
            fused = torch.cat([teacher1_pooled, teacher2_pooled], dim=1)
        h = self.dropout(fused)
        mu = self.mu(h)
        logvar = self.logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)
        if eps is None:
            z, kl = mu, kernel_reference.ib_reparam_kl(mu, logvar, torch.zeros_like(mu))[1]
        else:
            z, kl = kernels.ib_reparam_kl(mu, logvar, eps, backend=self.backend)
        return {"mu": mu, "logvar": logvar, "z": z, "kl": kl, "logits": self.head(z)}


class ProjectionHead(nn.Module):
    """Student pooled features -> the MBM latent space: Linear-BN-ReLU-Linear-BN, L2-normalised."""

    def __init__(self, in_dim: int, z_dim: int, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, z_dim)
        self.bn2 = nn.BatchNorm1d(z_dim)

    def forward(self, pooled: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.fc1(pooled)))
        return nn.functional.normalize(self.bn2(self.fc2(h)), dim=1)
