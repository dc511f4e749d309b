"""``ear-dist bench``: the erasure job's own parts, timed per phase; tokens/s, MFU, memory, NVML.

The job is the trainer's own (``ear_dist.train.job.build_job``: model loader, teacher
placement, trainable selection, preserving parts, student and updater, step) observed from outside by :mod:`ear_dist.bench.instruments`; building the
batch is ``data_wait``: the training pair stream of ``data.pairs`` when it is set (a shard
directory streams, as in a run), else built-in template pairs. It runs in one process or on every rank of a launched job
(torchrun, srun, mpirun): the ZeRO stage and teacher placement come from the config,
all ranks walk the same stream of global batches, every student rank measures its own
figures, and :mod:`ear_dist.bench.scaling` reduces them across ranks (mean, min, max),
with the time inside DeepSpeed's collectives as the communication share and, given the
same bench's one-rank ``bench.json``, the scaling efficiency.
"""

from __future__ import annotations

import dataclasses
import datetime
import shlex
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ear_dist.bench.instruments import StepCounts, StudentInstruments, TimedTeacher, TimedUpdater
from ear_dist.bench.scaling import BENCH_JSON, rank_spread, scaling_efficiency, spread_table
from ear_dist.config import Config
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import PairBatch, PairStream
from ear_dist.models.family import JanusModel
from ear_dist.models.janus import JanusBundle
from ear_dist.telemetry.flops import janus_flops_shape, mfu, peak_flops
from ear_dist.telemetry.memory import MemoryStats, peak_memory, reset_peak_memory
from ear_dist.telemetry.nvml import NvmlMonitor, NvmlStepStats
from ear_dist.telemetry.report import device_line, phase_rows, phase_table, resource_lines
from ear_dist.telemetry.timer import DATA_WAIT, STUDENT_FWD_BWD, PhaseTimers, StepTiming, mean_timing
from ear_dist.telemetry.writer import MetricsWriter, write_json
from ear_dist.train.job import build_job, check_launch, load_job_model, open_stream
from ear_dist.train.trainable import LLM_LAYER

# How each metric is combined over ranks when the benchmark runs distributed.
BENCH_REDUCTIONS = {
    "time/*": "max",  # the slowest rank sets the pace
    "throughput/*": "sum",
    "mfu/*": "mean",
    "memory/*": "max",
    "nvml/energy_j": "sum",
    "nvml/power_w_*": "mean",
}

# Built-in prompt templates: the words are in the tiny tokenizer's vocabulary.
PAIR_TEMPLATES = [
    "a photo of a {}",
    "a painting of an old {} in a snowy field",
    "a {} near a lake at sunset",
    "a small {} on a hill in the morning",
]
SURROGATE_WORD = "house"


class SyntheticPromptBundle(JanusModel):
    """A bundle for shape-only presets (no tokenizer): each prompt becomes fixed-length random ids.

    A ``JanusModel`` (the family interface), so the teacher and the step use it as it is
    rather than wrapping the plain bundle back.

    The ids are seeded by the prompt text, start with BOS and end with begin-of-image,
    so the FLOPs and timings are those of real prompts of ``prompt_len`` tokens.
    """

    prompt_len: int = 24

    def encode_prompts(self, prompts):
        fmt = self.prompt_format
        vocab = self.model.config.text_config.vocab_size
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            ids = torch.randint(10, min(vocab, 30000), (self.prompt_len,), generator=g)
            ids[0], ids[-1] = fmt.bos_token_id, fmt.boi_token_id
            rows.append(ids)
        ids = torch.stack(rows).to(self.device)
        return ids, torch.ones_like(ids)


def with_prompt_ids(bundle: JanusBundle, prompt_len: int = 24) -> JanusBundle:
    """The bundle itself when it has a tokenizer; else one whose prompts become ``prompt_len`` random ids."""
    if bundle.tokenizer is not None:
        return bundle
    fields = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(JanusBundle)}
    out = SyntheticPromptBundle(**fields)
    out.prompt_len = prompt_len
    return out


