#!/usr/bin/python3
"""Wake-ups and CPU per client write: Ferry standalone against a primary with a regional
replica (regional_bench.py's regional-wan: 40 ms relay capped at 100 Mbit/s, the regional
peer's files on /dev/shm), under regional_bench.py's paced load (fio 16 KiB random writes of
random data, QD4) at half the link and at 2.5x it, 10 s each.

For each run it prints fio's p50/p99, the primary's CPU cores and CPU µs per write, its
voluntary and involuntary context switches per write (every thread, /proc/PID/task/*/status)
and the device writes and flushes per write (/proc/diskstats of the disk under target/).

Usage: cargo build --release -p ferry && /usr/bin/python3 benches/wakeups.py
Every process it starts is stopped at the end, also on an error.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import disk_ops  # noqa: E402
import nbd_bench as nb  # noqa: E402
import regional_bench as rb  # noqa: E402


def switches(pid):
    voluntary = involuntary = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            for line in open(path):
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
        except OSError:
            pass  # a thread that ended meanwhile
    return voluntary, involuntary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--ferry", default=nb.FERRY)
    args = parser.parse_args()
    args.relay, args.keep, args.runtime = None, False, args.seconds
    args.relay = nb.build_relay(args)
    workdir = tempfile.mkdtemp(prefix="wakeups-", dir=os.path.join(nb.ROOT, "target"))
    remote = tempfile.mkdtemp(prefix="wakeups-remote-", dir="/dev/shm")
    disk = disk_ops.disk_of(workdir)
    ctx = nb.Context(args, workdir)
    bench = nb.Bench(args, workdir)
    servers = []
    try:
        subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                       check=True, capture_output=True, timeout=60)
        standalone = nb.Ferry(ctx, rb.SIZE_BYTES, rb.JOURNAL_BYTES)
        servers.append(standalone)
        standalone.start()
        pair = rb.RegionalPair(ctx, "regional-wan", 40, "1s", "zstd", 100, remote_dir=remote)
        servers.append(pair)
        pair.start()
        link = 100e6 / 8
        for share in (0.5, 2.5):
            for server in (standalone, pair):
                pid = server.pids[0]
                d0, s0, c0, t0 = disk_ops.diskstats(disk), switches(pid), nb.cpu_seconds(pid), time.monotonic()
                run = rb.paced_load(bench, server, "wakeups", link * share, args.seconds)
                d1, s1, c1, wall = disk_ops.diskstats(disk), switches(pid), nb.cpu_seconds(pid), time.monotonic() - t0
                writes = run["mb_s"] * 1e6 / 16384 * wall
                print(f"{server.name:13} {link * share / 1e6:5.2f} MB/s: p50 {run['p50_us']:.0f} us, "
                      f"p99 {run['p99_us']:.0f} us; cores {(c1 - c0) / wall:.3f}, "
                      f"CPU {(c1 - c0) / writes * 1e6:.0f} us/write; context switches per write "
                      f"{(s1[0] - s0[0]) / writes:.2f} voluntary, {(s1[1] - s0[1]) / writes:.2f} involuntary; "
                      f"device writes {(d1['writes'] - d0['writes']) / writes:.2f} and flushes "
                      f"{(d1['flushes'] - d0['flushes']) / writes:.3f} per write", flush=True)
                if server is pair:
                    time.sleep(25)  # let the peer catch up before the next run
    finally:
        nb.stop_all(servers)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(remote, ignore_errors=True)


if __name__ == "__main__":
    main()
