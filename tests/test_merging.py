"""balora merge: I-LoRA's iterative merging (truncation, ⊕, refactor) against naive references, the
adapters it reads and writes (loadable by PEFT, per-task heads), PEFT's baselines, bad inputs, and
the merge metrics."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from balora.adapters import save_final
from balora.cli import main
from balora.merging import MERGE_FILE, merge_adapters
from balora.merging.adapters import read_adapter
from balora.merging.iterative import (
    iterative_merge,
    kept_components,
    low_rank_svd,
    merge_max,
    merge_updates,
    numerical_rank,
    refactor,
    truncate,
)
from balora.merging.metrics import (
    degradation_ratio,
    generalization_retention,
    mean_normalized_score,
    remaining_performance,
)
from balora.models import load_causal_lm, load_sequence_classifier, load_source, resolve_model_source
from balora.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")

CLS_TARGETS = ["query", "value", "dense"]  # dense: attention output 16x16, intermediate 24x16, output 16x24, pooler
LM_TARGETS = ["q_proj", "k_proj", "down_proj"]  # 32x32, 16x32, 32x64


def _adapter(base_dir, folder, *, seed, labels=None, targets=CLS_TARGETS, r=4, alpha=8, **lora_kwargs):
    """A LoRA adapter of the tiny model in ``base_dir`` with random non-zero B (and head), saved as a
    run saves it (:func:`balora.adapters.save_final`); a classifier when ``labels`` are given."""
    torch.manual_seed(seed)
    if labels is not None:
        model, task_type = load_sequence_classifier(base_dir, len(labels), labels), "SEQ_CLS"
    else:
        model, task_type = load_causal_lm(base_dir)[0], "CAUSAL_LM"
    config = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, target_modules=targets, **lora_kwargs)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.3)
    save_final(model, "lora", folder, folder)
    return str(folder)


@pytest.fixture(scope="module")
def cls_adapters(tiny_model_dir, tmp_path_factory):
    """Two classifiers of the tiny BERT: task alpha (3 classes), task beta (2 classes)."""
    root = tmp_path_factory.mktemp("cls-adapters")
    return (_adapter(tiny_model_dir, root / "alpha", seed=1, labels=["sports", "markets", "weather"]),
            _adapter(tiny_model_dir, root / "beta", seed=2, labels=["no", "yes"]))


@pytest.fixture(scope="module")
def lm_adapters(tiny_causal_lm_dir, tmp_path_factory):
    """Two causal LM adapters of the tiny Llama, the second with rank 3."""
    root = tmp_path_factory.mktemp("lm-adapters")
    return (_adapter(tiny_causal_lm_dir, root / "first", seed=3, targets=LM_TARGETS),
            _adapter(tiny_causal_lm_dir, root / "second", seed=4, targets=LM_TARGETS, r=3, alpha=3))


# ----------------------------------------------------------------------------- naive references


def _reference_truncate(delta: np.ndarray, retain: float, retain_by: str) -> np.ndarray:
    """Truncated SVD of a dense update, by numpy: ⌈ρ·rank⌉ components, or the fewest holding ρ of Σσ²."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    rank = int(np.linalg.matrix_rank(delta))
    if retain_by == "rank":
        k = math.ceil(round(retain * rank, 9))
    else:
        energy = np.cumsum(s[:rank] ** 2)
        k = int(np.argmax(energy >= retain * energy[-1])) + 1
    return (u[:, :k] * s[:k]) @ vt[:k]


def _reference_merge(deltas, merge_fn="max"):
    """Element-wise merge of numpy arrays: larger magnitude (ties: the larger value), mean or sum."""
    stack = np.stack(deltas)
    if merge_fn == "mean":
        return stack.mean(0)
    if merge_fn == "sum":
        return stack.sum(0)
    order = np.lexsort((stack, np.abs(stack)), axis=0)[-1]  # the largest (|x|, x)
    return np.take_along_axis(stack, order[None], axis=0)[0]


def _deltas(path) -> dict[str, np.ndarray]:
    adapter = read_adapter(path)
    return {module: adapter.delta(module).numpy() for module in adapter.lora}


