"""Recipe parsing, overrides and validation errors."""

from __future__ import annotations

import pytest

from defectscope.config import ConfigError, load_raw, parse_overrides, validate
from defectscope.engine.classification import ClassificationRecipe


def test_overrides_are_typed():
    assert parse_overrides(["train.epochs=3", "model.pretrained=false", "x.y=[1, 2]", "a=hi"]) == [
        ("train.epochs", 3), ("model.pretrained", False), ("x.y", [1, 2]), ("a", "hi")]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])


def test_recipe_defaults_and_override(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: classification\ndata: {root: /x}\n")
    cfg = validate(load_raw(p, ["train.epochs=3"]), ClassificationRecipe, str(p))
    assert cfg.train.epochs == 3 and cfg.model.name == "multiscale" and cfg.data.image_size == 200


def test_typo_and_bad_value_are_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: classification\ndata: {root: /x}\ntrain: {epoch: 3, lr: -1}\n")
    with pytest.raises(ConfigError) as err:
        validate(load_raw(p), ClassificationRecipe, str(p))
    assert "train.epoch" in str(err.value) and "train.lr" in str(err.value) and "r.yaml" in str(err.value)


def test_missing_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_raw(tmp_path / "none.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_raw(tmp_path / "l.yaml")
