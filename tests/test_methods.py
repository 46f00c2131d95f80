"""Every method of the paper's Tables 1-2 by name (``adapter.method``): each trains through the real
run path and its saved adapter reproduces the trained model on the ORIGINAL base model; the inits
keep the model (and the snapshot teacher is the original model); MiLoRA against a naive SVD;
LoRA+'s learning rates, LoRA-FA's frozen A, AdaLoRA's budget schedule; the method options' checks."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from balora.adapters import (
    adalora_orthogonal_loss,
    apply_method,
    milora_init,
    peft_orthogonal_penalty_off,
    trainable_parameters,
)
from balora.config import AdapterConfig, ConfigError, RegularizerConfig, load_config
from balora.methods import parse_method
from balora.objectives import ClassificationObjective, GenerationObjective
from balora.teacher import SnapshotTeacher
from balora.trainer import BALoRATrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

TARGETS = ["query", "key", "value", "dense"]
PROJ = ["q_proj", "v_proj", "up_proj"]
METHODS = ["full", "lora", "gaussian", "dora", "adalora", "loraplus", "lorafa", "lora_ga", "pissa", "corda",
           "milora", "olora"]
#: every init keeps the pre-trained model at step 0: B = 0 (lora, gaussian, dora, loraplus, lorafa),
#: Λ = 0 (adalora), or the base holding W - s·B0·A0 (pissa, corda, lora_ga, milora, olora)
ADAPTERS = [m for m in METHODS if m != "full"]


# ----------------------------------------------------------------------------- helpers


def _ids(seed, n=6, length=9, low=1000, high=2000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one padded row
    return ids, mask


def _cls_batches(k=3, n=6):
    """Init batches for lora_ga / corda: labelled (n, 9) batches."""
    out = []
    for i in range(k):
        ids, mask = _ids(100 + i, n)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 3})
    return out


def _classifier(path, dropout=0.0):
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def _head(model):
    head = [m for n, m in model.named_modules() if n.endswith("classifier")][0]
    return head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head


def _original_logits(original, model, batch):
    """The untouched pre-trained model with the student's CURRENT head (paper B.3)."""
    ref = copy.deepcopy(original)
    ref.classifier.load_state_dict(_head(model).state_dict())
    ref.eval()
    with torch.no_grad():
        return ref(**batch).logits


def _adapter(method, **extra):
    spec = parse_method(method)
    return AdapterConfig(method=method, **{**({} if spec.full else dict(rank=4, target_modules=TARGETS)), **extra})


def _build(original, method, **extra):
    torch.manual_seed(0)
    spec = parse_method(method)
    return apply_method(copy.deepcopy(original), _adapter(method, **extra),
                        init_batches=_cls_batches() if spec.needs_init_data else None)


def _run_config(tiny_model_dir, task_files, tmp_path, method, steps=2, **extra):
    train_file, eval_file = task_files
    adapter = [] if parse_method(method).full else ["adapter.rank=4", "adapter.target_modules=[query,value]"]
    return load_config(None, [
        f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        f"adapter.method={method}", *adapter, f"train.max_steps={steps}", "train.save_steps=2",
        "train.logging_steps=1", "train.batch_size=8", "train.report_to=[]", "train.learning_rate=1e-2",
        "train.warmup_ratio=0", *[f"{k}={v}" for k, v in extra.items()],
    ])


def _capture_trained(monkeypatch, probe):
    """Record the trained model's eval-mode outputs on ``probe`` just before the final save."""
    import balora.runs as runs

    trained, save_final = {}, runs.save_final

    def keep(model, *args):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(**probe).logits
        model.train(was_training)
        return save_final(model, *args)

    monkeypatch.setattr(runs, "save_final", keep)
    return trained


# ----------------------------------------------------------------------------- every method, the real path


# every method with the regularisers (the whole path: adapter, teacher, objective, optimiser, save), and
# without them where the trainer does something of its own (AdaLoRA's schedule, LoRA-FA's optimiser)
@pytest.mark.parametrize("method, regularized", [(m, True) for m in METHODS] + [
    ("lora", False), ("adalora", False), ("lorafa", False)])
