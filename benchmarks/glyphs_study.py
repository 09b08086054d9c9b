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
    python benchmarks/glyphs_study.py prune              # set aside runs a new selection superseded
    python benchmarks/glyphs_study.py analyse            # -> benchmarks/glyphs_study.json/.png
"""

from __future__ import annotations

import argparse
import json
import math
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


def arm_overrides(arm: str, per_class: int, selected: dict | None) -> list[str]:
    """The overrides of one arm; ``selected`` (from :func:`read_selection`) adds the chosen
    learning rate and weights (None: the placeholders ``{...}`` stay, for the selection step)."""
    total, stage1 = EPOCHS[per_class]
    two_stage = [f"stage1.optim.epochs={stage1}", f"train.epochs={total - stage1}"]
    one_stage = [f"train.epochs={total}"]

    def chosen(name):
        return ["{" + name + "}"] if selected is None else selected[name]

    return {
        "student alone": ["method=ce", *one_stage, *chosen("student alone")],
        "label smoothing": ["method=label_smoothing", *one_stage, *chosen("label smoothing")],
        "RKD": ["method=rkd", *one_stage, *chosen("RKD")],
        "KD": ["method=kd", *one_stage, *chosen("KD")],
        "REFILLED": ["method=refilled", *two_stage, *chosen("REFILLED")],
        "REFILLED, CVPR preset": ["method=refilled", "stage2.preset=cvpr", *two_stage, *chosen("REFILLED, CVPR preset")],
        "REFILLED, random teacher": ["ablation=random_teacher", *two_stage,
                                     *chosen("REFILLED, random teacher")],
        "teacher NCM": ["method=teacher_ncm"],
    }[arm]


def run_all(commands: list[list[str]], jobs: int) -> None:
    """Run the commands, ``jobs`` at a time, one thread each; a failed run is reported (its
    stderr) and the others go on; the exit status is non-zero if any failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = [0]

    def one(cmd):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        done[0] += 1
        print(f"[{done[0]}/{len(commands)}] rc={proc.returncode} {shlex.join(cmd[1:])}", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr, flush=True)
        return proc.returncode

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(one, commands))
    if any(codes):
        sys.exit(f"{sum(c != 0 for c in codes)} of {len(commands)} runs failed")


# ----------------------------------------------------------------------------- steps

# Chosen on validation (5 images per class, replicates 100 and 101; cross-task, except KD which
# needs shared classes: partial overlap), per arm: (regime, learning rates tried for both
# stages or None, the swept key, its values). Weights not swept are their papers' values.
SELECT_GRID = {
    "student alone": ("cross", None, "train.lr", (0.05, 0.1, 0.2, 0.4)),
    "label smoothing": ("cross", (0.05, 0.2, 0.4), "baselines.label_smoothing", (0.1, 0.3)),
    "RKD": ("cross", None, "train.lr", (0.05, 0.1, 0.2, 0.4)),
    "KD": ("overlap", None, "train.lr", (0.05, 0.2, 0.4)),
    "REFILLED": ("cross", (0.05, 0.2, 0.4), "stage2.lam", (1, 3, 10)),
    # The preset's lambda 1000 ends at chance level here at lr 0.05 and 0.2 (and 0.4, in a first
    # try): its distillation term grows to the thousands in stage 2. So lambda is swept too.
    "REFILLED, CVPR preset": ("cross", (0.2,), "stage2.lam", (10, 100, 1000)),
    "REFILLED, random teacher": ("cross", (0.05, 0.2, 0.4), "stage2.lam", (0.1, 1, 10)),
}


def _slug(arm: str) -> str:
    return arm.replace(", ", "-").replace(" ", "_")


def _select_dir(arm: str, lr, k: int) -> Path:
    return OUT / "select" / (f"{_slug(arm)}-r{k}" if lr is None else f"{_slug(arm)}-lr{lr}-r{k}")


