"""The command line on bad input: exit status 2, one line on stderr, no traceback (issue 13)."""

import errno
import importlib.metadata
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from tiny import run_cli

import refilled
import refilled.report
from refilled.cli import main


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("refilled: error: "), err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"refilled {refilled.__version__}\n"
    assert refilled.__version__ == importlib.metadata.version("refilled")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bogus"])
    assert info.value.code == 2
    _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"seed: 1\n\xff\n", "is not UTF-8 text"),
        (b"seed: 1\ntrain: {lr: 0.1\n", "line 3, column 1: not valid YAML"),
        (b"seed: 1\nseed: 2\n", "line 2, column 1: key 'seed' is given twice (first on line 1)"),
        (b"train: {lr: .nan}\n", "config key 'train.lr' must be a finite number, got nan"),
    ],
)
@pytest.mark.parametrize("command", ["config", "run", "sweep"])
def test_bad_config_files(tmp_path, capsys, command, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, command, path, f"out_dir={tmp_path / 'runs'}")
    assert code == 2 and expected in _one_line(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.lr=0.1", "train.lr=0.2"], "config key 'train.lr' is given twice on the command line"),
        (["train.lr=nan"], "config key 'train.lr' must be a finite number, got nan"),
        (["train.lr=[0.1"], "override 'train.lr=[0.1'"),
        (["device=gpu"], "config key 'device' must be auto, cpu, cuda, cuda:N"),
        (["device=cuda:abc"], "config key 'device' must be"),
        (["seed=-1"], "config key 'seed' is a seed"),
        (["data.image_size=2"], "config key 'data.image_size'"),
    ],
)
@pytest.mark.parametrize("command", ["config", "run", "sweep"])
def test_bad_overrides(tmp_path, capsys, command, overrides, expected):
    code, _, err = run_cli(capsys, command, _empty(tmp_path), *overrides, f"out_dir={tmp_path / 'runs'}")
    assert code == 2 and expected in _one_line(err)
    assert not (tmp_path / "runs").exists()


def _empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


def test_config_without_a_file_takes_overrides_only(capsys):
    assert main(["config", "train.lr=0.5", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "lr: 0.5" in out
    code, _, err = run_cli(capsys, "config", "train.lr=0.5", "train.lr=0.6")
    assert code == 2 and "is given twice" in _one_line(err)


def test_config_path_is_a_directory_or_missing(tmp_path, capsys):
    code, _, err = run_cli(capsys, "config", tmp_path)
    assert code == 2 and "is a directory, not a file" in _one_line(err)
    code, _, err = run_cli(capsys, "run", tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in _one_line(err)


# ------------------------------------------------------------------ OSError from files


def test_os_errors_from_file_writes_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    from test_report import make_runs

    make_runs(tmp_path / "runs")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = run_cli(capsys, "report", tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 2
    assert f"cannot access '{tmp_path / 'out' / 'report.md'}': No space left on device" in _one_line(err)
    assert "free some space" in err
    assert not list((tmp_path / "out").iterdir())  # no temporary file left behind


def test_os_error_without_a_path(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(refilled.report, "write_report", broken)
    code, _, err = run_cli(capsys, "report", "x")
    assert code == 2 and "Input/output error" in _one_line(err)


def test_programming_errors_are_not_swallowed(monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(refilled.report, "write_report", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["report", "x"])


# ------------------------------------------------------------------ signals


def test_sigterm_in_process_unwinds_like_ctrl_c(capsys, monkeypatch):
    cleaned = []

    def slow(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)  # finally blocks (temp files, locks) run

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(refilled.report, "write_report", slow)
    code, _, err = run_cli(capsys, "report", "x")
    assert code == 143 and cleaned == [True]
    assert err == "refilled: interrupted; run the same command again to resume\n"
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refilled.report, "write_report", interrupted)
    code, _, err = run_cli(capsys, "report", "x")
    assert code == 130 and "interrupted; run the same command again to resume" in err


STUB = textwrap.dedent("""
    import sys, time
    import refilled.report
    from refilled.cli import main

    def slow(*args, **kwargs):
        print("ready", flush=True)
        time.sleep(30)

    refilled.report.write_report = slow
    sys.exit(main(["report", "x"]))
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_to_a_cli_process(sig, code):
    proc = subprocess.Popen([sys.executable, "-c", STUB], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)  # generous: a busy CI machine
    finally:
        proc.kill()
    assert proc.returncode == code
    assert err == "refilled: interrupted; run the same command again to resume\n"
