"""Stage-1 cost: semi-hard mining + tuple loss, forward and backward, against a loop reference.

The reference mines the same triplets, then groups them into (anchor, positive) tuples with a
Python loop over triplets and evaluates each tuple's KL separately, the way the authors' code
does. Both run in the same process on the same batches, and their losses must agree.

    python benchmarks/stage1_loss.py            # prints a table, appends to benchmarks/RESULTS.md

Targets (issue 2): >= 50x faster than the reference at batch 128 with 10 classes, and <= 5 ms
for batch 128, 64-d, 100 classes. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from refilled.losses import relation_matching_loss
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
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
            rows.append((batch, classes, tuples, ours * 1e3, ref * 1e3, ref / ours))

    header = "| batch | classes | tuples | ours fwd+bwd (ms) | loop reference (ms) | speed-up |"
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [f"| {b} | {c} | {t} | {o:.2f} | {r:.1f} | {x:.0f}x |" for b, c, t, o, r, x in rows]
    speedup = next(x for b, c, *_, x in rows if (b, c) == (128, 10))
    ms_100 = next(o for b, c, _, o, *_ in rows if (b, c) == (128, 100))
    checks = [
        (f"speed-up at batch 128 / 10 classes = {speedup:.0f}x (target >= 50x)", speedup >= 50),
        (f"batch 128 / 100 classes = {ms_100:.2f} ms (target <= 5 ms)", ms_100 <= 5.0),
    ]
    verdict = [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    report = "\n".join(lines + [""] + verdict)
    print(report)

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    with open(args.results, "a") as fh:
        fh.write(f"\n## stage1_loss ({stamp}; {machine}; dim {args.dim}; median of runs)\n\n")
        fh.write(report + "\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
