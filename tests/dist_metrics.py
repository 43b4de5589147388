"""Run under torchrun by tests/test_distributed_heads.py: a step's metrics over 2 ranks
(`minitune.distributed.metrics_over_ranks`, `std_over_ranks`) are the whole job's, and ranks that log
different names get an error on every rank instead of mixed-up figures.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_metrics.py"""
import math

import torch

from minitune.distributed import cleanup, init_distributed, metrics_over_ranks, std_over_ranks
from minitune.errors import MinituneError

info = init_distributed(torch.device("cpu"))
assert info.world_size == 2
r = info.rank
# rank 0 measured no loss this step (NaN); the ranks' times and row counts differ
stats = {"score_mean": [0.5, 0.25][r], "loss": [float("nan"), 2.0][r], "rows": [4, 6][r], "gen_s": [3.0, 5.0][r],
         "never": float("nan")}
got = metrics_over_ranks(stats, info.device, summed=("rows",), largest=("gen_s",))
assert got["score_mean"] == 0.375 and got["loss"] == 2.0 and got["rows"] == 10 and got["gen_s"] == 5.0, got
assert math.isnan(got["never"]), got
assert metrics_over_ranks(dict(reversed(list(stats.items()))), info.device, summed=("rows",),
                          largest=("gen_s",)).keys() == got.keys()  # the order keys come in does not matter
scores = torch.tensor([[0.0, 1, 2, 3], [0.0, 0, 0, 0]][r])
std = std_over_ranks(scores)
assert abs(std - torch.tensor([0.0, 1, 2, 3, 0, 0, 0, 0]).std().item()) < 1e-6, std
try:
    metrics_over_ranks({"a": 1.0} if r == 0 else {"b": 1.0}, info.device)
    raise AssertionError("different names on the ranks were not refused")
except MinituneError as e:
    assert "different metrics" in str(e), e
print(f"rank {r}: metrics over ranks ok")
cleanup()
