//! Ferry on real block devices: a loop device with 4096-byte logical sectors (what 4Kn NVMe
//! namespaces and many cloud disks look like), driven by clients that only know the export's
//! 512-byte minimum block size; and a device file whose filesystem fills up.
//!
//! Ferry's behaviour on such devices (ARCHITECTURE.md, "Devices"): the export keeps a
//! 512-byte minimum block size, the device is opened buffered, and zeroing splits at the
//! device's blocks (the kernel for whole blocks, written zeros for the edges). A device error
//! at apply time or at replay fails that volume only: it stays readable, refuses writes, says
//! so in `ferry status` and `ferry_volume_failed`, and a restart after the fix replays.
//!
//! Also the memory bounds of the local path, measured as the daemon's peak resident memory
//! while its device stalls: streams of small discards, and as many connections as allowed.
//!
//! These tests need root (losetup, mount) and the tools named in `require_tools`; each loop
//! device and mount is removed on drop, also when the test fails.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use crate::crash;
use crate::harness::{self, cmd, require_tools, run, run_with_timeout, Daemon, VolumeOptions};
use crate::interop::{self, FuseMount, QEMU_IO};
use crate::model;
use crate::nbd_wire::NbdConn;

const MIB: u64 = 1 << 20;
/// The logical sector size of the loop devices.
const SECTOR_4K: u64 = 4096;
const LOSETUP: (&str, &str) = ("losetup", "mount");

/// A loop device over a file of its own, with 4096-byte logical sectors; detached on drop.
struct LoopDevice {
    path: PathBuf,
    _backing: tempfile::TempDir,
}

impl LoopDevice {
    fn attach(len_bytes: u64) -> LoopDevice {
        // SAFETY: geteuid has no preconditions and touches no memory.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "loop devices and mounts need root");
        let backing = harness::test_tempdir("ferry-loop-");
        let file = backing.path().join("disk.img");
        fs::File::create(&file)
            .and_then(|f| f.set_len(len_bytes))
            .expect("create the loop device's file");
        let output = run(cmd(
            "losetup",
            &[
                "--sector-size",
                &SECTOR_4K.to_string(),
                "-f",
                "--show",
                file.to_str().expect("utf-8 path"),
            ],
        ));
        let path = PathBuf::from(output.stdout.trim());
        let device = LoopDevice {
            path,
            _backing: backing,
        };
        let name = device.path.file_name().expect("device name").to_owned();
        let sysfs = Path::new("/sys/block")
            .join(name)
            .join("queue/logical_block_size");
        let logical = fs::read_to_string(&sysfs).expect("read logical_block_size");
        assert_eq!(
            logical.trim(),
            SECTOR_4K.to_string(),
            "{} has {logical} logical sectors",
            device.path.display()
        );
        device
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let path = self.path.to_str().unwrap_or_default().to_string();
        let output = run_with_timeout(cmd("losetup", &["-d", &path]), harness::COMMAND_TIMEOUT);
        if !output.status.success() {
            eprintln!("losetup -d {path} failed: {output}");
        }
    }
}

/// A configured daemon whose volume's device is `device` (not a file Ferry creates), started.
fn daemon_on(device: &Path, volume: VolumeOptions) -> Daemon {
    let mut daemon = Daemon::configure(volume);
    daemon.device_path = device.to_path_buf();
    fs::write(&daemon.config_path, daemon.config_text()).expect("write config");
    daemon.restart();
    daemon
}

fn small_volume() -> VolumeOptions {
    VolumeOptions {
        size: "64MiB".to_string(),
        journal_size: "16MiB".to_string(),
        ..VolumeOptions::default()
    }
}

/// Waits (bounded) until everything journaled is applied to the device; panics with the
/// status if the volume failed meanwhile.
fn wait_applied(daemon: &Daemon, volume: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = volume_status(daemon, volume);
        assert!(
            status["failure"].is_null(),
            "volume {volume} failed: {}",
            status["failure"]
        );
        if status["journal"]["applied_lsn"] == status["journal"]["head_lsn"] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "volume {volume} not applied within 20 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn volume_status(daemon: &Daemon, volume: &str) -> serde_json::Value {
    let status = daemon.status_json();
    status["volumes"]
        .as_array()
        .and_then(|volumes| volumes.iter().find(|v| v["name"] == volume))
        .unwrap_or_else(|| panic!("volume {volume} not in status: {status}"))
        .clone()
}

