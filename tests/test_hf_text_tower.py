"""A Hugging Face BERT-like text tower runs through CLIPEncoder's own path (embeddings, layers with an attention mask
always built, open_clip's pooling and projection), not open_clip's HFTextEncoder.forward: the two must compute the same
embeddings and gradients for every pooler open_clip offers, on BERT and RoBERTa, with and without padding. Tiny random
towers saved to a local folder; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from mmscale.models.clip import CLIPEncoder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(59))]
TOWERS = {
    "bert": (BertConfig, BertModel, {"pad_token_id": 0}),
    "roberta": (RobertaConfig, RobertaModel, {"pad_token_id": 1, "max_position_embeddings": 40}),
}
# max_pooler is left out: open_clip's own forward fails with it (its masked_fill takes a float mask).
POOLERS = ["mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler"]


def _encoder(folder: Path, tower: str, pooler: str) -> CLIPEncoder:
    config_class, model_class, extra = TOWERS[tower]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **extra)
    hf = folder / tower
    model_class(config).save_pretrained(hf)
    (hf / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    architecture = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_pooler_type": pooler,
                     "hf_proj_type": "linear", "context_length": 8},
    }
    path = folder / f"tiny-{tower}-{pooler}.json"
    path.write_text(json.dumps(architecture))
    return CLIPEncoder(str(path))


def _embeddings_and_gradients(encoder: CLIPEncoder, tokens: torch.Tensor, forward) -> tuple[torch.Tensor, dict]:
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws for both paths
    embeddings = forward(tokens)
    (embeddings * torch.linspace(-1, 1, embeddings.numel()).view_as(embeddings)).sum().backward()
    gradients = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return embeddings.detach(), gradients


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_the_text_path_equals_open_clips_forward(tmp_path, tower, pooler):
    encoder = _encoder(tmp_path, tower, pooler).train()
    pad = TOWERS[tower][2]["pad_token_id"]
    tokens = torch.randint(5, len(VOCAB), (3, 8), generator=torch.Generator().manual_seed(2))
    padded = tokens.clone()
    padded[0, 5:], padded[1, 7:] = pad, pad
    for batch in (padded, tokens):
        ours, our_grads = _embeddings_and_gradients(encoder, batch, encoder._encode_text)
        theirs, their_grads = _embeddings_and_gradients(encoder, batch, lambda t: encoder.clip.encode_text(t, normalize=True))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert our_grads.keys() == their_grads.keys() and len(our_grads) > 10
        for name, grad in their_grads.items():
            torch.testing.assert_close(our_grads[name], grad, rtol=0, atol=0, msg=name)
