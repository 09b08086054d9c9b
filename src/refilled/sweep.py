"""Grids of runs: ``key=v1,v2`` overrides expand to every combination, each a run.

Finished cells are skipped (a run directory with ``results.json`` is returned as it is), so an
interrupted sweep continues where it stopped. The summary groups cells by the swept values
(the seed excepted) and shows validation and test accuracy side by side: choose on validation.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from refilled.config import load_config, load_yaml, make_config
from refilled.files import atomic_write_text, write_csv
from refilled.pipeline import run
from refilled.protocols import check_config
from refilled.stats import mean_std


def split_values(text: str) -> list[str]:
    """``"a,[1,2],c"`` -> ``["a", "[1,2]", "c"]``: commas inside brackets do not split."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _values(item: str) -> list[str]:
    """The values of one ``key=v1,v2`` item; ``arm=`` is a label, never split on commas."""
    key, _, values = item.partition("=")
    return [values] if key == "arm" else split_values(values)


def expand(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-separated override values, in the order given
    (``arm=`` is kept whole: a label may hold commas)."""
    axes = []
    for item in overrides:
        key, _, values = item.partition("=")
        axes.append([f"{key}={v}" for v in _values(item)] if _ else [item])
    return [list(cell) for cell in itertools.product(*axes)]


def cell_label(cell: list[str], swept: set[str], method: str, arm: str | None = None) -> str:
    """The arm a cell belongs to: the given ``arm=`` (or the method), then the swept values."""
    shown = [o for o in cell if o.partition("=")[0] in swept - {"seed", "method", "arm"}]
    return ", ".join([arm or method, *shown])


def run_sweep(config_path: str | None, overrides: list[str], progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    tree = load_yaml(config_path) if config_path else {}
    cells = expand(overrides)
    swept = {o.partition("=")[0] for o in overrides if len(_values(o)) > 1}
    configs = []
    for cell in cells:  # every cell is checked before the first one runs
        cfg = make_config(tree, [*cell, "progress=false"])
        arm = cfg.arm if "arm" not in swept else None
        configs.append(make_config(tree, [*cell, f"arm={cell_label(cell, swept, cfg.method, arm)}",
                                          "progress=false"]))
        check_config(configs[-1])
    results = []
    for cfg in tqdm(configs, desc="sweep", disable=not progress, dynamic_ncols=True):
        results.append({**run(cfg), "arm": cfg.arm})

    rows = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        cell = [r for r in results if r["arm"] == arm]
        row = {"cell": arm, "n": len(cell)}
        for key in ("val_accuracy", "test_accuracy", "stage1_ncm_accuracy"):
            values = [100 * r[key] for r in cell if r.get(key) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values) if values else (None, None)
        rows.append(row)
    out = Path(load_config(config_path, overrides=[c for c in cells[0]]).out_dir)
    lines = ["| cell | n | val acc. (%) | test acc. (%) | stage-1 NCM (%) |", "|---|---|---|---|---|"]
    for r in rows:
        cells_text = [
            "—" if r[f"{k}_mean"] is None else f"{r[f'{k}_mean']:.2f} ± {r[f'{k}_std']:.2f}"
            for k in ("val_accuracy", "test_accuracy", "stage1_ncm_accuracy")
        ]
        lines.append(f"| {r['cell']} | {r['n']} | " + " | ".join(cells_text) + " |")
    best = max((r for r in rows if r["val_accuracy_mean"] is not None),
               key=lambda r: r["val_accuracy_mean"], default=None)
    if best:
        lines += ["", f"best on validation: {best['cell']}"]
    table = "\n".join(lines)
    atomic_write_text(out / "sweep_summary.md", table + "\n")
    write_csv(out / "sweep_summary.csv", rows)
    print(table)
    print(f"\nwritten: {out / 'sweep_summary.md'}, {out / 'sweep_summary.csv'}")
    return {"rows": rows, "results": results, "best": best}
