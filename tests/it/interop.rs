//! Ferry against NBD clients nobody on this project wrote (SPEC §7): nbdinfo, qemu-io,
//! nbdcopy, fio's nbd engine, nbdfuse + a real ext4; plus metrics, status and config checks.
//! The third-party tools are the truth; a test fails (not skips) if a tool is missing, unless
//! FERRY_SKIP_INTEROP=1 says to skip.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::metric_sum;
use crate::harness::{
    self, cmd, require_tools, run, run_timeout, run_with_timeout, Daemon, Output, VolumeOptions,
};
use crate::nbd_wire::NbdConn;

const NBDINFO: (&str, &str) = ("nbdinfo", "libnbd-bin");
const NBDCOPY: (&str, &str) = ("nbdcopy", "libnbd-bin");
pub(crate) const QEMU_IO: (&str, &str) = ("qemu-io", "qemu-utils");
const FIO: (&str, &str) = ("fio", "fio");
/// What [`FuseMount`] needs: an ext4 filesystem through nbdfuse and a loop mount.
pub(crate) const EXT4_OVER_NBDFUSE: [(&str, &str); 6] = [
    ("nbdfuse", "libnbd-bin"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("fusermount3", "fuse3"),
    ("mount", "mount"),
    ("sync", "coreutils"),
];

const MIB: u64 = 1 << 20;

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let output = run(cmd("nbdinfo", args));
    serde_json::from_str(&output.stdout)
        .unwrap_or_else(|error| panic!("nbdinfo JSON ({error}): {output}"))
}

/// One check per advertised property, so a failure names the property.
fn check_nbdinfo_export(uri: &str, export: &serde_json::Value, size_bytes: u64) {
    assert_eq!(
        export["export-size"].as_u64(),
        Some(size_bytes),
        "{uri}: export-size in {export}"
    );
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
    ] {
        assert_eq!(
            export[flag].as_bool(),
            Some(true),
            "{uri}: {flag} in {export}"
        );
    }
    assert_eq!(
        export["is_read_only"].as_bool(),
        Some(false),
        "{uri}: is_read_only in {export}"
    );
    assert_eq!(
        export["block_size_minimum"].as_u64(),
        Some(512),
        "{uri}: block_size_minimum in {export}"
    );
    assert_eq!(
        export["block_size_preferred"].as_u64(),
        Some(4096),
        "{uri}: block_size_preferred in {export}"
    );
    assert_eq!(
        export["block_size_maximum"].as_u64(),
        Some(32 * MIB),
        "{uri}: block_size_maximum in {export}"
    );
}

#[test]
fn nbdinfo_sees_size_flags_and_block_sizes() {
    if !require_tools("nbdinfo_sees_size_flags_and_block_sizes", &[NBDINFO]) {
        return;
    }
    let daemon = Daemon::start();
    let size_bytes = daemon.volume_size_bytes();
    for uri in [daemon.unix_uri(), daemon.tcp_uri()] {
        let info = nbdinfo_json(&["--json", &uri]);
        let exports = info["exports"]
            .as_array()
            .unwrap_or_else(|| panic!("{uri}: no exports in {info}"));
        assert_eq!(exports.len(), 1, "{uri}: {info}");
        check_nbdinfo_export(&uri, &exports[0], size_bytes);
    }
    // --list connects without an export name and must find vol0 by NBD_OPT_LIST.
    for uri in [
        format!("nbd+unix:///?socket={}", daemon.nbd_socket.display()),
        format!("nbd://127.0.0.1:{}", daemon.nbd_port),
    ] {
        let list = nbdinfo_json(&["--list", "--json", &uri]);
        let exports = list["exports"]
            .as_array()
            .unwrap_or_else(|| panic!("{uri}: no exports in {list}"));
        let vol0 = exports
            .iter()
            .find(|export| export["export-name"] == "vol0")
            .unwrap_or_else(|| panic!("{uri}: vol0 not listed in {list}"));
        check_nbdinfo_export(&uri, vol0, size_bytes);
        // The human-readable listing too.
        let text = run(cmd("nbdinfo", &["--list", &uri]));
        assert!(
            text.stdout.contains("vol0"),
            "nbdinfo --list does not show vol0: {text}"
        );
    }
}

/// Runs qemu-io on a raw image at `uri` with the given `-c` commands; checks nothing.
pub(crate) fn qemu_io_unchecked(uri: &str, commands: &[String]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw", uri]);
    for line in commands {
        command.arg("-c").arg(line);
    }
    run_with_timeout(&mut command, harness::COMMAND_TIMEOUT)
}

