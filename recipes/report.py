"""Compare runs: one table (Markdown + CSV; per method: mean ± std over seeds) and one PNG of validation curves.

The PNG draws each method's validation accuracy per epoch as the mean over its seeds, shaded min..max.

    python launch.py recipes.report runs/ibkd-... runs/ce-... [--out reports/]
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from kd.checkpoint import write_atomically
from kd.errors import ConfigError, OutputError, writing
from kd.rundir import check_writable, say

from ._cli import parse

# "model" is the network the run trained: the student, or the teacher of a teacher fine-tuning run.
# "teacher_test_acc" (each teacher's, " / "-joined) and "synergy_test_acc" (IB-KD's MBM) where a run has them.
COLUMNS = ["run", "dataset", "method", "setting", "teachers", "model", "seed", "epochs", "val_acc_last", "test_acc_last",
           "val_acc_best", "test_acc_best", "test_acc_ema_best", "teacher_test_acc", "synergy_test_acc",
           "wall_seconds", "images_per_second", "dataset_detail"]
NUMERIC = ("val_acc_last", "test_acc_last", "val_acc_best", "test_acc_best", "test_acc_ema_best", "synergy_test_acc",
           "wall_seconds", "images_per_second")


@dataclass(frozen=True)
class ReportConfig:
    """Runs to compare and where to write the table and plot."""

    runs: tuple[str, ...] = ()
    """Run directories (each with summary.json and metrics.jsonl); a folder of runs is expanded."""
    out: str = "reports"
    """Folder for report.md (per-method mean ± std, then per run), report.csv (per run), report_methods.csv
    (per method) and report.png."""
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


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json; one :class:`ConfigError` naming the file when it is not a JSON object."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
                          f"leave that run out of the report, or run it again") from None
    return summary


# Config fields that name, place or only display a run (or where it ran): runs that differ in nothing else but
# the seed are the seeds of one setting.
NOT_SETTING = frozenset({"seed", "run_name", "out_dir", "resume", "overwrite", "disable_tqdm", "log_every", "log",
                         "teacher_cache", "teacher_cache_max_gb", "device", "data.root", "data.workers",
                         "data.prefetch", "recipe"})


def setting_of(run_dir: Path) -> dict[str, str]:
    """The run's config.json as dotted field -> JSON text, without :data:`NOT_SETTING`; ``{}`` when the file is
    absent or not a JSON object (the run is then grouped by its summary alone)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif prefix[:-1] not in NOT_SETTING and prefix.split(".")[0] not in NOT_SETTING:
            flat[prefix[:-1]] = json.dumps(value, sort_keys=True)

    if isinstance(config, dict):
        walk("", config)
    return flat


def label_settings(rows: list[dict], settings: list[dict[str, str]]) -> None:
    """Each row's ``setting``: the config fields in which its run differs from another run of the same method
    (e.g. two grid entries), '-' when all its method's runs share one setting, so entries are never averaged
    as if they were seeds."""
    by_method: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_method.setdefault(r["method"], []).append(i)
    for members in by_method.values():
        keys = set().union(*(settings[i] for i in members))
        differing = sorted(k for k in keys if len({settings[i].get(k) for i in members}) > 1)
        for i in members:
            rows[i]["setting"] = ", ".join(f"{k}={_shown(settings[i].get(k))}" for k in differing
                                           if k != "epochs") or "-"


def _shown(text: str | None) -> str:
    """A setting's JSON text as a reader writes it: strings without quotes, '-' for a field the run lacks."""
    if text is None:
        return "-"
    value = json.loads(text)
    return value if isinstance(value, str) else text


