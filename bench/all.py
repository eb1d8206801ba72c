"""``make bench``: every section in one run, gathered into ``bench/results/<date>-<host>.md``.

Each section (``strategies``, ``storm``, ``send``, ``sync``, ``push``) runs as its own process,
starting and stopping what it needs, and writes ``<section>-<date>-<host>.md``, ``.json`` and
its plot (PNG); this script joins their markdown, which links the plots, under one header.

    python bench/all.py [--only strategies,send] [--skip push] [--quick]
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common


@dataclass
class Section:
    name: str
    title: str
    args: str
    quick: str  # smaller sizes for a smoke run


SECTIONS = [
    Section(
        "strategies",
        "Consistency strategies under contention, against redis-benchmark",
        "--runs 3",
        "--runs 1 --seconds 1 --limit-requests 20000",
    ),
    Section(
        "storm",
        "Storm: one large group in channel mode, the pipeline and the fan-out; the ceiling",
        "",
        "--sizes 500,5000 --seconds 2 --latency-seconds 3 --members 500 --max-groups 2 "
        "--step-seconds 2 --senders 2 --live 100 --live-messages 3",
    ),
    Section(
        "send",
        "Hot API calls over HTTP, against pgbench",
        "",
        "--clients 1,16 --seconds 3 --warmup 1",
    ),
    Section(
        "sync",
        "Sync: catch-up, gap snapshot, versions, acks",
        "--runs 5",
        "--runs 1 --catchup-messages 100 --sweep 25,50,100 --big-group 500",
    ),
    Section(
        "push",
        "Live sync and push: idle sockets, delivery to online devices",
        "--runs 3",
        "--runs 1 --members 100 --messages 3 --steps 0,100,200 --idle-seconds 3",
    ),
]


def run_section(section: Section, quick: bool) -> dict:
    """Run one section's script; returns its outcome and the files it wrote."""
    args = (section.quick if quick else section.args).split()
    command = [sys.executable, str(common.ROOT / "bench" / f"{section.name}.py"), *args]
    print(f"\n=== {section.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    # The sections print their own progress on stderr and their markdown on stdout.
    proc = subprocess.run(command, cwd=common.ROOT, stdout=subprocess.DEVNULL)
    took = time.monotonic() - started
    stem = common.results_stem(section.name)
    md, js = Path(f"{stem}.md"), Path(f"{stem}.json")
    fresh = md.exists() and md.stat().st_mtime >= time.time() - took - 1
    outcome = {"command": command[1:], "returncode": proc.returncode, "seconds": round(took, 1)}
    if proc.returncode == 0 and fresh:
        outcome["markdown"] = md.read_text()
        outcome["data"] = json.loads(js.read_text()) if js.exists() else None
    return outcome


def demote(markdown: str, number: int, title: str) -> str:
    """A section's own file as part of the report: its H1 becomes the numbered H2."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join(lines).strip()
    body = re.sub(r"^(#{2,5}) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)
    return f"## {number}. {title}\n\n{body}\n"


def report(outcomes: dict, machine: str, took: float, quick: bool) -> str:
    lines = common.header(
        "imcore benchmarks",
        machine,
        f"`make bench{' BENCH_ARGS=--quick' if quick else ''}` took {took / 60:.0f} min: "
        + ", ".join(f"{name} {o['seconds'] / 60:.1f} min" for name, o in outcomes.items())
        + ". Everything shares the machine's cores.",
    )
    if quick:
        lines += ["**Quick run (smoke sizes): these figures are not for comparison.**", ""]
    for number, (name, o) in enumerate(outcomes.items(), 1):
        title = next(s.title for s in SECTIONS if s.name == name)
        if "markdown" in o:
            lines.append(demote(o["markdown"], number, title))
        else:
            failed = f"**Failed**: `{' '.join(o['command'])}` exited {o['returncode']}."
            lines += [f"## {number}. {title}", "", failed, ""]
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    names = [s.name for s in SECTIONS]
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=split, default=names, help=f"sections among {names}")
    parser.add_argument("--skip", type=split, default=[])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, one run each")
    args = parser.parse_args()
    unknown = set(args.only + args.skip) - set(names)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; sections are {names}")
    return args


def main() -> None:
    args = parse()
    os.environ.setdefault("BENCH_DATE", datetime.date.today().isoformat())
    with common.broker_stopped_after():
        run(args)


def run(args: argparse.Namespace) -> None:
    common.setup_django()
    machine, started = common.machine(), time.monotonic()
    outcomes = {
        s.name: run_section(s, args.quick)
        for s in SECTIONS
        if s.name in args.only and s.name not in args.skip
    }
    markdown = report(outcomes, machine, time.monotonic() - started, args.quick)
    sections = {n: {k: v for k, v in o.items() if k != "markdown"} for n, o in outcomes.items()}
    data = {"machine": machine, "code": common.code_state(), "quick": args.quick}
    common.write_results("", markdown, data | {"sections": sections})
    failed = [name for name, o in outcomes.items() if "markdown" not in o]
    if failed:
        sys.exit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
