"""Grad-MobileNet features (paper 001 eq. 2-3, section 4.3), one-class SVM, clustering metrics, PatchCore pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from defectscope.evaluation.anomaly import cluster_accuracy, clustering_metrics, image_metrics, pixel_auroc
from defectscope.models.grad_mobilenet import (
    GradientFeatureSpec,
    OneClassScorer,
    artificial_landmark,
    gradient_features,
    gradient_norm,
    input_gradient,
)
from defectscope.models.patchcore import greedy_coreset, nearest_distances


class TinyNet(nn.Module):
    """conv -> global mean -> 2 logits; small enough to check gradients by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_input_gradient_shape_finite_and_matches_autograd_per_image():
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(3, 3, 16, 12)
    g = input_gradient(net, x, target=0)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    # per-image gradient does not depend on the batch: compare with image 1 alone
    g1 = input_gradient(net, x[1:2], target=0)
    torch.testing.assert_close(g[1:2], g1)
    # eq. 3: per-pixel L2 norm over the colour channels
    n = gradient_norm(g)
    assert n.shape == (3, 16, 12)
    torch.testing.assert_close(n[2, 5, 7], torch.sqrt((g[2, :, 5, 7] ** 2).sum()))
    # the gradient points away from the target: a small step against it lowers the loss
    loss = lambda z: nn.functional.cross_entropy(net(z), torch.zeros(3, dtype=torch.long), reduction="sum")  # noqa: E731
    assert loss(x - 1e-2 * g) < loss(x)


def test_zero_gradient_case_gives_finite_features():
    net = TinyNet().eval()
    with torch.no_grad():
        net.conv.weight.zero_()  # output no longer depends on the input
    x = torch.rand(2, 3, 20, 8)
    g = input_gradient(net, x)
    assert torch.count_nonzero(g) == 0
    gn = gradient_norm(g)
    spec = GradientFeatureSpec(grid=(5, 2), bins=4).fit_range(gn)
    f = gradient_features(gn, artificial_landmark(x), spec)
    assert f.shape == (2, spec.dim) == (2, 5 * 2 + 4 + 1)
    assert torch.isfinite(f).all()
    hist = f[:, 10:14]
    torch.testing.assert_close(hist.sum(1), torch.ones(2))


def test_feature_layout_pooled_map_histogram_landmark():
    gn = torch.zeros(1, 4, 4)
    gn[0, :2, :2] = 1e-3  # top-left cell hot
    gn[0, 2:, 2:] = 1e-6
    x = torch.zeros(1, 3, 4, 4)
    x[0, :, :, :2] = 40 / 255  # half the pixels have grey level 40 (inside 0..50)
    x[0, :, :, 2:] = 200 / 255
    spec = GradientFeatureSpec(grid=(2, 2), bins=2, hist_range=(-7.0, -2.0))
    f = gradient_features(gn, artificial_landmark(x), spec)[0]
    torch.testing.assert_close(f[:4], torch.log10(torch.tensor([1e-3, 0.0, 0.0, 1e-6]) + 1e-20))
    # bins [-7, -4.5) and [-4.5, -2]: zeros clip into bin 0, 1e-6 in bin 0, 1e-3 in bin 1
    torch.testing.assert_close(f[4:6], torch.tensor([12 / 16, 4 / 16]))
    assert f[6].item() == pytest.approx(0.5)


def test_features_reject_unfitted_spec():
    with pytest.raises(ValueError, match="hist_range"):
        gradient_features(torch.zeros(1, 4, 4), torch.zeros(1), GradientFeatureSpec())


def test_one_class_svm_separates_an_easy_case():
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, size=(200, 5))
    scorer = OneClassScorer(nu=0.05).fit(normal)
    near = rng.normal(0, 1, size=(50, 5))
    far = rng.normal(8, 1, size=(50, 5))
    assert scorer.predict(far).all()
    # nu bounds the training outlier fraction (5 %); on fresh normal samples an RBF boundary fitted to
    # 200 points in 5-D flags more (22 % with this seed), far less than the 100 % of the far cluster.
    assert scorer.predict(near).mean() < 0.3
    m = image_metrics(np.r_[np.zeros(50), np.ones(50)], scorer.score(np.r_[near, far]), scorer.predict(np.r_[near, far]))
    assert m["image_auroc"] == 1.0 and m["f1"] > 0.9


