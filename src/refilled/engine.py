"""The one training loop, its checkpoints, and evaluation helpers.

``train_stage`` runs one stage (teacher pre-training, stage 1, stage 2, or a baseline) for a
method object (see :mod:`refilled.methods`): it owns the optimiser, the schedule, progress,
metrics, non-finite detection and checkpoint/resume. A stage's checkpoint is written after every
epoch, atomically; re-running resumes after the last finished epoch, and a finished stage is
not redone.
"""

from __future__ import annotations

import csv
import io
import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from refilled.config import OptimConfig
from refilled.errors import UserError
from refilled.ncm import ncm_accuracy


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------ files


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder + rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write dict rows as CSV, atomically; the columns are the union of the rows' keys."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


# ------------------------------------------------------------------ devices and seeds


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but no CUDA device is available; use device=cpu")
    return device


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated in rank order along dim 0 (same size per rank).

        Gradients flow back to each rank's own slice (the gather is differentiable).
        """
        if self.world == 1:
            return tensor
        if tensor.requires_grad:
            from torch.distributed.nn.functional import all_gather

            return torch.cat(all_gather(tensor))
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ optimisation


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def make_scheduler(optimizer, cfg: OptimConfig):
    """Per-epoch schedule: cosine to final_lr_ratio * lr, step decay, or constant."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * cfg.final_lr_ratio
        )
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean, std, device, batch_size: int = 512):
    """Embeddings and logits of uint8 images, in eval mode, no augmentation: (N, D), (N, C)."""
    was_training = model.training
    model.eval()
    mean = torch.as_tensor(mean, device=device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, device=device).reshape(1, -1, 1, 1)
    embs, logits = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255.0)
        z = model.forward_features((x - mean) / std)
        embs.append(z.float())
        logits.append(model.forward_head(z).float())
    model.train(was_training)
    if not embs:
        return torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
    return torch.cat(embs), torch.cat(logits)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()


def ncm_eval(model, train_images, train_labels, eval_images, eval_labels, mean, std, device) -> float:
    """Stage-1 quality: class means of normalised training embeddings, cosine NCM elsewhere."""
    train_emb, _ = predict(model, train_images, mean, std, device)
    eval_emb, _ = predict(model, eval_images, mean, std, device)
    num_classes = int(train_labels.max()) + 1
    return ncm_accuracy(train_emb, train_labels.to(device), eval_emb, eval_labels.to(device), num_classes)


# ------------------------------------------------------------------ the loop


def load_checkpoint(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise UserError(
            f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err}); "
            "delete it to restart that stage, or point to another file"
        ) from None


def train_stage(
    stage: str,
    method,
    loader,
    cfg: OptimConfig,
    run_dir: Path,
    *,
    seed: int,
    validate: Callable[[], dict] | None = None,
    eval_every: int = 1,
    progress: bool = True,
    extra_state: dict | None = None,
    earlier_rows: list[dict] = (),
    dist: Dist = Dist(),
    amp: bool = False,
) -> list[dict]:
    """Train ``method`` for ``cfg.epochs`` epochs; resume from ``run_dir/<stage>.ckpt``.

    ``method`` provides ``step(x, y, epoch) -> dict of named scalar losses`` (summed for the
    update), ``parameters_to_train()``, ``state_dict()`` / ``load_state_dict()`` and ``train()``.
    ``validate()`` returns a dict of metrics (computed every ``eval_every`` epochs and at the
    end). After every epoch, ``run_dir/metrics.csv`` is rewritten with ``earlier_rows`` (the
    finished stages' rows) followed by this stage's. Returns the per-epoch rows of this stage.

    Under torchrun (``dist.world > 1``) the method is wrapped in DistributedDataParallel (the
    frozen teacher is not part of it), each rank trains on its share of every global batch,
    logged losses are averaged over ranks, and only rank 0 validates and writes files.
    ``amp`` runs the step under bf16 autocast on CUDA (a no-op elsewhere).
    """
    ckpt_path = run_dir / f"{stage}.ckpt"
    optimizer = make_optimizer(method.parameters_to_train(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    history: list[dict] = []
    start_epoch = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        set_rng_state(ckpt["rng"])
        if start_epoch >= cfg.epochs:
            return history
    device = next(method.parameters_to_train()).device if cfg.epochs else torch.device("cpu")
    model = method
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(method, device_ids=[device] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    steps = len(loader)
    for epoch in range(start_epoch, cfg.epochs):
        # Every epoch's randomness derives from (seed, stage, epoch): resuming is exact.
        torch.manual_seed(zlib.crc32(f"{seed}/{stage}/{epoch}".encode()))
        loader.set_epoch(epoch)
        method.train()
        tic = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        bar = tqdm(loader, total=steps, desc=f"{stage} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            with autocast:
                losses = model(x, y, epoch)  # Method.forward is its step
                total = sum(v for k, v in losses.items() if not k.startswith("_"))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            # Accumulated on the device; read once per epoch (no host sync per step).
            finite = torch.isfinite(total.detach())
            first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
            for key, value in {"loss": total, **losses}.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
        if dist.world > 1:  # every rank stops together; logged values are rank averages
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MAX)
            for value in sums.values():
                torch.distributed.all_reduce(value)
                value /= dist.world
        bad = int(first_bad)
        if bad >= 0:
            raise TrainingDiverged(
                f"{stage}: the loss became NaN or infinite at epoch {epoch + 1}, step {bad + 1}; "
                f"the last good checkpoint ({ckpt_path.name}, {epoch} epochs done) is kept. "
                "Lower the learning rate or the loss weights and run the command again"
            )
        scheduler.step()
        row = {"stage": stage, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row.update({k.lstrip("_"): round(float(v) / max(steps, 1), 6) for k, v in sums.items()})
        row["steps"] = steps
        row["seconds"] = round(time.perf_counter() - tic, 3)
        evaluated = validate is not None and dist.is_main and (
            (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs
        )
        if evaluated:
            row.update(validate())
        history.append(row)
        if not dist.is_main:
            continue
        atomic_torch_save(
            {
                "stage": stage, "epoch": epoch + 1, "history": history,
                "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), **(extra_state or {}),
            },
            ckpt_path,
        )
        # the whole file, from the rows kept in the checkpoints
        write_csv(run_dir / "metrics.csv", [*earlier_rows, *history])
        if progress and evaluated:
            shown = {k: v for k, v in row.items() if k not in ("stage", "epoch", "seconds")}
            tqdm.write(f"{stage} epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            ))
    return history