def bench_pairs(concept: str, n: int, step: int) -> PairBatch:
    """``n`` prompt pairs for one benchmark step, from the built-in templates."""
    targets, surrogates = [], []
    for i in range(n):
        template = PAIR_TEMPLATES[(step * n + i) % len(PAIR_TEMPLATES)]
        targets.append(template.format(concept))
        surrogates.append(template.format(SURROGATE_WORD))
    return PairBatch(targets, surrogates, [concept] * n, seeds=[step * n + i for i in range(n)])


def bench_stream(concept: str, pairs_per_step: int, steps: int) -> PairStream:
    """The benchmark's global batches, the same on every rank: step i holds ``bench_pairs(concept, n, i)``."""
    pairs = []
    for step in range(steps):
        batch = bench_pairs(concept, pairs_per_step, step)
        pairs += [PromptPair(t, s, c, seed=seed) for t, s, c, seed in
                  zip(batch.target_prompts, batch.surrogate_prompts, batch.concepts, batch.seeds)]
    return PairStream(pairs, pairs_per_step, shuffle=False)


@dataclass
class BenchResult:
    timing: StepTiming  # mean over the measured steps
    counts: StepCounts  # per step, mean of the measured steps
    image_tokens_per_step: int
    pairs_per_step: int
    device_name: str
    dtype: torch.dtype
    peak: Optional[float]
    memory: MemoryStats  # the highest peak over the measured steps
    nvml: NvmlStepStats  # the last measured step
    nvml_unavailable_reason: Optional[str]
    log_dir: Path
    ranks: int = 1  # every rank of the job (teacher ranks included): the GPUs it holds
    student_ranks: int = 1
    is_main: bool = True  # the student rank that prints and writes bench.json
    comm_s: Optional[float] = None  # per step, inside DeepSpeed's collectives (None: not counted)
    spread: dict = field(default_factory=dict)  # figure -> Spread over the student ranks
    baseline: Optional[dict] = None  # the one-rank bench.json scaled against

    @property
    def global_tokens_per_s(self) -> float:
        """Image tokens all student ranks train per step over the slowest rank's step time."""
        slowest = self.spread["step_ms"].max / 1e3 if self.spread.get("step_ms") else self.timing.step_s
        return self.image_tokens_per_step * self.student_ranks / slowest

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.global_tokens_per_s / self.ranks

    @property
    def scaling_efficiency(self) -> Optional[float]:
        return scaling_efficiency(self.tokens_per_s_per_gpu, self.baseline) if self.baseline else None

    def student_mfu(self, executed: bool = False) -> Optional[float]:
        flops = (self.counts.executed_flops if executed else self.counts.flops).get(STUDENT_FWD_BWD)
        seconds = self.timing.phases.get(STUDENT_FWD_BWD)
        if not flops or not seconds:
            return None
        return mfu(flops / seconds, self.peak)

    def table(self) -> str:
        rows = phase_rows(self.timing, self.counts.tokens, self.counts.flops)
        return phase_table(
            rows, step_seconds=self.timing.step_s, step_tokens=self.image_tokens_per_step, peak_flops=self.peak,
            title=f"erasure step, mean of the measured steps ({self.pairs_per_step} pair(s)/step)",
            tokens_label="image tokens/s",
        )

    def summary(self) -> str:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        lines = [device_line(self.device_name, self.dtype, self.peak), self.table()]
        lines.append(f"prompt pairs/s: {self.pairs_per_step / self.timing.step_s:,.3f}")
        student_s = self.timing.phases.get(STUDENT_FWD_BWD)
        if student_s:
            lines.append(
                f"student achieved: {self.counts.flops.get(STUDENT_FWD_BWD, 0) / student_s / 1e12:,.4f} TFLOP/s "
                f"(6N convention), {self.counts.executed_flops.get(STUDENT_FWD_BWD, 0) / student_s / 1e12:,.4f} "
                f"TFLOP/s executed"
            )
        lines.append(
            f"student MFU: {pct(self.student_mfu())} (6N convention), "
            f"{pct(self.student_mfu(executed=True))} (FLOPs the partial backward executes)"
        )
        lines += resource_lines(self.memory, self.nvml, self.nvml_unavailable_reason)
        if self.ranks > 1:
            lines.append(spread_table(self.spread, self.student_ranks, RANK_FIGURES))
            comm = self.spread.get("comm_share")
            lines.append("communication: n/a (no DeepSpeed collectives to time)" if comm is None else
                         f"communication: {pct(comm.mean)} of the step on average ({pct(comm.min)} - "
                         f"{pct(comm.max)} over the ranks): time inside DeepSpeed's collectives, waits for slower "
                         "ranks included, timed by its comms logger (which synchronises around each one)")
        lines.append(f"throughput: {self.global_tokens_per_s:,.1f} image tokens/s over {self.ranks} rank(s), "
                     f"{self.tokens_per_s_per_gpu:,.1f} per GPU")
        if self.baseline:
            lines.append(f"scaling efficiency: {pct(self.scaling_efficiency)} of the one-rank bench "
                         f"({self.baseline['image_tokens_per_s_per_gpu']:,.1f} image tokens/s)")
        lines.append(f"TensorBoard, metrics.jsonl and {BENCH_JSON}: {self.log_dir}")
        return "\n".join(lines)

    def as_json(self, command: str) -> dict:
        """What ``bench.json`` holds: the settings, the per-rank spread and the job's throughput."""
        return {
            "command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": self.device_name, "dtype": str(self.dtype).replace("torch.", ""), "ranks": self.ranks,
            "student_ranks": self.student_ranks, "pairs_per_step_per_rank": self.pairs_per_step,
            "image_tokens_per_s": self.global_tokens_per_s, "image_tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "student_mfu": self.student_mfu(), "student_mfu_executed": self.student_mfu(executed=True),
            "per_rank": {k: v.as_dict() if v is not None else None for k, v in self.spread.items()},
            "scaling_efficiency": self.scaling_efficiency,
        }


