"""looper.train.distributed without a launcher: the batch split arithmetic and single-process no-ops.

The two-process runs themselves are in tests/test_multiprocess.py (slow)."""

from __future__ import annotations

import pytest

from looper.errors import LooperError
from looper.train import distributed


@pytest.mark.parametrize(
    ("per_device", "accumulation", "world", "split"),
    [
        (2, 2, 2, (2, 1)),  # accumulation halves: per-device memory unchanged
        (2, 4, 4, (2, 1)),
        (2, 1, 2, (1, 1)),  # nothing to accumulate: the per-device batch halves
        (4, 3, 2, (3, 2)),  # 12 / 2 = 6 per process: the largest per-device batch <= 4 dividing 6
        (5, 1, 1, (5, 1)),  # one process: as configured
    ],
)
def test_split_batch_keeps_the_global_batch(per_device, accumulation, world, split):
    assert distributed.split_batch(per_device, accumulation, world) == split
    assert split[0] * split[1] * world == per_device * accumulation


def test_split_batch_refuses_a_global_batch_the_world_does_not_divide():
    with pytest.raises(LooperError, match="3 x 1 = 3 does not split over 2 processes"):
        distributed.split_batch(3, 1, 2)


def test_single_process_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init()
    distributed.barrier()
    assert not distributed.launched()
    assert (distributed.world_size(), distributed.is_main()) == (1, True)
    assert distributed.on_main(lambda: "committed") == "committed"
    assert distributed.split_batch(4, 2) == (4, 2)
