"""Out of the box (issue 23): ``refilled.distill()`` with its defaults against ``method="ce"``
with the same total epochs, on four small tasks, 3 seeds each, no tuning.

Tasks (the student always learns from few images per class; the teacher is frozen):

* ``digits``         - the README's "Use from Python" snippet: an MLP teacher on scikit-learn's
                       digits 0-4, the snippet's small CNN student on 5-9, 20 images per class;
* ``fashion``        - the demo's windows: Fashion-MNIST, ``cnn_medium`` teacher on classes 0-4
                       (the demo's teacher), ``cnn_small`` student on 5-9, 20 images per class;
* ``glyphs-cross``   - the glyphs study's cross-task window (128 characters of alphabets the
                       teacher never saw), its teacher, ``cnn_small``, 20 images per class;
* ``glyphs-overlap`` - the overlap window (43 characters the teacher knows + 43 it does not),
                       ``shared_classes=`` given, as a user with such a teacher would.

Only ``distill``'s public keywords are used (``val=``, ``method=``, ``stage2_epochs=``,
``device=``, ``progress=``; ``shared_classes=`` where classes are shared; a candidate setting
passes ``lr``, ``stage1_lr``, ``lam``, ``stage1_epochs``, ``stage2_epochs``, ``batch_size``,
``m_per_class``), and each student is a plain ``nn.Module`` without input statistics (uint8
images reach it as [0, 1] floats). The window tasks' teachers are refilled's own teacher runs
(the demo's, trained for each seed's split; the glyphs study's), handed over as modules that
take [0, 1] images. A seed draws the student's training and validation images
and initialises the student; the test split is read once per run, after training, and never
for a choice. Validation images: 20 per class (digits), 100 (fashion), 3 (glyphs).

    python benchmarks/out_of_the_box.py run                 # the table (both arms, 3 seeds)
    python benchmarks/out_of_the_box.py run --tasks digits  # one task
    python benchmarks/out_of_the_box.py select --candidate "lr=0.05 lam=3"   # validation only
    python benchmarks/out_of_the_box.py table               # -> benchmarks/out_of_the_box.md

Records go to ``runs/out_of_the_box/<arm>/<task>-seed<k>.json`` (a finished record is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "out_of_the_box"
TASKS = ("digits", "fashion", "glyphs-cross", "glyphs-overlap")
SEEDS = (0, 1, 2)
GLYPHS_TEACHER = "runs/glyphs/teacher-glyphs-cnn_medium-bdacdf04-seed0"


class DigitsStudent(nn.Module):
    """The README snippet's student."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, inputs):
        return self.fc(self.body(inputs).mean(dim=(2, 3)))


_TEACHERS: dict = {}


def digits_task(seed: int) -> dict:
    """The README snippet: teacher on digits 0-4 (all of them, trained with refilled's CE method
    as the snippet does), student on 5-9; seed 0 takes the snippet's images (the first 20 of each
    class), other seeds a random draw; 20 more per class for validation, the rest for test."""
    import refilled
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.tensor(digits.target)
    if "digits" not in _TEACHERS:
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 5))
        refilled.distill(None, teacher, (x[y < 5], y[y < 5]), method="ce", epochs=10, lr=0.05,
                         device="cpu", progress=False)
        _TEACHERS["digits"] = teacher
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(5, 10):
        idx = (y == c).nonzero().flatten()
        if seed:
            idx = idx[torch.randperm(len(idx), generator=g)]
        parts["train"].append(idx[:20])
        parts["val"].append(idx[20:40])
        parts["test"].append(idx[40:])
    split = {k: (x[torch.cat(v)], y[torch.cat(v)] - 5) for k, v in parts.items()}
    torch.manual_seed(seed)
    return {**split, "teacher": _TEACHERS["digits"], "student": DigitsStudent(), "shared": None}


