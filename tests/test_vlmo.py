"""VLMo: expert routing per mode, embeddings, the release checkpoint converter, the WordPiece
tokenizer and activation checkpointing (tiny configs, CPU)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmscale.config import ConfigError
from mmscale.models.encoder import ItemEncoder
from mmscale.models.vlmo import (
    Block,
    Routing,
    VLMo,
    VLMoConfig,
    VLMoEncoder,
    build_wordpiece_tokenizer,
    text_attention_mask,
)
from helpers.programs import load_program

REPO = Path(__file__).resolve().parents[1]
ITEMS = REPO.parent / "shared" / "data" / "ml100k-mm" / "items.jsonl"
VOCAB = 64  # tiny models that do not need a tokenizer


def converter():
    """The conversion library; its command line is tools/convert_vlmo_checkpoint.py."""
    from mmscale.models import vlmo_release

    return vlmo_release


def tiny(**overrides) -> VLMoConfig:
    return VLMoConfig.tiny(vocab_size=VOCAB, max_text_len=12, text_rel_pos_len=16, **overrides)


def randomised(config: VLMoConfig, seed: int = 0) -> VLMo:
    """A tiny model with every parameter random (zero-initialised biases, the bias table and
    LayerNorms would otherwise hide routing mistakes)."""
    torch.manual_seed(seed)
    model = VLMo(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def inputs(config: VLMoConfig, n: int = 3, text_len: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, config.image_size, config.image_size, generator=g)
    t = text_len or config.max_text_len
    tokens = torch.randint(5, config.vocab_size, (n, t), generator=g)
    tokens[:, 0] = 2
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    lengths[0] = t
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length - 1] = 3
        tokens[row, length:] = 0
    return images, tokens


def block_outputs(model: VLMo, **kwargs) -> tuple[list[torch.Tensor], dict]:
    """Each block's output (for the last call of each block) and the forward's result."""
    outs: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach().clone()))
             for i, blk in enumerate(model.transformer.blocks)]
    try:
        with torch.no_grad():
            result = model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [outs[i] for i in range(len(outs))], result


def perturbed(model: VLMo, block: int, expert: str) -> VLMo:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in getattr(other.transformer.blocks[block], expert).parameters():
            p.add_(torch.randn_like(p))
    return other


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_config_files_match_presets(name):
    config = VLMoConfig.from_json(REPO / "configs" / "models" / f"vlmo-{name}.json")
    assert config == getattr(VLMoConfig, name)()
    assert VLMoConfig.resolve(f"vlmo-{name}") == config


def test_config_release_sizes_and_errors(tmp_path):
    base, large = VLMoConfig.base(), VLMoConfig.large()
    assert (base.width, base.depth, base.heads, base.vl_start, base.vocab_size) == (768, 12, 12, 10, 30522)
    assert (large.width, large.depth, large.heads, large.vl_start) == (1024, 24, 16, 21)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"width": 64, "depht": 2}))
    with pytest.raises(ConfigError, match="depht"):
        VLMoConfig.from_json(bad)
    with pytest.raises(ConfigError, match="vl_layers"):
        VLMoConfig.tiny(vocab_size=10, vl_layers=5)
    with pytest.raises(ConfigError, match="max_text_len"):
        VLMoConfig.tiny(vocab_size=10, max_text_len=40, text_rel_pos_len=32)


# -- routing ---------------------------------------------------------------------------------------
def test_fusion_routing_below_vl_layers():
    config = tiny()
    model = randomised(config)
    images, tokens = inputs(config)
    num_text = tokens.shape[1]
    base, _ = block_outputs(model, images=images, text_tokens=tokens, mode="fusion")
    for block in range(config.vl_start):
        text_changed, _ = block_outputs(perturbed(model, block, "mlp_text"), images=images, text_tokens=tokens, mode="fusion")
        image_changed, _ = block_outputs(perturbed(model, block, "mlp_imag"), images=images, text_tokens=tokens, mode="fusion")
        # L-FFN perturbed: every image position of this block's output is unchanged, every text position differs
        assert torch.equal(text_changed[block][:, num_text:], base[block][:, num_text:])
        assert (text_changed[block][:, :num_text] - base[block][:, :num_text]).abs().amax(-1).min() > 1e-4
        # V-FFN perturbed: the reverse
        assert torch.equal(image_changed[block][:, :num_text], base[block][:, :num_text])
        assert (image_changed[block][:, num_text:] - base[block][:, num_text:]).abs().amax(-1).min() > 1e-4


def test_fusion_routing_in_vl_layers():
    config = tiny()
    model = randomised(config)
    images, tokens = inputs(config)
    base, base_out = block_outputs(model, images=images, text_tokens=tokens, mode="fusion")
    for block in range(config.vl_start, config.depth):
        vl, _ = block_outputs(perturbed(model, block, "mlp_vl"), images=images, text_tokens=tokens, mode="fusion")
        assert (vl[block] - base[block]).abs().amax(-1).min() > 1e-4  # text and image positions alike
        for expert in ("mlp_text", "mlp_imag", "norm2_text", "norm2_imag"):
            _, out = block_outputs(perturbed(model, block, expert), images=images, text_tokens=tokens, mode="fusion")
            for key in ("text_feats", "image_feats", "cls_feats"):
                assert torch.equal(out[key], base_out[key]), (block, expert, key)


def test_single_modality_modes_use_their_own_expert_in_every_block():
    config = tiny()
    model = randomised(config)
    images, tokens = inputs(config)
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
    top = config.depth - 1
    # the VL-FFN plays no part in the dual-encoder path; the modality's own expert in a top block does
    for expert, same_image, same_text in (("mlp_vl", True, True), ("mlp_imag", False, True), ("mlp_text", True, False)):
        other = perturbed(model, top, expert)
        with torch.no_grad():
            assert torch.equal(other.encode_image(images), image) == same_image, expert
            assert torch.equal(other.encode_text(tokens), text) == same_text, expert
    # the VL path (vl=True) does go through the top VL-FFN
    with torch.no_grad():
        _, vl_image = model.encode_image(images, vl=True)
        _, vl_image_perturbed = perturbed(model, top, "mlp_vl").encode_image(images, vl=True)
    assert not torch.allclose(vl_image, vl_image_perturbed)


def test_routing_by_any_modality_order_matches_per_token_experts():
    config = tiny()
    torch.manual_seed(3)
    block = Block(config, with_vl=False, drop_path=0.0).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 9, config.width)
    modality = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    routing = Routing.from_modality(modality)
    assert routing.split is None
    got = block.ffn(x, routing)
    for pos, m in enumerate(modality.tolist()):
        expected = block.ffn(x[:, pos : pos + 1], "text" if m == 0 else "image")
        torch.testing.assert_close(got[:, pos : pos + 1], expected, rtol=1e-5, atol=1e-5)
    assert Routing.from_modality(torch.tensor([0, 0, 0, 1, 1])).split == 3


# -- embeddings ------------------------------------------------------------------------------------
def test_dual_encoder_shapes_unit_norm_and_padding_invariance():
    config = tiny(embed_dim=48)
    model = randomised(config)
    images, tokens = inputs(config, n=4, text_len=8)
    with torch.no_grad():
        out = model(images=images, text_tokens=tokens, mode="dual", vl=True)
        for key in ("image_cls", "text_cls", "image_vl_cls", "text_vl_cls"):
            assert out[key].shape == (4, 48)
            torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
        padded = torch.cat([tokens, torch.zeros(4, config.max_text_len - 8, dtype=torch.long)], 1)
        # (equal up to float rounding: the matmuls differ in length)
        torch.testing.assert_close(model.encode_text(padded), out["text_cls"], rtol=1e-5, atol=1e-5)
        fused, fused_padded = model.fuse(images, tokens), model.fuse(images, padded)
        torch.testing.assert_close(fused_padded["cls_feats"], fused["cls_feats"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_padded["image_feats"], fused["image_feats"], rtol=1e-5, atol=1e-5)
        # a real token where a pad was does change it
        changed = padded.clone()
        changed[1, -1] = 7
        assert not torch.allclose(model.encode_text(changed)[1], out["text_cls"][1])
    assert text_attention_mask(padded).sum(1).tolist() == (tokens != 0).sum(1).tolist()


def test_fusion_outputs_and_absolute_position_variant():
    config = tiny(rel_pos_bias=False, layer_scale_init=None, qkv_bias=False)
    model = randomised(config)
    names = set(model.state_dict())
    assert "transformer.pos_embed" in names and "relative_position_bias_table" not in names
    assert not any("gamma_1" in n or "q_bias" in n for n in names)
    images, tokens = inputs(config)
    with torch.no_grad():
        out = model.fuse(images, tokens, mlm=True)
    assert out["itm_logits"].shape == (3, 2)
    assert out["mlm_logits"].shape == (3, tokens.shape[1], VOCAB)
    assert out["image_feats"].shape == (3, config.num_image_tokens, config.width)


def test_text_positions_come_from_the_bias_table_when_relative():
    config = tiny()
    model = randomised(config)
    _, tokens = inputs(config)
    with torch.no_grad():
        before = model.encode_text(tokens)
        model.text_embeddings.position_embeddings.weight.add_(1.0)  # unused, as in the release
        assert torch.equal(model.encode_text(tokens), before)
        model.relative_position_bias_table.add_(torch.randn_like(model.relative_position_bias_table))
        assert not torch.allclose(model.encode_text(tokens), before)


# -- activation checkpointing ----------------------------------------------------------------------
def test_activation_checkpointing_same_outputs_and_gradients():
    config = tiny(dropout=0.1, drop_path=0.1)
    plain = randomised(config).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    images, tokens = inputs(config, n=2, text_len=8)

    def run(model):
        model.zero_grad()
        torch.manual_seed(7)
        dual = model(images=images, text_tokens=tokens, mode="dual", vl=True)
        fused = model.fuse(images, tokens, mlm=True)
        loss = (dual["image_cls"] @ dual["text_cls"].T).sum() + dual["image_vl_cls"].sum() + fused["itm_logits"].sum() \
            + fused["mlm_logits"].square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = run(plain)
    loss_b, grads_b = run(ckpt)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    # and checkpointing really ran: the same forward without it under no_grad still matches
    ckpt.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt.encode_image(images), plain.encode_image(images), rtol=0, atol=0)


# -- the release checkpoint converter ----------------------------------------------------------------
def release_index_buffers(grid: int, text_len: int, text_rel_len: int) -> dict[str, torch.Tensor]:
    """The release's three index tables, derived here from its description (dtypes as the release builds them)."""
    num_image = (2 * grid - 1) ** 2 + 3
    num_all = num_image + 2 * text_rel_len + 2
    n = grid * grid
    image = torch.zeros(n + 1, n + 1, dtype=torch.long)
    for a in range(n):
        for b in range(n):
            dy, dx = a // grid - b // grid, a % grid - b % grid
            image[a + 1, b + 1] = (dy + grid - 1) * (2 * grid - 1) + (dx + grid - 1)
    image[0, :], image[:, 0], image[0, 0] = num_image - 3, num_image - 2, num_image - 1
    text = torch.zeros(text_len, text_len, dtype=torch.long)
    for i in range(1, text_len):
        for j in range(1, text_len):
            text[i, j] = (j - i) - (2 - text_rel_len) + num_image + 2
    text[0, :], text[:, 0], text[0, 0] = num_all - 3, num_all - 2, num_all - 1
    both = torch.empty(text_len + n + 1, text_len + n + 1)  # float in the release
    both[:text_len, :text_len] = text
    both[:text_len, text_len:] = num_image
    both[text_len:, :text_len] = num_image + 1
    both[text_len:, text_len:] = image
    return {"relative_position_index": image, "text_relative_position_index": text, "text_imag_relative_position_index": both}


