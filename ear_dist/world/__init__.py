"""A deterministic synthetic world in which concept erasure is measurable on a CPU."""

from ear_dist.world.grammar import WorldRecord
from ear_dist.world.vocabulary import Vocabulary
from ear_dist.world.world import World, WorldBatch

__all__ = ["Vocabulary", "World", "WorldBatch", "WorldRecord"]
