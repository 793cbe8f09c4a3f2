"""The dependency-free TensorBoard writer produces valid, CRC-checked event records."""

from __future__ import annotations

import pytest

from sbm_transformer.tensorboard import ScalarWriter, _crc32c, read_scalars


def test_crc32c_known_value() -> None:
    assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_write_and_read_back(tmp_path) -> None:
    with ScalarWriter(tmp_path) as w:
        for step in range(3):
            w.add_scalar("loss/train", 1.0 / (step + 1), step)
        w.add_scalar("accuracy/val", 0.75, 2)
    got = read_scalars(tmp_path)
    assert [(t, s) for t, s, _ in got] == [
        ("loss/train", 0),
        ("loss/train", 1),
        ("loss/train", 2),
        ("accuracy/val", 2),
    ]
    assert got[1][2] == pytest.approx(0.5) and got[3][2] == pytest.approx(0.75)


def test_tensorboard_reads_our_files_when_installed(tmp_path) -> None:
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with ScalarWriter(tmp_path) as w:
        w.add_scalar("x", 3.0, 5)
    acc = tb.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(5, 3.0)]
