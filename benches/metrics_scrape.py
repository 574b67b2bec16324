#!/usr/bin/env python3
"""The cost of one /metrics scrape of a node with many volumes: bytes, lines, time.

Starts `ferry run` with --volumes volumes (64 MiB each, no replicas) in a temporary directory,
scrapes http://127.0.0.1:PORT/metrics --scrapes times and prints the size and the p50/p99/max
time. Only a figure from one run on one machine; run it on the machine it is about.

Usage: cargo build --release -p ferry && /usr/bin/python3 benches/metrics_scrape.py [--volumes 64]
"""
import argparse
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=64)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--ferry", default=os.path.join(ROOT, "target", "release", "ferry"))
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ferry-metrics-scrape-") as work:
        data = os.path.join(work, "data")
        os.mkdir(data)
        lines = ["[node]", 'name = "n1"', f'data_dir = "{data}"', f'control_socket = "{work}/ctl.sock"',
                 f'metrics_listen = "127.0.0.1:{port}"', "", "[nbd]", f'listen = ["unix:{work}/nbd.sock"]', ""]
        for i in range(args.volumes):
            lines += ["[[volumes]]", f'name = "v{i}"', f'device = "{data}/v{i}.img"', 'size = "64MiB"',
                      'journal_size = "16MiB"', ""]
        config = os.path.join(work, "ferry.toml")
        with open(config, "w") as f:
            f.write("\n".join(lines))
        log = open(os.path.join(work, "ferry.log"), "w")
        daemon = subprocess.Popen([args.ferry, "run", "--config", config], stderr=log)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit("ferry run did not serve /metrics; see its log")
                    time.sleep(0.2)
            times, body = [], b""
            for _ in range(args.scrapes):
                started = time.perf_counter()
                body = urllib.request.urlopen(url, timeout=10).read()
                times.append(time.perf_counter() - started)
            times.sort()
            pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
            line_count = body.count(b"\n")
            print(f"{args.volumes} volumes: {len(body)} bytes, {line_count} lines per scrape; "
                  f"{args.scrapes} scrapes p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {times[-1] * 1e3:.1f} ms")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main()
