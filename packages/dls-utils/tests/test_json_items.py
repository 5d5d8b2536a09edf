"""``json_items``: a list written a chunk at a time is the text ``json.dumps(indent=2)`` writes whole."""

from __future__ import annotations

import json

import pytest
from dls_utils.source import JSON_CHUNK, json_items


@pytest.mark.parametrize("count", [1, 2, JSON_CHUNK, JSON_CHUNK + 1, 2 * JSON_CHUNK + 3])
def test_the_same_text_as_json_dumps(count: int) -> None:
    items = [{"n": n, "key": "a\nb\t\"c\"", "waiters": [1, 2], "none": []} for n in range(count)]
    assert "\n".join(["[", *json_items(items, 2), "]"]) == json.dumps(items, indent=2)
    inside = "\n".join(["{", '  "slots": [', *json_items(items, 4), "  ]", "}"])
    assert inside == json.dumps({"slots": items}, indent=2)
    assert len(list(json_items(items, 2))) == -(-count // JSON_CHUNK)


def test_no_items_no_text() -> None:
    assert list(json_items([], 2)) == []
