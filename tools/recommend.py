#!/usr/bin/env python
"""Each user's top-K recommendations from an export (or a run), printed with titles and drawn as a contact sheet.

    python tools/recommend.py EXPORT_OR_RUN [--users RAW_ID,RAW_ID,... | --random N [--seed S]] [--k 10]
        [--exact] [--contact-sheet out.png] [--history 5] [--shards DIR] [--json]

EXPORT_OR_RUN is a folder written by tools/consolidate_checkpoint.py (its item and user tables and FAISS
index are read, each checked against consolidated.json's sha256), or a run folder or tag (the tables are
computed in memory, ranked by brute force). A user's vector is the one evaluation ranks their held-out
test item with: over the history before it. Items the user interacted with before are never recommended;
the held-out item is marked where it was recommended ("<- held out"; green on the sheet).

--exact ranks by brute force even when the export has an index (an exact flat index gives the same
list, up to near-ties within float32 rounding that may swap places).
--contact-sheet draws, per user, the history (posters, most recent first) and the top-K.
Exit status 2: not an export or run, a damaged file, an unknown user id.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TITLE_CHARS = 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="EXPORT_OR_RUN", help="an export folder (consolidated.json), a run folder or a tag")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", help="comma-separated raw user ids (as in the source data)")
    who.add_argument("--random", type=int, default=4, metavar="N", help="N users drawn at random (default 4)")
    p.add_argument("--seed", type=int, default=0, help="for --random")
    p.add_argument("--k", type=int, default=10, help="recommendations per user")
    p.add_argument("--exact", action="store_true", help="brute force even when the export has a FAISS index")
    p.add_argument("--contact-sheet", metavar="PNG", help="draw history and recommendations per user into this PNG")
    p.add_argument("--history", type=int, default=5, help="history items drawn per user on the sheet")
    p.add_argument("--shards", help="the shard folder (default: the one the export or run was made from)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    import torch

    from mmscale.data.stream import PAD
    from mmscale.engine.export import ExportError, load_export, ranking_tables
    from mmscale.engine.restore import USER_ERRORS, load_task
    from mmscale.eval.recommend import UserRecommendations, excluded_items, held_out, index_top_k, recommendation_sheet, top_k

    try:
        if (Path(args.source) / "consolidated.json").is_file():
            tables = load_export(args.source, args.shards)
        else:
            tables = ranking_tables(load_task(args.source, [f"data.shards={args.shards}"] if args.shards else []))
        shards = tables.shards
        samples = held_out(shards, "test")
        if not torch.equal(samples.users, tables.users):
            raise ExportError(f"{args.source}: its users differ from the test split of {shards.path}")
        user_ids = json.loads((shards.path / "user_ids.json").read_text())
        item_ids = json.loads((shards.path / "item_ids.json").read_text())
        if args.users:
            index_of = {str(raw): i for i, raw in enumerate(user_ids)}
            unknown = [u for u in args.users.split(",") if u.strip() not in index_of]
            if unknown:
                raise ExportError(f"--users: unknown user id {unknown[0]!r} in {shards.path / 'user_ids.json'}")
            chosen = torch.tensor([index_of[u.strip()] for u in args.users.split(",")])
        else:
            chosen = samples.users[sorted(random.Random(args.seed).sample(range(len(samples.users)), min(args.random, len(samples.users))))]
        without = sorted(set(chosen.tolist()) - set(samples.users.tolist()))
        if without:
            raise ExportError(f"--users: user {user_ids[without[0]]} has no test sample in {shards.path}")
        rows = samples.rows(chosen)
    except (*USER_ERRORS, ExportError) as e:
        print(f"recommend: error: {e}", file=sys.stderr)
        return 2

    excluded = excluded_items(shards, samples, rows)
    vectors = tables.user_vectors[rows]
    if tables.index is not None and not args.exact:
        scores, items = index_top_k(tables.index, vectors, args.k, excluded)
    else:
        scores, items = top_k(vectors, tables.items, args.k, excluded)

    store = shards.store
    found = []
    for r, row in enumerate(rows.tolist()):
        history = [i for i in reversed(samples.history[row].tolist()) if i != PAD]
        kept = [(i, s) for i, s in zip(items[r].tolist(), scores[r].tolist()) if i >= 0]
        found.append(UserRecommendations(str(user_ids[int(samples.users[row])]), history, [i for i, _ in kept],
                                         [s for _, s in kept], int(samples.targets[row])))

    def title(item: int) -> str:
        text = " ".join(store.text(item).split())
        return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 3] + "..."

    if args.json:
        print(json.dumps([{"user": f.label, "held_out": item_ids[f.target], "history": [item_ids[i] for i in f.history],
                           "recommended": [{"item": item_ids[i], "score": s, "text": title(i)} for i, s in zip(f.items, f.scores)]}
                          for f in found], indent=2))
    else:
        ranked_by = "brute force" if tables.index is None or args.exact else f"the FAISS index of {tables.source}"
        print(f"top {args.k} per user ({ranked_by}); items seen before the held-out one are left out")
        for f in found:
            print(f"\nuser {f.label}: held out {item_ids[f.target]} {title(f.target)!r}; "
                  f"last seen {', '.join(str(item_ids[i]) for i in f.history[:3])}")
            for rank, (item, score) in enumerate(zip(f.items, f.scores), 1):
                mark = "  <- held out" if item == f.target else ""
                print(f"  {rank:3d}. {str(item_ids[item]):>8}  {score:7.4f}  {title(item)}{mark}")
    if args.contact_sheet:
        recommendation_sheet(store, found, item_ids, args.history).save(args.contact_sheet)
        print(f"wrote {args.contact_sheet}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
