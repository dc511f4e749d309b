"""Adversarial erasure: attacks made against the current student during training join its erasure pairs.

The AdvUnlearn idea with the project's discrete attack: every ``erase.adversarial.every`` steps a GCG prompt
search (``ear_dist.eval.attacks.search``, the eval's white-box attack) looks, against the student as it is at
that step, for prompts under which the concept's base images are likely again, leaving out the concept's words
(``erase.concept`` and ``erase.adversarial.exclude``). The ``erase.adversarial.prompts`` best prompts become
erasure pairs for the rest of the run: the adversarial prompt as the target, with the surrogate prompt and the
stored images of one of the run's own erasure pairs (so the target images are the concept's, as in the attack).
The pairs held in memory (``PairStream``) grow by them from the next batch on.

``erase.adversarial.attack=inversion`` attacks with concept inversion instead (the eval's other white-box
attack): new words' embeddings learned against the student; the run keeps the words (``<adv0_0> <adv0_1>``),
known to the tokenizer and to the teacher's and the student's embedding modules from then on, and pairs
whose targets hold them ("a photo of a <adv0_0> <adv0_1>", the inversion's templates in turn).

Each attack is recorded in ``<train.out_dir>/adversarial.jsonl`` (the main rank writes it); a resumed run
replays the records up to its checkpoint, so it draws the same batches as an unbroken run, and attacks again
from there. Multi-concept runs attack each concept in turn. Under data parallelism the main rank's prompts are
broadcast, so every rank adds the same pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from ear_dist.config import Config, ConfigError
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import PairStream
from ear_dist.storage import write_text_atomic
from ear_dist.train.loop import Hook, StepRecord, Tally

log = logging.getLogger("ear_dist.train")

RECORD_FILE = "adversarial.jsonl"
SOURCE = "adversarial-search"


def enabled(cfg: Config) -> bool:
    return cfg.erase.adversarial.every > 0


def check_stream(cfg: Config, stream) -> None:
    """The pairs must be held in memory to grow (a shard directory streams fixed files)."""
    if enabled(cfg) and not isinstance(stream, PairStream):
        raise ConfigError(f"erase.adversarial.every: adversarial pairs join pairs held in memory; data.pairs "
                          f"{cfg.data.pairs} is a shard directory (use a pairs file)")


def read_records(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / RECORD_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(cfg: Config, stream, out_dir: Path, start: int) -> int:
    """Before a resumed run redraws its batches: the additions recorded before ``start`` (the checkpoint's
    batches drawn), each after the batch it followed; later records (made after the checkpoint) are dropped.
    Returns the number of pairs added."""
    if not enabled(cfg) or start <= 0:
        return 0
    added = 0
    for record in read_records(out_dir):
        if record["after"] > start:
            break
        for _ in range(record["after"] - stream.step):
            stream.next()
        stream.add([PromptPair(**p) for p in record["pairs"]])
        added += len(record["pairs"])
    return added


class AdversarialPairs(Hook):
    """The hook that attacks the student and adds the pairs (see the module's doc)."""

    def __init__(self, job, out_dir: Path, start: int):
        self.job, self.cfg, self.a = job, job.cfg, job.cfg.erase.adversarial
        self.out_dir = Path(out_dir)
        if job.student.zero_stage == 3:
            raise ConfigError("erase.adversarial.every: the attacks read the whole student; ZeRO-3 partitions it "
                              "(use ZeRO-1 or 2)")
        check_stream(self.cfg, job.stream)
        own = [p for p in job.stream.pairs if not p.is_anchor and p.source != SOURCE]
        self.sources = {c: [p for p in own if (p.concept or self.cfg.erase.concept) == c]
                        for c in dict.fromkeys(p.concept or self.cfg.erase.concept for p in own)}
        self._targets: dict[str, torch.Tensor] = {}
        kept = [r for r in read_records(self.out_dir) if r["after"] <= start] if start > 0 else []
        self.attacks = 0
        self.words: dict[str, torch.Tensor] = {}  # the inversion's words so far -> their embeddings
        self._words_scope = contextlib.ExitStack()
        for record in kept:  # a resumed run knows the words its replayed pairs hold
            self._learn_words(record)
            self.attacks += 1
        if job.rt.is_main:  # keep only what the checkpoint's batches saw (the rest is attacked again)
            write_text_atomic(self.out_dir / RECORD_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def after_step(self, rec: StepRecord, tally: Tally) -> None:
        after = rec.step + 1
        if after % self.a.every or after >= self.cfg.train.steps:
            return
        record = {"after": after, "attacks": {}, "pairs": []}
        for concept in self.sources:
            prompts, loss, words = self._attack(concept, after)
            record["attacks"][concept] = {"prompts": prompts, "loss": loss, **words}
            record["pairs"] += [dataclasses.asdict(p) for p in self._pairs(concept, prompts, after)]
        record = self._agreed(record)
        self._learn_words(record)
        self.job.stream.add([PromptPair(**p) for p in record["pairs"]])
        self.attacks += 1
        if self.job.rt.is_main:
            with open(self.out_dir / RECORD_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        log.info("step %d: adversarial search found %s; %d pairs now", after,
                 "; ".join(f"{c}: {v['prompts'][0]!r} (loss {v['loss']:.3f})" for c, v in record["attacks"].items()),
                 len(self.job.stream.pairs), extra={"shared": True})

    def _attack(self, concept: str, after: int) -> tuple[list[str], float, dict]:
        a = self.a
        student = dataclasses.replace(self.job.bundle, model=self.job.student.module)
        was_training = student.model.training
        try:
            if a.attack == "inversion":
                return self._invert(student, concept, after)
            from ear_dist.eval.attacks.search import SearchBudget, search_prompts

            budget = SearchBudget(steps=a.steps, candidates=a.candidates, top_k=a.top_k, length=a.length,
                                  batch=a.batch, prompts=a.prompts, images=0, seed=a.seed + after,
                                  guidance_weight=self.cfg.rollout.guidance_weight)
            exclude = [concept, self.cfg.erase.concept, *a.exclude]
            result = search_prompts(student, self._concept_targets(concept), budget, template=a.template,
                                    exclude=list(dict.fromkeys(exclude)))
            return result.prompts, float(result.losses[0]), {}
        finally:
            student.model.train(was_training)

    def _invert(self, student, concept: str, after: int) -> tuple[list[str], float, dict]:
        """Concept inversion against the student: new words (named after the attack, ``<adv3_0>``) whose learned
        embeddings the run keeps (``_learn_words``), in prompts cycling the inversion's templates."""
        from ear_dist.eval.attacks.inversion import DEFAULT_TEMPLATES, InversionBudget, attack_prompts, invert_concept

        a = self.a
        budget = InversionBudget(steps=a.steps, tokens=a.tokens, batch=a.batch, lr=a.lr, images=0,
                                 seed=a.seed + after, guidance_weight=self.cfg.rollout.guidance_weight)
        result = invert_concept(student, self._concept_targets(concept), budget)
        names = [f"<adv{self.attacks}_{len(self.words) + k}>" for k in range(a.tokens)]
        prompts = attack_prompts(names, DEFAULT_TEMPLATES, a.prompts)
        return prompts, float(result.losses[-1]), {"words": names, "vectors": result.vectors.tolist()}

    def _learn_words(self, record: dict) -> None:
        """The inversion's words, known from now on to the tokenizer and to both embedding modules (the teacher's
        and the student's: the teacher's targets and the student's outputs both read the adversarial prompts)."""
        for attack in record["attacks"].values():
            for word, vector in zip(attack.get("words", []), attack.get("vectors", [])):
                self.words[word] = torch.tensor(vector)
        if not self.words or all(not a.get("words") for a in record["attacks"].values()):
            return
        from ear_dist.eval.attacks.common import new_words

        self._words_scope.close()
        self._words_scope = contextlib.ExitStack()
        names = list(self.words)
        device = self.job.bundle.device
        table = torch.stack([self.words[w] for w in names]).to(device)
        student = dataclasses.replace(self.job.bundle, model=self.job.student.module)
        self._words_scope.enter_context(new_words(self.job.bundle, names, lambda: table))
        if self.job.student.module is not self.job.bundle.model:  # the student's own embedding module
            self._words_scope.enter_context(new_words(student, names, lambda: table))

    def close(self) -> None:
        self._words_scope.close()

    def _concept_targets(self, concept: str) -> torch.Tensor:
        """The concept's base images: the erasure pairs' stored target images, else the teacher's rollouts."""
        if concept not in self._targets:
            from ear_dist.eval.attacks.common import sample_targets

            pairs, n = self.sources[concept], self.a.targets
            stored = [p.target_tokens for p in pairs if p.target_tokens is not None][:n]
            if len(stored) == n:
                self._targets[concept] = torch.tensor(stored, dtype=torch.long)
            else:
                r = self.cfg.rollout
                prompts = [pairs[i % len(pairs)].target for i in range(n)]
                self._targets[concept] = sample_targets(self.job.bundle, prompts, self.a.seed, r.guidance_weight,
                                                        r.temperature, r.top_k).cpu()
        return self._targets[concept]

    def _pairs(self, concept: str, prompts: Sequence[str], after: int) -> list[PromptPair]:
        sources = self.sources[concept]
        out = []
        for i, prompt in enumerate(prompts):
            src = sources[(self.attacks * len(prompts) + i) % len(sources)]
            out.append(PromptPair(prompt, src.surrogate, src.concept, src.surrogate_concept, src.category, SOURCE,
                                  src.seed, surrogate_tokens=src.surrogate_tokens, target_tokens=src.target_tokens,
                                  extra={"after": after}))
        return out

    def _agreed(self, record: dict) -> dict:
        """The main rank's record on every rank (a search's floats may differ between ranks' hardware)."""
        if not self.job.rt.distributed:
            return record
        import torch.distributed as dist

        box: list[Optional[dict]] = [record]
        dist.broadcast_object_list(box, src=0)
        return box[0]
