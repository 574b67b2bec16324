#!/usr/bin/python3
"""Ferry vs qemu-nbd, same machine, same run, same clients.

Both servers export a raw file in the same directory on the real disk, over Unix sockets.
Clients: fio's nbd engine (JSON output) and a libnbd Python client for FUA writes (fio's nbd
engine never sends FUA). Each metric runs on Ferry, then (after Ferry's journal has been applied,
so its background work does not steal the baseline's CPU) on qemu-nbd, and the table reports
Ferry / qemu-nbd ratios against the project's targets.

Run: /usr/bin/python3 benches/nbd_bench.py [--runtime S] [--quick] [--json FILE]
It builds nothing: build first with `cargo build --release -p ferry`.
Must run as /usr/bin/python3 (the libnbd bindings are installed for the system Python).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
MIB = 1 << 20
GIB = 1 << 30
READY_TIMEOUT_S = 15
QUIESCE_TIMEOUT_S = 60
TOOLS = {"fio": "fio", "qemu-nbd": "qemu-utils", "nbdinfo": "libnbd-bin"}


def log(message):
    print(message, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")


def proc_status_kib(pid, key):
    """VmHWM / VmRSS of a process in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid):
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the next peak is this load's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        log(f"cannot reset peak RSS of {pid}: {error}")


