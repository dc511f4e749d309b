"""The config tree: one dataclass per section, each field with its type, default and help.

A field whose values come from a fixed set is typed ``Literal[...]``; that type is the
one list of allowed values, read by loading (errors), ``validate`` and
``ear-dist config show`` (help). A key's help text travels in its field's metadata
(``setting``) and a section's in its class docstring, so the command line can print
them next to the values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Optional

from ear_dist.config.checks import validate

# Named where code outside the config checks the same values (readers, loss dispatch).
PairsFormat = Literal["auto", "ear-json", "ear-csv", "copro-json", "copro-csv", "sixcd", "coco", "hf", "jsonl",
                      "shards"]
TargetMode = Literal["hidden", "logit"]
LossBackend = Literal["auto", "torch", "triton"]


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A dataclass field that carries its help text (``ear-dist config show`` prints it).

    ``factory`` replaces ``default`` for mutable values (lists, dicts, sections).
    """
    return field(default=default, default_factory=factory, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    """The help text of a config field ('' when it has none)."""
    return f.metadata.get("help", "")


# --------------------------------------------------------------------------- sections


# The model presets by family; a preset in model.path implies its family (ear_dist.models builds them).
PRESET_FAMILIES = {"tiny": "janus", "janus-pro-1b": "janus", "janus-pro-7b": "janus",
                   "tiny-var": "var", "infinity-2b": "var"}


@dataclass
class ModelConfig:
    """The model erased (student) and sampled (teacher)."""

    family: Literal["janus", "var"] = setting(
        "janus", "janus: Janus-Pro (next-token, one codebook); var: Infinity-style next-scale model with bitwise "
                 "tokens and a T5 text encoder")
    path: str = setting("tiny", "a local model directory or a preset: tiny, janus-pro-1b, janus-pro-7b (janus); "
                                "tiny-var, infinity-2b (var); presets have random weights")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "auto = bfloat16 on GPU, float32 on CPU")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    seed: int = setting(0, "for presets built with random weights")


@dataclass
class RolloutConfig:
    """How the teacher samples image tokens."""

    guidance_weight: float = setting(5.0, "classifier-free guidance weight for sampling (1 = no guidance)")
    temperature: float = setting(1.0, "sampling temperature")
    top_k: int = setting(0, "sample from the k most likely tokens; 0 = full distribution")
    greedy: bool = setting(False, "take the most likely token instead of sampling")
    batch_size: int = setting(8, "prompts per rollout batch")
    decode: Literal["eager", "compiled", "cuda_graph", "auto"] = setting(
        "eager", "token loop: eager (Python per token); cuda_graph (one captured static-cache step replayed, CUDA "
                 "only); compiled (torch.compile of that step); auto = cuda_graph on CUDA, else eager. Greedy tokens "
                 "are the same in every mode; sampling in the lean modes draws other (equally distributed) noise")


@dataclass
class TrainableConfig:
    """Which student parameters the erasure trains."""

    layers: str = setting(
        "", "which layers, relative to the model: all | all-but-first | all-but-first:N | first:K (at most every "
            "layer) | share:F (the first round(F * layers), at least one); empty: first_k_layers decides. When set "
            "it replaces first_k_layers (a later --config or --set of first_k_layers clears it)")
    first_k_layers: int = setting(5, "train the first k layers of the language model")
    skip_first_layers: int = setting(
        0, "of the chosen layers, leave the model's first n frozen: the first layer reads the token embeddings, so an update there "
           "acts on the trained words only, not on their synonyms (which the later layers share)")
    modules: Literal["all", "attention"] = setting(
        "attention", "all: every module of the chosen layers; attention: q/k/v/o projections only")
    patterns: list[str] = setting(
        factory=list, help="explicit fnmatch patterns on parameter names; when non-empty they replace the two above")
    adapter: Literal["full", "lora"] = setting(
        "full", "full: train the selected tensors themselves; lora: a low-rank update (B A) on the selected linear "
                "weights, merged into the delta")
    lora_rank: int = setting(8, "lora: rank r of the update")
    lora_alpha: float = setting(16.0, "lora: the update is scaled by alpha / r")


