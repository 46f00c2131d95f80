"""λ schedules and the validated configuration layer."""

from __future__ import annotations

from pathlib import Path

import pytest

import dataclasses
import re

from balora.cli import main
from balora.config import SECTIONS, ConfigError, RegularizerConfig, RunConfig, describe_config, load_config
from balora.objectives.lambdas import LambdaSchedule, parse_schedule


def test_two_phase_is_off_then_ramps_then_constant():
    s = LambdaSchedule("two_phase", warmup_ratio=0.2, ramp_ratio=0.05)
    assert [s.factor(step, 100) for step in (0, 10, 19)] == [0.0, 0.0, 0.0]
    assert s.factor(20, 100) == 0.0
    assert s.factor(22, 100) == pytest.approx(0.4)
    assert s.factor(25, 100) == 1.0 and s.factor(99, 100) == 1.0


def test_cosine_decays_from_one_to_floor():
    s = LambdaSchedule("cosine", floor=0.1)
    assert s.factor(0, 50) == 1.0
    assert s.factor(25, 50) == pytest.approx(0.55)
    assert s.factor(50, 50) == pytest.approx(0.1)
    values = [s.factor(i, 50) for i in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_warmup_and_constant():
    assert LambdaSchedule("linear_warmup", warmup_ratio=0.1).factor(5, 100) == pytest.approx(0.5)
    assert LambdaSchedule("linear_warmup", warmup_ratio=0.1).factor(50, 100) == 1.0
    assert LambdaSchedule("constant").factor(3, 7) == 1.0


@pytest.mark.parametrize("bad", [{"kind": "step"}, {"kind": "cosine", "floor": 2.0}, {"kind": "two_phase", "wat": 1}])
def test_bad_schedules_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_schedule(bad)


def test_paper_defaults_per_family():
    cls = RegularizerConfig().resolved("classification")
    assert (cls.lambda_consistency, cls.lambda_diversity, cls.lambda_svd, cls.svd_k) == (0.15, 0.03, 0.03, 5)
    gen = RegularizerConfig().resolved("generation")
    assert (gen.lambda_consistency, gen.lambda_diversity, gen.lambda_svd, gen.svd_k) == (0.025, 0.005, 0.005, 10)
    assert (gen.consistency_schedule, gen.focus_schedule, gen.top_k, gen.temperature) == ("cosine", "two_phase", 20, 2.0)
    assert RegularizerConfig(lambda_svd=0.5).resolved("classification").lambda_svd == 0.5


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  method: pissa\n  rank: 4\ntrain:\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["adapter.method=lora+reg", "train.epochs=2", "regularizers.consistency_kind=cosine"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.adapter.method, cfg.adapter.rank, cfg.train.epochs) == ("lora+reg", 4, 2.0)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.regularizers.consistency_kind == "cosine"


@pytest.mark.parametrize("overrides, match", [
    (["adapter.rnk=4"], "unknown key"),
    (["adapter.method=lorax"], "adapter.method"),
    (["adapter.rank=0"], "adapter.rank"),
    (["train.learning_rate=fast"], "train.learning_rate"),
    (["regularizers.consistency_kind=l1"], "consistency_kind"),
    (["regularizers.temperature=0"], "temperature"),
    (["epochs"], "key=value"),
    (["family=translation"], "family"),
    (["regularizers.svd_solver=qr"], "svd_solver"),
    (["eval.benchmark=bleu"], "eval.benchmark"),
    (["train.loss_chunk_size=0"], "loss_chunk_size"),
    (["data.train_on=everything"], "train_on"),
    (["train.precision=fp8"], "train.precision"),
    (["train.lr_scheduler=cosin"], "train.lr_scheduler"),
    (["regularizers.svd_k_policy=round"], "svd_k_policy"),
    (["family=generation", "data.task=gsm-symbolic", "data.format=chatml"], "data.format"),
    (["train.head_learning_rate=0"], "head_learning_rate must be > 0"),
    (["train.head_learning_rate=1e-3", "adapter.method=loraplus"], "its optimizer"),
    (["train.head_learning_rate=1e-3", "adapter.method=lorafa+reg"], "its optimizer"),
    (["train.head_learning_rate=1e-3", "adapter.method=full"], "needs an adapter"),
    (["family=generation", "data.task=gsm-symbolic", "train.head_learning_rate=1e-3"], "classification setting"),
])
def test_bad_config_values_give_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.family in ("classification", "generation")
    if config.family == "generation":
        assert config.regularizers.resolved("generation").svd_normalize == "frobenius"


GEN = ["family=generation", "data.task=gsm-symbolic"]


def test_new_fields_and_every_consistency_kind_in_both_families():
    cfg = load_config(None, ["train.precision=bf16", "regularizers.svd_k_policy=literal"])
    assert (cfg.train.precision, cfg.train.gradient_checkpointing, cfg.regularizers.svd_k_policy) == ("bf16", False, "literal")
    assert RunConfig().regularizers.svd_k_policy == "clamp" and RunConfig().train.precision == "fp32"
    for kind in ("kl", "cosine", "mse", "mse_normalized"):
        assert load_config(None, [f"regularizers.consistency_kind={kind}"]).regularizers.consistency_kind == kind
        assert load_config(None, [*GEN, f"regularizers.consistency_kind={kind}"]).regularizers.consistency_kind == kind
    gen = load_config(None, [*GEN, "train.gradient_checkpointing=true", "train.precision=bf16"])
    assert gen.train.gradient_checkpointing and gen.benchmark == "gsm8k"


@pytest.mark.parametrize("overrides, match", [
    # a key of the other family
    ([*GEN, "regularizers.teacher_cache=true"], "regularizers.teacher_cache is a classification setting"),
    ([*GEN, "regularizers.svd_k_policy=literal"], "regularizers.svd_k_policy is a classification setting"),
    ([*GEN, "data.text_column=body"], "data.text_column is a classification setting"),
    ([*GEN, "data.text_pair_column=b"], "data.text_pair_column is a classification setting"),
    ([*GEN, "data.label_column=y"], "data.label_column is a classification setting"),
    ([*GEN, "data.max_eval_examples=5"], "data.max_eval_examples is a classification setting"),
    ([*GEN, "train.eval_batch_size=8"], "train.eval_batch_size is a classification setting"),
    (["eval.max_new_tokens=8"], "eval.max_new_tokens is a generation setting"),
    (["eval.benchmark=gsm8k"], "eval.benchmark is a generation setting"),
    (["eval.perplexity_corpus=grimm-tales"], "eval.perplexity_corpus is a generation setting"),
    (["data.format=alpaca"], "data.format is a generation setting"),
    (["data.train_on=all_assistant"], "data.train_on is a generation setting"),
    (["regularizers.svd_solver=randomized"], "regularizers.svd_solver is a generation setting"),
    (["regularizers.svd_oversample=4"], "regularizers.svd_oversample is a generation setting"),
    (["regularizers.svd_niter=4"], "regularizers.svd_niter is a generation setting"),
    (["train.loss_chunk_size=64"], "train.loss_chunk_size is a generation setting"),
    (["train.gradient_checkpointing=true"], "train.gradient_checkpointing is a generation setting"),
    # losses the family does not have
    ([*GEN, "regularizers.diversity_kind=covariance"], "regularizers.diversity_kind=covariance"),
    ([*GEN, "regularizers.svd_normalize=nuclear"], "regularizers.svd_normalize=nuclear"),
    # settings that the method or the chosen loss never reads
    (["regularizers.consistency_kind=mse", "regularizers.temperature=1.0"], "regularizers.temperature has no effect"),
    (["regularizers.top_k=5"], "regularizers.top_k has no effect"),
    (["regularizers.lambda_consistency=0", "regularizers.teacher_cache=true"], "regularizers.teacher_cache has no effect"),
    (["regularizers.lambda_consistency=0", "regularizers.consistency_kind=cosine"], "consistency_kind has no effect"),
    (["regularizers.lambda_consistency=0", "regularizers.consistency_schedule=cosine"], "consistency_schedule has no effect"),
    (["regularizers.lambda_diversity=0", "regularizers.diversity_kind=entropy"], "diversity_kind has no effect"),
    (["regularizers.lambda_diversity=0", "regularizers.lambda_svd=0", "regularizers.focus_schedule=cosine"],
     "focus_schedule has no effect"),
    (["regularizers.lambda_svd=0", "regularizers.svd_k=3"], "regularizers.svd_k has no effect"),
    (["regularizers.lambda_svd=0", "regularizers.svd_normalize=frobenius"], "svd_normalize has no effect"),
    (["regularizers.lambda_svd=0", "regularizers.svd_k_policy=literal"], "svd_k_policy has no effect"),
    ([*GEN, "regularizers.lambda_svd=0", "regularizers.svd_solver=exact"], "svd_solver has no effect"),
    ([*GEN, "regularizers.svd_solver=exact", "regularizers.svd_niter=4"], "svd_niter has no effect"),
    ([*GEN, "regularizers.svd_solver=exact", "regularizers.svd_oversample=4"], "svd_oversample has no effect"),
    # adapter and optimisation
    (["adapter.method=full", "adapter.rank=4"], "adapter.rank has no effect with adapter.method=full"),
    (["adapter.method=full", "adapter.target_modules=[query]"], "adapter.target_modules has no effect"),
    (["train.max_steps=10", "train.epochs=3"], "train.epochs is ignored when train.max_steps > 0"),
    # data and evaluation
    (["data.task=gsm-symbolic"], "data.task=gsm-symbolic is a generation task"),
    (["data.task=metamathqa"], "data.task=metamathqa is a generation task"),
    (["family=generation"], "data.task=reuters-r8 is a classification task"),
    (["family=generation", "data.task=cola"], "data.task=cola is a classification task"),
    (["data.text_column=body"], "data.text_column is read only from data files"),
    ([*GEN, "data.train_file=train.jsonl"], "data.train_file is not read with data.task=gsm-symbolic"),
    ([*GEN, "data.eval_file=test.jsonl"], "data.eval_file is not read with data.task=gsm-symbolic"),
    ([*GEN, "eval.benchmark=math"], "eval.benchmark=math"),
    (["family=generation", "data.task=metamathqa", "data.eval_file=test.jsonl"], "data.eval_file is read only with eval.benchmark"),
    (["family=generation", "data.task=metamathqa", "eval.max_examples=3"], "eval.max_examples is read only with a benchmark"),
    (["family=generation", "data.task=metamathqa", "eval.max_new_tokens=3"], "eval.max_new_tokens is read only with a benchmark"),
    (["family=generation", "data.task=metamathqa", "eval.batch_size=3"], "eval.batch_size is read only with a benchmark"),
    ([*GEN, "eval.perplexity_stride=128"], "eval.perplexity_stride is read only with eval.perplexity_corpus"),
])
def test_inconsistent_combinations_fail_at_load_time_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)) as info:
        load_config(None, overrides)
    assert len(str(info.value).splitlines()) == 1


