import pytest

from vhostballoon.sizes import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("512M", 512 << 20), ("2G", 2 << 30), ("4096", 4096), ("1.5G", 3 << 29), ("64KiB", 64 << 10), ("1t", 1 << 40), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-5", "1.3B", "0x10"])
def test_parse_size_rejects_with_the_text(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size():
    assert format_size(512 << 20) == "512.0 MiB"
    assert format_size(None) == "-"
    assert format_size(100) == "100 B"