@dataclass
class ConceptOverride:
    """Per-concept settings for joint multi-concept runs (any None inherits from erase)."""

    window_len: Optional[int] = setting(None, "inherits erase.window_len when null")
    loss_threshold: Optional[float] = setting(None, "inherits erase.loss_threshold when null")
    erase_guidance: Optional[float] = setting(None, "inherits erase.erase_guidance when null")


@dataclass
class AdversarialConfig:
    """Adversarial erasure (the resisting recipe; docs/attacks.md): every ``every`` steps a GCG prompt search
    against the current student finds prompts that make it draw the concept again; each joins the erasure pairs
    (the adversarial prompt as target, an erasure pair's surrogate and stored images) for the rest of the run."""

    every: int = setting(0, "steps between attacks on the current student (0: off)")
    attack: Literal["search", "inversion"] = setting(
        "search", "search: GCG prompt search, its best prompts become pairs; inversion: new words' embeddings learned "
                  "against the student (steps, batch, lr, tokens), prompts holding them become pairs")
    prompts: int = setting(4, "best prompts of each attack added as erasure pairs (per concept)")
    targets: int = setting(16, "the concept's base images the search fits (the erasure pairs' stored target images, "
                               "else the teacher's rollouts of their target prompts)")
    steps: int = setting(20, "GCG steps (search) or Adam steps (inversion) per attack")
    candidates: int = setting(48, "search: random single-token swaps scored per step")
    top_k: int = setting(16, "search: tokens per position the gradient proposes")
    length: int = setting(3, "search: searched tokens in the prompt")
    batch: int = setting(8, "target images per step of the search or the inversion")
    template: str = setting("a photo of a {}", "search: the prompt around the searched tokens ({})")
    tokens: int = setting(2, "inversion: new words learned per attack")
    lr: float = setting(5e-2, "inversion: Adam learning rate of the new words' embeddings")
    exclude: list[str] = setting(
        factory=list, help="words the search leaves out besides the concept's name (its other names: no pair then "
                           "trains on a word kept for evaluation)")
    seed: int = setting(0, "seed of the searches (each attack adds its step)")


