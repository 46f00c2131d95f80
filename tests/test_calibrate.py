"""λ calibration (paper D.1): measured gradient norms against a naive reference, the two proposal
modes, the model left exactly as it was, and calibration of whole run configs of both families."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from balora.adapters import apply_method
from balora.calibrate import Calibration, calibrate_objective, calibrate_run
from balora.config import AdapterConfig, RegularizerConfig, load_config
from balora.objectives import ClassificationObjective
from balora.regularizers import formulas
from balora.teacher import SnapshotTeacher

TARGETS = ["query", "key", "value", "dense"]


def _batches(n_batches=3, n=6, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1000, 1100, (n, 7), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, num_labels, (n,), generator=g)})
    return out


def _model_and_objective(model_dir, regularizers=None, method="balora"):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():  # logits of a real scale: the random tiny head's are ~0.01, their covariance ~0
        model.classifier.weight.mul_(100.0)
    model = apply_method(model, AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    objective = ClassificationObjective(regularizers or RegularizerConfig(), 3)
    objective.teacher = SnapshotTeacher(model)
    return model, objective


def _naive_norms(model, teacher, batch, config: RegularizerConfig):
    """‖∇ task‖ and ‖∇ term‖ (unit λ) of each term, each from its own formula and its own backward."""
    params = [p for p in model.parameters() if p.requires_grad]

    def norm(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))

    out = model(**batch)
    with torch.no_grad():
        t_logits = teacher.logits(model, {k: v for k, v in batch.items() if k != "labels"})
    k = 2  # the paper's k = 5, clamped to rank − 1 on a 3-class head
    return {
        "task": norm(model(**batch).loss),
        "consistency": norm(formulas.consistency_loss(out.logits, t_logits, temperature=2.0, kind="kl")),
        "diversity": norm(formulas.covariance_diversity_loss(model(**batch).logits)),
        "svd": norm(formulas.svd_loss(model(**batch).logits, k=k, normalize="nuclear")),
    }


def test_measured_norms_equal_a_naive_reference_and_the_model_is_left_unchanged(tiny_model_dir):
    regs = RegularizerConfig(temperature=2.0)
    model, objective = _model_and_objective(tiny_model_dir, regs)
    batches = _batches(2)
    drift = _batches(3, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_before = torch.random.get_rng_state()

    result = calibrate_objective(model, objective, batches, drift_batches=drift, learning_rate=5e-3)

    for name, p in model.named_parameters():  # nothing the run will train on moved
        assert torch.equal(p, before[name]), name
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert objective.weights.consistency == pytest.approx(0.15)  # the objective's own λs are back

    # the naive reference: redo the drift by hand, measure each term with its own backward pass
    ref_model, ref_objective = _model_and_objective(tiny_model_dir, regs)
    params = [p for p in ref_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    for batch in drift:
        loss = ref_model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_batch = [_naive_norms(ref_model, ref_objective.teacher, b, regs) for b in batches]
    mean = {key: sum(d[key] for d in per_batch) / len(per_batch) for key in per_batch[0]}
    assert result.task_grad_norm == pytest.approx(mean["task"], rel=1e-4)
    for term in ("consistency", "diversity", "svd"):
        assert result.term_grad_norms[term] == pytest.approx(mean[term], rel=1e-3, abs=1e-9), term
    assert result.term_grad_norms["consistency"] > 0  # the drift moved the student off the teacher


def test_consistency_has_no_gradient_at_step_zero_so_it_is_kept_and_flagged(tiny_model_dir):
    model, objective = _model_and_objective(tiny_model_dir)
    result = calibrate_objective(model, objective, _batches(2))  # no drift steps
    assert result.term_grad_norms["consistency"] < 1e-6 * result.task_grad_norm
    assert "consistency" in result.flat
    assert result.proposed["consistency"] == pytest.approx(0.15)


def test_scale_mode_keeps_the_ratios_and_hits_the_target_share(tiny_model_dir):
    model, objective = _model_and_objective(tiny_model_dir)
    result = calibrate_objective(model, objective, _batches(2), drift_batches=_batches(3, seed=1),
                                 learning_rate=5e-3, mode="scale", target_share=0.4)
    p, c = result.proposed, result.configured
    assert p["consistency"] / p["diversity"] == pytest.approx(c["consistency"] / c["diversity"])
    assert p["svd"] / p["diversity"] == pytest.approx(c["svd"] / c["diversity"])
    assert sum(result.proposed_shares().values()) == pytest.approx(0.4)
    assert "| consistency |" in result.table()


def test_shares_mode_gives_each_term_its_part_of_the_target(tiny_model_dir):
    model, objective = _model_and_objective(tiny_model_dir)
    result = calibrate_objective(model, objective, _batches(2), drift_batches=_batches(3, seed=1),
                                 learning_rate=5e-3, mode="shares", target_share=0.21)
    shares = result.proposed_shares()
    assert shares["consistency"] == pytest.approx(0.21 * 0.15 / 0.21)
    assert shares["diversity"] == pytest.approx(0.21 * 0.03 / 0.21)
    assert shares["svd"] == pytest.approx(0.21 * 0.03 / 0.21)


def test_consistency_kinds_get_lambdas_that_equalise_their_pull(tiny_model_dir):
    """Ablation (b): λ1 per kind so that every kind's gradient share is the same."""
    shares = {}
    for kind in ("kl", "cosine", "mse"):
        regs = RegularizerConfig(consistency_kind=kind, lambda_diversity=0.0, lambda_svd=0.0)
        model, objective = _model_and_objective(tiny_model_dir, regs)
        result = calibrate_objective(model, objective, _batches(2), drift_batches=_batches(3, seed=1),
                                     learning_rate=5e-3, mode="shares", target_share=0.1)
        shares[kind] = result.proposed_shares()["consistency"]
        assert set(result.proposed) == {"consistency"}
    assert shares["kl"] == pytest.approx(0.1) and shares["cosine"] == pytest.approx(0.1)
    assert shares["mse"] == pytest.approx(0.1)


