#!/usr/bin/env python
"""Convert VLMo weights between the public release's checkpoints and mmscale's safetensors.

    python tools/convert_vlmo_checkpoint.py import SRC.pt OUT.safetensors --config configs/models/vlmo-base.json
    python tools/convert_vlmo_checkpoint.py export SRC.safetensors OUT.pt [--config CFG]

import: SRC is a release checkpoint (torch.save of a state dict, possibly wrapped in "state_dict",
"module" or "model", keys possibly prefixed "module."). mmscale's VLMo uses the release's module
names, so the mapping is: unwrap, 0-d logit_scale/logit_vl_scale -> [1], index buffers -> int64,
then a strict check against the model the config defines. Buffers that follow from the config
alone (text_embeddings.position_ids and the three relative position index tables) are checked
against it when present and filled in when absent (the release's current code does not save the
index tables). Anything missing, unexpected or of the wrong shape stops the conversion with every
such key and its shapes listed. --init-missing-heads fills absent head weights (pooler, itm_score,
mlm_score, itc_* projections, logit scales; e.g. a retrieval fine-tuned checkpoint has only the
itc_text/image heads) from a freshly initialised model (seed 0) and lists them.

OUT.safetensors loads with `VLMoEncoder(config, pretrained=OUT)` (strict) or
`VLMo(config).load_state_dict(load_file(OUT), strict=True)`.

export: SRC is mmscale safetensors: a converted file, a `VLMo.state_dict()`, a `VLMoEncoder`
state dict ("model." prefix) or a consolidated task's model.safetensors (prefix found from
`transformer.cls_token`); OUT is a torch file {"state_dict": {...}} in the release's layout
(--wrap none: the bare dict). With --config the result is checked against the release layout.

The mapping lives in mmscale/models/vlmo_release.py; errors print and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_import = sub.add_parser("import", help="release checkpoint -> mmscale safetensors")
    p_import.add_argument("src", type=Path)
    p_import.add_argument("out", type=Path)
    p_import.add_argument("--config", required=True, help="VLMo JSON (configs/models/vlmo-*.json) or preset name")
    p_import.add_argument("--init-missing-heads", action="store_true",
                          help="fill absent head weights from a fresh initialisation (listed)")
    p_import.add_argument("--trust-pickle", action="store_true",
                          help="torch.load with weights_only=False (only for files you trust)")
    p_export = sub.add_parser("export", help="mmscale safetensors -> release checkpoint")
    p_export.add_argument("src", type=Path)
    p_export.add_argument("out", type=Path)
    p_export.add_argument("--config", default=None, help="check the result against this VLMo JSON or preset")
    p_export.add_argument("--wrap", default="state_dict", help="the key the release wraps its state dict in, or none")
    args = parser.parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.config import ConfigError
    from mmscale.models.vlmo import VLMoConfig
    from mmscale.models.vlmo_release import WRAPPER_KEYS, ConversionError, export_checkpoint, import_checkpoint

    if args.command == "export" and args.wrap not in (*WRAPPER_KEYS, "none"):
        p_export.error(f"argument --wrap: invalid choice: {args.wrap!r} (choose from {', '.join((*WRAPPER_KEYS, 'none'))})")
    try:
        config = None if args.config is None else VLMoConfig.resolve(args.config)
        if args.command == "import":
            notes = import_checkpoint(args.src, args.out, config, args.init_missing_heads, args.trust_pickle)
            for note in notes:
                print(f"note: {note}")
            print(f"wrote {args.out}")
        else:
            n = export_checkpoint(args.src, args.out, config, args.wrap)
            print(f"wrote {args.out} ({n} tensors)")
    except (ConversionError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
