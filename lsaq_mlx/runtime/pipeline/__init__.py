"""One rank's stage of a model pipelined over ``mlx.launch`` ranks (a ``PipelinePlan``).

Every rank builds the whole mlx-lm model lazily and keeps only what its share holds: the
layers of other ranks become parameterless stand-ins, so nothing of theirs is read and
module paths (plans, swaps) stay the model's own, and any architecture's forward runs
unchanged. The stand-in just before a rank's first layer receives the activations from
the rank before (``mx.distributed.recv_like``); the one just after its last layer sends
them on (``mx.distributed.send``). The last rank's logits of the last position reach
every rank by ``all_sum`` (the others add zeros), so all ranks sample the same token.
A send is tied into the cache of the rank's last layer (as mlx-lm's pipelined models
do), so evaluating the cache during a prefill sends too.
"""

from lsaq_mlx.runtime.pipeline.guard import StallGuard
from lsaq_mlx.runtime.pipeline.run import PlannedRun, check_rank_memory, load_planned, read_plan_file, rank_control
from lsaq_mlx.runtime.pipeline.stage import PipelineStage, RankAdaptation, bytes_between_ranks
from lsaq_mlx.runtime.pipeline.stand_ins import keep_share, rank_plan

__all__ = ["PipelineStage", "PlannedRun", "RankAdaptation", "StallGuard", "bytes_between_ranks", "check_rank_memory",
           "keep_share", "load_planned", "rank_control", "rank_plan", "read_plan_file"]
