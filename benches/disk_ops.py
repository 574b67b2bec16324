#!/usr/bin/python3
"""Device operations per client write: qemu-nbd, Ferry standalone, a primary with a regional peer.

For each configuration (--configs), fio 4 KiB randwrite QD1 (or, with --client fua, the libnbd
FUA QD1 loop) for --seconds on a fresh, prefilled 256 MiB volume, and around it the counters of
the disk under the work directory (/proc/diskstats: writes, sectors written, flushes) and the
server's (the primary's) /proc/PID/io. Prints each counter per client write, with the run's
write latency p50/p99. The regional peer's files go under --remote-dir (default /dev/shm) so
that only the primary's operations reach the disk.

Usage: cargo build --release -p ferry && /usr/bin/python3 benches/disk_ops.py [--seconds 6]
Every process it starts is stopped at the end, also on an error or Ctrl-C.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench as nb  # noqa: E402
import profile_write as pw  # noqa: E402  (its fio QD1 run)
import regional_bench as rb  # noqa: E402


def disk_of(path):
    """The /proc/diskstats name of the whole disk holding `path`."""
    dev = os.stat(path).st_dev
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    parent = os.path.realpath(f"/sys/class/block/{name}/..")
    if os.path.exists(os.path.join(parent, "stat")) and os.path.basename(parent) != "block":
        return os.path.basename(parent)  # a partition: count the whole disk
    return name


def diskstats(name):
    for line in open("/proc/diskstats"):
        fields = line.split()
        if fields[2] == name:
            # Fields after the name: 5 writes completed, 7 sectors written, 16 flushes.
            return {"writes": int(fields[7]), "sectors": int(fields[9]),
                    "flushes": int(fields[18]) if len(fields) > 18 else 0}
    raise RuntimeError(f"{name} not in /proc/diskstats")


def process_io(pid):
    out = {}
    for line in open(f"/proc/{pid}/io"):
        key, value = line.split(":")
        out[key] = int(value)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="standalone and regional alternately, this many times")
    parser.add_argument("--remote-dir", default="/dev/shm")
    parser.add_argument("--configs", default="standalone,regional",
                        help="comma-separated: qemu-nbd, standalone, regional (default standalone,regional)")
    parser.add_argument("--client", choices=("write", "fua"), default="write",
                        help="fio 4 KiB randwrite QD1 (default) or the libnbd FUA QD1 loop")
    parser.add_argument("--ferry", default=nb.FERRY)
    parser.add_argument("--relay", default=None)
    args = parser.parse_args()
    args.keep = False
    args.runtime = args.seconds
    args.relay = nb.build_relay(args)
    workdir = tempfile.mkdtemp(prefix="disk-ops-", dir=os.path.join(nb.ROOT, "target"))
    remote = tempfile.mkdtemp(prefix="disk-ops-remote-", dir=args.remote_dir)
    disk = disk_of(workdir)
    ctx = nb.Context(args, workdir)
    bench = nb.Bench(args, workdir)
    servers = []
    rows = []
    try:
        subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                       check=True, capture_output=True, timeout=60)
        for round_ in range(args.rounds):
            for name in args.configs.split(","):
                if name == "qemu-nbd":
                    server = nb.QemuNbd(ctx, rb.SIZE_BYTES)
                elif name == "standalone":
                    server = nb.Ferry(ctx, rb.SIZE_BYTES, rb.JOURNAL_BYTES)
                elif name == "regional":
                    server = rb.RegionalPair(ctx, f"regional{round_}", 40.0, "1s", "zstd", remote_dir=remote)
                else:
                    raise SystemExit(f"unknown configuration {name!r}")
                servers.append(server)
                server.start()
                bench.prefill(server)
                server.quiesce()
                pid = server.pids[0]
                d0, p0 = diskstats(disk), process_io(pid)
                if args.client == "fua":
                    client = pw.fua_qd1(server, args.seconds)
                else:
                    client = pw.fio_qd1(server, workdir, args.seconds, f"{name}{round_}")
                d1, p1 = diskstats(disk), process_io(pid)
                n = client["count"]
                rows.append((name, n, client["p50_us"], client["p99_us"],
                             (d1["writes"] - d0["writes"]) / n, (d1["sectors"] - d0["sectors"]) * 512 / n,
                             (d1["flushes"] - d0["flushes"]) / n, (d1["flushes"] - d0["flushes"]) / args.seconds,
                             (p1["syscw"] - p0["syscw"]) / n))
                server.stop()
    finally:
        nb.stop_all(servers)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(remote, ignore_errors=True)
    client = "libnbd 4k FUA write QD1" if args.client == "fua" else "fio 4k randwrite QD1"
    print(f"\nDisk {disk}, {client}, {args.seconds} s per run; per client write unless said\n")
    print("| configuration | writes | p50 us | p99 us | device writes | bytes written | flushes | flushes/s | server write syscalls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, p50, p99, writes, written, flushes, per_s, syscw in rows:
        print(f"| {name} | {n:,} | {p50:.0f} | {p99:.0f} | {writes:.3f} | {written:,.0f} | {flushes:.4f} | "
              f"{per_s:.1f} | {syscw:.2f} |")


if __name__ == "__main__":
    main()
