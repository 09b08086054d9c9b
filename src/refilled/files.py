"""The files refilled writes and reads back: atomic writes, safe reads, RNG state, run locks.

Writes go through a temporary file in the same folder and a rename, so a reader never sees a
half-written file. Reads never run code from a file: checkpoints are read with
``torch.load(weights_only=True)``, YAML with a safe loader, and every failure is one
:class:`~refilled.errors.UserError` line that names the file and what to do. :class:`RunLock`
keeps two processes (on one machine or on a shared file system) from training one run
directory at once.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import pickle
import random
import re
import socket
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from refilled.errors import UserError

# torch and numpy are imported where they are used: the lock, JSON and YAML helpers (and
# `refilled report`) do not need them.

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "write_csv",
    "tensors_digest",
    "safe_load",
    "safe_load_yaml",
    "parse_yaml",
    "read_json",
    "rng_state",
    "set_rng_state",
    "RunLock",
    "RunBusy",
]


# ------------------------------------------------------------------ writing


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder + rename: never a half-written file.

    On failure the old file (if any) is left as it was, the temporary file is removed, and the
    ``OSError`` raised names ``path`` (``err.filename``), not the temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            # name the file the caller wrote (a failed write() or fsync() names none)
            err.filename, err.filename2 = str(path), None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: Path) -> None:
    import torch

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


def tensors_digest(tensors, extra: str = "") -> str:
    """sha256 (hex) of named tensors — a state dict, or (name, tensor) pairs — in order: every
    entry's name, dtype, shape and bytes (``extra`` first). The same values give the same digest
    on any device; any change of a value, a name or an order gives another. A streamed view of
    images (anything with a ``digest()``) enters by its own fingerprint, no image read."""
    import hashlib

    import torch

    digest = hashlib.sha256(extra.encode())
    items = tensors.items() if hasattr(tensors, "items") else tensors
    for key, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{key}\0{tensor.digest()}\0".encode())
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ reading


def _oneline(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _with_hint(message: str, hint: str | None, default: str) -> str:
    return f"{message}; {hint or default}"


def _os_error(err: OSError, path: Path, what: str, hint: str | None) -> UserError:
    """One line for a file that cannot be opened or read."""
    if isinstance(err, FileNotFoundError):
        return UserError(_with_hint(f"{what} '{path}' does not exist", hint, "check the path"))
    if isinstance(err, IsADirectoryError):
        return UserError(_with_hint(f"{what} '{path}' is a directory, not a file", hint,
                                    "give the path of the file"))
    return UserError(_with_hint(f"cannot read {what} '{path}' ({err.strerror or err})", hint,
                                "check the path and its permissions"))


def _read_bytes(path: Path, what: str, hint: str | None) -> bytes:
    """The bytes of ``path``, or a one-line UserError for a missing / unreadable file."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise _os_error(err, path, what, hint) from None


