"""`--engine-arg KEY=VALUE` parsing shared by `steermoe profile detect` and `steermoe audit`."""

from __future__ import annotations

import pytest

from profile_tools.detection import parse_engine_args


def test_values_are_json_when_they_parse_and_strings_otherwise() -> None:
    kwargs = parse_engine_args(["max_num_seqs=4", "enforce_eager=true", "dtype=bfloat16",
                                "limit={\"a\": 1}", "name=a=b"])
    assert kwargs == {"max_num_seqs": 4, "enforce_eager": True, "dtype": "bfloat16",
                      "limit": {"a": 1}, "name": "a=b"}


@pytest.mark.parametrize("item", ["novalue", "=1", ""])
def test_items_without_key_or_value_separator_are_refused(item: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_args([item])