/// Runs qemu-io with the given `-c` commands; fails on a non-zero exit or on any sign of a
/// failed command in the output (qemu-io does not always reflect failures in its exit status).
pub(crate) fn qemu_io(uri: &str, commands: &[String]) -> Output {
    let output = qemu_io_unchecked(uri, commands);
    let all = format!("{}{}", output.stdout, output.stderr);
    assert!(output.status.success(), "qemu-io failed: {output}");
    for bad in ["Pattern verification failed", "failed:", "error", "Error"] {
        assert!(
            !all.contains(bad),
            "qemu-io output contains {bad:?}: {output}"
        );
    }
    output
}

#[test]
fn qemu_io_patterns_fua_zeroes_discard_flush() {
    if !require_tools("qemu_io_patterns_fua_zeroes_discard_flush", &[QEMU_IO]) {
        return;
    }
    let daemon = Daemon::start();
    let size = daemon.volume_size_bytes();
    // Offsets: start, 512-aligned but not 4 KiB-aligned, middle, last 64 KiB of the volume.
    let cases: [(u64, u64, u8); 5] = [
        (0, 64 * 1024, 0xab),
        (MIB + 1536, 4096 + 512, 0x5a),
        (100 * MIB, MIB, 0x11),
        (size - 64 * 1024, 64 * 1024, 0xfe),
        (7 * MIB + 4096, 3 * 4096, 0x3c),
    ];
    for uri in [daemon.unix_uri(), daemon.tcp_uri()] {
        let mut commands = Vec::new();
        for (offset, length, pattern) in cases {
            commands.push(format!("write -P {pattern:#x} {offset} {length}"));
        }
        for (offset, length, pattern) in cases {
            commands.push(format!("read -P {pattern:#x} {offset} {length}"));
        }
        qemu_io(&uri, &commands);
        // A separate process: the data must come from the daemon, not from qemu's cache.
        let reads: Vec<String> = cases
            .iter()
            .map(|(offset, length, pattern)| format!("read -P {pattern:#x} {offset} {length}"))
            .collect();
        qemu_io(&uri, &reads);
    }
    let uri = daemon.unix_uri();
    // FUA writes, then WRITE_ZEROES and TRIM over written data, then FLUSH.
    qemu_io(
        &uri,
        &[
            format!("write -f -P 0x77 {} 65536", 20 * MIB),
            format!("read -P 0x77 {} 65536", 20 * MIB),
            format!("write -P 0x66 {} {}", 30 * MIB, 2 * MIB),
            format!("write -z {} {}", 30 * MIB + 4096, MIB),
            format!("write -z -u {} {}", 30 * MIB + 2 * 4096 + MIB, 65536),
            format!("write -P 0x55 {} {}", 40 * MIB, MIB),
            format!("discard {} {}", 40 * MIB, 512 * 1024),
            "flush".to_string(),
        ],
    );
    // Read back in a fresh process: zeroed and discarded ranges are zeros, the rest intact.
    qemu_io(
        &uri,
        &[
            format!("read -P 0x77 {} 65536", 20 * MIB),
            format!("read -P 0x66 {} 4096", 30 * MIB),
            format!("read -P 0 {} {}", 30 * MIB + 4096, MIB),
            format!("read -P 0x66 {} 4096", 30 * MIB + 4096 + MIB),
            format!("read -P 0 {} 65536", 30 * MIB + 2 * 4096 + MIB),
            format!("read -P 0 {} {}", 40 * MIB, 512 * 1024),
            format!("read -P 0x55 {} {}", 40 * MIB + 512 * 1024, 512 * 1024),
        ],
    );
    // The checker itself must be able to fail: a wrong pattern has to be reported.
    let output = qemu_io_unchecked(&uri, &[format!("read -P 0x78 {} 4096", 20 * MIB)]);
    assert!(
        output.stdout.contains("Pattern verification failed")
            || output.stderr.contains("Pattern verification failed"),
        "qemu-io did not detect a wrong pattern: {output}"
    );
}

