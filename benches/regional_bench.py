#!/usr/bin/python3
"""Regional replication, measured in one run on this machine (ratios within the run only).

Configurations, all on the same clients, volume sizes (256 MiB volumes, 64 MiB journals) and
work directory on the real disk:
  standalone        Ferry alone (the baseline)
  regional          primary a + regional peer b through the delay relay (--rtt, default 40 ms)
  regional-nozstd   the same with compression = "none"
  regional-wan      the same as regional, the relay also capped at --rate-mbit (default 100)

Measurements (--only picks some; default all):
  latency   fio 4k randwrite QD1 and 4k FUA writes QD1 (libnbd), p50/p99: regional vs standalone,
            --rounds times each (default 3), alternating; the ratio is the rounds' median
  wire      ferry_replication_bytes_total{kind="wire"} / {kind="logical"} on regional and
            regional-nozstd for
            - "hot": overwrite-heavy and half-compressible: 4 KiB random writes over a 4 MiB
              hot set (fio buffer_compress_percentage=50) plus 64 KiB sequential log appends
              elsewhere, QD8, for --runtime seconds (lag_seconds sampled every 100 ms);
            - "unique": incompressible writes that never repeat (sequential 1 MiB, random data);
  rpo       regional-wan under a steady load of half the link: fio 16 KiB random writes of
            random data (incompressible, unique), QD4, paced with fio --rate, for --rpo-seconds;
            the primary's lag_seconds sampled every 100 ms (p50, p99, max), and the secondary's
            apply rate over the run (ferry_regional_apply_bytes_total / _seconds_total) against
            the link's rate
  overload  the same load at --overload-factor times the link (default 2.5) for
            --overload-seconds on standalone, then on regional-wan; then the load stops. The
            write latency against standalone; the primary's peak RSS (VmHWM) and journal use;
            the replica's state every 100 ms (moves into degraded) and the primary's logged
            state changes; the time from the load's end until lag_seconds <= 2 s in-sync
            again, against the bytes the peer lacked then (what the resync had left to send)
            divided by the link's rate; and the bytes the link carried meanwhile (the relay's
            count, which adds what was sent but still on its way)

Usage: cargo build --release -p ferry && /usr/bin/python3 benches/regional_bench.py [--quick]
Every process it starts is stopped at the end, also on an error or Ctrl-C.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench as nb  # noqa: E402  (the shared process, relay and fio helpers)

MIB = 1 << 20
SIZE_BYTES = 256 * MIB
JOURNAL_BYTES = 64 * MIB
MEASUREMENTS = ("latency", "wire", "rpo", "overload")
# Goals of the regional work (the "Show" section).
LATENCY_TARGET = 1.05  # regional / standalone write latency, p50 and p99
RPO_P99_TARGET_S = 2.0
RPO_MAX_TARGET_S = 3.0
RECOVERED_LAG_S = 2.0  # "caught up again": lag_seconds at most this, in-sync
RECOVERY_TARGET = 1.2  # recovery time / (bytes lacking at the load's end / link rate)
APPLY_TARGET = 4.0  # secondary apply rate / link rate
SAMPLE_INTERVAL_S = 0.1
STATE_CHANGE = re.compile(r'replica state .*from="?([\w-]+)"? to="?([\w-]+)"?')


class RegionalPair(nb.MetroPair):
    """nbd_bench's pair with the replica made regional, its relay optionally rate-capped."""

    kind = "regional"

    def __init__(self, ctx, name, rtt_ms, interval, compression, rate_mbit=None, remote_dir=None, remote_nice=0,
                 remote_cpus=None):
        b_dir = os.path.join(remote_dir, name) if remote_dir else None
        super().__init__(ctx, name, SIZE_BYTES, JOURNAL_BYTES, rtt_ms, b_dir)
        self.b.nice = self.relay_nice = remote_nice
        self.b.cpus = self.relay_cpus = remote_cpus
        self.interval = interval
        self.compression = compression
        self.rate_mbit = rate_mbit
        for node in (self.a, self.b):
            self.patch(node)

    def patch(self, node):
        with open(node.config) as f:
            text = f.read()
        text = re.sub(r'mode = "metro"\npeer_timeout = "[^"]*"\n',
                      f'mode = "regional"\ninterval = "{self.interval}"\ncompression = "{self.compression}"\n', text)
        with open(node.config, "w") as f:
            f.write(text)

    def start_relay(self, rtt_ms, rate_mbit=None, loss=0.0):
        super().start_relay(rtt_ms, rate_mbit or self.rate_mbit, loss)
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