def select_commands() -> list[list[str]]:
    cmds = []
    for arm, (regime, lrs, key, values) in SELECT_GRID.items():
        base = [o for o in arm_overrides(arm, 5, None) if "{" not in o]
        for lr in lrs or (None,):
            lr_keys = [] if lr is None else [f"train.lr={lr}", f"stage1.optim.lr={lr}"]
            for k in SELECT_REPLICATES:
                cmds.append(refilled(
                    "sweep", REGIMES[regime], *base, *lr_keys, f"{key}={','.join(map(str, values))}",
                    f"seed={k}", f"data.split_seed={k}", f"teacher.checkpoint={teacher_dir()}",
                    f"arm={arm}", f"out_dir={_select_dir(arm, lr, k)}"))
    return cmds


def read_selection() -> dict:
    """Per arm, the overrides with the best mean validation accuracy over the replicates, and
    every candidate's validation accuracies (%, one per replicate)."""
    from refilled.report import collect

    chosen = {}
    for arm, (_, lrs, key, values) in SELECT_GRID.items():
        scores = {}
        for lr in lrs or (None,):
            for k in SELECT_REPLICATES:
                for r in collect(_select_dir(arm, lr, k)):
                    label = r["arm"]  # "ARM, key=value" (no value when only one was tried)
                    value = float(label.rpartition(f"{key}=")[2]) if f"{key}=" in label else values[0]
                    if not any(math.isclose(value, v) for v in values):
                        continue  # an earlier, wider sweep in the same folder
                    setting = ((f"train.lr={lr}", f"stage1.optim.lr={lr}") if lr is not None else ()) + (
                        f"{key}={value:g}",)
                    scores.setdefault(setting, []).append(100 * r["val_accuracy"])
        expected = len(lrs or (None,)) * len(values)
        if len(scores) != expected or any(len(v) != len(SELECT_REPLICATES) for v in scores.values()):
            sys.exit(f"selection for {arm} is incomplete: run the `select` step first")
        best = max(scores, key=lambda st: sum(scores[st]) / len(scores[st]))
        chosen[arm] = list(best)
        chosen[f"{arm} (validation)"] = {" ".join(st): v for st, v in scores.items()}
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
                    if arm == "REFILLED, CVPR preset" and regime != "cross":
                        continue  # CPU time: the second preset only where the question is
                    cmds.append(refilled(
                        "run", REGIMES[regime], *arm_overrides(arm, per_class, selected),
                        f"data.train_per_class={per_class}", f"seed={k}", f"data.split_seed={k}",
                        f"teacher.checkpoint={teacher}", f"arm={arm}", "progress=false",
                        f"out_dir={OUT}/{regime}-{per_class}"))
    return cmds


def prune(regimes, sizes, selected) -> None:
    """Move run directories the current selection no longer asks for (e.g. after a wider
    selection changed an arm's learning rate) to ``OUT/stale``, so each cell holds one run per
    arm and replicate."""
    import shutil

    from refilled.config import load_config
    from refilled.rundirs import run_name

    wanted = set()
    for cmd in study_commands(regimes, sizes, selected):
        _, config, *overrides = cmd[1:]
        cfg = load_config(config, overrides)
        wanted.add(Path(cfg.out_dir) / run_name(cfg))
    for regime in regimes:
        for per_class in sizes:
            for results in sorted((OUT / f"{regime}-{per_class}").glob("*/results.json")):
                if results.parent not in wanted:
                    target = OUT / "stale" / f"{regime}-{per_class}" / results.parent.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(results.parent), target)
                    print(f"stale: {results.parent} -> {target}")


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
    from refilled.report import collect
    from refilled.stats import ci95, mean_std

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


