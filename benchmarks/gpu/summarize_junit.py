"""Summarise pytest JUnit XML files into a markdown table and a JSON file.

    python benchmarks/gpu/summarize_junit.py SUMMARY.md OUT.json NAME:FILE.xml:strict|lenient ...

A "strict" suite counts every skipped test as a failure (on a GPU machine a skipped GPU test means
that something it needed, such as the compiled extension, is missing). Exit status 1 when any
suite failed, errored, is missing, or (strict) skipped a test.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_suite(path: Path) -> dict:
    """Counts and the names of the tests that did not pass."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0}
    problems: list[dict] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        counts["seconds"] += float(case.get("time") or 0.0)
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                problems.append({"test": name, "outcome": outcome,
                                 "message": (child.get("message") or "")[:300]})
                break
        counts[outcome] += 1
    return {**counts, "problems": problems}


def main(argv: list[str]) -> int:
    summary_md, out_json, *suites = argv
    report, ok = {}, True
    lines = ["| suite | passed | failed | errors | skipped | seconds | verdict |", "|---|---|---|---|---|---|---|"]
    for spec in suites:
        name, path, mode = spec.rsplit(":", 2)
        if not Path(path).exists():
            report[name] = {"missing": path}
            lines.append(f"| {name} | - | - | - | - | - | MISSING ({path}) |")
            ok = False
            continue
        s = read_suite(Path(path))
        bad = s["failed"] + s["errors"] + (s["skipped"] if mode == "strict" else 0)
        verdict = "ok" if bad == 0 and s["passed"] > 0 else "FAILED"
        ok &= verdict == "ok"
        report[name] = {**s, "mode": mode, "verdict": verdict}
        lines.append(f"| {name} | {s['passed']} | {s['failed']} | {s['errors']} | {s['skipped']} | "
                      f"{s['seconds']:.1f} | {verdict} |")
    for name, s in report.items():
        for p in s.get("problems", []):
            lines.append(f"- {name}: {p['outcome']} {p['test']}: {p['message']}")
    Path(summary_md).write_text("\n".join(lines) + "\n")
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
