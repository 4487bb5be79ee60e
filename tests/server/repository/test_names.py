"""Model names and versions are checked before anything touches the filesystem."""

from __future__ import annotations

import pytest

from convserve.server.errors import InvalidInputError
from convserve.server.repository.model_repository import parse_version, validate_model_name


def test_names_and_versions_never_reach_the_filesystem() -> None:
    assert validate_model_name("digits_lenet") == "digits_lenet"
    for bad in ("../etc", "a/b", "/abs", ".hidden", "x" * 65, "a b", "a\0b"):
        with pytest.raises(InvalidInputError, match="expected a model name matching"):
            validate_model_name(bad)
    assert parse_version("") == 0 and parse_version("12") == 12
    for bad in ("-1", "1.0", "../1", "1e3"):
        with pytest.raises(InvalidInputError, match="expected a positive integer version"):
            parse_version(bad)
