"""5-fold cross-validation of the weld models: the structure of paper 000's Tables 4, 6, 7 and 8.

Usage::

    python benchmarks/weld_ablation.py --out /work/runs/weld_ablation            # all variants, 603 simulated samples
    python benchmarks/weld_ablation.py --out RUN --variants fusion_v2s,vision_only --samples 210 --epochs 15

What it does (on the simulated set unless ``--data`` names a real folder):

1. simulates the data (seeded), trains the seam U-Net once on the training part of fold 1 and
   crops every weld twice: segmented (background blanked) and raw (Fig. 16 ablation); reports the
   seam Dice on fold 1's held-out samples;
2. computes the frozen EfficientNet-Lite0 (ImageNet) feature maps of every crop once; every variant
   then trains its projection, spectral branch, fusion and head on them (the CPU budget of this
   machine; the paper fine-tunes MobileNetV2 on 512 px images on a GPU);
3. for each variant, 5 stratified folds: channel selection and min-max statistics on the training
   folds, ``--epochs`` epochs of AdamW (lr ``--lr``) with focal loss, weighted precision/recall/F1
   and per-class F1 on the held-out fold; mean +- std over folds;
4. per variant: parameters and FLOPs (``torch.utils.flop_counter``) of the full model for one sample
   (two 48 x 192 crops + spectra, backbone included) and images/s of the full model in eval mode
   (batch 16 samples, measured in this process one variant after the other: compare ratios only).

Writes ``OUT/ablation.json`` and ``OUT/ablation.md`` (the table) and prints the table. The data are
SYNTHETIC unless ``--data`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold

from defectscope.data.weld.simulate import simulate_weld_dataset
from defectscope.engine.weld import (
    WeldRecipe,
    cached_features,
    crop_welds,
    dice_score,
    fit_spectral_prep,
    model_kwargs,
    predict_masks,
    train_seam_unet,
)
from defectscope.data.weld.format import read_weld_dataset
from defectscope.models import create_model
from defectscope.models.layers.losses import FocalLoss

# name -> (table, model overrides, crops)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "fusion_v2s": ("T4/T6/T7", {"name": "weld_fusion", "fusion": "v2s"}, "segmented"),
    "fusion_s2v": ("T4", {"name": "weld_fusion", "fusion": "s2v"}, "segmented"),
    "fusion_bidirectional": ("T4", {"name": "weld_fusion", "fusion": "bidirectional"}, "segmented"),
    "fusion_add": ("T4", {"name": "weld_fusion", "fusion": "add"}, "segmented"),
    "fusion_concat": ("T4/T7", {"name": "weld_fusion", "fusion": "concat"}, "segmented"),
    "vision_only": ("T6/T7", {"name": "weld_vision"}, "segmented"),
    "spectrum_dlinear": ("T6", {"name": "weld_dlinear"}, "segmented"),
    "spectrum_informer": ("T6", {"name": "weld_informer", "embed_dim": 64}, "segmented"),
    "spectrum_inverted": ("T6", {"name": "weld_inverted"}, "segmented"),
    "t8_I_vanilla_d96": ("T8", {"name": "weld_fusion", "embedding": "vanilla", "spectral_dim": 96}, "segmented"),
    "t8_II_all32_d96": ("T8", {"name": "weld_fusion", "channels": "all", "spectral_dim": 96}, "segmented"),
    "t8_III_d64": ("T8", {"name": "weld_fusion", "spectral_dim": 64}, "segmented"),
    "t8_V_d128": ("T8", {"name": "weld_fusion", "spectral_dim": 128}, "segmented"),
    "vision_only_raw": ("Fig16", {"name": "weld_vision"}, "raw"),
    "fusion_v2s_raw": ("Fig16", {"name": "weld_fusion", "fusion": "v2s"}, "raw"),
}


def train_eval(recipe: WeldRecipe, feats: np.ndarray, spectra_raw: np.ndarray, labels: np.ndarray, wavelengths: list[float],
               tr: np.ndarray, te: np.ndarray, epochs: int, lr: float, seed: int, k: int) -> dict:
    """Train one variant on cached features of ``tr`` and score ``te``."""
    torch.manual_seed(seed)
    prep = fit_spectral_prep(spectra_raw[tr], wavelengths, recipe.model)
    spectra = torch.from_numpy(prep.apply(spectra_raw))
    kw = model_kwargs(recipe.model, k, len(prep.selected), recipe.data.seq_len, feats.shape[1])
    model = create_model(recipe.model.name, **kw, pretrained=False)
    x = torch.from_numpy(feats)
    y = torch.from_numpy(labels).long()
    params = [p for n, p in model.named_parameters() if ".backbone." not in f".{n}"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    loss_fn = FocalLoss(2.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)].split(16):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x[idx], spectra[idx]).float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i], spectra[i]).argmax(1) for i in torch.from_numpy(te).split(64)]).numpy()
    p, r, f, _ = precision_recall_fscore_support(labels[te], pred, average="weighted", zero_division=0)
    _, _, fc, _ = precision_recall_fscore_support(labels[te], pred, labels=np.arange(k), zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "per_class_f1": fc.tolist(), "channels": len(prep.selected),
            "selected": prep.selected}


def cost(recipe: WeldRecipe, k: int, channels: int, crop: tuple[int, int], seq_len: int) -> dict:
    """Parameters, FLOPs per sample (two crops + spectra) and samples/s of the full model (backbone included)."""
    from torch.utils.flop_counter import FlopCounterMode

    kw = model_kwargs(recipe.model, k, channels, seq_len, 2)
    model = create_model(recipe.model.name, **kw, pretrained=False).eval()
    n_params = sum(p.numel() for p in model.parameters())
    img = torch.rand(1, 2, 3, *crop)
    spec = torch.rand(1, 2, channels, seq_len)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(img, spec)
    flops = counter.get_total_flops()
    imgs, specs = torch.rand(16, 2, 3, *crop), torch.rand(16, 2, channels, seq_len)
    with torch.no_grad():
        model(imgs, specs)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            model(imgs, specs)
        secs = time.perf_counter() - t0
    return {"params_m": n_params / 1e6, "gflops": flops / 1e9, "samples_per_s": 16 * reps / secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="a real weld folder (default: simulate)")
    ap.add_argument("--samples", type=int, default=603)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = WeldRecipe.model_validate({"task": "weld", "data": {"crop_height": 48, "crop_width": 192, "seg_size": 128}})
    data = args.data or out / "data"
    if args.data is None and not (data / "manifest.json").is_file():
        simulate_weld_dataset(data, args.samples, args.seed)
    ds = read_weld_dataset(data, base.data.seq_len)
    labels, k = ds.labels, len(ds.classes)
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(labels)), labels))
    images = [s.image for s in ds.samples]
    t0 = time.perf_counter()
    unet = train_seam_unet([images[i] for i in folds[0][0]], [ds.samples[i].mask for i in folds[0][0]], base.segmentation,
                           base.data.seg_size, args.seed)
    masks = predict_masks(unet, images, base.data.seg_size)
    dice = float(np.mean([dice_score(masks[i], ds.samples[i].mask) for i in folds[0][1]]))
    crop = (base.data.crop_height, base.data.crop_width)
    crops = {m: np.stack([crop_welds(im, masks[i], ds.welds_per_sample, crop, m == "segmented") for i, im in enumerate(images)])
             for m in ("segmented", "raw")}
    backbone = create_model("weld_vision", num_classes=k, pretrained=True).vision.backbone
    feats = {m: cached_features(backbone, c) for m, c in crops.items()}
    prep_seconds = time.perf_counter() - t0
    print(f"data {len(labels)} samples (synthetic={ds.synthetic}), seam Dice fold-1 test {dice:.3f}, "
          f"U-Net + crops + features {prep_seconds:.0f} s", file=sys.stderr)
    spectra_raw = np.stack([s.spectra for s in ds.samples])
    results = {}
    for name in args.variants.split(","):
        table, overrides, crop_kind = VARIANTS[name]
        recipe = base.model_copy(update={"model": base.model.model_copy(update=overrides)})
        tv = time.perf_counter()
        scores = [train_eval(recipe, feats[crop_kind], spectra_raw, labels, ds.wavelengths_nm, tr, te, args.epochs, args.lr,
                             args.seed + f, k) for f, (tr, te) in enumerate(folds)]
        c = cost(recipe, k, scores[0]["channels"], crop, base.data.seq_len)
        agg = {m: (float(np.mean([s[m] for s in scores])), float(np.std([s[m] for s in scores]))) for m in ("precision", "recall", "f1")}
        per_class = np.mean([s["per_class_f1"] for s in scores], axis=0).tolist()
        results[name] = {"table": table, "crops": crop_kind, "overrides": overrides, **agg, "per_class_f1": per_class,
                         "selected_fold1": [ds.wavelengths_nm[i] for i in scores[0]["selected"]], **c,
                         "seconds": round(time.perf_counter() - tv, 1)}
        print(f"{name:22s} F1 {100 * agg['f1'][0]:5.1f} +- {100 * agg['f1'][1]:4.1f}  ({results[name]['seconds']} s)", file=sys.stderr)
    total = time.perf_counter() - t_start
    head = ("| variant | table | crops | weighted P (%) | weighted R (%) | weighted F1 (%) | params (M) | GFLOPs/sample | samples/s |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {n} | {r['table']} | {r['crops']} | {100 * r['precision'][0]:.1f} +- {100 * r['precision'][1]:.1f} | "
        f"{100 * r['recall'][0]:.1f} +- {100 * r['recall'][1]:.1f} | {100 * r['f1'][0]:.1f} +- {100 * r['f1'][1]:.1f} | "
        f"{r['params_m']:.2f} | {r['gflops']:.2f} | {r['samples_per_s']:.1f} |\n" for n, r in results.items())
    pc = "| variant | " + " | ".join(ds.classes) + " |\n|---|" + "---|" * k + "\n" + "".join(
        f"| {n} | " + " | ".join(f"{100 * v:.1f}" for v in r["per_class_f1"]) + " |\n" for n, r in results.items())
    note = (f"{'SYNTHETIC data (simulator)' if ds.synthetic else 'data ' + str(data)}: {len(labels)} samples, {args.folds}-fold "
            f"stratified CV (seed {args.seed}), {args.epochs} epochs per fold, frozen EfficientNet-Lite0 features of "
            f"{crop[0]}x{crop[1]} crops, seam Dice {dice:.3f}; total {total / 60:.1f} min on this shared CPU "
            f"({args.threads} thread). Samples/s: full model incl. backbone, batch 16, eval mode.\n")
    text = note + "\n" + head + rows + "\nPer-class F1 (%), mean over folds:\n\n" + pc
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"seam_dice": dice, "total_seconds": total, "args": {k2: str(v) for k2, v in vars(args).items()},
                                                   "classes": ds.classes, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