def window_task(config: str, overrides: list[str], seed: int, key: str) -> dict:
    """A class-window task of a refilled config: the splits of ``data.split_seed=seed``, the
    teacher of those splits as a plain module over [0, 1] images (the config's checkpoint, or
    the one refilled trains for them, in its own run directory, as ``refilled run`` would), a
    fresh student of the config's architecture. Teachers are cached by (task, seed): which seeds
    share a process never changes a result."""
    import refilled
    from refilled.config import load_config
    from refilled.distillation import prepare
    from refilled.pipeline import augment_of, make_teacher, train_teacher
    from refilled.protocols import PROTOCOLS, shared_classes
    from refilled.runtime import Dist

    cfg = load_config(config, [*overrides, f"data.split_seed={seed}", "progress=false", "device=cpu"])
    tasks = PROTOCOLS["distill"].tasks(cfg)
    if (key, seed) not in _TEACHERS:
        teacher = make_teacher(cfg, tasks, torch.device("cpu"), Dist())
        if not teacher.ready:  # refilled trains it as a run would (its own run directory)
            t = tasks.teacher
            teacher.plan = prepare(None, teacher.network, t.train, val=t.val, config=teacher.cfg,
                                   num_classes=t.num_classes, run=teacher.run, augment=augment_of(t),
                                   device=torch.device("cpu"))
            train_teacher(teacher, t, torch.device("cpu"), Dist())
        teacher.close()
        _TEACHERS[key, seed] = teacher.network.eval()  # takes [0, 1] images, normalises inside
    task = tasks.student
    s_ids, t_ids = shared_classes(task, tasks.teacher)
    torch.manual_seed(seed)
    student = refilled.create_model(cfg.student.arch, task.num_classes, int(task.train.images.shape[1]))
    return {"train": (task.train.images, task.train.labels), "val": (task.val.images, task.val.labels),
            "test": (task.test.images, task.test.labels), "teacher": _TEACHERS[key, seed],
            "student": student, "shared": (s_ids, t_ids) if len(s_ids) else None}


def make_task(name: str, seed: int) -> dict:
    if name == "digits":
        return digits_task(seed)
    if name == "fashion":
        from refilled.demo import demo_config_path

        return window_task(str(demo_config_path()), [], seed, "fashion")
    window = {"glyphs-cross": "configs/glyphs-crosstask.yaml", "glyphs-overlap": "configs/glyphs-overlap.yaml"}
    return window_task(window[name], ["data.train_per_class=20", f"teacher.checkpoint={GLYPHS_TEACHER}"],
                       seed, "glyphs")


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    images, labels = data
    model.eval()
    correct = 0
    for lo in range(0, len(labels), 512):
        x = images[lo:lo + 512]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        correct += int((model(x).argmax(1) == labels[lo:lo + 512]).sum())
    return correct / len(labels)


def parse_candidate(text: str) -> dict:
    """``"lr=0.05 lam=3"`` -> distill keywords (numbers as numbers)."""
    out = {}
    for part in text.split():
        key, value = part.split("=", 1)
        out[key] = int(value) if value.isdigit() else float(value)
    return out


def total_epochs(settings: dict) -> int:
    """REFILLED's total epochs under ``settings`` (the defaults' when not given): CE gets as many."""
    from refilled.config import Config

    default = Config()
    return (settings.get("stage1_epochs", default.stage1.optim.epochs)
            + settings.get("stage2_epochs", default.train.epochs))


def run_one(task_name: str, seed: int, arm: str, settings: dict, test: bool = True) -> dict:
    """Train one student; its validation (and, for the table, test) accuracy."""
    import time

    import refilled

    task = make_task(task_name, seed)
    tic = time.perf_counter()
    if arm == "ce":
        keep = {k: v for k, v in settings.items() if k in ("lr", "batch_size")}
        student = refilled.distill(None, task["student"], task["train"], val=task["val"], method="ce",
                                   stage2_epochs=total_epochs(settings), device="cpu", progress=False,
                                   **keep)
    else:
        extra = {"shared_classes": task["shared"]} if task["shared"] is not None else {}
        student = refilled.distill(task["teacher"], task["student"], task["train"], val=task["val"],
                                   device="cpu", progress=False, **settings, **extra)
    record = {"task": task_name, "seed": seed, "arm": arm, "settings": settings,
              "epochs": total_epochs(settings), "val_accuracy": accuracy(student, task["val"]),
              "test_accuracy": accuracy(student, task["test"]) if test else None,
              "train_images": len(task["train"][1]), "shared_classes": 0 if task["shared"] is None
              else len(task["shared"][0]), "seconds": round(time.perf_counter() - tic, 1),
              "notes": dict(getattr(getattr(student, "refilled_history", None), "notes", {}) or {})}
    return record


