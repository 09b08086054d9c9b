"""Training-step throughput: what REFILLED costs beyond the two networks' passes.

For one teacher/student pair and batch, in the same process, timed round-robin:
  - a teacher cross-entropy step (what pre-training the teacher costs per batch),
  - a student cross-entropy step (forward + backward + SGD),
  - a teacher forward pass (no grad),
  - a REFILLED stage-1 step (teacher forward + mining + tuple loss + student step),
  - a REFILLED stage-2 step (teacher forward + local-classifier loss + CE + student step),
with seconds per 50k-image epoch and the ratio of each REFILLED step's time to (CE step +
teacher forward). Target (issue 6): at most 1.10. Random data of the dataset's shape; CPU by
default, the GPU when there is one (channels_last there).

    python benchmarks/throughput.py                       # WRN-40-2 -> WRN-16-2, CIFAR shape
    python benchmarks/throughput.py --pair small          # cnn_medium -> cnn_small, 28x28 grey
    python benchmarks/throughput.py --grid                # CUDA: fp32 / bf16 x compile off / on,
                                                          # one table, + stage-1 memory at B = 2048

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
from refilled.losses import _relation_matching_terms as relation_matching_terms  # the unchecked training form
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
    for fn in fns.values():  # warm-up (and compilation)
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


def measure(pair: str, batch: int, repeats: int, device, amp: bool, compile_: bool) -> dict:
    """Median seconds per batch of each step for one precision / compile setting."""
    t_arch, s_arch, chans, size, classes = PAIRS[pair]
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    t_net = Network(create_model(t_arch, classes, chans)).to(device)
    s_net = Network(create_model(s_arch, classes, chans)).to(device)
    if cuda:
        for net in (t_net, s_net):
            net.to(memory_format=torch.channels_last)
    teacher_train = copy.deepcopy(t_net).train()  # the teacher's own training step
    if compile_:
        for net in (t_net, teacher_train):
            net.compile_passes()
    teacher = FrozenTeacher(t_net)
    g = torch.Generator().manual_seed(0)
    # 10 instances of each of batch/10 classes: stage 1 always has tuples, as with the balanced sampler
    batches = []
    for _ in range(4):
        x = torch.randn(batch, chans, size, size, generator=g).to(device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, torch.arange(batch).div(10, rounding_mode="floor").remainder(classes).to(device)))
    with torch.no_grad():
        emb = torch.cat([teacher(x)[0] for x, _ in batches]).float()
        labels = torch.cat([y for _, y in batches])
        centers = F.normalize(torch.zeros(classes, emb.shape[1], device=device).index_add_(0, labels, emb), dim=1)

    def stepper(method):
        opt = torch.optim.SGD(method.parameters_to_train(), lr=0.01, momentum=0.9)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and cuda):
                losses = method.step(x, y, 0)
                loss = sum(v for k, v in losses.items() if not k.startswith("_"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def forward(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and cuda):
            teacher(x)

    def fresh():  # each method trains its own copy (a copy is never compiled: compile it here)
        net = copy.deepcopy(s_net)
        if compile_:
            net.compile_passes()
        return net

    return time_interleaved({
        "teacher CE step (teacher training)": stepper(CrossEntropy(teacher_train)),
        "student CE step": stepper(CrossEntropy(fresh())),
        "teacher forward": forward,
        "REFILLED stage 1 step": stepper(RelationMatching(fresh(), teacher, Stage1Config())),
        "REFILLED stage 2 step": stepper(LocalClassifierDistillation(fresh(), teacher, Stage2Config(), centers)),
    }, batches, device, repeats)


def stage1_memory(device, batch: int = 2048, classes: int = 10, dim: int = 128) -> tuple[float, float]:
    """Peak GPU memory (GB) and seconds of stage-1 mining + tuple loss forward + backward."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    t = torch.randn(batch, dim + 64, generator=g).to(device)
    y = (torch.arange(batch) % classes).to(device)
    relation_matching_terms(s, t, y)[0].backward()  # warm-up
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    relation_matching_terms(s, t, y)[0].backward()
    sync(device)
    seconds = time.perf_counter() - start
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="wrn")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks' passes")
    parser.add_argument("--grid", action="store_true",
                        help="fp32 / bf16 x compile off / on in one table (CUDA), + stage-1 memory")
    parser.add_argument("--epoch-images", type=int, default=50000, help="for seconds per epoch")
    parser.add_argument("--note", default=None, help="a line to add to the recorded table")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 64)
    repeats = args.repeats or (50 if cuda or args.pair == "small" else 8)
    settings = ([(amp, comp) for amp in (False, True) for comp in (False, True)] if args.grid
                else [(args.amp and cuda, args.compile)])
    if args.grid and not cuda:
        print("--grid needs a CUDA device (bf16 and compile are GPU settings)", file=sys.stderr)
        return 2
    epoch = args.epoch_images
    lines = [f"| precision | compile | step | ms / batch | images / s | s per {epoch}-image epoch | "
             "ratio to CE step + teacher forward |", "|---|---|---|---|---|---|---|"]
    checks = []
    for amp, comp in settings:
        timings = measure(args.pair, batch, repeats, device, amp, comp)
        base = timings["student CE step"] + timings["teacher forward"]
        for name, seconds in timings.items():
            ratio = f"{seconds / base:.3f}" if name.startswith("REFILLED") else ""
            lines.append(f"| {'bf16' if amp else 'fp32'} | {'on' if comp else 'off'} | {name} | "
                         f"{seconds * 1e3:.1f} | {batch / seconds:.0f} | {epoch / batch * seconds:.1f} | {ratio} |")
        checks += [(f"{'bf16' if amp else 'fp32'}/compile {'on' if comp else 'off'}: {n}", timings[n] / base)
                   for n in timings if n.startswith("REFILLED")]
    lines.append("")
    lines += [f"- {'PASS' if r <= 1.10 else 'FAIL'}: {n} ratio {r:.3f} (target <= 1.10)" for n, r in checks]
    if args.grid:
        gb, seconds = stage1_memory(device)
        lines.append(f"- stage-1 mining + tuple loss, B = 2048, 10 classes, 128-d, fp32, fwd + bwd: "
                     f"{seconds * 1e3:.1f} ms, peak GPU memory {gb:.2f} GB")
    if args.note:
        lines.append(f"- {args.note}")
    report = "\n".join(lines)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    t_arch, s_arch, chans, size, _ = PAIRS[args.pair]
    title = (f"throughput ({datetime.datetime.now():%Y-%m-%d %H:%M}; {where}; torch {torch.__version__}; "
             f"{t_arch} -> {s_arch}, batch {batch}, {size}x{size}x{chans}, median of {repeats})")
    print(title)
    print(report)
    with open(args.results, "a") as fh:
        fh.write(f"\n## {title}\n\n{report}\n")
    return 0 if all(r <= 1.10 for _, r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