def test_consistent_family_settings_load():
    cfg = load_config(None, ["family=generation", "data.task=metamathqa", "data.eval_file=test.jsonl",
                             "eval.benchmark=math", "eval.max_examples=3", "eval.perplexity_corpus=grimm-tales",
                             "eval.perplexity_stride=128", "regularizers.svd_solver=randomized",
                             "regularizers.svd_niter=4", "data.format=metamath", "train.loss_chunk_size=64"])
    assert cfg.benchmark == "math" and cfg.regularizers.svd_niter == 4
    cls = load_config(None, ["data.task=files", "data.train_file=a.csv", "data.eval_file=b.csv",
                             "data.text_column=body", "regularizers.teacher_cache=true",
                             "regularizers.diversity_kind=entropy", "regularizers.top_k=5", "train.max_steps=5"])
    assert (cls.data.text_column, cls.regularizers.top_k) == ("body", 5)
    assert load_config(None, ["adapter.method=full"]).adapter.method == "full"


def test_every_field_has_help_and_config_lists_it(capsys):
    classes = [RunConfig] + [dataclasses.fields(RunConfig)[i].default_factory for i in range(3, 9)]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name}"
    listing = describe_config()
    for section in SECTIONS:
        assert f"\n{section}:  " in listing
    assert "train.precision (str, default 'fp32')" in listing
    assert "regularizers.teacher_cache (bool, default False)  [classification only]" in listing
    assert "eval.benchmark" in listing and "(0.15 classification, 0.025 generation)" in listing
    assert main(["config", "train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train:") and "train.gradient_checkpointing" in out and "model.name" not in out
    assert main(["config", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config section must be one of run, model" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as info:
        main(["config", "--help"])
    assert info.value.code == 0
    assert "[generation only]" in capsys.readouterr().out


def test_regulariser_settings_on_a_plain_method_are_reported_not_refused(caplog):
    # one config is shared by every method of a comparison (lora, pissa, balora)
    import logging

    with caplog.at_level(logging.WARNING, logger="balora"):
        config = load_config(None, ["adapter.method=pissa", "regularizers.lambda_svd=0.1"])
    assert config.regularizers.lambda_svd == 0.1
    assert any("regularizers.lambda_svd is not used" in r.message and "pissa" in r.message for r in caplog.records)