def summary_table(cells, answer) -> str:
    """One row per cell: the student alone, the best control, REFILLED, the teacher's own
    embedding, and REFILLED's paired gains (mean ± std [95% CI half-width], points)."""
    from refilled.stats import mean_std

    def acc(records, arm):
        v = [100 * r["test_accuracy"] for r in records if r["arm"] == arm]
        return f"{mean_std(v)[0]:.1f} ± {mean_std(v)[1]:.1f}" if v else "—"

    def gain(d):
        return "—" if d is None else f"{d['mean']:+.1f} ± {d['std']:.1f} [±{d['ci95']:.1f}]" + (
            " *" if d["significant"] else "")

    lines = ["| regime | img/class | n | student alone | best control (on val.) | REFILLED | teacher NCM "
             "| REFILLED − best control | REFILLED − random teacher |", "|---|---|---|---|---|---|---|---|---|"]
    for row in answer:
        records = cells[(row["regime"], row["per_class"])]
        n = len({r["seed"] for r in records if r["arm"] == "REFILLED"})
        lines.append(f"| {row['regime']} | {row['per_class']} | {n} | {acc(records, 'student alone')} | "
                     f"{row['best_control']}: {acc(records, row['best_control'])} | {acc(records, 'REFILLED')} | "
                     f"{acc(records, 'teacher NCM')} | {gain(row.get('vs_best_control'))} | "
                     f"{gain(row.get('vs_random'))} |")
    return "\n".join(lines)


def plot(cells, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refilled.stats import ci95, mean_std

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
        if xs:  # KD has no cross-task bars
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=arm, color=colors[i % 10])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{r}\n{n} img/class" for r, n in keys])
    ax.set_ylabel("test acc. minus student alone (pts)")
    ax.set_title("glyphs: gain over the student alone, paired by replicate (mean, 95% CI)")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    from refilled.files import atomic_write_bytes
    from refilled.report import _fig_bytes

    atomic_write_bytes(path, _fig_bytes(fig))
    plt.close(fig)


def teacher_geometry() -> dict:
    """Mean cosine similarity of the trained and the random teacher's embeddings of the
    cross-task student's training images (5 per class), same-class and other-class pairs:
    what stage 1 asks the student to imitate."""
    import torch
    import torch.nn.functional as F

    from refilled.config import load_config
    from refilled.evaluation import predict
    from refilled.pipeline import PROTOCOLS, prepare_teacher
    from refilled.runtime import Dist

    out = {}
    for init in ("trained", "random"):
        cfg = load_config(REGIMES["cross"], [f"teacher.checkpoint={teacher_dir()}", f"teacher.init={init}",
                                             "progress=false"])
        tasks = PROTOCOLS["distill"].tasks(cfg)
        teacher, _ = prepare_teacher(cfg, tasks, torch.device("cpu"), Dist())
        task = tasks.student
        emb, _ = predict(teacher, task.train.images, "cpu")
        e = F.normalize(emb.float(), dim=1)
        sim, y = e @ e.T, task.train.labels
        same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
        other = y[:, None] != y[None]
        out[init] = {"same_class": float(sim[same].mean()), "other_class": float(sim[other].mean()),
                     "other_class_std": float(sim[other].std())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["teacher", "select", "run", "prune", "analyse"])
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
    elif args.step == "prune":
        prune(regimes, sizes, read_selection())
        return
    else:
        selected = read_selection()
        table, cells, answer = analyse(regimes, sizes)
        plot(cells, ROOT / "benchmarks" / "glyphs_study.png")
        summary = summary_table(cells, answer)
        out = {"table": table, "summary": summary, "selected": selected, "answer": answer,
               "teacher_geometry": teacher_geometry()}
        print(table)
        print()
        print(summary)
        print(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=1))
        from refilled.files import atomic_write_text

        atomic_write_text(ROOT / "benchmarks" / "glyphs_study.json", json.dumps(out, indent=1) + "\n")
        return
    for c in cmds:
        print(shlex.join(["refilled", *c[1:]]))
    if not args.dry_run:
        run_all(cmds, args.jobs)


if __name__ == "__main__":
    main()
