"""The one hub wrapper: the call it makes, and one HubLoadError line on every failure."""

import datasets
import pytest

from balora.data.hub import HubLoadError, load_hub_dataset

HINT = "Without internet, pass path=... instead"


def test_passes_only_the_given_arguments(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return "data"

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_hub_dataset("owner/set", what="a set", offline_hint=HINT) == "data"
    load_hub_dataset("owner/set", "cfg", split="test", what="a set", offline_hint=HINT, cache_dir="c")
    load_hub_dataset("owner/set", split="train", what="a set", offline_hint=HINT)
    assert calls == [
        (("owner/set",), {}),
        (("owner/set", "cfg"), {"split": "test", "cache_dir": "c"}),
        (("owner/set",), {"split": "train"}),
    ]


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (ConnectionError("Couldn't reach 'owner/set' on the Hub (LocalEntryNotFoundError)\ntrace"),
         "ConnectionError: Couldn't reach 'owner/set' on the Hub (LocalEntryNotFoundError)"),
        (FileNotFoundError("Dataset 'owner/set' doesn't exist on the Hub or cannot be accessed.\nmore"),
         "FileNotFoundError: Dataset 'owner/set' doesn't exist on the Hub or cannot be accessed"),
        (ValueError("BuilderConfig 'x' not found. Available: ['a']"),
         "ValueError: BuilderConfig 'x' not found. Available: ['a']"),
        (OSError(""), "OSError"),
    ],
)
def test_failures_become_one_hub_load_error_line(monkeypatch, error, shown):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(HubLoadError) as info:
        load_hub_dataset("owner/set", "cfg", split="test", what="MBPP (full, split test)", offline_hint=HINT)
    assert str(info.value) == f"could not load MBPP (full, split test) from the hub (owner/set): {shown}. {HINT}"
    assert isinstance(info.value, ConnectionError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_interrupts_are_not_swallowed(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "load_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_hub_dataset("owner/set", what="a set", offline_hint=HINT)
