"""Data throughput and memory of the two data paths (issue 21).

1. Images per second delivered to the training step, by path and number of worker processes:
   Fashion-MNIST (60k images, 28x28 grey, batch 128) in memory (one uint8 tensor, batches
   gathered and augmented there) and streamed (read item by item); a generated folder of
   224x224 JPEGs streamed from disk at 224 pixels (random resized crop + flip, batch 64) and
   at 32 pixels (resize + pad-crop + flip), and decoded into memory. Beside each, the images per
   second of the training step it feeds (cnn_small CE step at 28 px; WRN-16-2 CE step at 32 and
   224 px, measured in the same run, one torch thread): the loader keeps up when it delivers at
   least as many.
2. Peak memory when one epoch streams a generated folder of 5k and of 50k images (a fresh
   process each; the peak resident set of the main process, and of the largest worker, which
   counts the pages it shares with the main process), against the in-memory path on the same
   folders. Target: streaming 50k within 1.3x of 5k.

    python benchmarks/data_throughput.py              # everything (~30 min on 2 cores)
    python benchmarks/data_throughput.py --quick      # small sizes, a smoke run

Prints the tables and appends them to benchmarks/RESULTS.md (not with --quick). Exit status 1
when the memory target is missed. Generated images are cached under /tmp/refilled-bench.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("REFILLED_BENCH_CACHE", "/tmp/refilled-bench"))


def make_jpeg_folder(n: int, classes: int = 100, size: int = 224) -> Path:
    """``n`` JPEG images of ``size`` x ``size`` in ``classes`` class folders (smooth colour
    fields with noise, about 10-20 KB each), generated once and cached."""
    from PIL import Image

    root = CACHE / f"jpeg{size}-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(n)
    per = n // classes
    for c in range(classes):
        d = root / f"class{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            base = rng.random((4, 4, 3)) * 200 + 20
            img = Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=85)
    done.write_text("ok")
    return root


def _rate(loader, batches: int) -> float:
    """Images per second over ``batches`` batches (after one warm-up batch)."""
    batches = min(batches, len(loader) - 1)
    it = iter(loader)
    next(it)
    n, tic = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - tic)


def step_rate(arch: str, size: int, channels: int, batch: int, classes: int, steps: int = 5) -> float:
    """Images per second of a CE training step (forward, backward, SGD) of ``arch``."""
    from refilled.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, classes, channels, input_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(batch, channels, size, size), torch.randint(classes, (batch,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - tic)


def fashion_rows(workers_list, batches: int) -> list[dict]:
    from refilled.data import Augment, TensorLoader, load_dataset
    from refilled.data.streaming import StreamedImages, StreamLoader, StreamSettings

    data = load_dataset("fashion_mnist", split="train")
    aug = Augment(2, True)
    rows = [{"data": "Fashion-MNIST 28x28", "path": "in memory", "workers": "-",
             "images/s": _rate(TensorLoader(data.images, data.labels, 128, augment=aug), batches)}]
    items = torch.utils.data.TensorDataset(data.images, data.labels)
    for w in workers_list:
        view = StreamedImages(items, item_shape=(1, 28, 28), dtype=torch.uint8,
                              settings=StreamSettings(workers=w))
        rows.append({"data": "Fashion-MNIST 28x28", "path": "streamed", "workers": w,
                     "images/s": _rate(StreamLoader(view, data.labels, 128, augment=aug), batches)})
    step = step_rate("cnn_small", 28, 1, 128, 10)
    for r in rows:
        r["step images/s"] = step
        r["step"] = "cnn_small CE, batch 128"
    return rows


def folder_rows(root: Path, workers_list, batches: int) -> list[dict]:
    from refilled.data import Augment, TensorLoader
    from refilled.data.formats import load_images
    from refilled.data.streaming import StreamLoader, StreamSettings

    rows = []
    for size, batch, arch in ((224, 64, "wrn_16_2"), (32, 128, "wrn_16_2")):
        step = step_rate(arch, size, 3, batch if size == 32 else 16, 100, steps=2 if size == 224 else 5)
        for w in workers_list:
            data, _ = load_images("image_folder", str(root), None, in_memory=False, image_size=size,
                                  settings=StreamSettings(workers=w))
            rows.append({"data": f"JPEG folder 224->{size}", "path": "streamed", "workers": w,
                         "images/s": _rate(StreamLoader(data.images, data.labels, batch), batches),
                         "step images/s": step, "step": f"{arch} CE"})
        tic = time.perf_counter()
        data, _ = load_images("image_folder", str(root), None, in_memory=True, image_size=size)
        decode = len(data) / (time.perf_counter() - tic)
        rate = _rate(TensorLoader(data.images, data.labels, batch, augment=Augment(4, True)), batches)
        rows.append({"data": f"JPEG folder 224->{size}", "path": f"in memory (decoded once at "
                     f"{decode:.0f} images/s)", "workers": "-", "images/s": rate,
                     "step images/s": step, "step": f"{arch} CE"})
    return rows


def _peak(args: list[str]) -> dict:
    """Peak RSS (GB) of a fresh process running one epoch of a path, and of its workers."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(path: str, root: str, size: int, workers: int) -> None:
    """One epoch over the folder by one path; print the main and worker peaks as JSON."""
    from refilled.data import TensorLoader
    from refilled.data.formats import load_images
    from refilled.data.streaming import StreamLoader, StreamSettings

    torch.set_num_threads(1)
    tic = time.perf_counter()
    if path == "streamed":
        data, _ = load_images("image_folder", root, None, in_memory=False, image_size=size,
                              settings=StreamSettings(workers=workers))
        loader = StreamLoader(data.images, data.labels, 64)
    else:
        data, _ = load_images("image_folder", root, None, in_memory=True, image_size=size)
        loader = TensorLoader(data.images, data.labels, 64)
    n = sum(len(x) for x, _ in loader)
    # VmHWM (the peak resident set) starts afresh at exec, unlike ru_maxrss, which counts the
    # forking parent's pages; the persistent workers are still alive to be asked.
    iterator = getattr(getattr(loader, "_dataloader", None), "_iterator", None)
    pids = [w.pid for w in getattr(iterator, "_workers", [])]
    print(json.dumps({"images": n, "main_gb": _hwm("self"),
                      "worker_gb": max((_hwm(p) for p in pids), default=0.0),
                      "seconds": time.perf_counter() - tic}))