def test_cluster_accuracy_against_hand_computed_values():
    # clusters are a relabelling of the classes: perfect
    assert cluster_accuracy([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1]) == 1.0
    # contingency [[2,1],[0,3]] -> best matching 2 + 3 = 5 of 6
    assert cluster_accuracy([0, 0, 0, 1, 1, 1], [5, 5, 7, 7, 7, 7]) == pytest.approx(5 / 6)
    # one cluster for everything: only the largest class can be matched (3 of 5)
    assert cluster_accuracy([0, 0, 0, 1, 1], [4, 4, 4, 4, 4]) == pytest.approx(3 / 5)
    # more clusters than classes: unmatched cluster counts as wrong -> (2 + 1) / 4
    assert cluster_accuracy([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(3 / 4)
    m = clustering_metrics(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
    assert m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cluster_accuracy([0, 1], [0])


def test_pixel_auroc_and_shape_check():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1, 1] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1] = 5.0
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(maps, np.zeros_like(masks)) is None
    with pytest.raises(ValueError, match="differ"):
        pixel_auroc(maps[:1], masks)


def test_greedy_coreset_picks_far_points_and_nn_distance():
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [0.05, 0.05]])
    idx = greedy_coreset(pts, 3, proj_dim=128, seed=0)
    assert len(set(idx.tolist())) == 3
    assert {2, 3} <= set(idx.tolist())  # the two far points are always chosen
    d = nearest_distances(torch.tensor([[[10.0, 1.0], [0.0, 0.0]]]), pts[idx])  # [B, Q, D] -> [B, Q]
    assert d.shape == (1, 2) and d[0, 0].item() == pytest.approx(1.0)
    exact = torch.cdist(torch.tensor([[0.0, 0.0]]), pts[idx]).amin()
    assert d[0, 1].item() == pytest.approx(exact.item(), abs=1e-5)


