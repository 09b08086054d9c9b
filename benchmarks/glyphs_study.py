"""The glyphs study (issues 8 and 14): does a teacher that knows *other* characters make a small
student better, because of what it knows? (glyphs, CPU)

One teacher (cnn_medium) learns the 139 characters of digits, Latin, Greek and Cyrillic. A
smaller student (cnn_small) learns, from 5 or 20 images (fonts) per class:

* cross   - 128 characters of disjoint alphabets: Armenian, Georgian, Hebrew (glyphs-crosstask.yaml)
* overlap - 43 Cyrillic characters the teacher knows + 43 Armenian ones (glyphs-overlap.yaml)
* same    - the teacher's own 139 characters (glyphs-same.yaml)

Arms, each on the same total number of SGD steps (REFILLED: stage 1 + stage 2), except the one
marked "paper budget":

* student alone (CE), label smoothing, RKD, KD (only where classes are shared);
* REFILLED as ``method=refilled`` now does it (TPAMI losses; the hand-off rescales the
  embedding, ``stage2.handoff=rescale``), and the same with the papers' plain hand-off
  (``stage2.preset=tpami``, cross only) and the CVPR preset (cross only);
* REFILLED with the paper's budget: a full stage 2 (the single-stage arms' epochs) after stage 1
  (cross only: the equal-step comparison is the study's; this one is the recipe's);
* REFILLED with a random teacher (untrained, same architecture, BN statistics calibrated):
  the control that tells what the *trained* teacher adds;
* the teacher's own embedding with class means of the student's images (NCM; no training);
* and, from every REFILLED run, the NCM classifier of the student's embedding right after
  stage 1 (``stage1_ncm_accuracy``): what stage 1 alone gave.

Every arm's settings are chosen on validation (replicates 100 and 101, which the study does not
report): learning rate, stage-2 batches (class-balanced or shuffled), lambda / epsilon; the two
teacher-free controls in each regime, the others on the cross-task regime (KD: overlap).
Five replicates k = 0..4: ``seed=k`` and ``data.split_seed=k`` (a fresh draw of the student's
images and of its validation images per replicate); every arm of a replicate sees the same
images, so differences are paired by replicate. The test split (a fixed 25% of each class's
fonts) is read once per run, after training, and never for a choice.

Usage (each step skips finished runs, so an interrupted study continues):

    python benchmarks/glyphs_study.py teacher            # trains the shared teacher once
    python benchmarks/glyphs_study.py select --jobs 2    # the validation sweeps
    python benchmarks/glyphs_study.py run --jobs 2       # the grid (uses the selection)
    python benchmarks/glyphs_study.py prune              # set aside runs a new selection superseded
    python benchmarks/glyphs_study.py analyse            # -> benchmarks/glyphs_study.json/.png
"""

from __future__ import annotations

import argparse
import itertools
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
NO_SHARED, OLD_HANDOFF = "REFILLED, no shared-class KD", "REFILLED, issue-14 hand-off"
# The ablation that puts back issue 14's hand-off (None: no issue-23 hand-off candidate won, so
# the default's hand-off is issue 14's and this arm is not run).
HANDOFF_ABLATION: str | None = None
ARMS = ("student alone", "label smoothing", "RKD", "KD", "REFILLED", NO_SHARED, OLD_HANDOFF,
        "REFILLED, paper budget", "REFILLED, TPAMI hand-off", "REFILLED, CVPR preset",
        "REFILLED, random teacher", "teacher NCM")
# Where each arm runs (the rest: every regime). KD needs shared classes; the preset variants and
# the paper budget answer a question about REFILLED itself, asked where it matters (cross-task).
ONLY = {"KD": ("overlap", "same"), NO_SHARED: ("overlap", "same"), "REFILLED, paper budget": ("cross",),
        "REFILLED, TPAMI hand-off": ("cross",), "REFILLED, CVPR preset": ("cross",),
        **({OLD_HANDOFF: ()} if HANDOFF_ABLATION is None else {})}


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