def release_state(config: VLMoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint under the release's names and shapes (per the release's description)."""
    g = torch.Generator().manual_seed(seed)
    d, hidden, v = config.width, config.mlp_hidden, config.vocab_size
    num_image = (2 * config.grid - 1) ** 2 + 3
    shapes = {
        "transformer.cls_token": (1, 1, d),
        "transformer.patch_embed.proj.weight": (d, 3, config.patch_size, config.patch_size),
        "transformer.patch_embed.proj.bias": (d,),
        "transformer.norm.weight": (d,), "transformer.norm.bias": (d,),
        "text_embeddings.word_embeddings.weight": (v, d),
        "text_embeddings.position_embeddings.weight": (config.max_text_len, d),
        "text_embeddings.token_type_embeddings.weight": (2, d),
        "text_embeddings.LayerNorm.weight": (d,), "text_embeddings.LayerNorm.bias": (d,),
        "token_type_embeddings.weight": (2, d),
        "relative_position_bias_table": (num_image + 2 * config.text_rel_pos_len + 2, config.heads * config.depth),
        "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
        "itm_score.fc.weight": (2, d), "itm_score.fc.bias": (2,),
        "mlm_score.bias": (v,), "mlm_score.transform.dense.weight": (d, d), "mlm_score.transform.dense.bias": (d,),
        "mlm_score.transform.LayerNorm.weight": (d,), "mlm_score.transform.LayerNorm.bias": (d,),
        "mlm_score.decoder.weight": (v, d),
        "itc_text_proj.fc.weight": (d, d), "itc_image_proj.fc.weight": (d, d),
        "itc_vl_text_proj.fc.weight": (d, d), "itc_vl_image_proj.fc.weight": (d, d),
        "logit_scale": (), "logit_vl_scale": (),
    }
    for i in range(config.depth):
        p = f"transformer.blocks.{i}."
        shapes.update({p + "gamma_1": (d,), p + "gamma_2": (d,), p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                       p + "attn.q_bias": (d,), p + "attn.v_bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                       p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,)})
        experts = ("text", "imag", "vl") if i >= config.depth - config.vl_layers else ("text", "imag")
        for e in experts:
            shapes.update({p + f"norm2_{e}.weight": (d,), p + f"norm2_{e}.bias": (d,),
                           p + f"mlp_{e}.fc1.weight": (hidden, d), p + f"mlp_{e}.fc1.bias": (hidden,),
                           p + f"mlp_{e}.fc2.weight": (d, hidden), p + f"mlp_{e}.fc2.bias": (d,)})
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    state["text_embeddings.position_ids"] = torch.arange(config.max_text_len).unsqueeze(0)
    state.update(release_index_buffers(config.grid, config.max_text_len, config.text_rel_pos_len))
    return state


def wrapped(state):
    return {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}


def test_conversion_round_trip_and_identical_models():
    conv = converter()
    config = tiny()
    original = release_state(config)
    converted = conv.release_to_mmscale(wrapped(original), config)
    assert converted["logit_scale"].shape == (1,) and converted["logit_vl_scale"].shape == (1,)
    a, b = VLMo(config).eval(), VLMo(config).eval()
    a.load_state_dict(converted, strict=True)
    b.load_state_dict(copy.deepcopy(converted), strict=True)
    assert a.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images, tokens = inputs(config)
    with torch.no_grad():
        for mode in ("dual", "fusion"):
            out_a, out_b = a(images=images, text_tokens=tokens, mode=mode), b(images=images, text_tokens=tokens, mode=mode)
            assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    back = conv.mmscale_to_release(a.state_dict(), config)
    assert list(sorted(back)) == list(sorted(original))
    for key, value in original.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    # through an encoder-style prefix too
    prefixed = {"encoder.model." + k: v for k, v in a.state_dict().items()} | {"item_tower.fuse.0.weight": torch.ones(2)}
    assert sorted(conv.mmscale_to_release(prefixed)) == sorted(original)


def test_conversion_fills_absent_derived_buffers_and_checks_present_ones():
    conv = converter()
    config = tiny()
    state = release_state(config)
    for key in ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index",
                "text_embeddings.position_ids"):
        del state[key]
    notes = []
    converted = conv.release_to_mmscale(state, config, notes=notes)
    assert len(notes) == 4
    VLMo(config).load_state_dict(converted, strict=True)
    bad = release_state(config)
    bad["text_relative_position_index"][2, 3] += 1
    with pytest.raises(conv.ConversionError, match="text_relative_position_index"):
        conv.release_to_mmscale(bad, config)


def test_conversion_refusals_name_keys_and_shapes():
    conv = converter()
    config = tiny()
    state = release_state(config)
    del state["transformer.blocks.1.mlp_imag.fc2.weight"]
    state["transformer.blocks.0.mlp_vl.fc1.weight"] = torch.zeros(3, 4)
    state["transformer.cls_token"] = torch.zeros(1, 1, 32)
    with pytest.raises(conv.ConversionError) as err:
        conv.release_to_mmscale(wrapped(state), config)
    message = str(err.value)
    assert "transformer.blocks.1.mlp_imag.fc2.weight [64, 256]" in message
    assert "transformer.blocks.0.mlp_vl.fc1.weight [3, 4]" in message
    assert "transformer.cls_token: checkpoint [1, 1, 32] vs model [1, 1, 64]" in message
    assert err.value.missing == ["transformer.blocks.1.mlp_imag.fc2.weight"]
    assert err.value.unexpected == ["transformer.blocks.0.mlp_vl.fc1.weight"]
    assert err.value.mismatched == ["transformer.cls_token"]
    for change in ("missing", "unexpected", "shape"):
        state = release_state(config)
        if change == "missing":
            del state["itm_score.fc.bias"]
            expect = "itm_score.fc.bias [2]"
        elif change == "unexpected":
            state["vqa_classifier.0.weight"] = torch.zeros(5, 5)
            expect = "vqa_classifier.0.weight [5, 5]"
        else:
            state["relative_position_bias_table"] = torch.zeros(10, 8)
            expect = "relative_position_bias_table: checkpoint [10, 8] vs model [86, 8]"  # 7*7+3 + 2*16 + 2 rows
        with pytest.raises(conv.ConversionError, match=re.escape(expect)):
            conv.release_to_mmscale(state, config)


def conversion_cli(argv: list[str]) -> int:
    """tools/convert_vlmo_checkpoint.py's command line, run in this process."""
    return load_program("tools/convert_vlmo_checkpoint.py").main(argv)