def test_each_method_trains_and_its_saved_adapter_reproduces_it_on_the_original_model(
        tiny_model_dir, task_files, tmp_path, monkeypatch, method, regularized):
    import json

    from balora.runs import train_run

    name = method + ("+reg" if regularized else "")
    ids, mask = _ids(7, n=5, length=8)
    probe = {"input_ids": ids, "attention_mask": mask}
    trained = _capture_trained(monkeypatch, probe)
    result = train_run(_run_config(tiny_model_dir, task_files, tmp_path, name), progress=False)
    assert result.metrics["method"] == name and result.metrics["global_steps"] == 2
    logged = [h for h in result.log_history if "task_loss" in h]
    assert len(logged) == 2 and all(("reg_consistency" in h) == regularized for h in logged)

    adapter_dir = result.run_dir / "adapter"
    if parse_method(method).full:
        reloaded = AutoModelForSequenceClassification.from_pretrained(adapter_dir)
    else:
        reloaded = PeftModel.from_pretrained(_classifier(tiny_model_dir), str(adapter_dir))
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
        if parse_method(method).mutates_base:  # converted to plain LoRA of rank 2r for the original model
            assert saved["r"] == 8 and saved["init_lora_weights"] is True and saved["peft_type"] == "LORA"
        if method == "adalora":
            assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] and saved["total_step"] == 2
    with torch.no_grad():
        again = reloaded.eval()(**probe).logits
        before = _classifier(tiny_model_dir).eval()(**probe).logits
    torch.testing.assert_close(again, trained["logits"], atol=1e-5, rtol=0)
    assert (trained["logits"] - before).abs().max() > 1e-4  # the run did train


# ----------------------------------------------------------------------------- step 0 and the teacher


def _train_steps(model, steps=3, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids, mask = _ids(step)
        model(input_ids=ids, attention_mask=mask, labels=torch.arange(6) % 3).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", METHODS)
def test_the_model_is_unchanged_at_step_zero_and_the_teacher_stays_the_original_model(tiny_model_dir, method):
    original = _classifier(tiny_model_dir).eval()
    model = _build(original, method)
    ids, mask = _ids(3)
    batch = {"input_ids": ids, "attention_mask": mask}
    reference = _original_logits(original, model, batch)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, atol=1e-5, rtol=0)  # the init's promise
    teacher = SnapshotTeacher(model)
    torch.testing.assert_close(teacher.logits(model, batch), reference, atol=1e-5, rtol=0)

    # +reg: the consistency term starts at 0 (dropout off)
    objective = ClassificationObjective(RegularizerConfig(), 3, teacher=teacher)
    model.train()
    _, logs = objective(model, {**batch, "labels": torch.arange(6) % 3}, step=0, total_steps=10)
    assert logs["reg_consistency"] == pytest.approx(0.0, abs=1e-6)

    _train_steps(model)
    after = teacher.logits(model, batch)
    torch.testing.assert_close(after, _original_logits(original, model, batch), atol=1e-5, rtol=0)
    model.eval()
    with torch.no_grad():
        assert (model(**batch).logits - after).abs().max() > 1e-3  # the student moved, the teacher did not


def _tiny_llama(path):
    return AutoModelForCausalLM.from_pretrained(path)


