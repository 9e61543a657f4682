"""VLMo weights between the public release's checkpoints and mmscale's layout (tools/convert_vlmo_checkpoint.py is the
command line; the mapping is described there).

`release_to_mmscale(state, config)` and `mmscale_to_release(state)` map state dicts; `import_checkpoint` and
`export_checkpoint` read and write the files. Errors raise ConversionError (a ValueError).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .vlmo import VLMo, VLMoConfig, derived_buffers, from_release_layout, to_release_layout

WRAPPER_KEYS = ("state_dict", "module", "model")  # the order the release's own loader tries them
PREFIX = "module."
HEAD_PREFIXES = ("pooler.", "itm_score.", "mlm_score.", "itc_text_proj.", "itc_image_proj.",
                 "itc_vl_text_proj.", "itc_vl_image_proj.", "logit_scale", "logit_vl_scale")
ANCHOR = "transformer.cls_token"  # every VLMo state dict has it; locates a prefix on export
MAX_LISTED = 60


class ConversionError(ValueError):
    """The weights do not fit; `missing`, `unexpected`, `mismatched` hold the offending keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


def _shape(t) -> str:
    return "[" + ", ".join(str(int(s)) for s in t) + "]"


# -- unwrapping ------------------------------------------------------------------------------------
def unwrap_release_state(obj) -> dict[str, torch.Tensor]:
    """A loaded release checkpoint -> its flat state dict: wrappers removed, "module." stripped."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"not a state dict: got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        name = str(key)
        while name.startswith(PREFIX):
            name = name[len(PREFIX):]
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"not a state dict of tensors: {key!r} holds {type(value).__name__} "
                                  f"(wrappers looked through: {', '.join(WRAPPER_KEYS)})")
        if name in state:
            raise ConversionError(f"key {name!r} occurs both with and without the {PREFIX!r} prefix")
        state[name] = value
    return state


# -- the model's layout ----------------------------------------------------------------------------
def _with_vocab(config: VLMoConfig, state: Mapping[str, torch.Tensor]) -> VLMoConfig:
    if config.vocab_size is not None:
        return config
    word = state.get("text_embeddings.word_embeddings.weight")
    if word is None or word.dim() != 2:
        raise ConversionError("config has vocab_size null and the checkpoint has no text_embeddings.word_embeddings.weight "
                              "to take it from")
    return dataclasses.replace(config, vocab_size=int(word.shape[0]))


def expected_layout(config: VLMoConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of `VLMo(config).state_dict()`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VLMo(config)
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def _fresh_heads(config: VLMoConfig, keys: list[str]) -> dict[str, torch.Tensor]:
    state = torch.random.fork_rng(devices=[])
    with state:
        torch.manual_seed(0)
        fresh = VLMo(config).state_dict()
    return {k: fresh[k].clone() for k in keys}


def _describe(missing, unexpected, mismatched, notes, what: str) -> str:
    lines = [f"{what} does not match:"]

    def section(title, items):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:MAX_LISTED])
            if len(items) > MAX_LISTED:
                lines.append(f"    ... and {len(items) - MAX_LISTED} more")

    section("missing keys (expected shape)", missing)
    section("unexpected keys (checkpoint shape)", unexpected)
    section("shape mismatches", mismatched)
    for note in notes:
        lines.append(f"  hint: {note}")
    return "\n".join(lines)


def check_against(state: Mapping[str, torch.Tensor], layout: Mapping[str, tuple], what: str,
                  hints: list[str] | None = None) -> None:
    """Raises ConversionError listing missing and unexpected keys and shape mismatches (with shapes)."""
    missing = [f"{k} {_shape(layout[k][0])}" for k in layout if k not in state]
    unexpected = [f"{k} {_shape(state[k].shape)}" for k in state if k not in layout]
    mismatched = [f"{k}: checkpoint {_shape(state[k].shape)} vs model {_shape(layout[k][0])}"
                  for k in layout if k in state and tuple(state[k].shape) != tuple(layout[k][0])]
    if missing or unexpected or mismatched:
        notes = list(hints or [])
        pos = "text_embeddings.position_embeddings.weight"
        if pos in state and pos in layout and state[pos].shape[0] != layout[pos][0][0]:
            notes.append(f"the checkpoint's text positions hold {state[pos].shape[0]} tokens, the config's "
                         f"max_text_len is {layout[pos][0][0]}")
        if "relative_position_bias_table" in state and "relative_position_bias_table" not in layout:
            notes.append("the checkpoint has a relative position bias; set rel_pos_bias: true")
        raise ConversionError(_describe(missing, unexpected, mismatched, notes, what),
                              [m.split(" ")[0] for m in missing], [u.split(" ")[0] for u in unexpected],
                              [m.split(":")[0] for m in mismatched])


# -- the two directions ----------------------------------------------------------------------------
def release_to_mmscale(state, config: VLMoConfig, *, init_missing_heads: bool = False,
                       notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A release checkpoint (wrapped or flat) -> a state dict that `VLMo(config)` loads with strict=True.

    `notes` (if given) receives one line per filled-in buffer or head."""
    notes = notes if notes is not None else []
    state = unwrap_release_state(state)
    config = _with_vocab(config, state)
    try:
        state = from_release_layout(state)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    layout = expected_layout(config)

    derived = derived_buffers(config)
    value_errors = []
    for key, value in derived.items():
        if key not in state:
            state[key] = value
            notes.append(f"{key}: not in the checkpoint; built from the config {_shape(value.shape)}")
        elif tuple(state[key].shape) == tuple(value.shape):
            got = state[key]
            if got.is_floating_point() and not torch.equal(got, got.round()):
                value_errors.append(f"{key}: non-integer values")
            elif not torch.equal(got.to(torch.long), value):
                value_errors.append(f"{key}: values differ from the ones the config defines "
                                    f"(image grid {config.grid}, max_text_len {config.max_text_len}, "
                                    f"text_rel_pos_len {config.text_rel_pos_len})")
            else:
                state[key] = got.to(torch.long)
    if init_missing_heads:
        heads = [k for k in layout if k not in state and k.startswith(HEAD_PREFIXES)]
        if heads:
            state.update(_fresh_heads(config, heads))
            notes.extend(f"{k}: not in the checkpoint; freshly initialised (seed 0)" for k in heads)
    check_against(state, layout, "VLMo checkpoint vs the config's model")
    if value_errors:
        raise ConversionError("VLMo checkpoint vs the config's model:\n  " + "\n  ".join(value_errors))
    return {k: state[k] for k in layout}


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    anchors = [k for k in state if k == ANCHOR or k.endswith("." + ANCHOR)]
    if len(anchors) != 1:
        raise ConversionError(f"cannot find one VLMo model in the weights: {len(anchors)} keys end with {ANCHOR!r}")
    prefix = anchors[0][: -len(ANCHOR)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def mmscale_to_release(state: Mapping[str, torch.Tensor], config: VLMoConfig | None = None) -> dict[str, torch.Tensor]:
    """mmscale VLMo weights (any prefix) -> the release's flat state dict (0-d logit scales, names unchanged).

    With a config, the result is checked strictly against the model it defines."""
    flat = _strip_prefix(state)
    try:
        out = to_release_layout(flat)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if config is not None:
        config = _with_vocab(config, out)
        layout = {k: ((() if k in ("logit_scale", "logit_vl_scale") else shape), dtype)
                  for k, (shape, dtype) in expected_layout(config).items()}
        check_against(out, layout, "mmscale VLMo weights vs the config's model")
    return out


# -- files -----------------------------------------------------------------------------------------
def _load_torch(path: Path, trust_pickle: bool):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001 (pickle errors have many types)
        if trust_pickle:
            raise ConversionError(f"{path}: cannot be read by torch.load ({err})") from None
        raise ConversionError(f"{path}: torch.load(weights_only=True) refused it ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); if you trust the file, "
                              f"pass --trust-pickle") from None


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage: copy all but the first user of a storage."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    return out


def import_checkpoint(src: Path, out: Path, config: VLMoConfig, init_missing_heads: bool = False,
                      trust_pickle: bool = False) -> list[str]:
    from safetensors.torch import save_file

    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    notes: list[str] = []
    state = release_to_mmscale(_load_torch(src, trust_pickle), config, init_missing_heads=init_missing_heads, notes=notes)
    config = _with_vocab(config, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(_unshare(state), str(out), metadata={"format": "mmscale-vlmo", "config": json.dumps(config.to_dict())})
    return notes


def export_checkpoint(src: Path, out: Path, config: VLMoConfig | None = None, wrap: str = "state_dict") -> int:
    from safetensors.torch import load_file

    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    state = mmscale_to_release(load_file(str(src)), config)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if wrap == "none" else {wrap: state}, out)
    return len(state)
