"""Issue 8's study: where does a teacher's cross-task knowledge pay off? (glyphs, CPU)

One teacher (cnn_medium) learns the 139 characters of digits, Latin, Greek and Cyrillic. A
smaller student (cnn_small) learns, from 5 or 20 images (fonts) per class:

* cross   - 128 characters of disjoint alphabets: Armenian, Georgian, Hebrew (glyphs-crosstask.yaml)
* overlap - 43 Cyrillic characters the teacher knows + 43 Armenian ones (glyphs-overlap.yaml)
* same    - the teacher's own 139 characters (glyphs-same.yaml)

Arms, each on the same total number of SGD steps (REFILLED: stage 1 + stage 2):

* student alone (CE), label smoothing, RKD, KD (only where classes are shared);
* REFILLED (TPAMI preset), REFILLED (CVPR preset: triplet stage 1, local centres, lambda decay);
* REFILLED with a random teacher (untrained, same architecture, BN statistics calibrated):
  the control that tells what the *trained* teacher adds;
* the teacher's own embedding with class means of the student's images (NCM; no training).

Five replicates k = 0..4: ``seed=k`` and ``data.split_seed=k`` (a fresh draw of the student's
images and of its validation images per replicate); every arm of a replicate sees the same
images, so differences are paired by replicate. The test split (a fixed 25% of each class's
fonts) is read once per run, after training, and never for a choice.

Usage (each step skips finished runs, so an interrupted study continues):

    python benchmarks/glyphs_study.py teacher            # trains the shared teacher once
    python benchmarks/glyphs_study.py select --jobs 2    # lambda / smoothing on validation
    python benchmarks/glyphs_study.py run --jobs 2       # the grid (uses the selection)
    python benchmarks/glyphs_study.py analyse            # -> benchmarks/glyphs_study.md/.png
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("runs/glyphs-study")
TEACHER_CMD = ["configs/glyphs-crosstask.yaml", "method=teacher_ncm", "out_dir=runs/glyphs"]
REGIMES = {"cross": "configs/glyphs-crosstask.yaml", "overlap": "configs/glyphs-overlap.yaml",
           "same": "configs/glyphs-same.yaml"}
# Total epochs per student budget (REFILLED: stage-1 epochs + the rest in stage 2). At 5 images
# per class and 64 per batch that is 1000 steps for the 128-class cross-task student.
EPOCHS = {5: (100, 30), 20: (30, 9)}
REPLICATES = range(5)
SELECT_REPLICATES = (100, 101)  # selection runs use replicates the study does not report
ARMS = ("student alone", "label smoothing", "RKD", "KD", "REFILLED", "REFILLED, CVPR preset",
        "REFILLED, random teacher", "teacher NCM")


def refilled(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("refilled")), *args]


def teacher_dir() -> str:
    """The run directory of the shared teacher (trained by the ``teacher`` step)."""
    found = sorted(Path("runs/glyphs").glob("teacher-glyphs-cnn_medium-*-seed0"))
    found = [p for p in found if (p / "results.json").exists()]
    if len(found) != 1:
        sys.exit(f"expected one finished teacher under runs/glyphs, found {len(found)}: "
                 "run `python benchmarks/glyphs_study.py teacher` first")
    return str(found[0])


def arm_overrides(arm: str, per_class: int, selected: dict) -> list[str] | None:
    total, stage1 = EPOCHS[per_class]
    two_stage = [f"stage1.optim.epochs={stage1}", f"train.epochs={total - stage1}"]
    one_stage = [f"train.epochs={total}"]
    return {
        "student alone": ["method=ce", *one_stage],
        "label smoothing": ["method=label_smoothing", *one_stage,
                            f"baselines.label_smoothing={selected['label smoothing']}"],
        "RKD": ["method=rkd", *one_stage],
        "KD": ["method=kd", *one_stage],
        "REFILLED": ["method=refilled", *two_stage, f"stage2.lam={selected['REFILLED']}"],
        "REFILLED, CVPR preset": ["ablation=cvpr", *two_stage],
        "REFILLED, random teacher": ["ablation=random_teacher", *two_stage,
                                     f"stage2.lam={selected['REFILLED, random teacher']}"],
        "teacher NCM": ["method=teacher_ncm"],
    }[arm]


def run_all(commands: list[list[str]], jobs: int) -> None:
    """Run the commands, ``jobs`` at a time, one thread each; stop at the first failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = [0]

    def one(cmd):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        done[0] += 1
        tail = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
        print(f"[{done[0]}/{len(commands)}] rc={proc.returncode} {shlex.join(cmd[1:])} {' '.join(tail)}",
              flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr, flush=True)
        return proc.returncode

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(one, commands))
    if any(codes):
        sys.exit(f"{sum(c != 0 for c in codes)} of {len(commands)} runs failed")


