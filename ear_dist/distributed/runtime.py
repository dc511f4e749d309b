"""Process groups and roles of one job.

Every rank is a student unless the teacher placement is ``dedicated``, in which case
the first ``dist.teacher_ranks`` global ranks serve the teacher and the rest train.
Students form the data-parallel group; windows and their threshold masks are computed
per rank on its own pairs and never cross ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ear_dist.config import Config, ConfigError
from ear_dist.distributed.finish import prepare_finish


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    role: str = "student"  # student | teacher
    student_ranks: list[int] = field(default_factory=lambda: [0])
    teacher_ranks: list[int] = field(default_factory=list)
    student_group: Optional[object] = None  # None = the default group (or no distribution)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_world(self) -> int:
        return len(self.student_ranks)

    @property
    def dp_rank(self) -> int:
        return self.student_ranks.index(self.rank) if self.role == "student" else -1

    @property
    def is_main(self) -> bool:
        """The student rank that writes deltas, metrics and summaries."""
        return self.rank == self.student_ranks[0]

    def teacher_of(self, student_rank: int) -> int:
        """The teacher rank that serves a student rank (dedicated placement)."""
        return self.teacher_ranks[self.student_ranks.index(student_rank) % len(self.teacher_ranks)]

    def data_slices(self) -> list[int]:
        """The students (by data-parallel index) whose pairs this rank reads: its own, or those a teacher serves."""
        if self.role == "teacher":
            return [i for i, s in enumerate(self.student_ranks) if self.teacher_of(s) == self.rank]
        return [self.dp_rank]


def init_runtime(cfg: Config) -> Runtime:
    """Discover the launcher, join the process group (if several ranks) and assign roles."""
    from ear_dist.launch import discover, export_env, init_process_group

    env = discover()
    if env.world_size <= 1:
        if cfg.dist.teacher_placement == "dedicated":
            raise ConfigError("dist.teacher_placement: dedicated needs at least 2 ranks (a teacher and a student)")
        device = _device(cfg, 0)
        if cfg.dist.deepspeed_config != "none" and not dist.is_initialized():
            # DeepSpeed needs a process group even alone (ZeRO offload on one GPU): one rank, no network
            backend = "nccl" if device.type == "cuda" else "gloo"
            export_env(env)  # RANK, LOCAL_RANK, ...: DeepSpeed reads them
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return Runtime(device=device)
    export_env(env)
    if not dist.is_initialized():
        init_process_group(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    prepare_finish(cfg.dist.timeout_s)
    world = list(range(env.world_size))
    teachers: list[int] = []
    if cfg.dist.teacher_placement == "dedicated":
        n = cfg.dist.teacher_ranks
        if not 1 <= n < env.world_size:
            raise ConfigError(f"dist.teacher_ranks: {n} with {env.world_size} ranks; need 1 <= teacher_ranks < ranks")
        teachers = world[:n]
    students = [r for r in world if r not in teachers]
    group = dist.new_group(students) if teachers else None  # collective: every rank creates it
    role = "teacher" if env.rank in teachers else "student"
    return Runtime(env.rank, env.world_size, env.local_rank, role, students, teachers, group,
                   _device(cfg, env.local_rank))


def _device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.model.device == "auto":
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(cfg.model.device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank)
    return dev


class StudentMPU:
    """The model-parallel-unit DeepSpeed asks for: data parallel over the student ranks, no model parallel.

    Used only when some ranks are teachers, so that DeepSpeed's gradient reductions
    include students alone. Group creation is collective: every rank builds one.
    """

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self._self_groups = {r: dist.new_group([r]) for r in range(runtime.world_size)}

    def get_data_parallel_group(self):
        return self.rt.student_group

    def get_data_parallel_world_size(self):
        return self.rt.dp_world

    def get_data_parallel_rank(self):
        return self.rt.dp_rank

    def get_data_parallel_group_ranks(self):
        return list(self.rt.student_ranks)

    def get_model_parallel_group(self):
        return self._self_groups[self.rt.rank]

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.rt.rank
