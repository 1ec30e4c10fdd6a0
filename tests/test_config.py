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
        ("check_budget", -0.1),
        ("check_budget", 1.5),
        ("check_budget", "all"),
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


def test_help_renders_through_argparse():
    # argparse %-formats every help string: a bare "%" in one made `--help` of every script crash.
    text = HfArgumentParser(NEqConfig).format_help()
    assert "--check_every" in text and "--holdout_size" in text


@pytest.mark.parametrize("name", ["pin_frozen", "freeze_embeddings", "strict"])
def test_bool_fields_parse_strings_strictly(name):
    for text in ("no", "false", "False", "0", "n"):
        assert getattr(NEqConfig(**{name: text}), name) is False
    for text in ("yes", "true", "TRUE", "1", "y"):
        assert getattr(NEqConfig(**{name: text}), name) is True
    assert getattr(NEqConfig(**{name: 0}), name) is False
    for value in ("maybe", "", 2, None, 0.5):
        with pytest.raises(ValueError, match=f"NEqConfig.{name}=.*expected a boolean"):
            NEqConfig(**{name: value})


def test_bool_strings_from_a_dict_or_the_command_line():
    cfg = NEqConfig.from_dict({"pin_frozen": "false", "freeze_embeddings": "no"})
    assert cfg.pin_frozen is False and cfg.freeze_embeddings is False
    (cfg,) = HfArgumentParser(NEqConfig).parse_args_into_dataclasses(["--pin_frozen", "no", "--strict", "yes"])
    assert cfg.pin_frozen is False and cfg.strict is True


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("unit_kinds", ["heads", "heads"], "each kind may appear once"),
        ("unit_kinds", "neurons,neurons", "each kind may appear once"),
        ("holdout_seed", "x", "expected an integer seed"),
        ("holdout_seed", 1.5, "expected an integer seed"),
        ("holdout_seed", True, "expected an integer seed"),
        ("check_every", True, "a boolean is not a schedule"),
        ("check_every", False, "a boolean is not a schedule"),
        ("holdout_size", 1.0, "ambiguous.*integer count.*fraction < 1"),
        ("eps_relative_max", -1e-3, "a number >= 0"),
        ("eps_relative_max", True, "a number >= 0"),
        ("eps_relative_max", "x", "a number >= 0"),
        ("settle_fraction", -0.1, "0 <= settle_fraction <= 1"),
        ("settle_fraction", 1.5, "0 <= settle_fraction <= 1"),
        ("settle_fraction", True, "0 <= settle_fraction <= 1"),
    ],
)
def test_values_that_would_change_the_maths_or_fail_late_are_refused(field, value, message):
    with pytest.raises(ValueError, match=f"NEqConfig.{field}=.*{message}"):
        NEqConfig(**{field: value})


def test_holdout_seed_and_size_spellings_that_stay_valid():
    assert NEqConfig(holdout_seed="7").holdout_seed == 7
    assert NEqConfig(holdout_size=1).holdout_size == 1
    assert NEqConfig(holdout_size=0.999).holdout_size == 0.999


def test_assignment_after_construction_is_validated_and_refused_values_do_not_stick():
    cfg = NEqConfig(check_every=5)
    cfg.check_every = "12"
    assert cfg.check_every == 12
    with pytest.raises(ValueError, match="NEqConfig.check_every=0"):
        cfg.check_every = 0
    assert cfg.check_every == 12
    with pytest.raises(ValueError, match="NEqConfig.unit_kinds="):
        cfg.unit_kinds = ["heads", "heads"]
    assert cfg.unit_kinds == ["heads", "neurons"]
    cfg.pin_frozen = "yes"
    assert cfg.pin_frozen is True
    assert cfg == NEqConfig.from_dict(json.loads(cfg.to_json_string()))
