#!/usr/bin/python3
"""Where the microseconds of one QD1 4 KiB write go, stage by stage, on this machine.

Runs Ferry standalone, a metro pair over loopback, (optionally) that pair with its peer
killed (degraded), and (optionally) a regional pair through the relay (--rtt, interval 1 s), and for each drives QD1 4 KiB writes for --seconds: plain writes with fio's
nbd engine (randwrite, QD1), then FUA writes with a libnbd loop. Three instruments, all optional
but the first:

  --probe BINARY   a Ferry binary built with benches/stage_probe.patch applied: every 4 KiB
                   write is stamped at each stage (NBD header read, payload read, request task,
                   journal queue, LSN, batch submit, io_uring completion, writer wake-up,
                   fdatasync, client wake-up, replication send / ack, settle, reply queued /
                   written; on the secondary: frame received, journaled, ack written); the
                   script prints the median and p90 of each stage's share.
  --perf           `perf record -g` of every Ferry process during the plain-write run, then
                   `perf report --no-children` (top symbols) into the work directory, and a
                   flame graph when `inferno-collapse-perf` and `inferno-flamegraph` are on PATH
                   (cargo install inferno).
  --stat           `perf stat -e task-clock,context-switches,cpu-migrations` of the primary
                   during the plain-write run: CPU time and context switches per write.

Usage: /usr/bin/python3 benches/profile_write.py --probe /tmp/ferry-probe [--perf] [--stat]
           [--configs standalone,metro,degraded,regional] [--seconds 10] [--keep]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench as nb  # noqa: E402

MIB = 1 << 20

# (label, from stage, to stage): consecutive intervals of one write on the primary.
PRIMARY = [
    ("NBD payload read (after header)", "nbd_header", "nbd_payload"),
    ("hop: reader -> request task", "nbd_payload", "execute"),
    ("volume: admission gate", "execute", "journal_send"),
    ("hop: channel -> journal writer, LSN", "journal_send", "writer_lsn"),
    ("writer: index, tap, batch header", "writer_lsn", "batch_submit"),
    ("io_uring write (RWF_DSYNC if FUA)", "batch_submit", "uring_done"),
    ("hop: completion -> writer task", "uring_done", "writer_event"),
    ("fdatasync (when not RWF_DSYNC)", "writer_event", "synced"),
    ("hop: writer -> request task", "writer_event|synced", "append_returned"),
    ("replication: wait to settle", "append_returned", "settled"),
    ("hop: request task -> reply writer", "settled", "reply_queued"),
    ("reply write to socket", "reply_queued", "reply_written"),
]
# Measured from the LSN (the tap), in parallel with the journal.
REPLICATION = [
    ("replication: tap -> frame written to QUIC", "writer_lsn", "repl_sent"),
    ("replication: frame written -> ack delivered", "repl_sent", "repl_acked"),
    ("replication: ack delivered -> settled", "repl_acked", "settled"),
]
SECONDARY = [
    ("secondary: frame delivered -> journaled", "sec_recv", "sec_append_done"),
    ("secondary: journaled -> ack written", "sec_append_done", "sec_ack_written"),
]


def quantile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def interval(row, start, end):
    starts = [row[s] for s in start.split("|") if s in row]
    if not starts or end not in row:
        return None
    return (row[end] - max(starts)) / 1000


def read_rows(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # the last line may be cut by the stop
    return rows


def stage_table(rows, spec):
    """(label, p50, p90, count, p50 over the slowest 1 % of writes) per stage: the last
    column says which stages make the tail (the writes whose server total is at its p99 or
    above)."""
    totals = [interval(r, "nbd_header", "reply_written") for r in rows]
    p99 = quantile([t for t in totals if t is not None], 0.99)
    slow = [r for r, t in zip(rows, totals) if t is not None and p99 is not None and t >= p99]
    out = []
    for label, start, end in spec:
        values = [v for v in (interval(r, start, end) for r in rows) if v is not None]
        tail = [v for v in (interval(r, start, end) for r in slow) if v is not None]
        out.append((label, quantile(values, 0.5), quantile(values, 0.9), len(values), quantile(tail, 0.5)))
    return out


def fio_qd1(server, workdir, seconds, name):
    out = os.path.join(workdir, f"fio-{name}.json")
    subprocess.run(["fio", f"--name={name}", "--ioengine=nbd", f"--uri={server.uri}", f"--size={server.size_bytes}",
                    "--rw=randwrite", "--bs=4k", "--iodepth=1", "--time_based", f"--runtime={seconds}",
                    "--percentile_list=50:99", "--output-format=json", f"--output={out}"],
                   check=True, capture_output=True, timeout=seconds * 4 + 120)
    job = nb.read_fio_job(out, name)["write"]
    return {"p50_us": nb.pct(job, "50"), "p99_us": nb.pct(job, "99"), "count": job["total_ios"]}


def fua_qd1(server, seconds):
    import nbd

    handle = nbd.NBD()
    handle.connect_uri(server.uri)
    latencies = []
    try:
        blocks = handle.get_size() // 4096
        rng = random.Random(7)
        buffer = os.urandom(4096)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter_ns()
            handle.pwrite(buffer, rng.randrange(blocks) * 4096, nbd.CMD_FLAG_FUA)
            latencies.append(time.perf_counter_ns() - started)
    finally:
        handle.shutdown()
    latencies.sort()
    return {"p50_us": nb.percentile(latencies, 0.5) / 1000, "p99_us": nb.percentile(latencies, 0.99) / 1000,
            "count": len(latencies)}


def start_perf(args, workdir, name, pids):
    procs = []
    if args.perf:
        for pid in pids:
            data = os.path.join(workdir, f"perf-{name}-{pid}.data")
            procs.append(("record", pid, data, subprocess.Popen(
                ["perf", "record", "-g", "-o", data, "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    if args.stat:
        out = os.path.join(workdir, f"perf-stat-{name}.txt")
        procs.append(("stat", pids[0], out, subprocess.Popen(
            ["perf", "stat", "-e", "task-clock,context-switches,cpu-migrations", "-p", str(pids[0]), "-o", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(0.3 if procs else 0)
    return procs


def stop_perf(args, procs, name, writes, out_dir):
    import signal
    summary = {}
    for kind, pid, path, proc in procs:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        if kind == "stat":
            text = open(path).read()
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[1] in ("msec", "context-switches", "cpu-migrations"):
                    key = "task_clock_ms" if parts[1] == "msec" else parts[1]
                    summary[key] = float(parts[0].replace(",", ""))
            if writes:
                summary["cpu_us_per_write"] = summary.get("task_clock_ms", 0) * 1000 / writes
                summary["context_switches_per_write"] = summary.get("context-switches", 0) / writes
        else:
            report = os.path.join(out_dir, f"perf-report-{name}-{pid}.txt")
            with open(report, "w") as f:
                subprocess.run(["perf", "report", "-i", path, "--no-children", "--stdio", "--percent-limit", "1.5",
                                "-g", "none", "--sort", "comm,dso,symbol"], stdout=f, stderr=subprocess.DEVNULL,
                               timeout=600)
            summary[f"perf_report_{pid}"] = report
            if shutil.which("inferno-collapse-perf") and shutil.which("inferno-flamegraph"):
                svg = os.path.join(out_dir, f"flame-{name}-{pid}.svg")
                script = subprocess.run(["perf", "script", "-i", path], capture_output=True, timeout=600)
                folded = subprocess.run(["inferno-collapse-perf"], input=script.stdout, capture_output=True)
                with open(svg, "wb") as f:
                    f.write(subprocess.run(["inferno-flamegraph"], input=folded.stdout, capture_output=True).stdout)
                summary[f"flame_{pid}"] = svg
    return summary


def run_config(args, ctx, name, out_dir):
    size = args.size * MIB
    probe_dir = os.path.join(ctx.workdir, "probe")
    os.makedirs(probe_dir, exist_ok=True)
    if name == "standalone":
        server = nb.Ferry(ctx, size, size)
        nodes = [server.node]
    elif name == "regional":
        # regional_bench's pair: interval 1 s, zstd, through the relay at --rtt.
        import regional_bench

        server = regional_bench.RegionalPair(ctx, name, args.rtt, "1s", "zstd")
        nodes = [server.a, server.b]
    else:
        server = nb.MetroPair(ctx, name, size, size, None)
        nodes = [server.a, server.b]
    files = {}
    for node in nodes:
        files[node.node] = os.path.join(probe_dir, f"{name}-{node.node}.jsonl")
    # The probe file is chosen by the environment each process starts with.
    if isinstance(server, nb.MetroPair):
        os.environ["FERRY_PROBE"] = files["b"]
        server.b.start()
        os.environ["FERRY_PROBE"] = files["a"]
        server.a.start()
        os.environ.pop("FERRY_PROBE")
        server.wait_in_sync(120, "initial sync")
    else:
        os.environ["FERRY_PROBE"] = files[server.node.node]
        server.start()
        os.environ.pop("FERRY_PROBE")
    result = {}
    try:
        bench = nb.Bench.__new__(nb.Bench)
        bench.workdir = ctx.workdir
        bench.runtime = args.seconds
        bench.prefill(server)
        server.quiesce()
        if name == "degraded":
            server.b.proc.kill()
            server.b.proc.wait()
            deadline = time.monotonic() + 30
            while server.state() != "degraded" and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1)
        for f in files.values():  # the prefill's 1 MiB writes are not probed; start clean anyway
            open(f, "a").close()
        marks = {n: os.path.getsize(f) for n, f in files.items()}
        pids = [n.pid for n in nodes if n.running()]
        perf = start_perf(args, ctx.workdir, name, pids)
        result["write_client"] = fio_qd1(server, ctx.workdir, args.seconds, f"{name}-write")
        result["perf"] = stop_perf(args, perf, name, result["write_client"]["count"], out_dir)
        server.quiesce() if name != "degraded" else time.sleep(0.5)
        time.sleep(0.5)
        marks_fua = {n: os.path.getsize(f) for n, f in files.items()}
        result["fua_client"] = fua_qd1(server, args.seconds)
        time.sleep(0.5)  # the probe writes its file every 200 ms
        for kind, begin, end in (("write", marks, marks_fua), ("fua", marks_fua, None)):
            rows = {}
            for n, f in files.items():
                with open(f) as fh:
                    fh.seek(begin[n])
                    text = fh.read() if end is None else fh.read(end[n] - begin[n])
                rows[n] = [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]
            primary = [r for r in rows[nodes[0].node] if r["kind"] == "primary" and r["fua"] == (kind == "fua")]
            result[f"{kind}_rows"] = len(primary)
            result[f"{kind}_total"] = stage_table(primary, [("server total", "nbd_header", "reply_written")])[0]
            result[f"{kind}_primary"] = stage_table(primary, PRIMARY)
            if name != "standalone":
                result[f"{kind}_replication"] = stage_table(primary, REPLICATION)
            if name == "metro":
                secondary = [r for r in rows["b"] if r["kind"] == "secondary"]
                result[f"{kind}_secondary"] = stage_table(secondary, SECONDARY)
    finally:
        server.stop()
    return result


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def report(results):
    for name, r in results.items():
        for kind in ("write", "fua"):
            client = r[f"{kind}_client"]
            total = r[f"{kind}_total"]
            print(f"\n## {name}, {'4 KiB write' if kind == 'write' else '4 KiB FUA write'} QD1: client p50 "
                  f"{fmt(client['p50_us'])} us (p99 {fmt(client['p99_us'])}), server p50 {fmt(total[1])} us "
                  f"({r[f'{kind}_rows']} probed writes)\n")
            print("| stage | p50 us | p90 us | p50 us in the slowest 1 % |\n|---|---|---|---|")
            for section in ("primary", "replication", "secondary"):
                for label, p50, p90, count, tail in r.get(f"{kind}_{section}", []):
                    if count:
                        print(f"| {label} | {fmt(p50)} | {fmt(p90)} | {fmt(tail)} |")
            print(f"| client + socket (client p50 - server p50) | {fmt(client['p50_us'] - total[1]) if total[1] else '-'} | |")
        if r.get("perf"):
            print(f"\n{name} perf: {json.dumps(r['perf'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", default=nb.FERRY, help="a Ferry binary built with benches/stage_probe.patch")
    parser.add_argument("--configs", default="standalone,metro")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="volume MiB")
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--stat", action="store_true")
    parser.add_argument("--out", default=None, help="directory for perf reports and flame graphs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rtt", type=float, default=40.0, help="regional: the relay's round trip in ms (default 40)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.ferry = args.probe
    args.relay = None
    if "regional" in args.configs.split(","):
        args.relay = nb.build_relay(args)
    workdir = tempfile.mkdtemp(prefix="profile-", dir=os.path.join(nb.ROOT, "target"))
    out_dir = args.out or workdir
    os.makedirs(out_dir, exist_ok=True)
    ctx = nb.Context(args, workdir)
    results = {}
    try:
        subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                       check=True, capture_output=True, timeout=60)
        for name in args.configs.split(","):
            nb.log(f"profiling {name}")
            results[name] = run_config(args, ctx, name, out_dir)
    finally:
        nb.reap_all_children()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
