"""Results tables (mean ± std over seeds, paired differences) and plots."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from pathlib import Path

from refilled.errors import UserError
from refilled.files import atomic_write_bytes, atomic_write_text, write_csv
from refilled.runs import collect_results
from refilled.stats import ci95, mean_std

def _runs_folder(runs_dir: str | Path) -> Path:
    folder = Path(runs_dir)
    if not folder.exists():
        raise UserError(f"runs folder '{folder}' does not exist; give the folder that holds the run "
                        "directories (out_dir)")
    if not folder.is_dir():
        raise UserError(f"'{folder}' is a file, not a folder of runs; give the folder that holds "
                        "the run directories (out_dir)")
    return folder


def _collect_runs(runs_dir: str | Path, role: str | None = "student") -> list[tuple[dict, Path]]:
    """(record, run directory) of every ``results.json`` below ``runs_dir`` (see
    :func:`refilled.runs.collect_results`)."""
    return collect_results(_runs_folder(runs_dir), role)


def collect(runs_dir: str | Path, role: str | None = "student") -> list[dict]:
    """Every ``results.json`` below ``runs_dir`` (optionally only one role)."""
    return [record for record, _ in _collect_runs(runs_dir, role)]


def arm_label(record: dict) -> str:
    """What distinguishes one arm of a comparison: the method and how its teacher was made."""
    label = record.get("arm") or record["method"]
    if record.get("teacher_init") == "random" and "random" not in label:
        label += " (random teacher)"
    return label


def summarize(results: list[dict], baseline: str | None = None, group_keys=("protocol",)) -> list[dict]:
    """One row per (group, arm): mean ± std of the final student's validation and test accuracy
    and of the stage-1 NCM accuracy (validation and test: what stage 1 alone gave), and, when
    ``baseline`` names an arm, the mean ± std and 95% CI of the per-seed paired difference."""
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in results:
        key = tuple(r.get(k) for k in group_keys)
        groups.setdefault(key, {}).setdefault(arm_label(r), {})[r["seed"]] = r
    rows = []
    for key, arms in groups.items():
        base = arms.get(baseline, {}) if baseline else {}
        for arm, by_seed in arms.items():
            acc = [100 * r["test_accuracy"] for r in by_seed.values()]
            row = dict(zip(group_keys, key))
            row.update(arm=arm, n=len(acc))
            row["test_mean"], row["test_std"] = mean_std(acc)
            for prefix, field in (("val", "val_accuracy"), ("ncm", "stage1_ncm_accuracy"),
                                  ("ncm_val", "stage1_ncm_val_accuracy")):
                values = [100 * r[field] for r in by_seed.values() if r.get(field) is not None]
                row[f"{prefix}_mean"], row[f"{prefix}_std"] = mean_std(values) if values else (None, None)
            paired = [100 * (r["test_accuracy"] - base[s]["test_accuracy"])
                      for s, r in by_seed.items() if s in base]
            if base and arm != baseline and paired:
                row["diff_mean"], row["diff_std"] = mean_std(paired)
                row["diff_ci95"], row["diff_n"] = ci95(paired), len(paired)
            rows.append(row)
    return rows


def _pm(mean, std, digits=1) -> str:
    return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: list[dict], group_keys=("protocol",), baseline: str | None = None) -> str:
    head = [*group_keys, "arm", "n", "val acc. (%)", "test acc. (%)", "stage-1 NCM val (%)",
            "stage-1 NCM test (%)"]
    if baseline:
        head.append(f"paired diff. vs {baseline} (pts, ±std [95% CI])")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k)) for k in group_keys]
        cells += [r["arm"], str(r["n"]), _pm(r.get("val_mean"), r.get("val_std")),
                  _pm(r["test_mean"], r["test_std"]), _pm(r.get("ncm_val_mean"), r.get("ncm_val_std")),
                  _pm(r["ncm_mean"], r["ncm_std"])]
        if baseline:
            if "diff_mean" in r:
                ci = r["diff_ci95"]
                ci_text = f" [±{ci:.1f}]" if not math.isnan(ci) else ""
                cells.append(f"{r['diff_mean']:+.1f} ± {r['diff_std']:.1f}{ci_text}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_arms(results: list[dict], path: Path, title: str, order: list[str] | None = None) -> None:
    """Test accuracy per arm: the mean as a bar, each seed as a dot, seeds joined across arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = order or sorted({arm_label(r) for r in results})
    seeds = sorted({r["seed"] for r in results})
    acc = {(arm_label(r), r["seed"]): 100 * r["test_accuracy"] for r in results}
    fig, ax = plt.subplots(figsize=(1.9 * len(arms) + 2, 4))
    means = [statistics.fmean([acc[a, s] for s in seeds if (a, s) in acc]) for a in arms]
    ax.bar(range(len(arms)), means, color="#c6dbef", edgecolor="#3182bd", width=0.6)
    for s in seeds:
        xs = [i for i, a in enumerate(arms) if (a, s) in acc]
        ax.plot(xs, [acc[arms[i], s] for i in xs], marker="o", lw=0.8, alpha=0.8, label=f"seed {s}")
    lo = min(acc.values())
    ax.set_ylim(max(0, lo - 5), min(100, max(acc.values()) + 2))
    ax.set_xticks(range(len(arms)), [a.replace(" (", "\n(") for a in arms])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------ the report of a folder of runs