def _with_deltas(model, deltas: dict[str, np.ndarray]):
    """``model`` with W += ΔW applied by hand at every named layer."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, delta in deltas.items():
            modules[module].weight += torch.from_numpy(delta).to(modules[module].weight.dtype)
    return model.eval()


# ----------------------------------------------------------------------------- ⊕ and the mean


def test_max_merge_is_commutative_associative_and_idempotent_on_odd_shapes():
    torch.manual_seed(0)
    a, b, c = (torch.randn(7, 5, dtype=torch.float64) for _ in range(3))
    assert torch.equal(merge_max(a, b), merge_max(b, a))
    assert torch.equal(merge_max(merge_max(a, b), c), merge_max(a, merge_max(b, c)))
    assert torch.equal(merge_max(a, a), a)
    expected = _reference_merge([a.numpy(), b.numpy(), c.numpy()])
    for order in ((a, b, c), (c, a, b), (b, c, a)):
        assert np.array_equal(merge_updates(order, "max").numpy(), expected)
    big = torch.where(a.abs() > b.abs(), a, b)
    assert torch.equal(merge_max(a, b), big)  # the entry of larger magnitude, with its sign


def test_max_merge_ties_keep_the_positive_entry_in_either_order():
    a, b = torch.tensor([1.0, -2.0, 0.0, -3.0]), torch.tensor([-1.0, 2.0, -0.0, -3.0])
    assert merge_max(a, b).tolist() == merge_max(b, a).tolist() == [1.0, 2.0, 0.0, -3.0]
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert torch.equal(merge_max(merge_max(a, b), c), merge_max(a, merge_max(b, c)))


def test_mean_is_the_plain_mean_over_n_in_any_order_and_sum_is_the_sum():
    torch.manual_seed(1)
    updates = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    plain = sum(updates) / 4
    assert torch.allclose(merge_updates(updates, "mean"), plain, atol=1e-14)
    assert torch.allclose(merge_updates(updates[::-1], "mean"), plain, atol=1e-14)
    assert torch.allclose(merge_updates(updates, "sum"), sum(updates), atol=1e-14)
    assert torch.equal(merge_updates([updates[0], updates[0]], "mean"), updates[0])


# ----------------------------------------------------------------------------- truncation and refactor


def test_low_rank_svd_matches_the_dense_svd():
    torch.manual_seed(2)
    lora_b, lora_a = torch.randn(9, 3), torch.randn(3, 6)
    factors = low_rank_svd(lora_b, lora_a, 0.7)
    dense = 0.7 * (lora_b.double() @ lora_a.double())
    assert np.allclose(factors.s.numpy(), np.linalg.svd(dense.numpy(), compute_uv=False)[:3], atol=1e-12)
    assert torch.allclose(factors.dense(), dense, atol=1e-12)


@pytest.mark.parametrize("retain_by", ["rank", "energy"])
@pytest.mark.parametrize("retain", [0.2, 0.5, 0.7, 0.8, 0.9, 1.0])
def test_truncation_matches_a_numpy_reference(retain, retain_by):
    torch.manual_seed(3)
    lora_b, lora_a = torch.randn(11, 10), torch.randn(10, 13)  # rank 10, odd shapes
    factors = low_rank_svd(lora_b, lora_a, 0.5)
    rank = numerical_rank(factors.s, (11, 13))
    got, k = truncate(factors, retain, retain_by, rank)
    reference = _reference_truncate(factors.dense().numpy(), retain, retain_by)
    assert rank == 10 and np.allclose(got.numpy(), reference, atol=1e-10)
    if retain_by == "rank":
        assert k == {0.2: 2, 0.5: 5, 0.7: 7, 0.8: 8, 0.9: 9, 1.0: 10}[retain]  # ⌈ρ·10⌉, 0.7·10 not rounded up to 8


def test_energy_keeps_the_fewest_components_holding_the_share():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # σ² = 9, 4, 1, 0.25 of 14.25
    assert [kept_components(s, rho, "energy") for rho in (0.5, 0.64, 0.92, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert kept_components(s, 1.0, "energy", rank=0) == 0


def test_an_update_that_cancels_has_rank_zero():
    """A converted adapter (B = [B₀', −B₀], A = [A₀'; A₀]) whose layer did not move: ΔW = 0 exactly."""
    torch.manual_seed(4)
    lora_b, lora_a = torch.randn(8, 2), torch.randn(2, 6)
    factors = low_rank_svd(torch.cat([lora_b, -lora_b], 1), torch.cat([lora_a, lora_a]), 1.0)
    bound = float(torch.linalg.matrix_norm(lora_b) ** 2 * 2 * torch.linalg.matrix_norm(lora_a) ** 2 * 2) ** 0.5
    assert numerical_rank(factors.s, (8, 6), scale=bound) == 0
    assert truncate(factors, 0.8, "rank", 0)[1] == 0


def test_one_update_at_retain_one_is_refactored_exactly():
    torch.manual_seed(5)
    delta = torch.randn(10, 4, dtype=torch.float64) @ torch.randn(4, 7, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept, k = truncate(low_rank_svd(u[:, :4] * s[:4], vh[:4], 1.0), 1.0, "rank", 4)
    lora_b, lora_a, r, residual = refactor(kept, 100)
    assert (k, r) == (4, 4) and residual < 1e-12  # capped at the numerical rank, not 100 or min(10, 7)
    assert torch.allclose(lora_b @ lora_a, delta, atol=1e-12)
    assert torch.allclose(lora_b.T @ lora_b, lora_a @ lora_a.T, atol=1e-12)  # B = U√S, A = √S Vᵀ
    zero_b, zero_a, r, residual = refactor(torch.zeros(3, 5), 4)
    assert r == 1 and residual == 0.0 and not zero_b.any() and not zero_a.any()


# ----------------------------------------------------------------------------- reading adapters


def test_the_update_read_from_the_config_is_peft_s(tiny_model_dir, tmp_path):
    """rank_pattern, alpha_pattern and rslora give every layer PEFT's own scaling."""
    for i, kwargs in enumerate([dict(rank_pattern={"value": 2}, alpha_pattern={"query": 3.0}), dict(use_rslora=True)]):
        folder = _adapter(tiny_model_dir, tmp_path / f"a{i}", seed=6 + i, labels=["x", "y"], **kwargs)
        adapter = read_adapter(folder)
        model = PeftModel.from_pretrained(load_sequence_classifier(tiny_model_dir, 2), folder)
        layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
                  if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}
        assert set(layers) == set(adapter.lora) and len(layers) == 2 * 5 + 1  # query, value, 3 dense per layer; pooler
        for module, layer in layers.items():
            assert torch.allclose(adapter.delta(module).float(), layer.get_delta_weight("default"), atol=1e-6)
        assert adapter.task == f"a{i}" and adapter.family == "classification"
        assert set(adapter.extra) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


