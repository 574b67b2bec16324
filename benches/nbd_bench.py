#!/usr/bin/python3
"""Ferry vs qemu-nbd, standalone and metro-replicated, same machine, same run, same clients.

Configurations (every one exports a volume file in the same work directory on the real disk,
over a Unix socket):
  qemu-nbd     qemu-nbd on a raw file (the baseline)
  ferry        Ferry standalone
  metro-lo     Ferry metro, primary + secondary, the peer over loopback (no relay)
  metro-Nms    Ferry metro through the UDP delay relay (benches/relay) at N ms RTT (--rtts)
  resync       initial full sync throughput and delta resync after an outage (its own pair)

Clients: fio's nbd engine (JSON output) and a libnbd Python client for FUA writes (fio's nbd
engine never sends FUA). Each metric runs on every configuration in turn (after the previous
one's journals are applied, so background work does not steal the next one's CPU), and the
report gives Ferry / qemu-nbd ratios, metro / standalone ratios, and each metro FUA latency
against its physical floor max(local durable write, RTT + remote durable write), both measured
in the same run. Ratios are only meaningful within one run.

Run: /usr/bin/python3 benches/nbd_bench.py [--runtime S] [--quick] [--json FILE]
Build Ferry first (`cargo build --release -p ferry`); the script builds the relay itself with
`cargo build --release --manifest-path benches/relay/Cargo.toml`.
Must run as /usr/bin/python3 (the libnbd bindings are installed for the system Python).
"""

import argparse
import ctypes
import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
RELAY_MANIFEST = os.path.join(ROOT, "benches", "relay", "Cargo.toml")
RELAY = os.path.join(ROOT, "benches", "relay", "target", "release", "ferry-relay")
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
READY_TIMEOUT_S = 15
QUIESCE_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# Metro replicas in this bench: a lost peer is declared after this long (SPEC default is 5s).
PEER_TIMEOUT = "2s"
TOOLS = {"fio": "fio", "qemu-nbd": "qemu-utils", "nbdinfo": "libnbd-bin"}
# Targets of the metro configurations.
METRO_FUA_FLOOR_TARGET = 1.2  # metro FUA QD1 p50 <= 1.2x max(L, RTT + L)
METRO_VS_STANDALONE_TARGET = 0.8  # metro QD32 IOPS and sequential MB/s >= 0.8x standalone
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: every child is registered, dies with this process (PR_SET_PDEATHSIG) and is
# stopped in the end whatever happens.

_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
CHILDREN = []


def _die_with_parent():
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(command, **kwargs):
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent, **kwargs)
    CHILDREN.append(proc)
    return proc


def stop_process(proc, sig=signal.SIGTERM, timeout=STOP_TIMEOUT_S, what=None):
    """Signals a child, waits, kills it if it does not exit; returns its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGCONT)  # in case it was stopped
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{what or proc.args[0]} (pid {proc.pid}) did not exit within {timeout}s; killing it")
        proc.kill()
        proc.wait()
        return proc.returncode


def stop_all(servers):
    """Stops every server (one failing to stop does not keep the others running), then reaps
    every child process the script started."""
    for server in servers:
        try:
            server.stop()
        except Exception as error:  # keep cleaning up the others
            log(f"stopping {server.name}: {error}")
    reap_all_children()


def reap_all_children():
    for proc in CHILDREN:
        if proc.poll() is None:
            log(f"cleanup: stopping leftover pid {proc.pid} ({os.path.basename(str(proc.args[0]))})")
            stop_process(proc, timeout=10)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s, what, interval=0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")


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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def reset_peak_rss(pid):
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the next peak is this load's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        log(f"cannot reset peak RSS of {pid}: {error}")


def parse_metrics(text):
    """Prometheus text format -> {(name, ((label, value), ...)): float}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)", line)
        if not match:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(3) or "")))
        try:
            samples[(match.group(1), labels)] = float(match.group(4))
        except ValueError:
            pass
    return samples


def metric_sum(samples, name, **labels):
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and all((k, v) in sample_labels for k, v in labels.items()):
            total += value
    return total


def udp_drops(ports):
    """Sum of the kernel's receive-drop counters of the loopback UDP sockets bound to `ports`
    (the `drops` column of /proc/net/udp): datagrams lost because a receiver was too slow."""
    wanted = {f"0100007F:{port:04X}" for port in ports}
    total = 0
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] in wanted:
                    total += int(fields[-1])
    except OSError:
        return None
    return total


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


# ---------------------------------------------------------------------------------------------
# The relay (benches/relay: testkit/src/relay.rs as a process).


def launcher(nice, cpus):
    """The command prefix that starts a process at niceness `nice` (0: unchanged) on the CPUs
    `cpus` (a `taskset -c` list; None: any)."""
    return (["nice", "-n", str(nice)] if nice else []) + (["taskset", "-c", cpus] if cpus else [])


class Relay:
    """A `ferry-relay --control-stdin` process between real UDP addresses a and b, with a
    one-way delay, and optionally a rate cap (Mbit/s) and a random loss probability, in both
    directions."""

    def __init__(self, binary, a, b, one_way_us, log_path, rate_mbit=None, loss=0.0, nice=0, cpus=None):
        self.log_file = open(log_path, "ab")
        command = launcher(nice, cpus) + [binary, "--a", a, "--b", b, "--delay-us", str(int(one_way_us)),
                                          "--control-stdin"]
        if rate_mbit is not None:
            command += ["--rate-mbit", f"{rate_mbit:g}"]
        if loss:
            command += ["--loss", f"{loss:g}"]
        self.proc = spawn(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            bufsize=1,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"relay exited at start ({self.proc.wait()}); see {log_path}")
        info = json.loads(line)
        self.addr_for_a = info["addr_for_a"]
        self.addr_for_b = info["addr_for_b"]

    def command(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"relay command {text!r}: {reply or 'relay exited'}")
        return reply

    def stats(self):
        return json.loads(self.command("stats"))

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the relay exits when its stdin closes
            except OSError:
                pass
            stop_process(self.proc, timeout=5, what="relay")
        self.log_file.close()


def ping_rtt(relay_binary, rtt_ms):
    """UDP round trip on loopback (rtt_ms None: direct) or through an in-process relay adding
    rtt_ms; about 1.5 s of pings. Returns the relay's JSON (min/p50/p99/mean in us)."""
    if rtt_ms is None:
        command = [relay_binary, "--ping", "3000", "--direct"]
    else:
        count = max(200, int(1500 / rtt_ms))
        command = [relay_binary, "--ping", str(count), "--delay-us", str(int(rtt_ms * 500))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr}")
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------
# Servers. Each has: name, kind, uri, pids, start(), quiesce(), stop(), and the Ferry ones
# their nodes' logs.


