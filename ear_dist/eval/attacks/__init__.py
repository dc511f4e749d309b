"""Attacks on an erased model in ``ear-dist eval`` (docs/attacks.md).

- ``hook``: the per-column hook: an attack suite's prompts (and a model patch) prepared against each column,
  once per (suite, column), over the ranks, resumed from the output directory; the guidance sweep suite;
- ``inversion``, ``search``: the white-box attacks, concept inversion (learned word embeddings) and a GCG-style
  discrete prompt search, both driven by the teacher-forced likelihood of the base model's own images of the
  concept; ``whitebox``: the two as suites (``--suite attack:inversion:<concept>``, ``attack:search:<concept>``);
- ``cost``: their FLOPs at any Janus shape.
"""

from ear_dist.eval.attacks.hook import (ColumnAttack, PreparedFile, attack_id, attack_suite, guidance_groups,
                                        guidance_suite, patch_context, prepare_attacks, read_prepared, run_per_column,
                                        seeded, tensors_digest)
from ear_dist.eval.attacks.common import AttackError, sample_targets
from ear_dist.eval.attacks.inversion import InversionBudget, InversionResult, invert_concept
from ear_dist.eval.attacks.search import SearchBudget, SearchResult, search_prompts

__all__ = ["AttackError", "ColumnAttack", "InversionBudget", "InversionResult", "PreparedFile", "SearchBudget",
           "SearchResult", "attack_id", "attack_suite", "guidance_groups", "guidance_suite", "invert_concept",
           "patch_context", "prepare_attacks", "read_prepared", "run_per_column", "sample_targets", "search_prompts",
           "seeded", "tensors_digest"]
