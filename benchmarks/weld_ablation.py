"""5-fold cross-validation of the weld models: the structure of paper 000's Tables 4, 6, 7 and 8 (and Fig. 16).

Usage::

    python benchmarks/weld_ablation.py --out RUN                    # every variant, 603 simulated samples
    python benchmarks/weld_ablation.py --out RUN --variants t4      # one group: t4, t6, t8, raw (or variant names)

What it does (on the simulated set unless ``--data`` names a real folder):

1. simulates the data (seeded), trains the seam U-Net once on the training part of fold 1 and
   crops every weld twice: segmented (background blanked) and raw (Fig. 16 ablation); reports the
   seam Dice on fold 1's held-out samples;
2. computes the frozen EfficientNet-Lite0 (ImageNet) feature maps of every crop once (cached in
   ``OUT/cache.npz``); every variant then trains its projection, spectral branch, fusion and head
   on them (the CPU budget of this machine; the paper fine-tunes MobileNetV2 on 512 px images on a GPU);
3. for each variant, 5 stratified folds: channel selection and min-max statistics on the training
   folds, ``--epochs`` epochs of AdamW (lr ``--lr``, no early stopping) with focal loss (eq. 14);
   weighted precision/recall/F1 and per-class precision/recall/F1/AUROC on the held-out fold;
   mean +- std over folds;
4. per variant: parameters and FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) of the full
   model for one sample (two 48 x 192 crops + spectra, backbone included) and images/s of the full
   model in eval mode (batch 16 samples = 32 weld images; measured in this process one variant after
   the other on a shared CPU: compare ratios only).

Each finished variant is saved to ``OUT/variants/<name>.json`` and skipped by later invocations
(``--redo`` repeats it), so the work can be split over several runs. Every invocation rewrites
``OUT/ablation.md`` (the tables, from every finished variant) and prints it. The data are SYNTHETIC
unless ``--data`` is given.
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
from defectscope.evaluation.classification import classification_metrics
from defectscope.utils.io import atomic_path, write_json, write_text
from defectscope.models import create_model
from defectscope.models.layers.losses import FocalLoss
from defectscope.models.weld_fusion.torch_model import MODALITIES

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
               classes: list[str], tr: np.ndarray, te: np.ndarray, epochs: int, lr: float, seed: int) -> dict:
    """Train one variant on cached features of the training folds ``tr`` and score the held-out fold ``te``.

    Args:
        feats: frozen-backbone feature maps ``[N, W, C_feat, h', w']`` (float32).
        spectra_raw: raw spectra ``[N, W, 32, T]``; channel selection and min-max statistics are fitted on ``tr`` only.

    Returns:
        :func:`classification_metrics` of the held-out fold plus ``channels`` and ``selected`` (indices).
    """
    torch.manual_seed(seed)
    prep = fit_spectral_prep(spectra_raw[tr], wavelengths, recipe.model)
    spectra = torch.from_numpy(prep.apply(spectra_raw))
    kw = model_kwargs(recipe.model, len(classes), len(prep.selected), recipe.data.seq_len, feats.shape[1])
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
        probs = torch.cat([F.softmax(model(x[i], spectra[i]).float(), 1) for i in torch.from_numpy(te).split(64)]).numpy()
    m = classification_metrics(labels[te], probs, classes)
    return {**m, "channels": len(prep.selected), "selected": prep.selected}


def cost(recipe: WeldRecipe, k: int, channels: int, crop: tuple[int, int], seq_len: int, welds: int = 2) -> dict:
    """Parameters, FLOPs per sample (``welds`` crops + spectra) and throughput of the full model (backbone included).

    FLOPs are counted by ``torch.utils.flop_counter`` (2 per multiply-add, matmul/conv/attention).
    Throughput: eval mode, fp32, batch 16 samples, in this process; ``images_per_s`` counts weld
    images (``welds`` per sample).
    """
    from torch.utils.flop_counter import FlopCounterMode

    kw = model_kwargs(recipe.model, k, channels, seq_len, welds)
    model = create_model(recipe.model.name, **kw, pretrained=False).eval()
    n_params = sum(p.numel() for p in model.parameters())
    img = torch.rand(1, welds, 3, *crop)
    spec = torch.rand(1, welds, channels, seq_len)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(img, spec)
    flops = counter.get_total_flops()
    imgs, specs = torch.rand(16, welds, 3, *crop), torch.rand(16, welds, channels, seq_len)
    with torch.no_grad():
        model(imgs, specs)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            model(imgs, specs)
        secs = time.perf_counter() - t0
    return {"params_m": n_params / 1e6, "gflops": flops / 1e9, "samples_per_s": 16 * reps / secs,
            "images_per_s": welds * 16 * reps / secs}


def _prepare(args, out: Path) -> dict:
    """Data, seam U-Net (fold 1), crops and frozen features; cached in ``OUT/cache.npz`` for later invocations."""
    cache = out / "cache.npz"
    base = _base_recipe()
    data = args.data or out / "data"
    if args.data is None and not (data / "manifest.json").is_file():
        simulate_weld_dataset(data, args.samples, args.seed)
    ds = read_weld_dataset(data, base.data.seq_len)
    labels, k = ds.labels, len(ds.classes)
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(labels)), labels))
    if cache.is_file():
        z = np.load(cache)
        feats = {"segmented": z["segmented"], "raw": z["raw"]}
        meta = json.loads((out / "prepare.json").read_text())
    else:
        t0 = time.perf_counter()
        images = [s.image for s in ds.samples]
        unet = train_seam_unet([images[i] for i in folds[0][0]], [ds.samples[i].mask for i in folds[0][0]], base.segmentation,
                               base.data.seg_size, args.seed)
        masks = predict_masks(unet, images, base.data.seg_size)
        dice = float(np.mean([dice_score(masks[i], ds.samples[i].mask) for i in folds[0][1]]))
        crop = (base.data.crop_height, base.data.crop_width)
        crops = {m: np.stack([crop_welds(im, masks[i], ds.welds_per_sample, crop, m == "segmented") for i, im in enumerate(images)])
                 for m in ("segmented", "raw")}
        backbone = create_model("weld_vision", num_classes=k, pretrained=True).vision.backbone
        feats = {m: cached_features(backbone, c) for m, c in crops.items()}
        meta = {"seam_dice_fold1": dice, "prepare_seconds": time.perf_counter() - t0, "synthetic": ds.synthetic,
                "samples": len(labels), "weights": getattr(backbone, "weights_source", "?")}
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **feats)
        write_json(out / "prepare.json", meta)
    print(f"data {len(labels)} samples (synthetic={ds.synthetic}), seam Dice fold-1 test {meta['seam_dice_fold1']:.3f}, "
          f"U-Net + crops + features {meta['prepare_seconds']:.0f} s", file=sys.stderr)
    return {"ds": ds, "labels": labels, "folds": folds, "feats": feats, "meta": meta, "base": base,
            "spectra": np.stack([s.spectra for s in ds.samples])}


def _base_recipe() -> WeldRecipe:
    return WeldRecipe.model_validate({"task": "weld", "data": {"crop_height": 48, "crop_width": 192, "seg_size": 128}})


def _uses(r: dict, modality: str, value) -> str:
    """``value`` when the variant's model reads ``modality``, else ``-``."""
    return str(value) if modality in MODALITIES[r["overrides"]["name"]] else "-"