def _slug(text: str) -> str:
    return text.replace(" ", "_").replace("=", "-") or "defaults"


def record_path(arm: str, candidate: str, task: str, seed: int, split: str) -> Path:
    return OUT / split / f"{arm}-{_slug(candidate)}" / f"{task}-seed{seed}.json"


def run_grid(tasks, seeds, arms, candidate: str, split: str) -> list[dict]:
    from refilled.files import atomic_write_text

    settings = parse_candidate(candidate)
    out = []
    for task in tasks:
        for seed in seeds:
            for arm in arms:
                path = record_path(arm, candidate, task, seed, split)
                if path.exists():
                    out.append(json.loads(path.read_text()))
                    continue
                record = run_one(task, seed, arm, settings, test=(split == "test"))
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(record, indent=1) + "\n")
                print(f"{task} seed {seed} {arm} [{candidate or 'defaults'}]: val "
                      f"{100 * record['val_accuracy']:.1f}"
                      + (f" test {100 * record['test_accuracy']:.1f}" if record["test_accuracy"] is not None else "")
                      + f" ({record['seconds']} s)", flush=True)
                out.append(record)
    return out


def _load(folder: Path) -> dict:
    """The records in ``folder`` (one arm and candidate), by (task, seed)."""
    return {(r["task"], r["seed"]): r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))}


def _records(split: str, arm: str, candidate: str) -> dict:
    return _load(OUT / split / f"{arm}-{_slug(candidate)}")


def _paired_seeds(ce: dict, rf: dict, task: str) -> list[int]:
    """The seeds of ``task`` that both arms ran (the differences are paired by seed)."""
    return sorted(s for (t, s) in rf if t == task and (t, s) in ce)


