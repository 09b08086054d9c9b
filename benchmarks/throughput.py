"""Training-step throughput: what REFILLED costs beyond the two networks' passes.

For one teacher/student pair and batch, in the same process: images per second of
  - a student cross-entropy step (forward + backward + SGD),
  - a teacher forward pass (no grad),
  - a REFILLED stage-1 step (teacher forward + mining + tuple loss + student step),
  - a REFILLED stage-2 step (teacher forward + local-classifier loss + CE + student step),
and the ratio of each REFILLED step's time to (CE step + teacher forward). Target (issue 6):
at most 1.10. Random data of the dataset's shape; CPU by default, the GPU when there is one.

    python benchmarks/throughput.py                       # WRN-40-2 -> WRN-16-2, CIFAR shape
    python benchmarks/throughput.py --pair small          # cnn_medium -> cnn_small, 28x28 grey

Exit status 1 when a ratio misses the target.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from refilled.config import Stage1Config, Stage2Config
from refilled.methods import CrossEntropy, LocalClassifierDistillation, RelationMatching
from refilled.models import create_model
from refilled.networks import FrozenTeacher, Network

PAIRS = {
    "wrn": ("wrn_40_2", "wrn_16_2", 3, 32, 100),
    "small": ("cnn_medium", "cnn_small", 1, 28, 10),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, batches, device, repeats) -> dict:
    """Median seconds per call of each function, timed round-robin so drift hits all alike."""
    for fn in fns.values():  # warm-up
        for x, y in batches[:2]:
            fn(x, y)
    sync(device)
    times = {name: [] for name in fns}
    for r in range(repeats):
        x, y = batches[r % len(batches)]
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x, y)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="wrn")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--epoch-images", type=int, default=50000, help="for seconds per epoch")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    repeats = args.repeats or (100 if device.type == "cuda" or args.pair == "small" else 8)
    t_arch, s_arch, chans, size, classes = PAIRS[args.pair]
    torch.manual_seed(0)

    teacher = FrozenTeacher(Network(create_model(t_arch, classes, chans)).to(device))
    student = Network(create_model(s_arch, classes, chans)).to(device)
    g = torch.Generator().manual_seed(0)
    # 10 instances of each of batch/10 classes: stage 1 always has tuples, as with the balanced sampler
    batches = [
        (torch.randn(batch, chans, size, size, generator=g).to(device),
         torch.arange(batch).div(10, rounding_mode="floor").remainder(classes).to(device))
        for _ in range(4)
    ]
    with torch.no_grad():
        emb = torch.cat([teacher(x)[0] for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        centers = F.normalize(torch.zeros(classes, emb.shape[1], device=device).index_add_(0, labels, emb), dim=1)

    def stepper(method):
        opt = torch.optim.SGD(method.parameters_to_train(), lr=0.01, momentum=0.9)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                losses = method.step(x, y, 0)
                loss = sum(v for k, v in losses.items() if not k.startswith("_"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    fresh = lambda: copy.deepcopy(student)  # noqa: E731 - each method trains its own copy
    timings = time_interleaved({
        "teacher CE step (teacher training)": stepper(CrossEntropy(copy.deepcopy(teacher.model).requires_grad_(True))),
        "student CE step": stepper(CrossEntropy(fresh())),
        "teacher forward": lambda x, y: teacher(x),
        "REFILLED stage 1 step": stepper(RelationMatching(fresh(), teacher, Stage1Config())),
        "REFILLED stage 2 step": stepper(LocalClassifierDistillation(fresh(), teacher, Stage2Config(), centers)),
    }, batches, device, repeats)
    base = timings["student CE step"] + timings["teacher forward"]
    epoch = args.epoch_images
    lines = [f"| step | ms / batch | images / s | s per {epoch}-image epoch | ratio to CE step + teacher forward |",
             "|---|---|---|---|---|"]
    for name, seconds in timings.items():
        ratio = f"{seconds / base:.3f}" if name.startswith("REFILLED") else ""
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {batch / seconds:.0f} | {epoch / batch * seconds:.1f} | {ratio} |")
    checks = [(name, timings[name] / base) for name in timings if name.startswith("REFILLED")]
    lines.append("")
    lines += [f"- {'PASS' if r <= 1.10 else 'FAIL'}: {n} ratio {r:.3f} (target <= 1.10)" for n, r in checks]
    report = "\n".join(lines)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if args.amp and device.type == "cuda" else "fp32"
    title = (f"throughput ({datetime.datetime.now():%Y-%m-%d %H:%M}; {where}; torch {torch.__version__}; "
             f"{t_arch} -> {s_arch}, batch {batch}, {size}x{size}x{chans}, {precision}, median of {repeats})")
    print(title)
    print(report)
    with open(args.results, "a") as fh:
        fh.write(f"\n## {title}\n\n{report}\n")
    return 0 if all(r <= 1.10 for _, r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