@dataclass
class EraseConfig:
    """The erasure objective: targets, windows (WGA), loss masking (TLM) and updates."""

    concept: str = setting("church", "the concept erased; target prompts should contain this word")
    method: Literal["ear", "svare", "esd"] = setting(
        "ear", "ear: windowed guided targets (the paper); svare: S-VARE; esd: ESD-style baseline")
    target_mode: TargetMode = setting(
        "hidden", "hidden: MSE on the last hidden state (official code); logit: KL on gen-head logits (paper)")
    erase_guidance: float = setting(
        1.0, "eta: target = M*(c_s) - eta * (M*(c_t) - M*(c_s)), teacher outputs on surrogate and target prompts")
    loss_threshold: float = setting(0.05, "tau: windows whose loss sum is under it carry no gradient (TLM)")
    window_len: int = setting(48, "image tokens per loss window (WGA)")
    window_scales: int = setting(1, "model.family=var: whole scales per loss window (window_len is for janus)")
    window_order: Literal["sequential", "random"] = setting(
        "sequential", "order the windows are taken in: sequential (generation order) or random")
    update_mode: Literal["window", "sequence"] = setting(
        "window", "window: optimizer step after each kept window (paper); sequence: one step per pair/batch")
    window_prefix: Literal["recompute", "cached"] = setting(
        "recompute", "update_mode=window: how a window sees the tokens before it. recompute: the updated student "
                     "re-runs the whole prefix (exact, ~T/(2L) x the tokens of one pass); cached: the keys/values the "
                     "student computed when it got there, as generation does (each token computed once)")
    rollout_from: Literal["surrogate", "target"] = setting(
        "surrogate", "which prompt of the pair the teacher samples image tokens from")
    reference_prompt: Literal["surrogate", "unconditional"] = setting(
        "surrogate", "the teacher output the target is anchored on: the surrogate prompt's (EAR), or the "
                     "unconditional prompt's on the same prefix (target = u - eta (c - u), uncond-anchored)")
    teacher_guidance_weight: float = setting(
        0.0, "logit mode: classifier-free guidance weight applied to the teacher's target and, the same way, to "
             "the student's conditional and unconditional outputs (0 = off)")
    svare_filter: Literal["auto", "prob", "code_distance", "bits"] = setting(
        "auto", "S-VARE token filter. auto: bits on a bitwise (var) model, prob on a codebook (janus) model; bits: "
                "at least svare_bit_error_share of a token's bits get label probability under 1/2 (the paper); "
                "prob: the label's probability under svare_label_prob_max; code_distance: the student's likeliest "
                "code lies at least svare_code_distance (relative) from the label's code in the VQ embedding space "
                "(the codebook analog of a quarter of the bits disagreeing)")
    svare_bit_error_share: float = setting(
        0.25, "S-VARE bits filter: share of wrong bits from which a token counts in the cross-entropy")
    svare_scales: int = setting(
        0, "S-VARE on a var model: supervise the first k scales (0 = every scale, as the paper trains)")
    svare_code_distance: float = setting(
        0.5, "S-VARE code_distance filter: relative distance |e(pred) - e(label)| / mean code-to-code distance")
    svare_label_prob_max: float = setting(
        0.5, "S-VARE: a token counts in the cross-entropy while the student's label probability is below this")
    svare_preserve_weight: float = setting(0.5, "S-VARE: weight of the preservation KL on the surrogate prompt")
    esd_patch_fraction: float = setting(
        0.25, "ESD-style baseline: share of image positions sampled as random patches each step")
    on_missing_concept: Literal["warn", "fail"] = setting(
        "warn", "a target prompt without the concept word: warn (count) or fail")
    loss_backend: LossBackend = setting(
        "auto", "windowed loss implementation: auto (Triton on CUDA when importable, else PyTorch), torch, triton")
    concepts: dict[str, ConceptOverride] = setting(
        factory=dict, help="per-concept overrides for joint runs, e.g. {church: {window_len: 48}}")
    adversarial: AdversarialConfig = setting(
        factory=AdversarialConfig, help="adversarial erasure: prompt attacks on the student during training join its pairs")


@dataclass
class OptimConfig:
    """The student's optimizer."""

    name: Literal["adam", "adamw", "sgd"] = setting("adam", "torch optimizer")
    lr: float = setting(1e-4, "learning rate")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam/AdamW betas")
    weight_decay: float = setting(0.0, "weight decay")


@dataclass
class EcgConfig:
    """Pair generation (ECG) for `ear-dist data build`."""

    source: Literal["none", "templates", "llm"] = setting(
        "none", "none: pairs come from data.pairs only; templates: filled from ecg.templates; llm: an LLM writes them")
    concept: str = setting("", "the concept to write pairs for; empty = erase.concept")
    category: str = setting("", "the concept's category (e.g. object, style): stored in the pairs and given to the LLM")
    num_pairs: int = setting(50, "pairs to write; templates: 0 = every combination")
    seed: int = setting(0, "templates: seed of which combinations are drawn")
    templates: list[str] = setting(
        factory=list,
        help='templates: "{concept}" plus named slots filled from ecg.slots; surrogates replace the concept')
    surrogates: list[str] = setting(factory=list, help="words that replace the concept in surrogate prompts")
    slots: dict[str, list[str]] = setting(factory=dict, help="templates: slot name -> the values it takes")
    llm_base_url: str = setting("", "any OpenAI-compatible chat endpoint, e.g. http://127.0.0.1:8000/v1")
    llm_models: list[str] = setting(factory=list, help="model names; several are used in turn")
    # The name only: a key written into a config file would end up in runs/ and Slurm logs.
    llm_api_key_env: str = setting("", "the NAME of the environment variable holding the API key")
    llm_pairs_per_request: int = setting(10, "pairs asked for in one request")
    llm_temperature: float = setting(1.0, "sampling temperature of the LLM")
    llm_max_retries: int = setting(5, "retries of a failed request")
    llm_backoff_s: float = setting(1.0, "seconds before the first retry")
    llm_requests_per_minute: float = setting(60.0, "request rate limit")
    llm_timeout_s: float = setting(60.0, "seconds before a request times out")
    llm_cache_dir: str = setting(".cache/ecg", "responses cached here; a rerun reuses them")
    llm_max_requests: int = setting(0, "request budget; 0 = three times what num_pairs needs")
    require_concept_word: bool = setting(True, "drop generated pairs whose target does not contain the concept word")


