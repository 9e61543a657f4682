#!/usr/bin/env python
"""Run a study: training variants early-stopped on validation, as a table (study.md) and a chart (study.png).

    python tools/study.py STUDY.yaml            (rows already done are skipped: run it again to continue)
    python tools/study.py STUDY.yaml --report   (only rewrite study.md and study.png from the rows done)
    python tools/study.py STUDY.yaml --shards build/other --out runs/study-other --title "..."
                                                (the same rows on another shard folder, into another folder)

The study file's format is described in mmscale/study.py; configs/studies/ holds the ml100k-mm studies.
Exit status: 0 done, 2 a bad study file, 1 a row failed (its log is named; rerunning continues from there).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see launch/train.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument("--report", action="store_true", help="write the table and chart from the rows done; train nothing")
    p.add_argument("--shards", help="run the rows on this shard folder instead of the file's")
    p.add_argument("--out", help="the study's folder instead of the file's (rows, table and chart)")
    p.add_argument("--title", help="the table's and chart's title instead of the file's")
    args = p.parse_args(argv)

    from mmscale.study import RowFailedError, StudyError, done_results, load_study, report, run_study

    try:
        study = load_study(args.study, title=args.title, out=args.out, shards=args.shards)
        results = done_results(study) if args.report else run_study(study, log=lambda message: print(message, flush=True))
    except StudyError as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 2
    except RowFailedError as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    if not results:
        print("study: nothing done yet: no table to write", file=sys.stderr)
        return 1
    table, chart = report(study, results)
    print(f"wrote {table} and {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
