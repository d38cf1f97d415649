"""Tiny pytree helpers over nested dicts of tensors (the only state containers this project uses).

State is data: params, buffers, optimizer moments and EMA are nested ``dict[str, Tensor | dict]``.
These helpers flatten them to one level (keys joined with ``/``; module names already use ``.``)
for checkpoints and foreach kernels, and map functions over leaves without touching the input.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

Tree = dict[str, Any]
SEP = "/"


def flatten(tree: Tree, prefix: str = "") -> dict[str, Tensor]:
    """``{"a": {"b": t}}`` -> ``{"a/b": t}``. Leaves are tensors; ``None`` leaves are dropped."""
    flat: dict[str, Tensor] = {}
    for key, value in tree.items():
        if SEP in key:
            raise ValueError(f"key {key!r} contains the separator {SEP!r}")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + SEP))
        elif isinstance(value, Tensor):
            flat[name] = value
        elif value is not None:
            raise TypeError(f"leaf {name!r} is a {type(value).__name__}, expected a tensor")
    return flat


def unflatten(flat: dict[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten`."""
    tree: Tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split(SEP)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def leaves(tree: Tree) -> list[Tensor]:
    return list(flatten(tree).values())


def tree_map(fn: Callable[..., Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over trees of identical structure; returns a new tree."""
    out: Tree = {}
    for key, value in tree.items():
        others = [r[key] for r in rest]
        if isinstance(value, dict):
            out[key] = tree_map(fn, value, *others)
        else:
            out[key] = fn(value, *others)
    return out


def clone(tree: Tree) -> Tree:
    return tree_map(lambda t: t.clone(), tree)


def detach(tree: Tree) -> Tree:
    return tree_map(lambda t: t.detach(), tree)


def map_like(structure: Tree, values: list[Tensor]) -> Tree:
    """Rebuild a tree with the structure of ``structure`` from leaves in :func:`flatten` order."""
    names = list(flatten(structure))
    if len(names) != len(values):
        raise ValueError(f"expected {len(names)} leaves, got {len(values)}")
    return unflatten(dict(zip(names, values)))


def fill(structure: Tree, flat: dict[str, Tensor], prefix: str = "") -> Tree:
    """A tree with exactly ``structure``'s keys (empty sub-dicts included) whose leaves come from
    ``flat`` (as produced by :func:`flatten`)."""
    out: Tree = {}
    for key, value in structure.items():
        name = f"{prefix}{key}"
        out[key] = fill(value, flat, name + SEP) if isinstance(value, dict) else flat[name]
    return out