# ----------------------------------------------------------------------------- steps

SELECT_GRID = {  # (arm, swept key, values): chosen on cross-task validation, 5 images per class
    "REFILLED": ("stage2.lam", (1, 3, 10, 30)),
    "REFILLED, random teacher": ("stage2.lam", (0.1, 1, 10)),
    "label smoothing": ("baselines.label_smoothing", (0.1, 0.3)),
}


def select_commands() -> list[list[str]]:
    cmds = []
    for arm, (key, values) in SELECT_GRID.items():
        base = arm_overrides(arm, 5, {a: 0 for a in SELECT_GRID})
        base = [o for o in base if not o.startswith(key)]
        for k in SELECT_REPLICATES:
            cmds.append(refilled(
                "sweep", REGIMES["cross"], *base, f"{key}={','.join(map(str, values))}",
                f"seed={k}", f"data.split_seed={k}", f"teacher.checkpoint={teacher_dir()}",
                f"arm={arm}", f"out_dir={OUT}/select/{arm.replace(', ', '-').replace(' ', '_')}-r{k}"))
    return cmds


def read_selection() -> dict:
    """The value of each selected key with the best mean validation accuracy over replicates."""
    from refilled.report import collect

    chosen = {}
    for arm, (key, values) in SELECT_GRID.items():
        scores = {v: [] for v in values}
        for k in SELECT_REPLICATES:
            folder = OUT / "select" / f"{arm.replace(', ', '-').replace(' ', '_')}-r{k}"
            for r in collect(folder):
                value = r["arm"].rpartition(f"{key}=")[2]
                for v in values:
                    if float(value) == float(v):
                        scores[v].append(100 * r["val_accuracy"])
        if any(len(s) != len(SELECT_REPLICATES) for s in scores.values()):
            sys.exit(f"selection for {arm} is incomplete: run the `select` step first")
        chosen[arm] = max(values, key=lambda v: sum(scores[v]) / len(scores[v]))
        chosen[f"{arm} (validation)"] = {str(v): scores[v] for v in values}
    return chosen


def study_commands(regimes, sizes, selected) -> list[list[str]]:
    teacher = teacher_dir()
    cmds = []
    for k in REPLICATES:  # replicate-major order: a partial study is a complete smaller one
        for regime in regimes:
            for per_class in sizes:
                for arm in ARMS:
                    if arm == "KD" and regime == "cross":
                        continue  # no shared class: KD has nothing to match
                    cmds.append(refilled(
                        "run", REGIMES[regime], *arm_overrides(arm, per_class, selected),
                        f"data.train_per_class={per_class}", f"seed={k}", f"data.split_seed={k}",
                        f"teacher.checkpoint={teacher}", f"arm={arm}", "progress=false",
                        f"out_dir={OUT}/{regime}-{per_class}"))
    return cmds


# ----------------------------------------------------------------------------- analysis


def paired(records, arm, base):
    """Per-replicate differences ``arm - base`` (points) over the replicates both have."""
    a = {r["seed"]: r for r in records if r["arm"] == arm}
    b = {r["seed"]: r for r in records if r["arm"] == base}
    return [100 * (a[s]["test_accuracy"] - b[s]["test_accuracy"]) for s in sorted(a) if s in b]


CONTROLS = ("student alone", "label smoothing", "REFILLED, random teacher")


def best_control(records) -> str:
    """The teacher-free arm with the best mean validation accuracy in a cell (never the test)."""
    def val(arm):
        v = [r["val_accuracy"] for r in records if r["arm"] == arm]
        return sum(v) / len(v) if v else -1.0

    return max(CONTROLS, key=val)


