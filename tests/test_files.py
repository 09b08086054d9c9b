"""refilled.files: atomic writes, reads that never run code, RNG state as data, run locks."""

import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from refilled.errors import UserError
from refilled.files import (
    RunBusy,
    RunLock,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    rng_state,
    safe_load,
    safe_load_yaml,
    set_rng_state,
    write_csv,
)

# ------------------------------------------------------------------ writing


def test_atomic_write_replaces_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "old")
    assert path.read_text() == "old"

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b"new")
    assert info.value.filename == str(path)  # the file the caller wrote, not the temp file
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_write_csv_takes_the_union_of_columns(tmp_path):
    write_csv(tmp_path / "m.csv", [{"a": 1}, {"a": 2, "b": 3}])
    assert (tmp_path / "m.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]


# ------------------------------------------------------------------ safe_load


class Payload:
    """Unpickling this runs code: it creates ``marker`` (the test checks it never appears)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write_payload(path: Path, kind: str, marker: Path) -> None:
    obj = {"weights": torch.ones(2), "evil": Payload(marker)}
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle2":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def test_the_payload_is_real(tmp_path):
    """Sanity check: plain unpickling does run the payload."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle2", "pickle"])
def test_safe_load_never_runs_code_from_a_file(tmp_path, kind):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    _write_payload(path, kind, marker)
    with pytest.raises(UserError) as info:
        safe_load(path, "checkpoint", hint="delete it to restart that stage")
    message = str(info.value)
    assert not marker.exists(), "code from the file ran"
    assert f"checkpoint '{path}'" in message and "\n" not in message
    assert message.endswith("; delete it to restart that stage")
    if kind in ("zip", "legacy", "pickle2"):
        assert "would need unsafe unpickling" in message and "never runs code from a file" in message
    else:  # a protocol-4 pickle is not something torch.load reads
        assert "not a readable torch file" in message


def test_safe_load_reads_plain_checkpoints(tmp_path):
    obj = {"w": torch.arange(3.0), "epoch": 2, "history": [{"loss": 0.5}], "name": "x", "t": (1, None)}
    atomic_torch_save(obj, tmp_path / "c.pt")
    back = safe_load(tmp_path / "c.pt")
    assert torch.equal(back["w"], obj["w"]) and back["history"] == obj["history"] and back["t"] == (1, None)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(os.urandom(500)), "not a readable torch file"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(100)), "not a readable torch file"),
        (lambda p: None, "does not exist"),
        (lambda p: torch.save({"a": np.zeros(3)}, p), "would need unsafe unpickling (numpy"),
    ],
    ids=["directory", "empty", "random", "fake-zip", "missing", "numpy"],
)
def test_safe_load_failures_are_one_line(tmp_path, make, expected):
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(UserError) as info:
        safe_load(path, "teacher checkpoint")
    message = str(info.value)
    assert expected in message and f"teacher checkpoint '{path}'" in message and "\n" not in message


def test_safe_load_truncated(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="not a readable torch file .*corrupt"):
        safe_load(path)


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    path = tmp_path / "c.pt"
    torch.save({}, path)
    path.chmod(0)
    with pytest.raises(UserError, match="cannot read checkpoint .*Permission denied"):
        safe_load(path)


# ------------------------------------------------------------------ YAML and JSON


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"a: 1\nb: \xff\xfe\n", "is not UTF-8 text (byte 0xff on line 2)"),
        (b"a: 1\nb: [1, 2\n", "line 3, column 1: not valid YAML"),
        (b"train:\n  lr: 1\n  lr: 2\n", "line 3, column 3: key 'lr' is given twice (first on line 2)"),
        (b"- 1\n- 2\n", "must hold a mapping of keys to values, got a list"),
        (b"a: !!python/object/apply:os.system ['touch x']\n", "not valid YAML"),
    ],
)
def test_safe_load_yaml_errors(tmp_path, content, expected):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        safe_load_yaml(path, "saved config")
    assert expected in str(info.value) and f"saved config '{path}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_safe_load_yaml_reads_mappings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert safe_load_yaml(path) == {}
    path.write_text("base: &b {lr: 1}\nother:\n  <<: *b\n  lr: 2\n")  # a merge key may be overridden
    assert safe_load_yaml(path) == {"base": {"lr": 1}, "other": {"lr": 2}}
    with pytest.raises(UserError, match="does not exist"):
        safe_load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a directory"):
        safe_load_yaml(tmp_path)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b'{"a": 1,', "is not valid JSON (line 1, column 9"),
        (b"[1, 2]", "must hold a JSON object, got list"),
        (b"null", "got null"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_read_json_errors(tmp_path, content, expected):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_json(path, "results file", hint="move it away")
    assert expected in str(info.value) and str(info.value).endswith("; move it away")
    assert f"results file '{path}'" in str(info.value)


def test_read_json(tmp_path):
    (tmp_path / "r.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "r.json") == {"a": [1, 2]}
    with pytest.raises(UserError, match="does not exist"):
        read_json(tmp_path / "nope.json")


# ------------------------------------------------------------------ RNG state


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
            torch.rand(3).tolist())


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both Python's and numpy's state
    np.random.normal()
    atomic_torch_save({"rng": rng_state()}, tmp_path / "c.pt")
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(safe_load(tmp_path / "c.pt")["rng"])
    assert _draws() == expected


def test_set_rng_state_refuses_other_shapes():
    with pytest.raises(ValueError, match="not an RNG state"):
        set_rng_state({"python": random.getstate()})


# ------------------------------------------------------------------ RunLock

HOLDER = textwrap.dedent("""
    import os, sys, time
    from refilled.files import RunLock
    run_dir, log, hold, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    while not os.path.exists(go):
        time.sleep(0.005)
    with RunLock(run_dir, poll=0.01, stale_after=2.0, heartbeat=0.05):
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\\n")
        print("locked", flush=True)
        time.sleep(hold)
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\\n")
""")


def _holders(tmp_path, n, hold):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run"), str(tmp_path / "log"),
                               str(hold), str(go)], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return procs, go