def _fmt(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def render(out: Path, classes: list[str], meta: dict, args) -> str:
    """The tables (Markdown) from every ``OUT/variants/*.json`` present, in ``VARIANTS`` order."""
    results = {}
    for name in VARIANTS:
        f = out / "variants" / f"{name}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())
    seconds = meta["prepare_seconds"] + sum(r["seconds"] for r in results.values())
    r0 = next(iter(results.values()), {})
    note = (f"{'SYNTHETIC data (simulator)' if meta['synthetic'] else 'real data'}: {meta['samples']} samples, "
            f"{r0.get('folds', args.folds)}-fold stratified CV (seed {r0.get('seed', args.seed)}), {r0.get('epochs', args.epochs)} "
            f"epochs per fold, AdamW lr {r0.get('lr', args.lr)}, focal loss; frozen EfficientNet-Lite0 (ImageNet) features of 48x192 "
            f"crops; seam U-Net Dice (fold 1 held out) {meta['seam_dice_fold1']:.3f}. Compute: {seconds / 60:.1f} min "
            f"(U-Net + crops + features {meta['prepare_seconds']:.0f} s, then the variants) on this shared 2-core CPU, "
            f"1 torch thread. Mean ± std over folds.\n")
    head = ("| variant | paper | crops | channels | weighted P (%) | weighted R (%) | weighted F1 (%) | params (M) | "
            "GFLOPs / sample | images/s | CV time (s) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {n} | {r['table']} | {_uses(r, 'image', r['crops'])} | {_uses(r, 'spectra', r['channels'])} | {_fmt(r['weighted_precision'])} | {_fmt(r['weighted_recall'])} | "
        f"**{_fmt(r['weighted_f1'])}** | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['images_per_s']:.0f} | {r['seconds']:.0f} |\n"
        for n, r in results.items())
    fusions = [n for n in ("fusion_add", "fusion_concat", "fusion_v2s", "fusion_s2v", "fusion_bidirectional") if n in results]
    t4 = ""
    if fusions:
        t4 = ("\nTable 4 layout (per class, mean over folds, %): precision / recall / F1 / AUROC\n\n| class | "
              + " | ".join(fusions) + " |\n|---|" + "---|" * len(fusions) + "\n")
        for j, c in enumerate(classes):
            cells = []
            for n in fusions:
                pc = results[n]["per_class_mean"][c]
                cells.append(" / ".join("-" if pc[m] is None else f"{100 * pc[m]:.1f}" for m in ("precision", "recall", "f1", "auroc")))
            t4 += f"| {c} | " + " | ".join(cells) + " |\n"
    pc = ("\nPer-class F1 (%), mean over folds, every variant:\n\n| variant | " + " | ".join(classes) + " |\n|---|"
          + "---|" * len(classes) + "\n" + "".join(
              f"| {n} | " + " | ".join(f"{100 * r['per_class_mean'][c]['f1']:.1f}" for c in classes) + " |\n"
              for n, r in results.items()))
    return note + "\n" + head + rows + t4 + pc


GROUPS = {"t4": ["fusion_v2s", "fusion_s2v", "fusion_bidirectional", "fusion_add", "fusion_concat"],
          "t6": ["vision_only", "spectrum_dlinear", "spectrum_informer", "spectrum_inverted"],
          "t8": ["t8_I_vanilla_d96", "t8_II_all32_d96", "t8_III_d64", "t8_V_d128"],
          "raw": ["vision_only_raw", "fusion_v2s_raw"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="a real weld folder (default: simulate)")
    ap.add_argument("--samples", type=int, default=603)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="all",
                    help="comma-separated variant names or groups (t4, t6, t8, raw, all); finished variants are skipped")
    ap.add_argument("--redo", action="store_true", help="re-run variants whose result file exists")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for v in args.variants.split(","):
        for n in (list(VARIANTS) if v == "all" else GROUPS.get(v, [v])):
            if n not in VARIANTS:
                ap.error(f"--variants: unknown variant {n!r}; choose from {', '.join(VARIANTS)} or {', '.join(GROUPS)}")
            if n not in names:
                names.append(n)
    p = _prepare(args, out)
    ds, labels, folds, base = p["ds"], p["labels"], p["folds"], p["base"]
    crop = (base.data.crop_height, base.data.crop_width)
    for name in names:
        target = out / "variants" / f"{name}.json"
        if target.is_file() and not args.redo:
            prev = json.loads(target.read_text())
            if all(prev.get(k) == getattr(args, k) for k in ("epochs", "lr", "folds", "seed")):
                print(f"{name}: done before with the same settings, skipped ({target})", file=sys.stderr)
                continue
            print(f"{name}: done before with other settings, run again", file=sys.stderr)
        table, overrides, crop_kind = VARIANTS[name]
        recipe = base.model_copy(update={"model": base.model.model_copy(update=overrides)})
        tv = time.perf_counter()
        scores = [train_eval(recipe, p["feats"][crop_kind], p["spectra"], labels, ds.wavelengths_nm, ds.classes, tr, te,
                             args.epochs, args.lr, args.seed + f) for f, (tr, te) in enumerate(folds)]
        c = cost(recipe, len(ds.classes), scores[0]["channels"], crop, base.data.seq_len, ds.welds_per_sample)
        agg = {m: (float(np.mean([s[m] for s in scores])), float(np.std([s[m] for s in scores])))
               for m in ("weighted_precision", "weighted_recall", "weighted_f1", "accuracy")}
        per_class = {cls: {m: (None if any(s["per_class"][cls][m] is None for s in scores)
                               else float(np.mean([s["per_class"][cls][m] for s in scores])))
                           for m in ("precision", "recall", "f1", "auroc")} for cls in ds.classes}
        res = {"table": table, "crops": crop_kind, "overrides": overrides, **agg, "per_class_mean": per_class,
               "channels": scores[0]["channels"], "selected_fold1_nm": [ds.wavelengths_nm[i] for i in scores[0]["selected"]],
               "folds_weighted_f1": [s["weighted_f1"] for s in scores], **c, "seconds": round(time.perf_counter() - tv, 1),
               "epochs": args.epochs, "lr": args.lr, "folds": args.folds, "seed": args.seed}
        write_json(target, res)
        print(f"{name:22s} F1 {_fmt(agg['weighted_f1'])}  ({res['seconds']} s)", file=sys.stderr)
    text = render(out, ds.classes, p["meta"], args)
    write_text(out / "ablation.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
