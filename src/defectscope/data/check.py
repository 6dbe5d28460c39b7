"""The health of a data set before training: ``defectscope data check FOLDER [--out DIR]``.

:func:`check_dataset` decodes every image once and reports, per class: images, sizes, modes and
bit depths; and over the whole set:

- ``unreadable``: files that do not decode (truncated, not an image), each named with the reason;
- ``converted``: images the readers convert on the fly (16/32-bit rescaled to 8 bits, palette,
  CMYK, alpha dropped, 1-bit), each named;
- ``duplicates``: groups of exact duplicates (identical decoded pixels) and near duplicates
  (perceptual hash, DCT "pHash" of Zauner 2010 via ``imagehash``, Hamming distance <=
  ``near_threshold`` of 64 bits, :data:`NEAR_THRESHOLD`) within a class and across classes. Across classes they carry
  conflicting labels; within a class they leak between train and test and inflate test figures;
- ``empty_classes``: class folders without an image;
- ``too_small``: classes with fewer than :data:`MIN_PER_CLASS` images (a 20 % test split holds at
  most one of them, 5-fold cross-validation cannot stratify them);
- ``imbalance``: largest / smallest class (extreme above :data:`EXTREME_RATIO`; class-balanced
  sampling is recommended above 3);
- ``annotations``: boxes outside the image or otherwise invalid (VOC/COCO), masks that are empty
  where the image is labelled defective, masks of another size than their image.

It writes ``DIR/data_check.json``, ``DIR/report.html`` and ``DIR/thumbnails/<class>.png`` when
``out_dir`` is given. :func:`warn_on_leaks` turns the result into the loud warnings ``train``
prints before it trains.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope.data.images import IMAGE_SUFFIXES, DatasetError, ImageReadError, class_from_prefix, load_image

MIN_PER_CLASS = 5
IMBALANCE_RATIO = 3.0
EXTREME_RATIO = 10.0
#: pHash Hamming distance (of 64 bits) up to which two images are near duplicates. Measured on NEU
#: (1800 images): JPEG re-encoding at quality 50-70 or a 200 -> 160 -> 200 px resize moves the hash by
#: at most 6 bits (mean 1.1); the 3 pairs of distinct files within 8 bits are real duplicates (patches_101 =
#: patches_105 pixel for pixel; inclusion_88 / inclusion_125 and pitted_surface_171 / pitted_surface_292
#: are the same scene, shifted and re-exposed); the next pairs, at 10 bits, are different views.
NEAR_THRESHOLD = 8
THUMBS_PER_CLASS = 8
THUMB_SIDE = 96

_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "PA": 8, "CMYK": 8, "YCbCr": 8, "LAB": 8, "HSV": 8,
         "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _conversion(mode: str, info: dict) -> str | None:
    """What :func:`~defectscope.data.images.load_image` does to an image of ``mode`` (None: nothing noteworthy)."""
    if mode.startswith("I;16"):
        return "16-bit grey rescaled to 8 bits by its own min..max range"
    if mode in ("I", "F"):
        return f"32-bit {'float' if mode == 'F' else 'integer'} grey rescaled to 8 bits by its own min..max range"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in info):
        return f"{mode} with alpha: alpha channel dropped"
    if mode == "P":
        return "palette image converted to RGB"
    if mode == "CMYK":
        return "CMYK converted to RGB"
    if mode == "1":
        return "1-bit image converted to 8-bit"
    if mode not in ("L", "RGB"):
        return f"{mode} converted to RGB"
    return None


def _phash(img: np.ndarray) -> int:
    import imagehash

    grey = Image.fromarray(img).convert("L")
    bits = imagehash.phash(grey, hash_size=8).hash.ravel()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _enumerate(root: Path) -> tuple[str, str, list[tuple[Path, str]], list[str], list[dict], list[str]]:
    """``(task, layout, [(image, class)], empty_classes, annotation problems, notes)`` of ``root``."""
    from defectscope.data.layout import STRUCTURAL_DIRS, guess_layout

    notes: list[str] = []
    problems: list[dict] = []
    try:
        g = guess_layout(root)
        task, layout = g.task, g.layout
    except DatasetError as exc:
        notes.append(f"layout not recognised ({exc}); every image below the folder is checked, class = its folder")
        task, layout = "unknown", "unknown"
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return task, layout, [(p, str(p.parent.relative_to(root)) or ".") for p in files], [], problems, notes

    items: list[tuple[Path, str]] = []
    empty: list[str] = []
    if layout == "folder":
        for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith((".", "_"))
                        and x.name.lower() not in STRUCTURAL_DIRS):
            files = _images_in(d)
            if not files:
                empty.append(d.name)
            items += [(p, d.name) for p in files]
    elif layout == "prefix":
        folder = root / "images" if (root / "images").is_dir() else root
        items = [(p, class_from_prefix(p)) for p in _images_in(folder)]
    elif layout == "voc":
        items, problems = _voc_items(root)
    elif layout == "coco":
        items, problems = _coco_items(Path(g.details["json"]))
    elif layout in ("kolektor", "images_masks"):
        items, problems = _mask_items(root, layout)
    elif layout == "mvtec":
        items, problems = _mvtec_items(root)
    elif layout == "rle_csv":
        img_dir = Path(g.details["images_dir"]) if g.details.get("images_dir") else root
        items = [(p, "images") for p in _images_in(img_dir)]
        notes.append("RLE masks are checked by the segmentation reader (defectscope.data.rle.read_rle_csv)")
    elif layout == "weld":
        import json

        man = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        items = [(root / s["image"], str(s.get("label"))) for s in man.get("samples", [])
                 if isinstance(s, dict) and isinstance(s.get("image"), str)]
    return task, layout, items, empty, problems, notes


def _voc_items(root: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    from defectscope.data.boxes import BoxFormatError, read_voc_xml

    img_dir = next(root / d for d in ("images", "JPEGImages") if (root / d).is_dir())
    ann_dir = next(root / d for d in ("annotations", "Annotations") if (root / d).is_dir())
    items, problems = [], []
    xmls = {p.stem: p for p in ann_dir.glob("*.xml")}
    for p in _images_in(img_dir):
        try:
            cls = class_from_prefix(p)
        except DatasetError:
            cls = "images"
        items.append((p, cls))
        if p.stem not in xmls:
            problems.append({"file": str(p), "problem": f"no annotation file {ann_dir.name}/{p.stem}.xml"})
            continue
        xml = xmls.pop(p.stem)
        try:
            rec = read_voc_xml(xml, p)
            with Image.open(p) as im:
                if (im.width, im.height) != (rec.width, rec.height):
                    problems.append({"file": str(rec.source), "problem": f"<size> says {rec.width}x{rec.height}, "
                                     f"the image {p.name} is {im.width}x{im.height}"})
            if len(rec.boxes) == 0:
                problems.append({"file": str(rec.source), "problem": "no <object> boxes"})
        except BoxFormatError as exc:
            problems.append({"file": str(xml), "problem": str(exc)})
        except OSError:
            pass  # the image itself is reported under 'unreadable'
    for stem, x in sorted(xmls.items()):
        problems.append({"file": str(x), "problem": f"annotation without image {img_dir.name}/{stem}.*"})
    return items, problems


def _coco_items(path: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    from defectscope.data.boxes import BoxFormatError, read_coco

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records, _ = read_coco(path, missing="warn")
    except BoxFormatError as exc:
        return [], [{"file": str(path), "problem": str(exc)}]
    problems = [{"file": str(path), "problem": str(w.message)} for w in caught]
    items = []
    for r in records:
        cls = Counter(r.labels).most_common(1)[0][0] if r.labels else "no boxes"
        items.append((Path(r.image), cls))
        if not r.labels:
            problems.append({"file": str(r.image), "problem": "image without boxes"})
    return items, problems


def _mask_problem(image: Path, mask: Path | None, defective: bool | None) -> str | None:
    from defectscope.data.masks import load_mask

    if mask is None:
        return "defective image without a mask" if defective else None
    try:
        m = load_mask(mask)
        with Image.open(image) as im:
            size = (im.height, im.width)
    except (ImageReadError, OSError) as exc:
        return f"mask unreadable ({exc})"
    if m.shape != size:
        return f"mask {mask.name} is {m.shape[0]}x{m.shape[1]}, the image is {size[0]}x{size[1]}"
    if defective and not m.any():
        return f"empty mask {mask.name} for an image labelled defective"
    return None


def _mask_items(root: Path, layout: str) -> tuple[list[tuple[Path, str]], list[dict]]:
    items, problems = [], []
    if layout == "kolektor":
        from defectscope.data.masks import read_manifest

        try:
            rows = read_manifest(root)
        except DatasetError as exc:
            return [(p, "images") for p in _images_in(root / "images")], [{"file": str(root / "manifest.csv"), "problem": str(exc)}]
        for r in rows:
            items.append((r.image, "defective" if r.defective else "good"))
            why = _mask_problem(r.image, r.mask, r.defective)
            if why:
                problems.append({"file": str(r.image), "problem": why})
        return items, problems
    masks = {p.stem: p for p in _images_in(root / "masks")}
    for p in _images_in(root / "images"):
        mask = masks.get(p.stem)
        if mask is None:
            problems.append({"file": str(p), "problem": "no mask masks/" + p.stem + ".png"})
            items.append((p, "no mask"))
            continue
        from defectscope.data.masks import load_mask

        try:
            defective = bool(load_mask(mask).any())
        except ImageReadError as exc:
            problems.append({"file": str(mask), "problem": str(exc)})
            continue
        items.append((p, "defective" if defective else "good"))
        why = _mask_problem(p, mask, None)
        if why:
            problems.append({"file": str(p), "problem": why})
    return items, problems


def _mvtec_items(root: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    from defectscope.data.mvtec import read_mvtec

    try:
        rows = read_mvtec(root)
    except DatasetError as exc:
        return [], [{"file": str(root), "problem": str(exc)}]
    items, problems = [], []
    for r in rows:
        items.append((r.image, f"{r.split}/{r.defect_type}"))
        if r.defective:
            why = _mask_problem(r.image, r.mask, True) if r.mask is not None else None
            if why:
                problems.append({"file": str(r.image), "problem": why})
    return items, problems


def _groups(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    out: dict[int, list[int]] = defaultdict(list)
    for i in {i for p in pairs for i in p}:
        out[find(i)].append(i)
    return [sorted(g) for g in out.values() if len(g) > 1]


def find_duplicates(files: list[str], classes: list[str], digests: list[str], phashes: list[int],
                    near_threshold: int = NEAR_THRESHOLD) -> list[dict]:
    """Groups of exact and near-duplicate images.

    Args:
        files, classes: per image.
        digests: SHA-1 of the decoded pixels (equal = exact duplicate).
        phashes: 64-bit perceptual hashes (``imagehash.phash``, 8 x 8 DCT).
        near_threshold: largest Hamming distance (of 64 bits) that counts as a near duplicate.

    Returns:
        One dict per group: ``kind`` (``exact`` / ``near``), ``files``, ``classes``,
        ``cross_class`` (the group spans several classes), ``max_distance`` (bits, near groups).
        Images of an exact group are not repeated in a near group with each other.
    """
    out: list[dict] = []
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(digests):
        by_digest[d].append(i)
    exact = [g for g in by_digest.values() if len(g) > 1]
    for g in exact:
        cls = [classes[i] for i in g]
        out.append({"kind": "exact", "files": [files[i] for i in g], "classes": cls,
                    "cross_class": len(set(cls)) > 1, "max_distance": 0})
    # near duplicates: one representative per exact group
    reps = [g[0] for g in by_digest.values()]
    h = np.array([phashes[i] for i in reps], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    dist: dict[tuple[int, int], int] = {}
    for start in range(0, len(h), 1024):
        block = h[start : start + 1024]
        d = np.bitwise_count(block[:, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= near_threshold)
        for a, b in zip(ii.tolist(), jj.tolist()):
            a += start
            if a < b:
                pairs.append((a, b))
                dist[(a, b)] = int(d[a - start, b])
    for g in _groups(pairs, len(reps)):
        idx = [reps[i] for i in g]
        members = [j for i in idx for j in by_digest[digests[i]]]
        cls = [classes[j] for j in members]
        md = max((v for (a, b), v in dist.items() if a in g and b in g), default=0)
        out.append({"kind": "near", "files": [files[j] for j in members], "classes": cls,
                    "cross_class": len(set(cls)) > 1, "max_distance": md})
    return out


def _thumbnail_sheet(paths: list[Path], out: Path) -> None:
    tiles = []
    for p in paths[:THUMBS_PER_CLASS]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.fromarray(load_image(p))
        except ImageReadError:
            continue
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        tile = Image.new("RGB", (THUMB_SIDE, THUMB_SIDE), (255, 255, 255))
        tile.paste(img, ((THUMB_SIDE - img.width) // 2, (THUMB_SIDE - img.height) // 2))
        tiles.append(tile)
    if not tiles:
        return
    sheet = Image.new("RGB", (THUMB_SIDE * len(tiles) + 2 * (len(tiles) - 1), THUMB_SIDE), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, (i * (THUMB_SIDE + 2), 0))
    from defectscope.utils.io import atomic_path

    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "class"


def check_dataset(folder: str | Path, out_dir: str | Path | None = None,
                  near_threshold: int = NEAR_THRESHOLD) -> dict[str, Any]:
    """Check a data folder before training.

    Args:
        folder: any layout :func:`defectscope.data.layout.guess_layout` knows (an unrecognised one
            is still checked image by image, class = sub-folder).
        out_dir: where to write ``data_check.json``, ``report.html`` and ``thumbnails/`` (nothing
            written when ``None``).
        near_threshold: pHash Hamming distance (of 64 bits) up to which two images are near duplicates.

    Returns:
        ``{"folder", "task", "layout", "n_images", "classes": {name: {"images", "sizes", "modes",
        "bit_depths"}}, "duplicates": [groups, see find_duplicates], "empty_classes": [names],
        "unreadable": [{"file", "reason"}], "converted": [{"file", "mode", "bits", "conversion"}],
        "too_small": [{"class", "images", "reason"}], "imbalance": {"largest", "smallest", "ratio",
        "class_balance_recommended", "extreme"}, "annotations": [{"file", "problem"}],
        "warnings": [text], "notes": [text]}``.

    Raises:
        DatasetError: ``folder`` does not exist.
    """
    root = Path(folder)
    if not root.exists():
        raise DatasetError(f"{root}: data folder not found")
    task, layout, items, empty, problems, notes = _enumerate(root)
    classes: dict[str, dict[str, Any]] = {}
    unreadable, converted = [], []
    ok_files, ok_classes, digests, phashes = [], [], [], []
    per_class_paths: dict[str, list[Path]] = defaultdict(list)
    for path, cls in items:
        c = classes.setdefault(cls, {"images": 0, "unreadable": 0, "sizes": Counter(), "modes": Counter(),
                                     "bit_depths": Counter()})
        try:
            with Image.open(path) as im:
                mode, size, info = im.mode, (im.width, im.height), dict(im.info)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = load_image(path)
        except ImageReadError as exc:
            unreadable.append({"file": str(path), "class": cls, "reason": str(exc)})
            c["unreadable"] += 1
            continue
        except OSError as exc:
            unreadable.append({"file": str(path), "class": cls, "reason": f"{path}: {exc.__class__.__name__}: {exc}"})
            c["unreadable"] += 1
            continue
        c["images"] += 1
        c["sizes"][f"{size[0]}x{size[1]}"] += 1
        c["modes"][mode] += 1
        c["bit_depths"][str(_BITS.get(mode, 8))] += 1
        conv = _conversion(mode, info)
        if conv:
            converted.append({"file": str(path), "class": cls, "mode": mode, "bits": _BITS.get(mode, 8), "conversion": conv})
        ok_files.append(str(path))
        ok_classes.append(cls)
        digests.append(hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest())
        phashes.append(_phash(arr))
        per_class_paths[cls].append(path)
    for e in empty:
        classes.setdefault(e, {"images": 0, "unreadable": 0, "sizes": Counter(), "modes": Counter(), "bit_depths": Counter()})
    for c in classes.values():
        for k in ("sizes", "modes", "bit_depths"):
            c[k] = dict(c[k].most_common())
    dups = find_duplicates(ok_files, ok_classes, digests, phashes, near_threshold) if ok_files else []

    counts = {k: v["images"] for k, v in classes.items()}
    too_small = []
    for k, n in sorted(counts.items()):
        if 0 < n < MIN_PER_CLASS:
            too_small.append({"class": k, "images": n, "reason": (
                "one image: it cannot be both trained on and tested" if n == 1 else
                f"fewer than {MIN_PER_CLASS} images: a 20% test split holds at most one of them and "
                f"{MIN_PER_CLASS}-fold cross-validation cannot stratify it")})
    nonzero = {k: v for k, v in counts.items() if v > 0}
    imbalance: dict[str, Any] = {}
    if len(nonzero) >= 2:
        big = max(nonzero.items(), key=lambda kv: kv[1])
        small = min(nonzero.items(), key=lambda kv: kv[1])
        ratio = big[1] / small[1]
        imbalance = {"largest": {"class": big[0], "images": big[1]}, "smallest": {"class": small[0], "images": small[1]},
                     "ratio": round(ratio, 3), "class_balance_recommended": ratio > IMBALANCE_RATIO,
                     "extreme": ratio > EXTREME_RATIO}

    result: dict[str, Any] = {
        "folder": str(root), "task": task, "layout": layout, "n_images": len(ok_files), "classes": classes,
        "duplicates": dups, "empty_classes": sorted(empty), "unreadable": unreadable, "converted": converted,
        "too_small": too_small, "imbalance": imbalance, "annotations": problems, "notes": notes,
    }
    result["warnings"] = _warnings(result)
    if out_dir is not None:
        write_check(result, Path(out_dir), per_class_paths)
    return result


def _warnings(r: dict[str, Any]) -> list[str]:
    w = warn_on_leaks(r)
    if r["converted"]:
        modes = Counter(c["mode"] for c in r["converted"])
        w.append(f"{len(r['converted'])} images are converted when read ({', '.join(f'{m}: {n}' for m, n in modes.items())}); "
                 "see 'converted'")
    for t in r["too_small"]:
        w.append(f"class '{t['class']}' has {t['images']} image(s): {t['reason']}")
    im = r["imbalance"]
    if im and im["class_balance_recommended"]:
        w.append(f"{'extreme ' if im['extreme'] else ''}class imbalance: '{im['largest']['class']}' has "
                 f"{im['largest']['images']} images, '{im['smallest']['class']}' {im['smallest']['images']} "
                 f"(ratio {im['ratio']:.1f}); class-balanced sampling is recommended")
    if r["annotations"]:
        w.append(f"{len(r['annotations'])} annotation problems (e.g. {r['annotations'][0]['file']}: "
                 f"{r['annotations'][0]['problem']}); see 'annotations'")
    sizes = {s for c in r["classes"].values() for s in c["sizes"]}
    if len(sizes) > 1:
        w.append(f"{len(sizes)} different image sizes; every image is resized to the recipe's size")
    return w


def warn_on_leaks(check_result: dict[str, Any]) -> list[str]:
    """The problems ``train`` must shout about before training (one line each).

    Duplicate images across classes (they sit in train and test with conflicting labels),
    duplicates within a class (they leak between train and test and inflate the test figures),
    empty class folders (a class the user meant to have is silently missing) and unreadable files.

    Args:
        check_result: the dict of :func:`check_dataset`.

    Returns:
        Warning lines, empty when none of these problems exists.
    """
    out = []
    cross = [d for d in check_result["duplicates"] if d["cross_class"]]
    within = [d for d in check_result["duplicates"] if not d["cross_class"]]
    for d in cross[:20]:
        out.append(f"DUPLICATE ACROSS CLASSES ({d['kind']}): " + ", ".join(
            f"{Path(f).name} [{c}]" for f, c in zip(d["files"], d["classes"])) +
            ": the same image carries conflicting labels and leaks between train and test")
    if len(cross) > 20:
        out.append(f"... and {len(cross) - 20} more duplicate groups across classes (see data_check.json)")
    if within:
        n = sum(len(d["files"]) for d in within)
        ex = within[0]
        out.append(f"{len(within)} groups of duplicate images within a class ({n} files, e.g. "
                   f"{', '.join(Path(f).name for f in ex['files'][:3])} [{ex['classes'][0]}]): copies can land in "
                   "train and test and inflate the test figures")
    for e in check_result["empty_classes"]:
        out.append(f"EMPTY CLASS FOLDER '{e}': it holds no image and is left out of training")
    if check_result["unreadable"]:
        u = check_result["unreadable"]
        out.append(f"{len(u)} unreadable files (e.g. {u[0]['reason']}); see 'unreadable'")
    return out


def write_check(result: dict[str, Any], out_dir: Path, per_class_paths: dict[str, list[Path]] | None = None) -> Path:
    """Write ``data_check.json``, ``thumbnails/<class>.png`` and ``report.html`` into ``out_dir``; returns the JSON path."""
    from defectscope.evaluation.report import Report
    from defectscope.utils.io import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json(out_dir / "data_check.json", result)
    rep = Report(f"Data check: {result['folder']}")
    rep.text(f"Task guessed: {result['task']} (layout {result['layout']}); {result['n_images']} readable images.")
    if result["warnings"]:
        rep.heading("Warnings")
        for w in result["warnings"]:
            rep.text(w)
    rep.table("Classes", [{"class": k, "images": v["images"], "unreadable": v["unreadable"],
                           "sizes": ", ".join(f"{s} ({n})" for s, n in list(v["sizes"].items())[:4]),
                           "modes": ", ".join(f"{m} ({n})" for m, n in v["modes"].items()),
                           "bits": ", ".join(f"{b} ({n})" for b, n in v["bit_depths"].items())}
                          for k, v in result["classes"].items()])
    rep.table("Duplicates", [{"kind": d["kind"], "across classes": d["cross_class"], "distance": d["max_distance"],
                              "files": ", ".join(f"{Path(f).name} [{c}]" for f, c in zip(d["files"], d["classes"]))}
                             for d in result["duplicates"]])
    rep.table("Unreadable files", [{"file": u["file"], "reason": u["reason"]} for u in result["unreadable"]])
    rep.table("Converted when read", [{"file": c["file"], "mode": c["mode"], "bits": c["bits"],
                                       "conversion": c["conversion"]} for c in result["converted"]])
    rep.table("Annotation problems", result["annotations"])
    if per_class_paths:
        rep.heading("Thumbnails")
        (out_dir / "thumbnails").mkdir(exist_ok=True)
        for cls, paths in sorted(per_class_paths.items()):
            rel = f"thumbnails/{_safe(cls)}.png"
            _thumbnail_sheet(paths, out_dir / rel)
            if (out_dir / rel).is_file():
                rep.image(rel, f"{cls}: first {min(len(paths), THUMBS_PER_CLASS)} of {len(paths)} images")
    rep.write(out_dir / "report.html")
    return path


def render_table(result: dict[str, Any]):
    """A ``rich`` table of the classes (images, sizes, modes, bit depths, problems) for the console."""
    from rich.table import Table

    dup_count: Counter = Counter()
    for d in result["duplicates"]:
        for c in d["classes"]:
            dup_count[c] += 1
    table = Table(title=f"data check: {result['folder']} ({result['task']}, {result['layout']})")
    for col in ("class", "images", "sizes", "modes", "bits", "unreadable", "in duplicates"):
        table.add_column(col, justify="left" if col in ("class", "sizes", "modes") else "right",
                         overflow="fold")
    for k, v in result["classes"].items():
        table.add_row(k, str(v["images"]), ", ".join(list(v["sizes"])[:3]) + (" ..." if len(v["sizes"]) > 3 else ""),
                      ", ".join(v["modes"]), ", ".join(v["bit_depths"]), str(v["unreadable"]), str(dup_count[k]))
    return table