def row_of(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    teachers = summary.get("teachers") or []
    teacher_accs = [summary.get(f"teacher{i}_test_acc") for i in (1, 2)]
    dataset = str(summary.get("dataset", ""))
    row = {
        "run": run_dir.name, "dataset": dataset.split(";")[0].split(" (")[0], "method": summary.get("method", summary.get("recipe", "?")),
        "setting": "-",
        "teachers": "+".join(map(str, teachers)) or "-", "model": summary.get("student", summary.get("teacher", "?")),
        "seed": summary.get("seed"), "epochs": summary.get("epochs"),
        "val_acc_last": summary.get("last_val_acc"), "test_acc_last": summary.get("last_test_acc"),
        "val_acc_best": summary.get("best_val_acc"), "test_acc_best": summary.get("best_test_acc"),
        "test_acc_ema_best": summary.get("ema_best_test_acc"),
        "teacher_test_acc": " / ".join(f"{a:.2f}" for a in teacher_accs if isinstance(a, (int, float))) or None,
        "synergy_test_acc": summary.get("synergy_test_acc"), "wall_seconds": summary.get("wall_seconds"),
        "images_per_second": summary.get("images_per_second"), "dataset_detail": dataset,
    }
    row["method"], row["model"] = str(row["method"]), str(row["model"])
    for key in ("seed", "epochs"):
        if row[key] is not None and (isinstance(row[key], bool) or not isinstance(row[key], int)):
            raise ConfigError(f"{run_dir / 'summary.json'}: {key} is {row[key]!r}, not an integer: leave that run "
                              f"out of the report, or run it again")
    for key in NUMERIC:
        if row[key] is not None and (isinstance(row[key], bool) or not isinstance(row[key], (int, float))):
            raise ConfigError(f"{run_dir / 'summary.json'}: {key} is {row[key]!r}, not a number: leave that run out "
                              f"of the report, or run it again")
    return row


def curves(run_dir: Path) -> list[tuple[int, float]]:
    """``(epoch, validation accuracy)`` of the run's epoch records; a line torn by an interruption is skipped."""
    points = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (isinstance(record, dict) and record.get("kind") == "epoch" and not record.get("stage")
                    and isinstance(record.get("epoch"), int) and isinstance(record.get("val_acc"), (int, float))):
                points.append((record["epoch"], float(record["val_acc"])))
    return points


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# One group = the runs of one method with one student, teachers and budget: the seeds of a comparison.
GROUP_KEY = ("dataset", "method", "setting", "teachers", "model", "epochs")
SUMMARY_METRICS = ("val_acc_best", "test_acc_best", "test_acc_last", "test_acc_ema_best", "images_per_second")
SUMMARY_COLUMNS = [*GROUP_KEY, "runs", *(f"{m}_{stat}" for m in SUMMARY_METRICS for stat in ("mean", "std"))]


def groups_of(rows: list[dict]) -> dict[tuple, list[int]]:
    """Row indices per group, in the order groups first appear."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r[k] for k in GROUP_KEY), []).append(i)
    return groups


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) over seeds; the std is None for a single run."""
    if not values:
        return None, None
    return mean(values), (stdev(values) if len(values) > 1 else None)


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per group: mean and sample std over its seeds of each accuracy."""
    out = []
    for key, members in groups_of(rows).items():
        row: dict = dict(zip(GROUP_KEY, key), runs=len(members))
        for metric in SUMMARY_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(
                [rows[i][metric] for i in members if rows[i][metric] is not None])
        out.append(row)
    return out


def _mean_pm_std(m: float | None, s: float | None) -> str:
    if m is None:
        return "-"
    return f"{m:.2f} ± {s:.2f}" if s is not None else f"{m:.2f}"


def markdown(rows: list[dict]) -> str:
    per_method = summary_rows(rows)
    lines = ["Per method: mean ± sample std (n - 1) over seeds; accuracies in %, training images/s.", "",
             "| " + " | ".join(GROUP_KEY) + " | runs | " + " | ".join(SUMMARY_METRICS) + " |",
             "|" + "---|" * (len(GROUP_KEY) + 1 + len(SUMMARY_METRICS))]
    for r in per_method:
        cells = [_fmt(r[k]) for k in (*GROUP_KEY, "runs")]
        cells += [_mean_pm_std(r[f"{m}_mean"], r[f"{m}_std"]) for m in SUMMARY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per run:", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def mean_curve(run_curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch over the runs that reached it: ``(epochs, mean, min, max)`` of validation accuracy."""
    by_epoch: dict[int, list[float]] = {}
    for points in run_curves:
        for epoch, acc in points:
            by_epoch.setdefault(epoch, []).append(acc)
    epochs = sorted(by_epoch)
    return (epochs, [mean(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs])


def plot(run_dirs: list[Path], rows: list[dict], path: Path) -> bool:
    """Validation accuracy against epochs, one line per method: the mean over its seeds, shaded from the
    lowest to the highest seed, so a reader sees whether (and how consistently) each method converged."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: table written, plot skipped (pip install -e '.[plot]' for the PNG)")
        return False
    datasets = sorted({r["dataset"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, members in groups_of(rows).items():
        run_curves = [points for points in (curves(run_dirs[i]) for i in members) if points]
        if not run_curves:
            continue
        epochs, avg, low, high = mean_curve(run_curves)
        group = dict(zip(GROUP_KEY, key))
        seeds = f"mean of {len(run_curves)} seeds" if len(run_curves) > 1 else "1 seed"
        where = f"{group['dataset']}: " if len(datasets) > 1 else ""
        setting = f" ({group['setting']})" if group["setting"] != "-" else ""
        line, = ax.plot(epochs, avg, marker="o", markersize=3,
                        label=f"{where}{group['method']}{setting} {group['model']}, {group['epochs']} epochs ({seeds})")
        if len(run_curves) > 1:
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    details = sorted({r["dataset_detail"].split(";")[0] for r in rows})
    ax.set_title(f"{', '.join(details)}\nmean over seeds, band = min..max over seeds".lstrip(), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def csv_text(fieldnames: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_outputs(out: Path, name: str) -> None:
    """Before reading any run: the output folder can be made and written, and no output name is a folder."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file: pass a folder for the report")
    check_writable(out, " (choose another --out)")
    for suffix in (".md", ".csv", "_methods.csv", ".png"):
        if (out / f"{name}{suffix}").is_dir():
            raise OutputError(f"{out / (name + suffix)} is a folder: remove it or choose another --name")


def run(cfg: ReportConfig) -> list[dict]:
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"--name {cfg.name!r} must be a plain file name (the folder is --out)")
    out = Path(cfg.out)
    check_outputs(out, cfg.name)
    run_dirs = expand(cfg.runs)
    rows = [row_of(d) for d in run_dirs]
    label_settings(rows, [setting_of(d) for d in run_dirs])
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    write_atomically(out / f"{cfg.name}.md", (table + "\n").encode())
    write_atomically(out / f"{cfg.name}.csv", csv_text(COLUMNS, rows).encode())
    write_atomically(out / f"{cfg.name}_methods.csv", csv_text(SUMMARY_COLUMNS, summary_rows(rows)).encode())
    say(table)
    with writing(out / f"{cfg.name}.png"):
        plotted = plot(run_dirs, rows, out / f"{cfg.name}.png")
    say(f"\nwrote {out / (cfg.name + '.md')}, {out / (cfg.name + '.csv')}, {out / (cfg.name + '_methods.csv')}"
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