def _lm_batches(k=2, n=3, length=12):
    out = []
    for i in range(k):
        ids, mask = _ids(200 + i, n, length, low=100, high=5000)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100  # a masked prompt
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("method", ["milora", "lora_ga", "corda", "adalora"])
def test_generation_inits_keep_the_model_and_the_teacher_at_step_zero(tiny_causal_lm_dir, method):
    from peft import TaskType

    original = _tiny_llama(tiny_causal_lm_dir).eval()
    torch.manual_seed(0)
    spec = parse_method(method)
    model = apply_method(copy.deepcopy(original), AdapterConfig(method=method, rank=4, target_modules=PROJ),
                         TaskType.CAUSAL_LM, init_batches=_lm_batches() if spec.needs_init_data else None)
    batch = _lm_batches(1)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = original(**inputs).logits
        torch.testing.assert_close(model.eval()(**inputs).logits, reference, atol=1e-5, rtol=0)
    teacher = SnapshotTeacher(model)
    torch.testing.assert_close(teacher.logits(model, inputs), reference, atol=1e-5, rtol=0)
    objective = GenerationObjective(RegularizerConfig(consistency_schedule="constant"), teacher=teacher)
    _, logs = objective(model.train(), batch, step=0, total_steps=10)
    assert logs["reg_consistency"] == pytest.approx(0.0, abs=1e-5)  # a KL over 49,152 classes, in fp32


def test_data_driven_inits_need_training_batches(tiny_model_dir):
    for method in ("lora_ga", "corda+reg"):
        with pytest.raises(ValueError, match="init_batches"):
            apply_method(_classifier(tiny_model_dir), _adapter(method))


def test_corda_modes_take_the_largest_or_the_smallest_components(tiny_model_dir):
    original = _classifier(tiny_model_dir)
    norms = {}
    for mode in ("ipm", "kpm"):
        model = _build(original, "corda", corda_mode=mode)
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        delta = layer.get_delta_weight("default")  # s·B0·A0 (out, in)
        norms[mode] = float(torch.linalg.matrix_norm(delta))
    assert norms["ipm"] > 2 * norms["kpm"] > 0


# ----------------------------------------------------------------------------- MiLoRA


def test_milora_adapter_holds_the_r_smallest_singular_components(tiny_model_dir):
    original = _classifier(tiny_model_dir)
    model = _build(original, "milora", alpha=8.0)  # scaling s = 2: the adapter must absorb it
    weights = dict(original.named_parameters())
    checked = 0
    for name, layer in model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        w = weights[key].detach().double()  # (out, in), the ORIGINAL weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # naive reference
        minor = u[:, -4:] @ torch.diag(s[-4:]) @ vh[-4:]
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        scaling = layer.scaling["default"]
        assert scaling == 2.0
        torch.testing.assert_close(scaling * b @ a, minor, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.get_base_layer().weight.double(), w - minor, atol=1e-5, rtol=0)
        # the adapter's own spectrum is the 4 smallest singular values, A's rows orthogonal
        torch.testing.assert_close(torch.linalg.svdvals(scaling * b @ a)[:4], s[-4:], atol=1e-5, rtol=0)
        gram = a @ a.T
        torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-5, rtol=0)
        checked += 1
    assert checked == 2 * 6 + 1  # query, key, value and 3 dense layers per block; the pooler's dense
    assert milora_init(model) == checked  # re-running takes the smallest of W_res: still a valid init
    with pytest.raises(ValueError, match="rank 64 exceeds"):
        _build(original, "milora", rank=64)


# ----------------------------------------------------------------------------- optimisers and AdaLoRA


