"""The processes of an ``mlx.launch`` run (ring or MPI backend), or just this one.

A sweep splits its cells across ranks and gathers their results as JSON on rank 0. The
collectives run on the CPU stream: MLX's ring and MPI backends communicate from there.
"""

import json

import mlx.core as mx


class Ranks:
    def __init__(self):
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1

    def gather(self, data) -> list:
        """Every rank's ``data`` (anything JSON can hold), in rank order, on every rank."""
        if self.size == 1:
            return [data]
        payload = json.dumps(data).encode()
        lengths = mx.distributed.all_gather(mx.array([len(payload)], dtype=mx.int32), group=self.group, stream=mx.cpu)
        longest = max(lengths.tolist())
        padded = mx.array(list(payload) + [0] * (longest - len(payload)), dtype=mx.uint8)
        gathered = mx.distributed.all_gather(padded, group=self.group, stream=mx.cpu).reshape(self.size, longest)
        rows = [bytes(row[:n]) for row, n in zip(gathered.tolist(), lengths.tolist())]
        return [json.loads(r) for r in rows]

    def from_rank0(self, data):
        """Rank 0's ``data`` on every rank."""
        return self.gather(data)[0]