class FerryNode:
    """One `ferry run` process with its own directory, config and log."""

    def __init__(self, ferry, directory, node, size_bytes, journal_bytes, device=None,
                 listen_port=None, certs=None, peer=None, peer_address=None, role=None):
        self.ferry = ferry
        self.node = node
        self.dir = directory
        self.nice = 0  # the niceness `ferry run` starts with (every thread inherits it)
        self.cpus = None  # the CPUs it may run on (`taskset -c` list), or None for any
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.control = os.path.join(self.dir, "ctl.sock")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.config = os.path.join(self.dir, "ferry.toml")
        self.image = device or os.path.join(self.dir, "vol0.img")
        self.log_path = os.path.join(self.dir, "ferry.stderr.log")
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.size_bytes = size_bytes
        self.journal_bytes = journal_bytes
        self.listen_port = listen_port
        self.certs = certs
        self.peer = peer
        self.role = role
        self.proc = None
        self.log_file = None
        self.exit_codes = []
        self.write_config(peer_address)
        self.uri = f"nbd+unix:///vol0?socket={self.sock}"

    def write_config(self, peer_address):
        text = f"""[node]
name = "{self.node}"
data_dir = "{self.dir}/data"
control_socket = "{self.control}"
metrics_listen = "{self.metrics_addr}"
"""
        if self.peer:
            text += f'listen = "127.0.0.1:{self.listen_port}"\n'
        text += f"""
[nbd]
listen = ["unix:{self.sock}"]
"""
        if self.peer:
            text += f"""
[tls]
ca = "{self.certs}/ca.pem"
cert = "{self.certs}/{self.node}.pem"
key = "{self.certs}/{self.node}.key"

[[peers]]
name = "{self.peer}"
address = "{peer_address}"
"""
        text += f"""
[[volumes]]
name = "vol0"
device = "{self.image}"
size = "{self.size_bytes}"
journal_size = "{self.journal_bytes}"
"""
        if self.peer:
            text += f"""initial_role = "{self.role}"

[[volumes.replicas]]
peer = "{self.peer}"
mode = "metro"
peer_timeout = "{PEER_TIMEOUT}"
"""
        with open(self.config, "w") as f:
            f.write(text)

    def start(self):
        self.log_file = open(self.log_path, "ab")
        self.proc = spawn(
            launcher(self.nice, self.cpus) + [self.ferry, "run", "--config", self.config],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=self.log_file,
        )

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry node {self.node} exited with {self.proc.returncode}; see {self.log_path}")
            return self.status() is not None

        wait_for(ready, READY_TIMEOUT_S, f"ferry node {self.node} status")

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def status(self):
        """The control socket's status result (SPEC §5), or None."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(self.control)
                s.sendall(b'{"op": "status"}\n')
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            reply = json.loads(data)
            return reply["result"] if reply.get("ok") else None
        except (OSError, ValueError, KeyError):
            return None

    def volume(self):
        status = self.status()
        try:
            return status["volumes"][0]
        except (TypeError, KeyError, IndexError):
            return None

    def replica(self):
        volume = self.volume()
        try:
            return volume["replicas"][0]
        except (TypeError, KeyError, IndexError):
            return None

    def metrics(self):
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as response:
            return parse_metrics(response.read().decode())

    def log_offset(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_since(self, offset):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return ANSI.sub("", f.read().decode(errors="replace"))
        except OSError:
            return ""

    def log_tail(self, lines=40):
        return "".join(self.log_since(0).splitlines(keepends=True)[-lines:])

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        code = stop_process(self.proc, what=f"ferry node {self.node}")
        self.exit_codes.append(code)
        if code != 0:
            log(f"ferry node {self.node} exited with {code} on SIGTERM (expected 0); see {self.log_path}")
        self.log_file.close()


def wait_applied(node, name):
    """Waits (bounded) until the node's journal has been applied to the device."""
    deadline = time.monotonic() + QUIESCE_TIMEOUT_S
    while time.monotonic() < deadline:
        volume = node.volume()
        if volume is None or volume["journal"].get("unapplied_bytes", 0) == 0:
            return
        time.sleep(0.1)
    log(f"{name}: journal still not applied after {QUIESCE_TIMEOUT_S}s; continuing")


class Server:
    kind = "base"
    failed = None  # the error that took this configuration out of the run

    def nodes(self):
        return []


class Ferry(Server):
    """Ferry standalone."""

    name = "ferry"

    def __init__(self, ctx, size_bytes, journal_bytes):
        self.node = FerryNode(ctx.ferry, os.path.join(ctx.workdir, "ferry"), "bench", size_bytes, journal_bytes,
                              device=os.path.join(ctx.workdir, "ferry.img"))
        self.uri = self.node.uri
        self.size_bytes = size_bytes

    def nodes(self):
        return [self.node]

    @property
    def pids(self):
        return [self.node.pid]

    def start(self):
        self.node.start()

    def quiesce(self):
        wait_applied(self.node, self.name)

    def stop(self):
        self.node.stop()