/// The requests qemu-io sends for one seeded round at 512-byte granularity in the first
/// `region_bytes` of the volume, applied to `image` as the client expects them to read back.
fn sub_block_round(rng: &mut rand::rngs::StdRng, image: &mut [u8], count: usize) -> Vec<String> {
    let sectors = image.len() as u64 / 512;
    let mut commands = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = rng.random_range(0..sectors) * 512;
        let len = rng.random_range(1..=24u64).min(sectors - offset / 512) * 512;
        let range = offset as usize..(offset + len) as usize;
        match rng.random_range(0..4) {
            0 | 1 => {
                let fill: u8 = rng.random_range(1..=255);
                commands.push(format!("write -P {fill:#x} {offset} {len}"));
                image[range].fill(fill);
            }
            2 => {
                // -z: WRITE_ZEROES; -u also allows unmapping (no NO_HOLE).
                let unmap = if rng.random_bool(0.5) { "-u " } else { "" };
                commands.push(format!("write -z {unmap}{offset} {len}"));
                image[range].fill(0);
            }
            _ => {
                commands.push(format!("discard {offset} {len}"));
                image[range].fill(0);
            }
        }
    }
    commands
}

/// Reads the first `image.len()` bytes of the export and compares them with `image`.
fn check_export(daemon: &Daemon, image: &[u8], seed: u64, what: &str) {
    let blocks = image.len() as u64 / model::BLOCK_BYTES as u64;
    let got = model::read_region(&daemon.nbd_socket, &daemon.volume.name, blocks);
    check_bytes(&got, image, seed, what);
}

fn check_bytes(got: &[u8], image: &[u8], seed: u64, what: &str) {
    if let Some(at) = got.iter().zip(image).position(|(g, e)| g != e) {
        panic!(
            "seed {seed}: {what}: byte {at} is {:#x}, the client expects {:#x} (replay with FERRY_SEED={seed})",
            got[at], image[at]
        );
    }
}

/// qemu-io at 512-byte granularity on a 4Kn device: writes, WRITE_ZEROES (with and without
/// unmap) and discards at offsets inside 4 KiB blocks read back right, are applied to the
/// device without failing the volume, survive kill -9 (replay) and a clean restart, and land
/// on the device itself. Before Ferry handled sub-block zeroing, the first apply failed with
/// EINVAL and every restart refused to open the volume.
#[test]
fn qemu_io_at_512_bytes_on_a_4k_sector_device() {
    let test = "qemu_io_at_512_bytes_on_a_4k_sector_device";
    if !require_tools(test, &[QEMU_IO, LOSETUP, ("nbdinfo", "libnbd-bin")]) {
        return;
    }
    let seed = harness::test_seed(test);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let device = LoopDevice::attach(64 * MIB);
    let mut daemon = daemon_on(&device.path, small_volume());
    let uri = daemon.unix_uri();

    // The export keeps NBD's 512-byte minimum: clients that never negotiate block sizes
    // (NBD_OPT_EXPORT_NAME, the kernel client) send 512-byte requests anyway.
    let info = run(cmd("nbdinfo", &["--json", &uri]));
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("nbdinfo JSON");
    let export = &info["exports"][0];
    assert_eq!(export["block_size_minimum"].as_u64(), Some(512), "{export}");
    assert_eq!(
        export["block_size_preferred"].as_u64(),
        Some(4096),
        "{export}"
    );

    let mut image = vec![0u8; 4 * MIB as usize];
    // The headline case: a 1 KiB discard at offset 512.
    interop::qemu_io(
        &uri,
        &[
            "write -P 0xab 0 8192".to_string(),
            "discard 512 1024".to_string(),
        ],
    );
    image[..8192].fill(0xab);
    image[512..1536].fill(0);
    let commands = sub_block_round(&mut rng, &mut image, 200);
    interop::qemu_io(&uri, &commands);
    check_export(&daemon, &image, seed, "read back before apply");
    wait_applied(&daemon, "vol0");
    check_export(&daemon, &image, seed, "read back after apply");

    // WRITE_ZEROES larger than the 32 MiB maximum block size (the Linux client sends up to
    // 4 GiB), from an odd offset: one record, zeroed on the 4Kn device around its edges.
    interop::qemu_io(&uri, &[format!("write -P 0x6b {} {}", 2 * MIB, 2 * MIB)]);
    let mut conn = NbdConn::connect_unix(&daemon.nbd_socket, &daemon.volume.name)
        .expect("connect for a large WRITE_ZEROES");
    let large = 40 * MIB + 512;
    conn.write_zeroes(3 * MIB + 512, u32::try_from(large).expect("small"))
        .expect("a WRITE_ZEROES over 32 MiB is taken");
    let tail = conn
        .read(3 * MIB + 512 + large, 4096)
        .expect("read past the zeroed range");
    assert!(tail.iter().all(|b| *b == 0), "a new volume reads as zeros");
    conn.disconnect();
    image[2 * MIB as usize..4 * MIB as usize].fill(0x6b);
    image[(3 * MIB + 512) as usize..].fill(0);
    check_export(
        &daemon,
        &image,
        seed,
        "read back after a large WRITE_ZEROES",
    );
    wait_applied(&daemon, "vol0");

    // kill -9 before the applier gets to them: the replay applies them at start.
    let commands = sub_block_round(&mut rng, &mut image, 200);
    interop::qemu_io(&uri, &commands);
    daemon.kill9();
    daemon.restart();
    let status = daemon.volume_status();
    assert!(
        status["failure"].is_null(),
        "the replay failed: {}",
        status["failure"]
    );
    check_export(&daemon, &image, seed, "read back after kill -9");

    // A clean stop applies everything: the device itself holds what the client wrote.
    daemon.stop();
    let mut on_device = vec![0u8; image.len()];
    fs::File::open(&device.path)
        .and_then(|file| file.read_exact_at(&mut on_device, 0))
        .expect("read the loop device");
    check_bytes(&on_device, &image, seed, "the device after a clean stop");
    daemon.restart();
    check_export(&daemon, &image, seed, "read back after a clean restart");
    daemon.stop();
}

