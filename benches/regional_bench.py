#!/usr/bin/env python3
"""Regional replication, measured in one run on this machine (ratios within the run only).

Configurations, all on the same clients and volume sizes:
  standalone        Ferry alone (the baseline)
  regional          primary a + regional peer b through the delay relay (--rtt, default 40 ms)
  regional-nozstd   the same with compression = "none"

Measurements:
  latency   fio 4k randwrite QD1 and 4k FUA writes QD1 (libnbd), p50/p99: regional vs standalone
  wire      ferry_replication_bytes_total{kind="wire"} / {kind="logical"} for
            - "hot": overwrite-heavy and half-compressible: 4 KiB random writes over a 4 MiB
              hot set (fio buffer_compress_percentage=50) plus 64 KiB sequential log appends
              elsewhere, QD8, for --runtime seconds;
            - "unique": incompressible writes that never repeat (sequential 1 MiB, random data);
  lag       lag_seconds sampled every 100 ms during "hot": p50, p99, max

Usage: cargo build --release -p ferry && /usr/bin/python3 benches/regional_bench.py [--quick]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench as nb  # noqa: E402  (the shared process, relay and fio helpers)

MIB = 1 << 20


class RegionalPair(nb.MetroPair):
    """nbd_bench's pair with the replica made regional."""

    kind = "regional"

    def __init__(self, ctx, name, size_bytes, journal_bytes, rtt_ms, interval, compression):
        super().__init__(ctx, name, size_bytes, journal_bytes, rtt_ms)
        self.interval = interval
        self.compression = compression
        for node in (self.a, self.b):
            self.patch(node)

    def patch(self, node):
        with open(node.config) as f:
            text = f.read()
        text = re.sub(r'mode = "metro"\npeer_timeout = "[^"]*"\n',
                      f'mode = "regional"\ninterval = "{self.interval}"\ncompression = "{self.compression}"\n', text)
        with open(node.config, "w") as f:
            f.write(text)

    def start_relay(self, rtt_ms):
        super().start_relay(rtt_ms)
        for node in (self.a, self.b):
            self.patch(node)

    def quiesce(self):
        """Waits until the regional copy holds everything (its head reaches the primary's)."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            va, vb = self.a.volume(), self.b.volume()
            replica = va["replicas"][0]
            if replica["lag_bytes"] == 0 and va["journal"]["head_lsn"] == vb["journal"]["head_lsn"]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: the regional copy did not catch up")


def fio(bench, server, name, options, size_bytes):
    return bench.fio(server, name, options, size_bytes)


def latency(bench, server):
    rw = fio(bench, server, "randwrite-qd1", bench.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
             server.size_bytes)["write"]
    fua = bench.fua_qd1(server)
    return {
        "rw_p50": nb.pct(rw, "50"), "rw_p99": nb.pct(rw, "99"),
        "fua_p50": fua["p50_us"], "fua_p99": fua["p99_us"],
    }


def counters(node):
    samples = node.metrics()
    return (nb.metric_sum(samples, "ferry_replication_bytes_total", kind="logical"),
            nb.metric_sum(samples, "ferry_replication_bytes_total", kind="wire"))


def hot_workload(bench, pair, runtime):
    """Overwrite-heavy, half-compressible: a 4 MiB hot set plus sequential appends."""
    common = ["--ioengine=nbd", f"--uri={pair.uri}", "--time_based", f"--runtime={runtime}",
              "--buffer_compress_percentage=50", "--refill_buffers", "--output-format=json"]
    command = ["fio", "--name=hot", "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=4m", "--offset=0"] + common + [
        "--name=log", "--rw=write", "--bs=64k", "--iodepth=1", "--size=48m", f"--offset={16 * MIB}",
        "--rate=4m"] + common
    result = subprocess.run(command, capture_output=True, text=True, timeout=runtime * 4 + 300)
    if result.returncode != 0:
        raise RuntimeError(f"fio hot on {pair.name}: {result.stderr}")


def unique_workload(pair, size):
    command = ["fio", "--name=unique", "--ioengine=nbd", f"--uri={pair.uri}", "--rw=write", "--bs=1m",
               "--iodepth=4", f"--size={size}", f"--offset={64 * MIB}", "--refill_buffers",
               "--buffer_compress_percentage=0", "--randrepeat=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"fio unique on {pair.name}: {result.stderr}")


def measure_wire(pair, run):
    logical0, wire0 = counters(pair.a)
    run()
    pair.quiesce()
    logical1, wire1 = counters(pair.a)
    logical, wire = logical1 - logical0, wire1 - wire0
    return {"logical": logical, "wire": wire, "ratio": wire / logical if logical else None}


def sample_lag(pair, stop, samples):
    while not stop.is_set():
        replica = pair.a.replica()
        if replica:
            samples.append(replica["lag_seconds"])
        time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 s measurements")
    parser.add_argument("--rtt", type=float, default=40.0, help="relay round trip in ms (default 40)")
    parser.add_argument("--interval", default="1s")
    parser.add_argument("--ferry", default=os.path.join(nb.ROOT, "target", "release", "ferry"))
    parser.add_argument("--relay", default=None)
    args = parser.parse_args()
    if args.quick:
        args.runtime = 5
    args.relay = nb.build_relay(args)
    size = 256 * MIB
    with tempfile.TemporaryDirectory(prefix="ferry-regional-bench-") as workdir:
        ctx = nb.Context(args, workdir)
        subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                       check=True, capture_output=True)
        bench = nb.Bench.__new__(nb.Bench)
        bench.workdir = workdir
        bench.runtime = args.runtime
        results = {}
        standalone = nb.Ferry(ctx, size, 256 * MIB)
        standalone.start()
        try:
            results["standalone"] = latency(bench, standalone)
        finally:
            standalone.stop()
        for name, compression in (("regional", "zstd"), ("regional-nozstd", "none")):
            pair = RegionalPair(ctx, name, size, 256 * MIB, args.rtt, args.interval, compression)
            pair.start()
            try:
                entry = {}
                if compression == "zstd":
                    entry.update(latency(bench, pair))
                    pair.quiesce()
                stop, lags = threading.Event(), []
                sampler = threading.Thread(target=sample_lag, args=(pair, stop, lags))
                sampler.start()
                try:
                    entry["hot"] = measure_wire(pair, lambda: hot_workload(bench, pair, args.runtime))
                finally:
                    stop.set()
                    sampler.join()
                lags.sort()
                if lags:
                    entry["lag"] = {"p50": nb.percentile(lags, 0.5), "p99": nb.percentile(lags, 0.99),
                                    "max": lags[-1]}
                entry["unique"] = measure_wire(pair, lambda: unique_workload(pair, "128m"))
                results[name] = entry
            finally:
                pair.stop()
        report(results, args)


def report(results, args):
    base = results["standalone"]
    reg = results["regional"]
    print(f"\nRegional replication, one run, relay RTT {args.rtt:g} ms, interval {args.interval}, "
          f"{args.runtime} s per measurement\n")
    print(f"{'measure':<34}{'standalone':>12}{'regional':>12}{'ratio':>9}")
    for key, label in (("rw_p50", "4k randwrite QD1 p50 (us)"), ("rw_p99", "4k randwrite QD1 p99 (us)"),
                       ("fua_p50", "4k FUA write QD1 p50 (us)"), ("fua_p99", "4k FUA write QD1 p99 (us)")):
        print(f"{label:<34}{base[key]:>12.1f}{reg[key]:>12.1f}{reg[key] / base[key]:>8.2f}x")
    print()
    for name in ("regional", "regional-nozstd"):
        entry = results[name]
        for workload in ("hot", "unique"):
            w = entry[workload]
            print(f"{name:<16} {workload:<7} wire/logical {w['ratio']:.3f}  "
                  f"({w['wire'] / MIB:.1f} MiB sent for {w['logical'] / MIB:.1f} MiB written)")
        if "lag" in entry:
            lag = entry["lag"]
            print(f"{name:<16} lag_seconds during hot: p50 {lag['p50']:.2f}  p99 {lag['p99']:.2f}  max {lag['max']:.2f}")
    print()


if __name__ == "__main__":
    main()
