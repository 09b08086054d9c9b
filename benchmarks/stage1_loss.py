"""Stage-1 cost: semi-hard mining + tuple loss, forward and backward, against a loop reference.

The reference mines the same triplets, then groups them into (anchor, positive) tuples with a
Python loop over triplets and evaluates each tuple's KL separately, the way the authors' code
does. Both run in the same process on the same batches, and their losses must agree.

    python benchmarks/stage1_loss.py            # prints tables, appends them to benchmarks/RESULTS.md
    python benchmarks/stage1_loss.py --skip-scale   # the small-batch table only

Targets (issue 2): >= 50x faster than the reference at batch 128 with 10 classes, and <= 5 ms
for batch 128, 64-d, 100 classes.

Scale section (issue 15): B in {256, 512, 1024, 2048}, 10 classes, 128-d, tuple mode, forward +
backward (median wall and CPU time), peak RSS of a fresh subprocess per configuration
(ru_maxrss only grows within a process), pair-image comparisons (ordered positive pairs x B)
and ns per comparison; the dense (T x B) implementation it replaced at the sizes it can afford,
as the in-run baseline; the triplet mode at 512 and 2048. Targets: at B = 2048, <= 3 s and
<= 2.5 GB peak RSS, and ns per comparison at 2048 no worse than at 512.
Everything runs with --threads torch threads (default 1). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from refilled.losses import (
    _few_tuples,
    _relation_terms_dense,
    relation_matching_loss,
)
from refilled.losses import _relation_matching_terms as relation_matching_terms  # the training form
from refilled.mining import normalized_distances, semihard_from_distances


def reference_loss(student, teacher, labels, tau=4.0, margin=0.2, scale=1000.0):
    d_s = normalized_distances(student)
    d_t = normalized_distances(teacher.detach())
    anchor, positive, mask = semihard_from_distances(d_s, labels, margin)
    t_idx, n_idx = mask.nonzero(as_tuple=True)
    triplets = zip(anchor[t_idx].tolist(), positive[t_idx].tolist(), n_idx.tolist())
    groups: dict[tuple[int, int], list[int]] = {}
    for a, p, n in triplets:  # per-triplet grouping: the slow part being measured
        groups.setdefault((a, p), []).append(n)
    if not groups:
        return d_s.sum() * 0.0
    kls = []
    for (a, p), negs in groups.items():
        cols = torch.tensor([p] + negs)
        log_ps = torch.log_softmax(-d_s[a, cols] / tau, dim=0)
        log_pt = torch.log_softmax(-d_t[a, cols] / tau, dim=0)
        kls.append((log_pt.exp() * (log_pt - log_ps)).sum())
    return scale * torch.stack(kls).mean()


def time_step(fn, student, teacher, labels, repeats):
    times = []
    for _ in range(repeats):
        s = student.detach().requires_grad_(True)
        start = time.perf_counter()
        loss = fn(s, teacher, labels)
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), loss.item()


# ---------------------------------------------------------------- scale section

SCALE_CLASSES, SCALE_DIM = 10, 128
# (mode, implementation, batch, timed repeats); each runs in a fresh subprocess
SCALE_RUNS = [
    ("tuple", "ours", 256, 9), ("tuple", "ours", 512, 7), ("tuple", "ours", 1024, 5),
    ("tuple", "ours", 2048, 5),
    ("tuple", "dense", 256, 5), ("tuple", "dense", 512, 3), ("tuple", "dense", 1024, 2),
    ("triplet", "ours", 512, 3), ("triplet", "ours", 2048, 1),
]


def scale_worker(spec: dict) -> dict:
    """One configuration in this (fresh) process: one warm-up step, then timed steps."""
    torch.set_num_threads(spec["threads"])
    g = torch.Generator().manual_seed(spec["batch"])
    batch = spec["batch"]
    labels = torch.randint(SCALE_CLASSES, (batch,), generator=g)
    student = torch.randn(batch, SCALE_DIM, generator=g)
    teacher = torch.randn(batch, SCALE_DIM, generator=g)
    fn = relation_matching_terms if spec["impl"] == "ours" else _relation_terms_dense
    walls, cpus = [], []
    for step in range(spec["repeats"] + 1):
        s = student.clone().requires_grad_(True)
        wall, cpu = time.perf_counter(), time.process_time()
        loss, count = fn(s, teacher, labels, mode=spec["mode"])
        loss.backward()
        if step:  # the first step is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    sizes = torch.bincount(labels)
    return {
        **spec,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "loss": loss.item(),
        "tuples": count.item(),
        "comparisons": int((sizes * (sizes - 1)).sum()) * batch,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def run_scale(threads: int) -> tuple[list[str], list[tuple[str, bool]]]:
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for mode, impl, batch, repeats in SCALE_RUNS:
        spec = {"mode": mode, "impl": impl, "batch": batch, "repeats": repeats, "threads": threads}
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {mode} {impl} B={batch}: {r['wall_s']:.3f} s wall, {r['cpu_s']:.3f} s CPU, "
              f"{r['peak_rss_gb']:.2f} GB", flush=True)

    def find(mode, impl, batch):
        return next((r for r in results if (r["mode"], r["impl"], r["batch"]) == (mode, impl, batch)), None)

    lines = [
        "| mode | implementation | B | tuples | pair-image comparisons | fwd+bwd wall (s) "
        "| CPU (s) | ns / comparison | peak RSS (GB) | dense / ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for r in results:
        ns = r["wall_s"] / r["comparisons"] * 1e9
        ratio = ""
        if r["impl"] == "ours" and (dense := find(r["mode"], "dense", r["batch"])):
            ratio = f"{dense['wall_s'] / r['wall_s']:.1f}x"
            same = dense["tuples"] == r["tuples"] and abs(dense["loss"] - r["loss"]) <= 1e-3 * abs(dense["loss"])
            checks.append((f"{r['mode']} B={r['batch']}: same tuples and loss as the dense version "
                           f"({r['tuples']} tuples, {r['loss']:.6g} vs {dense['loss']:.6g})", same))
        lines.append(
            f"| {r['mode']} | {r['impl']} | {r['batch']} | {r['tuples']} | {r['comparisons']:.3g} "
            f"| {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {ns:.3f} | {r['peak_rss_gb']:.2f} | {ratio} |"
        )
    big, mid = find("tuple", "ours", 2048), find("tuple", "ours", 512)
    ns_big = big["wall_s"] / big["comparisons"] * 1e9
    ns_mid = mid["wall_s"] / mid["comparisons"] * 1e9
    checks += [
        (f"tuple B=2048: {big['wall_s']:.2f} s wall ({big['cpu_s']:.2f} s CPU) (target <= 3 s)",
         big["wall_s"] <= 3.0),
        (f"tuple B=2048: peak RSS {big['peak_rss_gb']:.2f} GB (target <= 2.5 GB)",
         big["peak_rss_gb"] <= 2.5),
        (f"tuple: {ns_big:.3f} ns / comparison at B=2048 vs {ns_mid:.3f} at B=512 (target: no worse)",
         ns_big <= ns_mid),
    ]
    return lines, checks


def machine_line(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}, "
            f"load average {load} at start")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-scale", action="store_true", help="only the small-batch table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(scale_worker(json.loads(args.worker))))
        return 0
    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    torch.manual_seed(0)

    rows = []
    for batch in (128, 256):
        for classes in (10, 100):
            labels = torch.randint(classes, (batch,))
            student = torch.randn(batch, args.dim)
            teacher = torch.randn(batch, 2 * args.dim)
            for _ in range(3):  # warm-up
                time_step(relation_matching_loss, student, teacher, labels, 1)
            ours, loss_ours = time_step(relation_matching_loss, student, teacher, labels, args.repeats)
            ref, loss_ref = time_step(reference_loss, student, teacher, labels, max(3, args.repeats // 6))
            tuples = semihard_from_distances(normalized_distances(student), labels, 0.2)[0].numel()
            if abs(loss_ours - loss_ref) > 1e-3 * max(1.0, abs(loss_ref)):
                print(f"MISMATCH batch {batch} classes {classes}: {loss_ours} vs {loss_ref}")
                return 1
            path = "dense (T <= 4B)" if _few_tuples(normalized_distances(student), labels) else "sorted"
            rows.append((batch, classes, tuples, path, ours * 1e3, ref * 1e3, ref / ours))

    header = "| batch | classes | tuples | path | ours fwd+bwd (ms) | loop reference (ms) | speed-up |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {b} | {c} | {t} | {p} | {o:.2f} | {r:.1f} | {x:.0f}x |" for b, c, t, p, o, r, x in rows]
    speedup = next(x for b, c, *_, x in rows if (b, c) == (128, 10))
    ms_100 = next(o for b, c, _, _, o, *_ in rows if (b, c) == (128, 100))
    checks = [
        (f"speed-up at batch 128 / 10 classes = {speedup:.0f}x (target >= 50x)", speedup >= 50),
        (f"batch 128 / 100 classes = {ms_100:.2f} ms (target <= 5 ms)", ms_100 <= 5.0),
    ]
    verdict = [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    report = "\n".join(lines + [""] + verdict)
    print(report, flush=True)

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [(f"stage1_loss ({stamp}; {machine}; dim {args.dim}; median of runs)", report)]
    if not args.skip_scale:
        print("\nscale section (a fresh subprocess per row):", flush=True)
        scale_lines, scale_checks = run_scale(args.threads)
        checks += scale_checks
        scale_report = "\n".join(
            scale_lines + [""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in scale_checks]
        )
        print(scale_report)
        sections.append((
            f"stage1_loss scale ({stamp}; {machine}; {SCALE_CLASSES} classes, {SCALE_DIM}-d; "
            "median of runs after one warm-up, peak RSS of a fresh process per row)",
            scale_report,
        ))
    with open(args.results, "a") as fh:
        for title, text in sections:
            fh.write(f"\n## {title}\n\n{text}\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