REPORT_GROUPS = ("protocol", "overlap")
# Parts of a sweep cell label that the report shows elsewhere (the group columns, the seed) or
# puts first (the method).
_SHOWN_ELSEWHERE = {"method", "seed", "data.student_offset"}


def report_arm(record: dict) -> str:
    """The arm of a run in :func:`write_report`.

    A free-form label (``arm=...``, e.g. the demo's "student alone") is kept. A sweep's cell
    label (``"rkd, data.student_offset=2"``: the arm or method, then the swept values) keeps
    the name and whatever else was swept: ``"rkd"``, ``"refilled (ablation=triplet)"``; the class
    window is a row group, not part of the arm.
    """
    label = record.get("arm")
    if not label:
        return arm_label(record)
    parts = label.split(", ")
    # the label's own words, commas included ("REFILLED, paper budget"), then the swept values
    words = [p for p in parts if "=" not in p and p != "base"]
    name = ", ".join(words) if words else record["method"]
    rest = [p for p in parts if "=" in p and p.partition("=")[0] not in _SHOWN_ELSEWHERE | {"method"}]
    return arm_label({**record, "arm": name + (f" ({', '.join(rest)})" if rest else "")})


def _fig_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(arms: list[str]) -> dict[str, tuple]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
    return {arm: cmap(i % cmap.N) for i, arm in enumerate(arms)}


