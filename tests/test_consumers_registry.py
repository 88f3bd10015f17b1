"""Families from user code: `register_family` and the `erstore.families` entry-point group."""

from __future__ import annotations

import sys

import pytest
import torch

import consumers
from consumers import FAMILIES, Tail, load_tail, register_family, tail_class
from consumers.models.llama import LlamaTail
from erstore.errors import IncompatibleStoreError, InvalidInputError
from tests.decoder_fixtures import decoder_corpus, dzoo  # noqa: F401


@pytest.fixture
def families():
    """Restore the registry after a test changes it."""
    saved = dict(FAMILIES)
    yield FAMILIES
    FAMILIES.clear()
    FAMILIES.update(saved)


class CountingLlamaTail(LlamaTail):
    """A user's family: Llama's tail that counts its calls (stands for any user subclass)."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def test_register_family_from_user_code_serves_a_store(dzoo, families):
    store = dzoo.store("llama")
    with pytest.raises(InvalidInputError, match="replace=True"):
        register_family("llama", CountingLlamaTail)  # a built-in family is not silently replaced
    register_family("llama", CountingLlamaTail, replace=True)
    tail = load_tail(store)
    assert type(tail) is CountingLlamaTail
    e = store.read([min(store)])[0]
    with torch.no_grad():
        tail(torch.from_numpy(e.states)[None])
    assert CountingLlamaTail.calls == 1


def test_register_family_checks_its_input(families):
    with pytest.raises(InvalidInputError, match="subclass of consumers.Tail"):
        register_family("x", object)
    with pytest.raises(InvalidInputError, match="module:ClassName"):
        register_family("x", "no_colon_here")
    register_family("my_arch", "tests.test_consumers_registry:CountingLlamaTail")
    assert tail_class("my_arch") is CountingLlamaTail
    register_family("broken", "no_such_package.tails:Tail")
    with pytest.raises(IncompatibleStoreError, match="cannot be imported"):
        tail_class("broken")


def test_entry_point_family_is_found_without_registering(tmp_path, families, monkeypatch):
    # A real installed distribution (a .dist-info folder on sys.path) declaring the entry point.
    (tmp_path / "my_tails.py").write_text(
        "from consumers.models.llama import LlamaTail\n\n"
        "class MyTail(LlamaTail):\n    family = 'my_decoder'\n"
    )
    info = tmp_path / "my_tails-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tails\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{consumers.ENTRY_POINT_GROUP}]\nmy_decoder = my_tails:MyTail\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = tail_class("my_decoder")
    assert issubclass(cls, Tail) and cls.__name__ == "MyTail" and cls.__module__ == "my_tails"
    assert FAMILIES["my_decoder"] == "my_tails:MyTail"
    sys.modules.pop("my_tails", None)


def test_refusal_names_the_supported_families_and_both_ways_to_add_one(families):
    with pytest.raises(IncompatibleStoreError) as info:
        tail_class("rwkv")
    message = str(info.value)
    for needle in ("'rwkv'", "llama", "gpt2", "register_family('rwkv'", "erstore.families", "docs/decoders.md"):
        assert needle in message, (needle, message)
