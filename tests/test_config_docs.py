"""docs/CONFIG.md stays true to the classes: every option of every section, with its default."""

from __future__ import annotations

import json
import re

import attrs
import pytest

from dalle2_decoder.config import (
    ClipConfig,
    ConsoleLogConfig,
    DataConfig,
    DataSplits,
    DecoderConfig,
    EvaluateConfig,
    FidelityConfig,
    HuggingfaceSaveConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    TensorboardLogConfig,
    TrackerConfig,
    TrainConfig,
    TrainDecoderConfig,
    UnetConfig,
    UnetSourceConfig,
    UnetSourcesLoadConfig,
    UrlLoadConfig,
    WandbLoadConfig,
    WandbLogConfig,
    WandbSaveConfig,
)
from dalle2_decoder.config.structure import converter

from .conftest import REPO_ROOT

SECTIONS = {
    "Top level": TrainDecoderConfig,
    "`decoder.unets[i]`": UnetConfig,
    "`decoder`": DecoderConfig,
    "`decoder.clip`": ClipConfig,
    "`data`": DataConfig,
    "`data.splits`": DataSplits,
    "`train`": TrainConfig,
    "`evaluate`": EvaluateConfig,
    "`evaluate.fidelity`": FidelityConfig,
    "`tracker`": TrackerConfig,
    "`tracker.log` with `log_type: console`": ConsoleLogConfig,
    "`tracker.log` with `log_type: wandb`": WandbLogConfig,
    "`tracker.log` with `log_type: tensorboard`": TensorboardLogConfig,
    "`tracker.load` with `load_from: local`": LocalLoadConfig,
    "`tracker.load` with `load_from: url`": UrlLoadConfig,
    "`tracker.load` with `load_from: wandb`": WandbLoadConfig,
    "`tracker.load` with `load_from: unet_sources`": UnetSourcesLoadConfig,
    "`tracker.load.unet_sources[i]`": UnetSourceConfig,
    "`tracker.save` with `save_to: local`": LocalSaveConfig,
    "`tracker.save` with `save_to: huggingface`": HuggingfaceSaveConfig,
    "`tracker.save` with `save_to: wandb`": WandbSaveConfig,
}
ROW = re.compile(r"^\| `(?P<name>[A-Za-z_]+)` \| [^|]+ \| (?P<default>[^|]+) \| .+ \|$")


def documented_tables():
    tables, heading = {}, None
    for line in (REPO_ROOT / "docs/CONFIG.md").read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            continue
        match = ROW.match(line)
        if match and heading is not None:
            tables.setdefault(heading, {})[match["name"]] = match["default"].strip()
    return tables


def expected_default(field):
    if field.default is attrs.NOTHING:
        return "required"
    value = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    return json.loads(json.dumps(converter.unstructure(value)))


@pytest.mark.parametrize("heading", SECTIONS)
def test_every_option_is_documented_with_its_default(heading):
    table = documented_tables().get(heading)
    assert table is not None, f"docs/CONFIG.md has no table under the heading {heading}"
    fields = {field.name: field for field in attrs.fields(SECTIONS[heading]) if field.name != "options"}
    assert set(table) == set(fields), f"{heading}: documented {sorted(table)} but the class has {sorted(fields)}"
    for name, field in fields.items():
        documented = table[name]
        expected = expected_default(field)
        if expected == "required":
            assert documented == "required", f"{heading} {name}"
        elif attrs.has(type(field.default.factory() if isinstance(field.default, attrs.Factory) else field.default)):
            assert documented in ("`{}`", f"`{json.dumps(expected)}`"), f"{heading} {name}"
        else:
            assert documented.startswith("`") and json.loads(documented.strip("`")) == expected, f"{heading} {name}"


def test_every_config_class_is_documented():
    import dalle2_decoder.config as config

    classes = {value for value in vars(config).values() if isinstance(value, type) and attrs.has(value)}
    assert classes == set(SECTIONS.values())
