"""Memory sizes: decimal vs binary units, and clear refusals for what is ambiguous or wrong."""
import pytest

from spikeprune.errors import SpikepruneError
from spikeprune.units import format_bytes, format_count, format_number, format_percent, parse_bytes


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
    assert format_bytes(None) == format_bytes(float("nan")) == "-"


@pytest.mark.parametrize("n, kw, text", [
    (646_522, {}, "646.52k"),
    (239_692_032, {}, "239.69M"),
    (1_200_000_000, {}, "1.20G"),
    (512, {}, "512"),
    (0, {}, "0"),
    (-2_500, {}, "-2.50k"),
    (999_999, {}, "1.00M"),  # rounding up to the next prefix, never '1000.00k'
    (999.999, {}, "1.00k"),
    (0.5, {}, "0.50"),
    (9_590_000, {"digits": 3, "significant": True}, "9.59M"),
    (9_600_000, {"digits": 3, "significant": True, "unit": "op"}, "9.6Mop"),
    (None, {}, "-"),
    (float("inf"), {}, "-"),
])
def test_format_count(n, kw, text):
    assert format_count(n, **kw) == text


def test_format_number_and_percent():
    assert format_number(239_692_032) == "239,692,032" and format_number(1234.0) == "1,234"
    assert format_number(0.21634) == "0.216" and format_number(6.2912, digits=2) == "6.3"
    assert format_number(None) == format_number(float("nan")) == "-"
    assert format_percent(0.52734) == "52.73%" and format_percent(0.5, digits=0) == "50%"
    assert format_percent(None) == "-"
