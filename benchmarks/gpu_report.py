#!/usr/bin/env python
"""Assemble OUT/gpu_report.md and OUT/gpu_report.json from a finished benchmarks/gpu_check.sh.

Reads OUT/logs/versions.json, OUT/logs/pytest-gpu.xml and OUT/throughput/*/throughput.{md,json}.
Refuses (exit 1, one line) when a piece is missing, a gpu test failed, or, on a CUDA device,
any gpu test was skipped: a report that exists means every check ran and passed.

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

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    report = {"date": date, **versions, "tests": tests, "benchmarks": benchmarks}
    md = [f"# GPU check: {versions['device']}", "",
          f"{date}; {versions['device_count']} device(s); torch {versions['torch']} (CUDA {versions['cuda']}), "
          f"megatron-core {versions['megatron_core']}, deepspeed {versions['deepspeed']}, "
          f"transformers {versions['transformers']}", "",
          f"pytest -m gpu: {tests['passed']} passed, {tests['skipped']} skipped "
          f"({', '.join(tests['cases'])})", "", *sections]
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
