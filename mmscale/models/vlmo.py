"""VLMo item encoder: a multiway transformer (shared self-attention, per-modality FFN experts).

Architecture of the public VLMo release (microsoft/unilm, `vlmo/`), reimplemented:

* Pre-norm blocks: one shared multi-head self-attention (``qkv`` without bias plus separate
  ``q_bias``/``v_bias``; the key has none), LayerScale ``gamma_1``/``gamma_2`` on both residual
  branches, and modality experts: ``norm2_text``+``mlp_text`` (L-FFN), ``norm2_imag``+``mlp_imag``
  (V-FFN) and, in the top ``vl_layers`` blocks, ``norm2_vl``+``mlp_vl`` (VL-FFN).
* Modes: ``image`` (image tokens, V-FFN everywhere), ``text`` (text tokens, L-FFN everywhere),
  ``fusion`` (text tokens then image tokens; below the top blocks each token goes to its modality's
  expert, the top blocks send every token through the VL-FFN). The single-modality "VL path" of the
  release (top blocks re-run with the VL-FFN from the hidden state below them, for the
  ``itc_vl_*`` heads) is available with ``vl=True``.
* Positions: a BEiT-style relative position bias. One table parameter
  ``relative_position_bias_table`` [distances, heads * depth] (each layer reads its own ``heads``
  columns) and three index buffers: image, text and text+image sequences. With it off, an absolute
  image position embedding ``transformer.pos_embed`` and BERT's absolute text positions are used.
* Text: BERT-style embeddings (word, position, an inner 2-row token type table, LayerNorm eps 1e-12),
  plus the model-level ``token_type_embeddings`` (text 0, image 1).

Module names equal the release's state-dict names, so its weights load after unwrapping
(tools/convert_vlmo_checkpoint.py); the only layout difference is that ``logit_scale`` and
``logit_vl_scale`` are [1]-shaped here (0-d in the release).

Every computation runs inside ``VLMo.forward`` (the helpers call ``self(...)``) and every
parameter is used inside the forward of the module that owns it, so DeepSpeed ZeRO-3 gathers
partitioned parameters (e.g. the large bias table) through its module hooks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
from ..data.preprocess import ItemPreprocess
from .encoder import EncoderExport, FusionEncoder, ItemEncoder

PAD_ID = 0
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a trained vocabulary
TEXT, IMAGE = 0, 1  # modality index of a token (= its token type id)
MODES = ("image", "text", "dual", "fusion")


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class VLMoConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    vl_layers: int = 2  # F: the top F blocks carry the VL-FFN
    vocab_size: int | None = 30522  # None: taken from the tokenizer when the encoder is built
    max_text_len: int = 40
    # Text distances the bias table holds rows for (the release's `max_text_len_of_initckpt`, 196);
    # it sets the table's shape, so it must equal the checkpoint's. max_text_len <= text_rel_pos_len.
    text_rel_pos_len: int = 196
    embed_dim: int = 768  # width of the contrastive projections (the release: = width)
    rel_pos_bias: bool = True  # False: absolute image/text position embeddings (VLMo Base+ style)
    qkv_bias: bool = True  # q_bias and v_bias
    layer_scale_init: float | None = 0.1  # None: no LayerScale (no gamma_1/gamma_2 parameters)
    drop_path: float = 0.0  # stochastic depth, linear from 0 to this over the blocks
    dropout: float = 0.0  # FFN / attention-output / embedding dropout
    # local tokenizer.json, vocab.txt, or a folder holding one; relative: from the current folder, else the JSON's
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"vlmo.{key}: {why}")

        for key in ("image_size", "patch_size", "width", "depth", "heads", "max_text_len", "embed_dim", "text_rel_pos_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, f"must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise bad("image_size", f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise bad("heads", f"width {self.width} is not divisible by {self.heads} heads")
        if not isinstance(self.vl_layers, int) or not 0 <= self.vl_layers <= self.depth:
            raise bad("vl_layers", f"must be in [0, depth={self.depth}], got {self.vl_layers!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < len(SPECIAL_TOKENS)):
            raise bad("vocab_size", f"must be an integer >= {len(SPECIAL_TOKENS)} or null, got {self.vocab_size!r}")
        if self.max_text_len < 2:
            raise bad("max_text_len", "must hold at least [CLS] and [SEP]")
        if self.rel_pos_bias and self.max_text_len > self.text_rel_pos_len:
            raise bad("max_text_len", f"{self.max_text_len} exceeds text_rel_pos_len {self.text_rel_pos_len}")
        if self.mlp_ratio <= 0:
            raise bad("mlp_ratio", f"must be positive, got {self.mlp_ratio!r}")
        for key in ("drop_path", "dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, f"must be in [0, 1), got {getattr(self, key)!r}")

    # derived sizes
    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid + 1

    @property
    def vl_start(self) -> int:
        """Index of the first block with the VL-FFN (the release's vlffn_start_layer_index)."""
        return self.depth - self.vl_layers

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_dict(cls, values: dict, source: str = "vlmo config") -> "VLMoConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "VLMoConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VLMo config {path} does not exist")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        config = cls.from_dict(values, str(path))
        tok = config.tokenizer
        if tok is not None and not Path(tok).is_absolute() and not Path(tok).exists() and (path.parent / tok).exists():
            config.tokenizer = str(path.parent / tok)  # a relative path is taken from here, else from the JSON's folder
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls, **overrides) -> "VLMoConfig":
        values = dict(image_size=32, patch_size=8, width=64, depth=4, heads=2, mlp_ratio=4.0, vl_layers=2,
                      vocab_size=None, max_text_len=32, text_rel_pos_len=32, embed_dim=64)
        return cls(**{**values, **overrides})

    @classmethod
    def base(cls, **overrides) -> "VLMoConfig":
        values = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_ratio=4.0, vl_layers=2,
                      vocab_size=30522, max_text_len=40, text_rel_pos_len=196, embed_dim=768, drop_path=0.1)
        return cls(**{**values, **overrides})

    @classmethod
    def large(cls, **overrides) -> "VLMoConfig":
        values = dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16, mlp_ratio=4.0, vl_layers=3,
                      vocab_size=30522, max_text_len=40, text_rel_pos_len=196, embed_dim=1024, drop_path=0.1)
        return cls(**{**values, **overrides})

    @classmethod
    def resolve(cls, model: "str | Path | VLMoConfig") -> "VLMoConfig":
        """A config, a JSON path, or a preset name (tiny, base, large; "vlmo-" prefix optional)."""
        if isinstance(model, VLMoConfig):
            return model
        text = str(model)
        if text.endswith(".json"):
            return cls.from_json(text)
        name = text.removeprefix("vlmo-").removeprefix("vlmo_")
        if name in ("tiny", "base", "large"):
            return getattr(cls, name)()
        raise ConfigError(f"encoder.model: {text!r} is neither a VLMo JSON file nor a preset (tiny, base, large)")