#[test]
fn nbdcopy_256mib_round_trip() {
    if !require_tools("nbdcopy_256mib_round_trip", &[NBDCOPY]) {
        return;
    }
    let daemon = Daemon::start_with(VolumeOptions {
        size: "256MiB".to_string(),
        journal_size: "64MiB".to_string(),
        ..VolumeOptions::default()
    });
    let seed = harness::test_seed("nbdcopy_256mib_round_trip");
    let input = daemon.dir.join("input.bin");
    let output = daemon.dir.join("output.bin");
    harness::write_random_file(&input, daemon.volume_size_bytes(), seed);
    let timeout = Duration::from_secs(300);
    let started = Instant::now();
    run_timeout(
        cmd("nbdcopy", &[input.to_str().unwrap(), &daemon.unix_uri()]),
        timeout,
    );
    eprintln!("nbdcopy in: {:?}", started.elapsed());
    let started = Instant::now();
    fs::File::create(&output).expect("create output");
    run_timeout(
        cmd("nbdcopy", &[&daemon.tcp_uri(), output.to_str().unwrap()]),
        timeout,
    );
    eprintln!("nbdcopy out: {:?}", started.elapsed());
    harness::assert_files_equal(&input, &output);
}

fn fio_json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).expect("read fio output");
    // fio may print warnings before the JSON object even with --output.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output: {text}"));
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|error| panic!("fio JSON ({error}): {text}"))
}

#[test]
fn fio_nbd_randwrite_then_verify() {
    if !require_tools("fio_nbd_randwrite_then_verify", &[FIO]) {
        return;
    }
    let daemon = Daemon::start();
    for (uri, name) in [(daemon.unix_uri(), "unix"), (daemon.tcp_uri(), "tcp")] {
        let json_path = daemon.dir.join(format!("fio-{name}.json"));
        let uri_arg = format!("--uri={uri}");
        let output_arg = format!("--output={}", json_path.display());
        let output = run_timeout(
            cmd(
                "fio",
                &[
                    "--name=randwrite-verify",
                    "--ioengine=nbd",
                    &uri_arg,
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    "--size=24m",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                    "--output-format=json",
                    &output_arg,
                ],
            ),
            Duration::from_secs(120),
        );
        let json = fio_json(&json_path);
        let job = &json["jobs"][0];
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "fio job error: {json} {output}"
        );
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
        eprintln!("fio {name}: wrote {written} bytes, verified {verified} bytes");
        assert!(written > 0, "fio wrote nothing: {json}");
        assert!(verified > 0, "fio verified nothing: {json}");
        assert_eq!(written, verified, "fio did not verify everything it wrote");
    }
}

/// An ext4 filesystem on an export: nbdfuse exposes the export as a file, the kernel mounts
/// it through a loop device (also used by `metro.rs`). Drop unmounts and stops nbdfuse even
/// when the test panics; if an unmount fails, the directory is left behind rather than removed
/// recursively through a live mount.
pub(crate) struct FuseMount {
    tempdir: Option<tempfile::TempDir>,
    fuse_dir: PathBuf,
    /// Where the filesystem is mounted.
    pub(crate) fs_dir: PathBuf,
    nbdfuse: Option<Child>,
    mounted: bool,
}

impl FuseMount {
    pub(crate) fn new() -> FuseMount {
        let tempdir = harness::test_tempdir("ferry-fuse-");
        let fuse_dir = tempdir.path().join("fuse");
        let fs_dir = tempdir.path().join("fs");
        fs::create_dir_all(&fuse_dir).expect("mkdir fuse");
        fs::create_dir_all(&fs_dir).expect("mkdir fs");
        FuseMount {
            tempdir: Some(tempdir),
            fuse_dir,
            fs_dir,
            nbdfuse: None,
            mounted: false,
        }
    }

    /// The file nbdfuse exposes the export as.
    pub(crate) fn image(&self) -> PathBuf {
        self.fuse_dir.join("nbd")
    }

    pub(crate) fn image_arg(&self) -> String {
        self.image().to_str().expect("utf-8 path").to_string()
    }

