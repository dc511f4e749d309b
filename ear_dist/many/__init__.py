"""Many concepts at once: ``ear-dist erase-many`` from a concepts file to one report.

``spec`` reads and checks the concepts file; ``job`` runs the stages (pairs -> filter ->
train -> merge -> eval), each resumable in the job's directory; ``report`` writes
report.md and report.json. Slurm renders the same job as an array plus a merge/eval step
(``ear_dist.many.slurm_job``).
"""
