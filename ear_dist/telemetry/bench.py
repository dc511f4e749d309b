"""Benchmark of the erasure step: time per phase, image tokens/s, MFU, memory, NVML.

The step itself (``ear_dist.train.step.ErasureStep``) is not changed for the
benchmark; it is observed from outside:

* the teacher engine is wrapped, so rollouts and targets are timed as
  ``teacher_rollout`` / ``teacher_targets``;
* forward hooks on the student's language model and image head time
  ``student_fwd_bwd`` (forward) and record each forward's rows and length, for
  the FLOPs;
* the updater is wrapped: ``backward`` adds to ``student_fwd_bwd``,
  ``step``/``zero_grad`` are ``optimizer``;
* ``loss`` is the time from the end of a student forward to the next thing the
  student does (backward, another forward, the optimizer, or the step's end):
  the per-token loss, the window sums and the threshold mask;
* building the batch is ``data_wait``.

FLOPs per phase use :mod:`ear_dist.telemetry.flops`: rollouts ``2N`` per
generated token on every row (CFG doubles the rows) plus the prompt prefill,
teacher targets ``2N + 4Lhs`` per token of every row, and the student ``6N +
12Lhs`` per token of every forward that a backward followed (``2N + 4Lhs`` for
forwards whose windows were all masked). Because erasure trains a few layers,
the student's MFU is also given from the FLOPs the partial backward really does.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ear_dist.config import Config
from ear_dist.models.janus import JanusBundle, load_janus
from ear_dist.teacher.engine import ColocatedTeacher, TeacherEngine, TeacherTargets
from ear_dist.telemetry.flops import (
    JanusFlopsShape,
    executed_train_flops_per_token,
    frozen_forward_flops_per_token,
    janus_flops_shape,
    mfu,
    peak_flops,
    rollout_flops,
    train_flops_per_token,
)
from ear_dist.telemetry.memory import MemoryStats, peak_memory, reset_peak_memory
from ear_dist.telemetry.nvml import NvmlMonitor, NvmlStepStats
from ear_dist.telemetry.report import device_line, phase_rows, phase_table, resource_lines
from ear_dist.telemetry.timer import (
    DATA_WAIT,
    LOSS,
    OPTIMIZER,
    STUDENT_FWD_BWD,
    TEACHER_ROLLOUT,
    TEACHER_TARGETS,
    PhaseTimers,
    StepTiming,
    mean_timing,
)
from ear_dist.telemetry.writer import MetricsWriter
from ear_dist.train.step import ErasureStep, PairBatch, Updater
from ear_dist.train.student import make_student
from ear_dist.train.trainer import build_optimizer
from ear_dist.train.trainable import LLM_LAYER, select_trainable_names

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


class PhaseSwitch:
    """Holds at most one open phase opened from a hook, and closes it on the next switch."""

    def __init__(self, timers: PhaseTimers):
        self.timers = timers
        self._open = None

    def switch(self, phase: Optional[str]) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        if phase is not None:
            self._open = self.timers.phase(phase)
            self._open.__enter__()


@dataclass
class StepCounts:
    """Tokens and FLOPs per phase in one step, filled by the instrumentation."""

    flops: dict = field(default_factory=dict)
    executed_flops: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)

    def scaled(self, factor: float) -> "StepCounts":
        return StepCounts(
            {k: v * factor for k, v in self.flops.items()},
            {k: v * factor for k, v in self.executed_flops.items()},
            {k: v * factor for k, v in self.tokens.items()},
        )

    def merge(self, other: "StepCounts") -> None:
        for phase, flops in other.flops.items():
            self.add(phase, flops, other.tokens.get(phase, 0), other.executed_flops[phase])

    def add(self, phase: str, flops: float, tokens: float = 0, executed: Optional[float] = None) -> None:
        self.flops[phase] = self.flops.get(phase, 0) + flops
        self.executed_flops[phase] = self.executed_flops.get(phase, 0) + (flops if executed is None else executed)
        if tokens:
            self.tokens[phase] = self.tokens.get(phase, 0) + tokens


class TimedTeacher(TeacherEngine):
    """A teacher engine whose rollouts and targets are timed and counted."""

    def __init__(self, inner: TeacherEngine, bundle: JanusBundle, timers: PhaseTimers, shape: JanusFlopsShape,
                 cfg_weight: float):
        self.inner, self.bundle, self.timers, self.shape, self.cfg_weight = inner, bundle, timers, shape, cfg_weight
        self.counts = StepCounts()

    def rollout(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        with self.timers.phase(TEACHER_ROLLOUT):
            tokens = self.inner.rollout(prompts, seeds)
        prompt_len = self.bundle.encode_prompts(list(prompts))[0].shape[1]
        b, t = tokens.shape
        flops = rollout_flops(self.shape, prompt_len, t, batch_size=b, cfg=self.cfg_weight != 1.0)
        self.counts.add(TEACHER_ROLLOUT, flops, tokens=b * t)
        return tokens

    def targets(self, target_prompts, surrogate_prompts, tokens, mode, with_uncond=False) -> TeacherTargets:
        with self.timers.phase(TEACHER_TARGETS):
            out = self.inner.targets(target_prompts, surrogate_prompts, tokens, mode, with_uncond)
        prompt_len = self.bundle.encode_prompts(list(target_prompts) + list(surrogate_prompts))[0].shape[1]
        b, t = tokens.shape
        rows = (3 if with_uncond else 2) * b
        seq_len = prompt_len + t - 1  # teacher_forced: the prompt, then image tokens 0..T-2
        flops = rows * seq_len * frozen_forward_flops_per_token(self.shape, seq_len)
        self.counts.add(TEACHER_TARGETS, flops, tokens=b * t)
        return out


class StudentInstruments:
    """Forward hooks and an updater wrapper that time and count the student's work."""

    def __init__(self, student: torch.nn.Module, timers: PhaseTimers, shape: JanusFlopsShape,
                 trainable_params: int, lowest_trainable_layer: int):
        self.switch = PhaseSwitch(timers)
        self.shape = shape
        self.trainable_params = trainable_params
        self.lowest_trainable_layer = lowest_trainable_layer
        self.counts = StepCounts()
        self._pending: list[tuple[int, int]] = []  # (rows, seq_len) of forwards not yet backpropagated
        lm = student.model.language_model
        head = student.model.generation_head
        self._handles = [
            lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            lm.register_forward_hook(self._after_forward),
            head.register_forward_pre_hook(lambda m, a: self.switch.switch(STUDENT_FWD_BWD)),
            head.register_forward_hook(self._after_forward),
        ]

    def _lm_pre(self, module, args, kwargs):
        self.settle_forwards(backward=False)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and args:
            embeds = args[0]
        if embeds is not None:
            self._pending.append((int(embeds.shape[0]), int(embeds.shape[1])))
        self.switch.switch(STUDENT_FWD_BWD)

    def _after_forward(self, module, args, output):
        self.switch.switch(LOSS)

    def settle_forwards(self, backward: bool) -> None:
        """Count the pending forwards: with backward FLOPs if a backward followed them."""
        s = self.shape
        for rows, seq_len in self._pending:
            tokens = rows * seq_len
            if backward:
                flops = tokens * train_flops_per_token(s, seq_len)
                executed = tokens * executed_train_flops_per_token(
                    s, seq_len, self.trainable_params, self.lowest_trainable_layer
                )
            else:
                flops = executed = tokens * frozen_forward_flops_per_token(s, seq_len)
            self.counts.add(STUDENT_FWD_BWD, flops, executed=executed)
        self._pending = []

    def end_step(self) -> StepCounts:
        self.switch.switch(None)
        self.settle_forwards(backward=False)
        counts, self.counts = self.counts, StepCounts()
        return counts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class TimedUpdater(Updater):
    """The plain updater with backward under ``student_fwd_bwd`` and the step under ``optimizer``."""

    def __init__(self, inner: Updater, instruments: StudentInstruments):
        self.inner, self.instruments = inner, instruments
        self.optimizer = inner.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.instruments.settle_forwards(backward=True)
        self.instruments.switch.switch(STUDENT_FWD_BWD)
        self.inner.backward(loss)
        self.instruments.switch.switch(None)

    def step(self) -> None:
        self.instruments.switch.switch(OPTIMIZER)
        self.inner.step()
        self.instruments.switch.switch(None)

    def zero_grad(self) -> None:
        self.instruments.switch.switch(OPTIMIZER)
        self.inner.zero_grad()
        self.instruments.switch.switch(None)


