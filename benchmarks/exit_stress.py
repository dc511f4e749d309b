"""How often does a finished 2-rank job exit 0? Launches a short erase many times and counts exit codes.

    python benchmarks/exit_stress.py --launches 20                        # 8 cells x 20 launches
    python benchmarks/exit_stress.py --launches 5 --cells zero2-bf16-busy  # one cell
    python benchmarks/exit_stress.py --launches 20 --table results/exit-stress-run.md
    python benchmarks/exit_stress.py --launches 5 --baseline-code /tmp/before   # interleaved with older code

Each launch is a real ``torchrun --nproc_per_node=2 -m ear_dist erase`` (gloo on CPU) of a tiny
Janus model for 2 steps into a fresh ``train.out_dir``; a cell is one ZeRO stage (2 or 3), one
dtype (bfloat16 or float32) and, in the ``busy`` cells, a process spinning on a CPU beside the
ranks (the timing a full test suite gives them). A launch counts as clean when it exits 0 and
its outputs are complete (delta, summary, run record); an abort at interpreter exit shows as a
non-zero code with "terminate called" (SIGABRT) in the ranks' stderr. ``--baseline-code DIR``
(a copy of the repository at an older commit) runs each launch of that code right after the
same launch of this tree, so both meet the same machine load; ``--records FILE`` appends
one JSON line per launch as it ends, so a stopped run still counts. Not part of CI: on 2
cores a launch takes 15-40 s.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_header  # noqa: E402

PAIRS = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
         {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]
CELLS = [f"zero{stage}-{dtype}{busy}" for stage in (2, 3) for dtype in ("bf16", "float32") for busy in ("", "-busy")]
DTYPES = {"bf16": "bfloat16", "float32": "float32"}
OUTPUTS = ("delta.safetensors", "summary.json", "run.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spin(stop) -> None:
    """The busy process: one core at 100% until told to stop."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def launch(cell: str, code: Path, out: Path, model: Path, pairs: Path, timeout_s: float) -> dict:
    """One 2-rank erase of the ear-dist in ``code``; its exit code, seconds, whether the outputs are complete."""
    stage, dtype = cell.split("-")[:2]
    sets = [f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}", "train.steps=2",
            "train.pairs_per_step=2", "erase.window_len=4", "erase.loss_threshold=0", "erase.update_mode=sequence",
            "trainable.first_k_layers=2", f"model.dtype={DTYPES[dtype]}", f"dist.deepspeed_config={stage}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ear_dist", "erase", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, stderr = res.returncode, res.stderr
    except subprocess.TimeoutExpired as e:
        code, stderr = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
            else (e.stderr or "")
    complete = all((out / name).is_file() for name in OUTPUTS) and _finished_record(out)
    return {"code": code, "seconds": time.perf_counter() - t0, "complete": complete,
            "aborted": "terminate called" in stderr or "SIGABRT" in stderr, "stderr_tail": stderr[-1500:]}


def _finished_record(out: Path) -> bool:
    """The run record says step 2 finished and the summary names the delta."""
    try:
        record = json.loads((out / "run.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("finished_step") == 2 and bool(summary.get("delta"))


def run_cell(cell: str, codes: dict[str, Path], launches: int, work: Path, model: Path, pairs: Path,
             timeout_s: float, records: Path | None) -> dict[str, list[dict]]:
    """``launches`` launches of each code in turn; their results by code."""
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=spin, args=(stop,), daemon=True) if cell.endswith("-busy") else None
    if busy:
        busy.start()
    try:
        results: dict[str, list[dict]] = {name: [] for name in codes}
        for i in range(launches):
            for name, code in codes.items():
                r = launch(cell, code, work / f"{name}-{cell}-{i}", model, pairs, timeout_s)
                results[name].append(r)
                if records:
                    with open(records, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"cell": cell, "tree": name, "launch": i, **r}) + "\n")
                if r["code"] != 0 or not r["complete"]:
                    print(f"{name} {cell} launch {i}: exit {r['code']}, outputs complete: {r['complete']}\n"
                          f"{r['stderr_tail']}", file=sys.stderr, flush=True)
        return results
    finally:
        if busy:
            stop.set()
            busy.join()


def table(counts: dict[str, dict[str, list[dict]]]) -> list[str]:
    """One row per code and cell, then one per code over all cells."""
    lines = ["| code | cell | launches | exit 0, outputs complete | exit codes | aborts (terminate called) "
             "| s per launch |", "|---|---|---:|---:|---|---:|---:|"]
    names = next(iter(counts.values())).keys()
    rows = [(name, cell, by_code[name]) for name in names for cell, by_code in counts.items()]
    rows += [(name, "all", [r for by_code in counts.values() for r in by_code[name]]) for name in names]
    for name, cell, results in rows:
        codes = collections.Counter(str(r["code"]) for r in results)
        clean = sum(r["code"] == 0 and r["complete"] for r in results)
        mean_s = sum(r["seconds"] for r in results) / len(results)
        lines.append(f"| {name} | {cell} | {len(results)} | {clean} | "
                     f"{', '.join(f'{c}: {n}' for c, n in sorted(codes.items()))} | "
                     f"{sum(r['aborted'] for r in results)} | {mean_s:.1f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launches", type=int, default=20, help="launches per cell (default 20)")
    p.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS, help="cells to run (default all 8)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a launch counts as hung")
    p.add_argument("--table", type=Path, default=None, help="also write the header and table to this file")
    p.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (default: a temp dir)")
    p.add_argument("--baseline-code", type=Path, default=None, metavar="DIR",
                   help="a copy of the repository at an older commit: its launches interleave with this tree's")
    p.add_argument("--records", type=Path, default=None, help="append one JSON line per launch to this file")
    args = p.parse_args()
    header = run_header("exit_stress")
    print("\n".join(header), flush=True)
    from ear_dist.models.janus import save_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="exit-stress-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = save_tiny_checkpoint(work / "model", seed=0)
        pairs = work / "pairs.json"
        pairs.write_text(json.dumps(PAIRS))
        codes = {"this tree": ROOT, **({"baseline": args.baseline_code.resolve()} if args.baseline_code else {})}
        counts = {cell: run_cell(cell, codes, args.launches, work, model, pairs, args.timeout, args.records)
                  for cell in args.cells}
    lines = table(counts)
    print("\n".join(lines))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n".join(header + [""] + lines) + "\n")
    failed = sum(r["code"] != 0 or not r["complete"] for by_code in counts.values() for rs in by_code.values()
                 for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