def arm_overrides(arm: str, per_class: int, chosen: list[str] | None) -> list[str]:
    """The overrides of one arm at ``per_class`` images per class; ``chosen`` are the settings
    the selection picked (None: none yet, for the selection step itself)."""
    total, stage1 = EPOCHS[per_class]
    two_stage = [f"stage1.optim.epochs={stage1}", f"train.epochs={total - stage1}"]
    one_stage = [f"train.epochs={total}"]
    fixed = {
        "student alone": ["method=ce", *one_stage],
        "label smoothing": ["method=label_smoothing", *one_stage],
        "RKD": ["method=rkd", *one_stage],
        "KD": ["method=kd", *one_stage],
        "REFILLED": ["method=refilled", *two_stage],
        # the recipe's budget: stage 2 as long as a single-stage training, after stage 1
        "REFILLED, paper budget": ["method=refilled", f"stage1.optim.epochs={stage1}", f"train.epochs={total}"],
        "REFILLED, TPAMI hand-off": ["method=refilled", "stage2.preset=tpami", *two_stage],
        "REFILLED, CVPR preset": ["method=refilled", "stage2.preset=cvpr", *two_stage],
        "REFILLED, random teacher": ["ablation=random_teacher", *two_stage],
        # issue 23's ablations: the default without one of its new pieces
        NO_SHARED: ["ablation=no_shared_kd", *two_stage],
        OLD_HANDOFF: [f"ablation={HANDOFF_ABLATION}", *two_stage],
        "teacher NCM": ["method=teacher_ncm"],
        # selection only: stage 1 alone, judged by its NCM classifier on validation
        "REFILLED stage 1": ["ablation=stage1_only", f"stage1.optim.epochs={stage1}"],
    }[arm]
    return fixed + list(chosen or [])


# Chosen on validation (5 images per class, replicates 100 and 101), per arm: the regimes it is
# selected in (the others use the cross-task choice; KD's the overlap one) and its grid (every
# combination is tried). Values not swept are the arm's defaults (the papers' weights).
SELECT_GRID = {
    "student alone": (("cross", "overlap", "same"),
                      {"train.lr": (0.2, 0.4), "train.m_per_class": (4, 0)}),
    "label smoothing": (("cross", "overlap", "same"),
                        {"train.lr": (0.2, 0.4), "baselines.label_smoothing": (0.1, 0.3),
                         "train.m_per_class": (4, 0)}),
    # RKD and KD first ran lr x batches at the papers' weights (RKD 25 / 50, KD alpha 0.9, T 4):
    # best 72.7 % (RKD, cross) and 73.4 % (KD, overlap) validation, both with lr 0.4 and shuffled
    # batches, far below the student alone (88.3 / 79.8 %); lr 0.2 or class-balanced batches were
    # 52.7-72.7 % (RKD) and 55.8-67.1 % (KD). Their weights were then swept at that lr and batches.
    "RKD": (("cross",), {"train.lr": (0.4,), "train.m_per_class": (0,),
                         "baselines.rkd_distance_weight": (25, 2.5), "baselines.rkd_angle_weight": (50, 5)}),
    "KD": (("overlap",), {"train.lr": (0.4,), "train.m_per_class": (0,),
                          "baselines.kd_alpha": (0.9, 0.5), "baselines.kd_temperature": (4, 2)}),
    # The two stages' learning rates are chosen independently (issue 14: they were tied before):
    # stage 1's by the NCM accuracy of its embedding on validation, stage 2's (with lambda and
    # its batches) by the final student's. The REFILLED grids use stage 1's choice (0.4).
    "REFILLED stage 1": (("cross",), {"stage1.optim.lr": (0.1, 0.2, 0.4, 0.8)}),
    # Replicate 100 also ran train.m_per_class=4 (class-balanced stage-2 batches): 88.0 / 84.6 %
    # validation at lambda 1 / 3 against 91.7 / 92.2 % shuffled, and train.lr=0.4 (90.9 % at
    # lambda 1); the grid kept for both replicates is the part that won there.
    "REFILLED": (("cross",), {"stage1.optim.lr": (0.4,), "train.lr": (0.2,),
                              "stage2.lam": (1, 3), "train.m_per_class": (0,)}),
    "REFILLED, TPAMI hand-off": (("cross",), {"stage1.optim.lr": (0.4,), "train.lr": (0.2, 0.4),
                                              "train.m_per_class": (4, 0)}),
    "REFILLED, CVPR preset": (("cross",), {"stage1.optim.lr": (0.2,), "train.lr": (0.2,),
                                           "stage2.lam": (10, 100, 1000)}),
}
# These take REFILLED's chosen settings: the paper budget (only stage 2 is longer) and the random
# teacher (the ablation that changes nothing but the teacher's weights).
SELECTED_AS = {"REFILLED, paper budget": "REFILLED", "REFILLED, random teacher": "REFILLED",
               NO_SHARED: "REFILLED", OLD_HANDOFF: "REFILLED"}