# ----------------------------------------------------------------------------- merged adapters


@pytest.mark.parametrize("merge_fn", ["max", "mean"])
def test_merging_an_adapter_with_itself_returns_it(lm_adapters, tmp_path, merge_fn):
    one = lm_adapters[0]
    merge_adapters([one, one], tmp_path / "exact", retain=1.0, merge_fn=merge_fn)
    merged, original = _deltas(tmp_path / "exact"), _deltas(one)
    assert all(np.allclose(merged[m], original[m], atol=1e-5) for m in original)
    record = json.loads((tmp_path / "exact" / MERGE_FILE).read_text())
    assert set(record["ranks"].values()) == {4}  # min(4 + 4, numerical rank 4)
    alone = iterative_merge([read_adapter(one)], retain=1.0)  # the refactor-only path: exact
    assert all(np.allclose((b @ a).numpy(), original[m], atol=1e-12) for m, (b, a) in alone.lora.items())
    merge_adapters([one, one], tmp_path / "half", retain=0.5, merge_fn=merge_fn)
    half = _deltas(tmp_path / "half")
    assert all(np.allclose(half[m], _reference_truncate(original[m], 0.5, "rank"), atol=1e-5) for m in original)


def test_the_merged_causal_adapter_loads_on_the_base_and_equals_the_merge_by_hand(lm_adapters, tiny_causal_lm_dir,
                                                                                 tmp_path):
    out = tmp_path / "merged"
    result = merge_adapters(list(lm_adapters), out, retain=0.8, retain_by="energy", rank=1000)
    assert result.adapters == {"first": out, "second": out}
    inputs = [_deltas(path) for path in lm_adapters]
    expected = {m: _reference_merge([_reference_truncate(d[m], 0.8, "energy") for d in inputs]) for m in inputs[0]}
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(load_causal_lm(tiny_causal_lm_dir)[0], str(out)).eval()(ids).logits
        by_hand = _with_deltas(load_causal_lm(tiny_causal_lm_dir)[0], expected)(ids).logits
    assert torch.allclose(loaded, by_hand, atol=1e-4)
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["method"] == "iterative" and record["retain"] == 0.8 and record["retain_by"] == "energy"
    assert record["merge_fn"] == "max" and [i["r"] for i in record["inputs"]] == [4, 3]
    assert record["versions"]["peft"] and record["family"] == "generation" and record["outputs"] == {
        "first": ".", "second": "."}
    # rank 1000 is capped at min(out, in) of each layer (the ⊕ of two updates has full rank)
    assert record["ranks"]["model.layers.0.self_attn.k_proj"] == 16
    assert record["ranks"]["model.layers.1.mlp.down_proj"] == 32