/// The kill -9 crash test of `crash.rs` (concurrent writers, FUA, FLUSH, a model of what
/// completed) on a 4Kn loop device.
#[test]
fn kill9_under_concurrent_writes_on_a_4k_sector_device() {
    let test = "kill9_under_concurrent_writes_on_a_4k_sector_device";
    if !require_tools(test, &[LOSETUP]) {
        return;
    }
    let seed = harness::test_seed(test);
    let device = LoopDevice::attach(64 * MIB);
    let mut daemon = daemon_on(&device.path, crash::volume_options());
    let mut baseline = crash::read_region(&daemon);
    for round in 0..2 {
        let (history, kill_after) =
            crash::write_until_killed(&mut daemon, seed, round, crash::SHAPE);
        daemon.restart();
        crash::report_recovery(&daemon, round, &history, kill_after);
        let status = daemon.volume_status();
        assert!(status["failure"].is_null(), "{}", status["failure"]);
        let region = crash::read_region(&daemon);
        let violations = model::verify_region(
            &region,
            &baseline,
            &history.records(),
            &crash::CrashStamp { seed, round },
        );
        crash::assert_no_violations(&violations, seed, round, "crash consistency on 4Kn");
        baseline = region;
    }
    daemon.stop();
}

/// ext4 with 1 KiB blocks, mounted with `-o discard`, through nbdfuse on a 4Kn device: every
/// file deletion sends discards of 1 KiB granularity. The volume must never fail, and the
/// files must survive a clean restart and kill -9.
#[test]
fn ext4_with_discard_on_a_4k_sector_device() {
    let test = "ext4_with_discard_on_a_4k_sector_device";
    let mut tools = interop::EXT4_OVER_NBDFUSE.to_vec();
    tools.extend([LOSETUP, ("fstrim", "util-linux")]);
    if !require_tools(test, &tools) {
        return;
    }
    let seed = harness::test_seed(test);
    let device = LoopDevice::attach(64 * MIB);
    let mut daemon = daemon_on(&device.path, small_volume());
    // Declared after the daemon so it drops (unmounts) first.
    let mut mount = FuseMount::new();
    let uri = daemon.unix_uri();
    mount.attach(&uri);
    run(cmd(
        "mkfs.ext4",
        &["-q", "-F", "-b", "1024", &mount.image_arg()],
    ));
    mount.mount();
    // Every freed block range becomes a discard, 1 KiB-granular like the filesystem.
    run(cmd(
        "mount",
        &[
            "-o",
            "remount,discard",
            mount.fs_dir.to_str().expect("utf-8 path"),
        ],
    ));
    let kept = interop::write_files(&mount.fs_dir, "kept", 4, 2 * MIB, seed);
    let gone = interop::write_files(&mount.fs_dir, "gone", 24, 37 * 1024, seed ^ 1);
    run(cmd("sync", &[] as &[&str]));
    for name in gone.keys() {
        fs::remove_file(mount.fs_dir.join(name)).expect("remove file");
    }
    run(cmd("sync", &[] as &[&str]));
    run(cmd("fstrim", &[mount.fs_dir.to_str().expect("utf-8 path")]));
    assert!(mount.umount(), "umount failed");
    wait_applied(&daemon, "vol0");
    mount.fsck("after discards on 4Kn");
    assert!(mount.detach(), "fusermount3 -u failed");

    daemon.stop();
    daemon.restart();
    mount.attach(&uri);
    mount.mount();
    interop::verify_files(&mount.fs_dir, &kept, "after a clean restart");
    let more = interop::write_files(&mount.fs_dir, "more", 4, 512 * 1024, seed ^ 2);
    run(cmd("sync", &[] as &[&str]));
    mount.detach_all();
    daemon.kill9();
    daemon.restart();
    let status = daemon.volume_status();
    assert!(status["failure"].is_null(), "{}", status["failure"]);
    mount.attach(&uri);
    mount.fsck("after kill -9");
    mount.mount();
    interop::verify_files(&mount.fs_dir, &kept, "after kill -9");
    interop::verify_files(&mount.fs_dir, &more, "after kill -9");
    mount.detach_all();
    daemon.stop();
}

