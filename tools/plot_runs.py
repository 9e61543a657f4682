#!/usr/bin/env python
"""Training curves of one or more runs in one PNG: losses, learning rates, samples/s, evaluation metrics.

    python tools/plot_runs.py RUN [RUN ...] --out curves.png [--metrics valid/ndcg@10,valid/recall@20]
        [--labels NAME,NAME,...]

Each RUN is a run folder (its metrics.jsonl, as the trainer writes it). Runs are overlaid, one colour each;
a Recall@K panel shows a random ranking's Recall@K dashed in grey. --metrics picks the evaluation panels
(SPLIT/METRIC@K; default valid/ndcg@10, valid/recall@20, cold/recall@20 where logged).
Exit status 2: a folder without metrics.jsonl, a metric no run logged.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", required=True, metavar="PNG", help="the image to write")
    p.add_argument("--metrics", help="comma-separated evaluation panels, e.g. valid/ndcg@10,test/mrr@10")
    p.add_argument("--labels", help="comma-separated legend names, one per run (default: the folder names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels.split(",")) != len(args.runs):
        p.error(f"--labels: {len(args.labels.split(','))} names for {len(args.runs)} runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.curves import DEFAULT_METRICS, RunsError, plot_runs

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else DEFAULT_METRICS
    try:
        titles = plot_runs(args.runs, args.out, metrics, args.labels.split(",") if args.labels else None)
    except RunsError as e:
        print(f"plot_runs: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(titles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