# the figures every student rank reports, and how the spread table prints them
RANK_FIGURES = {
    "step_ms": ",.1f", "image_tokens_per_s": ",.1f", "pairs_per_s": ",.3f", "student_mfu": ".3f",
    "student_mfu_executed": ".3f", "comm_ms": ",.1f", "comm_share": ".3f", "peak_memory_gib": ",.2f",
    "power_w": ",.0f", "energy_j_per_step": ",.1f",
}


def _rank_figures(result: BenchResult) -> dict:
    """This rank's figures for the cross-rank spread."""
    step_s = result.timing.step_s
    return {
        "step_ms": step_s * 1e3,
        "image_tokens_per_s": result.image_tokens_per_step / step_s,
        "pairs_per_s": result.pairs_per_step / step_s,
        "student_mfu": result.student_mfu(),
        "student_mfu_executed": result.student_mfu(executed=True),
        "comm_ms": None if result.comm_s is None else result.comm_s * 1e3,
        "comm_share": None if result.comm_s is None else result.comm_s / step_s,
        "peak_memory_gib": result.memory.peak_gib,
        "power_w": result.nvml.power_w_mean,
        "energy_j_per_step": result.nvml.energy_j,
    }


def _step_metrics(timing: StepTiming, counts: StepCounts, image_tokens: int, pairs: int, peak: Optional[float],
                  memory: MemoryStats, nvml: NvmlStepStats, loss: float) -> dict:
    metrics = {"loss": loss, **timing.as_metrics(), **memory.as_metrics(), **nvml.as_metrics()}
    metrics["throughput/image_tokens_per_s"] = image_tokens / timing.step_s
    metrics["throughput/pairs_per_s"] = pairs / timing.step_s
    for phase, flops in counts.flops.items():
        seconds = timing.phases.get(phase)
        metrics[f"mfu/{phase}"] = mfu(flops / seconds, peak) if seconds else None
    student_s = timing.phases.get(STUDENT_FWD_BWD)
    executed = counts.executed_flops.get(STUDENT_FWD_BWD)
    metrics["mfu/student_executed"] = mfu(executed / student_s, peak) if student_s and executed else None
    return metrics


