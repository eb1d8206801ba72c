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

FULL = {"strategies": "--limit-requests 50000", "storm": "--step-seconds 3 --latency-seconds 5",
        "recall": "", "send": "--seconds 5", "sync": "--runs 3", "soak": "--minutes 2",
        "push": "--runs 2 --idle-seconds 10 --steps 0,1000,2000,3000"}  # fmt: skip
SECTIONS = ("strategies", "storm", "recall", "send", "sync", "push", "soak")  # each with --quick


def run_section(name: str, quick: bool) -> tuple[str, float]:
    """Run one section; its markdown, H1 made the numbered H2 and the rest one level down."""
    command = [sys.executable, f"bench/{name}.py", *("--quick" if quick else FULL[name]).split()]
    print(f"\n=== {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()  # a section's progress is on stderr; its markdown in its file
    code = subprocess.run(command, cwd=common.ROOT, stdout=subprocess.DEVNULL).returncode
    took, md = time.monotonic() - started, Path(f"{common.results_stem(name)}.md")
    if not md.exists() or md.stat().st_mtime < time.time() - took - 1:
        return f"**Failed**: `{' '.join(command[1:])}` exited {code}.", took
    body = md.read_text().strip().split("\n", 1)[1]  # without its own H1
    ran = f"`{' '.join(command[1:])}`" + (f" exited {code}." if code else "")  # soak's verdict
    return ran + "\n\n" + re.sub(r"^(#{2,5}) ", r"#\1 ", body, flags=re.M), took


def main() -> None:
    args = common.parse(__doc__, "", only=(list(SECTIONS), "sections"), skip=[""])
    names = [n for n in args.only if n not in args.skip]
    if set(names) - set(SECTIONS):
        sys.exit(f"unknown sections {sorted(set(names) - set(SECTIONS))}")
    os.environ.setdefault("BENCH_DATE", datetime.date.today().isoformat())
    with common.section():
        machine = common.machine()
        done = {name: run_section(name, args.quick) for name in names}
    seconds = {name: t for name, (_, t) in done.items()}
    each = ", ".join(f"{name} {t / 60:.1f} min" for name, t in seconds.items())
    run = f"`make bench{' BENCH_ARGS=--quick' * args.quick}` took {sum(seconds.values()) / 60:.0f}"
    lines = common.header("imcore benchmarks", machine, f"{run} min: {each}.")
    lines += ["**Quick run (smoke sizes): not for comparison.**", ""] if args.quick else []
    for number, (name, (body, _)) in enumerate(done.items(), 1):
        lines += [f"## {number}. {name}", "", body, ""]
    data = {"machine": machine, "quick": args.quick, "seconds": seconds}
    common.write_results("", "\n".join(lines), data)
    if failed := [name for name, (body, _) in done.items() if body.startswith("**Failed**")]:
        sys.exit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