def _dataset(n=24):
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = 5 + i % 4
        rows["input_ids"].append(torch.randint(1000, 1100, (length,), generator=g).tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(i % 3)
    return Dataset.from_dict(rows)


def _trainer(model_dir, tmp_path, adapter, steps=2, lr=1e-2, regularizers=None, head_learning_rate=None):
    from transformers import DataCollatorWithPadding

    torch.manual_seed(0)
    model = apply_method(_classifier(model_dir), adapter)
    objective = ClassificationObjective(regularizers, 3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=6, learning_rate=lr,
        logging_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False, seed=0,
        disable_tqdm=True, use_cpu=True, warmup_steps=0,
    )
    return BALoRATrainer(model=model, args=args, train_dataset=_dataset(), objective=objective, adapter=adapter,
                         head_learning_rate=head_learning_rate, teacher=SnapshotTeacher(model) if objective.needs_teacher else None,
                         data_collator=DataCollatorWithPadding(AutoTokenizer.from_pretrained(model_dir)))


@pytest.mark.parametrize("ratio", [None, 4.0])
def test_loraplus_trains_b_at_ratio_times_the_learning_rate_of_a(tiny_model_dir, tmp_path, ratio):
    adapter = _adapter("loraplus", **({} if ratio is None else {"loraplus_lr_ratio": ratio}))
    trainer = _trainer(tiny_model_dir, tmp_path, adapter, lr=1e-3)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    expected = 16.0 if ratio is None else ratio
    b_rates = [lr_of[id(p)] for n, p in named if "lora_B" in n]
    a_rates = [lr_of[id(p)] for n, p in named if "lora_A" in n]
    assert len(b_rates) == len(a_rates) == 2 * 6 + 1  # query, key, value, 3 dense per block; the pooler
    assert b_rates == pytest.approx([expected * 1e-3] * len(b_rates))
    assert a_rates == pytest.approx([1e-3] * len(a_rates))
    assert len(lr_of) == len(named)  # every trainable parameter is optimised
    trainer.train()  # and it trains with the scheduler on these groups
    assert trainer.state.global_step == 2


def test_head_learning_rate_is_the_heads_alone_and_follows_the_schedule(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, _adapter("pissa+reg"), steps=4, lr=1e-3,
                       regularizers=RegularizerConfig(), head_learning_rate=5e-3)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(named)  # every trainable parameter is optimised, once
    head = {n: lr_of[id(p)] for n, p in named if ".modules_to_save." in n}
    rest = {n: lr_of[id(p)] for n, p in named if ".modules_to_save." not in n}
    assert sorted(head) == sorted(n for n in head if "classifier" in n) and len(head) == 2  # weight, bias
    assert set(head.values()) == {5e-3} and set(rest.values()) == {1e-3}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert all(decay_of[id(p)] == 0.0 for _, p in named)  # the args' weight decay (0) everywhere
    trainer.train()
    rates = [(group["lr"], group["initial_lr"]) for group in trainer.optimizer.param_groups]
    ratios = {round(lr / initial, 12) for lr, initial in rates}
    assert len(ratios) == 1  # one schedule factor for the head and the adapter
    assert {initial for _, initial in rates} == {1e-3, 5e-3}


def test_head_learning_rate_refuses_a_model_without_a_trained_head(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, _adapter("lora"), head_learning_rate=5e-3)
    for name, param in trainer.model.named_parameters():
        if ".modules_to_save." in name:
            param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trained head"):
        trainer.create_optimizer()


def test_head_learning_rate_reaches_the_run(tiny_model_dir, task_files, tmp_path):
    from safetensors.torch import load_file

    from balora.runs import train_run

    def saved(extra, sub):
        result = train_run(_run_config(tiny_model_dir, task_files, tmp_path / sub, "lora", **extra), progress=False)
        tensors = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
        card = (result.run_dir / "adapter" / "README.md").read_text()
        assert ("| head learning rate |" in card) == ("train.head_learning_rate" in extra)
        return ({k: v for k, v in tensors.items() if "classifier" in k},
                {k: v for k, v in tensors.items() if "lora_" in k})

    head, adapter = saved({}, "default")
    assert head and adapter
    same_head, same_adapter = saved({"train.head_learning_rate": 1e-2}, "equal")  # = train.learning_rate
    for key in head:
        torch.testing.assert_close(same_head[key], head[key], atol=0, rtol=0)
    for key in adapter:
        torch.testing.assert_close(same_adapter[key], adapter[key], atol=0, rtol=0)
    fast_head, _ = saved({"train.head_learning_rate": 0.2}, "fast")
    assert max((fast_head[k] - head[k]).abs().max().item() for k in head) > 1e-3


def test_lorafa_freezes_a_and_trains_b_with_its_optimizer(tiny_model_dir, tmp_path):
    from peft.optimizers.lorafa import LoraFAOptimizer

    lora = apply_method(_classifier(tiny_model_dir), _adapter("lora"))
    trainer = _trainer(tiny_model_dir, tmp_path, _adapter("lorafa+reg"), regularizers=RegularizerConfig())
    model = trainer.model
    a_size = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert trainable_parameters(model) == trainable_parameters(lora) - a_size  # A is not trained
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      LoraFAOptimizer)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            assert torch.equal(param, before[name]), name
        elif "lora_B" in name:
            assert not torch.equal(param, before[name]), name