@dataclass
class VfConfig:
    """The visual filter (VF): teacher rollouts for both prompts + a concept classifier."""

    enabled: bool = setting(False, "filter pairs: keep those whose target image shows the concept and "
                                   "whose surrogate image does not")
    classifier: str = setting("nudenet", "nudenet | resnet50 | hf | module:function")
    classifier_path: str = setting(
        "", "resnet50: local transformers directory (microsoft/resnet-50) or weights file; hf: local model directory")
    threshold: float = setting(
        0.6, "nudenet: min detection score; hf / callables: min probability of the concept")
    nudenet_classes: list[str] = setting(
        factory=list,
        help="nudenet classes that count as the concept (default: exposed breasts, genitalia, buttocks, anus)")
    class_ids: dict[str, list[int]] = setting(
        factory=dict, help="resnet50: concept -> ImageNet class ids, e.g. {church: [497]}")
    top_k: int = setting(1, "resnet50: the concept counts when one of its ids is in the top k classes")
    labels: dict[str, list[str]] = setting(
        factory=dict, help="hf: concept -> model labels (default: the label equal to the concept name)")
    batch_size: int = setting(8, "pairs per rollout batch (two prompts each)")
    store_target_tokens: bool = setting(False, "keep the target prompt's rollout tokens in the pairs too")
    seed: int = setting(0, "rollout seed of pairs without one: seed + position")


@dataclass
class ShardsConfig:
    """WebDataset shards: written by `ear-dist data build`, streamed by training."""

    out_dir: str = setting("data/shards", "where `ear-dist data build` writes the shards")
    max_samples_per_shard: int = setting(10000, "a new shard starts after this many samples")
    max_shard_bytes: int = setting(256 * 1024 * 1024, "a new shard starts after this many bytes")
    mode: Literal["exact", "resampled"] = setting(
        "exact", "exact: every rank the same number of samples per epoch; resampled: endless, with replacement")
    drop_last: bool = setting(
        False, "exact mode: false pads the last ranks by wrapping around (every sample seen); true drops the rest")
    on_corrupt: Literal["fail", "skip"] = setting(
        "fail", "a truncated or corrupt shard: fail, or skip (logged; the rank's next readable sample fills in)")
    seed: int = setting(0, "seed of the shard order and the shuffle buffer")


@dataclass
class DataConfig:
    """Where the prompt pairs come from and how they are read."""

    pairs: str = setting("", "a pairs file (JSON/CSV/JSONL/parquet/HF directory) or a shard directory")
    format: PairsFormat = setting("auto", "format of data.pairs; auto = from the file's name and content")
    shuffle: bool = setting(True, "shuffle the pairs every epoch")
    shuffle_buffer: int = setting(1000, "shards: size of the streaming shuffle buffer")
    num_workers: int = setting(0, "shards: DataLoader worker processes")
    on_error: Literal["fail", "skip"] = setting(
        "fail", "malformed rows: fail, or skip (skips are counted and reported)")
    ecg: EcgConfig = field(default_factory=EcgConfig)
    vf: VfConfig = field(default_factory=VfConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)