def analyse(regimes, sizes):
    """The results table (markdown), the records per cell, and per cell the trained teacher's
    gain: REFILLED minus the random teacher, and minus the best control (chosen on validation)."""
    from refilled.report import ci95, collect, mean_std

    cells = {}
    for regime in regimes:
        for per_class in sizes:
            records = collect(OUT / f"{regime}-{per_class}")
            if records:
                cells[(regime, per_class)] = records

    def diff(records, arm, base):
        d = paired(records, arm, base)
        if arm == base or len(d) < 2:
            return "—"
        dm, ds = mean_std(d)
        return f"{dm:+.1f} ± {ds:.1f} [±{ci95(d):.1f}]"

    lines = ["| regime | img/class | arm | n | val acc. (%) | test acc. (%) | vs student alone (pts) "
             "| vs random teacher (pts) |", "|---|---|---|---|---|---|---|---|"]
    answer = []
    for (regime, per_class), records in cells.items():
        for arm in ARMS:
            acc = [100 * r["test_accuracy"] for r in records if r["arm"] == arm]
            val = [100 * r["val_accuracy"] for r in records if r["arm"] == arm]
            if not acc:
                continue
            lines.append(f"| {regime} | {per_class} | {arm} | {len(acc)} | {mean_std(val)[0]:.1f} | "
                         f"{mean_std(acc)[0]:.1f} ± {mean_std(acc)[1]:.1f} | "
                         f"{diff(records, arm, 'student alone')} | "
                         f"{diff(records, arm, 'REFILLED, random teacher')} |")
        control = best_control(records)
        row = {"regime": regime, "per_class": per_class, "best_control": control}
        for name, base in (("vs_random", "REFILLED, random teacher"), ("vs_best_control", control)):
            d = paired(records, "REFILLED", base)
            if len(d) >= 2:
                row[name] = {"mean": mean_std(d)[0], "std": mean_std(d)[1], "ci95": ci95(d),
                             "n": len(d), "significant": mean_std(d)[0] - ci95(d) > 0}
        answer.append(row)
    return "\n".join(lines), cells, answer


def plot(cells, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refilled.report import ci95, mean_std

    shown = ["label smoothing", "RKD", "KD", "REFILLED", "REFILLED, CVPR preset",
             "REFILLED, random teacher", "teacher NCM"]
    keys = list(cells)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(shown)
    colors = plt.get_cmap("tab10").colors
    for i, arm in enumerate(shown):
        xs, ys, es = [], [], []
        for j, key in enumerate(keys):
            d = paired(cells[key], arm, "student alone")
            if len(d) >= 2:
                xs.append(j + (i - (len(shown) - 1) / 2) * width)
                ys.append(mean_std(d)[0])
                es.append(ci95(d))
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=arm, color=colors[i % 10])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{r}\n{n} img/class" for r, n in keys])
    ax.set_ylabel("test acc. minus student alone (pts)")
    ax.set_title("glyphs: gain over the student alone, paired by replicate (mean, 95% CI)")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    from refilled.report import _fig_bytes
    from refilled.engine import atomic_write_bytes

    atomic_write_bytes(path, _fig_bytes(fig))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["teacher", "select", "run", "analyse"])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--regimes", default="cross,overlap,same")
    p.add_argument("--sizes", default="5,20")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args()
    regimes = args.regimes.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    os.chdir(ROOT)
    if args.step == "teacher":
        cmds = [refilled("run", *TEACHER_CMD)]
    elif args.step == "select":
        cmds = select_commands()
    elif args.step == "run":
        cmds = study_commands(regimes, sizes, read_selection())
    else:
        selected = read_selection()
        table, cells, answer = analyse(regimes, sizes)
        plot(cells, ROOT / "benchmarks" / "glyphs_study.png")
        out = {"table": table, "selected": selected, "answer": answer}
        print(table)
        print(json.dumps({"selected": selected, "answer": answer}, indent=1))
        from refilled.engine import atomic_write_text

        atomic_write_text(ROOT / "benchmarks" / "glyphs_study.json", json.dumps(out, indent=1) + "\n")
        return
    for c in cmds:
        print(shlex.join(["refilled", *c[1:]]))
    if not args.dry_run:
        run_all(cmds, args.jobs)


if __name__ == "__main__":
    main()
