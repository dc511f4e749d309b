"""What erasing N concepts costs, from a model's shape and a recipe: FLOPs, steps and memory of a joint run
and of N per-concept runs whose deltas are composed (sum, project, ties).

Counted with the conventions of ``ear_dist.telemetry.flops`` (2 FLOPs per multiply-add, the frozen
forward ``2 N + 4 L h s`` per token, the partly frozen training step as
:func:`~ear_dist.telemetry.flops.executed_train_flops_per_token`, CFG rollouts as
:func:`~ear_dist.telemetry.flops.rollout_flops`), following what the code does:

- **a step** (``ear_dist.train.step``, ``update_mode=window`` with ``window_prefix=recompute``): the teacher's
  hidden states on the target and the surrogate prompt (2 rows of ``P + T`` tokens per pair; the pair's tokens
  come from the filter stage); per window ``w`` the student forward and backward over the prefix
  ``P + (w + 1) W`` of each pair's row; with anchors' KL (``preserve.weight > 0``) every update also runs the
  student forward and backward on ``per_step`` anchors (cond and uncond rows of ``P + T`` tokens), and every
  ``refresh_every`` steps a forward over all ``M`` anchors to re-measure their drift;
- **null space** (``preserve.nullspace``): every student forward materialises ``W0 + E P`` for each edited
  linear (``2 out in^2`` FLOPs), its backward the gradient through ``P`` (as much again);
- **a run's setup**: the anchors' CFG rollouts, their teacher distributions (one forward), the input moments
  (another forward, then ``2 in^2`` float64 FLOPs per token and row per edited linear) and one float64
  eigendecomposition per distinct projector (``EIGH_FLOPS_PER_N3 n^3``, symmetric with vectors, Golub and Van Loan);
- **the filter stage**: one CFG rollout per generated pair (``pairs_per_concept``), the same for both routes;
- **composition** (``ear_dist.models.compose``): ``sum`` streams the deltas (``apply_deltas``); ``ties`` and
  ``project`` hold every delta's linear changes in float32; ``project`` also samples and teacher-forces each
  concept's prompts and the kept prompts, keeps one float64 input moment per set and linear, one
  eigendecomposition per set and linear and one per delta and linear (the union of the others' bases), and
  projects each change (``4 out in k`` FLOPs, ``k <= in``: counted at ``k = in``).

Memory (bytes): a run's trainable state (the edited copy, its gradient, float32 masters, their gradient and
Adam's two moments when the model is in a 16-bit dtype: ``20`` bytes per trained parameter; float32: ``16``),
the projectors (a float32 ``in x in`` per distinct input of a layer: q/k/v share one, gate/up one, o and down
their own; held by the run, plus a copy in the model's dtype in each edited linear when that is not float32),
the transient float64 moments (one ``in x in`` per edited linear), the anchors' teacher log-probabilities
(float32 ``[M, T, V]`` per watched branch, kept in host memory when the model is on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ear_dist.config.layers import resolve_layers
from ear_dist.telemetry.flops import (JanusFlopsShape, executed_train_flops_per_token, frozen_forward_flops_per_token,
                                      janus_flops_shape, rollout_flops)

EIGH_FLOPS_PER_N3 = 9  # symmetric eigendecomposition with eigenvectors: ~ 4/3 + 4/3 tridiagonal + ~6 QR sweeps
PROMPT_LEN_7B = 20  # a short prompt in Janus-Pro's chat format (as benchmarks/bench_attacks.py)
H100_BF16 = 989e12  # dense bf16 peak of an H100 SXM (ear_dist.telemetry.flops.PEAK_FLOPS)
H100_FP64 = 67e12  # dense FP64 (tensor core) peak: the eigendecompositions run in float64
GIB = 1024 ** 3
BOUND = "at most: "  # a host-memory part counted as its upper bound (kept out of the peak)


@dataclass(frozen=True)
class Linear:
    """One edited linear weight of a decoder layer: ``out x in``; ``inputs`` names what feeds it (layers fed the
    same inputs share one projector)."""

    layer: int
    name: str
    out: int
    inp: int
    inputs: str


def decoder_linears(config, layers, modules: str = "all") -> list[Linear]:
    """The linear weights of decoder ``layers`` (indices) of a Janus config; ``modules``: all | attention."""
    text = config.text_config
    hidden, heads, inter = text.hidden_size, text.num_attention_heads, text.intermediate_size
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    out = []
    for i in layers:
        out += [Linear(i, "q_proj", heads * head_dim, hidden, "attn_in"),
                Linear(i, "k_proj", kv_heads * head_dim, hidden, "attn_in"),
                Linear(i, "v_proj", kv_heads * head_dim, hidden, "attn_in"),
                Linear(i, "o_proj", hidden, heads * head_dim, "o_in")]
        if modules == "all":
            out += [Linear(i, "gate_proj", inter, hidden, "mlp_in"), Linear(i, "up_proj", inter, hidden, "mlp_in"),
                    Linear(i, "down_proj", hidden, inter, "down_in")]
    return out


@dataclass(frozen=True)
class MethodShape:
    """What of a recipe sets the cost: the trained layers, the step's batch and windows, the anchors."""

    name: str
    layers: tuple[int, ...]
    modules: str
    nullspace: bool
    kl_weight: float
    pairs_per_step: int
    steps_per_concept: int
    window_len: int
    per_step_anchors: int
    refresh_every: int
    branches: int
    surrogates: int
    norms_trained: bool  # modules=all without the null space also trains the layers' two RMSNorm weights

    @property
    def uses_anchors(self) -> bool:
        return self.nullspace or self.kl_weight > 0

    @classmethod
    def from_config(cls, name: str, cfg, num_layers: int) -> "MethodShape":
        t, p = cfg.trainable, cfg.preserve
        if t.patterns or t.adapter != "full":
            raise ValueError(f"{name}: the cost model knows layer/module selections of full edits only")
        if cfg.erase.update_mode != "window" or cfg.erase.window_prefix != "recompute":
            raise ValueError(f"{name}: the cost model counts update_mode=window with window_prefix=recompute")
        layers = tuple(resolve_layers(t.layers, num_layers, t.first_k_layers, t.skip_first_layers))
        return cls(name, layers, t.modules, bool(p.nullspace), float(p.weight), cfg.train.pairs_per_step,
                   cfg.train.steps, cfg.erase.window_len, p.per_step, p.refresh_every, len(p.branches),
                   p.surrogates, t.modules == "all" and not p.nullspace)