class Sampler:
    """The primary's replica, journal use and write latency counters every 100 ms on a thread,
    while in a `with`."""

    def __init__(self, node):
        self.node = node
        self.samples = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def run(self):
        while not self.stopped.is_set():
            volume = self.node.volume()
            try:
                metrics = self.node.metrics()
            except OSError:  # a scrape that timed out under load: skip this sample
                metrics = None
            if volume and volume["replicas"] and metrics:
                self.samples.append({
                    "t": time.monotonic(), "replica": volume["replicas"][0],
                    "journal_used": volume["journal"]["used_bytes"],
                    "write_s": nb.metric_sum(metrics, "ferry_write_latency_seconds_sum", stage="total"),
                    "writes": nb.metric_sum(metrics, "ferry_write_latency_seconds_count", stage="total")})
            self.stopped.wait(SAMPLE_INTERVAL_S)

    def lag_stats(self):
        lags = sorted(s["replica"]["lag_seconds"] for s in self.samples)
        if not lags:
            return None
        return {"p50": nb.percentile(lags, 0.5), "p99": nb.percentile(lags, 0.99), "max": lags[-1],
                "count": len(lags)}

    def write_latency_by_state(self):
        """{state: (mean write latency in us, writes)} from the primary's histogram, each
        interval between two samples counted in the state of its first sample."""
        totals = {}
        for first, second in zip(self.samples, self.samples[1:]):
            entry = totals.setdefault(first["replica"]["state"], [0.0, 0.0])
            entry[0] += second["write_s"] - first["write_s"]
            entry[1] += second["writes"] - first["writes"]
        return {state: (seconds / writes * 1e6, int(writes)) for state, (seconds, writes) in totals.items() if writes}

    def states(self):
        """The replica's states in the order seen, repeats merged."""
        seen = []
        for sample in self.samples:
            state = sample["replica"]["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
        return seen


def latency_rounds(bench, standalone, pair, rounds):
    """`latency` of standalone and of the pair, alternately, `rounds` times (the first of the
    two alternating, ABBA...), so that a change of the shared machine's load between runs lands
    on both. Returns per-key medians for each and the per-round ratios (regional / standalone)."""
    runs = {"standalone": [], "regional": []}
    for n in range(rounds):
        order = [("standalone", standalone), ("regional", pair)]
        for name, server in order if n % 2 == 0 else reversed(order):
            nb.log(f"latency: {server.name}, round {n + 1} of {rounds} ...")
            runs[name].append(latency(bench, server))
            server.quiesce()
    keys = runs["standalone"][0].keys()
    ratios = {key: [r[key] / s[key] for s, r in zip(runs["standalone"], runs["regional"])] for key in keys}
    median = {name: {key: statistics.median(run[key] for run in runs[name]) for key in keys} for name in runs}
    return median["standalone"], median["regional"], ratios


def latency(bench, server):
    rw = bench.fio(server, "randwrite-qd1", bench.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
                   server.size_bytes)["write"]
    fua = bench.fua_qd1(server)
    return {
        "rw_p50": nb.pct(rw, "50"), "rw_p99": nb.pct(rw, "99"),
        "fua_p50": fua["p50_us"], "fua_p99": fua["p99_us"],
    }


def replication_counters(pair):
    """The primary's bytes written and sent to the peer, the secondary's bytes and seconds of
    batch apply."""
    a, b = pair.a.metrics(), pair.b.metrics()
    return {"logical": nb.metric_sum(a, "ferry_replication_bytes_total", kind="logical"),
            "wire": nb.metric_sum(a, "ferry_replication_bytes_total", kind="wire"),
            "applied": nb.metric_sum(b, "ferry_regional_apply_bytes_total"),
            "apply_s": nb.metric_sum(b, "ferry_regional_apply_seconds_total")}


def replicated(pair, run):
    """Runs `run`, waits until the copy caught up, and returns replication_counters' deltas
    with the wire/logical ratio and the apply rate (MB/s)."""
    before = replication_counters(pair)
    result = run()
    pair.quiesce()
    after = replication_counters(pair)
    delta = {key: after[key] - before[key] for key in before}
    delta["ratio"] = nb.ratio_of(delta["wire"], delta["logical"])
    delta["apply_mb_s"] = nb.ratio_of(delta["applied"] / 1e6, delta["apply_s"])
    return delta, result


def run_fio(command, what, timeout):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"fio {what}: {result.stderr}")