# -- relative positions ----------------------------------------------------------------------------
def image_relative_position_index(grid: int) -> torch.Tensor:
    """[P+1, P+1] rows of the bias table for an image sequence ([CLS] + grid x grid patches).

    Patch pairs index (dy + grid - 1) * (2 * grid - 1) + (dx + grid - 1); the last three of the
    (2 * grid - 1)^2 + 3 image rows are [CLS]->patch, patch->[CLS] and [CLS]->[CLS]."""
    num_image = (2 * grid - 1) ** 2 + 3
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + grid - 1
    dx = xs[:, None] - xs[None, :] + grid - 1
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * grid - 1) + dx
    index[0, :] = num_image - 3
    index[:, 0] = num_image - 2
    index[0, 0] = num_image - 1
    return index


def num_relative_distances(config: VLMoConfig) -> tuple[int, int]:
    """(image rows, all rows) of the bias table: image rows, text-image and image-text rows, text rows."""
    num_image = (2 * config.grid - 1) ** 2 + 3
    return num_image, num_image + 2 * config.text_rel_pos_len + 2


def text_relative_position_index(config: VLMoConfig) -> torch.Tensor:
    """[T, T] (T = max_text_len): token pairs after [CLS] index by their offset; [CLS] has its own rows."""
    num_image, num_all = num_relative_distances(config)
    n = config.max_text_len
    pos = torch.arange(n - 1)
    offset = pos[None, :] - pos[:, None]  # key position - query position
    index = torch.zeros(n, n, dtype=torch.long)
    index[1:, 1:] = offset + (config.text_rel_pos_len - 2) + num_image + 2
    index[0, :] = num_all - 3
    index[:, 0] = num_all - 2
    index[0, 0] = num_all - 1
    return index