class SyntheticPromptBundle(JanusBundle):
    """A bundle for shape-only presets (no tokenizer): each prompt becomes fixed-length random ids.

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


def bench_pairs(concept: str, n: int, step: int) -> PairBatch:
    """``n`` prompt pairs for one benchmark step, from the built-in templates."""
    targets, surrogates = [], []
    for i in range(n):
        template = PAIR_TEMPLATES[(step * n + i) % len(PAIR_TEMPLATES)]
        targets.append(template.format(concept))
        surrogates.append(template.format(SURROGATE_WORD))
    return PairBatch(targets, surrogates, [concept] * n, seeds=[step * n + i for i in range(n)])


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
        lines.append(f"TensorBoard and metrics.jsonl: {self.log_dir}")
        return "\n".join(lines)


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
                      echo=print) -> BenchResult:
    """Run ``warmup + steps`` erasure steps on ``cfg.model.path``; return the mean over the last ``steps``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    bundle = load_janus(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    if bundle.tokenizer is None:
        fields = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(JanusBundle)}
        bundle = SyntheticPromptBundle(**fields)
        bundle.prompt_len = prompt_len
        echo(f"{cfg.model.path}: no tokenizer, prompts are {prompt_len} random token ids")
    device = bundle.device
    dtype = next(bundle.model.parameters()).dtype
    erase = cfg.erase
    t = bundle.num_image_tokens
    if erase.window_len > t:
        echo(f"erase.window_len {erase.window_len} > the {t} image tokens of {cfg.model.path}: using {t}")
        erase = dataclasses.replace(erase, window_len=t)

    shape = janus_flops_shape(bundle.model.config)
    timers = PhaseTimers(device)
    r = cfg.rollout
    teacher = TimedTeacher(ColocatedTeacher(bundle, r.cfg_weight, r.temperature, r.top_k, r.greedy), bundle, timers,
                           shape, r.cfg_weight)
    trainable_cfg = cfg.trainable
    n_layers = shape.num_layers
    if not trainable_cfg.patterns and trainable_cfg.first_k_layers > n_layers:
        echo(f"trainable.first_k_layers {trainable_cfg.first_k_layers} > the {n_layers} layers of "
             f"{cfg.model.path}: using {n_layers}")
        trainable_cfg = dataclasses.replace(trainable_cfg, first_k_layers=n_layers)
    trainable = select_trainable_names(bundle.model, trainable_cfg)
    student = make_student(bundle.model, trainable)
    params = dict(student.named_parameters())
    trainable_params = sum(params[n].numel() for n in trainable)
    layers = [int(m.group(1)) for n in trainable if (m := LLM_LAYER.match(n))]
    # a trainable tensor outside the decoder layers (patterns) needs gradients down to layer 0
    lowest = min(layers) if len(layers) == len(trainable) else 0
    optimizer = build_optimizer(student.parameters(), cfg.optim)
    instruments = StudentInstruments(student, timers, shape, trainable_params, lowest)
    updater = TimedUpdater(Updater(optimizer), instruments)
    step_fn = ErasureStep(student, bundle, teacher, erase, updater,
                          generator=torch.Generator().manual_seed(cfg.train.seed))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, dtype)
    monitor = NvmlMonitor(interval_s=0.05)
    pairs = cfg.train.pairs_per_step
    measured: list[StepTiming] = []
    counts_sum = StepCounts()
    memory: Optional[MemoryStats] = None  # the highest peak over the measured steps
    nvml_stats = NvmlStepStats()
    try:
        with MetricsWriter(log_dir, reductions=BENCH_REDUCTIONS) as writer:
            for i in range(warmup + steps):
                reset_peak_memory(device)
                monitor.begin_step()
                timers.start_step()
                with timers.phase(DATA_WAIT):
                    batch = bench_pairs(erase.concept, pairs, i)
                result = step_fn(batch)
                student_counts = instruments.end_step()
                timing = timers.end_step()
                nvml_stats = monitor.end_step()
                step_memory = peak_memory(device)
                counts = StepCounts()
                counts.merge(teacher.counts)
                counts.merge(student_counts)
                teacher.counts = StepCounts()
                # a student phase handles the step's image tokens once, however many forwards it took
                counts.tokens[STUDENT_FWD_BWD] = result.image_tokens
                writer.write(i, _step_metrics(timing, counts, result.image_tokens, pairs, peak, step_memory,
                                              nvml_stats, result.loss))
                tag = "warm-up" if i < warmup else "step"
                echo(f"{tag} {i}: {timing.step_s * 1e3:.1f} ms, loss {result.loss:.4g}, "
                     f"windows kept {result.windows_kept}/{result.windows_total}")
                if i >= warmup:
                    measured.append(timing)
                    counts_sum.merge(counts)
                    if memory is None or step_memory.peak_bytes > memory.peak_bytes:
                        memory = step_memory
    finally:
        instruments.remove()
        monitor.close()
    return BenchResult(
        timing=mean_timing(measured), counts=counts_sum.scaled(1.0 / steps),
        image_tokens_per_step=pairs * t, pairs_per_step=pairs,
        device_name=device_name, dtype=dtype, peak=peak, memory=memory, nvml=nvml_stats,
        nvml_unavailable_reason=monitor.unavailable_reason, log_dir=Path(log_dir),
    )