def hot_workload(pair, runtime):
    """Overwrite-heavy, half-compressible: a 4 MiB hot set plus sequential appends."""
    common = ["--ioengine=nbd", f"--uri={pair.uri}", "--time_based", f"--runtime={runtime}",
              "--buffer_compress_percentage=50", "--refill_buffers", "--output-format=json"]
    run_fio(["fio", "--name=hot", "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=4m", "--offset=0"] + common + [
        "--name=log", "--rw=write", "--bs=64k", "--iodepth=1", "--size=48m", f"--offset={16 * MIB}",
        "--rate=4m"] + common, f"hot on {pair.name}", runtime * 4 + 300)


def unique_workload(pair, size):
    run_fio(["fio", "--name=unique", "--ioengine=nbd", f"--uri={pair.uri}", "--rw=write", "--bs=1m",
             "--iodepth=4", f"--size={size}", f"--offset={64 * MIB}", "--refill_buffers",
             "--buffer_compress_percentage=0", "--randrepeat=0"], f"unique on {pair.name}", 900)


# fio's paced load without its rate: 16 KiB random writes of random data, QD4.
PACED_FIO = ["--rw=randwrite", "--bs=16k", "--iodepth=4", "--buffer_compress_percentage=0", "--refill_buffers",
             "--randrepeat=0"]