def test_patchcore_score_border_leaves_edge_cells_out_of_the_image_score():
    from defectscope.models import create_model
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48)
    full = create_model("patchcore", backbone="efficientnet_lite0", layers=[2], pretrained=False)
    inner = create_model("patchcore", backbone="efficientnet_lite0", layers=[2], pretrained=False, score_border=2)
    inner.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        emb = full.features(x)
    b, d, h, w = emb.shape
    bank = emb.permute(0, 2, 3, 1).reshape(-1, d)[::7].clone()
    full.memory_bank = bank
    inner.memory_bank = bank
    dist = torch.cdist(emb.permute(0, 2, 3, 1).reshape(-1, d), bank).amin(1).view(b, h, w)
    with torch.no_grad():
        s_full, m_full = full(x)
        s_inner, m_inner = inner(x)
    torch.testing.assert_close(s_full, dist.flatten(1).amax(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_inner, dist[:, 2:-2, 2:-2].flatten(1).amax(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m_full, m_inner)  # the map keeps the edge cells
    with pytest.raises(ValueError, match="score_border"):
        create_model("patchcore", backbone="efficientnet_lite0", layers=[2], pretrained=False, score_border=-1)


def test_one_class_svm_state_reloads_without_pickle_and_scores_identically(tmp_path):
    """The fitted boundary is stored as tensors (weights_only load) and rebuilt scores equal the run's bit for bit;
    both agree with scikit-learn's own decision function."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    rng = np.random.default_rng(1)
    normal = rng.normal(0, 1, size=(120, 6)) * np.array([1, 2, 3, 0.5, 10, 1]) + 4
    test = np.r_[rng.normal(0, 1, size=(30, 6)) + 4, rng.normal(9, 1, size=(10, 6))]
    scorer = OneClassScorer(nu=0.1).fit(normal)
    path = tmp_path / "ocsvm.pt"
    torch.save({"ocsvm": scorer.state_dict()}, path)
    state = torch.load(path, weights_only=True)["ocsvm"]
    assert all(isinstance(v, (torch.Tensor, float)) for v in state.values())
    reloaded = OneClassScorer.from_state(state)
    np.testing.assert_array_equal(reloaded.score(test), scorer.score(test))
    ref = make_pipeline(StandardScaler(), OneClassSVM(kernel="rbf", nu=0.1, gamma="scale")).fit(normal)
    np.testing.assert_allclose(scorer.score(test), -ref.decision_function(test), rtol=1e-9, atol=1e-12)
    assert (scorer.predict(test) == (ref.predict(test) == -1)).all()
    bad = dict(state)
    del bad["dual_coef"]
    with pytest.raises(ValueError, match="model.ckpt: one-class SVM state lacks dual_coef"):
        OneClassScorer.from_state(bad, "model.ckpt")
    with pytest.raises(ValueError, match="not fitted"):
        OneClassScorer().score(test)


def test_constructors_refuse_unknown_keywords():
    from defectscope.models import create_model
    from defectscope.models.registry import ModelArgumentError

    with pytest.raises(ModelArgumentError, match="dropuot: not an argument of model 'grad_mobilenet'"):
        create_model("grad_mobilenet", backbone="efficientnet_lite0", dropuot=0.1)
    with pytest.raises(ModelArgumentError, match="corset_ratio"):
        create_model("patchcore", backbone="efficientnet_lite0", layers=[2], pretrained=False, corset_ratio=0.1)


def test_patchcore_reweighting_is_the_papers_eq_7_on_a_hand_computed_bank():
    """Roth et al. 2022, eq. 7: s = (1 - exp d(m_test*, m*) / sum_{m in N_b(m*)} exp d(m_test*, m)) * s*."""
    from defectscope.models.patchcore import reweighted_score

    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 1.0], [10.0, -1.0], [-30.0, 0.0]])
    q = torch.tensor([[[0.0, 0.5], [4.0, 0.0]]])  # the second patch is the farthest: s* = 4, m* = bank[0]
    d, idx = nearest_distances(q, bank, return_index=True)
    assert idx.tolist() == [[0, 0]] and d[0].tolist() == pytest.approx([0.5, 4.0])
    got = reweighted_score(d, idx, q, bank, neighbours=3).item()
    near = np.array([4.0, 6.0, np.sqrt(37.0)])  # d(m_test*, .) for N_3(m*) = bank rows 0, 1, then 2 or 3 (tied)
    assert got == pytest.approx((1 - np.exp(near[0]) / np.exp(near).sum()) * 4.0, rel=1e-5)
    # the more bank rows around m*, the less of s* a far patch loses: b = 2 keeps more than b = 3
    assert reweighted_score(d, idx, q, bank, neighbours=2).item() < got < 4.0
    with pytest.raises(ValueError, match="neighbours must be >= 2"):
        reweighted_score(d, idx, q, bank, neighbours=1)


def test_patchcore_reweighted_forward_inside_the_border_and_under_onnx_runtime(tmp_path):
    import onnxruntime as ort

    from defectscope.models import create_model
    from defectscope.models.patchcore import reweighted_score

    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48)
    plain = create_model("patchcore", layers=[2], pretrained=False, score_border=2)
    rew = create_model("patchcore", layers=[2], pretrained=False, score_border=2, reweight_neighbours=9)
    rew.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        emb = plain.features(x)
    b, d, h, w = emb.shape
    bank = emb.permute(0, 2, 3, 1).reshape(-1, d)[::5].clone()
    plain.memory_bank, rew.memory_bank = bank, bank.clone()
    with torch.no_grad():
        s_plain, m_plain = plain(x)
        s_rew, m_rew = rew(x)
        q = emb.permute(0, 2, 3, 1)[:, 2:-2, 2:-2].reshape(b, -1, d)  # the patches inside the border
        dist, idx = nearest_distances(q, bank, return_index=True)
    torch.testing.assert_close(s_rew, reweighted_score(dist, idx, q, bank, 9), rtol=1e-4, atol=1e-4)
    assert (s_rew < s_plain).all() and (s_rew > 0).all()  # a weight in (0, 1) on the same s*
    torch.testing.assert_close(m_rew, m_plain)  # the map is not re-weighted
    assert rew.args["reweight_neighbours"] == 9
    f = tmp_path / "pc.onnx"
    torch.onnx.export(rew, (x,), str(f), input_names=["image"], output_names=["pred_score", "anomaly_map"],
                      opset_version=17, dynamo=False, dynamic_axes={"image": {0: "batch"}, "pred_score": {0: "batch"}})
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], s_rew.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sess.run(None, {"image": x[1:].numpy()})[0], s_rew[1:].numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="reweight_neighbours"):
        create_model("patchcore", layers=[2], pretrained=False, reweight_neighbours=1)
