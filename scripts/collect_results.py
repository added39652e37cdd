#!/usr/bin/env python
"""Collect a VTAB-1k sweep into the paper-layout table (Markdown + CSV) and a PNG chart.

Reads RUNS/*/metrics.json (one folder per task, as scripts/vtab_sweep.py writes them) and puts each
task beside the paper's number from the registry, with group means, the paper's average (mean of
group means) and the plain mean; missing tasks show as "-" and are left out of the means.

    python scripts/collect_results.py outputs/vtab/vit_b16_in21k
    python scripts/collect_results.py outputs/vtab/vit_b16_in21k --out-dir results --no-plot
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from consolidator_hf.cli import HelpFormatter, add_debug_flag, run_cli
from consolidator_hf.results import read_run_metrics, write_results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("runs_dir", help="folder holding one <task>/metrics.json per finished task")
    parser.add_argument("--out-dir", default=None, help="where to write the table and chart (default: runs_dir)")
    parser.add_argument("--stem", default="vtab_results", help="file name stem (default: vtab_results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart (no matplotlib needed)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    scores, notes = read_run_metrics(args.runs_dir)
    for note in notes:  # also at the top of the Markdown
        print(f"collect_results.py: skipped: {note}", file=sys.stderr)
    if not scores:
        print(f"collect_results.py: no VTAB-1k run found under {args.runs_dir}: the table is "
              "all '-'", file=sys.stderr)
    paths = write_results(args.runs_dir, args.out_dir, args.stem, plot=not args.no_plot)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="collect_results.py"))
