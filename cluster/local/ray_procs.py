"""Find and stop the processes of ONE local Ray cluster (``ray stop`` would stop every Ray on the machine).

A cluster's processes are recognised by strings only they carry on their command line: its temp dir(s),
its session name (``session_<date>_<pid>``, unique per cluster) or its GCS address (``--address=<ip>:<port>``,
used by the client server); their descendants count too (agents and workers rename themselves ``ray::...``).

    python cluster/local/ray_procs.py stop --mark /tmp/mage_ray_local/ --gcs-port 6390
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import psutil


def find(marks: Sequence[str], gcs_port: int | None = None) -> list[psutil.Process]:
    """Processes whose command line contains one of ``marks`` or names GCS port ``gcs_port``, + descendants.

    Never the calling process or its ancestors (the shell that runs a stop script may mention the path).
    """
    marks = [m for m in marks if m and len(m) >= 8]  # refuse short marks like "/" or "/tmp/"
    if not marks and gcs_port is None:
        return []
    gcs = re.compile(rf"--(gcs-)?address=\S+:{int(gcs_port)}(\s|$)") if gcs_port else None
    me = psutil.Process()
    spare = {me.pid} | {p.pid for p in me.parents()}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid in spare:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if any(m in cmd for m in marks) or (gcs is not None and gcs.search(cmd)):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True) if c.pid not in spare})
            except psutil.Error:
                pass
    return list(found.values())


def stop(marks: Sequence[str], gcs_port: int | None = None, grace_s: float = 5.0) -> tuple[int, int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace_s``; return (stopped, still alive)."""
    procs = find(marks, gcs_port)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    late = [q for q in find(marks, gcs_port) if q.pid not in {p.pid for p in procs}]
    for p in alive + late:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive + late, timeout=5)
    return len(procs) + len(late), len(find(marks, gcs_port))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["list", "stop"])
    ap.add_argument(
        "--mark", action="append", default=[], help="a string only this cluster's processes carry"
    )
    ap.add_argument("--gcs-port", type=int, default=None)
    ap.add_argument("--grace-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.action == "list":
        for p in find(args.mark, args.gcs_port):
            print(p.pid, " ".join(p.cmdline())[:160])
        return 0
    n, left = stop(args.mark, args.gcs_port, args.grace_s)
    print(f"stopped {n} Ray process(es)" + (f"; {left} still alive" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
