"""λ schedules and the validated configuration layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from balora.config import ConfigError, RegularizerConfig, RunConfig, load_config
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