class Ferry:
    name = "ferry"

    def __init__(self, workdir, size_bytes, journal_bytes):
        self.dir = os.path.join(workdir, "ferry")
        os.makedirs(os.path.join(self.dir, "data"))
        self.control = os.path.join(self.dir, "ctl.sock")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.config = os.path.join(self.dir, "ferry.toml")
        self.image = os.path.join(workdir, "ferry.img")
        self.log_path = os.path.join(workdir, "ferry.stderr.log")
        with open(self.config, "w") as f:
            f.write(
                f"""[node]
name = "bench"
data_dir = "{self.dir}/data"
control_socket = "{self.control}"
metrics_listen = "127.0.0.1:{free_port()}"

[nbd]
listen = ["unix:{self.sock}"]

[[volumes]]
name = "vol0"
device = "{self.image}"
size = "{size_bytes}"
journal_size = "{journal_bytes}"
"""
            )
        self.proc = None
        self.uri = f"nbd+unix:///vol0?socket={self.sock}"

    def start(self):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [FERRY, "run", "--config", self.config],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=self.log_file,
        )

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry exited with {self.proc.returncode}; see {self.log_path}")
            return self.status() is not None

        wait_for(ready, READY_TIMEOUT_S, "ferry status")

    @property
    def pid(self):
        return self.proc.pid

    def status(self):
        result = subprocess.run(
            [FERRY, "--socket", self.control, "status", "--json"],
            capture_output=True,
            timeout=10,
        )
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    def quiesce(self):
        """Waits (bounded) until the journal has been applied to the device."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        while time.monotonic() < deadline:
            status = self.status()
            try:
                journal = status["volumes"][0]["journal"]
                if journal.get("unapplied_bytes", 0) == 0:
                    return
            except (TypeError, KeyError, IndexError):
                return
            time.sleep(0.1)
        log("ferry journal still not applied after %ss; continuing" % QUIESCE_TIMEOUT_S)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
            if code != 0:
                log(f"ferry exited with {code} on SIGTERM (expected 0); see {self.log_path}")
        except subprocess.TimeoutExpired:
            log("ferry did not exit within 30s of SIGTERM; killing it")
            self.proc.kill()
            self.proc.wait()


class QemuNbd:
    name = "qemu-nbd"

    def __init__(self, workdir, size_bytes):
        self.image = os.path.join(workdir, "qemu.img")
        self.sock = os.path.join(workdir, "qemu-nbd.sock")
        self.pid_file = os.path.join(workdir, "qemu-nbd.pid")
        with open(self.image, "wb") as f:
            f.truncate(size_bytes)
        self.uri = f"nbd+unix:///vol0?socket={self.sock}"
        self._pid = None

    def start(self):
        subprocess.run(
            [
                "qemu-nbd", "-f", "raw", "--cache=none", "--aio=io_uring", "--persistent",
                "--shared=8", "-x", "vol0", "-k", self.sock, "--fork", "--pid-file", self.pid_file,
                self.image,
            ],
            check=True,
            timeout=30,
        )
        wait_for(lambda: os.path.exists(self.pid_file) and os.path.getsize(self.pid_file) > 0, 10, "qemu-nbd pid file")
        with open(self.pid_file) as f:
            self._pid = int(f.read().strip())

    @property
    def pid(self):
        return self._pid

    def quiesce(self):
        pass

    def stop(self):
        if self._pid is None:
            return
        try:
            os.kill(self._pid, signal.SIGTERM)
        except ProcessLookupError:
            self._pid = None
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self._pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self._pid, signal.SIGKILL)
        self._pid = None


class Bench:
    def __init__(self, args, workdir, size_bytes):
        self.args = args
        self.workdir = workdir
        self.size_bytes = size_bytes
        self.runtime = args.runtime

    def fio(self, server, name, options):
        out = os.path.join(self.workdir, f"fio-{server.name}-{name}.json")
        command = [
            "fio", f"--name={name}", "--ioengine=nbd", f"--uri={server.uri}",
            f"--size={self.size_bytes}", "--percentile_list=50:99:99.9",
            "--output-format=json", f"--output={out}",
        ] + options
        result = subprocess.run(command, capture_output=True, text=True, timeout=self.runtime * 4 + 600)
        if result.returncode != 0:
            raise RuntimeError(f"fio {name} on {server.name} failed: {result.stdout}\n{result.stderr}")
        with open(out) as f:
            text = f.read()
        data = json.loads(text[text.index("{"):])
        job = data["jobs"][0]
        if job.get("error", 0) != 0:
            raise RuntimeError(f"fio {name} on {server.name}: error {job['error']}")
        return job

    def timed(self, extra):
        return ["--time_based", f"--runtime={self.runtime}", "--ramp_time=1"] + extra

    def prefill(self, server):
        started = time.monotonic()
        self.fio(server, "prefill", ["--rw=write", "--bs=1m", "--iodepth=8"])
        log(f"prefilled {server.name} in {time.monotonic() - started:.1f}s")

    def randwrite_qd1(self, server):
        job = self.fio(server, "randwrite-qd1", self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1"]))
        return {"p50_us": pct(job["write"], "50"), "p99_us": pct(job["write"], "99"), "iops": job["write"]["iops"]}

    def write_flush_qd1(self, server):
        job = self.fio(server, "write-flush-qd1", self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]))
        result = {"write_p50_us": pct(job["write"], "50"), "iops": job["write"]["iops"]}
        sync = job.get("sync", {})
        lat = sync.get("lat_ns", {}).get("percentile", {})
        result["flush_p50_us"] = lat.get("50.000000", 0) / 1000 if lat else None
        if result["flush_p50_us"] is not None:
            result["cycle_p50_us"] = result["write_p50_us"] + result["flush_p50_us"]
        return result

    def qd32(self, server, jobs):
        depth = 32 // jobs
        pid = server.pid
        reset_peak_rss(pid)
        job = self.fio(
            server,
            f"randwrite-qd32-{jobs}conn",
            self.timed(["--rw=randwrite", "--bs=4k", f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting"]),
        )
        return {"iops": job["write"]["iops"], "vmhwm_kib": proc_status_kib(pid, "VmHWM")}

    def seqwrite(self, server):
        job = self.fio(server, "seqwrite-1m", self.timed(["--rw=write", "--bs=1m", "--iodepth=8"]))
        return {"mb_s": job["write"]["bw_bytes"] / 1e6}

    def randread_qd1(self, server):
        job = self.fio(server, "randread-qd1", self.timed(["--rw=randread", "--bs=4k", "--iodepth=1"]))
        return {"p50_us": pct(job["read"], "50"), "p99_us": pct(job["read"], "99"), "iops": job["read"]["iops"]}

    def fua_qd1(self, server):
        import nbd  # only the system Python has it; checked in main()

        handle = nbd.NBD()
        handle.connect_uri(server.uri)
        try:
            if not handle.can_fua():
                raise RuntimeError(f"{server.name} does not advertise FUA")
            size = handle.get_size()
            blocks = size // 4096
            rng = random.Random(1234)
            buffer = os.urandom(4096)
            latencies_ns = []
            # Warm up for a second, as fio's ramp_time does.
            end = time.monotonic() + 1
            while time.monotonic() < end:
                handle.pwrite(buffer, rng.randrange(blocks) * 4096, nbd.CMD_FLAG_FUA)
            end = time.monotonic() + self.runtime
            # Bounded by time and by count.
            while time.monotonic() < end and len(latencies_ns) < 5_000_000:
                offset = rng.randrange(blocks) * 4096
                started = time.perf_counter_ns()
                handle.pwrite(buffer, offset, nbd.CMD_FLAG_FUA)
                latencies_ns.append(time.perf_counter_ns() - started)
        finally:
            handle.shutdown()
        latencies_ns.sort()
        count = len(latencies_ns)
        return {
            "p50_us": latencies_ns[count // 2] / 1000,
            "p99_us": latencies_ns[min(count - 1, count * 99 // 100)] / 1000,
            "iops": count / self.runtime,
            "count": count,
        }


def pct(direction, which):
    percentiles = direction["clat_ns"]["percentile"]
    return percentiles[f"{which}.000000"] / 1000


# (key, label, function name, function args, value key, better, target ratio)
# better: "lower" (latency) or "higher" (throughput); target: ratio bound or None.
METRICS = [
    ("seq", "1 MiB seq write QD8 (MB/s)", "seqwrite", (), "mb_s", "higher", 0.9),
    ("rw_p50", "4k randwrite QD1 p50 (us)", "randwrite_qd1", (), "p50_us", "lower", None),
    ("rw_p99", "4k randwrite QD1 p99 (us)", None, "rw_p50", "p99_us", "lower", None),
    ("fua_p50", "4k FUA write QD1 p50 (us)", "fua_qd1", (), "p50_us", "lower", 1.0),
    ("fua_p99", "4k FUA write QD1 p99 (us)", None, "fua_p50", "p99_us", "lower", None),
    ("wf_iops", "write+flush QD1 (IOPS)", "write_flush_qd1", (), "iops", "higher", None),
    ("wf_p50", "write+flush QD1 write p50 (us)", None, "wf_iops", "write_p50_us", "lower", None),
    ("wf_flush_p50", "write+flush QD1 flush p50 (us)", None, "wf_iops", "flush_p50_us", "lower", None),
    ("qd32_1", "4k randwrite QD32 1 conn (IOPS)", "qd32", (1,), "iops", "higher", 1.5),
    ("qd32_4", "4k randwrite QD32 4 conn x QD8 (IOPS)", "qd32", (4,), "iops", "higher", 1.5),
    ("rr_p50", "4k randread QD1 p50 (us)", "randread_qd1", (), "p50_us", "lower", 1.1),
]


def verdict(ratio, better, target):
    if target is None or ratio is None:
        return "-"
    ok = ratio <= target if better == "lower" else ratio >= target
    sign = "<=" if better == "lower" else ">="
    return f"{sign} {target:.1f}x {'PASS' if ok else 'MISS'}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per measurement, 256 MiB volumes")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument("--size", default=None, help="volume size in MiB (default 1024, --quick 256)")
    parser.add_argument("--only", choices=["both", "qemu-nbd", "ferry"], default="both",
                        help="run one server only (for testing this script)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.runtime = min(args.runtime, 3)
    size_mib = int(args.size) if args.size else (256 if args.quick else 1024)
    size_bytes = size_mib * MIB

    missing = [f"{tool} (apt-get install {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        sys.exit("missing tools: " + ", ".join(missing))
    try:
        import nbd  # noqa: F401
    except ImportError:
        sys.exit("cannot import nbd: run with /usr/bin/python3 (apt-get install python3-libnbd)")
    if args.only != "qemu-nbd" and not os.access(FERRY, os.X_OK):
        sys.exit(f"{FERRY} not found: build it first with `cargo build --release -p ferry` in {ROOT}")

    # On the real disk (the target dir), not tmpfs: O_DIRECT and fdatasync must mean something.
    base = os.path.join(ROOT, "target")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench-", dir=base)
    servers = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    results = {}
    try:
        if args.only in ("both", "ferry"):
            servers.append(Ferry(workdir, size_bytes, size_bytes))
        if args.only in ("both", "qemu-nbd"):
            servers.append(QemuNbd(workdir, size_bytes))
        for server in servers:
            server.start()
            log(f"started {server.name} (pid {server.pid}) at {server.uri}")
        for server in servers:
            Bench(args, workdir, size_bytes).prefill(server)
            server.quiesce()
        bench = Bench(args, workdir, size_bytes)
        raw = {server.name: {} for server in servers}
        for key, label, function, fargs, value_key, better, target in METRICS:
            if function is None:
                continue
            for server in servers:
                log(f"{label}: {server.name} ...")
                raw[server.name][key] = getattr(bench, function)(server, *fargs)
                server.quiesce()
        results = {"runtime_s": args.runtime, "size_bytes": size_bytes, "raw": raw, "table": []}
        print_table(servers, raw, results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
            log(f"wrote {args.json}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        raise
    except Exception:
        for server in servers:
            if isinstance(server, Ferry) and os.path.exists(server.log_path):
                with open(server.log_path, errors="replace") as f:
                    log("--- ferry stderr (tail) ---\n" + "".join(f.readlines()[-40:]))
        raise
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as error:  # keep cleaning up the others
                log(f"stopping {server.name}: {error}")
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def print_table(servers, raw, results):
    names = [server.name for server in servers]
    both = names == ["ferry", "qemu-nbd"]
    rows = []
    for key, label, function, fargs, value_key, better, target in METRICS:
        source_key = key if function is not None else fargs
        values = {name: raw[name].get(source_key, {}).get(value_key) for name in names}
        ratio = None
        if both and values["ferry"] is not None and values["qemu-nbd"]:
            ratio = values["ferry"] / values["qemu-nbd"]
        rows.append((label, values, ratio, verdict(ratio, better, target)))
        results["table"].append({"metric": label, "values": values, "ratio": ratio, "target": target, "better": better})
    header = ["metric"] + names + (["ratio", "target"] if both else [])
    lines = [header]
    for label, values, ratio, check in rows:
        line = [label] + [fmt(values[name]) for name in names]
        if both:
            line += [f"{ratio:.2f}x" if ratio is not None else "-", check]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))
    print()
    for server in servers:
        for key in ("qd32_1", "qd32_4"):
            hwm = raw[server.name].get(key, {}).get("vmhwm_kib")
            if hwm is not None:
                print(f"{server.name}: peak RSS (VmHWM) under {key}: {hwm / 1024:.1f} MiB")
                results.setdefault("peak_rss_kib", {}).setdefault(server.name, {})[key] = hwm


def fmt(value):
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}"


if __name__ == "__main__":
    main()
