"""The one training loop.

``train_stage`` runs one stage (teacher pre-training, stage 1, stage 2, or a baseline) for a
method object (see :mod:`refilled.methods`): it owns the optimiser, the schedule, progress,
metrics, non-finite detection and checkpoint/resume. A stage's checkpoint is written after every
epoch, atomically; re-running resumes after the last finished epoch, and a finished stage is
not redone. Checkpoints hold tensors and plain data only and are read with ``weights_only``.
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from refilled.config import OptimConfig, spell, say
from refilled.errors import TrainingDiverged, UserError
from refilled.files import atomic_torch_save, rng_state, safe_load, set_rng_state
from refilled.runtime import Dist

__all__ = ["TrainingDiverged", "load_stage_checkpoint", "make_optimizer", "make_scheduler", "train_stage"]


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


# ------------------------------------------------------------------ the loop


def load_stage_checkpoint(path: Path) -> dict:
    """A stage checkpoint, safely; one line naming the file when it is unreadable or foreign."""
    hint = "delete it to restart that stage, or point to another file"
    ckpt = safe_load(path, what="checkpoint", hint=hint)
    keys = ("method", "optimizer", "scheduler", "epoch", "history", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        raise UserError(f"checkpoint '{path}' is not a refilled stage checkpoint (no "
                        f"{'/'.join(keys)} inside); {hint}")
    return ckpt


def _buffers_can_change(module: nn.Module) -> bool:
    """Whether a training step can move a buffer (a BN layer with running statistics that is
    in training mode); DDP need not broadcast buffers otherwise."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
               for m in module.modules())


def train_stage(
    stage: str,
    method,
    loader,
    cfg: OptimConfig,
    run,
    *,
    seed: int,
    validate: Callable[[], dict] | None = None,
    eval_every: int = 1,
    progress: bool = True,
    extra_state: dict | None = None,
    earlier_rows: list[dict] = (),
    dist: Dist = Dist(),
    amp: bool = False,
    lr_key: str = "train.lr",
    on_epoch: Callable[[dict, int], None] | None = None,
) -> list[dict]:
    """Train ``method`` for ``cfg.epochs`` epochs; resume from the run directory's
    ``<stage>.ckpt``.

    ``method`` provides ``step(x, y, epoch) -> dict of named scalar losses`` (summed for the
    update), ``parameters_to_train()``, ``state_dict()`` / ``load_state_dict()`` and ``train()``.
    ``validate()`` returns a dict of metrics (computed every ``eval_every`` epochs and at the
    end). After every epoch, the run's ``metrics.csv`` is rewritten with ``earlier_rows`` (the
    finished stages' rows) followed by this stage's. Returns the per-epoch rows of this stage.
    ``run`` is the run directory (:class:`refilled.runs.RunDir`: its ``checkpoint(stage)`` path
    and ``write_metrics(rows)``); with ``run=None`` nothing is written and nothing resumed.

    Under torchrun (``dist.world > 1``) the method is wrapped in DistributedDataParallel (the
    frozen teacher is not part of it), each rank trains on its share of every global batch,
    logged losses are averaged over ranks, every rank validates (on its share of the split), and
    only rank 0 writes files.
    ``amp`` runs the step under bf16 autocast on CUDA (a no-op elsewhere). ``lr_key`` is the
    config key of this stage's learning rate (for the message when the loss diverges).
    ``on_epoch(row, step)`` (rank 0) gets every finished epoch's row before its checkpoint is
    written, with ``step`` = the epoch's index across stages (``len(earlier_rows) + epoch``,
    from 1): a logger that opens at the first step it is given after a resume overwrites
    whatever an interrupted run logged from there on (e.g. TensorBoard's ``purge_step``).
    """
    ckpt_path = run.checkpoint(stage) if run is not None else None
    optimizer = make_optimizer(method.parameters_to_train(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    history: list[dict] = []
    start_epoch = 0
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = load_stage_checkpoint(ckpt_path)
        try:
            method.load_state_dict(ckpt["method"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"checkpoint '{ckpt_path}' was written for another model or method "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); delete it "
                            "to restart that stage") from None
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        set_rng_state(ckpt["rng"])
        if start_epoch >= cfg.epochs:
            return history
    device = next(method.parameters_to_train()).device if cfg.epochs else torch.device("cpu")
    model = method
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        method.train()
        model = DistributedDataParallel(method, device_ids=[device] if device.type == "cuda" else None,
                                        broadcast_buffers=_buffers_can_change(method))
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
            what = (f"{stage}: the loss became NaN or infinite at epoch {epoch + 1}, step {bad + 1}; "
                    f"lower the learning rate ({spell(lr_key)}) or the loss weights")
            if ckpt_path is not None:
                again = say("run the same command again to resume from it",
                            "call again with the same run_dir= to resume from it")
                what += (f"; the last good checkpoint ({ckpt_path.name}, {epoch} epochs done) is "
                         f"kept: {again}")
            raise TrainingDiverged(what)
        scheduler.step()
        row = {"stage": stage, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row.update({k.lstrip("_"): round(float(v) / max(steps, 1), 6) for k, v in sums.items()})
        row["steps"] = steps
        row["seconds"] = round(time.perf_counter() - tic, 3)
        # Every rank validates (each embeds its share), so none waits alone in a collective.
        evaluated = validate is not None and (
            (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs
        )
        if evaluated:
            row.update(validate())
        history.append(row)
        if on_epoch is not None and dist.is_main:
            on_epoch(row, len(earlier_rows) + epoch + 1)
        if not dist.is_main or run is None:
            if progress and evaluated and dist.is_main:
                _show(stage, epoch, cfg.epochs, row)
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
        run.write_metrics([*earlier_rows, *history])
        if progress and evaluated:
            _show(stage, epoch, cfg.epochs, row)
    return history


def _show(stage: str, epoch: int, epochs: int, row: dict) -> None:
    shown = {k: v for k, v in row.items() if k not in ("stage", "epoch", "seconds")}
    tqdm.write(f"{stage} epoch {epoch + 1}/{epochs}: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
    ), file=sys.stderr)  # stdout carries the results only
