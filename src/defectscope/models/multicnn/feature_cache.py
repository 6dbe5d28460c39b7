"""On-disk cache of pooled features, so the fusion classifier trains in seconds.

A cache entry holds the features ``[N, C]`` (float32) of one extractor on one
ordered list of image files. Its key is the SHA-256 of

- the extractor's fingerprint (:func:`model_fingerprint`: every tensor of its
  state dict, names, dtypes, shapes and bytes),
- the data fingerprint (:func:`data_fingerprint`: the ordered file paths and the
  SHA-1 of each file's bytes), and
- the input image size (and any extra settings, e.g. the member's own size).

Changing the weights, adding/removing/reordering/editing a file, or changing
the size gives a new key, so a stale entry is never read (it stays on disk
until the folder is removed). Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from defectscope.utils.io import torch_save

CACHE_FORMAT = "defectscope-features/1"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 hex digest of ``model.state_dict()`` (names, dtypes, shapes and values, layout-independent)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(files: list[str | Path]) -> str:
    """SHA-256 hex digest of the ordered file paths and each file's content.

    Raises:
        FileNotFoundError: a file is missing (named).
    """
    h = hashlib.sha256()
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image file listed for feature caching not found")
        h.update(str(p).encode() + b"|" + hashlib.sha1(p.read_bytes()).digest())
    return h.hexdigest()


class FeatureCache:
    """Features on disk under ``root``, one ``.pt`` file per (extractor, data, size) key.

    Args:
        root: cache folder (created on first write).

    Attributes:
        hits, misses: counters of :meth:`get_or_compute` calls.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_fp: str, data_fp: str, image_size: int, **extra: object) -> str:
        """Cache key (hex) from the fingerprints, the image size and extra settings."""
        blob = json.dumps({"model": model_fp, "data": data_fp, "image_size": int(image_size), **extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str, prefix: str = "features") -> Path:
        return self.root / f"{prefix}-{key[:24]}.pt"

    def load(self, key: str, prefix: str = "features") -> torch.Tensor | None:
        """Features ``[N, C]`` stored under ``key``, or ``None`` (absent, other format or key mismatch)."""
        p = self.path(key, prefix)
        if not p.is_file():
            return None
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT or obj.get("key") != key:
            return None
        return obj["features"]

    def save(self, key: str, features: torch.Tensor, prefix: str = "features") -> Path:
        """Store features ``[N, C]`` under ``key`` (atomically)."""
        return torch_save(self.path(key, prefix), {"format": CACHE_FORMAT, "key": key,
                                                    "features": features.detach().float().cpu().contiguous()})

    def get_or_compute(self, model: nn.Module, files: list[str | Path], image_size: int,
                       compute: Callable[[], torch.Tensor], prefix: str = "features", data_fp: str | None = None,
                       **extra: object) -> tuple[torch.Tensor, bool]:
        """Cached features of ``model`` on ``files`` at ``image_size``, computing and storing them on a miss.

        Args:
            model: the extractor (its state dict is fingerprinted).
            files: the ordered image files the features belong to.
            image_size: input side in pixels.
            compute: called on a miss; returns ``[len(files), C]``.
            prefix: file-name prefix (e.g. the member's name) for readability.
            data_fp: precomputed :func:`data_fingerprint` of ``files`` (saves re-hashing).
            extra: more settings that change the features (e.g. the member's input size).

        Returns:
            ``(features [N, C] float32, hit)``.

        Raises:
            ValueError: ``compute`` returned the wrong number of rows.
        """
        key = self.key(model_fingerprint(model), data_fp or data_fingerprint(files), image_size, **extra)
        cached = self.load(key, prefix)
        if cached is not None and cached.shape[0] == len(files):
            self.hits += 1
            return cached, True
        feats = compute()
        if feats.shape[0] != len(files):
            raise ValueError(f"feature cache: computed {feats.shape[0]} rows for {len(files)} files")
        self.save(key, feats, prefix)
        self.misses += 1
        return feats.detach().float().cpu(), False
