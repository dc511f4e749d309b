"""White-box attacks on an erased model: concept inversion (learned word embeddings) and a GCG-style discrete
prompt search, both driven by the teacher-forced likelihood of the base model's own images of the concept."""

from ear_dist.eval.attacks.common import AttackError, sample_targets
from ear_dist.eval.attacks.inversion import InversionBudget, InversionResult, invert_concept
from ear_dist.eval.attacks.search import SearchBudget, SearchResult, search_prompts

__all__ = ["AttackError", "InversionBudget", "InversionResult", "SearchBudget", "SearchResult", "invert_concept",
           "sample_targets", "search_prompts"]
