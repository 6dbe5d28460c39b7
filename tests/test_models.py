"""Model shapes, attention properties and the focal loss (paper 000, eq. 5-8, 12-14)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defectscope.models import create_model, list_models
from defectscope.models.layers import CrossAttentionFusion, FocalLoss, SelfAttentionHead


def test_registry():
    assert {"multiscale", "classifier"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope")


def test_multiscale_shapes_and_attention_rows_sum_to_one():
    m = create_model("multiscale", backbone="resnet18", num_classes=6, image_size=200, low_res=128,
                     embed_dim=64, num_heads=4).eval()
    with torch.no_grad():
        logits, attn = m.forward_with_attention(torch.rand(3, 3, 200, 200))
    assert logits.shape == (3, 6)
    assert attn.shape == (3, 4, 7 * 7, 4 * 4)  # 200 px -> 7x7 query tokens, 128 px -> 4x4 key tokens
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 49))
    # other input sizes are resized to the configured scales
    with torch.no_grad():
        assert m(torch.rand(1, 3, 150, 170)).shape == (1, 6)


def test_multiscale_rejects_bad_scales_and_inputs():
    with pytest.raises(ValueError, match="low_res"):
        create_model("multiscale", backbone="resnet18", num_classes=2, image_size=128, low_res=200)
    m = create_model("multiscale", backbone="resnet18", num_classes=2, embed_dim=32, num_heads=4)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        m(torch.rand(2, 200, 200))


def test_cross_attention_fusion_residual_and_errors():
    fus = CrossAttentionFusion(query_dim=32, kv_dim=16, num_heads=4).eval()
    q, kv = torch.randn(2, 10, 32), torch.randn(2, 5, 16)
    out, w = fus(q, kv)
    assert out.shape == (2, 10, 32) and w.shape == (2, 4, 10, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10))
    # eq. 8: LayerNorm output has zero mean / unit variance per token
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 10), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="keys/values"):
        fus(q, torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionFusion(30, 16, num_heads=4)


def test_self_attention_head_is_permutation_invariant():
    head = SelfAttentionHead(32, num_classes=3, num_heads=4).eval()
    tokens = torch.randn(2, 9, 32)
    with torch.no_grad():
        a, b = head(tokens), head(tokens[:, torch.randperm(9)])
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_focal_loss_matches_equation_14():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    # gamma = 0 is cross-entropy
    torch.testing.assert_close(FocalLoss(0.0)(logits, target), F.cross_entropy(logits, target))
    p = logits.softmax(-1)[torch.arange(2), target]
    expected = (-(1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(FocalLoss(2.0)(logits, target), expected)
    # well-classified samples are down-weighted more than hard ones
    per = FocalLoss(2.0, reduction="none")(logits, target) / F.cross_entropy(logits, target, reduction="none")
    assert per[0] < per[1]
