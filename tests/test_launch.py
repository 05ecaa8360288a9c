"""The shipped launch configs: each parses, names files that exist, and documents its own command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))


def test_the_configs_the_readme_promises_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
            "cpu_2proc.yaml", "fsdp.yaml", "cpu_fsdp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config(path):
    config = yaml.safe_load(path.read_text())
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"--config_file launch/{path.name}" in line for line in header), "the header shows how to use it"
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    if config["distributed_type"] == "FSDP":  # FSDP2, one unit per transformer block
        assert config["fsdp_config"]["fsdp_version"] == 2
        assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    if config["distributed_type"] == "DEEPSPEED":
        ds_path = LAUNCH.parent / config["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_path.read_text())
        assert ds["zero_optimization"]["stage"] == (3 if "zero3" in path.name else 2)
        # accelerate refuses these beside a DeepSpeed JSON; the recipe sets them
        assert "mixed_precision" not in config
        if ds["zero_optimization"]["stage"] == 3:  # needed to gather full weights for model.safetensors
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