def text_image_relative_position_index(config: VLMoConfig) -> torch.Tensor:
    """[T + P + 1, T + P + 1] for text-then-image sequences: one row for text->image, one for image->text."""
    num_image, _ = num_relative_distances(config)
    t, v = config.max_text_len, config.num_image_tokens
    top = torch.cat([text_relative_position_index(config), torch.full((t, v), num_image, dtype=torch.long)], 1)
    bottom = torch.cat([torch.full((v, t), num_image + 1, dtype=torch.long), image_relative_position_index(config.grid)], 1)
    return torch.cat([top, bottom], 0)


def derived_buffers(config: VLMoConfig) -> dict[str, torch.Tensor]:
    """The buffers that follow from the config alone (position ids, relative position indices)."""
    out = {"text_embeddings.position_ids": torch.arange(config.max_text_len).unsqueeze(0)}
    if config.rel_pos_bias:
        out["relative_position_index"] = image_relative_position_index(config.grid)
        out["text_relative_position_index"] = text_relative_position_index(config)
        out["text_imag_relative_position_index"] = text_image_relative_position_index(config)
    return out


# -- building blocks -------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != qkv.dtype:  # e.g. under autocast
            attn_mask = attn_mask.to(qkv.dtype)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


@dataclass(frozen=True)
class Routing:
    """Which FFN expert each position of a mixed sequence uses (the same for every sample).

    Built once per forward from a per-token modality index [L] (0 text, 1 image). Text-first
    sequences (the fusion layout) are routed by contiguous slices; any other order by index
    gathers and one inverse permutation."""

    split: int | None  # number of leading text tokens when the sequence is text-first
    text_index: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @classmethod
    def from_modality(cls, modality: torch.Tensor, device: torch.device | None = None) -> "Routing":
        modality = modality.reshape(-1).cpu()
        is_text = modality == TEXT
        num_text = int(is_text.sum())
        if bool(is_text[:num_text].all()):
            return cls(split=num_text)
        text_index = is_text.nonzero().squeeze(1)
        image_index = (~is_text).nonzero().squeeze(1)
        inverse = torch.argsort(torch.cat([text_index, image_index]))
        return cls(split=None, text_index=text_index.to(device), image_index=image_index.to(device), inverse=inverse.to(device))