def table(candidate: str = "") -> str:
    """The markdown table: per task, CE and REFILLED (test, val), the paired difference and the
    goal (issue 23: the defaults' paired mean test accuracy at least CE's)."""
    from refilled.stats import ci95, mean_std

    ce, rf = _records("test", "ce", candidate), _records("test", "refilled", candidate)

    def pm(v):
        m, s = mean_std(v)
        return f"{m:.1f} ± {s:.1f}"

    lines = ["| task | train images | epochs (CE = REFILLED total) | n | CE val / test (%) | "
             "REFILLED val / test (%) | REFILLED − CE, test (pts, ± std [95% CI]) | REFILLED − CE, val | "
             "not below CE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        seeds = _paired_seeds(ce, rf, task)
        if not seeds:
            continue
        a = [ce[(task, s)] for s in seeds]
        b = [rf[(task, s)] for s in seeds]
        diff = [100 * (y["test_accuracy"] - x["test_accuracy"]) for x, y in zip(a, b)]
        dval = [100 * (y["val_accuracy"] - x["val_accuracy"]) for x, y in zip(a, b)]
        m, s = mean_std(diff)
        mv, sv = mean_std(dval)
        lines.append(f"| {task} | {b[0]['train_images']} | {b[0]['epochs']} | {len(seeds)} | "
                     f"{pm([100 * r['val_accuracy'] for r in a])} / {pm([100 * r['test_accuracy'] for r in a])} | "
                     f"{pm([100 * r['val_accuracy'] for r in b])} / {pm([100 * r['test_accuracy'] for r in b])} | "
                     f"{m:+.1f} ± {s:.1f} [±{ci95(diff):.1f}] | {mv:+.1f} ± {sv:.1f} | "
                     f"{'yes' if m >= 0 else '**no**'} |")
    return "\n".join(lines)


def probes_table() -> str:
    """The validation runs of ``select`` (candidates, never the test split): per candidate and
    task, CE's and REFILLED's mean validation accuracy and their paired difference."""
    from refilled.stats import mean_std

    lines = ["| candidate | task | n | CE val (%) | REFILLED val (%) | REFILLED − CE (pts, ± std) |",
             "|---|---|---|---|---|---|"]
    for folder in sorted((OUT / "val").glob("refilled-*")):
        rf, ce = _load(folder), _load(OUT / "val" / f"ce-{folder.name[len('refilled-'):]}")
        for task in TASKS:
            seeds = _paired_seeds(ce, rf, task)
            if not seeds:
                continue
            a = [100 * ce[(task, k)]["val_accuracy"] for k in seeds]
            b = [100 * rf[(task, k)]["val_accuracy"] for k in seeds]
            m, sd = mean_std([y - x for x, y in zip(a, b)])
            settings = " ".join(f"{k}={v}" for k, v in rf[(task, seeds[0])]["settings"].items())
            lines.append(f"| `{settings}` | {task} | {len(seeds)} | {mean_std(a)[0]:.1f} | "
                         f"{mean_std(b)[0]:.1f} | {m:+.1f} ± {sd:.1f} |")
    return "\n".join(lines)


MARKDOWN = ROOT / "benchmarks" / "out_of_the_box.md"
ANSWER = ("<!-- answer -->", "<!-- /answer -->")  # kept when the file is written again


def write_markdown(text: str) -> None:
    """``benchmarks/out_of_the_box.md``: how it was measured, the table, every run's figures;
    the hand-written answer between the ANSWER markers of the previous file is kept."""
    import platform

    from refilled.files import atomic_write_text

    old = MARKDOWN.read_text() if MARKDOWN.exists() else ""
    answer = old[old.index(ANSWER[0]):old.index(ANSWER[1]) + len(ANSWER[1])] if ANSWER[0] in old else \
        f"{ANSWER[0]}\n(the answer: written by hand from the table)\n{ANSWER[1]}"
    runs = ["| task | seed | arm | val (%) | test (%) | seconds | notes |", "|---|---|---|---|---|---|---|"]
    for arm in ("ce", "refilled"):
        for (task, seed), r in sorted(_records("test", arm, "").items()):
            notes = "; ".join(f"{k}: {v}" for k, v in r["notes"].items() if k != "handoff_scale")
            runs.append(f"| {task} | {seed} | {arm} | {100 * r['val_accuracy']:.1f} | "
                        f"{100 * r['test_accuracy']:.1f} | {r['seconds']} | {notes} |")
    doc = __doc__.split("\n\n", 1)[1].split("    python benchmarks")[0].strip().replace("``", "`")
    atomic_write_text(MARKDOWN, f"""# Out of the box: `refilled.distill()`'s defaults against CE at equal epochs (issue 23)

{doc}

Measured with `python benchmarks/out_of_the_box.py run` then `... table` (one torch thread,
{platform.machine()} CPU, {torch.__version__}); CE gets REFILLED's total epochs (stage 1 +
stage 2) and its batch size and learning rate. Differences are paired by seed.

{text}

(mean ± std over seeds; the difference's 95% CI half-width in brackets.)

{answer}

## Validation probes

`python benchmarks/out_of_the_box.py select --candidate "..."` runs both arms with other
settings and reads only the validation split (CE takes the candidate's batch size and learning
rate and REFILLED's total epochs):

{probes_table()}

## Every run

{chr(10).join(runs)}
""")
    print(f"wrote {os.path.relpath(MARKDOWN, ROOT)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["run", "select", "table"])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--arms", default="ce,refilled")
    p.add_argument("--candidate", default="", help='distill keywords, e.g. "lr=0.05 lam=3" (select; '
                   "run: the defaults, or a candidate adopted as them)")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    if args.step == "table":
        text = table(args.candidate)
        print(text)
        if not args.candidate:
            write_markdown(text)
        below = text.count("**no**")
        if below:
            print(f"the defaults are below CE on {below} task(s)", file=sys.stderr)
        return 1 if below else 0
    split = "test" if args.step == "run" else "val"
    run_grid(tasks, seeds, args.arms.split(","), args.candidate, split)


if __name__ == "__main__":
    sys.exit(main())
