"""The embedded default: does a teacher that never saw the student's classes help?

Fashion-MNIST; the teacher learns classes 0-4, a smaller student learns the disjoint classes
5-9 from 20 images per class. Three arms on the same data, schedule (600 SGD steps) and seeds:
the student alone, REFILLED, and REFILLED with an untrained teacher of the same architecture
(the control that tells how much of the gain is the teacher's knowledge). The teacher is
trained once and shared. Every run resumes if interrupted; finished runs are not redone.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from refilled.config import load_config, load_yaml, make_config
from refilled.files import atomic_write_text, write_csv
from refilled.pipeline import run
from refilled.report import markdown_table, plot_arms, summarize

ALONE, REFILLED, RANDOM = "student alone", "REFILLED", "REFILLED, random teacher"
ARMS = {
    # The student alone gets the same 600 steps as REFILLED's 200 (stage 1) + 400 (stage 2), at
    # the learning rate chosen for it on validation (benchmarks/demo_selection.md).
    ALONE: ["method=ce", "train.epochs=300", "train.lr=0.05"],
    REFILLED: ["method=refilled"],
    RANDOM: ["method=refilled", "teacher.init=random"],
}


def demo_config_path() -> Path:
    return Path(str(resources.files("refilled") / "configs" / "demo.yaml"))


def run_demo(out_dir: str | None = None, seeds=(0, 1, 2), overrides=(), progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    tree = load_yaml(demo_config_path())
    base = list(overrides) + ([f"out_dir={out_dir}"] if out_dir else [])
    out = Path(load_config(demo_config_path(), base).out_dir)  # checks the overrides early
    cells = [(arm, seed) for seed in seeds for arm in ARMS]
    results = []
    bar = tqdm(cells, desc="demo runs", disable=not progress, dynamic_ncols=True)
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm}, seed {seed}")
        cfg = make_config(tree, [*ARMS[arm], *base, f"seed={seed}", f"arm={arm}", "progress=false"])
        results.append({**run(cfg), "arm": arm})  # a reused finished run keeps this label

    rows = summarize(results, baseline=ALONE, group_keys=())
    order = {arm: i for i, arm in enumerate(ARMS)}
    rows.sort(key=lambda r: order.get(r["arm"], 99))
    table = markdown_table(rows, group_keys=(), baseline=ALONE)
    by = {r["arm"]: r for r in rows}
    teacher_acc = next(r["teacher_test_accuracy"] for r in results if r["teacher_test_accuracy"])
    gain, spread = by[REFILLED].get("diff_mean"), max(by[REFILLED]["test_std"], by[ALONE]["test_std"])
    knowledge = by[REFILLED]["test_mean"] - by[RANDOM]["test_mean"]
    cfg = load_config(demo_config_path(), base)
    n_t, s, n_s = cfg.data.teacher_classes, cfg.data.student_offset, results[0]["num_classes"]
    lines = [
        f"{cfg.data.name}: teacher on classes 0-{n_t - 1} (test accuracy {100 * teacher_acc:.1f}% "
        f"on its classes), student ({cfg.student.arch}) on classes {s}-{s + n_s - 1} with "
        f"{results[0]['train_images'] // n_s} training images per class; {len(seeds)} seeds; "
        "test accuracy of the last epoch (nothing selected on the test split).",
        "",
        table,
        "",
        f"REFILLED vs the student alone: {gain:+.1f} points (paired, mean over seeds); "
        f"largest seed spread (std) {spread:.1f}: "
        + ("the gain is larger than the spread." if gain is not None and gain > spread
           else "the gain is NOT larger than the spread."),
        f"Trained vs random teacher: {knowledge:+.1f} points: the part of the gain that comes from "
        "the teacher's knowledge rather than from the extra loss terms themselves.",
    ]
    summary = "\n".join(lines)
    atomic_write_text(out / "summary.md", summary + "\n")
    write_csv(out / "summary.csv", rows)
    plot_arms(results, out / "demo.png", "Fashion-MNIST cross-task demo (student classes 5-9)",
              order=list(ARMS))
    print(summary)
    print(f"\nwritten: {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'demo.png'}")
    return {"rows": rows, "results": results, "summary": summary}