def attention_mask(bias: torch.Tensor | None, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive float mask [B|1, H|1, L, L] for SDPA: a layer's relative position bias [H, L, L], and
    the dtype's minimum at padded keys (keep [B, L] False)."""
    if keep is None:
        return None if bias is None else bias.to(dtype).unsqueeze(0)
    masked = ~keep[:, None, None, :]
    base = torch.zeros((), dtype=dtype, device=keep.device) if bias is None else bias.to(dtype).unsqueeze(0)
    return base.masked_fill(masked, torch.finfo(dtype).min)


class Block(nn.Module):
    def __init__(self, config: VLMoConfig, with_vl: bool, drop_path: float):
        super().__init__()
        width, hidden, eps = config.width, config.mlp_hidden, 1e-6
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, config.heads, config.qkv_bias, config.dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2_text = nn.LayerNorm(width, eps=eps)
        self.norm2_imag = nn.LayerNorm(width, eps=eps)
        self.mlp_text = Mlp(width, hidden, config.dropout)
        self.mlp_imag = Mlp(width, hidden, config.dropout)
        if with_vl:
            self.mlp_vl = Mlp(width, hidden, config.dropout)
            self.norm2_vl = nn.LayerNorm(width, eps=eps)
        else:
            self.mlp_vl = self.norm2_vl = None
        if config.layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((width,), float(config.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((width,), float(config.layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def ffn(self, x: torch.Tensor, route: "str | Routing") -> torch.Tensor:
        """The expert branch: route "text" | "image" | "vl" sends every token to one expert; a `Routing`
        sends each position to its modality's expert."""
        if isinstance(route, str):
            if route == "text":
                return self.mlp_text(self.norm2_text(x))
            if route == "image":
                return self.mlp_imag(self.norm2_imag(x))
            if route == "vl" and self.mlp_vl is not None:
                return self.mlp_vl(self.norm2_vl(x))
            raise ValueError(f"route {route!r} is not available in this block")
        if route.split is not None:
            text, image = x[:, : route.split], x[:, route.split :]
            return torch.cat([self.mlp_text(self.norm2_text(text)), self.mlp_imag(self.norm2_imag(image))], 1)
        text = self.mlp_text(self.norm2_text(x.index_select(1, route.text_index)))
        image = self.mlp_imag(self.norm2_imag(x.index_select(1, route.image_index)))
        return torch.cat([text, image], 1).index_select(1, route.inverse)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None,
                route: "str | Routing") -> torch.Tensor:
        """x [B, L, D]; bias [H, L, L] (this layer's relative position bias) or None; keep [B, L] (False at
        padded keys) or None. The [B, H, L, L] mask is built here, so checkpointing recomputes it."""
        h = self.attn(self.norm1(x), attention_mask(bias, keep, x.dtype))
        x = x + self.drop_path(h if self.gamma_1 is None else self.gamma_1 * h)
        h = self.ffn(x, route)
        return x + self.drop_path(h if self.gamma_2 is None else self.gamma_2 * h)


class PatchEmbed(nn.Module):
    def __init__(self, config: VLMoConfig):
        super().__init__()
        self.image_size = config.image_size
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[-3:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"VLMo expects images [N, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)


class MultiwayTransformer(nn.Module):
    """The release's `transformer.` module: patch embedding, class token, blocks, final norm.

    Its forward is the image embedding (patches + [CLS] (+ absolute positions)); `VLMo` runs
    the blocks, since their attention bias and routing depend on the whole input."""

    def __init__(self, config: VLMoConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        if config.rel_pos_bias:
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_image_tokens, config.width))
        self.pos_drop = nn.Dropout(config.dropout)
        # stochastic depth rises linearly over the blocks (plain floats: this also builds on the meta device)
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, i >= config.vl_start, rates[i]) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)


class TextEmbeddings(nn.Module):
    """BERT's embedding layer under the release's names (`text_embeddings.`).

    With the relative position bias on, the release builds it with position_embedding_type
    "rel_pos", so `position_embeddings` is kept (it is in the checkpoint) but not added."""

    def __init__(self, config: VLMoConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("vlmo.vocab_size: unknown; build through VLMoEncoder (it takes the tokenizer's) or set it")
        self.absolute = not config.rel_pos_bias
        self.word_embeddings = nn.Embedding(config.vocab_size, config.width, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(config.max_text_len, config.width)
        self.token_type_embeddings = nn.Embedding(2, config.width)
        self.LayerNorm = nn.LayerNorm(config.width, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("position_ids", torch.arange(config.max_text_len).unsqueeze(0), persistent=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens) + self.token_type_embeddings(torch.zeros_like(tokens))
        if self.absolute:
            x = x + self.position_embeddings(self.position_ids[:, : tokens.shape[1]])
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class LinearHead(nn.Module):
    """`<head>.fc`: the release's ITC (no bias) and ITM (2-way) heads."""

    def __init__(self, width: int, out: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(width, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PredictionTransform(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """BERT's LM head as in the release: transform, untied decoder without bias, separate bias."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = PredictionTransform(width)
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


# -- the model -------------------------------------------------------------------------------------
def text_attention_mask(tokens: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """True where a text position is a real token (pads are `pad_id`, 0)."""
    return tokens != pad_id


class VLMo(nn.Module):
    """The VLMo network under the release's state-dict names.

    `forward(images=None, text_tokens=None, mode=...)` returns a dict:
      image  -> image_feats [N, 1+P, D] (final-normed), image_cls [N, embed_dim] (L2-normalised)
      text   -> text_feats [N, T, D], text_cls [N, embed_dim]
      dual   -> both of the above
      fusion -> text_feats, image_feats, raw_cls_feats [N, D] (normed [CLS]), cls_feats (pooler),
                itm_logits [N, 2], and mlm_logits [N, T, vocab] with mlm=True
    vl=True (image/text/dual) adds image_vl_cls / text_vl_cls: the top blocks re-run with the VL-FFN
    from the hidden state below them, then itc_vl_{image,text}_proj (L2-normalised).
    """

    def __init__(self, config: VLMoConfig, grad_checkpointing: bool = False):
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("vlmo.vocab_size: unknown; build through VLMoEncoder (it takes the tokenizer's) or set it")
        self.config = config
        self.grad_checkpointing = grad_checkpointing
        d = config.width
        self.transformer = MultiwayTransformer(config)
        self.text_embeddings = TextEmbeddings(config)
        self.token_type_embeddings = nn.Embedding(2, d)
        if config.rel_pos_bias:
            _, rows = num_relative_distances(config)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, config.heads * config.depth))
            for name, value in derived_buffers(config).items():
                if "." not in name:
                    self.register_buffer(name, value, persistent=True)
        else:
            self.relative_position_bias_table = None
        self.pooler = Pooler(d)
        self.itm_score = LinearHead(d, 2, bias=True)
        self.mlm_score = MLMHead(d, config.vocab_size)
        self.itc_text_proj = LinearHead(d, config.embed_dim, bias=False)
        self.itc_image_proj = LinearHead(d, config.embed_dim, bias=False)
        self.itc_vl_text_proj = LinearHead(d, config.embed_dim, bias=False)
        self.itc_vl_image_proj = LinearHead(d, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.logit_vl_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.transformer.cls_token, std=0.02)
        if self.transformer.pos_embed is not None:
            nn.init.trunc_normal_(self.transformer.pos_embed, std=0.02)

    # -- helpers (all go through forward) ----------------------------------------------------------
    def encode_image(self, images: torch.Tensor, vl: bool = False):
        out = self(images=images, mode="image", vl=vl)
        return (out["image_cls"], out["image_vl_cls"]) if vl else out["image_cls"]

    def encode_text(self, text_tokens: torch.Tensor, vl: bool = False):
        out = self(text_tokens=text_tokens, mode="text", vl=vl)
        return (out["text_cls"], out["text_vl_cls"]) if vl else out["text_cls"]

    def fuse(self, images: torch.Tensor, text_tokens: torch.Tensor, mlm: bool = False) -> dict[str, torch.Tensor]:
        return self(images=images, text_tokens=text_tokens, mode="fusion", mlm=mlm)

    # -- internals ---------------------------------------------------------------------------------
    def _rel_bias(self, index: torch.Tensor) -> torch.Tensor | None:
        """[depth, heads, L, L] bias of every layer for a [L, L] index (None without relative positions)."""
        if self.relative_position_bias_table is None:
            return None
        n = index.shape[0]
        bias = F.embedding(index.long(), self.relative_position_bias_table)  # [L, L, depth * heads]
        return bias.permute(2, 0, 1).reshape(self.config.depth, self.config.heads, n, n)

    def _index_for(self, mode: str, num_text: int) -> torch.Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        cfg = self.config
        if mode == "image":
            return self.relative_position_index
        if mode == "text":
            return self.text_relative_position_index[:num_text, :num_text]
        if num_text == cfg.max_text_len:
            return self.text_imag_relative_position_index
        rows = torch.cat([torch.arange(num_text), cfg.max_text_len + torch.arange(cfg.num_image_tokens)])
        rows = rows.to(self.text_imag_relative_position_index.device)
        return self.text_imag_relative_position_index[rows][:, rows]

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"text tokens must be [N, T], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_text_len:
            raise ValueError(f"text tokens have {tokens.shape[1]} positions; max_text_len is {self.config.max_text_len}")

    def _run(self, x: torch.Tensor, routes: Sequence, bias: torch.Tensor | None, keep: torch.Tensor | None,
             layers: Iterable[int]) -> torch.Tensor:
        for i in layers:
            block = self.transformer.blocks[i]
            layer_bias = None if bias is None else bias[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, layer_bias, keep, routes[i], use_reentrant=False)
            else:
                x = block(x, layer_bias, keep, routes[i])
        return x

    def _single(self, x: torch.Tensor, modality: str, keep: torch.Tensor | None, vl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image- or text-only: every block uses the modality's expert; optionally the VL path too."""
        cfg = self.config
        bias = self._rel_bias(self._index_for(modality, x.shape[1]))
        routes = [modality] * cfg.depth
        below = self._run(x, routes, bias, keep, range(cfg.vl_start))
        top = self._run(below, routes, bias, keep, range(cfg.vl_start, cfg.depth))
        vl_out = None
        if vl:
            if cfg.vl_layers == 0:
                raise ValueError("vl=True needs vl_layers > 0")
            vl_out = self.transformer.norm(self._run(below, ["vl"] * cfg.depth, bias, keep, range(cfg.vl_start, cfg.depth)))
        return self.transformer.norm(top), vl_out

    def _embed_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(images)
        types = torch.full(x.shape[:2], IMAGE, dtype=torch.long, device=x.device)
        return x + self.token_type_embeddings(types)

    def _embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        return self.text_embeddings(tokens) + self.token_type_embeddings(torch.zeros_like(tokens))

    def forward(self, images: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                mode: str = "dual", vl: bool = False, mlm: bool = False) -> dict[str, torch.Tensor]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        needs_image, needs_text = mode in ("image", "dual", "fusion"), mode in ("text", "dual", "fusion")
        if needs_image and images is None:
            raise ValueError(f"mode {mode!r} needs images")
        if needs_text and text_tokens is None:
            raise ValueError(f"mode {mode!r} needs text tokens")
        out: dict[str, torch.Tensor] = {}
        if mode == "fusion":
            return self._fusion(images, text_tokens, mlm)
        if needs_image:
            feats, vl_feats = self._single(self._embed_image(images), "image", None, vl)
            out["image_feats"] = feats
            out["image_cls"] = F.normalize(self.itc_image_proj(feats[:, 0]), dim=-1)
            if vl_feats is not None:
                out["image_vl_cls"] = F.normalize(self.itc_vl_image_proj(vl_feats[:, 0]), dim=-1)
        if needs_text:
            keep = text_attention_mask(text_tokens)
            feats, vl_feats = self._single(self._embed_text(text_tokens), "text", keep, vl)
            out["text_feats"] = feats
            out["text_cls"] = F.normalize(self.itc_text_proj(feats[:, 0]), dim=-1)
            if vl_feats is not None:
                out["text_vl_cls"] = F.normalize(self.itc_vl_text_proj(vl_feats[:, 0]), dim=-1)
        return out

    def _fusion(self, images: torch.Tensor, tokens: torch.Tensor, mlm: bool) -> dict[str, torch.Tensor]:
        cfg = self.config
        text = self._embed_text(tokens)
        image = self._embed_image(images)
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"fusion needs as many texts as images, got {text.shape[0]} and {image.shape[0]}")
        num_text = text.shape[1]
        x = torch.cat([text, image], 1)
        keep = torch.cat([text_attention_mask(tokens), torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)], 1)
        modality = torch.cat([torch.full((num_text,), TEXT), torch.full((image.shape[1],), IMAGE)])
        routing = Routing.from_modality(modality, x.device)
        routes = [routing if i < cfg.vl_start else "vl" for i in range(cfg.depth)]
        bias = self._rel_bias(self._index_for("fusion", num_text))
        x = self.transformer.norm(self._run(x, routes, bias, keep, range(cfg.depth)))
        out = {
            "text_feats": x[:, :num_text],
            "image_feats": x[:, num_text:],
            "raw_cls_feats": x[:, 0],
            "cls_feats": self.pooler(x),
        }
        out["itm_logits"] = self.itm_score(out["cls_feats"])
        if mlm:
            out["mlm_logits"] = self.mlm_score(out["text_feats"])
        return out


# -- the release's layout --------------------------------------------------------------------------
RELEASE_0D = ("logit_scale", "logit_vl_scale")  # 0-d in the release, [1] here (DeepSpeed broadcasts)
# Index buffers the release builds as float (a concatenation with torch.ones(...) * n); int64 here so
# that half-precision casts of the model never touch them.
RELEASE_FLOAT_BUFFERS = ("text_imag_relative_position_index",)


def to_release_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `VLMo.state_dict()` -> the release's tensors: 0-d logit scales, float text-image index; names unchanged."""
    out = {}
    for key, value in state.items():
        if key in RELEASE_0D:
            if value.numel() != 1:
                raise ValueError(f"{key}: expected one element, got shape {tuple(value.shape)}")
            value = value.reshape(())
        elif key in RELEASE_FLOAT_BUFFERS:
            value = value.to(torch.float32)
        out[key] = value
    return out


def from_release_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_release_layout`: [1]-shaped logit scales, int64 index buffers."""
    out = {}
    for key, value in state.items():
        if key in RELEASE_0D and value.dim() == 0:
            value = value.reshape(1)
        elif key in RELEASE_FLOAT_BUFFERS and value.is_floating_point():
            if not torch.equal(value, value.round()):
                raise ValueError(f"{key}: an index buffer with non-integer values")
            value = value.to(torch.long)
        out[key] = value
    return out


# -- tokenizer -------------------------------------------------------------------------------------
def _bert_pipeline(tokenizer, lowercase: bool):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                      lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def build_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Trains an uncased WordPiece vocabulary with BERT's special tokens ([PAD]=0 [UNK] [CLS] [SEP] [MASK]).

    Writes out_dir/tokenizer.json and out_dir/vocab.txt; returns out_dir. The vocabulary may come
    out smaller than `vocab_size` when the texts are few."""
    from tokenizers import Tokenizer, models, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase=True)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator((t for t in texts if t), trainer=trainer)
    _set_post_processor(tokenizer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))  # vocab.txt
    return out_dir


def _set_post_processor(tokenizer) -> None:
    from tokenizers import processors

    ids = {tok: tokenizer.token_to_id(tok) for tok in ("[PAD]", "[CLS]", "[SEP]")}
    missing = [tok for tok, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"tokenizer: vocabulary lacks {', '.join(missing)}")
    if ids["[PAD]"] != PAD_ID:
        raise ConfigError(f"tokenizer: [PAD] has id {ids['[PAD]']}; VLMo pads with id {PAD_ID}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer, models

    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return _load_tokenizer(path / name)
        raise FileNotFoundError(f"tokenizer: {path} holds neither tokenizer.json nor vocab.txt")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: {path} does not exist (tokenizers load from local files only)")
    if path.name.endswith(".json"):
        return Tokenizer.from_file(str(path))
    lowercase = True  # BERT uncased, unless a transformers tokenizer_config.json beside it says otherwise
    cfg = path.parent / "tokenizer_config.json"
    if cfg.is_file():
        lowercase = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
    return _bert_pipeline(Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]")), lowercase)


class WordPieceTokenize:
    """texts -> LongTensor [N, max_text_len]: [CLS] tokens [SEP], truncated, padded with 0.

    Picklable (it reloads from its path), so data-loader workers can hold one."""

    def __init__(self, path: str | Path, max_text_len: int):
        self.path = Path(path)
        self.max_text_len = int(max_text_len)
        self._setup()

    def _setup(self) -> None:
        tok = _load_tokenizer(self.path)
        _set_post_processor(tok)
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_text_len)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # MLM never predicts these; [MASK] replaces the chosen tokens
        self.special_ids = tuple(i for i in (tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")) if i is not None)
        self.mask_id = tok.token_to_id("[MASK]")
        # MLM's random replacements: every token but the bracketed ones ([PAD], [UNK], [CLS], [SEP], [MASK], [unusedN])
        self.ordinary_ids = tuple(sorted(i for t, i in tok.get_vocab(with_added_tokens=True).items()
                                         if not (t.startswith("[") and t.endswith("]"))))

    def __getstate__(self):
        return {"path": self.path, "max_text_len": self.max_text_len}

    def __setstate__(self, state):
        self.path, self.max_text_len = state["path"], state["max_text_len"]
        self._setup()

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch([t or "" for t in texts])
        out = torch.full((len(encodings), self.max_text_len), PAD_ID, dtype=torch.long)
        for row, enc in enumerate(encodings):  # per text, not per token
            ids = enc.ids[: self.max_text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# -- preprocess and the item encoder ---------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def vlmo_image_transform(image_size: int):
    """Resize (bicubic, shorter side) + center crop to image_size, [0, 1] then mean/std 0.5 (the release's
    "inception" normalisation, to [-1, 1])."""
    from torchvision import transforms

    return transforms.Compose([
        _to_rgb,
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])


def _tokenizer_path(config: VLMoConfig, tokenizer: str | Path | None) -> Path:
    path = tokenizer if tokenizer is not None else config.tokenizer
    if path is None:
        raise ConfigError("encoder.tokenizer: VLMo needs a local WordPiece tokenizer (tokenizer.json, vocab.txt or "
                          "a folder holding one); set it in the VLMo JSON (\"tokenizer\") or pass it")
    return Path(path)


def vlmo_preprocess(model: "str | Path | VLMoConfig", tokenizer: str | Path | None = None) -> ItemPreprocess:
    """The image transform and tokenizer of a VLMo config, without building weights (for data workers)."""
    config = VLMoConfig.resolve(model)
    tokenize = WordPieceTokenize(_tokenizer_path(config, tokenizer), config.max_text_len)
    return ItemPreprocess(image_transform=vlmo_image_transform(config.image_size), tokenize=tokenize,
                          image_size=config.image_size)


class VLMoEncoder(ItemEncoder, FusionEncoder):
    """VLMo behind the item-encoder interface: dual-encoder embeddings (forward) and fused items (fuse).

    model: a VLMoConfig, a JSON path or a preset name; tokenizer: a local tokenizer path (else the
    config's); pretrained: a safetensors file in mmscale's VLMo layout (tools/convert_vlmo_checkpoint.py),
    loaded with strict=True."""

    @classmethod
    def from_config(cls, config) -> "VLMoEncoder":
        return cls(config.model, config.pretrained, config.grad_checkpointing, tokenizer=config.tokenizer,
                   item_representation=config.item_representation)

    @classmethod
    def preprocess_for(cls, config) -> ItemPreprocess:
        return vlmo_preprocess(config.model, config.tokenizer)

    def __init__(self, model: "str | Path | VLMoConfig", pretrained: str | None = None,
                 grad_checkpointing: bool = False, tokenizer: str | Path | None = None, item_representation: str = "dual"):
        super().__init__()
        config = VLMoConfig.resolve(model)
        self._preprocess = vlmo_preprocess(config, tokenizer)
        vocab = self._preprocess.tokenize.vocab_size
        if config.vocab_size is None:
            config = dataclasses.replace(config, vocab_size=vocab)
        elif vocab > config.vocab_size:
            raise ConfigError(f"vlmo.vocab_size: the tokenizer has {vocab} tokens but the model only {config.vocab_size}")
        self.config = config
        self.embed_dim = config.embed_dim
        self.model = VLMo(config, grad_checkpointing=grad_checkpointing)
        # item_representation "fusion": an item is its fusion-mode [CLS] (pooled), projected to embed_dim.
        # The projection is mmscale's own (the release has none), kept outside `model` so imports stay strict.
        self.item_proj = nn.Linear(config.width, config.embed_dim, bias=False) if item_representation == "fusion" else None
        self.register_buffer("special_token_ids", torch.tensor(self._preprocess.tokenize.special_ids), persistent=False)
        self.register_buffer("replacement_token_ids", torch.tensor(self._preprocess.tokenize.ordinary_ids), persistent=False)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"encoder.pretrained: {path} does not exist (weights load from local files only)")
        state = load_file(str(path))
        self.model.load_state_dict(state, strict=True)

    @property
    def grad_checkpointing(self) -> bool:
        return self.model.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        self.model.grad_checkpointing = bool(value)

    def preprocess(self) -> ItemPreprocess:
        return self._preprocess

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images=images, text_tokens=text_tokens, mode="dual")
        return out["image_cls"], out["text_cls"]

    def fuse(self, images: torch.Tensor, text_tokens: torch.Tensor, pooled: bool = True) -> torch.Tensor:
        """The fused item representation [N, width]: the pooler output on the fusion-mode [CLS]
        (the release's `cls_feats`, fed to its ITM/VQA heads); pooled=False gives the normed [CLS] itself."""
        out = self.model(images=images, text_tokens=text_tokens, mode="fusion")
        return out["cls_feats"] if pooled else out["raw_cls_feats"]

    def fused_embedding(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] L2-normalised item vectors from the fusion-mode [CLS] (item_representation=fusion)."""
        if self.item_proj is None:
            raise ConfigError("encoder.item_representation: the VLMo encoder was built for dual-encoder items")
        return F.normalize(self.item_proj(self.fuse(images, text_tokens)), dim=-1)

    def match_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[N, 2] ITM logits (not matched, matched) of row-aligned image-text pairs, fusion mode."""
        return self.model(images=images, text_tokens=text_tokens, mode="fusion")["itm_logits"]

    def masked_lm_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, vocab] MLM logits of (masked) text tokens read with their image, fusion mode."""
        return self.model(images=images, text_tokens=text_tokens, mode="fusion", mlm=True)["mlm_logits"]

    @property
    def mask_token_id(self) -> int:
        mask_id = self._preprocess.tokenize.mask_id
        if mask_id is None:
            raise ConfigError(f"encoder.tokenizer: {self._preprocess.tokenize.path} has no [MASK] token; MLM needs one")
        return mask_id

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def export(self) -> EncoderExport:
        """The public release's names, shapes and dtypes (0-d logit scales); the fusion projection is mmscale's own
        and stays in model.safetensors."""
        return EncoderExport(
            filename="encoder_vlmo_release.safetensors", state=to_release_layout(self.model.state_dict()),
            what="the VLMo encoder under the public release's names, shapes and dtypes; tools/convert_vlmo_checkpoint.py import "
                 "maps it back into mmscale's layout",
            info={"vlmo": {"config": self.config.to_dict()}},
        )
