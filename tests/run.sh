#!/usr/bin/env bash
# Runs every Ferry test: unit, property, crash, power-loss and interop tests against real NBD
# clients.
# The interop tests drive third-party tools (shared/TOOLS.md); when some are missing this script
# installs them (as root, with apt-get) or names exactly what to install, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

packages="fio libnbd-bin python3-libnbd nbdkit qemu-utils iproute2 iptables fuse3 e2fsprogs prometheus python3-yaml systemd"
needed=(nbdinfo nbdcopy nbdfuse nbdsh qemu-io qemu-img qemu-nbd fio mkfs.ext4 e2fsck fusermount3 losetup
        promtool systemd-analyze)
missing=()
for tool in "${needed[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
    missing+=("python3-libnbd")
fi
if ! /usr/bin/python3 -c 'import yaml' >/dev/null 2>&1; then
    missing+=("python3-yaml")
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing the tools the interop tests need (missing: ${missing[*]})"
        apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
    else
        echo "missing tools: ${missing[*]}" >&2
        echo "install them with: sudo apt-get install -y $packages" >&2
        exit 1
    fi
fi
# FUSE needs its device; loop mounts need loop devices (both present on the project's machines).
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: the ext4-through-nbdfuse test cannot run" >&2; exit 1; }

# Guardrails first: they fail in seconds where the tests take minutes.
echo "== cargo fmt --check"
cargo fmt --all --check
# The alert rules and their unit tests (the `deploy` integration tests run them again, with
# the dashboard's queries, the metrics contract and the manifests).
echo "== promtool check rules / test rules (deploy/prometheus)"
(cd deploy/prometheus && promtool check rules ferry-alerts.yml && promtool test rules ferry-alerts.test.yml)
echo "== cargo clippy (workspace lints, warnings are errors)"
cargo clippy --workspace --all-targets --features ferry/fault-injection -- -D warnings
echo "== cargo deny (licenses, sources, one version per crate, advisories)"
if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing cargo-deny (once; a few minutes)"
    cargo install --locked cargo-deny --version "^0.20" >/dev/null
fi
cargo deny --log-level error check bans licenses sources
# The RustSec database lives on github.com; where that is out of reach the check says so
# loudly instead of passing in silence.
if cargo deny --log-level error fetch db >/dev/null 2>&1; then
    cargo deny --log-level error check --disable-fetch advisories
else
    echo "WARNING: the RustSec advisory database could not be fetched: advisories NOT checked" >&2
fi

# The power-loss tests drive a daemon built with fault injection (off in production builds).
echo "== cargo test"
exec cargo test --release --workspace --features ferry/fault-injection "$@"
