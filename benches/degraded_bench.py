#!/usr/bin/python3
"""Write latency of a metro primary after its peer is lost (on_disconnect = "degrade"), second by
second, against Ferry standalone in the same run (ratios within the run only).

Configurations, same clients, same volume size, same work directory on the real disk:
  standalone   Ferry alone: the baseline, measured in the same consecutive windows
  metro        primary a + secondary b over loopback (peer_timeout 2 s, on_disconnect = "degrade")

Sequence on the metro pair:
  1. in sync: one window of fio 4k randwrite QD1 and one of libnbd FUA QD1 (the metro cost);
  2. kill -9 the secondary, then --windows consecutive fio 4k randwrite QD1 runs of --window
     seconds each (the first one includes the peer_timeout during which writes wait for the
     lost peer); the primary's replica state is sampled every 50 ms;
  3. restart the secondary, wait until in-sync (the delta resync);
  4. kill -9 it again, then the same windows with 4k FUA writes at QD1 (libnbd, one loop,
     latencies bucketed by window);
  5. restart it, wait until in-sync, stop both and compare the two volume files (cmp): the
     resyncs must have carried every write the secondary missed.

It prints, for every window: p50 and p99 in microseconds, the number of writes, the ratio of its
p50 to the standalone p50 of the same window number, and the replica state at its end.

Usage: cargo build --release --features ferry/fault-injection   (or -p ferry)
       /usr/bin/python3 benches/degraded_bench.py [--window 2] [--windows 8] [--size 256] [--json FILE]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench as nb  # noqa: E402  (the shared process, fio and status helpers)

MIB = 1 << 20
DEGRADED_TARGET = 1.1  # degraded QD1 p50 <= 1.1x standalone, from the first second after the loss


def fio_window(bench, server, name, seconds):
    job = bench.fio(server, name, ["--time_based", f"--runtime={seconds}", "--rw=randwrite", "--bs=4k",
                                   "--iodepth=1"], server.size_bytes)
    write = job["write"]
    return {"p50_us": nb.pct(write, "50"), "p99_us": nb.pct(write, "99"), "count": write["total_ios"]}


def fio_windows(bench, server, window, count, label):
    """`count` consecutive fio QD1 runs of `window` seconds; each result carries its start time."""
    out = []
    for i in range(count):
        started = time.monotonic()
        result = fio_window(bench, server, f"{label}-w{i}", window)
        result["start"] = started
        out.append(result)
    return out


def fua_windows(server, window, count, started_at=None):
    """One libnbd FUA QD1 loop for window * count seconds, latencies bucketed by the window in
    which each write started (windows count from `started_at`, default now)."""
    import nbd

    handle = nbd.NBD()
    handle.connect_uri(server.uri)
    buckets = [[] for _ in range(count)]
    try:
        blocks = handle.get_size() // 4096
        rng = random.Random(99)
        buffer = os.urandom(4096)
        origin = started_at if started_at is not None else time.monotonic()
        while True:
            now = time.monotonic()
            index = int((now - origin) // window)
            if index >= count:
                break
            started = time.perf_counter_ns()
            handle.pwrite(buffer, rng.randrange(blocks) * 4096, nbd.CMD_FLAG_FUA)
            buckets[index].append(time.perf_counter_ns() - started)
    finally:
        handle.shutdown()
    out = []
    for i, latencies in enumerate(buckets):
        latencies.sort()
        out.append({
            "p50_us": nb.percentile(latencies, 0.5) / 1000 if latencies else None,
            "p99_us": nb.percentile(latencies, 0.99) / 1000 if latencies else None,
            "count": len(latencies),
            "start": origin + i * window,
        })
    return out


class StateSampler:
    """Samples the primary's replica state every 50 ms: (monotonic time, state)."""

    def __init__(self, node):
        self.node = node
        self.samples = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_event.is_set():
            replica = self.node.replica()
            self.samples.append((time.monotonic(), replica["state"] if replica else None))
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()

    def state_at(self, at):
        state = None
        for t, s in self.samples:
            if t > at:
                break
            state = s
        return state

    def first(self, wanted, after):
        return next((t - after for t, s in self.samples if t >= after and s == wanted), None)


def kill_secondary(pair):
    pair.b.proc.kill()
    pair.b.proc.wait()
    pair.b.log_file.close()
    return time.monotonic()


def restart_secondary(pair, what):
    pair.b.start()
    started = time.monotonic()
    pair.wait_in_sync(300, what)
    return time.monotonic() - started