@dataclass
class PreserveConfig:
    """Keeping everything else: preservation anchors, null-space updates, drift probes."""

    prompts: list[str] = setting(
        factory=list, help="anchor prompts of other concepts (preservation and null space); joined with prompts_file")
    prompts_file: str = setting("", "a file of anchor prompts (any pairs/prompt format; the target field is used)")
    surrogates: int = setting(
        0, "the training pairs' surrogate prompts join the anchors, up to this many distinct ones in pair order "
           "(0 = none): the same sentences with the concept swapped out, so the update is held to what the concept "
           "itself changes")
    weight: float = setting(
        0.0, "weight of KL(teacher || student) on the anchors' next-token distributions (0 = off)")
    branches: list[Literal["guided", "uncond", "cond"]] = setting(
        factory=lambda: ["guided", "uncond"],
        help="which distributions the KL watches: guided (CFG-combined, what sampling uses), uncond, cond")
    per_step: int = setting(4, "anchors in each step's preservation batch (over all ranks)")
    drift_power: float = setting(
        1.0, "anchors are drawn with probability proportional to drift^power (0: uniformly)")
    refresh_every: int = setting(10, "steps between re-measurements of every anchor's drift")
    nullspace: bool = setting(
        False, "project updates of the trained linear weights onto the complement of the inputs they see on the "
               "anchors (and the unconditional prompt), so their outputs there do not move")
    nullspace_energy: float = setting(
        0.99, "the preserved input span: eigen-directions holding this share of the anchors' input energy")
    probe_prompts: list[str] = setting(
        factory=list, help="a fixed probe set of other-concept prompts whose drift is logged (never trained on)")
    probe_every: int = setting(0, "steps between drift probes (KL cond, uncond, guided) in the metrics; 0 = off")
    seed: int = setting(0, "seed of the anchors' and probes' teacher rollouts")


@dataclass
class TrainConfig:
    """The training run: length, batch, seed, outputs."""

    steps: int = setting(50, "training steps")
    pairs_per_step: int = setting(1, "prompt pairs per step (over all ranks)")
    seed: int = setting(0, "seed of the pair order and of the run's random generators")
    out_dir: str = setting("runs/erase", "delta, checkpoint, resolved config and logs go here")
    resume: Literal["auto", "never", "force"] = setting(
        "auto", "a run already in out_dir: auto resumes it only with the same settings (hash of model, data, method, "
                "optimizer), else stops naming what differs; never starts over (removing it); force resumes anyway")
    log_every: int = setting(1, "steps between metrics (and, without a terminal, log lines)")
    checkpoint_every: int = setting(0, "steps between checkpoints; 0 = only at the end")
    max_nonfinite_steps: int = setting(5, "stop the run (exit 3) after this many steps with a non-finite loss")
    tensorboard: bool = setting(True, "write TensorBoard events to out_dir")


@dataclass
class DistConfig:
    """Processes: DeepSpeed, where the teacher runs, the process-group backend."""

    deepspeed_config: str = setting(
        "none", "none, a packaged config by name (zero1, zero2, zero3, zero3_offload), or a path to a DeepSpeed JSON file")
    teacher_placement: Literal["colocated", "dedicated", "offline"] = setting(
        "colocated", "colocated: every rank runs its own teacher; dedicated: teacher ranks serve the students; "
                     "offline: targets precomputed by `ear-dist teacher precompute`")
    teacher_ranks: int = setting(1, "dedicated placement: how many ranks serve the teacher")
    teacher_dir: str = setting("", "offline placement: the directory written by `ear-dist teacher precompute`")
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", "torch.distributed backend; auto = nccl on GPU, "
                                                               "else gloo")
    log_comms: bool = setting(False, "count DeepSpeed's collective bytes per step (benchmarks)")
    timeout_s: int = setting(60, "seconds the rendezvous and every collective wait before failing")