def paced_load(bench, server, name, rate_bytes, seconds):
    """fio 16 KiB random writes of random data (incompressible, no block twice in a pass over
    the volume), QD4, paced at rate_bytes per second. Returns the write latency (us), the CPU
    cores used by the server's processes (Ferry nodes, relay) and by fio, and the primary's
    mean write latency by stage (from its /metrics)."""
    primary = server.nodes()[0]
    pids = server.pids + ([server.relay.proc.pid] if getattr(server, "relay", None) else [])
    metrics_before = primary.metrics()
    cpu_before = [nb.cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    job = bench.fio(server, name, PACED_FIO + [f"--rate={int(rate_bytes)}", "--time_based", f"--runtime={seconds}"],
                    server.size_bytes)
    wall = time.monotonic() - started
    cores = [(nb.cpu_seconds(pid) - before) / wall for pid, before in zip(pids, cpu_before)]
    write = job["write"]
    return {"p50_us": nb.pct(write, "50"), "p99_us": nb.pct(write, "99"), "mb_s": write["bw_bytes"] / 1e6,
            "cores": cores, "fio_cores": (job["usr_cpu"] + job["sys_cpu"]) / 100,
            "ferry": nb.ferry_breakdown(metrics_before, primary.metrics())}


def rpo(bench, pair, link_bytes_s, seconds):
    """lag_seconds under a steady load at half the link (sampled while the load runs), and the
    secondary's apply rate."""
    sampler = Sampler(pair.a)
    offset = pair.a.log_offset()

    def run():
        with sampler:
            return paced_load(bench, pair, "rpo", link_bytes_s / 2, seconds)

    counted, load = replicated(pair, run)
    return {"load": load, "lag": sampler.lag_stats(), "states": sampler.states(),
            "logged": logged_changes(pair.a, offset), "seconds": seconds, **counted}


def logged_changes(node, offset):
    """(from, to) of every replica state change the node logged since `offset`."""
    return [match.groups() for match in map(STATE_CHANGE.search, node.log_since(offset).splitlines()) if match]


def recovery_timeout(overload_seconds):
    """How long the overload run waits for the copy to catch up after the load's end."""
    return 120 + 3 * overload_seconds


def overload(bench, pair, link_bytes_s, rate_bytes, seconds):
    """The load above the link's rate for `seconds`, then none: what the primary and its
    replica do, and how long the copy takes to catch up once the load stops."""
    nb.reset_peak_rss(pair.a.pid)
    offset, offset_b = pair.a.log_offset(), pair.b.log_offset()
    capacity = pair.a.volume()["journal"]["capacity_bytes"]
    resynced_before = nb.metric_sum(pair.a.metrics(), "ferry_resync_bytes_total")
    with Sampler(pair.a) as sampler:
        load = paced_load(bench, pair, "overload", rate_bytes, seconds)
        dropped_at, dropped_wall = time.monotonic(), time.time()
        lacking = pair.a.replica()
        carried_before = pair.relay.stats()["a_to_b"]["forwarded_bytes"]

        def first_after_drop(condition):
            return next((s["t"] - dropped_at for s in list(sampler.samples)
                         if s["t"] >= dropped_at and condition(s["replica"])), None)

        def caught_up(replica):
            return replica["state"] == "in-sync" and replica["lag_seconds"] <= RECOVERED_LAG_S

        deadline = dropped_at + recovery_timeout(seconds)
        while first_after_drop(caught_up) is None and time.monotonic() < deadline:
            time.sleep(SAMPLE_INTERVAL_S)
        # What crossed the link after the load stopped: what the resync had still to read,
        # and what it had already handed to QUIC (up to the session's window) and the link
        # had not yet carried.
        carried = pair.relay.stats()["a_to_b"]["forwarded_bytes"] - carried_before
        # A little longer, to see a state change that would follow the recovery.
        time.sleep(3)
    peak_rss_kib = nb.proc_status_kib(pair.a.pid, "VmHWM")
    resynced = nb.metric_sum(pair.a.metrics(), "ferry_resync_bytes_total") - resynced_before
    # What must still cross the link: a running resync sends each dirty block once (its bytes
    # left include blocks written again after they were sent), while lag_bytes counts every
    # write the peer lacks, overwrites included.
    lacked = lacking["resync_remaining_bytes"] if lacking["state"] == "resyncing" else lacking["lag_bytes"]
    applied = [nb.log_time(line.split()[0]) - dropped_wall % 86400 for line in pair.b.log_since(offset_b).splitlines()
               if "the catch-up reached the device whole" in line]
    logged = logged_changes(pair.a, offset)
    states = sampler.states()
    return {
        "load": load, "lacking_at_drop": lacking, "lacked_bytes": lacked,
        "recovery_s": first_after_drop(caught_up),
        "resync_sent_s": first_after_drop(lambda replica: replica["resync_remaining_bytes"] == 0),
        "catchup_applied_s": applied, "resynced_bytes": resynced, "write_by_state": sampler.write_latency_by_state(),
        "carried_bytes": carried, "recovery_bound_s": lacked / link_bytes_s,
        "peak_rss_kib": peak_rss_kib, "journal_capacity": capacity,
        "journal_peak": max((s["journal_used"] for s in sampler.samples), default=None),
        "states": states, "degraded_entries": states.count("degraded"),
        "logged": logged, "logged_degraded_entries": sum(1 for _, to in logged if to == "degraded"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=20, help="seconds of the latency and hot runs (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help="5 s latency and hot runs, 20 s rpo, 30 s overload (well under 6 minutes)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS),
                        help=f"comma-separated measurements: {', '.join(MEASUREMENTS)} (default all)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="latency: standalone and regional measured alternately this many times each (default 3)")
    parser.add_argument("--rtt", type=float, default=40.0, help="relay round trip in ms (default 40)")
    parser.add_argument("--interval", default="1s")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="link cap of regional-wan (default 100)")
    parser.add_argument("--rpo-seconds", type=int, default=60)
    parser.add_argument("--overload-seconds", type=int, default=60)
    parser.add_argument("--overload-factor", type=float, default=2.5,
                        help="the overload's write rate over the link's (default 2.5)")
    parser.add_argument("--ferry", default=nb.FERRY)
    parser.add_argument("--relay", default=None, help="a built ferry-relay binary (default: build benches/relay)")
    parser.add_argument("--remote-dir", default=None,
                        help="a directory for the regional peer's files, off the primary's disk (for example "
                             "/dev/shm: the remote site's disk I/O then does not share this machine's one disk "
                             "with the primary); default beside the primary's")
    parser.add_argument("--remote-nice", type=int, default=0,
                        help="run the regional peer and the relay at this niceness (19: they take the CPUs only "
                             "when the primary and its client leave them idle, as another site and a WAN would); "
                             "default 0")
    parser.add_argument("--isolate-remote", action="store_true",
                        help="run the regional peer and the relay on the last CPU and everything else (the "
                             "primary, standalone, fio, this script) on the others, with the peer's files on "
                             "/dev/shm unless --remote-dir says otherwise: the remote site then takes none of the "
                             "primary's CPU time or disk, as another site would not; the baselines run on the "
                             "same CPUs as the primary")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.runtime, args.rpo_seconds, args.overload_seconds = 5, 20, 30
    wanted = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(wanted) - set(MEASUREMENTS)
    if unknown:
        sys.exit(f"--only: unknown {', '.join(sorted(unknown))} (known: {', '.join(MEASUREMENTS)})")
    if not os.access(args.ferry, os.X_OK):
        sys.exit(f"{args.ferry} not found: build it first with `cargo build --release -p ferry` in {nb.ROOT}")
    args.relay = nb.build_relay(args)
    link_bytes_s = args.rate_mbit * 1e6 / 8
    remote_cpus = None
    if args.isolate_remote:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            sys.exit("--isolate-remote needs at least two CPUs")
        remote_cpus = str(cpus[-1])
        os.sched_setaffinity(0, cpus[:-1])  # every process started from here on inherits it
        args.remote_dir = args.remote_dir or "/dev/shm"

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    # On the real disk (the target dir), not tmpfs: fdatasync must mean something.
    workdir = tempfile.mkdtemp(prefix="regional-bench-", dir=os.path.join(nb.ROOT, "target"))
    remote_dir = None
    if args.remote_dir:
        remote_dir = tempfile.mkdtemp(prefix="regional-bench-remote-", dir=args.remote_dir)
    ctx = nb.Context(args, workdir)
    bench = nb.Bench(args, workdir)
    results, servers = {}, []

    def start(server):
        servers.append(server)
        server.start()
        nb.log(f"started {server.name}")
        return server

    try:
        subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                       check=True, capture_output=True, timeout=60)
        overload_rate = link_bytes_s * args.overload_factor
        standalone = None
        if {"latency", "overload"} & set(wanted):
            standalone = start(nb.Ferry(ctx, SIZE_BYTES, JOURNAL_BYTES))
            if "overload" in wanted:
                nb.log(f"overload: standalone, {overload_rate / 1e6:.1f} MB/s for {args.overload_seconds} s ...")
                with Sampler(standalone.node):  # the same probing as on the primary of the pair
                    results["overload_standalone"] = paced_load(bench, standalone, "overload", overload_rate,
                                                                args.overload_seconds)
                standalone.quiesce()
        for name, compression in (("regional", "zstd"), ("regional-nozstd", "none")):
            if not ("wire" in wanted or ("latency" in wanted and compression == "zstd")):
                continue
            pair = start(RegionalPair(ctx, name, args.rtt, args.interval, compression, remote_dir=remote_dir,
                                      remote_nice=args.remote_nice, remote_cpus=remote_cpus))
            if "latency" in wanted and compression == "zstd":
                (results["latency_standalone"], results["latency_regional"],
                 results["latency_ratios"]) = latency_rounds(bench, standalone, pair, args.rounds)
            if "wire" in wanted:
                nb.log(f"wire: {name} ...")
                with Sampler(pair.a) as sampler:
                    hot, _ = replicated(pair, lambda: hot_workload(pair, args.runtime))
                unique, _ = replicated(pair, lambda: unique_workload(pair, "128m"))
                results[name] = {"hot": hot, "hot_lag": sampler.lag_stats(), "unique": unique}
            pair.stop()
        if {"rpo", "overload"} & set(wanted):
            pair = start(RegionalPair(ctx, "regional-wan", args.rtt, args.interval, "zstd", args.rate_mbit,
                                      remote_dir=remote_dir, remote_nice=args.remote_nice,
                                      remote_cpus=remote_cpus))
            if "rpo" in wanted:
                nb.log(f"rpo: {link_bytes_s / 2e6:.2f} MB/s for {args.rpo_seconds} s ...")
                results["rpo"] = rpo(bench, pair, link_bytes_s, args.rpo_seconds)
            if "overload" in wanted:
                nb.log(f"overload: regional-wan, {overload_rate / 1e6:.1f} MB/s for {args.overload_seconds} s, "
                       "then until caught up ...")
                results["overload"] = overload(bench, pair, link_bytes_s, overload_rate, args.overload_seconds)
                if results["overload"]["recovery_s"] is None:
                    ctx.problem(pair.name, f"not in sync with lag_seconds <= {RECOVERED_LAG_S:g} s within "
                                f"{recovery_timeout(args.overload_seconds)} s of the load's end", pair.a.log_tail(20))
            results["relay"] = pair.relay.stats()
            pair.stop()
        if standalone:
            standalone.stop()
        for server in servers:
            for node in server.nodes():
                if any(code != 0 for code in node.exit_codes):
                    ctx.problem(f"{server.name}/{node.node}", f"exit codes {node.exit_codes} on SIGTERM",
                                node.log_tail(20))
        results["log_warnings"] = nb.collect_log_warnings(servers)
        report(results, args, link_bytes_s, ctx)
    except KeyboardInterrupt:
        nb.log("interrupted; cleaning up")
        raise
    except Exception:
        for server in servers:
            for node in server.nodes():
                nb.log(f"--- {server.name}/{node.node} log (tail) ---\n{node.log_tail(30)}")
        raise
    finally:
        nb.stop_all(servers)
        if args.keep:
            nb.log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if remote_dir:
                shutil.rmtree(remote_dir, ignore_errors=True)
    if ctx.problems:
        sys.exit(1)


