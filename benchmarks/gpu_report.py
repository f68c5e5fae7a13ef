#!/usr/bin/env python
"""Assemble OUT/gpu_report.md and OUT/gpu_report.json from a finished benchmarks/gpu_check.sh.

Reads OUT/logs/versions.json, OUT/logs/pytest-gpu.xml, the trainer runs' logs (OUT/logs/train-*.
{log,jsonl}, resume-small-zero2.*) and OUT/throughput/*/throughput.{md,json}. Refuses (exit 1, one
line) when a piece is missing, a gpu test failed, on a CUDA device any gpu test was skipped, the big
trainer run logged throughput fewer than twice after its warm-up window, the ZeRO-0 run did not
evaluate, or the ZeRO-2 run did not resume: a report that exists means every check ran and passed.

The trainer's numbers are what pretrain_mesh.py logged (perf/tokens_per_s, perf/mfu of the log
windows after the first), beside throughput.py's `trainer-shape` mesh row (the same shape and
step, timed on its own).

  python benchmarks/gpu_report.py OUT
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def fail(msg: str) -> None:
    print(f"gpu_report: {msg}", file=sys.stderr)
    sys.exit(1)


def pytest_summary(path: str) -> dict:
    if not os.path.isfile(path):
        fail(f"{path} is missing: the pytest step did not run")
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["cases"] = [c.get("name") for c in suite.iter("testcase")]
    return counts


def _read(path: str, what: str) -> str:
    if not os.path.isfile(path):
        fail(f"{path} is missing: {what} did not run")
    return open(path).read()


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def trainer_section(out: str) -> tuple[dict, list[str]]:
    """The trainer's logged throughput and MFU beside throughput.py's at the same shape, and
    the ZeRO-0 eval / ZeRO-2 resume checks."""
    logs = os.path.join(out, "logs")
    records = [json.loads(line) for line in _read(os.path.join(logs, "train-big.jsonl"), "the big trainer run")
               .splitlines() if line.strip()]
    windows = [r for r in records if "perf/tokens_per_s" in r]
    steady = [r for r in windows if not r.get("perf/warmup")]
    if len(steady) < 2:
        fail(f"the big trainer run logged {len(steady)} throughput windows after warm-up (need 2): "
             f"{os.path.join(logs, 'train-big.jsonl')}")
    trainer = {"tokens_per_s": median([r["perf/tokens_per_s"] for r in steady]),
               "mfu": median([r["perf/mfu"] for r in steady]) if all("perf/mfu" in r for r in steady) else None,
               "windows": [{k: r.get(k) for k in ("step", "perf/tokens_per_s", "perf/mfu")} for r in steady]}
    rows = json.loads(_read(os.path.join(out, "throughput", "trainer-shape", "throughput.json"),
                            "throughput.py at the trainer's shape"))
    bench = next((r for r in rows if r["variant"] == "mesh" and r["status"] == "ok"), None)
    if bench is None:
        fail("throughput.py at the trainer's shape has no measured mesh row")
    zero0 = _read(os.path.join(logs, "train-small-zero0.log"), "the ZeRO-0 run")
    if zero0.count("validation at iter") < 2:
        fail("the ZeRO-0 run logged fewer than two validations")
    resumed = _read(os.path.join(logs, "resume-small-zero2.log"), "the ZeRO-2 resume")
    if "resumed from" not in resumed or "iteration 3" not in resumed:
        fail("the ZeRO-2 run did not resume from its step-3 checkpoint")
    ratio = {k: trainer[k] / bench[k] if trainer[k] and bench.get(k) else None for k in ("tokens_per_s", "mfu")}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def ratio_text(v):
        return "-" if v is None else f"{v:.3f}"

    shape = (f"{bench['preset']} mesh, seq {bench['seq_length']}, micro-batch {bench['micro_batch_size']} x "
             f"grad-accum {bench['grad_accum']}, {bench['dtype']}, ZeRO {bench['zero_stage']}")
    md = ["## The trainer's MFU (pretrain_mesh.py's log) beside throughput.py's", "", shape, "",
          "| | tokens/s | MFU |", "|---|---:|---:|",
          f"| trainer, logged (median of {len(steady)} windows after warm-up) | {trainer['tokens_per_s']:,.0f} | "
          f"{pct(trainer['mfu'])} |",
          f"| throughput.py, the trainer's {bench['step']} | {bench['tokens_per_s']:,.0f} | {pct(bench['mfu'])} |",
          f"| trainer / throughput.py | {ratio_text(ratio['tokens_per_s'])} | {ratio_text(ratio['mfu'])} |", "",
          "Also run: ZeRO-0 bf16 with two validations; ZeRO-2 bf16 saved at step 3 and resumed to step 6.", ""]
    return {"trainer": trainer, "throughput": bench, "trainer_vs_throughput": ratio, "shape": shape}, md


def main(out: str) -> None:
    versions_path = os.path.join(out, "logs", "versions.json")
    if not os.path.isfile(versions_path):
        fail(f"{versions_path} is missing: the versions step did not run")
    versions = json.load(open(versions_path))
    tests = pytest_summary(os.path.join(out, "logs", "pytest-gpu.xml"))
    if tests["failures"] or tests["errors"]:
        fail(f"gpu tests failed: {tests}")
    on_gpu = versions["device"] != "cpu"
    if on_gpu and (tests["skipped"] or not tests["passed"]):
        fail(f"{tests['skipped']} gpu tests skipped on a CUDA device: {tests}")
    runs = sorted(glob.glob(os.path.join(out, "throughput", "*", "throughput.json")))
    if not runs:
        fail(f"no throughput results under {out}/throughput")
    benchmarks = {}
    sections = []
    for path in runs:
        name = os.path.basename(os.path.dirname(path))
        rows = json.load(open(path))
        if not rows:
            fail(f"{path} has no rows")
        benchmarks[name] = rows
        sections.append(f"### {name}\n\n" + open(os.path.join(os.path.dirname(path), "throughput.md")).read())

    trainer, trainer_md = trainer_section(out)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    report = {"date": date, **versions, "tests": tests, "trainer_real_path": trainer, "benchmarks": benchmarks}
    md = [f"# GPU check: {versions['device']}", "",
          f"{date}; {versions['device_count']} device(s); torch {versions['torch']} (CUDA {versions['cuda']}), "
          f"megatron-core {versions['megatron_core']}, deepspeed {versions['deepspeed']}, "
          f"transformers {versions['transformers']}", "",
          f"pytest -m gpu: {tests['passed']} passed, {tests['skipped']} skipped "
          f"({', '.join(tests['cases'])})", "", *trainer_md, *sections]
    for name, text in (("gpu_report.json", json.dumps(report, indent=1) + "\n"), ("gpu_report.md", "\n".join(md))):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: gpu_report.py OUT")
    main(sys.argv[1])