/// A tmpfs of a given size in a directory of its own, unmounted on drop (declare it before
/// the daemon using it, so that the daemon is gone first).
struct SmallFs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_bytes: u64) -> SmallFs {
        let parent = harness::test_tempdir("ferry-smallfs-");
        let dir = parent.path().join("fs");
        fs::create_dir_all(&dir).expect("mkdir");
        run(cmd(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_bytes}"),
                "tmpfs",
                dir.to_str().expect("utf-8 path"),
            ],
        ));
        SmallFs {
            dir,
            _parent: parent,
        }
    }

    fn resize(&self, size_bytes: u64) {
        run(cmd(
            "mount",
            &[
                "-o",
                &format!("remount,size={size_bytes}"),
                self.dir.to_str().expect("utf-8 path"),
            ],
        ));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap_or_default().to_string();
        let output = run_with_timeout(cmd("umount", &[&dir]), harness::COMMAND_TIMEOUT);
        if !output.status.success() {
            eprintln!("umount {dir} failed: {output}");
        }
    }
}

fn volume_failed_metric(daemon: &Daemon, volume: &str) -> bool {
    daemon
        .metrics_text()
        .contains(&format!("ferry_volume_failed{{volume=\"{volume}\"}} 1"))
}

/// A sparse device file on a filesystem that fills up: the apply fails with ENOSPC. That
/// volume fails alone: it stays readable with every completed write, refuses writes, and says
/// so in status and metrics; the node's other volume keeps serving; restarts with the disk
/// still full start the node (the volume failed at replay, still readable); once there is
/// space, a restart replays and the volume takes writes again. Before, the first restart
/// refused to start the node at all.
#[test]
fn a_full_device_filesystem_fails_one_volume_and_the_node_serves_on() {
    let test = "a_full_device_filesystem_fails_one_volume_and_the_node_serves_on";
    if !require_tools(test, &[QEMU_IO, ("mount", "mount")]) {
        return;
    }
    let _seed = harness::test_seed(test);
    let small = SmallFs::mount(8 * MIB);
    let mut daemon = Daemon::configure(VolumeOptions {
        name: "roomy".to_string(),
        size: "32MiB".to_string(),
        journal_size: "64MiB".to_string(),
    });
    // Sparse, made by hand: Ferry preallocates only the device files it creates itself.
    let tight_device = small.dir.join("tight.img");
    fs::File::create(&tight_device)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("create the sparse device file");
    let config = format!(
        "{}\n[[volumes]]\nname = \"tight\"\ndevice = \"{}\"\njournal_size = \"64MiB\"\n",
        daemon.config_text(),
        tight_device.display()
    );
    fs::write(&daemon.config_path, config).expect("write config");
    daemon.restart();
    let socket = daemon.nbd_socket.display().to_string();
    let uri = |volume: &str| format!("nbd+unix:///{volume}?socket={socket}");

    // 16 MiB of data on an 8 MiB filesystem: the journal takes it, the apply cannot (and
    // fails soon after: a quarter of the ring's worth is applied at once).
    interop::qemu_io(
        &uri("tight"),
        &[
            format!("write -P 0x33 {} 1536", 20 * MIB + 512),
            format!("write -P 0x5a 0 {}", 16 * MIB),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let failure = loop {
        let status = volume_status(&daemon, "tight");
        if let Some(failure) = status["failure"].as_str() {
            break failure.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the apply never failed: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        failure.contains("No space left on device") && failure.contains("restart"),
        "the failure does not say what failed and what to do: {failure}"
    );
    let check_failed = |daemon: &Daemon, when: &str| {
        assert!(
            volume_failed_metric(daemon, "tight"),
            "{when}: no ferry_volume_failed"
        );
        // Readable: every completed write, from the journal where the device lacks it.
        interop::qemu_io(
            &uri("tight"),
            &[
                format!("read -P 0x5a 0 {}", 16 * MIB),
                format!("read -P 0x33 {} 1536", 20 * MIB + 512),
                format!("read -P 0 {} 512", 20 * MIB),
            ],
        );
        // Writes are refused.
        let refused = interop::qemu_io_unchecked(&uri("tight"), &["write -P 1 0 4096".to_string()]);
        let all = format!("{}{}", refused.stdout, refused.stderr);
        assert!(
            all.contains("error") || all.contains("failed") || !refused.status.success(),
            "{when}: a failed volume took a write: {refused}"
        );
        // The other volume carries on.
        interop::qemu_io(
            &uri("roomy"),
            &[
                format!("write -P 0x77 {} 65536", MIB + 512),
                format!("read -P 0x77 {} 65536", MIB + 512),
            ],
        );
        assert!(
            volume_status(daemon, "roomy")["failure"].is_null(),
            "{when}: the other volume failed"
        );
    };
    check_failed(&daemon, "failed at apply");
    // SIGTERM still exits cleanly, and the node starts again with the disk still full.
    daemon.stop();
    daemon.restart();
    let status = volume_status(&daemon, "tight");
    assert!(
        status["failure"].is_string(),
        "not failed at replay: {status}"
    );
    check_failed(&daemon, "failed at replay");
    daemon.kill9();
    daemon.restart();
    check_failed(&daemon, "failed at replay after kill -9");

    // Room again: the next start replays, and the volume takes writes.
    small.resize(64 * MIB);
    daemon.stop();
    daemon.restart();
    let status = volume_status(&daemon, "tight");
    assert!(status["failure"].is_null(), "still failed: {status}");
    interop::qemu_io(
        &uri("tight"),
        &[
            format!("read -P 0x5a 0 {}", 16 * MIB),
            format!("read -P 0x33 {} 1536", 20 * MIB + 512),
            "write -P 0x44 0 4096".to_string(),
            "read -P 0x44 0 4096".to_string(),
        ],
    );
    wait_applied(&daemon, "tight");
    daemon.stop();
    let mut head = vec![0u8; 8192];
    fs::File::open(&tight_device)
        .and_then(|file| file.read_exact_at(&mut head, 0))
        .expect("read the device file");
    assert!(
        head[..4096].iter().all(|b| *b == 0x44),
        "the device lacks the last write"
    );
    assert!(
        head[4096..].iter().all(|b| *b == 0x5a),
        "the device lacks the replayed write"
    );
    drop(daemon);
    drop(small);
}

/// The daemon's resident memory now and at its peak (`VmRSS`, `VmHWM`), in bytes.
#[cfg(feature = "fault-injection")]
fn daemon_memory_bytes(daemon: &Daemon) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
        .expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Waits (bounded, 15 s) until the daemon's memory stops growing for a second.
#[cfg(feature = "fault-injection")]
fn wait_memory_settled(daemon: &Daemon) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = daemon_memory_bytes(daemon);
    let mut stable_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = daemon_memory_bytes(daemon);
        if now.1 > last.1 + MIB {
            stable_since = Instant::now();
        }
        last = now;
        if stable_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    last
}

/// A daemon whose device takes no write for a minute: the applier stalls, so whatever
/// clients send piles up against Ferry's bounds (the journal's memory cap, the NBD layer's).
#[cfg(feature = "fault-injection")]
fn stalled_daemon(journal_size: &str, max_connections: u32) -> Daemon {
    let mut daemon = Daemon::start_with_env(
        VolumeOptions {
            size: "256MiB".to_string(),
            journal_size: journal_size.to_string(),
            ..VolumeOptions::default()
        },
        &[("FERRY_FAULT_DEVICE_WRITE_DELAY_US", "60000000")],
    );
    // Started once to create the device and journal (nothing to apply, so the stop is
    // quick), then again with the connection limit.
    daemon.stop();
    let config = daemon.config_text().replace(
        "\n\n[[volumes]]",
        &format!("\nmax_connections = {max_connections}\n\n[[volumes]]"),
    );
    assert!(config.contains("max_connections"), "{config}");
    fs::write(&daemon.config_path, config).expect("write config");
    daemon.restart();
    daemon
}

/// Peak resident memory allowed while clients stream small discards into a stalled volume:
/// the records are capped at 64 MiB of accounted memory (262,144 records), which measured
/// about 40 MiB resident on top of the daemon's own (45 MiB peak in all).
#[cfg(feature = "fault-injection")]
const SMALL_RECORDS_PEAK_BYTES_MAX: u64 = 128 * MIB;

/// Clients stream 512-byte TRIMs and WRITE_ZEROES (pipelined, 64 at a time on 8 connections)
/// into a volume whose device stalls. The records count toward the journal's memory cap, so
/// the clients stall after about 262,144 of them and the daemon's peak memory stays within
/// [`SMALL_RECORDS_PEAK_BYTES_MAX`]. Before, only the ring bounded them: with this 256 MiB
/// journal, millions of records and GiBs of memory.
#[cfg(feature = "fault-injection")]
#[test]
fn small_discards_and_write_zeroes_keep_memory_bounded() {
    use crate::nbd_wire::{self, request_bytes, CMD_TRIM, CMD_WRITE_ZEROES};
    let test = "small_discards_and_write_zeroes_keep_memory_bounded";
    let _seed = harness::test_seed(test);
    let mut daemon = stalled_daemon("256MiB", 16);
    let (_, start_peak) = daemon_memory_bytes(&daemon);
    const CLIENTS: u64 = 8;
    const WINDOW: u64 = 64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let socket = daemon.nbd_socket.clone();
            std::thread::spawn(move || {
                let stream = nbd_wire::connect_unix_raw(&socket).expect("connect");
                // A stalled reply ends this client: the journal is holding writes back.
                stream
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                let mut conn =
                    nbd_wire::NbdConn::handshake(Box::new(stream), "vol0").expect("handshake");
                let mut completed = 0u64;
                let mut handle = 0u64;
                // Bounded: at most 4096 windows, and the deadline.
                for _ in 0..4096 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let mut bytes = Vec::with_capacity(28 * WINDOW as usize);
                    for _ in 0..WINDOW {
                        handle += 1;
                        // 512 bytes every 1 KiB: no two records touch.
                        let offset = ((handle * CLIENTS + client) * 1024) % (256 * MIB);
                        let command = if handle.is_multiple_of(2) {
                            CMD_TRIM
                        } else {
                            CMD_WRITE_ZEROES
                        };
                        bytes.extend_from_slice(&request_bytes(0, command, handle, offset, 512));
                    }
                    if conn.stream().write_all(&bytes).is_err() {
                        break;
                    }
                    let mut stalled = false;
                    for _ in 0..WINDOW {
                        match nbd_wire::read_simple_reply(conn.stream(), 0) {
                            Ok(reply) => {
                                assert_eq!(reply.error, 0, "a zeroing failed");
                                completed += 1;
                            }
                            Err(_) => {
                                stalled = true;
                                break;
                            }
                        }
                    }
                    if stalled {
                        break;
                    }
                }
                completed
            })
        })
        .collect();
    let completed: u64 = threads
        .into_iter()
        .map(|thread| thread.join().expect("client thread"))
        .sum();
    let (rss, peak) = wait_memory_settled(&daemon);
    let status = daemon.volume_status();
    eprintln!(
        "{test}: {completed} zero records completed; daemon memory {} MiB at start, now {} MiB, peak {} MiB; journal {}",
        start_peak / MIB,
        rss / MIB,
        peak / MIB,
        status["journal"]
    );
    assert!(
        completed <= 262_144 + 8 * 126,
        "{completed} records completed while the device stalled; the cap allows 262,144"
    );
    assert!(
        peak <= SMALL_RECORDS_PEAK_BYTES_MAX,
        "peak memory {} MiB, documented bound {} MiB",
        peak / MIB,
        SMALL_RECORDS_PEAK_BYTES_MAX / MIB
    );
    daemon.kill9();
}

