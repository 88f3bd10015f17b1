"""Missing optional dependencies name the extra that provides them."""

from __future__ import annotations

import pytest

from erstore.errors import ErstoreError, MissingDependencyError
from erstore.extras import require


def test_present_module_is_returned():
    assert require("json", extra="x", purpose="parsing").dumps([1]) == "[1]"


def test_missing_module_names_the_extra():
    with pytest.raises(MissingDependencyError) as e:
        require("erstore_no_such_module.sub", extra="formats", purpose="reading Parquet corpora")
    assert isinstance(e.value, ImportError) and isinstance(e.value, ErstoreError)
    msg = str(e.value)
    assert "reading Parquet corpora" in msg and "'erstore_no_such_module'" in msg
    assert "pip install 'erstore[formats]'" in msg