def safe_load(path, what: str = "checkpoint", *, hint: str | None = None):
    """``torch.load(path, map_location="cpu", weights_only=True)``; never runs code from the file.

    Any failure is one :class:`UserError` line naming ``path`` (called ``what`` in the
    message): missing, a directory, unreadable, empty, not a torch file / truncated / corrupt,
    or holding Python objects that only unsafe unpickling could rebuild (a ``__reduce__``
    payload, a class, a numpy array). ``hint`` (what the user should do, e.g. "delete it to
    restart that stage") ends the message; without one a generic suggestion does.
    """
    import torch

    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        empty = path.stat().st_size == 0
    except OSError as err:
        raise _os_error(err, path, what, hint) from None
    if empty:
        raise UserError(_with_hint(f"{what} '{path}' is empty (an interrupted copy or write?)", hint,
                                   "delete it or replace it with a good copy"))
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not for the user
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise _os_error(err, path, what, hint) from None
    except Exception as err:  # noqa: BLE001 - whatever the file holds, one line about it
        text = str(err)
        unsafe = re.search(r"GLOBAL ([\w.]+)", text) if isinstance(err, pickle.UnpicklingError) else None
        if unsafe:
            message = (
                f"{what} '{path}' holds Python objects that would need unsafe unpickling "
                f"({unsafe.group(1)}); refilled never runs code from a file: re-create it with "
                "refilled, or save only tensors, numbers, strings, lists and dicts"
            )
            raise UserError(message + (f"; {hint}" if hint else "")) from None
        if isinstance(err, pickle.UnpicklingError):
            reason = "not a torch file"
        elif "zip archive" in text or "central directory" in text:
            reason = "truncated or corrupt zip archive"
        elif isinstance(err, EOFError):
            reason = "truncated"
        else:
            reason = _oneline(f"{type(err).__name__}: {text}", 120)
        raise UserError(_with_hint(f"{what} '{path}' is not a readable torch file ({reason})", hint,
                                   "delete it or replace it with a good copy")) from None


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the safe loader reports it
                    continue
                if first is not None:
                    raise _DuplicateKey(
                        None, None, f"key '{key}' is given twice (first on line {first})",
                        key_node.start_mark,
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads '1e-3' as a string; read exponent numbers as floats, as YAML 1.2 does,
# so that a number is a number whatever the entry (file, override or Python keyword).
_StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str, *, advice: str = "fix that line"):
    """YAML ``text`` (safe tags only, no duplicate keys) -> Python data.

    A syntax error is one :class:`UserError` line naming ``source`` (e.g. ``config file
    'x.yaml'``) with the line and column of the problem, ending with ``advice``.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        if isinstance(err, _DuplicateKey):
            raise UserError(f"{source}{where}: {problem}; keep one of them") from None
        context = getattr(err, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise UserError(f"{source}{where}: not valid YAML ({_oneline(detail)}); {advice}") from None


def safe_load_yaml(path, what: str = "file", *, hint: str | None = None) -> dict:
    """A YAML file holding a mapping (an empty file gives ``{}``), read with :func:`parse_yaml`.

    One :class:`UserError` line naming ``path`` when it is missing, a directory, unreadable,
    not UTF-8, not valid YAML (with line and column), has a key twice, or is not a mapping.
    """
    path = Path(path)
    source = f"{what} '{path}'"
    raw = _read_bytes(path, what, hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(_with_hint(f"{source} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line})",
                                   hint, "save it as UTF-8")) from None
    try:
        data = parse_yaml(text, source)
    except UserError as err:
        raise UserError(f"{err}; {hint}" if hint else str(err)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(_with_hint(f"{source} must hold a mapping of keys to values, got a "
                                   f"{type(data).__name__}", hint, "write it as 'key: value' lines"))
    return data


def read_json(path, what: str = "file", *, hint: str | None = None) -> dict:
    """A JSON file holding an object, or one :class:`UserError` line naming ``path`` (missing,
    a directory, unreadable, not UTF-8, not valid JSON with line and column, not an object)."""
    path = Path(path)
    raw = _read_bytes(path, what, hint)
    default = "delete it or replace it with a good copy"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(_with_hint(f"{what} '{path}' is not UTF-8 text", hint, default)) from None
    except json.JSONDecodeError as err:
        raise UserError(_with_hint(
            f"{what} '{path}' is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
            hint, default)) from None
    except RecursionError:
        raise UserError(_with_hint(f"{what} '{path}' is not valid JSON (nested too deeply)", hint,
                                   default)) from None
    if not isinstance(data, dict):
        raise UserError(_with_hint(f"{what} '{path}' must hold a JSON object, got "
                                   f"{type(data).__name__ if data is not None else 'null'}", hint, default))
    return data


# ------------------------------------------------------------------ RNG state as plain data


def rng_state() -> dict:
    """The state of Python's ``random``, numpy's global RNG, torch's CPU RNG (and every CUDA
    device's, when there are any) as tensors, ints, floats and strings only, so that a
    checkpoint holding it loads with ``weights_only=True`` (:func:`safe_load`)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned; CUDA states only when CUDA is available.

    Raises ``ValueError`` for a state of another shape (the caller names the file)."""
    import numpy as np
    import torch

    try:
        py, npy = state["python"], state["numpy"]
        python_state = (int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"])
        numpy_state = (str(npy["kind"]), npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                       int(npy["has_gauss"]), float(npy["gauss"]))
        torch_state = state["torch"]
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8):
            raise TypeError("torch state is not a uint8 tensor")
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"not an RNG state saved by refilled ({type(err).__name__}: {err})") from None
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------ one process per run directory


_HELD: dict[str, int] = {}  # token -> pid of the locks held here (a forked child holds none)


def _held_here(token) -> bool:
    return _HELD.get(token) == os.getpid()


class RunBusy(UserError):
    """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, already dead, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    try:  # Linux: a killed process its parent has not reaped yet
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True


