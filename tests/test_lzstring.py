"""pixel_middleware._lzstring against vectors made by the real lz-string npm
package (tests/fixtures/lz64_vectors.json, from scripts/make_lz64_vectors.py),
its cap on the output, and arbitrary input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pixel_middleware._lzstring import TooLarge, decompress_from_base64

_FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "lz64_vectors.json").read_text(encoding="utf-8")
)
VECTORS: list[dict[str, Any]] = _FIXTURE["vectors"]


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def test_the_vectors_were_made_by_lz_string_and_cover_what_posthog_sends() -> None:
    assert _FIXTURE["lz-string"] == "1.5.0"
    texts = [vector["text"] for vector in VECTORS]
    assert "" in texts
    assert any(not text.isascii() for text in texts)
    assert any(text.startswith('[{"event":"$pageview"') for text in texts)
    assert max(len(vector["compressed"]) for vector in VECTORS) > 4000


@pytest.mark.parametrize("vector", VECTORS, ids=[str(i) for i in range(len(VECTORS))])
def test_decompresses_what_lz_string_compressed(vector: dict[str, Any]) -> None:
    text = vector["text"]
    assert decompress_from_base64(vector["compressed"], max_chars=10**7) == text


@pytest.mark.parametrize("vector", VECTORS[1:], ids=[str(i) for i in range(1, len(VECTORS))])
def test_the_cap_is_exact(vector: dict[str, Any]) -> None:
    """At exactly the text's UTF-16 length it decodes; one under, TooLarge."""
    text = vector["text"]
    units = _utf16_units(text)
    assert decompress_from_base64(vector["compressed"], max_chars=units) == text
    with pytest.raises(TooLarge):
        decompress_from_base64(vector["compressed"], max_chars=units - 1)


def test_a_small_input_that_expands_enormously_stops_at_the_cap() -> None:
    run = next(v for v in VECTORS if len(v["text"]) > 70 and set(v["text"]) == {"a"})
    # Ten characters make 77; the cap stops it long before memory could matter.
    assert len(run["compressed"]) < 16
    with pytest.raises(TooLarge):
        decompress_from_base64(run["compressed"], max_chars=20)


def test_broken_inputs_give_none_or_an_error_never_garbage() -> None:
    assert decompress_from_base64("", max_chars=100) is None
    with pytest.raises(ValueError, match="not LZ-string base64"):
        decompress_from_base64("!!!!", max_chars=100)
    whole = next(v for v in VECTORS if v["text"] == "hello, world")["compressed"]
    assert decompress_from_base64(whole[:6], max_chars=100) is None  # cut short


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=!-_"))
def test_arbitrary_input_never_raises_more_than_it_says(text: str) -> None:
    try:
        result = decompress_from_base64(text, max_chars=500)
    except ValueError:  # TooLarge included
        return
    assert result is None or _utf16_units(result) <= 500