def test_adalora_prunes_its_budget_and_keeps_the_teacher_and_the_saved_adapter_exact(tiny_model_dir, tmp_path):
    adapter = _adapter("adalora+reg", adalora_delta_t=1, adalora_tinit=0.125, adalora_tfinal=0.25)
    assert adapter.adalora_ranks() == (6, 4)
    original = _classifier(tiny_model_dir).eval()
    trainer = _trainer(tiny_model_dir, tmp_path, adapter, steps=8, lr=5e-2, regularizers=RegularizerConfig())
    model = trainer.model
    es = {n: p for n, p in model.named_parameters() if "lora_E" in n}
    assert all(p.shape == (6, 1) and not p.any() for p in es.values())  # Λ = 0 at init
    trainer.train()
    config = model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (8, 1, 2)
    kept = {name: sum(mask) for name, mask in config.rank_pattern.items()}
    assert len(kept) == len(es) == 13 and sum(kept.values()) == 4 * len(es)  # pruned from 6 to 4 on average
    assert sum(int((p != 0).sum()) for p in es.values()) == sum(kept.values())  # the pruned entries are 0
    assert any(h.get("reg_orthogonal", 0) > 0 for h in trainer.state.log_history)

    ids, mask = _ids(5)
    batch = {"input_ids": ids, "attention_mask": mask}
    teacher = trainer.objective.teacher
    torch.testing.assert_close(teacher.logits(model, batch), _original_logits(original, model, batch),
                               atol=1e-5, rtol=0)
    model.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        trained = model.eval()(**batch).logits
        reloaded = PeftModel.from_pretrained(_classifier(tiny_model_dir), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**batch).logits, trained, atol=1e-5, rtol=0)
    lora_e = [p for n, p in reloaded.named_parameters() if "lora_E" in n]
    assert sorted(p.shape[0] for p in lora_e) == sorted(kept.values())  # saved at the ranks the schedule left


def test_adalora_orthogonal_penalty_is_pefts(tiny_model_dir):
    model = apply_method(_classifier(tiny_model_dir), _adapter("adalora"))
    ids, mask = _ids(1)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(6) % 3}
    with torch.no_grad():
        torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_A" in n))
        with_penalty = model(**batch).loss
        with peft_orthogonal_penalty_off(model) as weight:
            without = model(**batch).loss
        assert weight == 0.5 and model.peft_config["default"].orth_reg_weight == 0.5
        torch.testing.assert_close(with_penalty - without, weight * adalora_orthogonal_loss(model), atol=1e-6, rtol=0)


def test_adalora_needs_its_adapter_config_and_enough_steps(tiny_model_dir, tmp_path):
    adapter = _adapter("adalora")
    trainer = _trainer(tiny_model_dir, tmp_path, adapter, steps=1)
    with pytest.raises(ValueError, match="no pruning phase"):
        trainer.train()
    with pytest.raises(ValueError, match="adapter=AdapterConfig"):
        BALoRATrainer(model=trainer.model, args=trainer.args, objective=ClassificationObjective(None, 3))


# ----------------------------------------------------------------------------- generation runs