# Issue 23: the choices of issue 14's selection are reused for every arm whose code did not
# change (student alone, label smoothing, RKD, KD, REFILLED's learning rates, lambda and batches,
# the presets); they are read from RECORDED (issue 14's "selected", kept in its own file). The new
# pieces are chosen the same way, on 5 images per class and replicates 100 and 101, as explicit
# candidates on top of REFILLED's recorded cross-task choice: the shared-class KD term where
# classes are shared (overlap, same), the hand-off candidates across alphabets (cross), each run
# with `refilled run` and labelled "ARM, <its overrides>".
RECORDED = ROOT / "benchmarks" / "glyphs_study_issue14_selection.json"
CANDIDATES = {
    "REFILLED shared-class KD": (("overlap", "same"), [
        ("stage2.shared_kd=0",),
        *[(f"stage2.shared_kd={w}", f"stage2.shared_kd_temperature={t}") for w in (0.5, 1, 2) for t in (2, 4)],
        # added after the first grid: its best (weight 0.5, T 2) was on the grid's edge
        *[(f"stage2.shared_kd={w}", f"stage2.shared_kd_temperature={t}") for w, t in ((0.25, 1), (0.25, 2), (0.5, 1))],
    ]),
    "REFILLED hand-off": (("cross",), [
        ("stage2.head_init=random",),  # the hand-off of issue 14 (rescale only)
        *[("stage2.head_init=imprint", f"stage2.imprint_scale={s}") for s in (5, 10, 20)],
        *[(f"stage2.relation_weight={w}",) for w in (0.1, 1)],
        ("stage1.budget_share=0.5",),
        # added after the first round (imprinting best at the largest scale, 20; relation 0.1 level
        # with it): a larger scale, a lower stage-2 rate for the imprinted start, both together
        ("stage2.head_init=imprint", "stage2.imprint_scale=40"),
        ("stage2.head_init=imprint", "stage2.imprint_scale=20", "train.lr=0.1"),
        ("stage2.relation_weight=0.3",),
        ("stage2.head_init=imprint", "stage2.imprint_scale=20", "stage2.relation_weight=0.1"),
    ]),
    # Not a selection: the chosen hand-off (stage 1's loss kept at weight 0.1) with the chosen
    # shared-class KD, where classes are shared; compared with that KD alone (the
    # "REFILLED shared-class KD" runs of the same settings) to check that it does not hurt there.
    "REFILLED hand-off check": (("overlap", "same"), [
        ("stage2.shared_kd=0.5", "stage2.shared_kd_temperature=2", "stage2.relation_weight=0.1"),
    ]),
}


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

def _slug(text: str) -> str:
    return text.replace(", ", "-").replace(" ", "_")


def _select_dir(arm: str, regime: str, k: int) -> Path:
    return OUT / "select" / f"{_slug(arm)}-{regime}-r{k}"


def select_commands(arms=None) -> list[list[str]]:
    """One sweep per (arm, regime, selection replicate) over the arm's grid."""
    cmds = []
    for arm, (regimes, grid) in SELECT_GRID.items():
        if arms and arm not in arms:
            continue
        for regime in regimes:
            for k in SELECT_REPLICATES:
                cmds.append(refilled(
                    "sweep", REGIMES[regime], *arm_overrides(arm, 5, None),
                    *(f"{key}={','.join(map(str, values))}" for key, values in grid.items()),
                    "data.train_per_class=5", f"seed={k}", f"data.split_seed={k}",
                    f"teacher.checkpoint={teacher_dir()}", f"arm={arm}",
                    f"out_dir={_select_dir(arm, regime, k)}"))
    return cmds


def recorded_selection() -> dict:
    """Issue 14's selection (every candidate's validation accuracies and the choices)."""
    return json.loads(RECORDED.read_text())


def _candidate_dir(arm: str, regime: str, k: int, per_class: int = 5) -> Path:
    return _select_dir(arm, regime if per_class == 5 else f"{regime}-{per_class}pc", k)


