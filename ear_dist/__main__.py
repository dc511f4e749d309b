from ear_dist.cli import run

run()