/// Peak resident memory allowed while many clients pipeline maximal writes into a stalled
/// volume: the NBD layer holds at most 512 MiB of payload for all connections together, the
/// journal 64 MiB of unapplied records, plus the daemon's own (587 MiB measured).
#[cfg(feature = "fault-injection")]
const MANY_CONNECTIONS_PEAK_BYTES_MAX: u64 = 768 * MIB;

/// 24 clients (the configured `max_connections`) each pipeline four 32 MiB writes into a
/// volume whose device stalls, without reading replies: each connection may hold 128 MiB, but
/// all of them together only 512 MiB, so the daemon's peak memory stays within
/// [`MANY_CONNECTIONS_PEAK_BYTES_MAX`] (before the server-wide cap: 24 × 128 MiB = 3 GiB). A
/// 25th connection is closed before the greeting.
#[cfg(feature = "fault-injection")]
#[test]
fn many_connections_keep_memory_bounded() {
    use crate::nbd_wire::{self, request_bytes, CMD_WRITE};
    let test = "many_connections_keep_memory_bounded";
    let _seed = harness::test_seed(test);
    const CONNECTIONS: u32 = 24;
    const WRITE_BYTES: u32 = 32 << 20;
    let mut daemon = stalled_daemon("128MiB", CONNECTIONS);
    let payload = vec![0x5au8; WRITE_BYTES as usize];
    let payload = std::sync::Arc::new(payload);
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|client| {
            let socket = daemon.nbd_socket.clone();
            let payload = std::sync::Arc::clone(&payload);
            std::thread::spawn(move || {
                let stream = nbd_wire::connect_unix_raw(&socket).expect("connect");
                // A write the server stopped reading ends this client's sending.
                stream
                    .set_write_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                let keep = stream.try_clone().expect("clone the socket");
                let mut conn =
                    nbd_wire::NbdConn::handshake(Box::new(stream), "vol0").expect("handshake");
                for i in 0..4u64 {
                    let offset = (u64::from(client) * 4 + i) * u64::from(WRITE_BYTES) % (256 * MIB);
                    let header = request_bytes(0, CMD_WRITE, i + 1, offset, WRITE_BYTES);
                    if conn.stream().write_all(&header).is_err()
                        || conn.stream().write_all(&payload).is_err()
                    {
                        break;
                    }
                }
                // The connection stays open (replies unread) until the test ends.
                (conn, keep)
            })
        })
        .collect();
    let connections: Vec<_> = threads
        .into_iter()
        .map(|thread| thread.join().expect("client thread"))
        .collect();
    // One more than max_connections: closed before the greeting.
    let mut extra = nbd_wire::connect_unix_raw(&daemon.nbd_socket).expect("connect");
    assert!(
        nbd_wire::client_greeting(&mut extra).is_err(),
        "a connection past max_connections was served"
    );
    let (rss, peak) = wait_memory_settled(&daemon);
    eprintln!(
        "{test}: {CONNECTIONS} connections pipelining 4 × 32 MiB writes; daemon memory now {} MiB, peak {} MiB",
        rss / MIB,
        peak / MIB
    );
    assert!(
        peak <= MANY_CONNECTIONS_PEAK_BYTES_MAX,
        "peak memory {} MiB, documented bound {} MiB",
        peak / MIB,
        MANY_CONNECTIONS_PEAK_BYTES_MAX / MIB
    );
    daemon.kill9();
    drop(connections);
}