def test_conversion_command_line(tmp_path, capsys):
    config = tiny()
    (tmp_path / "tiny.json").write_text(json.dumps(config.to_dict()))
    src = tmp_path / "release.pt"
    state = release_state(config)
    # a retrieval fine-tuned checkpoint: only the dual-encoder heads
    for key in [k for k in state if k.startswith(("itm_score", "mlm_score", "itc_vl_", "logit_vl_scale"))]:
        del state[key]
    torch.save(wrapped(state), src)
    out = tmp_path / "vlmo.safetensors"
    assert conversion_cli(["import", str(src), str(out), "--config", str(tmp_path / "tiny.json")]) == 2
    assert "missing keys" in capsys.readouterr().err
    assert conversion_cli(["import", str(src), str(out), "--config", str(tmp_path / "tiny.json"), "--init-missing-heads"]) == 0
    assert "itm_score.fc.weight: not in the checkpoint" in capsys.readouterr().out
    from safetensors.torch import load_file

    model = VLMo(config)
    model.load_state_dict(load_file(str(out)), strict=True)
    assert torch.equal(model.transformer.cls_token, state["transformer.cls_token"])
    exported = tmp_path / "back.pt"
    assert conversion_cli(["export", str(out), str(exported), "--config", str(tmp_path / "tiny.json")]) == 0
    back = torch.load(exported, weights_only=True)["state_dict"]
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert back["logit_vl_scale"].dim() == 0