def report(results, args, link_bytes_s, ctx):
    link = f"relay RTT {args.rtt:g} ms"
    if args.remote_dir:
        link += f", regional peer's files under {args.remote_dir}"
    if args.remote_nice:
        link += f", regional peer and relay at nice {args.remote_nice}"
    if args.isolate_remote:
        link += ", regional peer and relay on a CPU of their own"
    print(f"\nRegional replication, one run, {link}, interval {args.interval}, volumes {SIZE_BYTES // MIB} MiB, "
          f"journals {JOURNAL_BYTES // MIB} MiB\n")
    base, reg = results.get("latency_standalone"), results.get("latency_regional")
    if base and reg:
        ratios = results["latency_ratios"]
        print(f"Latency ({args.runtime} s per run, {len(ratios['rw_p50'])} rounds alternating standalone and "
              "regional; medians, and the ratio's median of the rounds' ratios):")
        lines = [["measure", "standalone", "regional", "ratio", "ratio per round"]]
        for key, label in (("rw_p50", "4k randwrite QD1 p50 (us)"), ("rw_p99", "4k randwrite QD1 p99 (us)"),
                           ("fua_p50", "4k FUA write QD1 p50 (us)"), ("fua_p99", "4k FUA write QD1 p99 (us)")):
            lines.append([label, nb.fmt(base[key]), nb.fmt(reg[key]), f"{statistics.median(ratios[key]):.2f}x",
                          ", ".join(f"{r:.2f}" for r in ratios[key])])
        nb.print_table(lines)
    for name in ("regional", "regional-nozstd"):
        entry = results.get(name)
        if not entry:
            continue
        for workload in ("hot", "unique"):
            w = entry[workload]
            print(f"{name:<16} {workload:<7} wire/logical {nb.fmt(w['ratio'], digits=3)}  "
                  f"({w['wire'] / MIB:.1f} MiB sent for {w['logical'] / MIB:.1f} MiB written; secondary apply "
                  f"{w['applied'] / MIB:.1f} MiB at {nb.fmt(w['apply_mb_s'])} MB/s)")
        lag = entry["hot_lag"]
        if lag:
            print(f"{name:<16} lag_seconds during hot: p50 {lag['p50']:.2f}  p99 {lag['p99']:.2f}  "
                  f"max {lag['max']:.2f}")
    print()
    link_mb_s = link_bytes_s / 1e6
    cap = f"{args.rate_mbit:g} Mbit/s ({link_mb_s:.2f} MB/s)"
    rpo_result = results.get("rpo")
    if rpo_result:
        lag, load = rpo_result["lag"] or {}, rpo_result["load"]
        wire_mb_s = rpo_result["wire"] / rpo_result["seconds"] / 1e6
        apply_mb_s = rpo_result["apply_mb_s"]
        print(f"RPO: regional-wan, link {cap}, {args.rpo_seconds} s of 16 KiB random writes of random data "
              f"paced at half the link:")
        print(f"  load {load['mb_s']:.2f} MB/s written, wire {wire_mb_s:.2f} MB/s (wire/logical "
              f"{nb.fmt(rpo_result['ratio'], digits=3)}); write p50 {nb.fmt(load['p50_us'])} us, "
              f"p99 {nb.fmt(load['p99_us'])} us")
        print(f"  lag_seconds every 100 ms ({lag.get('count', 0)} samples): p50 {nb.fmt(lag.get('p50'), digits=2)}  "
              f"p99 {nb.fmt(lag.get('p99'), digits=2)}  max {nb.fmt(lag.get('max'), digits=2)}")
        print(f"  replica states every 100 ms: {states_text(rpo_result['states'])}; the primary logged "
              f"{len(rpo_result['logged'])} state changes")
        print(f"  secondary apply: {rpo_result['applied'] / MIB:.1f} MiB in {rpo_result['apply_s']:.2f} s of apply "
              f"= {nb.fmt(apply_mb_s)} MB/s, {nb.fmt(nb.ratio_of(apply_mb_s, link_mb_s), digits=2)}x the link")
        print()
    over = results.get("overload")
    if over:
        print(f"Overload: regional-wan, link {cap}, {args.overload_seconds} s of the same writes at "
              f"{args.overload_factor:g}x the link, then none:")
        for label, entry, names in (("standalone", results["overload_standalone"], "ferry"),
                                    ("regional", over["load"], "primary + secondary + relay")):
            breakdown = entry["ferry"]
            cores = " + ".join(nb.fmt(c, digits=2) for c in entry["cores"])
            print(f"  {label}: {entry['mb_s']:.2f} MB/s written, fio p50 {nb.fmt(entry['p50_us'])} us, p99 "
                  f"{nb.fmt(entry['p99_us'])} us; Ferry's mean write {nb.fmt(breakdown['write_total_mean_us'])} us "
                  f"(journal {nb.fmt(breakdown['write_journal_mean_us'])} us); CPU cores {names} {cores}, "
                  f"fio {nb.fmt(entry['fio_cores'], digits=2)}")
        print("  Ferry's mean write by replica state: " + ", ".join(
            f"{state} {mean:.0f} us ({writes} writes)" for state, (mean, writes) in over["write_by_state"].items()))
        rss_kib = over["peak_rss_kib"]
        print(f"  primary peak RSS (VmHWM) {nb.fmt(rss_kib / 1024 if rss_kib else None)} MiB; journal peak "
              f"{over['journal_peak'] / MIB:.1f} of {over['journal_capacity'] / MIB:.0f} MiB")
        print(f"  replica states every 100 ms: {states_text(over['states'])} "
              f"(into degraded {over['degraded_entries']}x)")
        print(f"  primary log: {len(over['logged'])} state changes: "
              f"{', '.join(f'{a}->{b}' for a, b in over['logged']) or '-'}")
        lacking = over["lacking_at_drop"]
        print(f"  at the load's end: state {lacking['state']}, lag_bytes {lacking['lag_bytes'] / MIB:.1f} MiB, "
              f"resync_remaining_bytes {lacking['resync_remaining_bytes'] / MIB:.1f} MiB, lag_seconds "
              f"{lacking['lag_seconds']:.1f}")
        applied = ", ".join(f"{t:.1f}" for t in over["catchup_applied_s"]) or "-"
        print(f"  then resync_remaining_bytes 0 after {nb.fmt(over['resync_sent_s'])} s (the resync sent "
              f"{over['resynced_bytes'] / MIB:.1f} MiB in all), the secondary's catch-up applied after {applied} s, "
              f"in-sync with lag_seconds <= {RECOVERED_LAG_S:g} after "
              f"{nb.fmt(over['recovery_s'])} s; the link carries the {over['lacked_bytes'] / MIB:.1f} MiB the resync "
              f"had left to send in {over['recovery_bound_s']:.1f} s (it carried {over['carried_bytes'] / MIB:.1f} MiB "
              f"meanwhile: that, and what was sent but still on its way)")
        print()
    relay = results.get("relay")
    if relay:
        drops = {k: sum(relay[d][k] for d in ("a_to_b", "b_to_a"))
                 for k in ("dropped_queue_datagrams", "dropped_loss_datagrams", "dropped_send_error_datagrams")}
        print(f"regional-wan relay: {relay['a_to_b']['forwarded_bytes'] / MIB:.1f} MiB a->b; drops: rate queue "
              f"{drops['dropped_queue_datagrams']}, loss {drops['dropped_loss_datagrams']}, send errors "
              f"{drops['dropped_send_error_datagrams']}, kernel {relay['kernel_receive_drops']}")
        print()
    print_goals(results, link_bytes_s)
    nb.print_warnings_and_problems(results.get("log_warnings"), ctx.problems)


