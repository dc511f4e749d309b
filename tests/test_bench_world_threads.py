"""benchmarks/bench_world_threads.py times the world's real pretraining step: the recipe and batch size it is
given are the ones the timed step runs."""

from benchmarks.bench_world_threads import worker


def test_the_timed_step_is_the_recipes_model_at_the_given_batch_size():
    cell = worker(1, steps=2, seconds=60.0, warmup=1, recipes=["world-large-mini"], batch=4)
    assert cell["steps"] == 2 and cell["batch"] == 4 and cell["torch_threads"] == 1
    default = worker(1, steps=1, seconds=60.0, warmup=1, recipes=[], batch=0)
    assert default["batch"] == 32 and default["weights"] != cell["weights"]
