"""Weld fusion models: output shapes, attention rows summing to 1 (eval mode), baselines, U-Net."""

from __future__ import annotations

import pytest
import torch

from defectscope.models import create_model
from defectscope.models.weld_fusion import FUSIONS, build_fusion
from defectscope.models.weld_fusion.layers import InvertedEmbedding, ProbSparseSelfAttention, VanillaEmbedding

B, W, C, T = 2, 2, 4, 64


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, W, 3, 32, 64, generator=g), torch.rand(B, W, C, T, generator=g)


@pytest.mark.parametrize("kind", FUSIONS)
def test_fusion_module_shapes_and_attention_rows(kind):
    torch.manual_seed(0)
    fusion = build_fusion(kind, 16, 4).eval()
    img, spec = torch.randn(3, 10, 16), torch.randn(3, 4, 16)
    fused, attn = fusion(img, spec)
    n_out = 4 if kind == "s2v" else 10
    assert fused.shape == (3, n_out, 32 if kind == "concat" else 16)
    expected = {"v2s": {"v2s"}, "s2v": {"s2v"}, "bidirectional": {"v2s", "s2v"}, "add": set(), "concat": set()}[kind]
    assert set(attn) == expected
    for name, a in attn.items():
        q, k = (10, 4) if name == "v2s" else (4, 10)
        assert a.shape == (3, 4, q, k)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, q))


@pytest.mark.parametrize("kind", FUSIONS)
@pytest.mark.parametrize("embedding", ["inverted", "vanilla"])
def test_weld_fusion_net_end_to_end_shapes(inputs, kind, embedding):
    images, spectra = inputs
    model = create_model("weld_fusion", num_classes=7, channels=C, seq_len=T, fusion=kind, embedding=embedding,
                         spectral_dim=16, embed_dim=16, num_heads=4, backbone="efficientnet_lite0").eval()
    with torch.no_grad():
        logits, attn = model.forward_with_attention(images, spectra)
    assert logits.shape == (B, 7) and torch.isfinite(logits).all()
    m = C if embedding == "inverted" else T
    n = model.grid[0] * model.grid[1]
    for name, a in attn.items():
        assert a.shape == ((B, W, 4, n, m) if name == "v2s" else (B, W, 4, m, n))
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_cached_features_give_the_same_logits(inputs):
    images, spectra = inputs
    model = create_model("weld_fusion", num_classes=3, channels=C, seq_len=T, spectral_dim=16, embed_dim=16).eval()
    with torch.no_grad():
        feats = model.vision.backbone(images.flatten(0, 1))
        feats = feats.reshape(B, W, *feats.shape[1:])
        torch.testing.assert_close(model(images, spectra), model(feats, spectra))


BASELINE_KWARGS = {"weld_vision": {"embed_dim": 16, "num_heads": 4},
                   "weld_dlinear": {"channels": C, "seq_len": T, "welds": W, "spectral_dim": 16},
                   "weld_informer": {"channels": C, "seq_len": T, "welds": W, "embed_dim": 16, "num_heads": 4},
                   "weld_inverted": {"channels": C, "seq_len": T, "embed_dim": 16, "spectral_dim": 16, "num_heads": 4}}


@pytest.mark.parametrize("name", ["weld_vision", "weld_dlinear", "weld_informer", "weld_inverted"])
def test_baselines_shapes_and_gradients(inputs, name):
    images, spectra = inputs
    model = create_model(name, num_classes=5, **BASELINE_KWARGS[name])
    logits = model(images, spectra)
    assert logits.shape == (B, 5)
    logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_wrong_channel_count_is_a_clear_error(inputs):
    images, spectra = inputs
    model = create_model("weld_dlinear", num_classes=3, channels=C + 1, seq_len=T)
    with pytest.raises(ValueError, match="expected 5 channels"):
        model(images, spectra)


def test_embeddings():
    x = torch.randn(3, 4, 50)
    assert InvertedEmbedding(50, 8)(x).shape == (3, 4, 8)
    assert VanillaEmbedding(4, 50, 8)(x).shape == (3, 50, 8)


def test_probsparse_attention_is_deterministic_in_eval_and_matches_full_attention_for_short_sequences():
    torch.manual_seed(0)
    att = ProbSparseSelfAttention(16, 4, factor=5).eval()
    x = torch.randn(2, 12, 16)  # u = 5 * ceil(ln 12) = 15 >= 12: every query is active -> full attention
    full = torch.nn.functional.scaled_dot_product_attention(
        *[t.view(2, 12, 4, 4).transpose(1, 2) for t in att.qkv(x).chunk(3, -1)])
    torch.testing.assert_close(att(x), att.out(full.transpose(1, 2).reshape(2, 12, 16)))
    long = torch.randn(2, 200, 16)
    torch.testing.assert_close(att(long), att(long))


def test_seam_unet_shapes_and_divisibility_error():
    unet = create_model("weld_seam_unet", base=4, depth=3)
    assert unet(torch.rand(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    with pytest.raises(ValueError, match="divisible by 8"):
        unet(torch.rand(1, 3, 60, 64))


@pytest.mark.parametrize("name", ["weld_fusion", "weld_vision", "weld_dlinear", "weld_informer", "weld_inverted", "weld_seam_unet"])
def test_constructors_reject_unknown_keywords(name):
    from defectscope.models.registry import ModelArgumentError

    with pytest.raises(ModelArgumentError, match=f"dropuot: not an argument of model '{name}'"):
        create_model(name, dropuot=0.1, **({} if name == "weld_seam_unet" else {"num_classes": 3}),
                     **({"channels": C} if name not in ("weld_vision", "weld_seam_unet") else {}))


def test_recipe_model_kwargs_build_every_weld_model():
    from defectscope.engine.weld import WeldModelConfig, build_weld_model, model_kwargs

    for name in ["weld_fusion", "weld_vision", "weld_dlinear", "weld_informer", "weld_inverted"]:
        mcfg = WeldModelConfig(name=name, pretrained=False, embed_dim=16, spectral_dim=16)
        model = build_weld_model(mcfg, model_kwargs(mcfg, 3, C, T, W)).eval()
        with torch.no_grad():
            assert model(torch.rand(B, W, 3, 32, 64), torch.rand(B, W, C, T)).shape == (B, 3)
