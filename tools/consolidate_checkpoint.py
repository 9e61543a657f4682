#!/usr/bin/env python
"""Consolidate a DeepSpeed ZeRO checkpoint (any stage, any number of ranks) into plain files.

    python tools/consolidate_checkpoint.py RUN_DIR_OR_CHECKPOINT --out DIR [--set key=value ...]

RUN_DIR_OR_CHECKPOINT is a run folder or RUN/latest (its newest complete tag is taken), RUN/best (the
tag of train.best_metric's best evaluation, named in RUN/best.json), its checkpoints/ folder, or one tag
folder (run/checkpoints/stepNNNNNNNN, which must carry the COMPLETE marker).
Runs in one process on the CPU; no process group, no launcher.

DIR receives (mmscale/engine/export.py):
    model.safetensors              the whole task's fp32 state dict (the task's load_state_dict)
    open_clip_model.safetensors    a CLIP encoder in open_clip's own layout (0-d logit_scale restored), with
    open_clip_config.json          its architecture and preprocessing: the folder is an open_clip model,
                                   open_clip.create_model_and_transforms("local-dir:DIR")
    encoder_vlmo_release.safetensors  a VLMo encoder under the public release's names
    item_embeddings.safetensors    {"item_embeddings": [num_items, embed_dim] float32}, the ranking's item
                                   table, L2-normalised; row i is item index i
    user_embeddings.safetensors    each user's vector over the history before their test sample
    items.faiss                    a FAISS inner-product index of the items (--index; tools/recommend.py uses it)
    item_ids.json                  index -> raw item id (a copy of the shard folder's item_ids.json)
    consolidated.json              what each file is, shapes, source (run, tag, step), ZeRO stage,
                                   model name, number of items and each file's sha256; written last

The config is the run's config.json (or, if it is missing, the one saved in the checkpoint);
`--set` overrides keys as in launch/train.py, e.g. --set data.shards=/moved/shards. Relative
paths in the config that do not exist from the current folder are looked up from the repository
root (where training is normally launched).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run folder or RUN/latest (newest complete tag), RUN/best, or a tag folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; our files in it are replaced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. --set data.shards=PATH (repeatable)")
    p.add_argument("--device", default="cpu", help="device for encoding the catalogue (default: cpu)")
    p.add_argument("--num-workers", type=int, help="data workers for encoding the catalogue (default: data.num_workers)")
    p.add_argument("--index", default="flat", choices=("flat", "hnsw", "ivf"),
                   help="FAISS item index: flat (exact, default), hnsw or ivf (approximate, for large catalogues)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.engine.export import consolidate
    from mmscale.engine.restore import USER_ERRORS

    try:
        record = consolidate(args.source, args.out, args.overrides, args.device, args.num_workers, args.index)
    except USER_ERRORS as e:
        print(f"consolidate_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(Path(args.out)), "tag": record["source"]["tag"], "step": record["source"]["step"],
                      "files": {k: v["sha256"] for k, v in record["files"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
