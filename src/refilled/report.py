"""Results tables (mean ± std over seeds, paired differences) and plots."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from refilled.engine import atomic_write_bytes, atomic_write_text


def collect(runs_dir: str | Path, role: str | None = "student") -> list[dict]:
    """Every ``results.json`` below ``runs_dir`` (optionally only one role)."""
    results = []
    for path in sorted(Path(runs_dir).rglob("results.json")):
        record = json.loads(path.read_text())
        if role is None or record.get("role") == role:
            results.append(record)
    return results


def arm_label(record: dict) -> str:
    """What distinguishes one arm of a comparison: the method and how its teacher was made."""
    label = record.get("arm") or record["method"]
    if record.get("teacher_init") == "random" and "random" not in label:
        label += " (random teacher)"
    return label


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def ci95(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (t distribution)."""
    if len(values) < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(results: list[dict], baseline: str | None = None, group_keys=("protocol",)) -> list[dict]:
    """One row per (group, arm): mean ± std of test accuracy and stage-1 NCM accuracy, and,
    when ``baseline`` names an arm, the mean ± std and 95% CI of the per-seed paired difference."""
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in results:
        key = tuple(r.get(k) for k in group_keys)
        groups.setdefault(key, {}).setdefault(arm_label(r), {})[r["seed"]] = r
    rows = []
    for key, arms in groups.items():
        base = arms.get(baseline, {}) if baseline else {}
        for arm, by_seed in arms.items():
            acc = [100 * r["test_accuracy"] for r in by_seed.values()]
            ncm = [100 * r["stage1_ncm_accuracy"] for r in by_seed.values()
                   if r.get("stage1_ncm_accuracy") is not None]
            row = dict(zip(group_keys, key))
            row.update(arm=arm, n=len(acc))
            row["test_mean"], row["test_std"] = mean_std(acc)
            row["ncm_mean"], row["ncm_std"] = mean_std(ncm) if ncm else (None, None)
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
    head = [*group_keys, "arm", "n", "test acc. (%)", "stage-1 NCM (%)"]
    if baseline:
        head.append(f"paired diff. vs {baseline} (pts, ±std [95% CI])")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k)) for k in group_keys]
        cells += [r["arm"], str(r["n"]), _pm(r["test_mean"], r["test_std"]), _pm(r["ncm_mean"], r["ncm_std"])]
        if baseline:
            if "diff_mean" in r:
                ci = r["diff_ci95"]
                ci_text = f" [±{ci:.1f}]" if not math.isnan(ci) else ""
                cells.append(f"{r['diff_mean']:+.1f} ± {r['diff_std']:.1f}{ci_text}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


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