def candidate_commands(arms=None, per_class: int = 5, replicates=SELECT_REPLICATES,
                       only=None) -> list[list[str]]:
    """One run per (candidate, regime, selection replicate) of the issue-23 candidates (``only``:
    the candidates whose overrides are in it; other sizes and replicates: checks, not the
    selection)."""
    base = recorded_selection()["REFILLED | cross"]
    cmds = []
    for arm, (regimes, candidates) in CANDIDATES.items():
        if arms and arm not in arms:
            continue
        if only:
            candidates = [c for c in candidates if " ".join(c) in only]
        for regime in regimes:
            for k in replicates:
                for cand in candidates:
                    mine = {c.split("=")[0] for c in cand}  # a candidate's key replaces the base's
                    kept = [b for b in base if b.split("=")[0] not in mine]
                    cmds.append(refilled(
                        "run", REGIMES[regime], *arm_overrides("REFILLED", per_class, kept), *cand,
                        f"data.train_per_class={per_class}", f"seed={k}", f"data.split_seed={k}",
                        f"teacher.checkpoint={teacher_dir()}", f"arm={arm}, {' '.join(cand)}",
                        "progress=false", f"out_dir={_candidate_dir(arm, regime, k, per_class)}"))
    return cmds


def read_candidates() -> dict:
    """Per (candidate arm, regime): the candidate with the best mean validation accuracy over
    the selection replicates, and every candidate's validation accuracies (%), as
    :func:`read_selection` gives them."""
    from refilled.report import collect

    chosen: dict = {}
    for arm, (regimes, candidates) in CANDIDATES.items():
        expected = {" ".join(c) for c in candidates}
        for regime in regimes:
            scores: dict[str, list[float]] = {}
            for k in SELECT_REPLICATES:
                folder = _select_dir(arm, regime, k)
                for r in collect(folder) if folder.is_dir() else []:
                    cand = r["arm"].split(", ", 1)[1]
                    if cand in expected:
                        scores.setdefault(cand, []).append(100 * r["val_accuracy"])
            if not scores:
                continue
            done = {c: v for c, v in scores.items() if len(v) == len(SELECT_REPLICATES)}
            if set(done) != expected:
                print(f"selection for {arm} ({regime}) is incomplete: {len(done)} of "
                      f"{len(expected)} candidates have both replicates", file=sys.stderr)
            if done:
                best = max(done, key=lambda c: sum(done[c]) / len(done[c]))
                chosen[f"{arm} | {regime}"] = best.split(" ")
                chosen[f"{arm} | {regime} (validation)"] = scores
        if len(regimes) > 1 and all(f"{arm} | {r}" in chosen for r in regimes):
            # one default for every regime: the best mean over the regimes and replicates
            per = [chosen[f"{arm} | {r} (validation)"] for r in regimes]
            both = {c: [v for p in per for v in p[c]] for c in per[0]
                    if all(len(p.get(c, [])) == len(SELECT_REPLICATES) for p in per)}
            chosen[f"{arm} | {'+'.join(regimes)}"] = max(both, key=lambda c: sum(both[c]) / len(both[c])).split(" ")
    return chosen


def _setting(label: str, grid: dict) -> tuple[str, ...]:
    """The grid values of a sweep cell, from its arm label ``"ARM, key=v, ..."``."""
    found = dict(part.split("=", 1) for part in label.split(", ") if "=" in part)
    return tuple(f"{key}={found.get(key, values[0])}" for key, values in grid.items())


def read_selection() -> dict:
    """Per (arm, regime): the grid setting with the best mean validation accuracy over the
    selection replicates, and every candidate's validation accuracies (%, one per replicate)."""
    from refilled.report import collect

    chosen: dict = {}
    for arm, (regimes, grid) in SELECT_GRID.items():
        expected = {tuple(f"{k}={v}" for k, v in zip(grid, values))
                    for values in itertools.product(*grid.values())}
        for regime in regimes:
            scores: dict[tuple, list[float]] = {}
            for k in SELECT_REPLICATES:
                folder = _select_dir(arm, regime, k)
                for r in collect(folder) if folder.is_dir() else []:
                    setting = _setting(r["arm"], grid)
                    if setting in expected:  # a cell of an earlier, wider grid is not a candidate
                        scores.setdefault(setting, []).append(100 * r["val_accuracy"])
            if set(scores) != expected or any(len(v) != len(SELECT_REPLICATES) for v in scores.values()):
                # not selected (yet): the `run` step leaves this arm out and says so
                print(f"selection for {arm} ({regime}) is incomplete: {len(scores)} of "
                      f"{len(expected)} settings found, each needs both replicates", file=sys.stderr)
                continue
            best = max(scores, key=lambda st: sum(scores[st]) / len(scores[st]))
            chosen[f"{arm} | {regime}"] = list(best)
            chosen[f"{arm} | {regime} (validation)"] = {" ".join(st): v for st, v in scores.items()}
    return chosen