class RunLock:
    """Hold ``run_dir/.lock`` while training, so that one run directory is trained by one process.

    The lock is a file created atomically (``O_CREAT | O_EXCL``) holding JSON
    ``{host, pid, started, heartbeat, token}``; a daemon thread rewrites it every ``heartbeat``
    seconds while it is held (the token and the file's identity tell the holder it still owns
    it); leaving the ``with`` block (normally, by an exception or KeyboardInterrupt) removes it.

    A lock is *stale* when it names this host and a process id that no longer exists (or this
    very process, which does not hold it: a restarted container), or, for a lock of another host
    (whose process cannot be checked), when its last heartbeat (the later of the JSON field and
    the file's mtime) is older than ``stale_after`` seconds. A lock file that
    cannot be parsed (being written right now, or left empty by a crash) is stale once its mtime
    is older than ``min(stale_after, 30)`` seconds. A stale lock is taken over: the taker first
    wins a token file named after the stale lock's token (``O_EXCL``: one winner per stale
    lock), renames the stale file away, checks that what it renamed is the lock it judged stale
    (and puts it back otherwise), then creates its own lock like anyone else.

    When the lock is busy: ``wait=True`` calls ``on_wait(message)`` once (a one-line message
    naming the directory and the holder) and polls every ``poll`` seconds until it is free;
    ``wait=False`` raises :class:`RunBusy`. ``lost`` becomes True if the heartbeat finds the lock
    file replaced by another process's (only after this process was judged stale).
    """

    NAME = ".lock"

    def __init__(self, run_dir, *, wait: bool = True, poll: float = 2.0, stale_after: float = 600.0,
                 heartbeat: float = 30.0, on_wait: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self.wait, self.poll, self.stale_after, self.heartbeat = wait, poll, stale_after, heartbeat
        self.on_wait = on_wait
        self.host = socket.gethostname()
        self.token: str | None = None
        self.lost = False
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._started = 0.0
        self._took_over: Path | None = None  # the token file of the stale lock this one replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the with statement
    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the file's content
    def _record(self) -> bytes:
        return json.dumps({"host": self.host, "pid": os.getpid(), "started": round(self._started, 3),
                           "heartbeat": round(time.time(), 3), "token": self.token}).encode()

    def _read(self) -> tuple[dict | None, os.stat_result] | None:
        """(parsed content or None when unparsable, stat) of the lock file; None if absent."""
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read(4096)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw.decode())
            if not isinstance(info, dict):
                info = None
        except (UnicodeDecodeError, ValueError):
            info = None
        return info, st

    def _is_stale(self, info: dict | None, st: os.stat_result) -> bool:
        now = time.time()
        if info is None:
            return now - st.st_mtime > min(self.stale_after, 30.0)
        try:
            last = max(float(info.get("heartbeat") or 0), st.st_mtime)
            pid = int(info.get("pid"))
        except (TypeError, ValueError):
            return now - st.st_mtime > min(self.stale_after, 30.0)
        if info.get("host") == self.host:
            # our own pid on a lock this process does not hold: left by an earlier process that
            # had the same pid (a restarted container)
            return not _pid_alive(pid) or (pid == os.getpid() and not _held_here(info.get("token")))
        return now - last > self.stale_after

    def _describe(self, info: dict | None, st: os.stat_result) -> str:
        if info is None:
            return "another process (its lock file is being written or is damaged)"
        started = info.get("started")
        since = ""
        if isinstance(started, (int, float)):
            since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
        try:
            age = time.time() - max(float(info.get("heartbeat") or 0), st.st_mtime)
            beat = f", last heartbeat {max(age, 0):.0f} s ago"
        except (TypeError, ValueError):
            beat = ""
        return f"process {info.get('pid')} on host {info.get('host')}{since}{beat}"

    # -- taking and giving back
    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        try:
            st = os.fstat(fd)
            os.write(fd, self._record())
            os.fsync(fd)
        except BaseException:  # never leave an empty lock behind
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        _HELD[self.token] = os.getpid()
        return True

    def _take_over(self, info: dict | None, st: os.stat_result) -> None:
        """Remove the stale lock judged from (info, st), unless someone else is doing it."""
        stale_id = str(info.get("token")) if info and info.get("token") else f"{st.st_ino}-{st.st_mtime_ns}"
        stale_id = re.sub(r"[^\w.-]", "_", stale_id)[:80]
        token_file = self.run_dir / f"{self.NAME}.takeover.{stale_id}"
        try:
            os.close(os.open(token_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return  # another process is taking this one over; look again
        aside = self.run_dir / f"{self.NAME}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            token_file.unlink(missing_ok=True)
            return
        moved = os.stat(aside)
        if (moved.st_ino, moved.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            # not the file judged stale (it was replaced in between): put it back
            try:
                os.link(aside, self.path)
            except OSError:
                if not self.path.exists():
                    os.rename(aside, self.path)
            aside.unlink(missing_ok=True)
            token_file.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self._took_over = token_file

    def _clean_token_files(self) -> None:
        """Token files of finished takeovers whose taker died are litter once old."""
        now = time.time()
        for path in self.run_dir.glob(f"{self.NAME}.takeover.*"):
            try:
                if now - path.stat().st_mtime > self.stale_after:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"RunLock on '{self.run_dir}' is already held")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run directory '{self.run_dir}' "
                            f"({err.strerror or err}); choose another out_dir") from None
        self.token = uuid.uuid4().hex
        self._started = time.time()
        self.lost = False
        self._clean_token_files()
        try:
            self._wait_for_lock()
        except BaseException:
            if self._took_over is not None:
                self._took_over.unlink(missing_ok=True)
                self._took_over = None
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"RunLock {self.run_dir}", daemon=True)
        self._thread.start()

    def _wait_for_lock(self) -> None:
        told = False
        while True:
            try:
                if self._try_create():
                    return
                seen = self._read()
            except OSError as err:
                raise UserError(f"cannot create the lock file '{self.path}' ({err.strerror or err}); "
                                "choose another out_dir") from None
            if seen is None:
                continue  # released just now: try again at once
            info, st = seen
            if info and _held_here(info.get("token")):
                raise RuntimeError(f"this process already holds the lock of '{self.run_dir}'")
            if self._is_stale(info, st):
                try:
                    self._take_over(info, st)
                except OSError:
                    pass  # raced with another taker; look again
                continue
            holder = self._describe(info, st)
            if not self.wait:
                raise RunBusy(
                    f"run directory '{self.run_dir}' is in use by {holder}; wait for that run to "
                    f"finish or stop it (if it is no longer running, delete '{self.path}')"
                )
            if not told and self.on_wait is not None:
                self.on_wait(f"run directory '{self.run_dir}' is in use by {holder}; "
                             "waiting for it to finish (Ctrl-C to stop)")
                told = True
            time.sleep(self.poll)

    def _owned(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ino

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if not self._owned():
                    self.lost = True
                    return
                record = self._record()
                os.pwrite(self._fd, record, 0)
                os.ftruncate(self._fd, len(record))
                os.fsync(self._fd)
            except (OSError, TypeError):  # closed under us by release(): stop
                return

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            if self._owned():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
            _HELD.pop(self.token, None)
            if self._took_over is not None:
                self._took_over.unlink(missing_ok=True)
                self._took_over = None