def plot_accuracy_vs_overlap(rows: list[dict], path: Path, arms: list[str]) -> None:
    """Mean test accuracy against the class overlap, one line per arm, sample-std error bars."""
    plt = _pyplot()
    colors = _colors(arms)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(arms):
        points = sorted((r["overlap"], r["test_mean"], r["test_std"]) for r in rows
                        if r["arm"] == arm and r.get("overlap") is not None)
        if not points:
            continue
        xs, ys, es = zip(*points)
        dodge = 0.05 * (i - (len(arms) - 1) / 2)  # side by side, so the error bars stay readable
        ax.errorbar([x + dodge for x in xs], ys, yerr=es, marker="o", ms=4, capsize=3, lw=1.2,
                    color=colors[arm], label=arm)
    overlaps = sorted({r["overlap"] for r in rows if r.get("overlap") is not None})
    ax.set_xticks(overlaps)
    ax.set_xlabel("class overlap (student classes the teacher knows)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write_bytes(path, _fig_bytes(fig))


def read_curve(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    """(training step, validation accuracy, loss) per epoch row of a run's ``metrics.csv``.

    Steps accumulate over the stages, so a two-stage run and a single-stage run share an axis.
    The validation accuracy is the classifier's; in a stage that trains no classifier (REFILLED's
    stage 1) it is the nearest-class-mean accuracy. Empty when the file is missing.
    """
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []

    def number(text):
        return float(text) if text not in (None, "") else None

    curve, step = [], 0
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step += int(float(row.get("steps") or 0))
                val = number(row.get("val_accuracy"))
                if val is None:
                    val = number(row.get("val_ncm_accuracy"))
                curve.append((step, val, number(row.get("loss"))))
    except (ValueError, TypeError, OverflowError, csv.Error) as err:  # UnicodeDecodeError too
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"{type(err).__name__}: {err}"
        raise UserError(f"metrics file '{path}' cannot be read ({' '.join(reason.split())[:120]}); "
                        "delete it (the report then shows no curve for that run)") from None
    except OSError as err:
        raise UserError(f"cannot read metrics file '{path}' ({err.strerror or err}); "
                        "check its permissions") from None
    return curve


def plot_training_curves(runs: list[tuple[dict, Path]], path: Path, groups: list[tuple],
                         arms: list[str]) -> None:
    """Validation accuracy (top) and training loss (bottom) against training steps, one column
    per row group, one curve per arm (mean over the seeds that have a value at that step)."""
    plt = _pyplot()
    colors = _colors(arms)
    width = 4.2 * len(groups) + 2.2  # 2.2 inches on the right for the legend
    fig, axes = plt.subplots(2, len(groups), figsize=(width, 7), squeeze=False)
    for col, group in enumerate(groups):
        for arm in arms:
            val: dict[int, list[float]] = {}
            loss: dict[int, list[float]] = {}
            for record, run_dir in runs:
                if record["arm"] != arm or tuple(record.get(k) for k in REPORT_GROUPS) != group:
                    continue
                for step, v, l in read_curve(run_dir):
                    if v is not None:
                        val.setdefault(step, []).append(100 * v)
                    if l is not None:
                        loss.setdefault(step, []).append(l)
            for ax, series in ((axes[0][col], val), (axes[1][col], loss)):
                if series:
                    xs = sorted(series)
                    ax.plot(xs, [statistics.fmean(series[x]) for x in xs], lw=1.1,
                            color=colors[arm], label=arm)
        axes[0][col].set_title(", ".join(f"{k} {v}" for k, v in zip(REPORT_GROUPS, group)), fontsize=9)
        axes[1][col].set_xlabel("training step")
        if any(axes[1][col].get_lines()):
            axes[1][col].set_yscale("log")
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[1][0].set_ylabel("training loss (log scale)")
    legend: dict[str, object] = {}  # one entry per arm, whichever panel drew it
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    right = 1 - 2.1 / width
    fig.tight_layout(rect=(0, 0, right, 1))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="center left", fontsize=8,
                   bbox_to_anchor=(right, 0.5))
    atomic_write_bytes(path, _fig_bytes(fig))


def _out_folder(out: str | Path) -> Path:
    """The report's folder, created if needed; one UserError line if that cannot be."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out '{folder}' is a file; give a folder for report.md, report.csv and the "
                        "plots (it is created if needed)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report folder '{folder}' ({err.strerror or err}); "
                        "choose another --out") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into the report folder '{folder}' (permission denied); "
                        "choose another --out")
    return folder


def write_report(runs_dir: str | Path, out: str | Path | None = None, baseline: str = "ce") -> str:
    """Tables and plots of every student run below ``runs_dir``; returns the markdown.

    Rows are grouped by protocol and class overlap, then arm (:func:`report_arm`); each cell
    gives the mean ± sample std of the test accuracy over seeds, n, and the per-seed paired
    difference to the ``baseline`` arm of the same group. Writes ``report.md``, ``report.csv``,
    ``accuracy_vs_overlap.png`` and ``training_curves.png`` into ``out`` (default ``runs_dir``).
    """
    out_dir = Path(out) if out is not None else _runs_folder(runs_dir)
    if out_dir.exists() and not out_dir.is_dir():
        _out_folder(out_dir)  # one line, before anything is read
    runs = [({**record, "arm": report_arm(record)}, run_dir)
            for record, run_dir in _collect_runs(runs_dir, "student")]
    if not runs:
        raise UserError(f"no student results.json below '{runs_dir}'; run experiments there first")
    seen: dict[tuple, Path] = {}
    for record, run_dir in runs:
        key = (*(record.get(k) for k in REPORT_GROUPS), record["arm"], record["seed"])
        if key in seen:
            raise UserError(
                f"two runs fall in the same report cell (arm '{record['arm']}', seed {record['seed']}, "
                f"{', '.join(f'{k} {v}' for k, v in zip(REPORT_GROUPS, key))}): '{seen[key]}' and "
                f"'{run_dir}'; give them different arm= labels or report them from separate folders"
            )
        seen[key] = run_dir
    records = [record for record, _ in runs]
    arms = sorted({r["arm"] for r in records}, key=lambda a: (a != baseline, a))
    has_baseline = baseline in arms
    rows = summarize(records, baseline=baseline if has_baseline else None, group_keys=REPORT_GROUPS)
    rank = {arm: i for i, arm in enumerate(arms)}
    rows.sort(key=lambda r: (-(r["overlap"] if r["overlap"] is not None else -1), str(r["protocol"]),
                             rank[r["arm"]]))
    groups = list(dict.fromkeys(tuple(r[k] for k in REPORT_GROUPS) for r in rows))

    table = markdown_table(rows, group_keys=REPORT_GROUPS, baseline=baseline if has_baseline else None)
    note = (f"Paired difference: per seed, the arm minus `{baseline}` in the same class window; "
            "mean ± sample std over the seeds both have, and the half-width of its 95% confidence "
            "interval (t distribution)." if has_baseline
            else f"No run of the baseline arm `{baseline}`: no paired differences.")
    text = "\n".join([
        f"# Report: {runs_dir}",
        "",
        f"{len(records)} student runs. Accuracy (%) of the final student after the last epoch on "
        "validation and test, and of the NCM classifier on the student's embedding right after "
        "stage 1 (what stage 1 alone gave; REFILLED only): mean ± sample std over seeds; n = "
        "number of seeds in the cell. " + note,
        "",
        table,
        "",
        "Figures: `accuracy_vs_overlap.png` (test accuracy against the class overlap, std error "
        "bars), `training_curves.png` (validation accuracy and training loss, mean over seeds).",
    ])
    _out_folder(out_dir)
    atomic_write_text(out_dir / "report.md", text + "\n")
    write_csv(out_dir / "report.csv", rows)
    plot_accuracy_vs_overlap(rows, out_dir / "accuracy_vs_overlap.png", arms)
    plot_training_curves(runs, out_dir / "training_curves.png", groups, arms)
    return text