    /// Starts nbdfuse in the foreground (as our child) and waits for the file to appear.
    pub(crate) fn attach(&mut self, uri: &str) {
        assert!(self.nbdfuse.is_none(), "nbdfuse already attached");
        let child = Command::new("nbdfuse")
            .arg(self.image())
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        self.nbdfuse = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .image()
                .metadata()
                .map(|meta| meta.len() > 0)
                .unwrap_or(false)
            {
                return;
            }
            if let Some(status) = self.nbdfuse.as_mut().unwrap().try_wait().expect("try_wait") {
                self.nbdfuse = None;
                panic!("nbdfuse {uri} exited early with {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nbdfuse file {} did not appear", self.image().display());
    }

    pub(crate) fn mount(&mut self) {
        run(cmd(
            "mount",
            &[
                "-o",
                "loop",
                &self.image_arg(),
                self.fs_dir.to_str().unwrap(),
            ],
        ));
        self.mounted = true;
    }

    /// Unmounts the filesystem; returns false if neither umount nor a lazy umount worked.
    pub(crate) fn umount(&mut self) -> bool {
        if !self.mounted {
            return true;
        }
        let fs_dir = self.fs_dir.to_str().unwrap().to_string();
        let plain = run_with_timeout(cmd("umount", &[&fs_dir]), harness::COMMAND_TIMEOUT);
        if plain.status.success() {
            self.mounted = false;
            return true;
        }
        eprintln!("umount failed, trying lazy: {plain}");
        let lazy = run_with_timeout(cmd("umount", &["-l", &fs_dir]), harness::COMMAND_TIMEOUT);
        self.mounted = !lazy.status.success();
        !self.mounted
    }

    /// Unmounts the FUSE filesystem and reaps nbdfuse; returns false if the unmount failed.
    pub(crate) fn detach(&mut self) -> bool {
        let mut clean = true;
        if let Some(mut child) = self.nbdfuse.take() {
            let fuse_dir = self.fuse_dir.to_str().unwrap().to_string();
            let unmount = run_with_timeout(
                cmd("fusermount3", &["-u", &fuse_dir]),
                harness::COMMAND_TIMEOUT,
            );
            if !unmount.status.success() {
                eprintln!("fusermount3 -u failed, trying lazy: {unmount}");
                let lazy = run_with_timeout(
                    cmd("fusermount3", &["-u", "-z", &fuse_dir]),
                    harness::COMMAND_TIMEOUT,
                );
                clean = lazy.status.success();
            }
            if harness::wait_child_with_timeout(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        clean
    }

    /// Unmounts the filesystem and detaches nbdfuse; panics if either fails.
    pub(crate) fn detach_all(&mut self) {
        assert!(self.umount(), "umount {} failed", self.fs_dir.display());
        assert!(
            self.detach(),
            "fusermount3 -u {} failed",
            self.fuse_dir.display()
        );
    }

    /// `e2fsck -fn` on the image (read-only, forced); must report a clean filesystem.
    pub(crate) fn fsck(&self, what: &str) {
        assert!(!self.mounted, "fsck of a mounted filesystem");
        let output = run_with_timeout(
            cmd("e2fsck", &["-fn", &self.image_arg()]),
            Duration::from_secs(120),
        );
        assert!(
            output.status.success(),
            "e2fsck -fn {what} found problems: {output}"
        );
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let unmounted = self.umount();
        let detached = self.detach();
        if !(unmounted && detached) {
            if let Some(tempdir) = self.tempdir.take() {
                let path = tempdir.keep();
                eprintln!("left {} in place: still mounted", path.display());
            }
        }
    }
}

/// Writes `count` files of `size_bytes` seeded random bytes; returns name → sha-like checksum.
pub(crate) fn write_files(
    dir: &Path,
    prefix: &str,
    count: usize,
    size_bytes: u64,
    seed: u64,
) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for index in 0..count {
        let name = format!("{prefix}-{index}.bin");
        let path = dir.join(&name);
        harness::write_random_file(&path, size_bytes, seed.wrapping_add(index as u64));
        sums.insert(name, file_checksum(&path));
    }
    sums
}

/// FNV-1a over the whole file, mixed with the length: enough to tell any corruption apart here.
pub(crate) fn file_checksum(path: &Path) -> u64 {
    let data = fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in &data {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^ data.len() as u64
}

pub(crate) fn verify_files(dir: &Path, sums: &BTreeMap<String, u64>, what: &str) {
    for (name, sum) in sums {
        assert_eq!(
            file_checksum(&dir.join(name)),
            *sum,
            "{what}: file {name} changed"
        );
    }
}

#[test]
fn ext4_over_nbdfuse_survives_clean_restart_and_kill9() {
    if !require_tools(
        "ext4_over_nbdfuse_survives_clean_restart_and_kill9",
        &EXT4_OVER_NBDFUSE,
    ) {
        return;
    }
    let seed = harness::test_seed("ext4_over_nbdfuse_survives_clean_restart_and_kill9");
    let mut daemon = Daemon::start();
    // Declared after the daemon so it drops (unmounts) first.
    let mut mount = FuseMount::new();
    let uri = daemon.unix_uri();

    mount.attach(&uri);
    run(cmd("mkfs.ext4", &["-q", "-F", &mount.image_arg()]));
    mount.mount();
    let mut sums = write_files(&mount.fs_dir, "clean", 6, 3 * MIB, seed);
    mount.detach_all();

    // Round 1: clean stop and restart.
    daemon.stop();
    daemon.restart();
    mount.attach(&uri);
    mount.mount();
    verify_files(&mount.fs_dir, &sums, "after the clean restart");
    sums.extend(write_files(
        &mount.fs_dir,
        "crash",
        6,
        3 * MIB,
        seed ^ 0xc0ffee,
    ));
    run(cmd::<&str>("sync", &[]));

    // Round 2: kill -9 while mounted, after sync; the filesystem sees I/O errors until
    // we unmount it, which is expected: everything needed was flushed by sync.
    daemon.kill9();
    assert!(mount.umount(), "umount after kill -9 failed");
    assert!(mount.detach(), "fusermount3 after kill -9 failed");
    daemon.restart();
    mount.attach(&uri);
    // A read-only check first: the image as the daemon recovered it, before the kernel
    // replays ext4's own journal.
    let fsck = run_with_timeout(
        cmd("e2fsck", &["-fn", &mount.image_arg()]),
        Duration::from_secs(120),
    );
    eprintln!("e2fsck -fn right after kill -9 recovery (journal replay may be pending): {fsck}");
    mount.mount();
    verify_files(&mount.fs_dir, &sums, "after the kill -9 recovery");
    assert!(mount.umount(), "umount failed");
    mount.fsck("after the kill -9 recovery");
    assert!(mount.detach(), "fusermount3 failed");
    daemon.stop();
}

#[test]
fn metrics_and_status_follow_writes() {
    let daemon = Daemon::start();
    let before = daemon.volume_status();
    let head_before = before["journal"]["head_lsn"]
        .as_u64()
        .unwrap_or_else(|| panic!("head_lsn in {before}"));
    assert_eq!(
        before["size_bytes"].as_u64(),
        Some(daemon.volume_size_bytes()),
        "{before}"
    );
    assert_eq!(before["role"], "primary", "{before}");

    let mut conn = NbdConn::connect_unix(&daemon.nbd_socket, "vol0").expect("connect");
    let block = vec![0x42u8; 4096];
    for index in 0..64u64 {
        conn.write(index * 4096, &block, index % 8 == 0)
            .expect("write");
    }
    conn.flush().expect("flush");
    assert_eq!(conn.read(0, 4096).expect("read"), block);
    conn.disconnect();

    let after = daemon.volume_status();
    let head_after = after["journal"]["head_lsn"].as_u64().expect("head_lsn");
    assert!(
        head_after > head_before,
        "head_lsn did not grow: {head_before} -> {head_after}"
    );
    for key in [
        "used_bytes",
        "capacity_bytes",
        "applied_lsn",
        "unapplied_bytes",
        "full_waits",
    ] {
        assert!(
            after["journal"][key].is_u64(),
            "journal.{key} missing in {after}"
        );
    }
    let capacity_bytes = after["journal"]["capacity_bytes"]
        .as_u64()
        .expect("capacity_bytes");
    // The journal's own header may take a little of the configured 64 MiB.
    assert!(
        capacity_bytes <= 64 * MIB,
        "capacity {capacity_bytes} above journal_size: {after}"
    );
    assert!(
        capacity_bytes >= 63 * MIB,
        "capacity {capacity_bytes} far below journal_size: {after}"
    );
    for key in ["records_replayed", "bytes_replayed", "torn_tail_bytes"] {
        assert!(
            after["recovery"][key].is_u64(),
            "recovery.{key} missing in {after}"
        );
    }

    let metrics = daemon.metrics_text();
    let count = metric_sum(
        &metrics,
        "ferry_write_latency_seconds_count",
        &["stage=\"total\"", "volume=\"vol0\""],
    );
    assert!(
        count.unwrap_or(0.0) >= 64.0,
        "write latency count {count:?} in:\n{metrics}"
    );
    let bucket_bounds: Vec<f64> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("ferry_write_latency_seconds_bucket{")
                && line.contains("stage=\"total\"")
        })
        .filter_map(|line| {
            let start = line.find("le=\"")? + 4;
            let end = start + line[start..].find('"')?;
            line[start..end].parse::<f64>().ok()
        })
        .collect();
    assert!(
        !bucket_bounds.is_empty(),
        "no ferry_write_latency_seconds_bucket{{stage=\"total\"}}:\n{metrics}"
    );
    // SPEC §6: buckets resolve tens of microseconds up to seconds.
    assert!(
        bucket_bounds.iter().any(|le| *le <= 0.000_05),
        "no bucket at or below 50 µs: {bucket_bounds:?}"
    );
    assert!(
        bucket_bounds.iter().any(|le| *le >= 1.0 && le.is_finite()),
        "no bucket at or above 1 s: {bucket_bounds:?}"
    );
    let writes = metric_sum(&metrics, "ferry_io_requests_total", &["op=\"write\""]);
    assert!(
        writes.unwrap_or(0.0) >= 64.0,
        "ferry_io_requests_total{{op=\"write\"}} = {writes:?}:\n{metrics}"
    );
    assert!(
        metric_sum(&metrics, "ferry_io_requests_total", &["op=\"flush\""]).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "ferry_io_requests_total", &["op=\"read\""]).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    // 64 writes of 4 KiB and one read of 4 KiB, counted in bytes (the daemon is fresh).
    let written = metric_sum(&metrics, "ferry_io_bytes_total", &["op=\"write\""]);
    assert_eq!(written, Some(64.0 * 4096.0), "{metrics}");
    let read = metric_sum(&metrics, "ferry_io_bytes_total", &["op=\"read\""]);
    assert!(read.unwrap_or(0.0) >= 4096.0, "{read:?}:\n{metrics}");
    let capacity = metric_sum(
        &metrics,
        "ferry_journal_capacity_bytes",
        &["volume=\"vol0\""],
    );
    assert_eq!(
        capacity,
        Some(capacity_bytes as f64),
        "journal capacity gauge vs status:\n{metrics}"
    );
    assert!(
        metric_sum(&metrics, "ferry_journal_used_bytes", &["volume=\"vol0\""]).is_some(),
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "ferry_volume_role", &["role=\"primary\""]) == Some(1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_flush_latency_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_read_latency_seconds_bucket"),
        "{metrics}"
    );
}

#[test]
fn config_check_reports_line_and_column() {
    let daemon = Daemon::configure(VolumeOptions::default());
    let good = run_with_timeout(
        cmd(
            harness::FERRY_BIN,
            &["config", "check", daemon.config_path.to_str().unwrap()],
        ),
        harness::COMMAND_TIMEOUT,
    );
    assert_eq!(good.status.code(), Some(0), "valid config rejected: {good}");

    // A typo in a key: unknown keys are errors (SPEC §4).
    let text = daemon
        .config_text()
        .replace("journal_size =", "jurnal_size =");
    let typo_line = text
        .lines()
        .position(|line| line.starts_with("jurnal_size"))
        .expect("typo line")
        + 1;
    let bad_path = daemon.dir.join("bad.toml");
    fs::write(&bad_path, &text).expect("write bad config");
    let bad = run_with_timeout(
        cmd(
            harness::FERRY_BIN,
            &["config", "check", bad_path.to_str().unwrap()],
        ),
        harness::COMMAND_TIMEOUT,
    );
    assert_eq!(bad.status.code(), Some(2), "typo'd key: {bad}");
    let all = format!("{}{}", bad.stdout, bad.stderr);
    let expected_prefix = format!("{}:{typo_line}:", bad_path.display());
    let located = all.lines().any(|line| {
        line.find(&expected_prefix).is_some_and(|at| {
            let rest = &line[at + expected_prefix.len()..];
            let column: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            !column.is_empty() && rest[column.len()..].starts_with(':')
        })
    });
    assert!(located, "expected a `{expected_prefix}COL:` line: {bad}");
    assert!(
        all.contains("jurnal_size"),
        "error does not name the key: {bad}"
    );

    // A bad value: a size that is not a multiple of 4096.
    let text = daemon
        .config_text()
        .replace("size = \"256MiB\"", "size = \"1000\"");
    fs::write(&bad_path, &text).expect("write bad config");
    let bad = run_with_timeout(
        cmd(
            harness::FERRY_BIN,
            &["config", "check", bad_path.to_str().unwrap()],
        ),
        harness::COMMAND_TIMEOUT,
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "size not a multiple of 4096: {bad}"
    );
}
