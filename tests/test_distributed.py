"""Several processes (gloo on CPU): the loss and the update of one optimiser step do not depend on how
the global batch is split over processes and micro-batches; the batch-level terms equal the
one-process value with ``regularizers.global_batch``; the sharded modes refuse the teacher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from balora.distributed import SUPPORTED_TEACHER_MODES, check_teacher_supported, gather_rows, sharded_mode

WORKER = Path(__file__).with_name("distributed_steps.py")
FAMILIES = ("classification", "generation")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, runs: list[dict], out: Path, bert: str, llama: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", str(WORKER), "--out", str(out), "--bert", bert,
               "--llama", llama, "--runs", json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def _run(name, family, batch_size, accumulation=1, terms="all", global_batch=False):
    return {"name": f"{family}-{name}", "family": family, "batch_size": batch_size, "accumulation": accumulation,
            "terms": terms, "global_batch": global_batch}


@pytest.fixture(scope="module")
def steps(tiny_model_dir, tiny_causal_lm_dir, tmp_path_factory):
    """Every run of the module: two launches, one of 2 processes and one of 1."""
    folder = tmp_path_factory.mktemp("distributed")
    two = [_run(n, f, 4, terms=t, global_batch=g) for f in FAMILIES
           for n, t, g in (("2p-global", "all", True), ("2p-local", "all", False), ("2p-token", "token", False))]
    one = [_run(n, f, b, accumulation=a, terms=t) for f in FAMILIES
           for n, b, a, t in (("1p-whole", 8, 1, "all"), ("1p-accumulated", 4, 2, "all"),
                              ("1p-whole-token", 8, 1, "token"), ("1p-accumulated-token", 4, 2, "token"))]
    results = _launch(2, two, folder / "two.pt", tiny_model_dir, tiny_causal_lm_dir)
    results.update(_launch(1, one, folder / "one.pt", tiny_model_dir, tiny_causal_lm_dir))
    return results


def _assert_same_step(a: dict, b: dict, rtol=1e-4, atol=1e-7) -> None:
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["update"].keys() == b["update"].keys()
    assert sum(float(u.abs().sum()) for u in a["update"].values()) > 1e-4  # the step did something
    for name in a["update"]:
        torch.testing.assert_close(a["update"][name], b["update"][name], rtol=rtol, atol=atol, msg=name)


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a["update"][n] - b["update"][n]).abs().max()) for n in a["update"])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_with_global_batch_equal_one_process_on_the_whole_batch(steps, family):
    assert steps[f"{family}-2p-global"]["processes"] == 2
    _assert_same_step(steps[f"{family}-2p-global"], steps[f"{family}-1p-whole"])


@pytest.mark.parametrize("family", FAMILIES)
def test_token_level_terms_are_normalised_by_the_global_count(steps, family):
    # CE, consistency (and the entropy diversity of generation) only: however the 8 examples are split --
    # over 2 processes or 2 micro-batches, with different numbers of valid tokens in each half -- the step
    # equals the whole batch's
    whole = steps[f"{family}-1p-whole-token"]
    _assert_same_step(steps[f"{family}-2p-token"], whole)
    _assert_same_step(steps[f"{family}-1p-accumulated-token"], whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_global_batch_the_batch_level_terms_are_per_process_like_micro_batches(steps, family):
    # global_batch off: each process computes the covariance / SVD terms on its own rows, weighted by its
    # share of the items -- exactly what gradient accumulation does in one process; and it differs from the
    # whole batch's terms (so the global_batch test above is not vacuous)
    local, accumulated, whole = (steps[f"{family}-{n}"] for n in ("2p-local", "1p-accumulated", "1p-whole"))
    _assert_same_step(local, accumulated)
    assert _max_difference(local, whole) > 100 * _max_difference(steps[f"{family}-2p-global"], whole)
    assert _max_difference(local, whole) > 1e-6


def test_gather_rows_in_one_process_is_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_rows(x) is x


def test_sharded_modes_refuse_the_teacher_in_one_line(monkeypatch):
    from accelerate.utils import DistributedType

    class Plugin:
        zero_stage = 3

    class State:
        deepspeed_plugin = Plugin()

    class Accelerator:
        distributed_type = DistributedType.DEEPSPEED
        state = State()

    assert sharded_mode(Accelerator()) == "DeepSpeed ZeRO-3"
    Plugin.zero_stage = 2
    assert sharded_mode(Accelerator()) is None
    check_teacher_supported(Accelerator())  # ZeRO-2 keeps full parameters
    Accelerator.distributed_type = DistributedType.FSDP
    with pytest.raises(ValueError, match="FSDP") as error:
        check_teacher_supported(Accelerator())
    assert "\n" not in str(error.value) and SUPPORTED_TEACHER_MODES in str(error.value)
    Accelerator.distributed_type = DistributedType.MULTI_CPU
    assert sharded_mode(Accelerator()) is None
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    assert sharded_mode() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert sharded_mode() is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharded_mode() == "DeepSpeed ZeRO-3"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded_mode() == "FSDP"


def test_balora_train_on_two_processes_writes_one_complete_run(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_classifier_overrides, write_task_files

    train_file, eval_file = write_task_files(tmp_path)
    overrides = tiny_classifier_overrides(tiny_model_dir, tmp_path / "runs", train_file, eval_file)
    overrides += ["train.max_steps=3", "train.batch_size=4", "train.save_steps=2", "train.logging_steps=1",
                  "train.report_to=[tensorboard]",
                  "regularizers.global_batch=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "balora", "train", *overrides, "--num-processes", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("run directory:") == 1  # printed by the main process only
    (run,) = (tmp_path / "runs").iterdir()  # one directory, created by the main process
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_steps"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 24  # every eval example, once
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: the main process's
    history = json.loads((run / "log_history.json").read_text())
    assert any("reg_svd" in h for h in history)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    PeftModel.from_pretrained(base, str(run / "adapter"))  # standard PEFT format


def test_num_processes_checks_the_config_before_launching(tmp_path, capsys):
    from balora.cli import main

    assert main(["train", f"output_dir={tmp_path}", "train.max_steps=zero", "--num-processes", "2"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert main(["train", f"output_dir={tmp_path}", "--num-processes", "0"]) == 2
    assert main(["train", f"output_dir={tmp_path}", "--accelerate-config", str(tmp_path / "none.yaml")]) == 2
    assert not any(tmp_path.iterdir())


def test_the_shipped_fsdp_config_refuses_a_run_that_needs_the_teacher(tiny_model_dir, tmp_path):
    from conftest import tiny_classifier_overrides, write_task_files

    train_file, eval_file = write_task_files(tmp_path)
    overrides = tiny_classifier_overrides(tiny_model_dir, tmp_path / "runs", train_file, eval_file)  # balora: λ1 > 0
    fsdp = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    done = subprocess.run([sys.executable, "-m", "balora", "train", *overrides, "--accelerate-config", str(fsdp),
                           "--num-processes", "2", "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("balora: error:")]
    assert errors and all("cannot run under FSDP" in line and SUPPORTED_TEACHER_MODES in line for line in errors)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run directory


def test_a_generation_run_on_two_processes_is_saved_and_evaluated_by_the_main_process(tiny_causal_lm_dir, tmp_path):
    overrides = [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_causal_lm_dir}", "model.max_length=96",
        "data.task=gsm-symbolic", "data.max_train_examples=8", "adapter.method=balora", "adapter.rank=4",
        "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=2", "train.batch_size=2", "train.logging_steps=1",
        "train.save_steps=2", "train.report_to=[]", "train.loss_chunk_size=16", "eval.max_examples=3",
        "eval.max_new_tokens=4", "eval.batch_size=3", "regularizers.consistency_schedule=constant",
        "regularizers.focus_schedule=constant", "regularizers.global_batch=true",
    ]
    done = subprocess.run([sys.executable, "-m", "balora", "train", *overrides, "--num-processes", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and "accuracy" in metrics
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 3
    history = json.loads((run / "log_history.json").read_text())
    assert any("reg_svd" in h for h in history) and (run / "adapter" / "adapter_config.json").is_file()