def run_erasure_bench(cfg: Config, steps: int, warmup: int, log_dir, prompt_len: int = 24,
                      echo=print, baseline: Optional[dict] = None,
                      bundle: Optional[JanusBundle] = None) -> Optional[BenchResult]:
    """Run ``warmup + steps`` erasure steps on ``cfg.model.path``; return the mean over the last ``steps``.

    On several ranks every rank calls this; student ranks return their result (with the
    spread over all student ranks), teacher ranks of the dedicated placement serve the
    students and return None. ``baseline``: the same bench's one-rank ``bench.json``.
    ``bundle``: an already built model to use instead of loading ``cfg.model.path``.
    """
    if steps < 1 or warmup < 0:
        from ear_dist.errors import InputError

        raise InputError(f"bench: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    from ear_dist.distributed.runtime import init_runtime
    from ear_dist.launch import discover

    if cfg.dist.teacher_placement == "dedicated" and discover().world_size <= 1:
        echo("one rank: dist.teacher_placement=dedicated runs as colocated (a single rank holds its own teacher)")
        cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, teacher_placement="colocated"))
    rt = init_runtime(cfg)
    if not rt.is_main:
        echo = _silent
    torch.manual_seed(cfg.train.seed)  # as the trainer: the same draws build the same parts
    if bundle is None:
        bundle = load_job_model(cfg.model, rt)
    if isinstance(bundle, JanusBundle) and bundle.tokenizer is None:
        bundle = with_prompt_ids(bundle, prompt_len)
        echo(f"{cfg.model.path}: no tokenizer, prompts are {prompt_len} random token ids")
    device = bundle.device
    dtype = next(bundle.model.parameters()).dtype
    cfg = _fit_to_model(cfg, bundle, echo)
    check_launch(cfg.train, rt)
    count_comms = rt.dp_world > 1 and cfg.dist.deepspeed_config != "none"
    if count_comms:  # the communication share comes from DeepSpeed's comms logger
        cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, log_comms=True))
    t = bundle.num_image_tokens
    if cfg.data.pairs:  # the run's own pair stream (a shard directory streams, as in training)
        stream, _ = open_stream(cfg, rt, bundle)
    else:
        stream = bench_stream(cfg.erase.concept, cfg.train.pairs_per_step, warmup + steps)

    # the trainer's job, observed from outside: its teacher and updater wrapped in timers
    job = build_job(cfg, rt, bundle, stream, teacher_steps=warmup + steps)
    if job.serves_teacher:
        job.teacher.serve(stream, 0)
        return None
    shape = janus_flops_shape(bundle.model.config)
    timers = PhaseTimers(device)
    teacher = TimedTeacher(job.teacher, bundle, timers, shape)
    layers = [int(m.group(1)) for n in job.trainable if (m := LLM_LAYER.match(n))]
    # a trainable tensor outside the decoder layers (patterns) needs gradients down to layer 0
    lowest = min(layers) if len(layers) == len(job.trainable) else 0
    instruments = StudentInstruments(job.student.module, timers, shape, job.student.num_trainable, lowest)
    step_fn = job.make_step(teacher=teacher, updater=TimedUpdater(job.student.updater, instruments))
    comm_clock = _comm_clock(count_comms)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, dtype)
    monitor = NvmlMonitor(interval_s=0.05)
    pairs = cfg.train.pairs_per_step // rt.dp_world
    measured: list[StepTiming] = []
    counts_sum = StepCounts()
    memory: Optional[MemoryStats] = None  # the highest peak over the measured steps
    nvml_stats = NvmlStepStats()
    comm_total = 0.0
    try:
        with MetricsWriter(log_dir, reductions=BENCH_REDUCTIONS, group=rt.student_group) as writer:
            for i in range(warmup + steps):
                reset_peak_memory(device)
                monitor.begin_step()
                comm_start = comm_clock()
                timers.start_step()
                with timers.phase(DATA_WAIT):
                    batch = stream.next().local(rt.dp_rank, rt.dp_world, device)
                result = step_fn(batch)
                student_counts = instruments.end_step()
                timing = timers.end_step()
                nvml_stats = monitor.end_step()
                comm_s = comm_clock() - comm_start
                step_memory = peak_memory(device)
                counts = StepCounts()
                counts.merge(teacher.counts)
                counts.merge(student_counts)
                teacher.counts = StepCounts()
                # a student phase handles the step's image tokens once, however many forwards it took
                counts.tokens[STUDENT_FWD_BWD] = result.image_tokens
                metrics = _step_metrics(timing, counts, result.image_tokens, pairs, peak, step_memory, nvml_stats,
                                        result.loss)
                if count_comms:
                    metrics["time/comm_ms"] = comm_s * 1e3
                writer.write(i, metrics)
                tag = "warm-up" if i < warmup else "step"
                echo(f"{tag} {i}: {timing.step_s * 1e3:.1f} ms, loss {result.loss:.4g}, "
                     f"windows kept {result.windows_kept}/{result.windows_total}")
                if i >= warmup:
                    measured.append(timing)
                    counts_sum.merge(counts)
                    comm_total += comm_s
                    if memory is None or step_memory.peak_bytes > memory.peak_bytes:
                        memory = step_memory
    finally:
        instruments.remove()
        monitor.close()
        if hasattr(stream, "close"):
            stream.close()
    out = BenchResult(
        timing=mean_timing(measured), counts=counts_sum.scaled(1.0 / steps),
        image_tokens_per_step=pairs * t, pairs_per_step=pairs,
        device_name=device_name, dtype=dtype, peak=peak, memory=memory, nvml=nvml_stats,
        nvml_unavailable_reason=monitor.unavailable_reason, log_dir=Path(log_dir),
        ranks=rt.world_size, student_ranks=rt.dp_world, is_main=rt.is_main,
        comm_s=comm_total / steps if count_comms else None, baseline=baseline,
    )
    out.spread = rank_spread(_rank_figures(out), group=rt.student_group)
    if out.is_main:
        write_json(Path(log_dir) / BENCH_JSON, out.as_json(shlex.join(sys.argv)))  # the process's own command
    return out


