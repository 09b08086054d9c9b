"""Command line: argv -> config -> run. Errors a user can fix print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from refilled.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refilled",
        description="Generalized knowledge distillation via relationship matching (REFILLED).",
    )
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
    p = sub.add_parser("config", help="print the resolved config (defaults + YAML + overrides)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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
        elif args.command == "config":
            from refilled.config import dump_yaml, load_config

            print(dump_yaml(load_config(args.config, args.overrides)), end="")
    except UserError as err:
        print(f"refilled: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refilled: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
