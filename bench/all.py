"""``make bench``: every section in its own process (each with its own ``--quick``), their
markdown joined into ``bench/results/<date>-<host>.md`` under one header."""

import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

SECTIONS = ("strategies", "storm", "recall", "send", "sync", "push", "soak")  # each with --quick
FULL = {"soak": ["--minutes", "2"]}  # a short soak: its memory plot, not its 10-minute verdict


def run_section(name: str, quick: bool) -> tuple[str, float]:
    """Run one section; its markdown, H1 made the numbered H2 and the rest one level down."""
    command = [sys.executable, f"bench/{name}.py", *(["--quick"] if quick else FULL.get(name, []))]
    print(f"\n=== {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    # The sections print their progress on stderr and their markdown on stdout.
    code = subprocess.run(command, cwd=common.ROOT, stdout=subprocess.DEVNULL).returncode
    took, md = time.monotonic() - started, Path(f"{common.results_stem(name)}.md")
    if not md.exists() or md.stat().st_mtime < time.time() - took - 1:
        return f"**Failed**: `{' '.join(command[1:])}` exited {code}.", took
    body = md.read_text().strip().split("\n", 1)[1]  # without its own H1
    exited = f"\n\n`{' '.join(command[1:])}` exited {code}." if code else ""  # the soak's verdict
    return re.sub(r"^(#{2,5}) ", r"#\1 ", body, flags=re.M) + exited, took


def main() -> None:
    args = common.parse(__doc__, "", only=(list(SECTIONS), "sections"), skip=[""])
    names = [n for n in args.only if n not in args.skip]
    if set(names) - set(SECTIONS):
        sys.exit(f"unknown sections {sorted(set(names) - set(SECTIONS))}")
    os.environ.setdefault("BENCH_DATE", datetime.date.today().isoformat())
    with common.section():
        machine = common.machine()
        done = {name: run_section(name, args.quick) for name in names}
    took = sum(t for _, t in done.values())
    each = ", ".join(f"{name} {t / 60:.1f} min" for name, (_, t) in done.items())
    run = f"`make bench{' BENCH_ARGS=--quick' if args.quick else ''}`"
    lines = common.header("imcore benchmarks", machine, f"{run} took {took / 60:.0f} min: {each}.")
    lines += ["**Quick run (smoke sizes): not for comparison.**", ""] if args.quick else []
    for number, (name, (body, _)) in enumerate(done.items(), 1):
        lines += [f"## {number}. {name}", "", body, ""]
    seconds = {n: t for n, (_, t) in done.items()}
    data = {"machine": machine, "quick": args.quick, "seconds": seconds}
    common.write_results("", "\n".join(lines), data)
    if failed := [name for name, (body, _) in done.items() if body.startswith("**Failed**")]:
        sys.exit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
