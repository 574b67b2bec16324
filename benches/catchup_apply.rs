//! How long a regional secondary takes to apply a committed catch-up file to its device
//! (`CatchUpFile::apply`, the last step of a staged catch-up; docs/regional.md).
//!
//! Two catch-ups of a 256 MiB volume (`--quick`: 64 MiB), each a file of records:
//!
//! - **random**: as much data as the volume in 16 KiB records at random 4 KiB-aligned
//!   offsets, 40 % of them rewriting (exactly or shifted by up to 8 KiB) a range an earlier
//!   record wrote, and one 64 KiB zero range every 50 records;
//! - **sweep**: what a delta resync under a random-write load sends: the whole volume in
//!   1 MiB records in block order, then 16 KiB records over 40 % of it, in block order
//!   again (the blocks the load rewrote while the first pass ran).
//!
//! The volume is a file-backed device opened as the daemon opens one (O_DIRECT where the
//! filesystem allows), in a directory under `target/`. Each catch-up is applied twice: *warm*,
//! right after its commit, the file in the page cache (the run-time apply); *cold*, the file's
//! pages dropped first (`posix_fadvise(DONTNEED)`), as at a start that applies it again after
//! a crash. Each apply is checked against the records written one after the other in memory.
//!
//! Run: `cargo bench -p ferry --bench catchup_apply` (about a minute; `-- --quick`). Only
//! figures within one run mean much on a shared machine.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use ferry::config::{Role, VolumeConfig};
use ferry::metrics::Metrics;
use ferry::replication::catchup_file::CatchUpFile;
use ferry::volume::Volume;
use ferry_protocol::catchup::CatchUpRecord;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const LSN: u64 = 1000;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let volume_bytes = if quick { 64 * MIB } else { 256 * MIB };
    let dir = tempfile::Builder::new()
        .prefix("catchup-apply-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("work directory under target/");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for shape in ["random", "sweep"] {
            let mut catch_up = CatchUp::new(volume_bytes, 7);
            if shape == "random" {
                catch_up.random();
            } else {
                catch_up.sweep();
            }
            run(dir.path(), shape, &catch_up).await;
        }
    });
}

/// Stores `catch_up` in a catch-up file and applies it to fresh volumes, warm then cold.
async fn run(dir: &Path, shape: &str, catch_up: &CatchUp) {
    let volume_bytes = catch_up.expected.len() as u64;
    let base = dir.join(format!("{shape}.catchup"));
    let mut file = CatchUpFile::open(&base).expect("catch-up file");
    for record in &catch_up.records {
        file.append(1, record).await.expect("append");
    }
    file.commit(1, LSN).await.expect("commit");
    println!(
        "{shape}: {} records, {:.1} MiB of data, volume {} MiB",
        catch_up.records.len(),
        mib(catch_up.data_bytes),
        volume_bytes / MIB
    );
    for temperature in ["warm", "cold"] {
        let name = format!("{shape}-{temperature}");
        let device = dir.join(format!("{name}.img"));
        let config = VolumeConfig {
            name: name.clone(),
            device: device.clone(),
            size_bytes: Some(volume_bytes),
            journal_size_bytes: 16 * MIB,
            initial_role: Role::Secondary,
            replicas: Vec::new(),
        };
        let volume = Volume::open(
            &config,
            &dir.join(format!("{name}.journal")),
            Role::Secondary,
            Metrics::new().volume(&name),
            None,
        )
        .await
        .expect("volume");
        if temperature == "cold" {
            drop_cache(&base);
        }
        let started = Instant::now();
        let report = file.apply(&volume, LSN, false).await.expect("apply");
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "  {temperature}: {seconds:.2} s ({:.0} MiB/s of catch-up data): check {:.2} s, \
             write {:.2} s ({} writes, {:.1} MiB of device)",
            mib(catch_up.data_bytes) / seconds,
            report.check_seconds,
            report.write_seconds,
            report.writes,
            mib(report.device_bytes),
        );
        volume.close().await;
        drop(volume);
        assert!(
            std::fs::read(&device).expect("read the device") == catch_up.expected,
            "{name}: the device differs from the records applied in order"
        );
        std::fs::remove_file(&device).expect("remove the device");
    }
    file.remove();
}

/// The records of a catch-up and the volume they leave, written in order over zeros.
struct CatchUp {
    rng: StdRng,
    records: Vec<CatchUpRecord>,
    expected: Vec<u8>,
    data_bytes: u64,
}

impl CatchUp {
    fn new(volume_bytes: u64, seed: u64) -> CatchUp {
        CatchUp {
            rng: StdRng::seed_from_u64(seed),
            records: Vec::new(),
            expected: vec![0; usize::try_from(volume_bytes).expect("fits in memory")],
            data_bytes: 0,
        }
    }

    fn volume_bytes(&self) -> u64 {
        self.expected.len() as u64
    }

    fn data(&mut self, offset: u64, len: u64) {
        let at = usize::try_from(offset).expect("fits");
        let range = at..at + usize::try_from(len).expect("fits");
        self.rng.fill(&mut self.expected[range.clone()]);
        self.records.push(CatchUpRecord {
            offset_bytes: offset,
            len_bytes: len,
            data: Some(Bytes::copy_from_slice(&self.expected[range])),
        });
        self.data_bytes += len;
    }

    fn zeros(&mut self, offset: u64, len: u64) {
        let at = usize::try_from(offset).expect("fits");
        self.expected[at..at + usize::try_from(len).expect("fits")].fill(0);
        self.records.push(CatchUpRecord {
            offset_bytes: offset,
            len_bytes: len,
            data: None,
        });
    }

    fn random(&mut self) {
        let (record, align) = (16 * KIB, 4 * KIB);
        let last = self.volume_bytes() - record;
        let mut offsets: Vec<u64> = Vec::new();
        while self.data_bytes < self.volume_bytes() {
            if self.records.len() % 50 == 49 {
                let zeros = 64 * KIB;
                let at = self
                    .rng
                    .random_range(0..(self.volume_bytes() - zeros) / align);
                self.zeros(at * align, zeros);
                continue;
            }
            let offset = if !offsets.is_empty() && self.rng.random_bool(0.4) {
                let earlier = offsets[self.rng.random_range(0..offsets.len())];
                let shift = self.rng.random_range(0..5u64) * align;
                (earlier + shift).saturating_sub(2 * align).min(last)
            } else {
                self.rng.random_range(0..=last / align) * align
            };
            offsets.push(offset);
            self.data(offset, record);
        }
    }

    fn sweep(&mut self) {
        for offset in (0..self.volume_bytes()).step_by(usize::try_from(MIB).expect("fits")) {
            self.data(offset, MIB);
        }
        let record = 16 * KIB;
        for offset in (0..self.volume_bytes()).step_by(usize::try_from(record).expect("fits")) {
            if self.rng.random_bool(0.4) {
                self.data(offset, record);
            }
        }
    }
}

/// Drops the page cache of every segment of the catch-up file at `base` (committed, so
/// clean: the kernel drops it).
fn drop_cache(base: &Path) {
    for n in 0.. {
        let mut name = base.as_os_str().to_owned();
        name.push(format!(".{n}"));
        let Ok(segment) = std::fs::File::open(&name) else {
            break;
        };
        // SAFETY: posix_fadvise on a file descriptor this function owns.
        let rc =
            unsafe { libc::posix_fadvise(segment.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise");
    }
}

#[allow(clippy::cast_precision_loss)] // a figure to print
fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}