def _silent(*_args) -> None:
    """The echo of ranks other than the main one: one rank prints the steps."""


def _comm_clock(enabled: bool):
    """Seconds inside DeepSpeed's collectives so far (a constant 0 when they are not counted)."""
    if not enabled:
        return lambda: 0.0
    from ear_dist.distributed.deepspeed_engine import comm_seconds

    return comm_seconds


def _fit_to_model(cfg: Config, bundle: JanusBundle, echo) -> Config:
    """The config with window length and trainable layers clamped to a small model (tiny presets)."""
    erase, trainable = cfg.erase, cfg.trainable
    t = bundle.num_image_tokens
    if erase.window_len > t:
        echo(f"erase.window_len {erase.window_len} > the {t} image tokens of {cfg.model.path}: using {t}")
        erase = dataclasses.replace(erase, window_len=t)
    n_layers = bundle.model.config.text_config.num_hidden_layers
    if not trainable.patterns and not trainable.layers and trainable.first_k_layers > n_layers:
        echo(f"trainable.first_k_layers {trainable.first_k_layers} > the {n_layers} layers of "
             f"{cfg.model.path}: using {n_layers}")
        trainable = dataclasses.replace(trainable, first_k_layers=n_layers)
    return dataclasses.replace(cfg, erase=erase, trainable=trainable)
