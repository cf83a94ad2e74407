"""Memory sizes: decimal vs binary units, and clear refusals for what is ambiguous or wrong."""
import pytest

from spikeprune.errors import SpikepruneError
from spikeprune.units import format_bytes, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("8MB", 8_000_000),
    ("8MiB", 8 * 1024**2),
    ("512KiB", 512 * 1024),
    ("512kB", 512_000),
    ("1.5GB", 1_500_000_000),
    ("1.5 GiB", int(1.5 * 1024**3)),
    ("2TB", 2 * 10**12),
    ("123", 123),
    ("123B", 123),
    (" 8 mb ", 8_000_000),  # case-insensitive, spaces allowed
    ("1e3kB", 1_000_000),
    (4096, 4096),
    (2.5e6, 2_500_000),
])
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected


def test_decimal_and_binary_differ():
    # The whole point of refusing bare prefixes: the two readings are ~5% apart at MB scale.
    assert parse_bytes("8MiB") - parse_bytes("8MB") == 388_608


@pytest.mark.parametrize("bad, words", [
    ("8M", ["ambiguous", "8MB", "8,000,000", "8MiB", "8,388,608"]),
    ("512K", ["ambiguous", "512kB", "512KiB"]),
    ("3Mbit", ["bits"]),
    ("8 parsecs", ["unknown unit", "KiB"]),
    ("-1MB", ["positive"]),
    ("0", ["positive"]),
    ("nan", ["cannot read"]),
    ("0.2", ["less than one byte"]),
    ("1,000", ["cannot read"]),
    (True, ["number of bytes"]),
    (float("inf"), ["positive and finite"]),
])
def test_parse_bytes_refuses_with_reason(bad, words):
    with pytest.raises(SpikepruneError) as e:
        parse_bytes(bad)
    for w in words:
        assert w in str(e.value)


def test_format_bytes():
    assert format_bytes(999) == "999 B"
    assert format_bytes(12_345_678) == "12.35 MB"
    assert format_bytes(12_345_678, binary=True) == "11.77 MiB"
    assert format_bytes(-2_000_000_000) == "-2.00 GB"
    # parse(format(x)) stays within the printed precision
    assert abs(parse_bytes(format_bytes(7_654_321).replace(" ", "")) - 7_654_321) <= 5_000
