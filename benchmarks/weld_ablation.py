"""K-fold cross-validation of the weld models: the structure of paper 000's Tables 4, 6, 7 and 8 (and Fig. 16).

Usage::

    python benchmarks/weld_ablation.py --out RUN                          # every variant, 603 simulated samples
    python benchmarks/weld_ablation.py --out RUN --variants t4            # one group: t4, t6, t8, raw, modalities
    python benchmarks/weld_ablation.py --data FOLDER --out RUN            # your own weld folder (masks optional):
                                                                          # vision only, signals only, fusion

Every variant is one ``defectscope train`` cross-validation (:func:`defectscope.engine.pipeline.train`
with ``folds=K``) of a recipe: ``--recipe`` (default ``configs/weld_fusion.yaml``) with the variant's
model settings, ``--epochs`` / ``--lr`` / ``--seed`` and any ``-o key=value``. So each fold does what
``defectscope train`` does: its seam U-Net on its own training part when every sample has a seam mask
(otherwise fixed bands: a folder without masks works), channel selection and min-max statistics on
its training part, the frozen-encoder features, early stopping / checkpoint selection on a validation
part of its training folds, and predicts its held-out fold. Folds are stratified, and grouped by the
data's group field (e.g. ``batch``) when every sample has one.

Outputs: ``OUT/variants/<name>/`` (a cross-validation run folder: ``crossval.json``,
``oof_predictions.csv``, ``report.html``, ``folds/<k>/``), ``OUT/variants/<name>.json`` (the row
below), ``OUT/ablation.md`` (the tables, rewritten by every invocation from every finished variant).
A finished variant is skipped when it was run with the same settings (``--redo`` repeats it).

Per variant also: parameters and FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) of the full
model for one sample (backbone included) and samples/s in eval mode (batch 16, in this process:
compare ratios only). The data are SYNTHETIC unless ``--data`` names a real folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from defectscope.config import _set_dotted, load_raw, parse_overrides, validate
from defectscope.engine.pipeline import train
from defectscope.engine.weld import WeldRecipe, build_weld_model, model_kwargs
from defectscope.models.weld_fusion.torch_model import MODALITIES
from defectscope.utils.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]

# name -> (paper table, model overrides, crops)
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

GROUPS = {"t4": ["fusion_v2s", "fusion_s2v", "fusion_bidirectional", "fusion_add", "fusion_concat"],
          "t6": ["vision_only", "spectrum_dlinear", "spectrum_informer", "spectrum_inverted"],
          "t8": ["t8_I_vanilla_d96", "t8_II_all32_d96", "t8_III_d64", "t8_V_d128"],
          "raw": ["vision_only_raw", "fusion_v2s_raw"],
          "modalities": ["vision_only", "spectrum_dlinear", "fusion_v2s"]}


def base_raw(args) -> dict:
    """The base recipe (a dict): ``--recipe`` with ``--data`` / ``--samples``, ``--epochs``, ``--lr``, ``--seed`` and ``-o``."""
    raw = load_raw(args.recipe)
    data = raw.setdefault("data", {})
    if args.data is not None:
        data["root"] = str(args.data)
        data.pop("simulate", None)
    else:
        data["root"] = str(args.out / "data")  # simulated once, shared by every variant
        data["simulate"] = {**(data.get("simulate") or {}), "n_samples": args.samples, "seed": args.seed}
    raw["seed"] = args.seed
    train_cfg = raw.setdefault("train", {})
    train_cfg.update({"epochs": args.epochs, "lr": args.lr, "num_threads": args.threads, "progress": False, "logger": ["csv"]})
    raw.pop("eval", None)
    for key, value in parse_overrides(args.override):
        _set_dotted(raw, key, value, "weld_ablation (override)")
    return raw


def feasible_folds(root: Path, folds: int) -> int:
    """``folds``, lowered to the smallest class size and, when every sample has a group, to the number
    of groups (the pipeline groups by the data's group field), with a note on stderr.

    Raises:
        SystemExit: fewer than 2 folds are possible.
    """
    man = json.loads((root / "manifest.json").read_text())
    labels = [s.get("label") for s in man["samples"]]
    groups = [s.get("group") for s in man["samples"]]
    limits = {"the smallest class": min(labels.count(c) for c in set(labels))}
    if all(g is not None for g in groups):
        limits[f"the number of {man.get('group_field') or 'group'} groups"] = len(set(groups))
    why, k = min(limits.items(), key=lambda kv: kv[1])
    if k < 2:
        raise SystemExit(f"{root}: cross-validation impossible: {why} has {k} member(s)")
    if k < folds:
        print(f"--folds {folds} lowered to {k}: {why} has {k}", file=sys.stderr)
        return k
    return folds


def variant_recipe(raw: dict, name: str) -> WeldRecipe:
    """The base recipe with the variant's model settings (and raw crops for the ``raw`` variants)."""
    _, overrides, crops = VARIANTS[name]
    r = json.loads(json.dumps(raw))
    r.setdefault("model", {}).update(overrides)
    r["data"]["segmented"] = crops == "segmented"
    r.setdefault("eval", {})["candidates"] = ["model"]  # each variant alone (no selection among references)
    return validate(r, WeldRecipe, f"variant {name}")


def cost(recipe: WeldRecipe, k: int, channels: int, welds: int) -> dict:
    """Parameters, FLOPs per sample (``welds`` crops + signals) and throughput of the full model (backbone included).

    FLOPs are counted by ``torch.utils.flop_counter`` (2 per multiply-add, matmul/conv/attention).
    Throughput: eval mode, fp32, batch 16 samples, in this process.
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = recipe.model.model_copy(update={"pretrained": False, "weights": None})
    model = build_weld_model(m, model_kwargs(m, k, channels, recipe.data.seq_len, welds)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    crop = (recipe.data.crop_height, recipe.data.crop_width)
    img, spec = torch.rand(1, welds, 3, *crop), torch.rand(1, welds, channels, recipe.data.seq_len)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(img, spec)
    flops = counter.get_total_flops()
    imgs, specs = torch.rand(16, welds, 3, *crop), torch.rand(16, welds, channels, recipe.data.seq_len)
    with torch.no_grad():
        model(imgs, specs)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            model(imgs, specs)
        secs = time.perf_counter() - t0
    return {"params_m": n_params / 1e6, "gflops": flops / 1e9, "samples_per_s": 16 * reps / secs}


def run_variant(raw: dict, name: str, out: Path, folds: int) -> dict:
    """Cross-validate one variant with the pipeline; returns its summary row (also ``OUT/variants/<name>.json``)."""
    recipe = variant_recipe(raw, name)
    run = out / "variants" / name
    t0 = time.perf_counter()
    cv = train(recipe, run, folds=folds, overwrite=True)
    seconds = time.perf_counter() - t0
    fold_dirs = sorted((run / "folds").iterdir(), key=lambda p: int(p.name))
    fold_info = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    first = fold_info[0]
    classes = list(cv["pooled"]["per_class"])
    welds = json.loads(Path(recipe.data.root, "manifest.json").read_text()).get("welds_per_sample", 1)
    per_class = {c: {m: (None if any(f["per_class"][c][m] is None for f in cv["folds"])
                         else float(np.mean([f["per_class"][c][m] for f in cv["folds"]])))
                     for m in ("precision", "recall", "f1", "auroc")} for c in classes}
    res = {"table": VARIANTS[name][0], "crops": VARIANTS[name][2], "overrides": VARIANTS[name][1],
           **{m: (cv["mean"][m], cv["std"][m]) for m in ("weighted_precision", "weighted_recall", "weighted_f1", "accuracy")},
           "pooled_weighted_f1": cv["pooled"]["weighted_f1"], "seam_dice": cv["mean"].get("seam_dice"),
           "per_class_mean": per_class, "channels": len(first["selected_channels"]),
           "selected_fold1": first["selected_channel_names"], "seam_unet": first["seam_unet"],
           "folds_weighted_f1": [f["weighted_f1"] for f in cv["folds"]], "group_by": cv["group_by"], "n": cv["n"],
           "synthetic": first["synthetic"], "data": cv["data"],
           **cost(recipe, len(classes), len(first["selected_channels"]), welds), "seconds": round(seconds, 1)}
    return res


def _uses(r: dict, modality: str, value) -> str:
    """``value`` when the variant's model reads ``modality``, else ``-``."""
    return str(value) if modality in MODALITIES[r["overrides"]["name"]] else "-"


def _fmt(ms) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def render(out: Path, settings: dict) -> str:
    """The tables (Markdown) from every ``OUT/variants/*.json`` present, in ``VARIANTS`` order."""
    results = {}
    for name in VARIANTS:
        f = out / "variants" / f"{name}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())["result"]
    if not results:
        return "no finished variant\n"
    r0 = next(iter(results.values()))
    seconds = sum(r["seconds"] for r in results.values())
    note = (f"{'SYNTHETIC data' if r0['synthetic'] else 'real data'}: {r0['data']}; "
            f"{settings['folds']}-fold stratified CV{' grouped by ' + repr(r0['group_by']) if r0['group_by'] else ''} "
            f"(seed {settings['seed']}), at most {settings['epochs']} epochs per fold, AdamW lr {settings['lr']}, recipe "
            f"{settings['recipe']}{' with ' + ', '.join(settings['override']) if settings['override'] else ''}; "
            f"seam U-Net: {r0['seam_unet']}. Compute: {seconds / 60:.1f} min in all. Mean ± std over folds; "
            f"pooled = weighted F1 of all out-of-fold predictions.\n")
    head = ("| variant | paper | crops | channels | weighted P (%) | weighted R (%) | weighted F1 (%) | pooled F1 (%) | "
            "params (M) | GFLOPs / sample | samples/s | CV time (s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {n} | {r['table']} | {_uses(r, 'image', r['crops'] if r['seam_unet'].startswith('trained') else 'fixed band')} | {_uses(r, 'spectra', r['channels'])} | "
        f"{_fmt(r['weighted_precision'])} | {_fmt(r['weighted_recall'])} | **{_fmt(r['weighted_f1'])}** | "
        f"{100 * r['pooled_weighted_f1']:.1f} | {r['params_m']:.2f} | {r['gflops']:.3f} | {r['samples_per_s']:.0f} | "
        f"{r['seconds']:.0f} |\n" for n, r in results.items())
    classes = list(r0["per_class_mean"])
    pc = ("\nPer-class F1 (%), mean over folds:\n\n| variant | " + " | ".join(classes) + " |\n|---|"
          + "---|" * len(classes) + "\n" + "".join(
              f"| {n} | " + " | ".join(f"{100 * r['per_class_mean'][c]['f1']:.1f}" for c in classes) + " |\n"
              for n, r in results.items()))
    sel = "\nChannels selected on fold 1's training part: " + "; ".join(
        f"{n}: {', '.join(r['selected_fold1'])}" for n, r in results.items() if "spectra" in MODALITIES[r["overrides"]["name"]]) + "\n"
    return note + "\n" + head + rows + pc + sel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="a weld data folder (masks optional; default: simulate)")
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "weld_fusion.yaml", help="base recipe")
    ap.add_argument("--samples", type=int, default=603, help="simulated samples (without --data)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--override", action="append", default=[], help="recipe key.sub=value, repeatable")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant names or groups (t4, t6, t8, raw, modalities, all); "
                         "default: all on simulated data, modalities with --data")
    ap.add_argument("--redo", action="store_true", help="re-run variants whose result file exists")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = args.variants or ("modalities" if args.data is not None else "all")
    names: list[str] = []
    for v in spec.split(","):
        for n in (list(VARIANTS) if v == "all" else GROUPS.get(v, [v])):
            if n not in VARIANTS:
                ap.error(f"--variants: unknown variant {n!r}; choose from {', '.join(VARIANTS)} or {', '.join(GROUPS)}")
            if n not in names:
                names.append(n)
    raw = base_raw(args)
    if args.data is not None:
        args.folds = feasible_folds(args.data, args.folds)
    settings = {"epochs": args.epochs, "lr": args.lr, "folds": args.folds, "seed": args.seed,
                "recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
                "override": list(args.override), "data": str(args.data) if args.data else f"simulated {args.samples}"}
    for name in names:
        target = out / "variants" / f"{name}.json"
        if target.is_file() and not args.redo:
            prev = json.loads(target.read_text())
            if prev.get("settings") == settings:
                print(f"{name}: done before with the same settings, skipped ({target})", file=sys.stderr)
                continue
            print(f"{name}: done before with other settings, run again", file=sys.stderr)
        res = run_variant(raw, name, out, args.folds)
        write_json(target, {"settings": settings, "result": res})
        print(f"{name:22s} F1 {_fmt(res['weighted_f1'])}  pooled {100 * res['pooled_weighted_f1']:.1f}  ({res['seconds']} s)",
              file=sys.stderr)
    text = render(out, settings)
    write_text(out / "ablation.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
