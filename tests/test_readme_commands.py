"""Every ``python launch.py recipes.X ...`` command of the README parses with today's flags: a renamed or
removed flag there fails here, not in a user's shell. Shell variables defined in the README (``R2="..."``)
are expanded; loop variables get a sample value; nothing runs (parsing only)."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from kd.errors import ConfigError
from recipes._cli import parse

README = Path(__file__).resolve().parents[1] / "README.md"
LOOP_VALUES = {"seeds": "0", "arch": "resnet20", "seed": "0", "m": "kd", "method": "kd"}


def _code_lines() -> list[str]:
    """The README's code blocks, one logical line per backslash-continued line."""
    lines, inside, pending = [], False, ""
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    return lines


def _commands() -> list[tuple[str, list[str]]]:
    variables: dict[str, str] = {}

    def expand(text: str) -> str:
        for _ in range(5):
            text = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), LOOP_VALUES.get(m.group(1), "X")),
                          text)
        return text

    found = []
    for line in _code_lines():
        assignment = re.match(r'^\s*([A-Z][A-Z0-9_]*)="(.*)"\s*$', line)
        if assignment:
            variables[assignment.group(1)] = expand(assignment.group(2))
            continue
        for part in re.split(r";|&&|\|\||\bdo\b", line):
            match = re.search(r"python (?:\S*/)?launch\.py (recipes\.\w+)(.*)", part)
            if not match:
                continue
            args = shlex.split(expand(match.group(2).split(" #")[0]).split(">")[0], comments=True)
            found.append((match.group(1), [a for a in args if a != "done"]))
    return found


COMMANDS = _commands()


def test_the_readme_has_its_commands():
    recipes = {name for name, _ in COMMANDS}
    assert len(COMMANDS) >= 30 and {"recipes.ibkd", "recipes.study", "recipes.teacher", "recipes.quickstart"} <= recipes


@pytest.mark.parametrize("recipe,args", COMMANDS, ids=[f"{i}-{r}" for i, (r, _) in enumerate(COMMANDS)])
def test_every_readme_command_parses(recipe, args):
    if any(a in ("--resume", "--config", "--help") for a in args):
        pytest.skip("reads a run directory or a file the README's reader has")
    module = importlib.import_module(recipe)
    if not hasattr(module, "CONFIG"):  # recipes without a config (kernels_bench forwards its own arguments)
        pytest.skip(f"{recipe} has no CONFIG")
    if recipe == "recipes.report" and args and not args[0].startswith("-"):  # its main takes the runs first
        runs = [a for a in args if not a.startswith("-")][: next((i for i, a in enumerate(args) if a.startswith("-")),
                                                                  len(args))]
        args = ["--runs", *runs, *args[len(runs):]]
    try:
        parse(module.CONFIG, args, prog=recipe, description="")
    except SystemExit as exc:  # tyro: an unknown flag or a wrongly typed value
        pytest.fail(f"{recipe} {' '.join(args)}: the parser exited ({exc.code})")
    except ConfigError as exc:
        pytest.fail(f"{recipe} {' '.join(args)}: {exc}")
