#!/usr/bin/env python
"""Train a WordPiece vocabulary (BERT's uncased pipeline and special tokens) on a shard folder's item texts.

    python tools/build_tokenizer.py SHARD_DIR OUT_DIR [--vocab-size 8000]

VLMo uses BERT's uncased vocabulary (30,522 tokens); with a local copy of it, point encoder.tokenizer
at its vocab.txt instead. Here no hub is reachable, so the tiny VLMo recipes train a vocabulary on the
catalogue's own titles and descriptions. OUT_DIR receives tokenizer.json and vocab.txt. Two builds from
the same texts can differ (the trainer breaks ties in hash-map order, huggingface/tokenizers#1794): keep
OUT_DIR with the runs that use it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir")
    p.add_argument("out_dir")
    p.add_argument("--vocab-size", type=int, default=8000, help="upper bound; few texts give a smaller vocabulary")
    args = p.parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.data.format import ShardFormatError
    from mmscale.data.item_store import ItemStore
    from mmscale.models.vlmo import build_wordpiece_tokenizer

    try:
        store = ItemStore(args.shard_dir)
    except (ShardFormatError, FileNotFoundError) as e:
        print(f"build_tokenizer: error: {e}", file=sys.stderr)
        return 2
    out = build_wordpiece_tokenizer((store.text(i) for i in range(len(store))), args.vocab_size, Path(args.out_dir))
    print(f"wrote {out / 'tokenizer.json'} and {out / 'vocab.txt'} from {len(store)} item texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