# -- tokenizer and the item encoder ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    if ITEMS.is_file():
        texts = []
        for line in ITEMS.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record.get("title") or "", record.get("description") or ""]
    else:
        texts = ["A cowboy doll is threatened by a new spaceman figure.", "A secret agent stops a crime syndicate.",
                 "Four tales take place in a fading hotel on New Year's Eve."] * 10
    return build_wordpiece_tokenizer(texts, 600, tmp_path_factory.mktemp("wordpiece"))


def test_wordpiece_tokenizer(tokenizer_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert [raw.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert (tokenizer_dir / "vocab.txt").is_file()
    encoder = VLMoEncoder(VLMoConfig.tiny(max_text_len=10, text_rel_pos_len=16), tokenizer=tokenizer_dir)
    tokenize = encoder.preprocess().tokenize
    assert encoder.config.vocab_size == tokenize.vocab_size <= 600
    long_text = "the story of a toy cowboy doll and a spaceman " * 5
    tokens = tokenize(["A cowboy doll", long_text, ""])
    assert tokens.shape == (3, 10) and tokens.dtype == torch.long
    assert tokens[:, 0].tolist() == [2, 2, 2]
    short = tokens[0][tokens[0] != 0].tolist()
    assert short[-1] == 3 and len(short) >= 4 and tokens[0, len(short):].eq(0).all()
    assert tokens[1].ne(0).all() and tokens[1, -1] == 3  # truncated to max_text_len, [SEP] kept
    assert tokens[2].tolist()[:2] == [2, 3] and tokens[2, 2:].eq(0).all()
    assert raw.decode(short[1:-1]) == "a cowboy doll"  # lower-cased
    # the same vocabulary from vocab.txt gives the same ids; and pickling (data workers) keeps it
    import pickle

    from mmscale.models.vlmo import WordPieceTokenize

    from_vocab = WordPieceTokenize(tokenizer_dir / "vocab.txt", 10)
    assert torch.equal(from_vocab(["A cowboy doll", long_text]), tokens[:2])
    assert torch.equal(pickle.loads(pickle.dumps(tokenize))(["A cowboy doll"]), tokens[:1])


def test_item_encoder_end_to_end(tokenizer_dir, tmp_path):
    config = VLMoConfig.tiny(max_text_len=16, text_rel_pos_len=16)
    encoder = VLMoEncoder(config, tokenizer=tokenizer_dir).eval()
    assert isinstance(encoder, ItemEncoder) and encoder.embed_dim == 64
    assert encoder.logit_scale.shape == (1,)
    pre = encoder.preprocess()
    image = pre.image_transform(Image.new("RGB", (48, 70), (255, 0, 0)))
    assert image.shape == (3, 32, 32) and pre.image_size == 32
    torch.testing.assert_close(image[0], torch.ones(32, 32))  # red: (1 - 0.5) / 0.5
    torch.testing.assert_close(image[1], -torch.ones(32, 32))
    images = torch.stack([image, -image])
    tokens = pre.tokenize(["a cowboy doll", "a space weapon is stolen"])
    with torch.no_grad():
        img_emb, txt_emb = encoder(images, tokens)
        fused = encoder.fuse(images, tokens)
    assert img_emb.shape == txt_emb.shape == (2, 64)
    torch.testing.assert_close(img_emb.norm(dim=-1), torch.ones(2))
    assert fused.shape == (2, 64)
    # weights saved in mmscale's layout load strictly into a second encoder: identical outputs
    from safetensors.torch import save_file

    path = tmp_path / "vlmo.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    other = VLMoEncoder(config, pretrained=str(path), tokenizer=tokenizer_dir).eval()
    with torch.no_grad():
        assert torch.equal(other(images, tokens)[0], img_emb) and torch.equal(other.fuse(images, tokens), fused)
    with pytest.raises(ConfigError, match="tokenizer"):
        VLMoEncoder(config)
    # a JSON config naming its tokenizer relative to its own folder (vocab_size null: the tokenizer's)
    spec = tokenizer_dir.parent / "vlmo.json"
    spec.write_text(json.dumps(config.to_dict() | {"tokenizer": tokenizer_dir.name}))
    from_json = VLMoEncoder(str(spec), pretrained=str(path))
    assert from_json.config.vocab_size == pre.tokenize.vocab_size
    assert torch.equal(from_json.preprocess().tokenize(["a cowboy doll"]), tokens[:1])
    with pytest.raises(ConfigError, match="vocab_size"):
        VLMoEncoder(VLMoConfig.tiny(vocab_size=8, max_text_len=16, text_rel_pos_len=16), tokenizer=tokenizer_dir)
