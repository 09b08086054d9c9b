"""Command line: argv -> config -> run (or sweep, report, demo, export, predict). Errors a user can fix print one line and exit 2.

Ctrl-C (SIGINT) and SIGTERM stop a command between two steps; the checkpoints already written
stay, and running the same command again resumes (exit status 130 and 143).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading

from refilled.version import __version__
from refilled.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message):
        self.exit(2, f"refilled: error: {message} (see '{self.prog} --help')\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops at once
    raise Terminated()


_OS_ADVICE = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EACCES: "check its permissions or choose another location",
    errno.EPERM: "check its permissions or choose another location",
    errno.EROFS: "it is on a read-only file system: choose another location",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: give the path of a file",
}


def os_error_message(err: OSError) -> str:
    """One line for a file-system error: the path (when known), what went wrong, what to do."""
    what = err.strerror or str(err) or type(err).__name__
    advice = _OS_ADVICE.get(err.errno, "check the path and the file system")
    if err.filename is None:
        return f"{what}; {advice}"
    return f"cannot access '{os.fsdecode(err.filename)}': {what}; {advice}"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="refilled",
        description="Generalized knowledge distillation via relationship matching (REFILLED).",
    )
    parser.add_argument("--version", action="version", version=f"refilled {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one experiment from a YAML config (resumes if interrupted)")
    p.add_argument("config", help="YAML file holding what differs from the defaults")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=0.05")
    p = sub.add_parser("demo", help="the embedded default: cross-task REFILLED on Fashion-MNIST")
    p.add_argument("--out", default=None, help="output folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the demo config")
    p = sub.add_parser("sweep", help="run every combination of key=v1,v2 overrides; skip finished cells")
    p.add_argument("config", help="YAML file holding what differs from the defaults")
    p.add_argument("overrides", nargs="*", help="key=value or key=v1,v2,... (e.g. seed=0,1,2)")
    p = sub.add_parser("report", help="tables (mean ± std over seeds) and plots of a folder of runs")
    p.add_argument("runs_dir", help="folder holding run directories (searched recursively)")
    p.add_argument("--out", default=None, help="where to write report.md/.csv and plots (default runs_dir)")
    p.add_argument("--baseline", default="ce", help="arm that paired differences are taken against")
    p = sub.add_parser("export", help="the student alone out of a finished run: safetensors, "
                       "config.json, a model card (and ONNX)",
                       description="Write the student of a finished run to a new folder: "
                       "model.safetensors (its weights alone), config.json (how to rebuild it, its "
                       "classes and input, its teacher, its training and figures), README.md (a "
                       "model card) and, with --onnx, model.onnx checked against PyTorch.")
    p.add_argument("run_dir", help="a finished run directory (it holds results.json)")
    p.add_argument("--out", required=True, help="the export folder to create (new or empty)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (float images in [0, 1], N x C x H x W, any N; "
                   "normalisation inside), refused unless ONNX Runtime agrees with PyTorch")
    p = sub.add_parser("predict", help="classify image files with an exported student, a run "
                       "directory or a model.onnx; CSV of the top-k classes")
    p.add_argument("model", help="an export folder, a run directory or a model.onnx of `refilled export`")
    p.add_argument("inputs", nargs="+", metavar="input", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image in the CSV (default 5)")
    p.add_argument("--out", default=None, help="CSV file to write (default: print to stdout)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p = sub.add_parser("config", help="print the resolved config (defaults + YAML + overrides)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"refilled: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("refilled: interrupted; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except BrokenPipeError:  # e.g. `refilled config | head`: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a file that cannot be read or written: one line, no traceback
        print(f"refilled: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _dispatch(args) -> int:
    from refilled.config import reject_repeated_keys

    if args.command == "config" and args.config and "=" in args.config and not os.path.exists(args.config):
        args.config, args.overrides = None, [args.config, *args.overrides]  # `refilled config key=value`
    reject_repeated_keys(getattr(args, "overrides", None) or ())
    if args.command == "run":
        from refilled.config import load_config
        from refilled.pipeline import run

        results = run(load_config(args.config, args.overrides))
        print(json.dumps(results, indent=2))
    elif args.command == "demo":
        from refilled.demo import run_demo

        if args.seeds < 1:
            raise UserError("--seeds must be at least 1")
        run_demo(args.out, seeds=tuple(range(args.seeds)), overrides=args.overrides)
    elif args.command == "sweep":
        from refilled.sweep import run_sweep

        run_sweep(args.config, args.overrides)
    elif args.command == "report":
        from refilled.report import write_report

        print(write_report(args.runs_dir, out=args.out, baseline=args.baseline))
    elif args.command == "export":
        _export(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "config":
        from refilled.config import dump_yaml, load_config
        from refilled.protocols import check_config

        cfg = load_config(args.config, args.overrides)
        check_config(cfg)  # the names too, as `refilled run` checks them
        print(dump_yaml(cfg), end="")
    return 0


def _export(args) -> None:
    from refilled.export import export_run

    config = export_run(args.run_dir, args.out, onnx=args.onnx)
    files = ["model.safetensors", "config.json", "README.md"] + (["model.onnx"] if args.onnx else [])
    if config["onnx"]:
        p = config["onnx"]["parity"]
        print(f"ONNX parity on {p['on']}: max abs logit difference {p['max_abs_logit_diff']:.3g}, "
              f"top-1 agreement {100 * p['top1_agreement']:.2f}%")
    print(f"exported the student of '{args.run_dir}' to '{args.out}': {', '.join(files)}")


def _predict(args) -> None:
    import csv

    from refilled.export import predict_images

    result = predict_images(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                            out=args.out)
    if args.out is None:
        rows = result["rows"]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"refilled: {len(result['rows'])} predictions written to '{args.out}'", file=sys.stderr)
    if result["accuracy"] is not None:
        print(f"refilled: top-1 accuracy {100 * result['accuracy']:.2f}% on the {result['labelled']} "
              "images in folders named after a class", file=sys.stderr)
    if result["skipped"]:
        print(f"refilled: {len(result['skipped'])} file(s) skipped (not readable as images)",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
