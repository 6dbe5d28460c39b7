"""Multi-class image sources of the anomaly task's defect-type clustering study (paper 001, section 4.4.2).

A source is a loader ``(settings, seed) -> ClusterData`` registered in :data:`CLUSTERING_SOURCES`; the
settings are the recipe's ``clustering`` block (:class:`defectscope.recipes.anomaly.ClusteringConfig`:
``root``, ``reference_class``, ``fit_images``, ``per_class``, ``image_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from defectscope.data.images import DatasetError, load_stack


@dataclass
class ClusterData:
    """Images of a multi-class source for the clustering study.

    Attributes:
        fit: uint8 ``[N, 3, S, S]`` reference ("normal") images to train on.
        eval_x: uint8 ``[M, 3, S, S]`` held-out images of every class (reference included).
        eval_y: ``[M]`` class index into ``class_names``.
        class_names: names; ``class_names[reference]`` is the reference class.
        reference: index of the reference class.
        description: one line for the report.
    """

    fit: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    class_names: list[str]
    reference: int
    description: str


def neu_cluster_data(cfg: Any, seed: int) -> ClusterData:
    """NEU with ``cfg.reference_class`` as the normal reference.

    Draws (seeded) ``fit_images`` reference images for training and ``per_class``
    other images of every class (the reference's are disjoint from the training ones).

    Raises:
        DatasetError: unknown reference class or too few images.
    """
    from defectscope.data.images import discover_labelled_images

    items, names, _ = discover_labelled_images(cfg.root, "prefix")
    if cfg.reference_class not in names:
        raise DatasetError(f"{cfg.root}: clustering.reference_class '{cfg.reference_class}' not among {names}")
    ref = names.index(cfg.reference_class)
    rng = np.random.default_rng(seed)
    fit_paths, eval_paths, eval_y = [], [], []
    for c in range(len(names)):
        paths = [it.path for it in items if it.label == c]
        perm = rng.permutation(len(paths))
        need = cfg.per_class + (cfg.fit_images if c == ref else 0)
        if len(paths) < need:
            raise DatasetError(f"{cfg.root}: class '{names[c]}' has {len(paths)} images, {need} needed")
        if c == ref:
            fit_paths = [paths[i] for i in perm[: cfg.fit_images]]
            chosen = perm[cfg.fit_images : need]
        else:
            chosen = perm[: cfg.per_class]
        eval_paths += [paths[i] for i in chosen]
        eval_y += [c] * len(chosen)
    return ClusterData(load_stack(fit_paths, cfg.image_size), load_stack(eval_paths, cfg.image_size),
                       np.array(eval_y), names, ref,
                       f"NEU ({cfg.root}), reference (normal) class '{cfg.reference_class}': {cfg.fit_images} images "
                       f"to train, {cfg.per_class} held-out images per class, seed {seed}")


#: clustering source name -> loader ``(config, seed) -> ClusterData``; the weld simulator registers ``weld_sim``
CLUSTERING_SOURCES: dict[str, Callable[[Any, int], ClusterData]] = {"neu": neu_cluster_data}
