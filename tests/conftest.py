"""Shared test fixtures: paths to the real data sets beside the repository, small subsets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEFECTSCOPE_SHARED", REPO.parent / "shared"))
NEU = SHARED / "datasets" / "neu-det"
KSDD = SHARED / "datasets" / "kolektorsdd"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture(scope="session")
def neu_root() -> Path:
    """The full NEU-DET folder (images/ + annotations/)."""
    return _need(NEU)


@pytest.fixture(scope="session")
def ksdd_root() -> Path:
    """The KolektorSDD folder (images/, masks/, manifest.csv)."""
    return _need(KSDD)


@pytest.fixture(scope="session")
def neu_small(tmp_path_factory, neu_root) -> Path:
    """A real NEU subset in class-prefix layout: 8 images per class (48 files), symlinked."""
    out = tmp_path_factory.mktemp("neu_small")
    classes = sorted({p.stem.rsplit("_", 1)[0] for p in (neu_root / "images").glob("*.jpg")})
    for c in classes:
        for i in range(1, 9):
            src = neu_root / "images" / f"{c}_{i}.jpg"
            (out / src.name).symlink_to(src)
    return out


@pytest.fixture(scope="session")
def neu_small_folders(tmp_path_factory, neu_root) -> Path:
    """The same kind of subset in class-per-folder (ImageFolder) layout, copied."""
    out = tmp_path_factory.mktemp("neu_folders")
    for c in ("crazing", "patches", "scratches"):
        (out / c).mkdir()
        for i in range(11, 15):
            shutil.copy(neu_root / "images" / f"{c}_{i}.jpg", out / c / f"{c}_{i}.jpg")
    return out