def test_classification_tasks_keep_their_own_heads(cls_adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    result = merge_adapters(list(cls_adapters), out)
    assert result.adapters == {"alpha": out / "alpha", "beta": out / "beta"}
    texts = ["goal match team", "rain storm wind snow"]
    for task, path, labels in (("alpha", cls_adapters[0], ["sports", "markets", "weather"]),
                               ("beta", cls_adapters[1], ["no", "yes"])):
        folder = out / task
        model, tokenizer = load_source(resolve_model_source(None, folder, family=None))
        assert [model.config.id2label[i] for i in range(len(labels))] == labels
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        merged = read_adapter(folder)
        by_hand = load_sequence_classifier(tiny_model_dir, len(labels), labels)
        head = load_file(f"{path}/adapter_model.safetensors")
        with torch.no_grad():
            by_hand.classifier.weight.copy_(head["base_model.model.classifier.weight"])
            by_hand.classifier.bias.copy_(head["base_model.model.classifier.bias"])
            _with_deltas(by_hand, {m: merged.delta(m).numpy() for m in merged.lora})
            assert torch.allclose(model(**inputs).logits, by_hand(**inputs).logits, atol=1e-5)
        assert model(**inputs).logits.shape == (2, len(labels))
        assert {row["prediction"] for row in predict(folder, texts)} <= set(labels)  # balora predict DIR/<task>
    # the two folders share the merged backbone
    one, other = read_adapter(out / "alpha"), read_adapter(out / "beta")
    assert all(torch.equal(one.lora[m][0], other.lora[m][0]) for m in one.lora)
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["outputs"] == {"alpha": "alpha", "beta": "beta"} and record["retain"] == 0.8


@pytest.mark.parametrize("method,options", [("cat", {}), ("linear", {}), ("svd", {"rank": 8}),
                                            ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5})])
def test_each_peft_baseline_saves_a_loadable_adapter_per_task(cls_adapters, tiny_model_dir, tmp_path, method, options):
    out = tmp_path / method
    main(["merge", *cls_adapters, "--out", str(out), "--method", method,
          *[arg for key, value in options.items() for arg in (f"--{key}", str(value))]])
    inputs = [_deltas(path) for path in cls_adapters]
    ids = torch.tensor([[101, 2000, 3000, 102]])
    for task, labels in (("alpha", 3), ("beta", 2)):
        model = PeftModel.from_pretrained(load_sequence_classifier(tiny_model_dir, labels), str(out / task)).eval()
        with torch.no_grad():
            assert model(input_ids=ids).logits.shape == (1, labels)
    merged = _deltas(out / "alpha")
    if method in ("cat", "svd"):  # exact: Σ ΔW_i (weight 1), of rank ≤ 8
        assert all(np.allclose(merged[m], inputs[0][m] + inputs[1][m], atol=1e-5) for m in merged)
    assert json.loads((out / MERGE_FILE).read_text())["method"] == method


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def odd_adapters(tiny_model_dir, tmp_path_factory):
    """Adapters that cannot be merged with cls_adapters[0]."""
    root = tmp_path_factory.mktemp("odd-adapters")
    other_base = root / "other-bert"
    shutil.copytree(tiny_model_dir, other_base)
    torch.manual_seed(9)
    with torch.no_grad():
        model = load_sequence_classifier(str(other_base), 3)
        model.bert.embeddings.word_embeddings.weight.mul_(2.0)
        model.save_pretrained(other_base)
    (root / "empty").mkdir()
    return {
        "base": _adapter(str(other_base), root / "other-base", seed=10, labels=["a", "b", "c"]),
        "targets": _adapter(tiny_model_dir, root / "targets", seed=11, labels=["a", "b"], targets=["query", "key"]),
        "not-adapter": str(root / "empty"),
    }


@pytest.mark.parametrize("case", ["base", "family", "targets", "retain0", "retain-big", "retain-nan", "single",
                                  "not-adapter", "missing", "out-not-empty", "ties-no-density", "option-not-read",
                                  "ranks-differ"])
