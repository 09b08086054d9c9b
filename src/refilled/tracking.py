"""Experiment tracking beside ``metrics.csv``: TensorBoard, opt-in (``log.tensorboard: true``,
``distill(..., tensorboard=DIR)``).

One scalar per number of an epoch's row (:func:`refilled.engine.train_stage`): the losses and the
learning rate as ``<stage>/<name>``, validation figures as ``val/<name>`` (``val/accuracy`` of the
classifier, ``val/ncm_accuracy`` of stage 1's nearest-class-mean classifier on the embedding).
The step is the epoch's index across the stages, so stage 2 continues where stage 1 ended.

A resumed run continues the same log: the writer opens at the first epoch it is given with
TensorBoard's ``purge_step`` there, so what an interrupted run logged from that epoch on (an epoch
logged but never checkpointed) is discarded by TensorBoard's reader instead of shown twice; epochs
that a checkpoint holds are never logged again. Every epoch is flushed to disk when logged.
"""

from __future__ import annotations

from pathlib import Path

from refilled.errors import UserError

SKIPPED = ("stage", "epoch", "steps")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or one line saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("TensorBoard logging (log.tensorboard / tensorboard=) needs the "
                        "'tensorboard' package, which is not installed: pip install tensorboard "
                        "(or pip install 'refilled[export]')") from None
    return SummaryWriter


def scalar_tag(stage: str, key: str) -> str:
    """The TensorBoard tag of a row's entry: ``val/accuracy``, ``stage1/loss``, ``train/lr``."""
    if key.startswith("val_"):
        return f"val/{key.removeprefix('val_')}"
    return f"{stage}/{key}"


class TensorBoardLog:
    """A callable for ``train_stage(on_epoch=...)`` writing each row under ``log_dir``.

    The package is checked when the log is made (before anything trains); the event file is
    opened at the first row, so a run that has nothing left to train writes nothing.
    """

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._writer_class = summary_writer_class()
        self.writer = None

    def __call__(self, row: dict, step: int) -> None:
        if self.writer is None:
            self.writer = self._writer_class(str(self.log_dir), purge_step=step)
        stage = str(row.get("stage", "train"))
        for key, value in row.items():
            if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(scalar_tag(stage, key), float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_log(folder: str | Path | None, enabled: bool, run_dir: str | Path | None):
    """The log of a :func:`refilled.distill` call: ``folder`` (``tensorboard=``) if given, else
    ``run_dir/tensorboard`` when ``enabled`` (``log.tensorboard``), else None."""
    if folder is None and enabled:
        if run_dir is None:
            raise UserError("log.tensorboard is on but there is no run directory to log under; "
                            "pass run_dir= or tensorboard=FOLDER")
        folder = Path(run_dir) / "tensorboard"
    return None if folder is None else TensorBoardLog(folder)