def recipe_shape(recipe: str, num_layers: int, overrides: tuple = ()) -> MethodShape:
    """The cost-relevant settings of a packaged recipe (``ear-dist config list``) on a model of ``num_layers``."""
    from ear_dist.config import load_config

    return MethodShape.from_config(recipe, load_config(recipes=[recipe], overrides=list(overrides)), num_layers)


@dataclass(frozen=True)
class ModelShape:
    """The model's side: FLOPs shape, hidden size, image tokens, codebook, prompt length, dtype bytes."""

    config: object
    flops: JanusFlopsShape
    image_tokens: int
    codebook: int
    prompt_len: int
    dtype_bytes: int = 2

    @classmethod
    def of(cls, config, image_tokens: int, prompt_len: int, dtype_bytes: int = 2) -> "ModelShape":
        return cls(config, janus_flops_shape(config), image_tokens, config.vq_config.num_embeddings, prompt_len,
                   dtype_bytes)

    @property
    def hidden(self) -> int:
        return self.config.text_config.hidden_size


def trained_linears(model: ModelShape, method: MethodShape) -> list[Linear]:
    return decoder_linears(model.config, method.layers, method.modules)


def trained_params(model: ModelShape, method: MethodShape) -> int:
    """Parameters a run trains (and its delta stores): the linear weights, plus the norms where they train."""
    linear = sum(w.out * w.inp for w in trained_linears(model, method))
    return linear + (2 * model.hidden * len(method.layers) if method.norms_trained else 0)


def train_state_bytes(params: int, dtype_bytes: int) -> int:
    """The edited copy, its gradient and the optimizer: 16-bit weights get float32 masters, their gradient and
    Adam's moments (``ear_dist.train.updater.MasterWeightUpdater``): 2 + 2 + 4 + 4 + 8 bytes; float32: 4 + 4 + 8."""
    return params * (20 if dtype_bytes < 4 else 16)