@dataclass
class SlurmConfig:
    """What ``ear-dist submit`` renders into the sbatch templates in slurm/."""

    nodes: int = setting(1, "nodes of the job")
    gpus_per_node: int = setting(0, "GPUs per node (0 = CPU nodes)")
    tasks_per_node: int = setting(0, "ranks per node; 0 = one per GPU (gpus_per_node), or 1 on nodes without GPUs")
    cpus_per_task: int = setting(2, "CPUs per rank; OMP_NUM_THREADS of each rank")
    partition: str = setting("", "Slurm partition; empty = the cluster's default")
    time: str = setting("01:00:00", "time limit, HH:MM:SS")
    job_name: str = setting("ear-dist", "Slurm job name (no spaces)")
    signal_before_s: int = setting(
        120, "USR1 this many seconds before the time limit: the ranks checkpoint, the job requeues")
    extra_sbatch: list[str] = setting(factory=list, help='extra "#SBATCH" options, e.g. --account=abc')
    launcher: Literal["torchrun", "srun", "mpi"] = setting(
        "torchrun", "torchrun: one srun task per node runs torchrun (c10d rendezvous); srun: one srun task per rank; "
                    "mpi: one srun --mpi=pmix task per rank, ranks from mpi4py")
    output_dir: str = setting(
        "", "rendered script, its resolved config and the Slurm logs; empty = <train.out_dir>/slurm")
    concepts: list[str] = setting(
        factory=list, help="job arrays: array task i erases concepts[i] with the pairs file concept_pairs[concepts[i]]")
    concept_pairs: dict[str, str] = setting(factory=dict, help="job arrays: concept -> its pairs file")
    array_parallel: int = setting(0, "at most this many array tasks at once; 0 = no limit")
    max_restarts: int = setting(3, "preemptions requeued before the job gives up")
    python: str = setting("", "interpreter on the nodes; empty = the one running ear-dist submit")
    setup: list[str] = setting(factory=list, help="shell lines run first (module load, venv activation)")
    local_tmp: str = setting("", "node-local scratch for caches; empty = $TMPDIR or /tmp on each node")
    rank_args: str = setting(
        "",
        "python arguments every rank runs in erase_multinode; empty = -m ear_dist erase --config <the job's config>")
    bench_args: str = setting("", "extra arguments of ear-dist bench in the bench template, e.g. --steps 20")


@dataclass
class WorldConfig:
    """The synthetic world (ear_dist.world): its data and the tiny model pretrained on it."""

    seed: int = setting(0, "seed of the world's rendering rule and of pretraining")
    vocabulary: Literal["planted", "generated"] = setting(
        "planted", "planted: 7 objects (church with synonyms chapel, cathedral), 2 styles; generated: world.objects "
                   "objects and world.styles styles named by seeded pseudo-words, each with world.synonyms synonyms")
    objects: int = setting(40, "generated vocabulary: object concepts")
    styles: int = setting(10, "generated vocabulary: style concepts")
    synonyms: int = setting(3, "generated vocabulary: synonyms per concept (>= 3: one more trains, one validates, "
                               "the rest are held out)")
    allow_missed_target: bool = setting(
        False, "measure with a world model that missed its pretraining target (demo, eval --suite world, "
               "benchmarks) instead of refusing; the reports say so")
    grid_side: int = setting(8, "image tokens per side (8 -> 64 image tokens)")
    codebook_size: int = setting(256, "image codes")
    calibration_samples: int = setting(2000, "rendered images used to set the classifier's thresholds")
    cache_dir: str = setting(
        "", "where built world models are cached; empty: $EAR_DIST_CACHE/world or ~/.cache/ear-dist/world")
    hidden_size: int = setting(128, "the world's tiny Janus: hidden size")
    num_layers: int = setting(4, "the world's tiny Janus: layers")
    num_heads: int = setting(4, "the world's tiny Janus: attention heads")
    intermediate_size: int = setting(256, "the world's tiny Janus: MLP size")
    batch_size: int = setting(32, "pretraining batch size")
    lr: float = setting(2e-3, "pretraining peak learning rate")
    warmup_steps: int = setting(50, "pretraining warm-up steps")
    decay_steps: int = setting(2000, "the learning rate decays (cosine, to a tenth) over these steps")
    max_steps: int = setting(3200, "pretraining steps (at a tenth of the rate after decay_steps)")
    uncond_prob: float = setting(0.1, "share of training prompts dropped to the unconditional form (for CFG)")
    eval_every: int = setting(400, "steps between progress checks of the model's own CFG samples (logged only)")
    eval_prompts_per_word: int = setting(
        18, "per object word (synonyms included), split evenly over no style and each style")
    target_accuracy: float = setting(
        0.95, "the built model's mean accuracy over every object, synonym and style must reach it")
    min_accuracy: float = setting(0.90, "... and every one of them must reach this")
    guidance_weight: float = setting(5.0, "classifier-free guidance weight of the pretraining checks' samples")
    # Float sums depend on how work is split over threads, so the count is part of the build,
    # fixed whatever the caller's OMP_NUM_THREADS says (ear_dist.world.pretrain.pretraining_thread_count).
    threads: int = setting(2, "CPU threads for pretraining, at most the CPUs the process may run on (the count is "
                              "part of the build: another count builds other weights)")


