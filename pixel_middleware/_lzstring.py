"""LZ-string's ``decompressFromBase64``, in pure Python, with a cap on the output.

posthog-js sends ``compression=lz64`` payloads: the JSON compressed by the
``lz-string`` npm package's ``compressToBase64``. This is that package's
``_decompress`` (version 1.5.0) read six bits a character from its own base64
alphabet, giving the same text. Two differences, on purpose:

- A character outside the alphabet is an error (``ValueError``); lz-string
  reads it as zero bits and decodes garbage.
- The output is capped: LZ-string can expand a few bytes enormously (each code
  may name a dictionary entry as long as all the output so far), so decoding
  stops with :class:`TooLarge` as soon as the text would pass ``max_chars``
  UTF-16 code units. The dictionary holds at most the output plus one unit per
  code read, so memory stays bounded by the cap too.

Standard library only, like the core. Tested against vectors made once by the
real package (``scripts/make_lz64_vectors.py``).
"""

from __future__ import annotations

__all__ = ["TooLarge", "decompress_from_base64"]

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_VALUE = {char: index for index, char in enumerate(_ALPHABET)}


class TooLarge(ValueError):
    """The decompressed text would be longer than the cap."""


class _Bits:
    """The input's bits, six a character, most significant first, as lz-string reads them."""

    __slots__ = ("index", "position", "text", "value")

    def __init__(self, text: str) -> None:
        self.text = text
        self.value = self._char(0)
        self.position = 32
        self.index = 1

    def _char(self, index: int) -> int:
        if index >= len(self.text):
            return 0  # lz-string reads past the end as zero bits (its end check follows)
        value = _VALUE.get(self.text[index])
        if value is None:
            raise ValueError("not LZ-string base64")
        return value

    def read(self, count: int) -> int:
        bits = 0
        for shift in range(count):
            if self.value & self.position:
                bits |= 1 << shift
            self.position >>= 1
            if self.position == 0:
                self.position = 32
                self.value = self._char(self.index)
                self.index += 1
        return bits


def decompress_from_base64(text: str, *, max_chars: int) -> str | None:
    """The text ``text`` holds; ``None`` where lz-string gives ``null`` or ``""``
    for a broken input. Raises :class:`TooLarge` past ``max_chars`` UTF-16 code
    units, ``ValueError`` for a character outside the alphabet."""
    if not text:
        return None
    length = len(text)
    bits = _Bits(text)
    kind = bits.read(2)
    if kind == 2:
        return ""
    if kind not in (0, 1):
        return None
    first = chr(bits.read(8 if kind == 0 else 16))
    if max_chars < 1:
        raise TooLarge(f"more than {max_chars} characters")
    # Entries 0, 1, 2 are the codes "8-bit literal", "16-bit literal", "end".
    dictionary: list[str] = ["", "", "", first]
    word = first
    result = [first]
    size = 1
    enlarge_in = 4
    width = 3
    while True:
        if bits.index > length:
            return None  # ran out of input before the end code
        code = bits.read(width)
        if code == 2:
            break
        if code in (0, 1):
            dictionary.append(chr(bits.read(8 if code == 0 else 16)))
            code = len(dictionary) - 1
            enlarge_in -= 1
            if enlarge_in == 0:
                enlarge_in = 1 << width
                width += 1
        if code < len(dictionary):
            entry = dictionary[code]
        elif code == len(dictionary):
            entry = word + word[0]
        else:
            return None
        size += len(entry)
        if size > max_chars:
            raise TooLarge(f"more than {max_chars} characters")
        result.append(entry)
        dictionary.append(word + entry[0])
        enlarge_in -= 1
        word = entry
        if enlarge_in == 0:
            enlarge_in = 1 << width
            width += 1
    # JavaScript strings are UTF-16: pair the surrogates, replace lone ones.
    joined = "".join(result)
    if joined.isascii():
        return joined
    return joined.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