def projector_bytes(linears: list[Linear], dtype_bytes: int) -> int:
    """The run's float32 projectors (one per distinct input of a layer) and, in a 16-bit model, each edited
    linear's own copy in the model's dtype (``EditedLinear`` casts its buffer)."""
    distinct = {(w.layer, w.inputs): w.inp for w in linears}
    held = sum(4 * n * n for n in distinct.values())
    copies = sum(dtype_bytes * w.inp * w.inp for w in linears) if dtype_bytes != 4 else 0
    return held + copies


def moment_bytes(linears: list[Linear]) -> int:
    """The float64 input moments while the projectors are built (one per edited linear, q/k/v each their own)."""
    return sum(8 * w.inp * w.inp for w in linears)


def anchor_cache_bytes(model: ModelShape, anchors: int, branches: int) -> int:
    """The anchors' teacher log-probabilities (float32 ``[M, T, V]`` per branch) and their tokens (int64)."""
    return anchors * (branches * model.image_tokens * model.codebook * 4 + model.image_tokens * 8)


def projection_flops(linears: list[Linear]) -> int:
    """One materialisation of ``W0 + E P`` for every edited linear: ``2 out in^2`` each."""
    return sum(2 * w.out * w.inp * w.inp for w in linears)


def eigh_flops(n: int) -> int:
    return EIGH_FLOPS_PER_N3 * n ** 3


def _lowest(method: MethodShape) -> int:
    return min(method.layers)