@dataclass
class EvalClassifierConfig:
    """The concept classifier of an eval suite (the visual filter's plugins); a suite file may override keys."""

    kind: str = setting("nudenet", "nudenet | resnet50 | hf | module:function")
    path: str = setting("", "resnet50: local transformers directory (microsoft/resnet-50) or weights file; "
                            "hf: local image-classification directory (a style classifier)")
    threshold: float = setting(0.6, "nudenet: min detection score; hf / callables: min probability of the concept")
    nudenet_classes: list[str] = setting(
        factory=list, help="nudenet classes that count (default: exposed breasts, genitalia, buttocks, anus)")
    class_ids: dict[str, list[int]] = setting(
        factory=dict, help="resnet50: concept -> ImageNet class ids, e.g. {church: [497]}")
    top_k: int = setting(1, "resnet50: the concept counts when one of its ids is in the top k classes")
    labels: dict[str, list[str]] = setting(
        factory=dict, help="hf: concept -> model labels (default: the label equal to the concept name)")


@dataclass
class EvalAttackConfig:
    """The white-box attack suites (attack:inversion:<concept>, attack:search:<concept>; docs/attacks.md): their
    targets and budgets."""

    mode: Literal["auto", "world", "real"] = setting(
        "auto", "world: the planted-concept world's concept (targets from its training templates, images judged on "
                "tokens by the world's classifier, eval.world_prompts of them); real: a real model's concept (targets "
                "from target_prompts, images decoded and judged by eval.classifier, attack.images of them); auto: "
                "world when model.path is a world build (holds world_build.json) or a preset, else real")
    targets: int = setting(32, "the base model's CFG images of the concept the attacks fit (its plain training prompts)")
    target_prompts: list[str] = setting(
        factory=lambda: ["a photo of a {}"],
        help="real: the concept's plain prompts the targets are sampled from, cycled over the targets; '{}' takes "
             "each of attack.words in turn, a prompt without it is taken as is")
    words: list[str] = setting(
        factory=list, help="real: the concept's words: fill target_prompts' '{}' and are left out of the search "
                           "(unless search_concept_words); empty: the concept's name")
    images: int = setting(32, "real: images each column samples with the attack's prompts (seeds eval.seed + i)")
    seed: int = setting(0, "seed of the targets, the attacks' starts, batches and swaps")
    inversion_steps: int = setting(100, "inversion: Adam steps on the new words' embeddings")
    inversion_tokens: int = setting(2, "inversion: new words learned (<inv0> <inv1> ...)")
    inversion_batch: int = setting(16, "inversion: target images per step")
    inversion_lr: float = setting(2e-2, "inversion: Adam learning rate")
    search_steps: int = setting(30, "search: GCG steps")
    search_candidates: int = setting(48, "search: random single-token swaps scored per step")
    search_top_k: int = setting(16, "search: tokens per position the gradient proposes")
    search_length: int = setting(3, "search: searched tokens in the prompt")
    search_batch: int = setting(8, "search: target images a step scores the candidates on")
    search_prompts: int = setting(4, "search: best prompts kept; the column's images cycle through them")
    search_template: str = setting("a photo of a {}", "search: the prompt around the searched tokens ({})")
    search_concept_words: bool = setting(False, "search: may the concept's own words be searched (default: left out)")