def measure(ctx, ferry, size, window, windows, log_prefix=""):
    """The whole sequence of the module doc on fresh Ferry configurations; returns the results
    (per-window figures, the in-sync ones, the resync times, whether the copies match, and the
    problems seen)."""
    bench = nb.Bench.__new__(nb.Bench)
    bench.workdir = ctx.workdir
    bench.runtime = window
    results = {"window_s": window, "windows": windows, "size_bytes": size}
    problems = []
    standalone = nb.Ferry.__new__(nb.Ferry)
    standalone.node = nb.FerryNode(ferry, os.path.join(ctx.workdir, "degraded-standalone"), "bench", size, size,
                                   device=os.path.join(ctx.workdir, "degraded-standalone.img"))
    standalone.uri = standalone.node.uri
    standalone.size_bytes = size
    standalone.start()
    try:
        bench.prefill(standalone)
        standalone.quiesce()
        nb.log(f"{log_prefix}standalone: write windows")
        results["standalone_write"] = fio_windows(bench, standalone, window, windows, "standalone")
        standalone.quiesce()
        nb.log(f"{log_prefix}standalone: FUA windows")
        results["standalone_fua"] = fua_windows(standalone, window, windows)
    finally:
        standalone.stop()
    pair = nb.MetroPair(ctx, "degraded", size, size, None)
    pair.start()
    try:
        bench.prefill(pair)
        pair.quiesce()
        nb.log(f"{log_prefix}metro in sync: one write window, one FUA window")
        results["insync_write"] = fio_window(bench, pair, "insync", window)
        pair.quiesce()
        results["insync_fua"] = fua_windows(pair, window, 1)[0]
        pair.quiesce()
        with StateSampler(pair.a) as sampler:
            killed = kill_secondary(pair)
            nb.log(f"{log_prefix}secondary killed: write windows")
            writes = fio_windows(bench, pair, window, windows, "degraded")
            for w in writes:
                w["state_end"] = sampler.state_at(w["start"] + window)
            results["degraded_write"] = writes
            results["write_loss_to_degraded_s"] = sampler.first("degraded", killed)
        results["write_resync_s"] = restart_secondary(pair, "the first restart")
        pair.quiesce()
        with StateSampler(pair.a) as sampler:
            killed = kill_secondary(pair)
            nb.log(f"{log_prefix}secondary killed again: FUA windows")
            fuas = fua_windows(pair, window, windows, started_at=killed)
            for w in fuas:
                w["state_end"] = sampler.state_at(w["start"] + window)
            results["degraded_fua"] = fuas
            results["fua_loss_to_degraded_s"] = sampler.first("degraded", killed)
        results["fua_resync_s"] = restart_secondary(pair, "the second restart")
        pair.quiesce()
    finally:
        pair.stop()
    same = subprocess.run(["cmp", "-s", pair.a.image, pair.b.image]).returncode == 0
    results["copies_identical"] = same
    if not same:
        problems.append("the primary's and the secondary's volume files differ after the resyncs")
    for node in pair.nodes():
        for code in node.exit_codes:
            if code != 0:
                problems.append(f"node {node.node} exited with {code} on SIGTERM")
    results["problems"] = problems
    for kind in ("write", "fua"):
        results[f"{kind}_worst_ratio"] = worst_ratio(results, kind)
    return results


def worst_ratio(results, kind):
    """The highest degraded / standalone p50 of the windows after the first (the first one
    holds the peer_timeout, during which writes wait for the lost peer)."""
    ratios = [d["p50_us"] / s["p50_us"] for s, d in zip(results[f"standalone_{kind}"], results[f"degraded_{kind}"])
              if d["p50_us"] and s["p50_us"]][1:]
    return max(ratios) if ratios else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per window (default 2)")
    parser.add_argument("--windows", type=int, default=8, help="windows after the loss (default 8)")
    parser.add_argument("--size", type=int, default=256, help="volume size in MiB (default 256)")
    parser.add_argument("--ferry", default=nb.FERRY)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.relay = None
    base = os.path.join(nb.ROOT, "target")
    workdir = tempfile.mkdtemp(prefix="degraded-bench-", dir=base)
    ctx = nb.Context(args, workdir)
    try:
        subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                       check=True, capture_output=True, timeout=60)
        results = measure(ctx, args.ferry, args.size * MIB, args.window, args.windows)
    finally:
        nb.reap_all_children()
        if args.keep:
            nb.log(f"work directory kept: {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.exit(1 if results["problems"] else 0)


def fmt(value):
    return "-" if value is None else f"{value:.1f}"


def report(results):
    window = results["window_s"]
    print(f"\nDegraded writes after kill -9 of the metro peer, {window:g} s windows, QD1 4 KiB, one run\n")
    for kind, insync_key in (("write", "insync_write"), ("fua", "insync_fua")):
        base = results[f"standalone_{kind}"]
        insync = results[insync_key]
        print(f"{kind}: in sync p50 {fmt(insync['p50_us'])} us, p99 {fmt(insync['p99_us'])} us; "
              f"lost -> degraded after {fmt(results[f'{kind}_loss_to_degraded_s'])} s; "
              f"resync after restart {fmt(results[f'{kind}_resync_s'])} s")
        print(f"{'window':<9}{'from s':>7}{'standalone p50':>16}{'p99':>9}{'degraded p50':>14}{'p99':>9}"
              f"{'n':>7}{'p50 ratio':>11}  state at end")
        for i, (s, d) in enumerate(zip(base, results[f"degraded_{kind}"])):
            ratio = d["p50_us"] / s["p50_us"] if d["p50_us"] and s["p50_us"] else None
            print(f"{i:<9}{i * window:>7.0f}{fmt(s['p50_us']):>16}{fmt(s['p99_us']):>9}{fmt(d['p50_us']):>14}"
                  f"{fmt(d['p99_us']):>9}{d['count']:>7}{(f'{ratio:.2f}x' if ratio else '-'):>11}  {d.get('state_end')}")
        # Goal: from the first window that starts after the peer was declared lost.
        worst = results[f"{kind}_worst_ratio"]
        verdict = "-" if worst is None else ("PASS" if worst <= DEGRADED_TARGET else "MISS")
        print(f"worst p50 ratio from window 1 on: {fmt(worst) if worst is None else f'{worst:.2f}x'} "
              f"(goal <= {DEGRADED_TARGET}x) {verdict}\n")
    print(f"copies identical after the resyncs: {results['copies_identical']}")
    for problem in results["problems"]:
        print(f"PROBLEM: {problem}")


if __name__ == "__main__":
    main()
