"""A precomputed, sparse teacher for generation runs: one inference pass instead of a teacher forward per step.

``balora teacher precompute CONFIG`` runs the frozen pre-trained model (the ORIGINAL weights,
the teacher of eq. 9) once over the run's training set -- the same SFT encoding, so the same
valid tokens -- and stores, per valid token, the top-K log-probabilities at the run's
temperature T, their token ids and the log of the mass outside them
(:class:`~balora.regularizers.tokens.TopKTeacher`). ``regularizers.teacher: precomputed`` (with
``regularizers.teacher_path``) then trains with no teacher forward and no snapshot of the
adapter: the consistency term is the KL of the (K+1)-bucket coarsening
(:class:`~balora.regularizers.tokens.SparseConsistencyTerm`).

A store is a directory of NumPy arrays, memory-mapped when read:

* ``indices.npy`` (N_tokens, K) uint16 (int32 for vocabularies over 65,536 tokens),
* ``logprobs.npy`` (N_tokens, K) float16, ``rest.npy`` (N_tokens,) float32, the log of the mass
  left by the ROUNDED top-K (:meth:`TopKTeacher.rounded_to_half`: the buckets sum to 1),
* ``example_ids.npy`` (N_examples,) int64, the ``example_id`` of each encoded training example
  (its row in the source data; rows the encoding dropped are absent), and ``offsets.npy``
  (N_examples + 1,) int64: the i-th example owns rows ``offsets[i]:offsets[i+1]``, its valid
  tokens in order;
* ``meta.json``: K, T, the vocabulary size, the counts, a fingerprint of what decides the
  training set and the teacher (model, data and, for subsampled data, the seed), and
  ``complete``. ``progress.json`` records the examples done: an interrupted precompute resumes.

Training checks the fingerprint, K and T against the run, and each example's number of valid
tokens against its stored rows, so a store cannot silently serve another data set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from balora.config import GENERATION, ConfigError, RunConfig
from balora.regularizers.tokens import TopKTeacher

__all__ = ["PrecomputedTeacher", "fingerprint", "precompute_teacher"]

logger = logging.getLogger("balora")

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
FORMAT_VERSION = 1


def fingerprint(config: RunConfig) -> str:
    """A hash of the settings that decide the encoded training set and the teacher's logits."""
    settings = config.to_dict()
    decisive = {"model": settings["model"], "data": settings["data"], "seed": config.train.seed}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PrecomputedTeacher:
    """A store opened for training: :meth:`rows` gives the teacher of a batch's valid tokens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise ConfigError(f"regularizers.teacher_path={path}: not a precomputed teacher (no {META_FILE}); "
                              "make one with `balora teacher precompute CONFIG`")
        self.meta = json.loads(meta_file.read_text())
        if not self.meta.get("complete"):
            raise ConfigError(f"regularizers.teacher_path={path}: the precompute did not finish "
                              "(run `balora teacher precompute` again to resume it)")
        self.top_k = int(self.meta["top_k"])
        self.temperature = float(self.meta["temperature"])
        self.offsets = np.load(self.path / "offsets.npy")
        self.example_ids = np.load(self.path / "example_ids.npy")
        self._position = {int(e): i for i, e in enumerate(self.example_ids)}
        self.indices = np.load(self.path / "indices.npy", mmap_mode="r")
        self.logprobs = np.load(self.path / "logprobs.npy", mmap_mode="r")
        self.rest = np.load(self.path / "rest.npy", mmap_mode="r")

    def check(self, config: RunConfig) -> None:
        """One-line errors when the store was not made for this run's data, model or temperature."""
        where = f"regularizers.teacher_path={self.path}"
        if self.meta["fingerprint"] != fingerprint(config):
            raise ConfigError(f"{where} was precomputed for another model, data set or seed "
                              f"(fingerprint {self.meta['fingerprint']}, this run {fingerprint(config)})")
        temperature = config.regularizers.temperature
        if abs(temperature - self.temperature) > 1e-9:
            raise ConfigError(f"{where} holds log-probabilities at temperature {self.temperature}, "
                              f"the run uses regularizers.temperature={temperature}")

    def rows(self, example_ids: torch.Tensor, counts: torch.Tensor, device=None) -> TopKTeacher:
        """The teacher of a batch's valid tokens, in the batch's order (row by row, position by position).

        ``example_ids`` (B,), ``counts`` (B,) the valid tokens of each row. Returns M = Σ counts rows.
        """
        ids, counts = example_ids.tolist(), counts.tolist()
        spans = []
        for example, count in zip(ids, counts):
            position = self._position.get(int(example))
            if position is None:
                raise ValueError(f"example_id {example} is not in the precomputed teacher ({self.path})")
            start, stop = int(self.offsets[position]), int(self.offsets[position + 1])
            if stop - start != count:
                raise ValueError(f"the precomputed teacher ({self.path}) has {stop - start} tokens for example "
                                 f"{example}, the batch {count}: it was made for other data")
            spans.append((start, stop))
        take = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, dtype=np.int64)
        indices = torch.from_numpy(self.indices[take].astype(np.int64))
        logprobs = torch.from_numpy(self.logprobs[take].astype(np.float32))
        rest = torch.from_numpy(np.asarray(self.rest[take], dtype=np.float32))
        return TopKTeacher(indices.to(device), logprobs.to(device), rest.to(device))

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays on disk."""
        return sum((self.path / f).stat().st_size
                   for f in ("indices.npy", "logprobs.npy", "rest.npy", "offsets.npy", "example_ids.npy"))


def _valid_counts(train_set, collator) -> np.ndarray:
    from balora.objectives.generation import GenerationObjective

    return np.array([GenerationObjective.count_items(collator([row])) for row in train_set], dtype=np.int64)


def precompute_teacher(config: RunConfig, output: str | Path, *, top_k: int = 64, batch_size: int = 8,
                       chunk_size: int = 512, progress: bool = True) -> Path:
    """Run the pre-trained model of ``config`` once over its training set and store its sparse teacher.

    ``output``: the store's directory (new, or an interrupted precompute of the same settings, which
    resumes). Returns the directory. The teacher is the model as loaded (no adapter): the
    original weights, as the snapshot teacher of a PiSSA run sees them.
    """
    from tqdm.auto import tqdm

    from balora.objectives.generation import model_inputs, teacher_hidden_states, valid_targets
    from balora.regularizers.common import IGNORE_INDEX
    from balora.runs_generation import GenerationRun

    if config.family != GENERATION:
        raise ConfigError("balora teacher precompute is for generation runs (family: generation)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"--top-k must be an integer >= 1, got {top_k!r}")
    out = Path(output)
    family = GenerationRun(config, progress)
    model, _ = family.load()
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    top_k = min(top_k, vocab)
    counts = _valid_counts(family.train_set, family.collator)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    meta = {"version": FORMAT_VERSION, "fingerprint": fingerprint(config), "model": config.model.name,
            "top_k": top_k, "temperature": float(config.regularizers.temperature), "vocab_size": int(vocab),
            "examples": int(len(counts)), "tokens": int(offsets[-1]), "complete": False}
    done = _open_or_resume(out, meta)
    index_dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    mode = "r+" if done else "w+"
    arrays = {
        "indices": np.lib.format.open_memmap(out / "indices.npy", mode=mode, dtype=index_dtype, shape=(meta["tokens"], top_k)),
        "logprobs": np.lib.format.open_memmap(out / "logprobs.npy", mode=mode, dtype=np.float16, shape=(meta["tokens"], top_k)),
        "rest": np.lib.format.open_memmap(out / "rest.npy", mode=mode, dtype=np.float32, shape=(meta["tokens"],)),
    }
    np.save(out / "offsets.npy", offsets)
    np.save(out / "example_ids.npy", np.asarray(family.train_set["example_id"], dtype=np.int64))
    head = model.get_output_embeddings()
    bar = tqdm(total=len(counts), initial=done, desc="teacher", unit="example", disable=not progress)
    with torch.no_grad():
        for start in range(done, len(counts), batch_size):
            stop = min(start + batch_size, len(counts))
            batch = family.collator([family.train_set[i] for i in range(start, stop)])
            valid = valid_targets(batch) != IGNORE_INDEX
            hidden = teacher_hidden_states(model, model_inputs(batch))[valid]  # (M, d)
            row = int(offsets[start])
            for a in range(0, hidden.shape[0], chunk_size):
                rows = TopKTeacher.from_logits(head(hidden[a:a + chunk_size]).float(),
                                               temperature=meta["temperature"], top_k=top_k).rounded_to_half()
                b = row + a + len(rows)
                arrays["indices"][row + a:b] = rows.indices.numpy().astype(index_dtype)
                arrays["logprobs"][row + a:b] = rows.logprobs.numpy().astype(np.float16)
                arrays["rest"][row + a:b] = rows.rest.numpy()
            for array in arrays.values():
                array.flush()
            (out / PROGRESS_FILE).write_text(json.dumps({"examples_done": stop}))
            bar.update(stop - start)
    bar.close()
    meta["complete"] = True
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    logger.info("precomputed teacher: %d tokens of %d examples, top-%d, %.1f MB in %s", meta["tokens"],
                meta["examples"], top_k, PrecomputedTeacher(out).nbytes / 1e6, out)
    return out


def _open_or_resume(out: Path, meta: dict) -> int:
    """Examples already done in ``out`` (0 for a new store); refuses a finished store or another one's folder."""
    meta_file = out / META_FILE
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old.get("complete"):
            raise FileExistsError(f"{out} already holds a complete precomputed teacher; choose another --output")
        if {k: v for k, v in old.items() if k != "complete"} != {k: v for k, v in meta.items() if k != "complete"}:
            raise FileExistsError(f"{out} holds an interrupted precompute of other settings; choose another --output")
        progress = out / PROGRESS_FILE
        done = json.loads(progress.read_text())["examples_done"] if progress.is_file() else 0
        logger.info("resuming the precompute in %s at example %d of %d", out, done, meta["examples"])
        return int(done)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a precomputed teacher; choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2))
    return 0
