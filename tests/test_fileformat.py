"""The multiprocess file format, pinned to the installed prometheus-client.

promfork writes the workers' files itself (fileformat.ValueFile) and reads and folds
them in compaction. If a prometheus-client upgrade changes the layout, these tests
fail instead of totals silently going wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from promfork.directory import fileformat


def keys(count: int) -> list[str]:
    """Real prometheus-client keys of every padding length, non-ASCII label values included."""
    found = []
    for n in range(count):
        label = "é" * (n % 3) + "x" * (n % 9)
        found.append(mmap_key("requests_total", "requests_total", ["route", "n"], [f"/r{label}", str(n)], "Help."))
    return found


def write_stock(path: Path, writes: list[tuple[str, float, float]]) -> None:
    store = MmapedDict(str(path))
    try:
        for key, value, timestamp in writes:
            store.write_value(key, value, timestamp)
    finally:
        store.close()


def write_promfork(path: Path, writes: list[tuple[str, float, float]]) -> None:
    store = fileformat.ValueFile(str(path))
    try:
        for key, value, timestamp in writes:
            slot = store.slot(key)
            if timestamp:
                store.set(slot, value, timestamp)
            else:
                store.doubles[slot] = value
    finally:
        store.close()


def test_value_file_writes_the_bytes_prometheus_client_writes(tmp_path: Path) -> None:
    # 2,000 keys overflow the first 64 KiB twice: growth is covered too.
    writes = [(key, n * 1.5, 0.0) for n, key in enumerate(keys(2000))]
    writes += [(writes[7][0], -3.25, 0.0), (writes[9][0], 42.0, 1_700_000_000.5)]  # rewrites in place
    write_stock(tmp_path / "counter_1.db", writes)
    write_promfork(tmp_path / "counter_2.db", writes)
    stock = (tmp_path / "counter_1.db").read_bytes()
    assert len(stock) > 1 << 17
    assert (tmp_path / "counter_2.db").read_bytes() == stock


def test_value_file_continues_a_file_prometheus_client_started(tmp_path: Path) -> None:
    path = tmp_path / "counter_3.db"
    first, later = keys(300)[:200], keys(300)[200:]
    write_stock(path, [(key, float(n), 0.0) for n, key in enumerate(first)])
    store = fileformat.ValueFile(str(path))
    try:
        for n, key in enumerate(first):
            slot = store.slot(key)
            assert store.doubles[slot] == float(n)
            store.doubles[slot] += 0.5
        for key in later:
            store.doubles[store.slot(key)] = 7.0
    finally:
        store.close()
    read_back = {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))}
    assert read_back == {**{key: n + 0.5 for n, key in enumerate(first)}, **dict.fromkeys(later, 7.0)}
    assert fileformat.read_entries(str(path)) == {key: (value, 0.0) for key, value in read_back.items()}


def test_value_written_is_visible_to_a_reader_before_the_writer_closes(tmp_path: Path) -> None:
    store = fileformat.ValueFile(str(tmp_path / "counter_4.db"))
    try:
        slot = store.slot(keys(1)[0])
        store.doubles[slot] = 12.5
        assert fileformat.read_entries(str(tmp_path / "counter_4.db")) == {keys(1)[0]: (12.5, 0.0)}
    finally:
        store.close()


@pytest.mark.parametrize(
    "damage",
    [
        b"\xff\xff\xff\x7f" + bytes(60),  # header claims more than the file holds
        b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff\xff\x00\x00" + bytes(52),  # entry runs past the end
    ],
)
def test_value_file_refuses_a_damaged_file(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / "counter_5.db"
    path.write_bytes(damage)
    with pytest.raises(fileformat.CorruptFile, match=r"counter_5\.db"):
        fileformat.ValueFile(str(path))


def test_value_file_creates_files_with_the_process_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fileformat.ValueFile(str(tmp_path / "gauge_livesum_6.db")).close()
    finally:
        os.umask(old)
    assert (tmp_path / "gauge_livesum_6.db").stat().st_mode & 0o777 == 0o600