@pytest.mark.parametrize("mode", ["scale", "shares"])
def test_only_the_named_terms_are_calibrated(tiny_model_dir, mode):
    """Ablation (b): λ1 alone gets the share; λ2 and λ3 keep their configured values."""
    model, objective = _model_and_objective(tiny_model_dir)
    result = calibrate_objective(model, objective, _batches(2), drift_batches=_batches(3, seed=1),
                                 learning_rate=5e-3, mode=mode, target_share=0.2, terms=["consistency"])
    assert result.proposed["diversity"] == result.configured["diversity"] == pytest.approx(0.03)
    assert result.proposed["svd"] == result.configured["svd"] == pytest.approx(0.03)
    shares = result.proposed_shares()
    assert shares["consistency"] == pytest.approx(0.2)
    assert shares["svd"] == pytest.approx(result.shares["svd"])  # measured, unchanged
    both = calibrate_objective(model, objective, _batches(2), drift_batches=_batches(3, seed=1),
                               learning_rate=5e-3, mode=mode, target_share=0.2, terms=["consistency", "svd"])
    assert both.proposed["diversity"] == pytest.approx(0.03)
    assert both.proposed_shares()["consistency"] + both.proposed_shares()["svd"] == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(terms=[]), "calibration terms must be among"),
    (dict(terms=["entropy"]), "calibration terms must be among"),
    (dict(mode="median"), "calibration mode"),
    (dict(target_share=float("nan")), "target_share"),
    (dict(target_share=0), "target_share"),
])
def test_bad_options_are_one_line_errors(tiny_model_dir, kwargs, message):
    model, objective = _model_and_objective(tiny_model_dir)
    with pytest.raises(ValueError, match=message):
        calibrate_objective(model, objective, _batches(1), **kwargs)


def test_a_method_without_regularisers_is_refused(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model = apply_method(model, AdapterConfig(method="pissa", rank=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"\+reg"):
        calibrate_objective(model, ClassificationObjective(None, 3), _batches(1))


def test_calibrate_a_classification_run_config(tiny_model_dir, task_files, tmp_path):
    train_file, eval_file = task_files
    config = load_config(None, [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[query,value]",
        "train.batch_size=8", "train.learning_rate=1e-2",
    ])
    result = calibrate_run(config, batches=2, drift_steps=2)
    assert isinstance(result, Calibration)
    assert set(result.proposed) == {"consistency", "diversity", "svd"}
    assert all(math.isfinite(v) and v > 0 for v in result.proposed.values())
    assert not (tmp_path / "runs").exists()  # nothing written
    # a routing config is calibrated on its task objective alone: the same proposal
    routed = load_config(None, [*config_overrides(config), "routing.general_data=grimm-tales",
                                "routing.epsilon_l2=0.1"])
    assert calibrate_run(routed, batches=2, drift_steps=2).proposed == pytest.approx(result.proposed)


def config_overrides(config) -> list[str]:
    """``key=value`` overrides that rebuild ``config`` (its non-default leaves)."""
    import json

    from balora.config import RunConfig

    default, out = RunConfig().to_dict(), []
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            out += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items() if default[section].get(k) != v]
        elif default.get(section) != values:
            out.append(f"{section}={json.dumps(values)}")
    return out


def test_calibrate_a_generation_run_config(tiny_causal_lm_dir, tmp_path):
    config = load_config(None, [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_causal_lm_dir}",
        "model.max_length=96", "data.task=gsm-symbolic", "data.max_train_examples=8",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj]",
        "train.batch_size=2", "train.learning_rate=1e-2", "train.loss_chunk_size=16",
    ])
    result = calibrate_run(config, batches=1, drift_steps=2, mode="shares")
    assert set(result.proposed) == {"consistency", "diversity", "svd"}
    assert result.term_grad_norms["consistency"] > 0
    assert sum(result.proposed_shares().values()) == pytest.approx(0.1)