def test_bad_inputs_give_one_line_and_write_nothing(case, cls_adapters, lm_adapters, odd_adapters, tmp_path, capsys):
    alpha, beta = cls_adapters
    out = tmp_path / "out"
    args = {
        "base": [alpha, odd_adapters["base"]],
        "family": [alpha, lm_adapters[0]],
        "targets": [alpha, odd_adapters["targets"]],
        "retain0": [alpha, beta, "--retain", "0"],
        "retain-big": [alpha, beta, "--retain", "1.5"],
        "retain-nan": [alpha, beta, "--retain", "nan"],
        "single": [alpha],
        "not-adapter": [alpha, odd_adapters["not-adapter"]],
        "missing": [alpha, str(tmp_path / "nowhere")],
        "out-not-empty": [alpha, beta],
        "ties-no-density": [alpha, beta, "--method", "ties"],
        "option-not-read": [alpha, beta, "--method", "cat", "--retain", "0.8"],
        "ranks-differ": [*lm_adapters, "--method", "linear"],
    }[case]
    if case == "out-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["merge", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("balora: error: ") and "\n" not in err, err
    expected = {"base": "different base models", "family": "different task types", "targets": "different target",
                "retain0": "(0, 1]", "retain-big": "(0, 1]", "retain-nan": "(0, 1]", "single": "at least 2",
                "not-adapter": "neither a PEFT adapter", "missing": "not found", "out-not-empty": "never overwrites",
                "ties-no-density": "needs --density", "option-not-read": "does not apply",
                "ranks-differ": "one rank only"}[case]
    assert expected in err, err
    if case == "out-not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_an_empty_out_folder_is_used_and_the_cli_prints_the_task_folders(cls_adapters, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["merge", *cls_adapters, "--out", str(out), "--retain", "0.9", "--merge-fn", "sum"]) == 0
    printed = capsys.readouterr().out
    assert f"alpha: {out / 'alpha'}" in printed and str(out / MERGE_FILE) in printed
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", MERGE_FILE]
    assert sorted(p.name for p in (out / "beta").iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "config.json"])


# ----------------------------------------------------------------------------- metrics


def test_remaining_performance_and_degradation_by_hand():
    merged, single = {"a": 0.6, "b": 0.9, "c": 0.0}, {"a": 0.8, "b": 0.9, "c": 0.5}
    rp = remaining_performance(merged, single)
    assert rp == pytest.approx({"a": 0.75, "b": 1.0, "c": 0.0, "mean": 1.75 / 3})
    dr = degradation_ratio(merged, single)
    assert dr == pytest.approx({"a": 0.25, "b": 0.0, "c": 1.0, "mean": 1 - 1.75 / 3})
    undefined = remaining_performance({"a": 0.5, "b": 0.2}, {"a": 0.0, "b": 0.4})  # a single score of 0
    assert math.isnan(undefined["a"]) and undefined["b"] == 0.5 and math.isnan(undefined["mean"])
    assert math.isnan(degradation_ratio({"a": math.nan}, {"a": 1.0})["a"])
    with pytest.raises(ValueError, match="different tasks"):
        remaining_performance({"a": 1.0}, {"b": 1.0})


def test_generalization_retention_and_mean_normalized_score_by_hand():
    assert generalization_retention(0.45, 0.5) == pytest.approx(0.9)
    assert generalization_retention(12.5, 10.0, lower_is_better=True) == pytest.approx(0.8)  # base PPL ÷ adapted PPL
    assert generalization_retention(math.inf, 10.0, lower_is_better=True) == 0.0
    assert math.isnan(generalization_retention(0.3, 0.0)) and math.isnan(generalization_retention(1.0, -1.0))
    assert math.isnan(generalization_retention(0.0, 5.0, lower_is_better=True))  # an adapted PPL of 0
    assert math.isnan(generalization_retention(math.inf, math.inf)) and math.isnan(generalization_retention(1, math.nan))
    scores = mean_normalized_score({"pong": 11.0, "breakout": 30.0}, {"pong": 21.0, "breakout": 30.0},
                                   lows={"pong": 1.0, "breakout": 2.0})
    assert scores == pytest.approx({"pong": 0.5, "breakout": 1.0, "mean": 0.75})
    assert mean_normalized_score({"t": 2.0}, {"t": 4.0}) == pytest.approx({"t": 0.5, "mean": 0.5})
    assert math.isnan(mean_normalized_score({"t": 2.0}, {"t": 1.0}, lows={"t": 1.0})["mean"])
