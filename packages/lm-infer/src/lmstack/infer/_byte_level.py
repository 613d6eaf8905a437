"""The byte-level BPE alphabet (GPT-2's): how byte-level tokenizers spell each of the 256 bytes.

Vocabulary entries of byte-level tokenizers are strings over this alphabet, one character per byte:
printable Latin-1 bytes stand for themselves and the other bytes for the code points from 256 up,
in byte order. The server uses it to recover a token's raw bytes, the remote client to find the
vocabulary entry of a token the server spelled as bytes.
"""

from __future__ import annotations

__all__ = ["BYTE_TO_CHAR", "CHAR_TO_BYTE"]


def _alphabet() -> dict[int, str]:
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _alphabet()
"""Each byte's character in byte-level vocabulary entries."""

CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in BYTE_TO_CHAR.items()}
"""The byte each character of a byte-level vocabulary entry stands for."""
