"""Compare runs: one table (Markdown + CSV) and one PNG of validation-accuracy curves.

    python launch.py recipes.report runs/ibkd-... runs/ce-... [--out reports/]
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev

from kd.errors import ConfigError
from kd.run import say

from ._cli import parse

COLUMNS = ["run", "method", "teachers", "student", "seed", "epochs", "val_acc_last", "test_acc_last",
           "val_acc_best", "test_acc_best", "test_acc_ema_best", "wall_seconds", "images_per_second", "dataset"]


@dataclass(frozen=True)
class ReportConfig:
    """Runs to compare and where to write the table and plot."""

    runs: tuple[str, ...] = ()
    """Run directories (each with summary.json and metrics.jsonl); a folder of runs is expanded."""
    out: str = "reports"
    """Folder for report.md, report.csv and report.png."""
    name: str = "report"
    """Base name of the output files."""


CONFIG = ReportConfig()


def expand(paths: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(d for d in p.iterdir() if (d / "summary.json").is_file()))
        else:
            raise ConfigError(f"{p} is not a finished run directory (no summary.json)")
    if not found:
        raise ConfigError("no finished runs given (pass run directories that contain summary.json)")
    return found


def row_of(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    teachers = summary.get("teachers") or []
    return {
        "run": run_dir.name, "method": summary.get("method", summary.get("recipe", "?")),
        "teachers": "+".join(teachers) or "-", "student": summary.get("student", summary.get("teacher", "?")),
        "seed": summary.get("seed"), "epochs": summary.get("epochs"),
        "val_acc_last": summary.get("last_val_acc"), "test_acc_last": summary.get("last_test_acc"),
        "val_acc_best": summary.get("best_val_acc"), "test_acc_best": summary.get("best_test_acc"),
        "test_acc_ema_best": summary.get("ema_best_test_acc"), "wall_seconds": summary.get("wall_seconds"),
        "images_per_second": summary.get("images_per_second"), "dataset": summary.get("dataset", ""),
    }


def curves(run_dir: Path) -> list[tuple[int, float]]:
    points = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "epoch" and "val_acc" in record:
                points.append((record["epoch"], record["val_acc"]))
    return points


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["teachers"], r["student"]), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "| method | teachers | student | runs | test acc best (mean ± std) | test acc last (mean ± std) |",
                  "|---|---|---|---|---|---|"]
        for (method, teachers, student), g in groups.items():
            best = [r["test_acc_best"] for r in g if r["test_acc_best"] is not None]
            last = [r["test_acc_last"] for r in g if r["test_acc_last"] is not None]
            stat = lambda v: f"{mean(v):.2f} ± {pstdev(v):.2f}" if v else "-"  # noqa: E731
            lines.append(f"| {method} | {teachers} | {student} | {len(g)} | {stat(best)} | {stat(last)} |")
    return "\n".join(lines)


def plot(run_dirs: list[Path], rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: table written, plot skipped (pip install -e '.[plot]' for the PNG)")
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for run_dir, row in zip(run_dirs, rows):
        points = curves(run_dir)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    label=f"{row['method']} {row['student']} s{row['seed']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(rows[0]["dataset"].split(";")[0] if rows else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(cfg: ReportConfig) -> list[dict]:
    run_dirs = expand(cfg.runs)
    rows = [row_of(d) for d in run_dirs]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / f"{cfg.name}.md").write_text(table + "\n")
    with open(out / f"{cfg.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    say(table)
    plotted = plot(run_dirs, rows, out / f"{cfg.name}.png")
    say(f"\nwrote {out / (cfg.name + '.md')}, {out / (cfg.name + '.csv')}"
        + (f", {out / (cfg.name + '.png')}" if plotted else ""))
    return rows


def main(argv=None, prog="launch.py recipes.report"):
    argv = list(argv or [])
    # Positional run directories before any flag: `recipes.report RUN1 RUN2 --out x`.
    positional = []
    while argv and not argv[0].startswith("-"):
        positional.append(argv.pop(0))
    if positional:
        argv = ["--runs", *positional, *argv]
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
