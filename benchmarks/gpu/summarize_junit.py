"""Summarise pytest JUnit XML files into a markdown table and a JSON file.

    python benchmarks/gpu/summarize_junit.py SUMMARY.md OUT.json [--allow-skip 'REGEX<TAB>WHY' ...] NAME:FILE.xml ...

A suite passes when its file exists, at least one test passed, none failed or errored, and every
skipped test's message matches an allowed pattern (``re.search``); the allowed skips are listed
with their reason. On a GPU machine any other skip means that something a test needed (the
compiled extension, a device feature) is missing, so it counts as a failure. Exit status 1 when
any suite did not pass: a selection that ran nothing (pytest's exit status 5) never passes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_suite(path: Path) -> dict:
    """Counts and the tests that did not pass (outcome, name, message)."""
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


def parse_allow(entries: list[str]) -> list[tuple[re.Pattern, str]]:
    """'REGEX<TAB>WHY' entries; an entry without a reason is refused (each allowed skip says why)."""
    allow = []
    for entry in entries:
        pattern, _, why = entry.partition("\t")
        if not pattern.strip() or not why.strip():
            raise SystemExit(f"summarize_junit: --allow-skip needs 'REGEX<TAB>WHY', got {entry!r}")
        allow.append((re.compile(pattern), why.strip()))
    return allow


def judge(suite: dict, allow: list[tuple[re.Pattern, str]]) -> tuple[str, list[dict]]:
    """(verdict, the skips that were allowed, each with its reason)."""
    allowed, bad = [], suite["failed"] + suite["errors"]
    for p in suite["problems"]:
        if p["outcome"] != "skipped":
            continue
        why = next((w for pat, w in allow if pat.search(p["message"])), None)
        if why is None:
            bad += 1
        else:
            p["allowed"] = why
            allowed.append(p)
    return ("ok" if bad == 0 and suite["passed"] > 0 else "FAILED"), allowed


def problem_lines(suite: str, problems: list[dict]) -> list[str]:
    """One line per distinct (outcome, message): how many tests, the first of them (the JSON
    lists them all), so that a cause shared by a hundred tests is one line of the summary."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in problems:
        tag = f"allowed skip ({p['allowed']})" if "allowed" in p else p["outcome"]
        groups.setdefault((tag, p["message"]), []).append(p["test"])
    return [f"- {suite}: {len(tests)} {tag}, e.g. {tests[0]}: {message}" if len(tests) > 1
            else f"- {suite}: {tag} {tests[0]}: {message}" for (tag, message), tests in groups.items()]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary_md")
    ap.add_argument("out_json")
    ap.add_argument("suites", nargs="+", metavar="NAME:FILE.xml")
    ap.add_argument("--allow-skip", action="append", default=[], metavar="REGEX<TAB>WHY")
    args = ap.parse_args(argv)
    allow = parse_allow(args.allow_skip)
    report, ok = {}, True
    lines = ["| suite | passed | failed | errors | skipped (allowed) | seconds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for spec in args.suites:
        name, path = spec.rsplit(":", 1)
        if not Path(path).exists():
            report[name] = {"missing": path, "verdict": "FAILED"}
            lines.append(f"| {name} | - | - | - | - | - | FAILED: no results ({Path(path).name} missing) |")
            ok = False
            continue
        s = read_suite(Path(path))
        verdict, allowed = judge(s, allow)
        if s["passed"] == 0 and verdict == "FAILED" and not s["problems"]:
            verdict = "FAILED: no test ran"
        ok &= verdict == "ok"
        report[name] = {**s, "verdict": verdict}
        lines.append(f"| {name} | {s['passed']} | {s['failed']} | {s['errors']} | {s['skipped']} ({len(allowed)}) | "
                     f"{s['seconds']:.1f} | {verdict} |")
    for name, s in report.items():
        lines += problem_lines(name, s.get("problems", []))
    Path(args.summary_md).write_text("\n".join(lines) + "\n")
    Path(args.out_json).write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
