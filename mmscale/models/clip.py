"""CLIP item encoder over open_clip: any model name or architecture JSON, local weights only."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from ..config import ConfigError
from ..data.preprocess import ItemPreprocess
from .encoder import EncoderExport, ItemEncoder, at_least_1d_parameters


def _resolve_model(model: str) -> str:
    """An architecture JSON path is registered with open_clip under its file stem."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"encoder.model: architecture file {path} does not exist")
        cfg = json.loads(path.read_text())
        if "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ConfigError(f"encoder.model: {path} is not an open_clip architecture (needs vision_cfg and text_cfg)")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None:
        raise ConfigError(f"encoder.model: unknown open_clip model {model!r}; see open_clip.list_models() or give a JSON path")
    return model


def clip_preprocess(model: str) -> ItemPreprocess:
    """open_clip's evaluation transform and tokenizer for a model (no downloads)."""
    name = _resolve_model(model)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    return ItemPreprocess(
        image_transform=open_clip.image_transform(size, is_train=False),
        tokenize=open_clip.get_tokenizer(name),
        image_size=size,
    )


class CLIPEncoder(ItemEncoder):
    @classmethod
    def from_config(cls, config) -> "CLIPEncoder":
        return cls(config.model, config.pretrained, config.grad_checkpointing)

    @classmethod
    def preprocess_for(cls, config) -> ItemPreprocess:
        return clip_preprocess(config.model)

    def __init__(self, model: str, pretrained: str | None = None, grad_checkpointing: bool = False):
        super().__init__()
        self.model_name = model
        name = _resolve_model(model)
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"encoder.pretrained: {pretrained} does not exist (weights load from local files only)")
        # pretrained=None: nothing is fetched; a local file is loaded by open_clip's own loader. The default
        # device, not open_clip's "cpu", so that a `with torch.device("meta")` build stays there (scale planning).
        self.clip = open_clip.create_model(name, pretrained=pretrained, device=torch.get_default_device())
        if grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        self._was_0d = at_least_1d_parameters(self.clip)
        self.embed_dim = open_clip.get_model_config(name)["embed_dim"]
        self._preprocess = clip_preprocess(model)

    def preprocess(self) -> ItemPreprocess:
        return self._preprocess

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(images, normalize=True), self.clip.encode_text(text_tokens, normalize=True)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in open_clip's own layout (0-dim parameters restored), for export."""
        state = self.clip.state_dict()
        return {k: v.reshape(()) if k in self._was_0d else v for k, v in state.items()}

    def export(self) -> EncoderExport:
        """open_clip's layout; a model named by an architecture JSON registers under the JSON's stem."""
        arch = Path(self.model_name)
        name = arch.stem if arch.suffix == ".json" else self.model_name
        return EncoderExport(
            filename="encoder_open_clip.safetensors", state=self.open_clip_state_dict(),
            what=f"the item encoder as an open_clip state dict: open_clip.create_model('{name}', pretrained=<this file>)",
            info={"open_clip": {"model_name": name, **({"architecture_file": arch.name} if arch.suffix == ".json" else {})}},
            files={arch.name: arch} if arch.suffix == ".json" else {},
        )

