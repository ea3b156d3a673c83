"""``ostate ablate --source HF_FOLDER --train --eval``: a checkpoint folder written by the real Trainer, no code."""

from __future__ import annotations

import shutil

import pytest

from ostate.errors import OstateError
from ostate.harness import ResultsStore
from tests.helpers.common import run_cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.helpers.hf_text import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("hf-text"))


def ablate(folder, out, *extra):
    return run_cli(
        "ablate", "--source", str(folder.checkpoint), "--train", str(folder.train), "--eval", str(folder.eval),
        "--strategies", "reload,fresh", "--seeds", "0", "--steps", "2", "--eval-every", "2", "--batch-size", "2",
        "--block-size", "32", "--workers", "1", "--no-plots", "--out", str(out), *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_a_trainer_checkpoint_folder_is_ablated_on_text_files_with_its_own_tokenizer(folder, tmp_path):
    done = ablate(folder, tmp_path / "out", "--source-eval", str(folder.source_eval))
    assert done.returncode == 0, done.stderr
    assert "checkpoint-6-causal-lm: 2 trials ran" in done.stderr
    store = ResultsStore(tmp_path / "out" / "results.sqlite")
    trials = store.trials()
    assert sorted(trials["strategy"]) == ["fresh", "reload"]
    metrics = set(store.records()["metric"])
    assert {"eval_loss", "source_loss", "train_loss", "eff_lr_p50"} <= metrics


def test_without_a_tokenizer_in_or_beside_the_checkpoint_the_run_stops_with_one_line(folder, tmp_path):
    bare = tmp_path / "run" / "checkpoint-6"
    shutil.copytree(folder.checkpoint, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    done = run_cli("ablate", "--source", str(bare), "--train", str(folder.train), "--eval", str(folder.eval))
    assert done.returncode == 2
    assert "no tokenizer in the checkpoint folder or the folder above it" in done.stderr
    assert "nothing is downloaded" in done.stderr and "Traceback" not in done.stderr


def test_a_folder_without_config_json_and_a_missing_eval_file_are_one_line_errors(folder, tmp_path):
    done = run_cli("ablate", "--source", str(tmp_path), "--train", str(folder.train), "--eval", str(folder.eval))
    assert done.returncode == 2 and "no config.json" in done.stderr
    done = run_cli(
        "ablate", "--source", str(folder.checkpoint), "--train", str(folder.train), "--eval", str(tmp_path / "no.txt")
    )
    assert done.returncode == 2 and "no.txt: no such file" in done.stderr


def test_jsonl_text_becomes_blocks_and_a_classifier_trains_on_labelled_jsonl(folder, tmp_path):
    import torch

    from ostate.harness.tasks.hf_text import hf_text_task
    from tests.helpers.hf_text import classifier_folder

    task = hf_text_task(folder.checkpoint, folder.train.with_suffix(".jsonl"), folder.eval, block_size=32)
    batch = next(iter(task.train_batches(3, torch.Generator().manual_seed(0))))
    assert batch["input_ids"].shape == (3, 32) and torch.equal(batch["input_ids"], batch["labels"])

    classifier = classifier_folder(tmp_path / "classifier")
    data = classifier / "labelled.jsonl"
    task = hf_text_task(classifier, data, data, block_size=32)
    assert task.name == "classifier-classification"
    model = task.model()
    batch = next(iter(task.train_batches(4, torch.Generator().manual_seed(0))))
    assert set(batch["labels"].tolist()) <= {0, 2} and torch.isfinite(task.loss(model, batch))
    model.eval()
    with torch.no_grad():
        result = task.evaluate(model)
    assert set(result) == {"loss", "accuracy"} and 0 <= result["accuracy"] <= 1
    with pytest.raises(OstateError, match="needs .jsonl data with 'text' and 'label'"):
        hf_text_task(classifier, folder.train, data)