def selection() -> dict:
    """The settings every arm runs with: issue 14's recorded selection (arms whose code did not
    change), updated with the issue-23 candidates' choices found under ``OUT/select``."""
    chosen = dict(recorded_selection())
    chosen.update(read_candidates())
    return chosen


def chosen_for(selected: dict, arm: str, regime: str) -> list[str]:
    """The selected settings of ``arm`` for ``regime`` (its own regime's, else the one it was
    selected in)."""
    arm = SELECTED_AS.get(arm, arm)
    if arm == "teacher NCM":
        return []
    regimes = SELECT_GRID[arm][0]
    return selected.get(f"{arm} | {regime if regime in regimes else regimes[0]}")


def _replicates(text):
    return REPLICATES if text is None else [int(k) for k in text.split(",")]


def study_commands(regimes, sizes, selected, replicates=REPLICATES) -> list[list[str]]:
    teacher = teacher_dir()
    cmds = []
    for k in replicates:  # replicate-major order: a partial study is a complete smaller one
        for regime in regimes:
            for per_class in sizes:
                for arm in ARMS:
                    if regime not in ONLY.get(arm, REGIMES):
                        continue
                    chosen = chosen_for(selected, arm, regime)
                    if chosen is None:
                        continue  # its selection is incomplete (reported by read_selection)
                    cmds.append(refilled(
                        "run", REGIMES[regime], *arm_overrides(arm, per_class, chosen),
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
    from refilled.runs import run_name

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


def paired(records, arm, base, field="test_accuracy", base_field="test_accuracy"):
    """Per-replicate differences ``arm - base`` (points) over the replicates both have."""
    a = {r["seed"]: r for r in records if r["arm"] == arm and r.get(field) is not None}
    b = {r["seed"]: r for r in records if r["arm"] == base and r.get(base_field) is not None}
    return [100 * (a[s][field] - b[s][base_field]) for s in sorted(a) if s in b]


CONTROLS = ("student alone", "label smoothing", "REFILLED, random teacher")
GOALS = {5: 5.0, 20: 3.0}  # issues 14, 23: REFILLED over the best teacher-free control, cross-task


def best_control(records) -> str:
    """The teacher-free arm with the best mean validation accuracy in a cell (never the test)."""
    def val(arm):
        v = [r["val_accuracy"] for r in records if r["arm"] == arm]
        return sum(v) / len(v) if v else -1.0

    return max(CONTROLS, key=val)


def _stats(d):
    from refilled.stats import ci95, mean_std

    if len(d) < 2:
        return None
    m, sd = mean_std(d)
    return {"mean": m, "std": sd, "ci95": ci95(d), "n": len(d), "significant": m - ci95(d) > 0}


def analyse(regimes, sizes):
    """The results table (markdown), the records per cell, and per cell REFILLED's paired gains:
    over the random teacher, over the best teacher-free control (chosen on validation), and over
    its own stage-1 NCM classifier, with issue 14's goal for the cross-task cells."""
    from refilled.report import collect
    from refilled.stats import mean_std

    cells = {}
    for regime in regimes:
        for per_class in sizes:
            folder = OUT / f"{regime}-{per_class}"
            records = collect(folder) if folder.is_dir() else []  # a cell not run yet
            if records:
                cells[(regime, per_class)] = records

    def diff(records, arm, base):
        d = _stats(paired(records, arm, base)) if arm != base else None
        return "—" if d is None else f"{d['mean']:+.1f} ± {d['std']:.1f} [±{d['ci95']:.1f}]"

    def pm(values):
        return "—" if not values else f"{mean_std(values)[0]:.1f} ± {mean_std(values)[1]:.1f}"

    lines = ["| regime | img/class | arm | n | val acc. (%) | test acc. (%) | stage-1 NCM val / test (%) "
             "| vs student alone (pts) | vs random teacher (pts) |", "|---|---|---|---|---|---|---|---|---|"]
    answer = []
    for (regime, per_class), records in cells.items():
        for arm in ARMS:
            mine = [r for r in records if r["arm"] == arm]
            if not mine:
                continue
            ncm_val = [100 * r["stage1_ncm_val_accuracy"] for r in mine if r.get("stage1_ncm_val_accuracy") is not None]
            ncm = [100 * r["stage1_ncm_accuracy"] for r in mine if r.get("stage1_ncm_accuracy") is not None]
            lines.append(f"| {regime} | {per_class} | {arm} | {len(mine)} | "
                         f"{pm([100 * r['val_accuracy'] for r in mine])} | "
                         f"{pm([100 * r['test_accuracy'] for r in mine])} | "
                         f"{pm(ncm_val)} / {pm(ncm)} | {diff(records, arm, 'student alone')} | "
                         f"{diff(records, arm, 'REFILLED, random teacher')} |")
        control = best_control(records)
        row = {"regime": regime, "per_class": per_class, "best_control": control,
               "vs_random": _stats(paired(records, "REFILLED", "REFILLED, random teacher")),
               "vs_best_control": _stats(paired(records, "REFILLED", control)),
               "vs_own_stage1_ncm": _stats(paired(records, "REFILLED", "REFILLED",
                                                  base_field="stage1_ncm_accuracy")),
               "paper_budget_vs_best_control": _stats(paired(records, "REFILLED, paper budget", control)),
               # the teacher-based baselines, tuned the same way (KD only where classes are shared)
               "vs_kd": _stats(paired(records, "REFILLED", "KD")),
               "vs_rkd": _stats(paired(records, "REFILLED", "RKD")),
               # issue 23's ablations: what each new piece adds, paired
               "vs_no_shared_kd": _stats(paired(records, "REFILLED", NO_SHARED)),
               "vs_issue14_handoff": _stats(paired(records, "REFILLED", OLD_HANDOFF))}
        if regime == "cross" and per_class in GOALS and row["vs_best_control"]:
            g, own = row["vs_best_control"], row["vs_own_stage1_ncm"]
            row["goal"] = {"points": GOALS[per_class],
                           "beats_control_by_goal": g["mean"] >= GOALS[per_class] and g["significant"],
                           "paired_mean_at_least_goal": g["mean"] >= GOALS[per_class],
                           "at_least_own_stage1_ncm": own is not None and own["mean"] >= 0}
        if regime != "cross" and row["vs_kd"]:  # issue 23: at least as good as tuned KD
            row["goal"] = {"kd_paired_mean_at_least_0": row["vs_kd"]["mean"] >= 0}
        answer.append(row)
    return "\n".join(lines), cells, answer


def summary_table(cells, answer) -> str:
    """One row per cell: the student alone, the best control, REFILLED and its stage-1 NCM, the
    teacher's own embedding, and REFILLED's paired gains (mean ± std [95% CI half-width], points;
    * = the interval excludes zero)."""
    from refilled.stats import mean_std

    def acc(records, arm, field="test_accuracy"):
        v = [100 * r[field] for r in records if r["arm"] == arm and r.get(field) is not None]
        return f"{mean_std(v)[0]:.1f} ± {mean_std(v)[1]:.1f}" if v else "—"

    def gain(d):
        return "—" if d is None else f"{d['mean']:+.1f} ± {d['std']:.1f} [±{d['ci95']:.1f}]" + (
            " *" if abs(d["mean"]) > d["ci95"] else "")  # the interval excludes zero, either side

    lines = ["| regime | img/class | n | student alone | best control (on val.) | REFILLED | its stage-1 NCM "
             "| teacher NCM | REFILLED − best control | REFILLED − random teacher | REFILLED − its stage-1 NCM "
             "| REFILLED − KD | REFILLED − RKD | REFILLED − no shared-class KD | REFILLED − issue-14 hand-off |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in answer:
        records = cells[(row["regime"], row["per_class"])]
        n = len({r["seed"] for r in records if r["arm"] == "REFILLED"})
        lines.append(f"| {row['regime']} | {row['per_class']} | {n} | {acc(records, 'student alone')} | "
                     f"{row['best_control']}: {acc(records, row['best_control'])} | {acc(records, 'REFILLED')} | "
                     f"{acc(records, 'REFILLED', 'stage1_ncm_accuracy')} | {acc(records, 'teacher NCM')} | "
                     f"{gain(row.get('vs_best_control'))} | {gain(row.get('vs_random'))} | "
                     f"{gain(row.get('vs_own_stage1_ncm'))} | {gain(row.get('vs_kd'))} | "
                     f"{gain(row.get('vs_rkd'))} | {gain(row.get('vs_no_shared_kd'))} | "
                     f"{gain(row.get('vs_issue14_handoff'))} |")
    return "\n".join(lines)


def selection_table(selected: dict) -> str:
    """Every candidate of the selection: validation accuracy per selection replicate and the
    mean; the chosen one in bold."""
    lines = ["| arm | regime | candidate | val. acc. (%), k = 100 / 101 | mean |", "|---|---|---|---|---|"]
    for key, scores in selected.items():
        if not key.endswith(" (validation)"):
            continue
        arm, regime = key[: -len(" (validation)")].split(" | ")
        best = " ".join(selected[f"{arm} | {regime}"])
        for setting, vals in sorted(scores.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
            mean = f"{sum(vals) / len(vals):.1f}"
            mark = (lambda t: f"**{t}**") if setting == best else (lambda t: t)
            lines.append(f"| {arm} | {regime} | {mark(setting)} | {' / '.join(f'{v:.1f}' for v in vals)} "
                         f"| {mark(mean)} |")
    return "\n".join(lines)


# What became the default: the best mean on validation, except where noted. The hand-off
# candidates' best two (imprinting at scale 20, stage 1's loss at 0.1) tied at +0.4 points (three
# images of 768) over issue 14's hand-off; on further validation runs neither was better in
# every check, and the stage-1 loss cost ~1 point where classes are shared (the "check" rows):
# issue 14's hand-off stays.
ADOPTED = {"REFILLED hand-off": "stage2.head_init=random"}
# The extra validation runs of the hand-off decision: (images per class, replicates).
HANDOFF_CHECKS = ((5, (100, 101, 102)), (20, (100, 101)))
HANDOFF_CHECKED = ("stage2.head_init=random", "stage2.head_init=imprint stage2.imprint_scale=20",
                   "stage2.relation_weight=0.1")


def candidates_table(selected: dict, arm: str) -> str:
    """The issue-23 candidates of ``arm``: validation accuracy per regime and selection replicate,
    the mean over everything; the adopted one in bold (the best mean, unless ``ADOPTED`` says
    otherwise; then the best mean is marked with a dagger)."""
    regimes, candidates = CANDIDATES[arm]
    key = f"{arm} | {'+'.join(regimes)}" if len(regimes) > 1 else f"{arm} | {regimes[0]}"
    top = " ".join(selected.get(key, []))
    best = ADOPTED.get(arm, top)
    head = " | ".join(f"{r}, k = {' / '.join(map(str, SELECT_REPLICATES))}" for r in regimes)
    lines = [f"| candidate | {head} | mean |", "|---|" + "---|" * len(regimes) + "---|"]
    rows = []
    for cand in (" ".join(c) for c in candidates):
        per = [selected.get(f"{arm} | {r} (validation)", {}).get(cand, []) for r in regimes]
        flat = [v for p in per for v in p]
        mean = sum(flat) / len(flat) if flat else float("nan")
        rows.append((mean, cand, per))
    for mean, cand, per in sorted(rows, key=lambda r: -r[0]):
        mark = (lambda t: f"**{t}**") if cand == best else (lambda t: t)
        dagger = " †" if cand == top and top != best else ""
        cells = " | ".join(" / ".join(f"{v:.1f}" for v in p) or "—" for p in per)
        lines.append(f"| {mark(cand)}{dagger} | {cells} | {mark(f'{mean:.1f}')} |")
    return "\n".join(lines)


def handoff_checks_table() -> str:
    """Issue 14's hand-off and the two best candidates on more validation runs (cross-task):
    a third unreported replicate at 5 images per class, and 20 per class."""
    from refilled.report import collect

    arm = "REFILLED hand-off"
    head = " | ".join(f"{n} per class, k = {' / '.join(map(str, ks))} | mean" for n, ks in HANDOFF_CHECKS)
    lines = [f"| candidate | {head} |", "|---|" + "---|---|" * len(HANDOFF_CHECKS)]
    for cand in HANDOFF_CHECKED:
        cells = []
        for per_class, ks in HANDOFF_CHECKS:
            vals = []
            for k in ks:
                folder = _candidate_dir(arm, "cross", k, per_class)
                found = [100 * r["val_accuracy"] for r in (collect(folder) if folder.is_dir() else [])
                         if r["arm"] == f"{arm}, {cand}"]
                vals += found[:1]
            cells.append(" / ".join(f"{v:.1f}" for v in vals) or "—")
            cells.append(f"{sum(vals) / len(vals):.1f}" if vals else "—")
        lines.append(f"| {cand} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(cells, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refilled.stats import ci95, mean_std

    shown = ["label smoothing", "RKD", "KD", "REFILLED", NO_SHARED, OLD_HANDOFF, "REFILLED, paper budget",
             "REFILLED, TPAMI hand-off", "REFILLED, CVPR preset", "REFILLED, random teacher", "teacher NCM"]
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
    from refilled.pipeline import make_teacher
    from refilled.protocols import PROTOCOLS
    from refilled.runtime import Dist

    out = {}
    for init in ("trained", "random"):
        cfg = load_config(REGIMES["cross"], [f"teacher.checkpoint={teacher_dir()}", f"teacher.init={init}",
                                             "progress=false"])
        tasks = PROTOCOLS["distill"].tasks(cfg)
        teacher = make_teacher(cfg, tasks, torch.device("cpu"), Dist()).network
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
    p.add_argument("step", choices=["teacher", "select", "candidates", "run", "prune", "analyse"])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--regimes", default="cross,overlap,same")
    p.add_argument("--sizes", default="5,20")
    p.add_argument("--arms", default=None, help="only these arms, separated by ';'")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--per-class", type=int, default=5, help="candidates: images per class")
    p.add_argument("--replicates", default=",".join(map(str, SELECT_REPLICATES)),
                   help="candidates: the (unreported) replicates to run")
    p.add_argument("--only", default=None, help="candidates: only these, separated by ';'")
    p.add_argument("--reverse", action="store_true",
                   help="last command first: a second process on the same grid meets the first "
                        "in the middle (a run another process holds is waited for, then skipped)")
    p.add_argument("--study-replicates", default=None,
                   help="run: only these replicates (default: all), e.g. 0,1,2")
    args = p.parse_args()
    regimes = args.regimes.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    os.chdir(ROOT)
    if args.step == "teacher":
        cmds = [refilled("run", *TEACHER_CMD)]
    elif args.step == "select":
        cmds = select_commands(args.arms.split(";") if args.arms else None)
    elif args.step == "candidates":
        cmds = candidate_commands(args.arms.split(";") if args.arms else None, args.per_class,
                                  [int(k) for k in args.replicates.split(",")],
                                  args.only.split(";") if args.only else None)
    elif args.step == "run":
        cmds = study_commands(regimes, sizes, selection(), _replicates(args.study_replicates))
        if args.arms:
            cmds = [c for c in cmds if any(f"arm={a}" in c for a in args.arms.split(";"))]
    elif args.step == "prune":
        prune(regimes, sizes, selection())
        return
    else:
        selected = selection()
        table, cells, answer = analyse(regimes, sizes)
        plot(cells, ROOT / "benchmarks" / "glyphs_study.png")
        summary = summary_table(cells, answer)
        print(selection_table(selected))
        print()
        keep = ("arm", "seed", "val_accuracy", "test_accuracy", "stage1_ncm_accuracy",
                "stage1_ncm_val_accuracy", "stage1_embedding_norm", "teacher_test_accuracy",
                "handoff", "head_init", "shared_kd", "wall_seconds", "config_digest", "run_dir")
        runs = [{"regime": regime, "per_class": per_class, **{k: r.get(k) for k in keep}}
                for (regime, per_class), records in cells.items()
                for r in sorted(records, key=lambda r: (ARMS.index(r["arm"]) if r["arm"] in ARMS else 99, r["seed"]))]
        for arm in CANDIDATES:
            print(f"{arm}:\n{candidates_table(selected, arm)}\n")
        print(f"hand-off checks:\n{handoff_checks_table()}\n")
        out = {"table": table, "summary": summary, "selection": selection_table(selected),
               "candidates": {arm: candidates_table(selected, arm) for arm in CANDIDATES},
               "handoff_checks": handoff_checks_table(),
               "selected": selected, "answer": answer, "runs": runs,
               "teacher_geometry": teacher_geometry()}
        print(table)
        print()
        print(summary)
        print(json.dumps({k: v for k, v in out.items() if k not in ("table", "runs")}, indent=1))
        from refilled.files import atomic_write_text

        atomic_write_text(ROOT / "benchmarks" / "glyphs_study.json", json.dumps(out, indent=1) + "\n")
        return
    if args.reverse:
        cmds.reverse()
    for c in cmds:
        print(shlex.join(["refilled", *c[1:]]))
    if not args.dry_run:
        run_all(cmds, args.jobs)


if __name__ == "__main__":
    main()