def states_text(states):
    """States in the order seen; a long alternation as its first steps and a count per state."""
    if len(states) <= 8:
        return " -> ".join(states)
    counts = {state: states.count(state) for state in dict.fromkeys(states)}
    return (" -> ".join(states[:4]) + f" -> ... ({len(states) - 1} changes; entries: "
            + ", ".join(f"{state} {count}x" for state, count in counts.items()) + ")")


def print_goals(results, link_bytes_s):
    """One row per goal: (label, value, target, better, unit, figures); `-` when not measured."""
    base, reg = results.get("latency_standalone") or {}, results.get("latency_regional") or {}
    ratios = results.get("latency_ratios") or {}
    lag = (results.get("rpo") or {}).get("lag") or {}
    over = results.get("overload") or {}
    over_base, over_load = results.get("overload_standalone") or {}, over.get("load") or {}
    apply_mb_s = (results.get("rpo") or {}).get("apply_mb_s")
    apply_unique_mb_s = ((results.get("regional") or {}).get("unique") or {}).get("apply_mb_s")
    rows = []
    for key, label in (("rw_p50", "4k randwrite QD1 p50"), ("rw_p99", "4k randwrite QD1 p99"),
                       ("fua_p50", "4k FUA QD1 p50"), ("fua_p99", "4k FUA QD1 p99")):
        ratio = statistics.median(ratios[key]) if ratios.get(key) else None
        rows.append((f"{label} vs standalone", ratio, LATENCY_TARGET, "lower",
                     "x", f"{nb.fmt(reg.get(key))} / {nb.fmt(base.get(key))} us"))
    rows += [
        ("RPO: lag_seconds p99 at half the link", lag.get("p99"), RPO_P99_TARGET_S, "lower", " s",
         f"p50 {nb.fmt(lag.get('p50'), digits=2)} s"),
        ("RPO: lag_seconds max at half the link", lag.get("max"), RPO_MAX_TARGET_S, "lower", " s", ""),
    ]
    for key in ("p50_us", "p99_us"):
        rows.append((f"overload: write {key[:3]} vs standalone", nb.ratio_of(over_load.get(key), over_base.get(key)),
                     LATENCY_TARGET, "lower", "x", f"{nb.fmt(over_load.get(key))} / {nb.fmt(over_base.get(key))} us"))
    rows += [
        ("overload: moves into degraded (sampled)", over.get("degraded_entries"), 1, "equal", "",
         f"logged {over.get('logged_degraded_entries', '-')}"),
        ("overload: time to lag <= 2 s vs lacking / link",
         nb.ratio_of(over.get("recovery_s"), over.get("recovery_bound_s")), RECOVERY_TARGET, "lower", "x",
         f"{nb.fmt(over.get('recovery_s'))} / {nb.fmt(over.get('recovery_bound_s'))} s"),
        ("secondary apply rate vs link rate (rpo run)", nb.ratio_of(apply_mb_s, link_bytes_s / 1e6), APPLY_TARGET,
         "higher", "x", f"{nb.fmt(apply_mb_s)} / {link_bytes_s / 1e6:.2f} MB/s"),
        ("secondary apply rate vs link rate (unique run)", nb.ratio_of(apply_unique_mb_s, link_bytes_s / 1e6),
         APPLY_TARGET, "higher", "x", f"{nb.fmt(apply_unique_mb_s)} / {link_bytes_s / 1e6:.2f} MB/s"),
    ]
    lines = [["goal", "value", "target", "verdict", "figures"]]
    for label, value, target, better, unit, figures in rows:
        if value is None:
            verdict = "-"
        elif better == "lower":
            verdict = "PASS" if value <= target else "MISS"
        elif better == "higher":
            verdict = "PASS" if value >= target else "MISS"
        else:
            verdict = "PASS" if value == target else "MISS"
        sign = {"lower": "<=", "higher": ">=", "equal": "=="}[better]
        shown = "-" if value is None else (f"{value}" if better == "equal" else f"{value:.2f}{unit}")
        lines.append([label, shown, f"{sign} {target:g}{unit}", verdict, figures])
    print("Goals (this run):")
    nb.print_table(lines)


if __name__ == "__main__":
    main()