def _assert_exclusive(log: Path, n: int):
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 2 * n
    for enter, leave in zip(events[0::2], events[1::2]):  # in A, out A, in B, out B, ...
        assert enter[0] == "in" and leave[0] == "out" and enter[1] == leave[1], events


def test_two_processes_never_hold_one_run_directory(tmp_path):
    procs, go = _holders(tmp_path, 3, hold=0.2)
    go.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    _assert_exclusive(tmp_path / "log", 3)
    assert not (tmp_path / "run" / ".lock").exists()


def _write_lock(run_dir: Path, *, host, pid, age):
    run_dir.mkdir(parents=True, exist_ok=True)
    then = time.time() - age
    path = run_dir / ".lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "started": then, "heartbeat": then, "token": "old"}))
    os.utime(path, (then, then))
    return path


def test_stale_lock_raced_by_several_processes_is_taken_over_by_one_at_a_time(tmp_path):
    _write_lock(tmp_path / "run", host="elsewhere", pid=1, age=3600)
    procs, go = _holders(tmp_path, 3, hold=0.2)
    go.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    _assert_exclusive(tmp_path / "log", 3)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no lock, no litter


def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path):
    procs, go = _holders(tmp_path, 1, hold=60)
    go.touch()
    proc = procs[0]
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusy, match=f"in use by process {proc.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path / "run", wait=False).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
    assert (tmp_path / "run" / ".lock").exists()
    try:  # taken over even before the killed process is reaped (a zombie is dead)
        with RunLock(tmp_path / "run", poll=0.01) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
            assert proc.poll() is None or proc.returncode == -signal.SIGKILL
    finally:
        proc.wait()
    assert not (tmp_path / "run" / ".lock").exists()


def test_busy_lock_wait_false_message_and_wait_true_waits(tmp_path):
    run_dir = tmp_path / "run"
    procs, go = _holders(tmp_path, 1, hold=0.5)
    go.touch()
    proc = procs[0]
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunBusy) as info:
        RunLock(run_dir, wait=False).acquire()
    message = str(info.value)
    assert f"run directory '{run_dir}' is in use by process {proc.pid}" in message
    assert "wait for that run to finish" in message and "\n" not in message
    told = []
    with RunLock(run_dir, poll=0.02, on_wait=told.append):
        assert f"out {proc.pid}" in (tmp_path / "log").read_text()  # it waited for the holder
    assert len(told) == 1 and "waiting for it to finish" in told[0] and str(proc.pid) in told[0]
    proc.wait()


def test_other_hosts_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, host="elsewhere", pid=1, age=5)
    with pytest.raises(RunBusy, match="process 1 on host elsewhere"):
        RunLock(run_dir, wait=False, stale_after=60).acquire()
    with RunLock(run_dir, wait=False, stale_after=2) as lock:
        assert json.loads(lock.path.read_text())["host"] == socket.gethostname()


def test_a_lock_left_with_this_process_pid_is_stale(tmp_path):
    """A restarted container gets the same host name and often the same pid."""
    _write_lock(tmp_path / "run", host=socket.gethostname(), pid=os.getpid(), age=1)
    with RunLock(tmp_path / "run", wait=False):
        pass


def test_lock_is_released_on_exceptions_and_heartbeats(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with RunLock(run_dir, heartbeat=0.02) as lock:
            first = json.loads(lock.path.read_text())["heartbeat"]
            time.sleep(0.2)
            assert json.loads(lock.path.read_text())["heartbeat"] > first
            raise KeyboardInterrupt
    assert not (run_dir / ".lock").exists()
    with pytest.raises(RuntimeError, match="already holds"):
        with RunLock(run_dir), RunLock(run_dir):
            pass


def test_unparsable_lock_is_busy_while_fresh_then_stale(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("")
    with pytest.raises(RunBusy, match="being written or is damaged"):
        RunLock(run_dir, wait=False).acquire()
    old = time.time() - 100
    os.utime(run_dir / ".lock", (old, old))
    with RunLock(run_dir, wait=False):
        pass


def test_a_holder_that_lost_its_lock_does_not_remove_the_new_one(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir, heartbeat=0.02)
    lock.acquire()
    os.rename(lock.path, run_dir / "moved")  # as a taker does with a lock it judged stale
    _write_lock(run_dir, host="elsewhere", pid=1, age=0)
    time.sleep(0.2)
    assert lock.lost
    lock.release()
    assert json.loads((run_dir / ".lock").read_text())["host"] == "elsewhere"