def step_flops(model: ModelShape, method: MethodShape, anchors: int) -> dict[str, float]:
    """FLOPs of one training step, by part (see the module docstring). ``anchors``: M, the run's anchor count."""
    f, p, t, w = model.flops, model.prompt_len, model.image_tokens, method.window_len
    b = method.pairs_per_step
    params = trained_params(model, method)
    low = _lowest(method)
    seq = p + t
    windows = -(-t // w)
    parts = {"teacher": 2 * b * seq * frozen_forward_flops_per_token(f, seq)}
    erase = 0
    for i in range(windows):
        s = p + min((i + 1) * w, t)
        erase += b * s * executed_train_flops_per_token(f, s, params, low)
    parts["student"] = erase
    calls = 1  # student calls with a backward per window
    if method.kl_weight > 0:
        a = min(method.per_step_anchors, anchors)
        parts["anchors' KL"] = windows * 2 * a * seq * executed_train_flops_per_token(f, seq, params, low)
        parts["drift refresh"] = 2 * anchors * seq * frozen_forward_flops_per_token(f, seq) / method.refresh_every
        calls = 2
    if method.nullspace:
        proj = projection_flops(trained_linears(model, method))
        refresh_batches = -(-anchors // 16) / method.refresh_every if method.kl_weight > 0 else 0
        parts["null-space projection"] = windows * calls * 2 * proj + refresh_batches * proj
    return parts


def setup_flops(model: ModelShape, method: MethodShape, anchors: int) -> dict[str, float]:
    """A run's one-off work before its first step: the anchors' rollouts and distributions, the projectors
    (the parts named ``(fp64)`` run in float64: the input moments and the eigendecompositions)."""
    if not method.uses_anchors or anchors == 0:
        return {}
    f, seq = model.flops, model.prompt_len + model.image_tokens
    forward = 2 * anchors * seq * frozen_forward_flops_per_token(f, seq)
    parts = {"anchor rollouts": rollout_flops(f, model.prompt_len, model.image_tokens, anchors),
             "anchor distributions": forward}
    if method.nullspace:
        linears = trained_linears(model, method)
        distinct = {(w.layer, w.inputs): w.inp for w in linears}
        parts["projector inputs"] = forward
        parts["projector moments (fp64)"] = 2 * anchors * seq * sum(2 * w.inp * w.inp for w in linears)
        parts["projector eigh (fp64)"] = sum(eigh_flops(n) for n in distinct.values())
    return parts


def anchor_count(method: MethodShape, concepts: int, per_concept: int) -> int:
    """M of a run over ``concepts`` concepts: every entry's anchors (``per_concept`` each) and up to
    ``preserve.surrogates`` of the pairs' surrogates (a run has at least that many pairs)."""
    if not method.uses_anchors:
        return 0
    return concepts * per_concept + method.surrogates


@dataclass
class RouteCost:
    """One route at one concept count: FLOPs by part (the fp64 ones apart), steps, memory."""

    method: str
    route: str  # joint | sum | project | ties
    concepts: int
    steps: int
    flops: dict[str, float] = field(default_factory=dict)
    fp64_flops: float = 0.0
    gpu_bytes: dict[str, float] = field(default_factory=dict)  # on the training GPU, beyond the frozen model
    host_bytes: dict[str, float] = field(default_factory=dict)  # host memory (anchor cache, composition)
    delta_bytes: int = 0  # one run's delta file
    setup_gpu_bytes: float = 0.0  # before the student exists: the float64 moments and the float32 projectors

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    def h100_seconds(self, mfu: float) -> float:
        return self.total_flops / (H100_BF16 * mfu) + self.fp64_flops / (H100_FP64 * mfu)

    def as_dict(self, mfu: float) -> dict:
        return {"method": self.method, "route": self.route, "concepts": self.concepts, "steps": self.steps,
                "flops": self.flops, "fp64_flops": self.fp64_flops, "total_flops": self.total_flops,
                "h100_seconds": self.h100_seconds(mfu),
                "h100_seconds_per_concept": self.h100_seconds(mfu) / self.concepts,
                "gpu_gib": {k: v / GIB for k, v in self.gpu_bytes.items()},
                "host_gib": {k: v / GIB for k, v in self.host_bytes.items()},
                "delta_gib": self.delta_bytes / GIB, "setup_gpu_gib": self.setup_gpu_bytes / GIB}


def _add(into: dict, parts: dict, times: float = 1.0) -> None:
    for k, v in parts.items():
        into[k] = into.get(k, 0.0) + v * times


def run_cost(model: ModelShape, method: MethodShape, concepts: int, anchors_per_concept: int,
             pairs_per_concept: int, steps: Optional[int] = None, pairs_per_step: Optional[int] = None
             ) -> RouteCost:
    """One training run over ``concepts`` concepts (a joint run, or one array task with ``concepts=1``)."""
    if pairs_per_step is not None:
        method = MethodShape(**{**method.__dict__, "pairs_per_step": pairs_per_step})
    steps = method.steps_per_concept * concepts if steps is None else steps
    m = anchor_count(method, concepts, anchors_per_concept)
    out = RouteCost(method.name, "joint", concepts, steps)
    _add(out.flops, {"filter rollouts": rollout_flops(model.flops, model.prompt_len, model.image_tokens,
                                                      pairs_per_concept * concepts)})
    _add(out.flops, step_flops(model, method, m), steps)
    setup = setup_flops(model, method, m)
    out.fp64_flops = sum(setup.pop(k) for k in [k for k in setup if k.endswith("(fp64)")])
    _add(out.flops, setup)
    params = trained_params(model, method)
    linears = trained_linears(model, method)
    out.gpu_bytes["trainable state"] = train_state_bytes(params, model.dtype_bytes)
    if method.nullspace:
        out.gpu_bytes["projectors"] = projector_bytes(linears, model.dtype_bytes)
        out.setup_gpu_bytes = moment_bytes(linears) + projector_bytes(linears, 4)
    if method.kl_weight > 0:
        out.host_bytes["anchor cache"] = anchor_cache_bytes(model, m, method.branches)
    out.delta_bytes = params * model.dtype_bytes
    return out


def compose_cost(model: ModelShape, method: MethodShape, deltas: int, how: str, prompts_per_concept: int,
                 kept_prompts: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """(bf16-rate FLOPs by part, fp64 FLOPs, host bytes by phase) of composing ``deltas`` deltas by ``how``.

    Host memory, by phase (the composition's peak is the largest; ``P`` trained parameters, ``d`` the deltas'
    bytes per value). ``sum`` (``apply_deltas``) streams: a float64 sum (``8 P``), the float64 changes of the
    delta it reads and of the one before, still referenced while ``delta_changes`` (a generator) reads the next
    (``16 P``; one delta: ``8 P``), and the file's tensors (``d P``). ``ties`` and ``project`` hold every delta's
    changes in float32 (``4 P`` each; while one is converted, its float64 changes and the file's tensors too),
    then ``project`` the float64 input moment of every prompt set and linear, each set's basis (a slice of its
    whole ``in x in`` eigenvector matrix, which it keeps) and each delta's union basis (``[in, k]``,
    ``k <= in``: counted as a bound, under ``BOUND``); both sum the result in float64.
    """
    params = trained_params(model, method)
    linears = trained_linears(model, method)
    flops: dict[str, float] = {}
    fp64 = 0.0
    reading = (16 if deltas > 1 else 8) * params + model.dtype_bytes * params
    if how == "sum":
        return flops, fp64, {"reading and summing": reading + 8 * params}
    linear_params = sum(w.out * w.inp for w in linears)
    held = 4 * params * deltas
    host = {"reading": held + 8 * params + model.dtype_bytes * params, "summing": held + 8 * params}
    if how == "ties":  # per tensor: trim (top-k), stack, elect, mean: a few passes over N float32 copies
        # per tensor: the trimmed copies, their stack and the agreeing entries' values, N of each
        host["merging"] = held + 3 * 4 * max(w.out * w.inp for w in linears) * deltas
        flops["ties (element-wise)"] = 10 * linear_params * deltas
        return flops, fp64, host
    if how != "project":
        raise ValueError(f"compose method {how!r}: expected sum, project or ties")
    f, seq = model.flops, model.prompt_len + model.image_tokens
    sets = [prompts_per_concept] * deltas + ([kept_prompts] if kept_prompts else [])
    prompts = sum(sets)
    flops["prompt rollouts"] = rollout_flops(f, model.prompt_len, model.image_tokens, prompts)
    flops["prompt forwards"] = 2 * prompts * seq * frozen_forward_flops_per_token(f, seq)
    moments = 2 * prompts * seq * sum(2 * w.inp * w.inp for w in linears)  # x^T x in float64
    flops["projection"] = deltas * sum(4 * w.out * w.inp * w.inp for w in linears)
    fp64 = moments + (len(sets) + deltas) * sum(eigh_flops(w.inp) for w in linears)
    # every set's moment and basis: principal_basis returns a slice of the whole in x in eigenvector matrix
    host["projecting"] = held + 2 * len(sets) * moment_bytes(linears)
    host[f"{BOUND}projecting, with the unions"] = host["projecting"] + deltas * moment_bytes(linears)
    return flops, fp64, host


def compose_peak_bytes(host: dict, bound: bool = False) -> float:
    """A composition's host memory at its peak: its largest phase (``bound``: the bounded phases too)."""
    return max(v for k, v in host.items() if bound or BOUND not in k)


def route_cost(model: ModelShape, method: MethodShape, concepts: int, route: str, anchors_per_concept: int = 16,
               pairs_per_concept: int = 32, kept_prompts: int = 64) -> RouteCost:
    """``joint``: one run of ``concepts x steps`` steps; ``sum`` / ``project`` / ``ties``: one run per concept
    (one concept's anchors each), then the composition of the deltas."""
    if route == "joint":
        return run_cost(model, method, concepts, anchors_per_concept, pairs_per_concept)
    task = run_cost(model, method, 1, anchors_per_concept, pairs_per_concept)
    out = RouteCost(method.name, route, concepts, task.steps * concepts, gpu_bytes=dict(task.gpu_bytes),
                    host_bytes=dict(task.host_bytes), delta_bytes=task.delta_bytes,
                    setup_gpu_bytes=task.setup_gpu_bytes)
    _add(out.flops, task.flops, concepts)
    out.fp64_flops = task.fp64_flops * concepts
    flops, fp64, host = compose_cost(model, method, concepts, route, pairs_per_concept, kept_prompts)
    _add(out.flops, {f"compose: {k}": v for k, v in flops.items()})
    out.fp64_flops += fp64
    for k, v in host.items():
        out.host_bytes[f"compose: {k}"] = v
    return out


def peak_host_bytes(cost: RouteCost, bound: bool = False) -> float:
    """Host memory at its highest: the training's (the anchor cache) or the composition's largest phase, which
    come one after the other (``bound``: with the bounded parts)."""
    compose = {k: v for k, v in cost.host_bytes.items() if k.startswith("compose: ")}
    train = sum(v for k, v in cost.host_bytes.items() if not k.startswith("compose: "))
    return max(train, compose_peak_bytes(compose, bound) if compose else 0.0)
