"""TensorBoard events of a run (torch.utils.tensorboard; the ``tensorboard`` extra)."""

from __future__ import annotations

import pytest

from sbm_transformer.training.metrics import MetricRecord, TensorBoardSink

events = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(logdir, tag: str) -> list[tuple[int, float]]:
    acc = events.EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def record(step: int, loss: float) -> MetricRecord:
    return MetricRecord(
        step=step, split="train", loss=loss, accuracy=0.5, density=0.25, lr=1e-3,
        per_layer_head=[[0.2, 0.3]],
    )  # fmt: skip


def test_records_become_scalars(tmp_path) -> None:
    sink = TensorBoardSink(tmp_path / "tb", resume_step=None)
    for step in (2, 4):
        sink.write(record(step, 1.0 / step))
    sink.close()
    assert scalars(tmp_path / "tb", "loss/train") == [(2, 0.5), (4, 0.25)]
    assert scalars(tmp_path / "tb", "density_train/layer0_head1") == [
        (2, pytest.approx(0.3)),
        (4, pytest.approx(0.3)),
    ]


def test_a_resumed_run_hides_the_steps_it_trains_again(tmp_path) -> None:
    sink = TensorBoardSink(tmp_path / "tb", resume_step=None)
    for step in (2, 4, 6):
        sink.write(record(step, 1.0))
    sink.close()
    sink = TensorBoardSink(tmp_path / "tb", resume_step=2)  # the checkpoint was at step 2
    for step in (4, 6):
        sink.write(record(step, 2.0))
    sink.close()
    assert scalars(tmp_path / "tb", "loss/train") == [(2, 1.0), (4, 2.0), (6, 2.0)]


def test_a_new_run_replaces_old_events(tmp_path) -> None:
    sink = TensorBoardSink(tmp_path / "tb", resume_step=None)
    sink.write(record(8, 1.0))
    sink.close()
    sink = TensorBoardSink(tmp_path / "tb", resume_step=None)
    sink.write(record(2, 3.0))
    sink.close()
    assert scalars(tmp_path / "tb", "loss/train") == [(2, 3.0)]