def _hwm(pid) -> float:
    """Peak resident set (GB) of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return 0.0


def memory_rows(sizes, image_size: int, workers: int) -> tuple[list[dict], list[str], bool]:
    rows = []
    for n in sizes:
        root = make_jpeg_folder(n)
        for path in ("streamed", "in memory"):
            peak = _peak([path, str(root), str(image_size), str(workers)])
            rows.append({"images": n, "path": path, **peak})
    stream = [r for r in rows if r["path"] == "streamed"]
    memory = [r for r in rows if r["path"] == "in memory"]
    ratio = max(stream[-1]["main_gb"] / stream[0]["main_gb"],
                stream[-1]["worker_gb"] / max(stream[0]["worker_gb"], 1e-9) if stream[0]["worker_gb"] else 1.0)
    grow = memory[-1]["main_gb"] / memory[0]["main_gb"]
    ok = ratio <= 1.3
    lines = [f"- {'PASS' if ok else 'FAIL'}: streaming {sizes[-1]} images peaks at {ratio:.2f}x the "
             f"memory of streaming {sizes[0]} (target <= 1.3x); in memory: {grow:.1f}x"]
    return rows, lines, ok


def table(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes; nothing appended to RESULTS.md")
    p.add_argument("--part", choices=("all", "throughput", "memory"), default="all",
                   help="measure one part only (nothing appended to RESULTS.md)")
    p.add_argument("--child", nargs=4, metavar=("PATH", "ROOT", "SIZE", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        path, root, size, workers = args.child
        child(path, root, int(size), int(workers))
        return 0
    torch.set_num_threads(1)
    workers = [0, 1, 2]
    batches = 5 if args.quick else 40
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    head = (f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, 1 torch thread in the training process (1 in each worker), "
            f"torch {torch.__version__}, load average {load} at start")
    text, ok = [f"## data_throughput ({head})", ""], True
    if args.part in ("all", "throughput"):
        rows = fashion_rows(workers, batches)
        folder = make_jpeg_folder(800 if args.quick else 4000)
        rows += folder_rows(folder, workers, 3 if args.quick else 20)
        for r in rows:
            r["keeps up"] = "yes" if r["images/s"] >= r["step images/s"] else "no"
        text += ["Images per second delivered to the training step (after one warm-up batch), and "
                 "the images per second of the step it feeds:", "",
                 table(rows, ["data", "path", "workers", "images/s", "step", "step images/s",
                              "keeps up"]), ""]
    if args.part in ("all", "memory"):
        sizes = (500, 5000) if args.quick else (5000, 50000)
        mem, lines, ok = memory_rows(sizes, 224 if not args.quick else 64, 2)
        text += [f"Peak memory of one epoch over a generated folder of 224x224 JPEGs read at "
                 f"{224 if not args.quick else 64} px, batch 64, 2 workers (a fresh process per row):",
                 "", table(mem, ["images", "path", "main_gb", "worker_gb", "seconds"]), "", *lines, ""]
    report = "\n".join(text)
    print(report)
    if not args.quick and args.part == "all":
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
