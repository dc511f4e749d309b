"""The research harness on the planted-concept world, beside the benchmarks that use it.

``compare``: methods (config overrides) run over world builds, erasure seeds and held-out
splits, judged with the figures of ``ear_dist/eval/figures.py`` (``bench_preservation.py``,
``eval_noise.py``); ``damage``: where an erasure's damage comes from (``world_damage.py``).
The product keeps the world, its suite and ``ear-dist demo`` (``ear_dist/world/``).
"""
