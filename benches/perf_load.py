#!/usr/bin/python3
"""Where a Ferry process's CPU goes under a throughput load: `perf record -g` of every server
process while fio runs against it.

Starts one configuration (`standalone`; `metro-lo`: a primary and its metro secondary over
loopback; `regional-wan`: a primary and its regional secondary through the delay relay, 40 ms
RTT capped at 100 Mbit/s, as regional_bench.py's) on fresh, prefilled volumes, runs fio with
the chosen workload for --seconds plus a 2 s ramp, records each server process for --record seconds from the ramp's end, and writes
`perf report --no-children --sort dso,symbol` per process (one line per symbol above
--percent) to --out (kept; default a new directory under target/), printing the top lines.

Workloads: `seq` (1 MiB sequential writes, QD8), `qd32` (4 KiB random writes, QD32), and
regional_bench.py's paced load (16 KiB random writes of random data, QD4) at half the 100 Mbit/s
link (`half-link`) or at 2.5x it (`overload`).

Usage: cargo build --release -p ferry && /usr/bin/python3 benches/perf_load.py --config metro-lo --workload seq
Every process it starts (Ferry nodes, fio, perf) is stopped at the end, also on an error or Ctrl-C.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench as nb  # noqa: E402
import regional_bench as rb  # noqa: E402

MIB = 1 << 20
WORKLOADS = {
    "seq": ["--rw=write", "--bs=1m", "--iodepth=8"],
    "qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
}
WAN_MBIT = 100
for _name, _share in (("half-link", 0.5), ("overload", 2.5)):
    WORKLOADS[_name] = rb.PACED_FIO + [f"--rate={int(WAN_MBIT * 1e6 / 8 * _share)}"]
RAMP_S = 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("standalone", "metro-lo", "regional-wan"), default="metro-lo")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="seq")
    parser.add_argument("--seconds", type=int, default=8, help="fio's run after its ramp (default 8)")
    parser.add_argument("--record", type=int, default=5, help="seconds of perf record (default 5)")
    parser.add_argument("--size", type=int, default=256, help="volume MiB (default 256)")
    parser.add_argument("--percent", type=float, default=1.5, help="report symbols above this share (default 1.5)")
    parser.add_argument("--top", type=int, default=12, help="lines printed per process (default 12)")
    parser.add_argument("--out", default=None, help="directory for perf data and reports (default: a temporary one)")
    parser.add_argument("--ferry", default=nb.FERRY)
    args = parser.parse_args()
    if args.record >= args.seconds:
        sys.exit("--record must be shorter than --seconds")
    args.relay = None  # build_relay builds one unless given
    if args.config == "regional-wan":
        args.relay = nb.build_relay(args)
    args.keep = False
    args.runtime = args.seconds
    workdir = tempfile.mkdtemp(prefix="perf-load-", dir=os.path.join(nb.ROOT, "target"))
    out_dir = args.out or tempfile.mkdtemp(prefix="perf-load-out-", dir=os.path.join(nb.ROOT, "target"))
    os.makedirs(out_dir, exist_ok=True)
    ctx = nb.Context(args, workdir)
    bench = nb.Bench(args, workdir)
    servers, others = [], []
    try:
        size = args.size * MIB
        if args.config == "standalone":
            server = nb.Ferry(ctx, size, size)
            names = ["ferry"]
        else:
            subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                           check=True, capture_output=True, timeout=60)
            if args.config == "regional-wan":
                server = rb.RegionalPair(ctx, "regional-wan", 40, "1s", "zstd", WAN_MBIT)
            else:
                server = nb.MetroPair(ctx, "metro-lo", size, size, None)
            names = ["primary", "secondary"]
        servers.append(server)
        server.start()
        bench.prefill(server)
        server.quiesce()
        fio = nb.spawn(["fio", "--name=load", "--ioengine=nbd", f"--uri={server.uri}", f"--size={server.size_bytes}",
                        *WORKLOADS[args.workload], "--time_based", f"--runtime={args.seconds}",
                        f"--ramp_time={RAMP_S}", "--output-format=json",
                        f"--output={os.path.join(workdir, 'fio.json')}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        others.append(fio)
        time.sleep(RAMP_S)
        perfs = []
        for name, pid in zip(names, server.pids):
            data = os.path.join(out_dir, f"{args.config}-{args.workload}-{name}.data")
            perfs.append((name, data, nb.spawn(["perf", "record", "-g", "-o", data, "-p", str(pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            others.append(perfs[-1][2])
        time.sleep(args.record)
        for _, _, perf in perfs:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=120)
        fio.wait(timeout=args.seconds * 4 + 120)
        job = nb.read_fio_job(os.path.join(workdir, "fio.json"), "fio")["write"]
        print(f"\n{args.config}, {args.workload}: {job['iops']:,.0f} IOPS, {job['bw_bytes'] / 1e6:,.1f} MB/s")
        for name, data, _ in perfs:
            report = os.path.join(out_dir, f"{args.config}-{args.workload}-{name}.txt")
            with open(report, "w") as f:
                subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio", "--percent-limit",
                                str(args.percent), "-g", "none", "--sort", "dso,symbol"],
                               stdout=f, stderr=subprocess.DEVNULL, timeout=600, check=False)
            lines = [" ".join(line.split()) for line in open(report)
                     if line.strip() and not line.startswith("#")]
            print(f"\n{name} ({report}):")
            for line in lines[:args.top]:
                print(f"  {line}")
    finally:
        for proc in others:
            nb.stop_process(proc)
        nb.stop_all(servers)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