class MetroPair(Server):
    """Two Ferry nodes, a (primary) and b (secondary), one metro-replicated volume, the peer
    reached directly over loopback (rtt_ms None) or through a relay adding rtt_ms."""

    kind = "metro"

    def __init__(self, ctx, name, size_bytes, journal_bytes, rtt_ms, b_dir=None):
        self.ctx = ctx
        self.name = name
        self.rtt_ms = rtt_ms
        self.dir = os.path.join(ctx.workdir, name)
        self.ports = {"a": free_port(socket.SOCK_DGRAM), "b": free_port(socket.SOCK_DGRAM)}
        self.relay = None
        self.relay_nice = 0
        self.relay_cpus = None
        self.a = FerryNode(ctx.ferry, os.path.join(self.dir, "a"), "a", size_bytes, journal_bytes,
                           listen_port=self.ports["a"], certs=ctx.certs, peer="b",
                           peer_address=f"127.0.0.1:{self.ports['b']}", role="primary")
        # b_dir: where node b's files live, when not beside a's (another disk or tmpfs).
        self.b = FerryNode(ctx.ferry, os.path.join(b_dir or self.dir, "b"), "b", size_bytes, journal_bytes,
                           listen_port=self.ports["b"], certs=ctx.certs, peer="a",
                           peer_address=f"127.0.0.1:{self.ports['a']}", role="secondary")
        self.uri = self.a.uri
        self.size_bytes = size_bytes

    def nodes(self):
        return [self.a, self.b]

    @property
    def pids(self):
        return [node.pid for node in (self.a, self.b) if node.running()]

    def start_relay(self, rtt_ms, rate_mbit=None, loss=0.0):
        """Routes the pair through a relay adding rtt_ms (0 allowed), capped at rate_mbit and
        losing `loss` of the datagrams if given; rewrites both configs, so call it before the
        nodes start."""
        self.relay = Relay(self.ctx.relay, f"127.0.0.1:{self.ports['a']}", f"127.0.0.1:{self.ports['b']}",
                           rtt_ms * 500, os.path.join(self.dir, "relay.log"), rate_mbit, loss, self.relay_nice,
                           self.relay_cpus)
        self.a.write_config(self.relay.addr_for_a)
        self.b.write_config(self.relay.addr_for_b)

    def start(self, sync_timeout_s=None):
        if self.rtt_ms is not None and self.relay is None:
            self.start_relay(self.rtt_ms)
        self.b.start()
        self.a.start()
        self.wait_in_sync(sync_timeout_s or (60 + self.size_bytes / (20 * MIB)), "initial sync")

    def state(self):
        replica = self.a.replica()
        return replica["state"] if replica else None

    def wait_in_sync(self, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        replica = None
        while time.monotonic() < deadline:
            for node in (self.a, self.b):
                if not node.running():
                    raise RuntimeError(f"{self.name}: node {node.node} exited with {node.proc.returncode}")
            replica = self.a.replica()
            if replica and replica["state"] == "in-sync":
                return replica
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: replica not in-sync {timeout_s:.0f}s after {what}; last primary "
                           f"replica status: {json.dumps(replica)}; secondary: {json.dumps(self.b.replica())}")

    def quiesce(self):
        """Waits (bounded) until both journals are applied and the peer has every write."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            volume_a, volume_b = self.a.volume(), self.b.volume()
            if volume_a is None or volume_b is None:
                raise RuntimeError(f"{self.name}: a node does not answer status")
            replica = volume_a["replicas"][0]
            last = (volume_a["journal"]["unapplied_bytes"], volume_b["journal"]["unapplied_bytes"],
                    replica["lag_bytes"], replica["state"])
            if last[:3] == (0, 0, 0):
                return
            time.sleep(0.1)
        log(f"{self.name}: not quiet after {QUIESCE_TIMEOUT_S}s (unapplied a, unapplied b, lag, state) = {last}; continuing")

    def drops(self):
        """Datagram drop counters now: the kernel's, on both nodes' QUIC sockets and the
        relay's sockets, and the relay's own (queue bound, send errors)."""
        result = {"ferry_sockets_kernel": udp_drops(self.ports.values())}
        if self.relay:
            stats = self.relay.stats()
            result["relay_sockets_kernel"] = stats["kernel_receive_drops"]
            result["relay_queue_or_send"] = sum(stats[d]["dropped_queue_datagrams"] + stats[d]["dropped_send_error_datagrams"]
                                                for d in ("a_to_b", "b_to_a"))
            result["relay_forwarded"] = sum(stats[d]["forwarded_datagrams"] for d in ("a_to_b", "b_to_a"))
        return result

    def stop(self):
        # The primary first, so it drains while its peer is there.
        for node in (self.a, self.b):
            try:
                node.stop()
            except Exception as error:  # keep stopping the rest
                log(f"stopping {self.name}/{node.node}: {error}")
        if self.relay:
            self.relay.stop()
            self.relay = None


class QemuNbd(Server):
    name = "qemu-nbd"

    def __init__(self, ctx, size_bytes):
        workdir = ctx.workdir
        self.image = os.path.join(workdir, "qemu.img")
        self.sock = os.path.join(workdir, "qemu-nbd.sock")
        self.pid_file = os.path.join(workdir, "qemu-nbd.pid")
        with open(self.image, "wb") as f:
            f.truncate(size_bytes)
        self.uri = f"nbd+unix:///vol0?socket={self.sock}"
        self.size_bytes = size_bytes
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
    def pids(self):
        return [self._pid]

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


# ---------------------------------------------------------------------------------------------
# Measurements.


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.runtime = args.runtime

    def fio(self, server, name, options, size_bytes):
        out = os.path.join(self.workdir, f"fio-{server.name}-{name}.json")
        command = [
            "fio", f"--name={name}", "--ioengine=nbd", f"--uri={server.uri}",
            f"--size={size_bytes}", "--percentile_list=50:99:99.9",
            "--output-format=json", f"--output={out}",
        ] + options
        result = subprocess.run(command, capture_output=True, text=True, timeout=self.runtime * 4 + 900)
        if result.returncode != 0:
            raise RuntimeError(f"fio {name} on {server.name} failed: {result.stdout}\n{result.stderr}")
        return read_fio_job(out, f"fio {name} on {server.name}")

    def timed(self, extra):
        return ["--time_based", f"--runtime={self.runtime}", "--ramp_time=1"] + extra

    def prefill(self, server):
        started = time.monotonic()
        self.fio(server, "prefill", ["--rw=write", "--bs=1m", "--iodepth=8"], server.size_bytes)
        log(f"prefilled {server.name} in {time.monotonic() - started:.1f}s")

    def randwrite_qd1(self, server):
        job = self.fio(server, "randwrite-qd1", self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
                       server.size_bytes)
        return {"p50_us": pct(job["write"], "50"), "p99_us": pct(job["write"], "99"), "iops": job["write"]["iops"]}

    def write_flush_qd1(self, server):
        job = self.fio(server, "write-flush-qd1",
                       self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]), server.size_bytes)
        result = {"write_p50_us": pct(job["write"], "50"), "iops": job["write"]["iops"]}
        sync = job.get("sync", {})
        lat = sync.get("lat_ns", {}).get("percentile", {})
        result["flush_p50_us"] = lat.get("50.000000", 0) / 1000 if lat else None
        if result["flush_p50_us"] is not None:
            result["cycle_p50_us"] = result["write_p50_us"] + result["flush_p50_us"]
        return result

    def qd32(self, server, jobs):
        depth = 32 // jobs
        pids = server.pids
        for pid in pids:
            reset_peak_rss(pid)
        job = self.fio(
            server,
            f"randwrite-qd32-{jobs}conn",
            self.timed(["--rw=randwrite", "--bs=4k", f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting"]),
            server.size_bytes,
        )
        return {"iops": job["write"]["iops"], "vmhwm_kib": [proc_status_kib(pid, "VmHWM") for pid in pids]}

    def seqwrite(self, server):
        job = self.fio(server, "seqwrite-1m", self.timed(["--rw=write", "--bs=1m", "--iodepth=8"]), server.size_bytes)
        return {"mb_s": job["write"]["bw_bytes"] / 1e6}

    def randread_qd1(self, server):
        job = self.fio(server, "randread-qd1", self.timed(["--rw=randread", "--bs=4k", "--iodepth=1"]),
                       server.size_bytes)
        return {"p50_us": pct(job["read"], "50"), "p99_us": pct(job["read"], "99"), "iops": job["read"]["iops"]}

    def fua_after_burst(self, server):
        """FUA QD1 right after a sequential burst (1 MiB writes, QD8, min(runtime, 5) s), with
        no warm-up: the journal's applier is still busy with the burst, as when a user tries
        FUA writes after copying a file in."""
        self.fio(server, "burst", ["--rw=write", "--bs=1m", "--iodepth=8", "--time_based",
                                   f"--runtime={max(1, min(self.runtime, 5))}"], server.size_bytes)
        return self.fua_qd1(server, warmup=False)

    def fua_qd1(self, server, warmup=True):
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
            end = time.monotonic() + (1 if warmup else 0)
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
            "p50_us": percentile(latencies_ns, 0.50) / 1000,
            "p99_us": percentile(latencies_ns, 0.99) / 1000,
            "iops": count / self.runtime,
            "count": count,
        }

    def durable_write(self, mode, seconds):
        """Local durable 4 KiB write latency on a preallocated file in the work directory (the
        volumes' and journals' file system), written sequentially like a journal ring.
        mode "fdatasync": buffered pwrite + fdatasync; "o_dsync": pwrite on O_DIRECT|O_DSYNC."""
        path = os.path.join(self.workdir, f"durable-{mode}.dat")
        file_bytes = 64 * MIB
        chunk = os.urandom(MIB)
        with open(path, "wb") as f:
            for _ in range(file_bytes // MIB):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        buffer.write(os.urandom(4096))
        flags = os.O_WRONLY | (os.O_DIRECT | os.O_DSYNC if mode == "o_dsync" else 0)
        fd = os.open(path, flags)
        latencies_ns = []
        try:
            offset = 0
            warmup_end = time.monotonic() + 0.5
            end = warmup_end + seconds
            while True:
                now = time.monotonic()
                if now >= end or len(latencies_ns) >= 1_000_000:
                    break
                started = time.perf_counter_ns()
                os.pwrite(fd, buffer, offset)
                if mode == "fdatasync":
                    os.fdatasync(fd)
                elapsed = time.perf_counter_ns() - started
                if now >= warmup_end:
                    latencies_ns.append(elapsed)
                offset = (offset + 4096) % file_bytes
        finally:
            os.close(fd)
            buffer.close()
            os.unlink(path)
        latencies_ns.sort()
        return {"p50_us": percentile(latencies_ns, 0.50) / 1000, "p99_us": percentile(latencies_ns, 0.99) / 1000,
                "count": len(latencies_ns)}


def read_fio_job(path, what):
    with open(path) as f:
        text = f.read()
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
    if job.get("error", 0) != 0:
        raise RuntimeError(f"{what}: error {job['error']}")
    return job


def pct(direction, which):
    percentiles = direction["clat_ns"]["percentile"]
    return percentiles[f"{which}.000000"] / 1000


# (key, label, function name, function args, value key, better, target ratio vs qemu-nbd, scope)
# better: "lower" (latency) or "higher" (throughput); target: ratio bound or None.
# scope "all": every configuration; "base": qemu-nbd and Ferry standalone only.
METRICS = [
    ("seq", "1 MiB seq write QD8 (MB/s)", "seqwrite", (), "mb_s", "higher", 0.9, "all"),
    ("rw_p50", "4k randwrite QD1 p50 (us)", "randwrite_qd1", (), "p50_us", "lower", None, "all"),
    ("rw_p99", "4k randwrite QD1 p99 (us)", None, "rw_p50", "p99_us", "lower", None, "all"),
    ("fua_p50", "4k FUA write QD1 p50 (us)", "fua_qd1", (), "p50_us", "lower", 1.0, "all"),
    ("fua_p99", "4k FUA write QD1 p99 (us)", None, "fua_p50", "p99_us", "lower", None, "all"),
    ("wf_iops", "write+flush QD1 (IOPS)", "write_flush_qd1", (), "iops", "higher", None, "base"),
    ("wf_p50", "write+flush QD1 write p50 (us)", None, "wf_iops", "write_p50_us", "lower", None, "base"),
    ("wf_flush_p50", "write+flush QD1 flush p50 (us)", None, "wf_iops", "flush_p50_us", "lower", None, "base"),
    ("qd32_1", "4k randwrite QD32 1 conn (IOPS)", "qd32", (1,), "iops", "higher", 1.5, "all"),
    ("qd32_4", "4k randwrite QD32 4 conn x QD8 (IOPS)", "qd32", (4,), "iops", "higher", 1.5, "base"),
    ("rr_p50", "4k randread QD1 p50 (us)", "randread_qd1", (), "p50_us", "lower", 1.1, "base"),
    ("fua_burst_p50", "4k FUA QD1 after a seq burst p50 (us)", "fua_after_burst", (), "p50_us", "lower", 0.9, "base"),
    ("fua_burst_p99", "4k FUA QD1 after a seq burst p99 (us)", None, "fua_burst_p50", "p99_us", "lower", 1.2, "base"),
]

# The goals of the hot-path work, printed with PASS/MISS at the end of the report.
# (label, kind, target, better): kind picks how the ratio is computed in `goal_rows`.
GOALS = [
    ("standalone FUA QD1 p50 vs qemu-nbd", "base:fua_p50", 0.9, "lower"),
    ("standalone FUA QD1 p99 vs qemu-nbd", "base:fua_p99", 1.2, "lower"),
    ("standalone FUA QD1 p50 vs qemu-nbd, right after a burst", "base:fua_burst_p50", 0.9, "lower"),
    ("standalone FUA QD1 p99 vs qemu-nbd, right after a burst", "base:fua_burst_p99", 1.2, "lower"),
    ("standalone 4k write QD1 p50 vs qemu-nbd", "base:rw_p50", 1.0, "lower"),
    ("standalone 4k randwrite QD32 1 conn vs qemu-nbd", "base:qd32_1", 1.5, "higher"),
    ("standalone 4k randwrite 4 x QD8 vs qemu-nbd", "base:qd32_4", 1.5, "higher"),
    ("standalone 1 MiB seq QD8 vs qemu-nbd", "base:seq", 1.0, "higher"),
    ("metro-lo FUA p50 vs (standalone FUA p50 + UDP RTT p50)", "fua_floor:metro-lo", 1.2, "lower"),
    ("metro-1ms FUA p50 vs (standalone FUA p50 + UDP RTT p50)", "fua_floor:metro-1ms", 1.1, "lower"),
    ("metro-lo QD32 IOPS vs standalone", "metro:metro-lo:qd32_1", 0.8, "higher"),
    ("metro-lo 1 MiB seq MB/s vs standalone", "metro:metro-lo:seq", 0.8, "higher"),
    ("degraded write QD1 p50 vs standalone, worst window after the loss", "degraded:write", 1.1, "lower"),
    ("degraded FUA QD1 p50 vs standalone, worst window after the loss", "degraded:fua", 1.1, "lower"),
]
# Peak RSS bound under QD32: the unapplied-record cap of one volume, the NBD payload cap of the
# connections (128 MiB each), plus 32 MiB.
RSS_UNAPPLIED_CAP_MIB = 64
RSS_NBD_CONNECTION_CAP_MIB = 128
RSS_SLACK_MIB = 32


def verdict(ratio, better, target):
    if target is None or ratio is None:
        return "-"
    ok = ratio <= target if better == "lower" else ratio >= target
    sign = "<=" if better == "lower" else ">="
    return f"{sign} {target:.1f}x {'PASS' if ok else 'MISS'}"


class Context:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.ferry = args.ferry
        self.relay = args.relay
        self.certs = os.path.join(workdir, "certs")
        self.problems = []  # (configuration, what happened, log excerpt)
        self.extra_servers = []  # not in the metric rounds (the resync pair), for the log scan

    def problem(self, where, what, excerpt=""):
        log(f"PROBLEM {where}: {what}")
        self.problems.append({"where": where, "what": what, "log": excerpt})


def rtt_label(rtt_ms):
    return f"metro-{rtt_ms:g}ms"


REPLICA_EVENTS = re.compile(r"replica state|resync started|resync complete|peer disconnected|refused|split|ERROR")


def replica_events(node, offset):
    """Log lines since `offset` that say something happened to replication (other WARN lines,
    e.g. journal backpressure, are listed in the report's grouped WARN/ERROR section)."""
    return [line for line in node.log_since(offset).splitlines() if REPLICA_EVENTS.search(line)]


def fail_server(ctx, server, what):
    excerpt = ""
    for node in server.nodes():
        excerpt += f"--- {server.name}/{node.node} log (tail) ---\n{node.log_tail(30)}"
    ctx.problem(server.name, what, excerpt)
    server.failed = what
    try:
        server.stop()
    except Exception as error:
        log(f"stopping {server.name}: {error}")


def run_metrics(ctx, servers, raw, floors):
    bench = Bench(ctx.args, ctx.workdir)
    for key, label, function, fargs, value_key, better, target, scope in METRICS:
        if function is None or (ctx.args.metrics and key not in ctx.args.metrics.split(",")):
            continue
        metro_round = key == "fua_p50" and any(s.kind == "metro" and not s.failed for s in servers)
        if metro_round:
            measure_floors(ctx, bench, servers, floors)
        for server in servers:
            if server.failed or (scope == "base" and server.kind != "base"):
                continue
            log(f"{label}: {server.name} ...")
            offsets = [node.log_offset() for node in server.nodes()]
            before = server.a.metrics() if server.kind == "metro" else None
            drops_before = server.drops() if server.kind == "metro" else None
            pids = server.pids
            cpu_before = [cpu_seconds(pid) for pid in pids]
            wall_before = time.monotonic()
            try:
                raw[server.name][key] = getattr(bench, function)(server, *fargs)
                # Cores used by the server processes over the run (ramp and client start included).
                wall = time.monotonic() - wall_before
                raw[server.name][key]["cores"] = [
                    (after - before) / wall if after is not None and before is not None else None
                    for before, after in zip(cpu_before, (cpu_seconds(pid) for pid in pids))]
                if server.kind == "metro":
                    after = server.a.metrics()
                    raw[server.name][key]["ferry"] = ferry_breakdown(before, after)
                    drops_after = server.drops()
                    raw[server.name][key]["drops"] = {k: (v - drops_before[k] if v is not None and drops_before.get(k)
                                                          is not None else None) for k, v in drops_after.items()}
                    raw[server.name][key]["state_after"] = server.state()
                    events = [f"{node.node}: {line}" for node, offset in zip(server.nodes(), offsets)
                              for line in replica_events(node, offset)]
                    if events or raw[server.name][key]["state_after"] != "in-sync":
                        raw[server.name][key]["replica_events"] = events
                        ctx.problem(server.name, f"during {label}: replica state after the run "
                                    f"{raw[server.name][key]['state_after']!r}; replication events in the logs",
                                    "\n".join(events[-20:]))
                server.quiesce()
            except Exception as error:
                fail_server(ctx, server, f"{label}: {error}")
        if metro_round:
            measure_durable(ctx, bench, floors, "after")


def ferry_breakdown(before, after):
    """Mean latencies (us) between two /metrics snapshots of a primary: write total / journal /
    replica stage and the replica RTT histogram."""
    result = {}
    for label, name, labels in (
        ("write_total_mean_us", "ferry_write_latency_seconds", {"stage": "total"}),
        ("write_journal_mean_us", "ferry_write_latency_seconds", {"stage": "journal"}),
        ("write_replica_mean_us", "ferry_write_latency_seconds", {"stage": "replica"}),
        ("replica_rtt_mean_us", "ferry_replica_rtt_seconds", {}),
    ):
        count = metric_sum(after, name + "_count", **labels) - metric_sum(before, name + "_count", **labels)
        total = metric_sum(after, name + "_sum", **labels) - metric_sum(before, name + "_sum", **labels)
        result[label] = total / count * 1e6 if count > 0 else None
        result[label.replace("_mean_us", "_count")] = count
    return result


def measure_durable(ctx, bench, floors, when):
    """Local durable 4 KiB write, both ways (see Bench.durable_write). Measured before and
    after the FUA round; L is the lowest p50 of the four (a floor is a lower bound, and this
    disk is noisy)."""
    seconds = max(1, min(ctx.args.runtime, 5))
    for mode in ("fdatasync", "o_dsync"):
        log(f"local durable 4k write ({mode}, {when} the FUA round) ...")
        floors[f"durable_{mode}_{when}"] = bench.durable_write(mode, seconds)
    samples = [v for k, v in floors.items() if k.startswith("durable_") and isinstance(v, dict)]
    floors["durable_p50_us"] = min(v["p50_us"] for v in samples)
    floors["durable_p99_us"] = min(v["p99_us"] for v in samples)
    durable, durable_p99 = floors["durable_p50_us"], floors["durable_p99_us"]
    for name, entry in floors.items():
        if isinstance(entry, dict) and "rtt" in entry:
            entry["floor_p50_us"] = max(durable, entry["rtt"]["p50_us"] + durable)
            entry["floor_p99_us"] = max(durable_p99, entry["rtt"]["p99_us"] + durable_p99)


def measure_floors(ctx, bench, servers, floors):
    """Per metro configuration the network RTT (UDP ping, see ping_rtt) and the local durable
    write L, right before the FUA round; floor = max(L, RTT + L) (the secondary's disk is this
    same disk, so its durable write costs L too; with --remote-dir it is elsewhere and this floor
    is too high)."""
    for server in servers:
        if server.kind != "metro" or server.failed:
            continue
        log(f"UDP RTT for {server.name} ...")
        floors[server.name] = {"rtt": ping_rtt(ctx.relay, server.rtt_ms)}
    measure_durable(ctx, bench, floors, "before")


# ---------------------------------------------------------------------------------------------
# Degraded: write latency second by second after the metro peer is killed (degraded_bench.py).


def degraded_round(ctx, results, size_bytes):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import degraded_bench

    window = max(1.0, min(ctx.args.runtime, 2))
    try:
        results["degraded"] = degraded_bench.measure(ctx, ctx.ferry, min(size_bytes, 256 * MIB), window,
                                                     4 if ctx.args.quick else 6, log_prefix="degraded: ")
        for problem in results["degraded"]["problems"]:
            ctx.problem("degraded", problem)
    except Exception as error:
        results["degraded"] = {"error": str(error)}
        ctx.problem("degraded", str(error))


# ---------------------------------------------------------------------------------------------
# Resync: initial full sync and delta resync after an outage.

RESYNC_LOG = re.compile(r"^(\S+Z)\s+\w+\s+ferry::[\w:]+: resync (started|complete) .*kind=(\w+) bytes=(\d+)")


def log_time(stamp):
    """Seconds (float) of a tracing timestamp like 2026-11-26T12:24:31.935685Z."""
    day, clock = stamp.rstrip("Z").split("T")
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def resync_log_spans(node, offset, kind, wait_s=2.0):
    """[(seconds, bytes at start)] of the resyncs of `kind` the node's log shows since offset.
    The daemon logs at most every 100 ms, so the status can say in-sync before the log says
    complete: waits up to wait_s for a span."""
    deadline = time.monotonic() + wait_s
    while True:
        spans = resync_log_spans_now(node, offset, kind)
        if spans or time.monotonic() >= deadline:
            return spans
        time.sleep(0.05)


def resync_log_spans_now(node, offset, kind):
    spans, started = [], None
    for line in node.log_since(offset).splitlines():
        match = RESYNC_LOG.match(line)
        if not match or match.group(3) != kind:
            continue
        if match.group(2) == "started":
            started = (log_time(match.group(1)), int(match.group(4)))
        elif started:
            spans.append((log_time(match.group(1)) - started[0], started[1]))
            started = None
    return spans


def poll_states(node, until, timeout_s, interval=0.025):
    """Polls the primary's replica until `until(replica)`; returns (seconds, states seen in
    order, last replica) or raises on timeout."""
    started = time.monotonic()
    seen, replica = [], None
    while time.monotonic() - started < timeout_s:
        replica = node.replica()
        if replica:
            if not seen or seen[-1] != replica["state"]:
                seen.append(replica["state"])
            if until(replica):
                return time.monotonic() - started, seen, replica
        if not node.running():
            raise RuntimeError(f"node {node.node} exited with {node.proc.returncode}")
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s; states seen {seen}; last replica status {json.dumps(replica)}")


def resync_bench(ctx, results):
    args = ctx.args
    size = max(64 * MIB, int(args.resync_gib * GIB) // MIB * MIB)
    journal = min(size, GIB)
    pair = MetroPair(ctx, "resync", size, journal, rtt_ms=None)
    ctx.extra_servers.append(pair)
    out = results["resync"] = {"size_bytes": size, "outage_s": args.outage_seconds,
                               "load_iops": args.outage_load_iops, "peer_timeout": PEER_TIMEOUT}
    bench = Bench(args, ctx.workdir)
    load = None
    try:
        # 1. Initial full sync over loopback: fill the primary while the secondary is down.
        pair.a.start()
        log(f"resync: filling the primary's {size / GIB:.2f} GiB volume (secondary stopped) ...")
        started = time.monotonic()
        bench.fio(pair, "resync-fill", ["--rw=write", "--bs=1m", "--iodepth=8"], size)
        out["fill_s"] = time.monotonic() - started
        wait_applied(pair.a, "resync/a")
        offset = pair.a.log_offset()
        log("resync: starting the secondary; timing the initial full sync ...")
        pair.b.start()
        timeout = 120 + size / (10 * MIB)
        seconds, seen, replica = poll_states(pair.a, lambda r: r["state"] == "in-sync", timeout)
        out["full"] = {"seconds_from_start": seconds, "states": seen, "resynced_bytes": replica["resynced_bytes"]}
        spans = resync_log_spans(pair.a, offset, "full")
        if spans:
            out["full"]["log_seconds"], out["full"]["log_bytes"] = spans[-1]
        else:
            ctx.problem("resync", "no 'resync started/complete kind=full' pair in the primary's log",
                        "\n".join(replica_events(pair.a, offset)))
        span = out["full"].get("log_seconds") or seconds
        out["full"]["mb_s"] = replica["resynced_bytes"] / span / 1e6 if span else None
        log(f"resync: full sync {replica['resynced_bytes'] / GIB:.2f} GiB in {span:.2f}s (states {seen})")

        # 2. Delta resync after an outage under a write load, the link cut in the relay.
        pair.stop()
        pair.start_relay(args.resync_rtt_ms)
        offset_a = pair.a.log_offset()
        pair.b.start()
        pair.a.start()
        pair.wait_in_sync(120 + size / (20 * MIB), "restart through the relay")
        out["restart_events"] = replica_events(pair.a, offset_a)
        load_out = os.path.join(ctx.workdir, "fio-resync-load.json")
        load = spawn(
            ["fio", "--name=outage-load", "--ioengine=nbd", f"--uri={pair.uri}", f"--size={size}",
             "--rw=randwrite", "--bs=4k", "--iodepth=4", f"--rate_iops={args.outage_load_iops}",
             "--time_based", "--runtime=100000", "--percentile_list=50:99:99.9:100",
             "--output-format=json", f"--output={load_out}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(2)
        if load.poll() is not None:
            raise RuntimeError(f"the write load exited early: {load.stderr.read()}")
        if pair.state() != "in-sync":
            raise RuntimeError(f"replica not in-sync under the load before the cut: {pair.state()}")
        offset_a = pair.a.log_offset()
        log(f"resync: cutting the link for {args.outage_seconds}s under a {args.outage_load_iops} IOPS write load ...")
        cut_at = time.monotonic()
        pair.relay.command("cut")
        detect_s, seen_cut, _ = poll_states(pair.a, lambda r: r["state"] != "in-sync",
                                            max(30, args.outage_seconds + 10))
        out["cut_detect_s"] = detect_s
        remaining = cut_at + args.outage_seconds - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        out["state_before_restore"] = pair.state()
        out["dirty_before_restore"] = pair.a.replica()
        pair.relay.command("restore")
        log("resync: link restored; timing the delta resync ...")
        seconds, seen, replica = poll_states(pair.a, lambda r: r["state"] == "in-sync", 600)
        states = seen_cut + [state for i, state in enumerate(seen) if i > 0 or not seen_cut or state != seen_cut[-1]]
        out["delta"] = {"seconds_from_restore": seconds, "states": states,
                        "resynced_bytes": replica["resynced_bytes"]}
        spans = resync_log_spans(pair.a, offset_a, "delta")
        if spans:
            out["delta"]["log_seconds"], out["delta"]["log_bytes"] = spans[-1]
            out["delta"]["log_resyncs"] = len(spans)
        out["delta"]["events"] = replica_events(pair.a, offset_a)
        log(f"resync: in-sync {seconds:.2f}s after the restore; resynced {replica['resynced_bytes'] / MIB:.1f} MiB")
        time.sleep(1)
        # fio writes its JSON report when SIGINT stops it (its exit status is then nonzero).
        code = stop_process(load, sig=signal.SIGINT, timeout=30, what="fio load")
        try:
            job = read_fio_job(load_out, "outage load")
            write = job["write"]
            out["load"] = {"iops": write["iops"], "clat_p50_us": pct(write, "50"), "clat_p99_us": pct(write, "99"),
                           "clat_max_us": write["clat_ns"]["max"] / 1000}
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            ctx.problem("resync", f"the write load (fio) exited with {code} and no usable report ({error}): "
                        f"{load.stderr.read()[-2000:]}")
        # 3. The two copies must be byte-identical once both have applied and stopped.
        pair.quiesce()
        pair.stop()
        same = subprocess.run(["cmp", "-s", pair.a.image, pair.b.image]).returncode == 0
        out["copies_identical"] = same
        if not same:
            ctx.problem("resync", "the primary's and the secondary's volume files differ after the run")
    except Exception as error:
        out["error"] = str(error)
        excerpt = "".join(f"--- resync/{node.node} log (tail) ---\n{node.log_tail(30)}" for node in pair.nodes())
        ctx.problem("resync", str(error), excerpt)
    finally:
        if load is not None and load.poll() is None:
            stop_process(load, sig=signal.SIGINT, timeout=10, what="fio load")
        pair.stop()


# ---------------------------------------------------------------------------------------------


def build_relay(args):
    if args.relay:
        return args.relay
    if shutil.which("cargo") is None:
        if os.access(RELAY, os.X_OK):
            log("cargo not found; using the existing relay binary")
            return RELAY
        sys.exit("cargo not found and the relay is not built: cargo build --release --manifest-path benches/relay/Cargo.toml")
    log("building the relay: cargo build --release --manifest-path benches/relay/Cargo.toml")
    result = subprocess.run(["cargo", "build", "--release", "--manifest-path", RELAY_MANIFEST],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        sys.exit(f"building the relay failed:\n{result.stderr}")
    return RELAY


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="2 s per measurement, 128 MiB volumes, 0.5 GiB resync, 5 s outage (a ~2-3 min smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument("--size", default=None, help="volume size in MiB (default 1024, --quick 128)")
    parser.add_argument("--only", default="all",
                        help="comma-separated configurations: qemu-nbd, ferry, metro-lo, metro-<R>ms, metro "
                             "(all metro), resync; 'both' = qemu-nbd,ferry; default all")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated measurement keys to run (default all): "
                             + ", ".join(key for key, _, function, *_ in METRICS if function is not None))
    parser.add_argument("--rtts", default="1,4", help="relay RTTs in ms for the metro-<R>ms configurations (default 1,4)")
    parser.add_argument("--resync-gib", type=float, default=None,
                        help="volume size of the resync test in GiB (default 4, --quick 0.5)")
    parser.add_argument("--outage-seconds", type=float, default=None,
                        help="link outage of the delta-resync test (default 30, --quick 5)")
    parser.add_argument("--outage-load-iops", type=int, default=1000,
                        help="4k random write rate on the primary during the outage test (default 1000)")
    parser.add_argument("--resync-rtt-ms", type=float, default=0.0,
                        help="RTT of the relay the outage test cuts (default 0: loopback through the relay)")
    parser.add_argument("--remote-dir", default=None,
                        help="put the metro secondaries' files in a directory under DIR (another disk, or /dev/shm) "
                             "instead of beside the primary's, so that the two nodes do not share one disk")
    parser.add_argument("--ferry", default=FERRY, help=f"the ferry binary (default {FERRY})")
    parser.add_argument("--relay", default=None, help="a built ferry-relay binary (default: build benches/relay)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.runtime = min(args.runtime, 2)
    size_mib = int(args.size) if args.size else (128 if args.quick else 1024)
    size_bytes = size_mib * MIB
    known_metrics = [key for key, _, function, *_ in METRICS if function is not None]
    for key in (args.metrics or "").split(","):
        if key and key not in known_metrics:
            sys.exit(f"--metrics: unknown measurement {key!r} (known: {', '.join(known_metrics)})")
    if args.resync_gib is None:
        args.resync_gib = 0.5 if args.quick else 4.0
    if args.outage_seconds is None:
        args.outage_seconds = 5.0 if args.quick else 30.0
    rtts = [float(r) for r in args.rtts.split(",") if r.strip()]
    all_names = ["ferry", "qemu-nbd", "metro-lo"] + [rtt_label(r) for r in rtts] + ["degraded", "resync"]
    wanted = set()
    for item in args.only.split(","):
        item = item.strip()
        if item == "all":
            wanted.update(all_names)
        elif item == "both":
            wanted.update(["qemu-nbd", "ferry"])
        elif item == "metro":
            wanted.update(n for n in all_names if n.startswith("metro"))
        elif item in all_names:
            wanted.add(item)
        else:
            sys.exit(f"--only: unknown configuration {item!r} (known: {', '.join(all_names)}, metro, both, all)")

    missing = [f"{tool} (apt-get install {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        sys.exit("missing tools: " + ", ".join(missing))
    try:
        import nbd  # noqa: F401
    except ImportError:
        sys.exit("cannot import nbd: run with /usr/bin/python3 (apt-get install python3-libnbd)")
    if wanted - {"qemu-nbd"} and not os.access(args.ferry, os.X_OK):
        sys.exit(f"{args.ferry} not found: build it first with `cargo build --release -p ferry` in {ROOT}")
    need_relay = any(n.startswith("metro") or n in ("resync", "degraded") for n in wanted)
    if need_relay:
        args.relay = build_relay(args)

    # On the real disk (the target dir), not tmpfs: O_DIRECT and fdatasync must mean something.
    base = os.path.join(ROOT, "target")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench-", dir=base)
    remote_dir = tempfile.mkdtemp(prefix="bench-remote-", dir=args.remote_dir) if args.remote_dir else None

    def remote_of(name):
        """Where a metro pair's secondary lives with --remote-dir: a directory of its own."""
        if remote_dir is None:
            return None
        path = os.path.join(remote_dir, name)
        os.makedirs(path, exist_ok=True)
        return path
    ctx = Context(args, workdir)
    servers = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    results = {"runtime_s": args.runtime, "size_bytes": size_bytes, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    floors = {}
    raw = {}
    try:
        if need_relay:
            subprocess.run([args.ferry, "cert", "init", "--dir", ctx.certs, "--node", "a", "--node", "b"],
                           check=True, capture_output=True, timeout=60)
        if "ferry" in wanted:
            servers.append(Ferry(ctx, size_bytes, size_bytes))
        if "qemu-nbd" in wanted:
            servers.append(QemuNbd(ctx, size_bytes))
        if "metro-lo" in wanted:
            servers.append(MetroPair(ctx, "metro-lo", size_bytes, size_bytes, None, b_dir=remote_of("metro-lo")))
        for rtt in rtts:
            if rtt_label(rtt) in wanted:
                servers.append(MetroPair(ctx, rtt_label(rtt), size_bytes, size_bytes, rtt,
                                         b_dir=remote_of(rtt_label(rtt))))
        raw = {server.name: {} for server in servers}
        for server in servers:
            try:
                server.start()
                log(f"started {server.name} (pids {server.pids}) at {server.uri}")
            except Exception as error:
                fail_server(ctx, server, f"start: {error}")
        bench = Bench(args, workdir)
        for server in servers:
            if server.failed:
                continue
            try:
                bench.prefill(server)
                server.quiesce()
            except Exception as error:
                fail_server(ctx, server, f"prefill: {error}")
        run_metrics(ctx, servers, raw, floors)
        for server in servers:
            server.stop()
        results["raw"] = raw
        results["floors"] = floors
        results["log_warnings"] = collect_log_warnings(servers)
        if not args.keep:
            remove_volume_files(workdir)  # the resync test needs the space more than they do
        if "degraded" in wanted:
            degraded_round(ctx, results, size_bytes)
        if "resync" in wanted:
            resync_bench(ctx, results)
            results["log_warnings"] += collect_log_warnings(ctx.extra_servers)
        results["problems"] = ctx.problems
        report(ctx, servers, raw, floors, results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
            log(f"wrote {args.json}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        raise
    except Exception:
        for server in servers:
            for node in server.nodes():
                if os.path.exists(node.log_path):
                    log(f"--- {server.name}/{node.node} stderr (tail) ---\n{node.log_tail(40)}")
        raise
    finally:
        stop_all(servers)
        if args.keep:
            log(f"kept {workdir}" + (f" and {remote_dir}" if remote_dir else ""))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if remote_dir:
                shutil.rmtree(remote_dir, ignore_errors=True)
    if ctx.problems:
        sys.exit(1)


def remove_volume_files(workdir):
    for directory, _, files in os.walk(workdir):
        for name in files:
            if name.endswith((".img", ".journal")):
                os.unlink(os.path.join(directory, name))


def collect_log_warnings(servers):
    """WARN/ERROR lines of every Ferry log, grouped by message (fields after the message
    dropped), with a count and the first example."""
    groups = {}
    for server in servers:
        for node in server.nodes():
            for line in node.log_since(0).splitlines():
                match = re.match(r"^\S+\s+(WARN|ERROR)\s+(\S+)\s+(.*)$", line)
                if not match:
                    continue
                message = re.sub(r"\s+\w+=.*$", "", match.group(3))
                key = (f"{server.name}/{node.node}", match.group(1), match.group(2), message)
                entry = groups.setdefault(key, {"count": 0, "example": line})
                entry["count"] += 1
    return [{"where": k[0], "level": k[1], "target": k[2], "message": k[3], **v} for k, v in groups.items()]


# ---------------------------------------------------------------------------------------------
# Report.


def fmt(value, unit="", digits=1):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def ratio_of(a, b):
    return a / b if a is not None and b else None


def print_table(lines):
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))
    print()


def value_of(raw, name, key, fargs, function, value_key):
    source_key = key if function is not None else fargs
    return raw.get(name, {}).get(source_key, {}).get(value_key)


def report(ctx, servers, raw, floors, results):
    names = [server.name for server in servers]
    metro = [server for server in servers if server.kind == "metro"]
    base_pair = "ferry" in names and "qemu-nbd" in names
    ordered = [n for n in ("qemu-nbd", "ferry") if n in names] + [s.name for s in metro]
    header = ["metric"] + ordered
    if base_pair:
        header[3:3] = ["ferry/qemu", "target"]
    lines = [header]
    results["table"] = []
    for key, label, function, fargs, value_key, better, target, scope in METRICS:
        values = {n: value_of(raw, n, key, fargs, function, value_key) for n in ordered}
        line = [label] + [fmt(values[n]) for n in ordered]
        ratio = None
        if base_pair:
            ratio = ratio_of(values["ferry"], values["qemu-nbd"])
            line[3:3] = [f"{ratio:.2f}x" if ratio is not None else "-", verdict(ratio, better, target)]
        lines.append(line)
        results["table"].append({"metric": label, "values": values, "ratio_ferry_qemu": ratio, "target": target,
                                 "better": better})
    print()
    if os.path.exists(ctx.ferry):
        built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(ctx.ferry)))
        print(f"ferry binary: {ctx.ferry} (modified {built})")
    print(f"All configurations (runtime {ctx.args.runtime}s per measurement, volumes {results['size_bytes'] // MIB} MiB, "
          f"'-' = not run):")
    print_table(lines)

    print("CPU cores used by the server processes (CPU seconds / wall seconds of the run; metro: primary + secondary):")
    for key, label in (("seq", "1 MiB seq"), ("qd32_1", "QD32 1 conn"), ("rw_p50", "randwrite QD1")):
        cells = []
        for name in ordered:
            cores = raw.get(name, {}).get(key, {}).get("cores")
            if cores and all(c is not None for c in cores):
                cells.append(f"{name} {' + '.join(f'{c:.2f}' for c in cores)}")
        if cells:
            print(f"  {label}: " + "; ".join(cells))
    print(f"  (the machine has {os.cpu_count()} CPUs, shared with the client and anything else running)")
    print()
    for server in servers:
        for key in ("qd32_1", "qd32_4"):
            hwm = raw.get(server.name, {}).get(key, {}).get("vmhwm_kib")
            if hwm and all(h is not None for h in hwm):
                what = " + ".join(f"{h / 1024:.1f}" for h in hwm)
                print(f"{server.name}: peak RSS (VmHWM) under {key}: {what} MiB"
                      + (" (primary + secondary)" if server.kind == "metro" else ""))
                results.setdefault("peak_rss_kib", {}).setdefault(server.name, {})[key] = hwm
    print()

    if floors.get("durable_p50_us"):
        print("Local durable 4 KiB write in the work directory, p50 / p99 (us):")
        for when in ("before", "after"):
            fd, od = floors.get(f"durable_fdatasync_{when}"), floors.get(f"durable_o_dsync_{when}")
            if fd and od:
                print(f"  {when} the FUA round: pwrite+fdatasync {fmt(fd['p50_us'])} / {fmt(fd['p99_us'])}; "
                      f"O_DIRECT|O_DSYNC {fmt(od['p50_us'])} / {fmt(od['p99_us'])}")
        print(f"  L = the lowest p50 = {fmt(floors['durable_p50_us'])} us")
        standalone_fua = value_of(raw, "ferry", "fua_p50", (), "fua_qd1", "p50_us")
        if standalone_fua:
            print(f"Ferry standalone FUA p50 / L = {standalone_fua / floors['durable_p50_us']:.2f}x (for reference)")
        print()

    if metro:
        lines = [["metro check"] + [s.name for s in metro]]
        results["metro_checks"] = {}
        standalone = raw.get("ferry", {})

        def row(label, cell):
            lines.append([label] + [cell(s) for s in metro])

        def floor(s):
            return floors.get(s.name, {})

        def get(s, key, value_key):
            return raw.get(s.name, {}).get(key, {}).get(value_key)

        def breakdown(s, field):
            return (raw.get(s.name, {}).get("fua_p50", {}).get("ferry") or {}).get(field)

        row("link", lambda s: "loopback" if s.rtt_ms is None else f"relay +{s.rtt_ms:g} ms RTT")
        row("UDP ping RTT p50 / p99 (us)",
            lambda s: f"{fmt(floor(s)['rtt']['p50_us'])} / {fmt(floor(s)['rtt']['p99_us'])}" if floor(s) else "-")
        row("ferry_replica_rtt mean in FUA run (us)", lambda s: fmt(breakdown(s, "replica_rtt_mean_us")))
        row("floor p50 = max(L, RTT+L) (us)", lambda s: fmt(floor(s).get("floor_p50_us")))
        row("FUA QD1 p50 / p99 (us)", lambda s: f"{fmt(get(s, 'fua_p50', 'p50_us'))} / {fmt(get(s, 'fua_p50', 'p99_us'))}")
        row("  ferry write mean: total / journal / replica (us)",
            lambda s: " / ".join(fmt(breakdown(s, f)) for f in ("write_total_mean_us", "write_journal_mean_us",
                                                                 "write_replica_mean_us")))
        checks = {}
        for s in metro:
            fua = get(s, "fua_p50", "p50_us")
            fl = floor(s).get("floor_p50_us")
            qd32 = get(s, "qd32_1", "iops")
            seq = get(s, "seq", "mb_s")
            checks[s.name] = {
                "fua_p50_us": fua, "floor_p50_us": fl, "rtt": floor(s).get("rtt"),
                "fua_over_floor": ratio_of(fua, fl),
                "qd32_iops": qd32, "qd32_over_standalone": ratio_of(qd32, standalone.get("qd32_1", {}).get("iops")),
                "seq_mb_s": seq, "seq_over_standalone": ratio_of(seq, standalone.get("seq", {}).get("mb_s")),
                "failed": s.failed,
            }
        results["metro_checks"] = checks

        def check_cell(name, field, better, target):
            ratio = checks[name][field]
            return "-" if ratio is None else f"{ratio:.2f}x {verdict(ratio, better, target).split()[-1]}"

        row(f"FUA p50 / floor (<= {METRO_FUA_FLOOR_TARGET}x)",
            lambda s: check_cell(s.name, "fua_over_floor", "lower", METRO_FUA_FLOOR_TARGET))
        row("QD32 1 conn IOPS", lambda s: fmt(checks[s.name]["qd32_iops"]))
        row(f"QD32 / standalone (>= {METRO_VS_STANDALONE_TARGET}x)",
            lambda s: check_cell(s.name, "qd32_over_standalone", "higher", METRO_VS_STANDALONE_TARGET))
        row("1 MiB seq MB/s", lambda s: fmt(checks[s.name]["seq_mb_s"]))
        row(f"seq / standalone (>= {METRO_VS_STANDALONE_TARGET}x)",
            lambda s: check_cell(s.name, "seq_over_standalone", "higher", METRO_VS_STANDALONE_TARGET))
        row("randwrite QD1 p50 - RTT p50 (us)",
            lambda s: fmt(get(s, "rw_p50", "p50_us") - floor(s)["rtt"]["p50_us"])
            if floor(s) and get(s, "rw_p50", "p50_us") is not None else "-")
        def drops_cell(s):
            total = {}
            for entry in raw.get(s.name, {}).values():
                for k, v in (entry.get("drops") or {}).items():
                    if v is not None and k != "relay_forwarded":
                        total[k] = total.get(k, 0) + v
            if not total:
                return "-"
            return " / ".join(str(total.get(k, "-")) for k in ("ferry_sockets_kernel", "relay_sockets_kernel",
                                                               "relay_queue_or_send"))

        row("UDP drops in all runs: ferry rx / relay rx / relay", drops_cell)
        row("replica state after every run",
            lambda s: "FAILED" if s.failed else (
                "in-sync" if all(v.get("state_after") == "in-sync" for v in raw.get(s.name, {}).values())
                else ",".join(sorted({str(v.get('state_after')) for v in raw.get(s.name, {}).values()}))))
        print("Metro (primary a + secondary b on this machine; the secondary's durable write is the same disk's L):")
        print_table(lines)

    resync = results.get("resync")
    if resync:
        print(f"Resync (volume {resync['size_bytes'] / GIB:.2f} GiB, peer_timeout {resync['peer_timeout']}):")
        if resync.get("fill_s"):
            print(f"  fill of the primary (secondary stopped): {resync['size_bytes'] / resync['fill_s'] / 1e6:.0f} MB/s "
                  f"({resync['fill_s']:.1f} s)")
        full = resync.get("full")
        if full:
            log_part = (f"primary log started->complete {full['log_seconds']:.2f} s" if "log_seconds" in full
                        else "no log span")
            print(f"  initial full sync over loopback: {fmt(full['mb_s'])} MB/s — resynced_bytes "
                  f"{full['resynced_bytes']:,} in {log_part}; secondary start -> in-sync {full['seconds_from_start']:.2f} s; "
                  f"states {' -> '.join(full['states'])}")
        delta = resync.get("delta")
        if delta:
            link = f"relay +{ctx.args.resync_rtt_ms:g} ms RTT" if ctx.args.resync_rtt_ms else "relay, no added delay"
            print(f"  delta resync after a {resync['outage_s']:g} s cut ({link}, both directions) under a "
                  f"{resync['load_iops']} IOPS 4k randwrite load:")
            print(f"    cut -> state left in-sync: {resync['cut_detect_s']:.2f} s; state at restore: "
                  f"{resync.get('state_before_restore')}")
            log_part = (f"; primary log: {delta.get('log_resyncs')} delta resync(s), last one {delta['log_bytes']:,} "
                        f"bytes dirty at start, {delta['log_seconds']:.2f} s" if "log_seconds" in delta else "")
            print(f"    restore -> in-sync: {delta['seconds_from_restore']:.2f} s; resynced_bytes "
                  f"{delta['resynced_bytes']:,}{log_part}")
            print(f"    states: {' -> '.join(delta['states'])}")
        load = resync.get("load")
        if load:
            print(f"    load: {load['iops']:.0f} IOPS average, write clat p50 {fmt(load['clat_p50_us'])} us, "
                  f"p99 {fmt(load['clat_p99_us'])} us, max {fmt(load['clat_max_us'] / 1000)} ms")
        if "copies_identical" in resync:
            print(f"  copies byte-identical after the run: {'yes' if resync['copies_identical'] else 'NO'}")
        if resync.get("error"):
            print(f"  FAILED: {resync['error']}")
        print()

    degraded = results.get("degraded")
    if degraded and "error" not in degraded:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import degraded_bench

        degraded_bench.report(degraded)
    print_goals(ctx, raw, floors, results)
    print_warnings_and_problems(results.get("log_warnings"), ctx.problems)


def print_warnings_and_problems(warnings, problems):
    """The grouped WARN/ERROR lines of the Ferry logs (collect_log_warnings) and ctx.problems."""
    if warnings:
        print("WARN/ERROR lines in the Ferry logs (grouped):")
        for entry in warnings:
            print(f"  {entry['where']}: {entry['count']}x {entry['level']} {entry['target']} {entry['message']}")
            print(f"      e.g. {entry['example']}")
        print()
    if problems:
        print("PROBLEMS:")
        for problem in problems:
            print(f"  {problem['where']}: {problem['what']}")
            if problem["log"]:
                print("    " + problem["log"].rstrip().replace("\n", "\n    "))
        print()


def goal_ratio(kind, raw, floors, results):
    """(ratio, detail) of one goal, or (None, why not)."""
    def value(name, key):
        for k, _, function, fargs, value_key, *_ in METRICS:
            if k == key:
                return value_of(raw, name, key, fargs, function, value_key)
        return None

    parts = kind.split(":")
    if parts[0] == "base":
        ferry, qemu = value("ferry", parts[1]), value("qemu-nbd", parts[1])
        ratio = ratio_of(ferry, qemu)
        return ratio, f"ferry {fmt(ferry)} / qemu-nbd {fmt(qemu)}"
    if parts[0] == "fua_floor":
        metro, standalone = value(parts[1], "fua_p50"), value("ferry", "fua_p50")
        rtt = (floors.get(parts[1]) or {}).get("rtt", {}).get("p50_us")
        if metro is None or standalone is None or rtt is None:
            return None, "not run"
        return metro / (standalone + rtt), f"{fmt(metro)} / ({fmt(standalone)} + {fmt(rtt)})"
    if parts[0] == "metro":
        metro, standalone = value(parts[1], parts[2]), value("ferry", parts[2])
        return ratio_of(metro, standalone), f"{fmt(metro)} / {fmt(standalone)}"
    if parts[0] == "degraded":
        degraded = results.get("degraded") or {}
        ratio = degraded.get(f"{parts[1]}_worst_ratio")
        if ratio is None:
            return None, degraded.get("error", "not run")
        windows = degraded[f"degraded_{parts[1]}"][1:]
        return ratio, "p50 per window: " + ", ".join(fmt(w["p50_us"]) for w in windows)
    return None, "unknown"


def print_goals(ctx, raw, floors, results):
    print("Goals (ratios within this run):")
    lines = [["goal", "ratio", "target", "verdict", "figures (us, IOPS or MB/s)"]]
    results["goals"] = []
    for label, kind, target, better in GOALS:
        ratio, detail = goal_ratio(kind, raw, floors, results)
        sign = "<=" if better == "lower" else ">="
        verdict_text = "-" if ratio is None else verdict(ratio, better, target).split()[-1]
        lines.append([label, "-" if ratio is None else f"{ratio:.2f}x", f"{sign} {target}x", verdict_text, detail])
        results["goals"].append({"goal": label, "ratio": ratio, "target": target, "better": better,
                                 "verdict": verdict_text, "detail": detail})
    # Peak RSS under QD32, against the configured caps.
    for key, connections in (("qd32_1", 1), ("qd32_4", 4)):
        bound = RSS_UNAPPLIED_CAP_MIB + RSS_NBD_CONNECTION_CAP_MIB * connections + RSS_SLACK_MIB
        for name in raw:
            hwm = raw.get(name, {}).get(key, {}).get("vmhwm_kib")
            if not hwm or any(h is None for h in hwm):
                continue
            peak = max(hwm) / 1024
            ok = peak <= bound
            lines.append([f"{name} peak RSS under {key} (per process)", f"{peak:.1f} MiB", f"<= {bound} MiB",
                          "PASS" if ok else "MISS", " + ".join(f"{h / 1024:.1f}" for h in hwm)])
            results["goals"].append({"goal": f"{name} peak RSS {key}", "mib": peak, "bound_mib": bound,
                                     "verdict": "PASS" if ok else "MISS"})
    print_table(lines)


if __name__ == "__main__":
    main()
