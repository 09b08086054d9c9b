"""Files: atomic writes, safe loading (never runs code from a file), RNG states as plain data."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from refilled.errors import UserError

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


def safe_load(path: Path, what: str = "checkpoint", hint: str | None = None):
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, never code."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"{what} '{path}' holds Python objects that would need unsafe "
                            f"unpickling; refilled never runs code from a file{suffix}") from None
        raise UserError(f"{what} '{path}' cannot be read ({type(err).__name__}: {text}){suffix}") from None


def safe_load_yaml(path: Path, what: str = "YAML file") -> dict:
    """A YAML mapping read back from a file refilled wrote; one line on any failure."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{what} '{path}' cannot be read ({type(err).__name__}); delete it or "
                        "restore it") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' does not hold a mapping; delete it or restore it")
    return data


def read_json(path: Path, what: str = "file") -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' does not hold a JSON object")
    return data


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