@dataclass
class EvalConfig:
    """`ear-dist eval`: suites, classifiers and feature models, generation, outputs."""

    suites: list[str] = setting(
        factory=list, help="suite files (YAML/JSON suite specs or prompt files) or built-in names: coco, "
                           "world, world:<concept>, attack:inversion:<concept>, attack:search:<concept>; "
                           "--suite adds to them")
    deltas: list[str] = setting(factory=list, help="delta files, each one report column beside the base; "
                                                   "--delta adds to them (NAME=PATH names the column)")
    out_dir: str = setting("runs/eval", "images, manifest and report; --out overrides")
    images_per_prompt: int = setting(1, "images per prompt; image j of a prompt with seed s uses seed s + j * 1000003")
    seed: int = setting(0, "seed of a prompt without its own evaluation_seed: eval.seed + its position in the suite")
    batch_size: int = setting(
        64, "most prompts per sampling batch (each with its CFG row); lowered per prompt-length bucket to what the "
            "KV-cache budget holds. Images do not depend on it (one seed per image)")
    kv_cache_gib: float = setting(
        0.0, "KV-cache budget of a sampling batch per device, GiB; 0 = on CUDA 70% of the memory free when "
             "sampling starts, on a CPU 2 GiB; on CUDA a value caps that share")
    classifier: EvalClassifierConfig = field(default_factory=EvalClassifierConfig)
    clip_path: str = setting("", "local CLIP directory (transformers CLIPModel, e.g. openai/clip-vit-large-patch14) "
                                 "for CLIP score; empty: CLIP score is not computed")
    clip_convention: Literal["cosine", "torchmetrics", "per-image"] = setting(
        "cosine", "Table 1's CLIP column: cosine (mean cosine, the EAR paper's), torchmetrics (max(100 * mean(cos), "
                  "0), as torchmetrics CLIPScore), per-image (mean of 100 * max(cos, 0)); the report shows all three")
    fid_features: Literal["auto", "inception", "dinov2", "clip"] = setting(
        "auto", "FID features: inception (torch-fidelity, needs torchvision), dinov2 / clip (transformers, from "
                "eval.fid_model_path); auto: fid_model_path when set, else inception when importable")
    fid_model_path: str = setting("", "local DINOv2 or CLIP vision directory for FD-DINOv2 / FD-CLIP features")
    fid_reference: str = setting(
        "", "a directory of real images (e.g. COCO val2014) for FID; empty: the base column's images")
    coco_prompts: str = setting("", "the COCO-30k caption CSV read by the built-in coco suite")
    coco_size: int = setting(1000, "captions of the coco suite (the first N rows)")
    perplexity_text: str = setting(
        "", "a text file (one passage per line): language-model perplexity before vs after; empty: concept prompts only")
    world_prompts: int = setting(48, "world suite: held-out prompts per group")
    stats_cache_dir: str = setting(
        "", "cached FID reference statistics; empty: $EAR_DIST_CACHE/fid-stats or ~/.cache/ear-dist/fid-stats")
    grid_prompts: int = setting(4, "prompts per suite in the before/after grid")
    guidance_sweep: list[float] = setting(
        factory=lambda: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
        help="suite guidance:<suite>: the CFG weights its concept test prompts are sampled at (docs/attacks.md)")
    guidance_negative: bool = setting(
        True, "suite guidance:<suite>: also sample each guided weight with the concept word as the negative prompt "
              "(the CFG unconditional branch)")
    attack: EvalAttackConfig = field(default_factory=EvalAttackConfig)


@dataclass
class Config:
    """The whole config tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preserve: PreserveConfig = field(default_factory=PreserveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """The tree as plain data (YAML/JSON safe)."""
        # through JSON so tuples become lists
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> "Config":
        """Check the values (see ``ear_dist.config.checks.validate``); return self."""
        validate(self)
        return self