def test_lambdas_auto_trains_with_the_calibrated_lambdas_and_saves_them(tiny_model_dir, task_files, tmp_path):
    import json

    import yaml

    from balora.runs import train_run

    train_file, eval_file = task_files
    common = [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[query,value]",
        "train.batch_size=8", "train.learning_rate=1e-2", "train.max_steps=2", "train.save_steps=2",
        "train.logging_steps=1", "train.report_to=[]",
    ]
    config = load_config(None, [*common, "regularizers.lambdas=auto", "regularizers.calibration_share=0.3"])
    result = train_run(config, progress=False)
    saved = json.loads((result.run_dir / "calibration.json").read_text())
    assert sum(saved["proposed_shares"].values()) == pytest.approx(0.3)
    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())["regularizers"]
    assert cfg["lambdas"] == "fixed"
    assert cfg["lambda_consistency"] == pytest.approx(saved["proposed"]["consistency"])
    assert json.loads((result.run_dir / "metrics.json").read_text())["calibrated_lambdas"] == saved["proposed"]
    logged = [h["lambda_consistency"] for h in result.log_history if "lambda_consistency" in h]
    assert logged and logged[0] == pytest.approx(saved["proposed"]["consistency"], rel=1e-5)
    load_config(str(result.run_dir / "config.yaml"))  # the saved config loads (resume reads it)


def test_calibration_keys_without_lambdas_auto_are_refused():
    from balora.config import ConfigError

    with pytest.raises(ConfigError, match="calibration_share"):
        load_config(None, ["adapter.method=balora", "regularizers.calibration_share=0.2"])
    with pytest.raises(ConfigError, match="calibration_terms"):
        load_config(None, ["adapter.method=balora", "regularizers.calibration_terms=[consistency]"])
    auto = ["adapter.method=balora", "regularizers.lambdas=auto"]
    assert load_config(None, [*auto, "regularizers.calibration_terms=[consistency]"]
                       ).regularizers.calibration_terms == ["consistency"]
    for bad in ("[]", "[entropy]", "[svd, svd]"):
        with pytest.raises(ConfigError, match="regularizers.calibration_terms must name"):
            load_config(None, [*auto, f"regularizers.calibration_terms={bad}"])


def test_cli_prints_the_table_and_the_keys_to_set(tiny_model_dir, task_files, tmp_path, capsys):
    from balora.cli import main

    train_file, eval_file = task_files
    code = main(["calibrate", f"model.name={tiny_model_dir}", "model.max_length=16", "data.task=files",
                 f"data.train_file={train_file}", f"data.eval_file={eval_file}", "adapter.method=balora",
                 "adapter.rank=4", "adapter.target_modules=[query,value]", "train.batch_size=8",
                 "--batches", "1", "--drift-steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| consistency |" in out and "regularizers.lambda_svd=" in out
    assert main(["calibrate", "adapter.method=balora", "--target-share", "-1"]) == 2
    assert "target_share" in capsys.readouterr().err


def test_cli_terms_flag_reaches_the_calibration(monkeypatch, capsys):
    import balora.calibrate as calibrate_module
    from balora.cli import main

    seen = {}

    def fake(config, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(calibrate_module, "calibrate_run", fake)
    assert main(["calibrate", "adapter.method=balora", "--terms", "consistency", "svd"]) == 2
    assert seen["terms"] == ["consistency", "svd"]
    assert "balora: error: stop here" in capsys.readouterr().err


def test_a_closed_stdout_pipe_is_not_an_error(monkeypatch, capsys):
    import balora.cli as cli

    def closed(section):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "describe_config", closed)
    assert cli.main(["config"]) == 1
    assert "error" not in capsys.readouterr().err
