"""The one wrapper around ``datasets.load_dataset`` for data sets on the Hugging Face hub.

Without internet (or for a gated, renamed or misspelt data set) ``datasets`` raises one of many
exception types with a long message. :func:`load_hub_dataset` turns every such failure into one
:class:`HubLoadError` line that says what could not be loaded and how to do without the hub.
"""

from __future__ import annotations

from typing import Any

import datasets

__all__ = ["HubLoadError", "load_hub_dataset"]


class HubLoadError(ConnectionError):
    """A data set could not be loaded from the hub; the message is one line with an offline hint."""


def _first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (without a trailing period)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip().rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_hub_dataset(
    path: str,
    name: str | None = None,
    *,
    split: str | None = None,
    what: str,
    offline_hint: str,
    **kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict:
    """``datasets.load_dataset(path, name, split=split, **kwargs)``; ``name`` and ``split`` are
    passed only when given.

    Returns what ``datasets.load_dataset`` returns (a ``Dataset`` for a ``split``, else a
    ``DatasetDict``). Any failure to reach, find or build the data set raises
    ``HubLoadError("could not load <what> from the hub (<path>): <first line of the error>.
    <offline_hint>")`` as one line; ``offline_hint`` should say which local file to pass instead.
    """
    args = (path,) if name is None else (path, name)
    if split is not None:
        kwargs["split"] = split
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline, gated, renamed, missing config: all mean "no hub data"
        raise HubLoadError(
            f"could not load {what} from the hub ({path}): {_first_line(exc)}. {offline_hint}"
        ) from None