@pytest.mark.parametrize("method", ["milora+reg", "adalora+reg", "corda"])
def test_generation_run_saves_an_adapter_that_reproduces_the_trained_model(tiny_causal_lm_dir, tmp_path,
                                                                          monkeypatch, method):
    from balora.runs import train_run

    probe = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])}
    trained = _capture_trained(monkeypatch, probe)
    config = load_config(None, [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_causal_lm_dir}",
        "model.max_length=96", "data.task=gsm-symbolic", "data.max_train_examples=8", f"adapter.method={method}",
        "adapter.rank=4", f"adapter.target_modules=[{','.join(PROJ)}]", "train.max_steps=2", "train.save_steps=2",
        "train.logging_steps=1", "train.batch_size=2", "train.report_to=[]", "train.learning_rate=1e-2",
        "train.warmup_ratio=0", "train.loss_chunk_size=16", "eval.max_examples=1", "eval.max_new_tokens=2",
        *(["adapter.init_examples=4"] if parse_method(method).needs_init_data else []),
        *(["regularizers.consistency_schedule=constant"] if method.endswith("+reg") else []),
    ])
    result = train_run(config, progress=False)
    assert result.metrics["global_steps"] == 2
    if method.startswith("adalora"):
        assert all("reg_orthogonal" in h for h in result.log_history if "task_loss" in h)  # no labels: added by us
    reloaded = PeftModel.from_pretrained(_tiny_llama(tiny_causal_lm_dir), str(result.run_dir / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, trained["logits"], atol=1e-5, rtol=0)
        before = _tiny_llama(tiny_causal_lm_dir).eval()(**probe).logits
    assert (trained["logits"] - before).abs().max() > 1e-4


# ----------------------------------------------------------------------------- names and options


@pytest.mark.parametrize("name, base, reg, mutates, optimizer", [
    ("milora+reg", "milora", True, True, None), ("LoRA-GA", "lora_ga", False, True, None),
    ("corda", "corda", False, True, None), ("lora-fa+reg", "lorafa", True, False, "lorafa"),
    ("loraplus", "loraplus", False, False, "loraplus"), ("adalora+reg", "adalora", True, False, None),
    ("balora", "pissa", True, True, None), ("lora", "lora", False, False, None),
])
def test_method_names(name, base, reg, mutates, optimizer):
    spec = parse_method(name)
    assert (spec.base, spec.regularized, spec.mutates_base, spec.optimizer) == (base, reg, mutates, optimizer)
    assert spec.description
    assert spec.init_lora_weights == (base if base in ("lora_ga", "corda", "pissa") else True)


def test_orthogonal_init_is_refused_because_it_changes_the_model_at_step_zero():
    with pytest.raises(ValueError, match="step 0"):
        parse_method("orthogonal+reg")


@pytest.mark.parametrize("overrides, message", [
    (["adapter.method=lora", "adapter.loraplus_lr_ratio=8"], "adapter.loraplus_lr_ratio has no effect"),
    (["adapter.method=pissa", "adapter.adalora_target_r=4"], "read only with adapter.method=adalora"),
    (["adapter.method=milora", "adapter.init_examples=8"], "adapter.init_examples has no effect"),
    (["adapter.method=corda", "adapter.lora_ga_scale=unit"], "adapter.lora_ga_scale"),
    (["adapter.method=lora_ga", "adapter.corda_mode=kpm"], "adapter.corda_mode"),
    (["adapter.method=adalora", "adapter.adalora_init_r=4", "adapter.adalora_target_r=4"], "must be >"),
    (["adapter.method=adalora", "adapter.adalora_tinit=0.5", "adapter.adalora_tfinal=0.5"], "must be < 1"),
    (["adapter.method=lora_ga", "adapter.lora_ga_direction=up"], "adapter.lora_ga_direction"),
    (["adapter.method=corda", "adapter.corda_mode=best"], "adapter.corda_mode"),
    (["adapter.method=loraplus", "adapter.loraplus_lr_ratio=0"], "adapter.loraplus_lr_ratio must be > 0"),
])
def test_method_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_method_options_are_accepted_by_their_method():
    config = load_config(None, ["adapter.method=adalora+reg", "adapter.rank=6", "adapter.adalora_delta_t=5"])
    assert config.adapter.adalora_ranks() == (9, 6)
    assert load_config(None, ["adapter.method=loraplus", "adapter.loraplus_lr_ratio=8"]).adapter.loraplus_lr_ratio == 8
    assert load_config(None, ["adapter.method=corda", "adapter.corda_mode=kpm", "adapter.init_examples=16"])
