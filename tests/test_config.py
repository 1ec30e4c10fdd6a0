import json

import pytest
from transformers import HfArgumentParser

from neq_hf import NEqConfig


def test_defaults_follow_the_paper():
    cfg = NEqConfig()
    assert cfg.mu == 0.5
    assert cfg.unit_kinds == ["heads", "neurons"]
    assert cfg.warmup >= 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("eps", -1e-3),
        ("eps", "big"),
        ("mu", 1.0),
        ("mu", -0.1),
        ("warmup", 0),
        ("warmup", 1.5),
        ("check_every", 0),
        ("check_every", "daily"),
        ("holdout_size", 0),
        ("holdout_size", -0.5),
        ("holdout_size", 2.5),
        ("holdout_batch_size", 0),
        ("unit_kinds", ["heads", "layers"]),
        ("unit_kinds", []),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"NEqConfig.{field}="):
        NEqConfig(**{field: value})


def test_check_every_parsing():
    assert NEqConfig(check_every="epoch").check_every == "epoch"
    assert NEqConfig(check_every="25").check_every == 25
    assert NEqConfig(check_every=7).check_every == 7
    assert NEqConfig(holdout_size=64.0).holdout_size == 64


def test_every_field_documented_and_parsable_from_the_command_line():
    import dataclasses

    for f in dataclasses.fields(NEqConfig):
        assert f.metadata.get("help"), f.name
    (cfg,) = HfArgumentParser(NEqConfig).parse_args_into_dataclasses(
        ["--eps", "0.01", "--check_every", "10", "--unit_kinds", "neurons", "--pin_frozen", "true"]
    )
    assert cfg.eps == 0.01 and cfg.check_every == 10 and cfg.unit_kinds == ["neurons"] and cfg.pin_frozen


def test_round_trip_through_json():
    cfg = NEqConfig(eps=0.02, check_every="epoch", unit_kinds=["heads"])
    again = NEqConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg
