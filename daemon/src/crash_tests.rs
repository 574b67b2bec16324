//! Crash tests of the whole local write path (volume, journal, index, applier, recovery) on
//! simulated disks that fail, tear and lose power (`storage::FaultDisk`).
//!
//! Eight client tasks each own a region of the volume and issue seeded random writes, zeroes,
//! trims, flushes and read-backs. At a random operation a fault hits; the volume is then
//! reopened on the surviving disk contents ("reboot") and every block is checked against a
//! model of what the clients saw complete:
//!
//! - after a process crash, every completed write is there (or a later completed one);
//! - after a power loss, every write made durable by FUA or a later FLUSH is there;
//! - in both cases every block holds the contents of exactly one write to it (or its initial
//!   zeros) that the rules above allow — never a mix, never anything else.
//!
//! Each round prints its seed; `FERRY_SEED=N` replays one round, `FERRY_LONG=1` runs many.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::config::Role;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::storage::{AlignedBuf, FaultDisk, IoFuture, SharedBuf, Storage};
use crate::volume::Volume;

const BLOCK: usize = 4096;
const TASKS: u64 = 8;
const BLOCKS_PER_TASK: u64 = 32;
const VOLUME_BYTES: u64 = TASKS * BLOCKS_PER_TASK * BLOCK as u64;
const JOURNAL_BYTES: u64 = crate::journal::MIN_JOURNAL_BYTES;
const ZERO: u64 = 0;
/// Boots per round: each ends in the round's fault.
const EPOCHS: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// kill -9: the OS keeps its page cache.
    ProcessCrash,
    /// The machine loses power: unsynced sectors are lost, each independently.
    PowerLoss,
    /// A journal write is torn, then the power goes.
    TornWriteThenPowerLoss,
    /// A journal write fails with EIO; the volume must fail, then the process dies.
    FailedWriteThenCrash,
    /// A device write (apply) fails with EIO, then the process dies.
    FailedApplyThenCrash,
}

/// One write of one block as the client saw it. `value` 0 means zeros.
#[derive(Clone, Debug)]
struct Event {
    value: u64,
    issued: u64,
    completed: Option<u64>,
    fua: bool,
}

#[derive(Default)]
struct Model {
    clock: u64,
    blocks: Vec<Vec<Event>>,
    /// (issued, completed) of every FLUSH that completed.
    flushes: Vec<(u64, u64)>,
    /// What each block held when this boot started (a write's value, or ZERO).
    initial: Vec<u64>,
}

impl Model {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn durable(&self, e: &Event) -> bool {
        match e.completed {
            None => false,
            Some(done) => e.fua || self.flushes.iter().any(|&(issued, _)| issued > done),
        }
    }

    /// Values block `b` may hold after the fault.
    fn allowed(&self, b: usize, power_loss: bool) -> Vec<u64> {
        let kept = |e: &Event| {
            if power_loss {
                self.durable(e)
            } else {
                e.completed.is_some()
            }
        };
        let events = &self.blocks[b];
        let mut allowed = Vec::new();
        if !events.iter().any(kept) {
            allowed.push(self.initial[b]);
        }
        for e in events {
            // A write is superseded by a kept write issued after it completed.
            let superseded = e.completed.is_some_and(|done| {
                events
                    .iter()
                    .any(|later| kept(later) && later.issued > done)
            });
            if !superseded {
                allowed.push(e.value);
            }
        }
        allowed
    }
}

/// Contents of block `b` written by write `value`: self-describing so a read names its writer.
fn pattern(value: u64, b: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    let mut x = value.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    data[..8].copy_from_slice(&value.to_le_bytes());
    data[8..16].copy_from_slice(&b.to_le_bytes());
    data
}

/// Which write a block's contents came from; `None` when they match no write at all.
fn identify(data: &[u8], b: u64) -> Option<u64> {
    if data.iter().all(|&x| x == 0) {
        return Some(ZERO);
    }
    let value = u64::from_le_bytes(data[..8].try_into().ok()?);
    (value != ZERO && pattern(value, b) == data).then_some(value)
}

struct Disks {
    device: FaultDisk,
    journal: FaultDisk,
}

/// What a test's hook is told about an I/O before it reaches the disk below.
#[derive(Clone, Copy, PartialEq)]
enum IoKind {
    /// A write or a zeroing, at this offset.
    Write(u64),
    Sync,
}

type Before = Box<dyn Fn(IoKind) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A storage that awaits a test's hook before every write, zeroing and sync of the storage
/// below it (reads pass straight through): latency, a stalled device, a write that never lands.
struct Interposed {
    inner: Arc<dyn Storage>,
    before: Before,
}

impl Interposed {
    fn wrap(
        inner: Arc<dyn Storage>,
        before: impl Fn(IoKind) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static,
    ) -> Arc<dyn Storage> {
        Arc::new(Interposed {
            inner,
            before: Box::new(before),
        })
    }
}

impl Storage for Interposed {
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        dsync: bool,
    ) -> IoFuture<'_, std::io::Result<()>> {
        let before = (self.before)(IoKind::Write(offset));
        Box::pin(async move {
            before.await;
            self.inner.write_at(offset, bufs, dsync).await
        })
    }
    fn read_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> IoFuture<'_, (std::io::Result<()>, AlignedBuf)> {
        self.inner.read_at(offset, buf)
    }
    fn sync(&self) -> IoFuture<'_, std::io::Result<()>> {
        let before = (self.before)(IoKind::Sync);
        Box::pin(async move {
            before.await;
            self.inner.sync().await
        })
    }
    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, std::io::Result<()>> {
        let before = (self.before)(IoKind::Write(offset));
        Box::pin(async move {
            before.await;
            self.inner.zero_range(offset, len, punch).await
        })
    }
    fn logical_block_bytes(&self) -> u64 {
        self.inner.logical_block_bytes()
    }
}

/// Gives a simulated disk latency, so that batches overlap, FUA batches queue behind plain
/// ones, and the applier lags behind the journal: without it every I/O completes at once and
/// recovery would never find anything to replay.
fn slow(
    inner: Arc<dyn Storage>,
    seed: u64,
    write_us_max: u64,
    sync_us_max: u64,
) -> Arc<dyn Storage> {
    let rng = Mutex::new(StdRng::seed_from_u64(seed));
    Interposed::wrap(inner, move |kind| {
        let max_us = if kind == IoKind::Sync {
            sync_us_max
        } else {
            write_us_max
        };
        let us = rng.lock().expect("rng").random_range(0..=max_us);
        Box::pin(tokio::time::sleep(Duration::from_micros(us)))
    })
}

async fn open(disks: &Disks, seed: u64) -> Volume {
    let metrics = Metrics::new().volume("crash");
    let device = slow(disks.device.storage(), seed ^ 2, 3000, 5000);
    let journal = slow(disks.journal.storage(), seed ^ 3, 300, 800);
    Volume::open_on(
        "crash",
        device,
        journal,
        Role::Primary,
        metrics,
        "fault-disk".into(),
    )
    .await
    .expect("the volume reopens after the fault")
}

async fn round(seed: u64, fault: Fault) {
    println!("crash round: fault {fault:?} seed {seed} (replay: FERRY_SEED={seed})");
    let disks = Disks {
        device: FaultDisk::new(VOLUME_BYTES),
        journal: FaultDisk::new(JOURNAL_BYTES),
    };
    Journal::format(&*disks.journal.storage(), VOLUME_BYTES)
        .await
        .expect("format");
    disks.journal.storage().sync().await.expect("sync");
    let power_loss = matches!(fault, Fault::PowerLoss | Fault::TornWriteThenPowerLoss);
    let next_value = Rc::new(RefCell::new(1u64));
    let mut initial = vec![ZERO; (TASKS * BLOCKS_PER_TASK) as usize];
    let mut volume = open(&disks, seed).await;
    // Several boots on the same disks: a fault, a recovery, more writes on the recovered
    // journal, another fault. Stale batches of an earlier boot must never come back.
    for epoch in 0..EPOCHS {
        let epoch_seed = seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9));
        let model = workload(
            Arc::new(volume),
            &disks,
            epoch_seed,
            fault,
            initial.clone(),
            next_value.clone(),
        )
        .await;
        volume = open(&disks, epoch_seed).await;
        let report = volume.recovery();
        println!(
            "  epoch {epoch}: reboot replayed {} records, torn tail {} bytes, stopped: {:?}",
            report.records_replayed, report.torn_tail_bytes, report.stopped_reason
        );
        for b in 0..TASKS * BLOCKS_PER_TASK {
            let data = volume
                .read(b * BLOCK as u64, BLOCK as u32)
                .await
                .expect("read after reboot");
            let found = identify(&data, b);
            let allowed = model.allowed(b as usize, power_loss);
            assert!(
                found.is_some_and(|v| allowed.contains(&v)),
                "seed {seed}, epoch {epoch}, fault {fault:?}: block {b} holds {found:?}, allowed {allowed:?}; history {:?}",
                model.blocks[b as usize]
            );
            initial[b as usize] = found.expect("checked above");
        }
    }
    // The recovered volume serves writes again, and a clean close leaves exactly what was read.
    volume
        .write(
            0,
            AlignedBuf::copy_from(&pattern(u64::MAX, 0)).freeze(),
            true,
        )
        .await
        .expect("write after reboot");
    initial[0] = u64::MAX;
    volume.close().await;
    drop(volume);
    let volume = open(&disks, seed).await;
    assert_eq!(
        volume.recovery().records_replayed,
        0,
        "a clean close leaves nothing to replay"
    );
    for b in 0..TASKS * BLOCKS_PER_TASK {
        let data = volume
            .read(b * BLOCK as u64, BLOCK as u32)
            .await
            .expect("read");
        assert_eq!(
            identify(&data, b),
            Some(initial[b as usize]),
            "seed {seed}: block {b} changed across a clean restart"
        );
    }
    volume.close().await;
}

/// One boot's workload: eight client tasks until the fault hits, then the fault finished off
/// ("the process is dead"). Returns what the clients saw.
async fn workload(
    volume: Arc<Volume>,
    disks: &Disks,
    seed: u64,
    fault: Fault,
    initial: Vec<u64>,
    next_value: Rc<RefCell<u64>>,
) -> Model {
    let model = Rc::new(RefCell::new(Model {
        blocks: vec![Vec::new(); (TASKS * BLOCKS_PER_TASK) as usize],
        initial,
        ..Model::default()
    }));
    let mut rng = StdRng::seed_from_u64(seed);
    let fault_at_op: u64 = rng.random_range(50..2500);
    let ops = Rc::new(RefCell::new(0u64));
    let local = tokio::task::LocalSet::new();
    for task in 0..TASKS {
        let (volume, model, ops, next_value) = (
            volume.clone(),
            model.clone(),
            ops.clone(),
            next_value.clone(),
        );
        let disks = Disks {
            device: disks.device.clone(),
            journal: disks.journal.clone(),
        };
        let mut rng = StdRng::seed_from_u64(seed ^ (task + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
        local.spawn_local(async move {
            let first = task * BLOCKS_PER_TASK;
            loop {
                let op = {
                    let mut n = ops.borrow_mut();
                    *n += 1;
                    *n
                };
                if op == fault_at_op {
                    inject(fault, &disks, seed);
                }
                if op > fault_at_op + 200 {
                    return;
                }
                let choice = rng.random_range(0..100);
                let b = first + rng.random_range(0..BLOCKS_PER_TASK);
                let count = rng.random_range(1..=4).min(first + BLOCKS_PER_TASK - b);
                let offset = b * BLOCK as u64;
                if choice < 70 || (85..90).contains(&choice) {
                    // Write (or zero, for 85..90) `count` blocks.
                    let zero = choice >= 85;
                    let fua = rng.random_ratio(1, 6);
                    let (values, issued) = {
                        let mut m = model.borrow_mut();
                        let issued = m.tick();
                        let values: Vec<u64> = (0..count)
                            .map(|_| {
                                if zero {
                                    ZERO
                                } else {
                                    let mut v = next_value.borrow_mut();
                                    *v += 1;
                                    *v
                                }
                            })
                            .collect();
                        for (i, &value) in values.iter().enumerate() {
                            m.blocks[(b + i as u64) as usize].push(Event {
                                value,
                                issued,
                                completed: None,
                                fua,
                            });
                        }
                        (values, issued)
                    };
                    let result = if zero {
                        if rng.random_bool(0.5) {
                            volume
                                .write_zeroes(
                                    offset,
                                    (count as usize * BLOCK) as u32,
                                    fua,
                                    rng.random_bool(0.5),
                                )
                                .await
                        } else {
                            volume
                                .trim(offset, (count as usize * BLOCK) as u32, fua)
                                .await
                        }
                    } else {
                        let mut buf = AlignedBuf::zeroed(count as usize * BLOCK);
                        for (i, &value) in values.iter().enumerate() {
                            buf[i * BLOCK..(i + 1) * BLOCK]
                                .copy_from_slice(&pattern(value, b + i as u64));
                        }
                        volume.write(offset, buf.freeze(), fua).await
                    };
                    if result.is_err() {
                        return; // the volume failed or the disk "died": these writes stay in flight
                    }
                    let mut m = model.borrow_mut();
                    let done = m.tick();
                    for i in 0..count {
                        let events = &mut m.blocks[(b + i) as usize];
                        let e = events
                            .iter_mut()
                            .rev()
                            .find(|e| e.issued == issued)
                            .expect("event recorded");
                        e.completed = Some(done);
                    }
                } else if choice < 85 {
                    let issued = model.borrow_mut().tick();
                    if volume.flush().await.is_err() {
                        return;
                    }
                    let mut m = model.borrow_mut();
                    let done = m.tick();
                    m.flushes.push((issued, done));
                } else {
                    // Read back: this task owns the block, so the newest completed write is exact.
                    let Ok(data) = volume.read(offset, BLOCK as u32).await else {
                        return;
                    };
                    let expected = model.borrow().blocks[b as usize]
                        .iter()
                        .rev()
                        .find(|e| e.completed.is_some())
                        .map_or(model.borrow().initial[b as usize], |e| e.value);
                    if op < fault_at_op {
                        assert_eq!(
                            identify(&data, b),
                            Some(expected),
                            "seed {seed}: block {b} read back wrong data before the fault"
                        );
                    }
                }
                tokio::task::yield_now().await;
            }
        });
    }
    local.await;
    if *ops.borrow() < fault_at_op {
        inject(fault, disks, seed);
    }
    finish(fault, &disks.device, &disks.journal, seed);
    drop(volume);
    model.take()
}

fn inject(fault: Fault, disks: &Disks, seed: u64) {
    match fault {
        Fault::ProcessCrash => {
            disks.journal.crash_process();
            disks.device.crash_process();
        }
        Fault::PowerLoss => {
            disks.journal.power_loss(seed);
            disks.device.power_loss(seed ^ 1);
        }
        Fault::TornWriteThenPowerLoss => {
            // Tear the next journal write; the power goes when the tear happens.
            disks.journal.set_tear_write(1, (seed % 8) * 512 + 512);
        }
        Fault::FailedWriteThenCrash => disks.journal.set_fail_write(1),
        Fault::FailedApplyThenCrash => disks.device.set_fail_write(1),
    }
}

/// After a deferred fault (a tear or an EIO) the workload stops; finish the scenario it names.
fn finish(fault: Fault, disks_device: &FaultDisk, disks_journal: &FaultDisk, seed: u64) {
    // A fault armed but never reached (the workload ended first) must not hit the next boot.
    disks_device.clear_faults();
    disks_journal.clear_faults();
    match fault {
        Fault::TornWriteThenPowerLoss => {
            disks_journal.power_loss(seed);
            disks_device.power_loss(seed ^ 1);
        }
        Fault::FailedWriteThenCrash | Fault::FailedApplyThenCrash => {
            disks_journal.crash_process();
            disks_device.crash_process();
        }
        Fault::ProcessCrash | Fault::PowerLoss => {}
    }
}

fn seeds(default_rounds: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let rounds = if std::env::var_os("FERRY_LONG").is_some() {
        default_rounds * 10
    } else {
        default_rounds
    };
    let base: u64 = rand::random();
    (0..rounds).map(|i| base.wrapping_add(i)).collect()
}

fn run(fault: Fault) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for seed in seeds(12) {
        runtime.block_on(round(seed, fault));
    }
}

#[test]
fn process_crash_keeps_every_completed_write() {
    run(Fault::ProcessCrash);
}

#[test]
fn power_loss_keeps_every_flushed_or_fua_write() {
    run(Fault::PowerLoss);
}

#[test]
fn torn_journal_write_is_dropped_whole() {
    run(Fault::TornWriteThenPowerLoss);
}

#[test]
fn failed_journal_write_fails_the_volume_and_loses_nothing_completed() {
    run(Fault::FailedWriteThenCrash);
}

#[test]
fn failed_apply_fails_the_volume_and_loses_nothing_completed() {
    run(Fault::FailedApplyThenCrash);
}

/// A full journal makes writes wait for the applier: they neither fail nor complete early,
/// memory stays bounded, the wait is counted, and everything completes once apply resumes.
#[test]
fn full_journal_makes_writes_wait_then_completes_them() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        const BLOCKS: u64 = 2048; // 8 MiB volume
        let device = crate::storage::MemStorage::new(BLOCKS * BLOCK as u64);
        let journal = crate::storage::MemStorage::new(JOURNAL_BYTES);
        Journal::format(&*journal, BLOCKS * BLOCK as u64)
            .await
            .expect("format");
        let (gate, open) = tokio::sync::watch::channel(false);
        // Every device write waits for the gate: the applier stalls, so the journal fills up.
        let gated = Interposed::wrap(device.clone(), move |kind| {
            let mut open = open.clone();
            Box::pin(async move {
                if kind != IoKind::Sync {
                    let _ = open.wait_for(|open| *open).await;
                }
            })
        });
        let metrics = Metrics::new();
        let volume = Arc::new(
            Volume::open_on(
                "full",
                gated,
                journal,
                Role::Primary,
                metrics.volume("full"),
                "mem".into(),
            )
            .await
            .expect("open"),
        );
        // Each 4 KiB write takes 8 KiB of ring; twice the ring's worth cannot fit.
        let writes = 2 * JOURNAL_BYTES / (2 * BLOCK as u64);
        let done = Rc::new(RefCell::new(0u64));
        let local = tokio::task::LocalSet::new();
        for i in 0..writes {
            let (volume, done) = (volume.clone(), done.clone());
            local.spawn_local(async move {
                let b = i % BLOCKS;
                volume
                    .write(
                        b * BLOCK as u64,
                        AlignedBuf::copy_from(&pattern(i + 1, b)).freeze(),
                        false,
                    )
                    .await
                    .expect("a full journal never fails a write");
                *done.borrow_mut() += 1;
            });
        }
        local
            .run_until(async {
                // Let the writers run until the ring is full and they stall.
                for _ in 0..200 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let stats = volume.journal_stats();
                let completed = *done.borrow();
                assert!(
                    completed < writes,
                    "all {writes} writes completed while the device was stalled"
                );
                assert!(
                    stats.full_waits > 0,
                    "waiting writes were not counted: {stats:?}"
                );
                assert!(
                    stats.used_bytes <= stats.capacity_bytes,
                    "ring over-committed: {stats:?}"
                );
                assert!(metrics
                    .gather_text()
                    .contains("ferry_journal_full_waits_total{volume=\"full\"}"));
                gate.send(true).expect("gate");
            })
            .await;
        local.await;
        assert_eq!(*done.borrow(), writes);
        // The newest write to each block wins.
        for b in [0, 1, BLOCKS - 1] {
            let last = (0..writes)
                .filter(|i| i % BLOCKS == b)
                .max()
                .expect("block written");
            let data = volume
                .read(b * BLOCK as u64, BLOCK as u32)
                .await
                .expect("read");
            assert_eq!(identify(&data, b), Some(last + 1), "block {b}");
        }
        volume.close().await;
        assert_eq!(
            volume.journal_stats().used_bytes,
            0,
            "close applies and releases everything"
        );
    });
}

fn filled(fill: u8) -> SharedBuf {
    AlignedBuf::copy_from(&[fill; BLOCK]).freeze()
}

async fn open_plain(device: Arc<dyn Storage>, journal: Arc<dyn Storage>) -> Volume {
    Volume::open_on(
        "r",
        device,
        journal,
        Role::Primary,
        Metrics::new().volume("r"),
        "fault-disk".into(),
    )
    .await
    .expect("open")
}

/// Batches written after the point where recovery stops carry the LSNs the next boot reuses.
/// If they kept a valid identity, a later scan would replay a never-acknowledged write over a
/// newer acknowledged one.
#[tokio::test(flavor = "current_thread")]
async fn regression_stale_batch_after_the_stop_point_never_comes_back() {
    let volume_bytes = 1 << 20;
    let device = FaultDisk::new(volume_bytes);
    let journal = FaultDisk::new(JOURNAL_BYTES);
    Journal::format(&*journal.storage(), volume_bytes)
        .await
        .expect("format");
    // Boot 1: the first batch (ring offset 0) never reaches the disk; the second one does.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hold = {
        let armed = armed.clone();
        Interposed::wrap(journal.storage(), move |kind| {
            let first_batch = kind == IoKind::Write(ferry_protocol::journal::RING_START_BYTES);
            if first_batch && armed.load(std::sync::atomic::Ordering::SeqCst) {
                Box::pin(std::future::pending()) // never reaches the disk
            } else {
                Box::pin(std::future::ready(()))
            }
        })
    };
    let first_boot = Arc::new(open_plain(device.storage(), hold).await);
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let a = {
        let v = first_boot.clone();
        tokio::spawn(async move { v.write(0, filled(0xAA), false).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = {
        let v = first_boot.clone();
        tokio::spawn(async move { v.write(0, filled(0xBB), false).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !a.is_finished() && !b.is_finished(),
        "neither write may complete: they complete in ring order"
    );
    journal.crash_process();
    device.crash_process();
    // Boot 2: a newer write to the same block completes; its batch ends exactly where the stale
    // second batch of boot 1 starts. A clean close moves the tail there.
    let second_boot = open_plain(device.storage(), journal.storage()).await;
    second_boot
        .write(0, filled(0xCC), false)
        .await
        .expect("write");
    second_boot.close().await;
    drop(second_boot);
    // Boot 3.
    let third_boot = open_plain(device.storage(), journal.storage()).await;
    let got = third_boot.read(0, BLOCK as u32).await.expect("read")[0];
    assert_eq!(
        got, 0xCC,
        "the completed write 0xCC was replaced by the never-completed {got:#x}"
    );
}

/// Closing a volume whose applier has failed must return (SIGTERM must not hang the daemon).
#[tokio::test(flavor = "current_thread")]
async fn regression_close_returns_after_an_apply_failure() {
    let volume_bytes = 1 << 20;
    let device = FaultDisk::new(volume_bytes);
    let journal = FaultDisk::new(JOURNAL_BYTES);
    Journal::format(&*journal.storage(), volume_bytes)
        .await
        .expect("format");
    let volume = open_plain(device.storage(), journal.storage()).await;
    device.set_fail_write(1);
    volume
        .write(0, filled(1), false)
        .await
        .expect("the journal write completes");
    for _ in 0..100 {
        if volume.failure().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        volume.failure().is_some(),
        "the failed apply fails the volume"
    );
    tokio::time::timeout(Duration::from_secs(5), volume.close())
        .await
        .expect("close returns");
}

// ---------------------------------------------------------------------------------------------
// Real disks: a logical block larger than 512 bytes, and device errors that do not go away.

/// The simulated block device of the tests below: 4096-byte logical blocks, like a 4Kn disk or
/// `losetup --sector-size 4096`.
const LOGICAL_BLOCK_BYTES: u64 = 4096;
/// Volume size in the tests below.
const SMALL_VOLUME_BYTES: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// One request at 512-byte granularity, as a client that only knows the export's minimum
/// block size sends them: offsets and lengths often not multiples of the device's block.
#[derive(Clone, Debug)]
enum SectorOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
        no_hole: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
}

fn sector_op(rng: &mut StdRng, volume_bytes: u64) -> SectorOp {
    let sectors = volume_bytes / SECTOR;
    let offset = rng.random_range(0..sectors) * SECTOR;
    let len = rng.random_range(1..=32u64).min(sectors - offset / SECTOR) * SECTOR;
    match rng.random_range(0..100) {
        0..55 => {
            let mut data = vec![0u8; crate::usize_from(len)];
            rng.fill(&mut data[..]);
            // Never all zeros, so a lost write cannot pass for a zeroing.
            data[0] |= 1;
            SectorOp::Write { offset, data }
        }
        55..75 => SectorOp::Zero {
            offset,
            len,
            no_hole: rng.random_bool(0.5),
        },
        75..95 => SectorOp::Trim { offset, len },
        _ => SectorOp::Flush,
    }
}

/// A volume under one sequential client, with the image that client expects.
struct Tracked {
    name: &'static str,
    device: FaultDisk,
    journal: FaultDisk,
    metrics: Arc<Metrics>,
    volume: Option<Volume>,
    image: Vec<u8>,
    /// The request that failed when the volume failed: it may or may not have reached the
    /// journal (NBD leaves a failed write's range unspecified), so either version is allowed
    /// there: (offset, before, after).
    uncertain: Option<(u64, Vec<u8>, Vec<u8>)>,
    /// Open the device behind a gate that never lets a write or zeroing through, so that
    /// records stay in the journal.
    stall_device: bool,
}

impl Tracked {
    async fn new(name: &'static str, device: FaultDisk) -> Tracked {
        let journal = FaultDisk::new(JOURNAL_BYTES);
        Journal::format(&*journal.storage(), device.len_bytes())
            .await
            .expect("format");
        let image = vec![0u8; crate::usize_from(device.len_bytes())];
        let mut tracked = Tracked {
            name,
            device,
            journal,
            metrics: Metrics::new(),
            volume: None,
            image,
            uncertain: None,
            stall_device: false,
        };
        tracked.reopen().await;
        tracked
    }

    fn volume(&self) -> &Volume {
        self.volume.as_ref().expect("volume open")
    }

    /// A new boot on the same disks (after [`FaultDisk::crash_process`] or a clean close).
    async fn reopen(&mut self) {
        self.volume = None;
        self.metrics = Metrics::new();
        let device = if self.stall_device {
            Interposed::wrap(self.device.storage(), |kind| {
                if kind == IoKind::Sync {
                    Box::pin(std::future::ready(()))
                } else {
                    Box::pin(std::future::pending())
                }
            })
        } else {
            self.device.storage()
        };
        let volume = Volume::open_on(
            self.name,
            device,
            self.journal.storage(),
            Role::Primary,
            self.metrics.volume(self.name),
            "fault-disk".into(),
        )
        .await
        .unwrap_or_else(|error| panic!("volume {} does not open: {error}", self.name));
        self.volume = Some(volume);
    }

    /// kill -9 of the process, then a new boot.
    async fn crash_and_reopen(&mut self) {
        self.volume = None;
        self.device.crash_process();
        self.journal.crash_process();
        self.reopen().await;
    }

    /// Runs `op`; on success the image follows it. Returns whether it completed.
    async fn run(&mut self, op: &SectorOp) -> bool {
        let volume = self.volume();
        let (result, change) = match op {
            SectorOp::Write { offset, data } => (
                volume
                    .write(*offset, AlignedBuf::copy_from(data).freeze(), false)
                    .await,
                Some((*offset, data.clone())),
            ),
            SectorOp::Zero {
                offset,
                len,
                no_hole,
            } => (
                volume
                    .write_zeroes(
                        *offset,
                        u32::try_from(*len).expect("small"),
                        false,
                        *no_hole,
                    )
                    .await,
                Some((*offset, vec![0; crate::usize_from(*len)])),
            ),
            SectorOp::Trim { offset, len } => (
                volume
                    .trim(*offset, u32::try_from(*len).expect("small"), false)
                    .await,
                Some((*offset, vec![0; crate::usize_from(*len)])),
            ),
            SectorOp::Flush => (volume.flush().await, None),
        };
        let Some((offset, data)) = change else {
            return result.is_ok();
        };
        let range = crate::usize_from(offset)..crate::usize_from(offset) + data.len();
        if result.is_ok() {
            self.image[range].copy_from_slice(&data);
        } else if self.uncertain.is_none() {
            self.uncertain = Some((offset, self.image[range].to_vec(), data));
        }
        result.is_ok()
    }

    /// Whether `got` (the volume's contents from `at`) is what the client may see: the image,
    /// except that the uncertain request's sectors may hold either version.
    fn check(&self, at: u64, got: &[u8], seed: u64, when: &str) {
        let expected = &self.image[crate::usize_from(at)..crate::usize_from(at) + got.len()];
        if got == expected {
            return;
        }
        for (i, (got_sector, expected_sector)) in got
            .chunks(crate::usize_from(SECTOR))
            .zip(expected.chunks(crate::usize_from(SECTOR)))
            .enumerate()
        {
            if got_sector == expected_sector {
                continue;
            }
            let sector_at = at + i as u64 * SECTOR;
            let allowed = self
                .uncertain
                .as_ref()
                .is_some_and(|(offset, before, after)| {
                    if sector_at < *offset || sector_at >= *offset + before.len() as u64 {
                        return false;
                    }
                    let from = crate::usize_from(sector_at - *offset);
                    let to = from + crate::usize_from(SECTOR);
                    got_sector == &before[from..to] || got_sector == &after[from..to]
                });
            assert!(
                allowed,
                "seed {seed}: volume {} {when}: sector at {sector_at} differs from what the client completed",
                self.name
            );
        }
    }

    /// Reads the whole volume back through the volume (index and device) and checks it.
    async fn check_reads(&self, seed: u64, when: &str) {
        const CHUNK: u64 = 64 << 10;
        let mut at = 0;
        while at < self.device.len_bytes() {
            let got = self
                .volume()
                .read(at, u32::try_from(CHUNK).expect("small"))
                .await
                .unwrap_or_else(|error| {
                    panic!(
                        "seed {seed}: volume {} {when}: read at {at}: {error}",
                        self.name
                    )
                });
            self.check(at, &got, seed, when);
            at += CHUNK;
        }
    }

    /// Checks the device itself, durably: after a clean close everything is applied.
    fn check_device(&self, seed: u64, when: &str) {
        self.check(0, &self.device.durable_image(), seed, when);
    }

    fn failed_metric(&self) -> bool {
        self.metrics.gather_text().contains(&format!(
            "ferry_volume_failed{{volume=\"{}\"}} 1",
            self.name
        ))
    }
}

/// A client that knows only the export's 512-byte minimum block size writes, zeroes and trims
/// ranges that start and end inside the device's 4 KiB blocks. Before Ferry handled them, the
/// apply of the first such zeroing failed with EINVAL, the volume failed, and every later
/// replay failed the same way. Now they are applied, replayed after kill -9, and a clean
/// close leaves exactly the client's view on the device.
#[tokio::test(flavor = "current_thread")]
async fn sub_block_requests_on_a_4k_device_apply_and_replay() {
    for seed in seeds(4) {
        println!("sub-block round: seed {seed} (replay: FERRY_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        let device = FaultDisk::with_logical_block_bytes(SMALL_VOLUME_BYTES, LOGICAL_BLOCK_BYTES);
        let mut tracked = Tracked::new("sub", device).await;
        for boot in 0..3 {
            for _ in 0..300 {
                let op = sector_op(&mut rng, SMALL_VOLUME_BYTES);
                assert!(
                    tracked.run(&op).await,
                    "seed {seed}, boot {boot}: {op:?} failed: {:?}",
                    tracked.volume().failure()
                );
            }
            // Let the applier take some of it (rounds gather for 250 ms), leave the rest to
            // the replay.
            if rng.random_bool(0.5) {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            tracked.check_reads(seed, "before the crash").await;
            assert_eq!(tracked.volume().failure(), None, "seed {seed}, boot {boot}");
            tracked.crash_and_reopen().await;
            assert_eq!(
                tracked.volume().failure(),
                None,
                "seed {seed}, boot {boot}: the replay failed"
            );
            tracked.check_reads(seed, "after kill -9").await;
        }
        tracked.volume().close().await;
        assert_eq!(tracked.volume().failure(), None, "seed {seed}");
        tracked.check_device(seed, "after a clean close");
    }
}

/// `ops` requests on each volume, interleaved; the healthy one must take every one.
async fn both(sick: &mut Tracked, healthy: &mut Tracked, rng: &mut StdRng, ops: u32, seed: u64) {
    for _ in 0..ops {
        let op = sector_op(rng, SMALL_VOLUME_BYTES);
        assert!(
            healthy.run(&op).await,
            "seed {seed}: the healthy volume failed {op:?}: {:?}",
            healthy.volume().failure()
        );
        let op = sector_op(rng, SMALL_VOLUME_BYTES);
        sick.run(&op).await;
    }
}

/// Where a persistent device error first strikes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Strikes {
    /// While the volume runs: the background apply fails.
    AtApply,
    /// At restart: the replay of the journal fails.
    AtReplay,
}

/// A device that refuses every write from some moment on (EINVAL from a device that rejects
/// the request, ENOSPC from a full filesystem under a sparse device file): the volume on it
/// fails, stays readable with every completed write, refuses writes and says so in its
/// failure and metric, at run time and after any number of restarts; the other volume of the
/// node never notices; once the device is fixed, a restart replays and the volume serves
/// writes again with nothing completed lost. Before, the first restart after such an error
/// failed to open the volume at all, which stopped the whole node.
async fn device_error_round(seed: u64, errno: i32, strikes: Strikes) {
    println!(
        "device error round: errno {errno}, {strikes:?}, seed {seed} (replay: FERRY_SEED={seed})"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sick = Tracked::new(
        "sick",
        FaultDisk::with_logical_block_bytes(SMALL_VOLUME_BYTES, LOGICAL_BLOCK_BYTES),
    )
    .await;
    let mut healthy = Tracked::new("healthy", FaultDisk::new(SMALL_VOLUME_BYTES)).await;
    if strikes == Strikes::AtReplay {
        // Keep records in the journal: the device takes nothing until the crash.
        sick.stall_device = true;
        sick.reopen().await;
    }
    both(&mut sick, &mut healthy, &mut rng, 100, seed).await;
    match strikes {
        Strikes::AtApply => {
            sick.device.set_persistent_write_error(Some(errno));
            // The journal keeps taking writes until the applier's round (at most 250 ms
            // away) meets the device.
            let mut failed = false;
            for _ in 0..400 {
                both(&mut sick, &mut healthy, &mut rng, 1, seed).await;
                if sick.volume().failure().is_some() {
                    failed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(failed, "seed {seed}: the apply never met the device error");
            // Failed at run time: reads go on (the unapplied records are still in memory),
            // writes are refused, the other volume carries on.
            sick.check_reads(seed, "failed at apply").await;
            assert!(sick.failed_metric(), "seed {seed}: no ferry_volume_failed");
            let op = SectorOp::Write {
                offset: 0,
                data: vec![7; 512],
            };
            assert!(
                !sick.run(&op).await,
                "seed {seed}: a failed volume took a write"
            );
            both(&mut sick, &mut healthy, &mut rng, 50, seed).await;
            sick.crash_and_reopen().await;
        }
        Strikes::AtReplay => {
            sick.device.set_persistent_write_error(Some(errno));
            sick.stall_device = false;
            sick.crash_and_reopen().await;
        }
    }
    // Every restart with the device still broken: the volume opens (the node starts), failed,
    // readable, refusing writes.
    for restart in 0..2 {
        let failure = sick.volume().failure().unwrap_or_else(|| {
            panic!("seed {seed}, restart {restart}: the volume opened as if nothing happened")
        });
        assert!(
            failure.contains("device I/O failed") && failure.contains("restart"),
            "seed {seed}: the failure does not say what failed and what to do: {failure}"
        );
        assert!(
            sick.failed_metric(),
            "seed {seed}: no ferry_volume_failed after restart"
        );
        sick.check_reads(seed, "failed at replay").await;
        let op = SectorOp::Write {
            offset: 4096,
            data: vec![9; 1024],
        };
        assert!(
            !sick.run(&op).await,
            "seed {seed}: a failed volume took a write"
        );
        both(&mut sick, &mut healthy, &mut rng, 30, seed).await;
        healthy.crash_and_reopen().await;
        healthy
            .check_reads(seed, "after a restart next to a failed volume")
            .await;
        sick.crash_and_reopen().await;
    }
    // The device is fixed: the next start replays and the volume serves writes again.
    sick.device.set_persistent_write_error(None);
    sick.crash_and_reopen().await;
    assert_eq!(
        sick.volume().failure(),
        None,
        "seed {seed}: still failed once fixed"
    );
    sick.check_reads(seed, "after the fix").await;
    both(&mut sick, &mut healthy, &mut rng, 100, seed).await;
    assert_eq!(sick.volume().failure(), None, "seed {seed}");
    for tracked in [&mut sick, &mut healthy] {
        tracked.volume().close().await;
        tracked.check_device(seed, "after a clean close");
        tracked.reopen().await;
        tracked.check_reads(seed, "after a clean restart").await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn persistent_einval_at_apply_fails_one_volume_readable_until_fixed() {
    for seed in seeds(2) {
        device_error_round(seed, libc::EINVAL, Strikes::AtApply).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn persistent_enospc_at_apply_fails_one_volume_readable_until_fixed() {
    for seed in seeds(2) {
        device_error_round(seed, libc::ENOSPC, Strikes::AtApply).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn persistent_einval_at_replay_fails_one_volume_readable_until_fixed() {
    for seed in seeds(2) {
        device_error_round(seed, libc::EINVAL, Strikes::AtReplay).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn persistent_enospc_at_replay_fails_one_volume_readable_until_fixed() {
    for seed in seeds(2) {
        device_error_round(seed, libc::ENOSPC, Strikes::AtReplay).await;
    }
}

/// A client streaming small discards and write-zeroes while the device stalls: records without
/// a payload count toward the memory cap ([`crate::journal::RECORD_MEMORY_BYTES`] each), so
/// writes wait once 64 MiB worth of records is unapplied, long before the ring is full.
/// Before they counted, nothing bounded them but the ring: 126 records per 4 KiB, some 2
/// million records for this 64 MiB journal, several hundred MiB of memory.
#[test]
fn small_zero_records_count_toward_the_memory_cap() {
    use crate::journal::{RECORD_MEMORY_BYTES, UNAPPLIED_MEMORY_BYTES_MAX};
    use ferry_protocol::journal::RECORDS_PER_BATCH_MAX;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        const JOURNAL_BYTES_LARGE: u64 = 64 << 20;
        let device = crate::storage::MemStorage::new(SMALL_VOLUME_BYTES);
        let journal = crate::storage::MemStorage::new(JOURNAL_BYTES_LARGE);
        Journal::format(&*journal, SMALL_VOLUME_BYTES)
            .await
            .expect("format");
        let (gate, open) = tokio::sync::watch::channel(false);
        let gated = Interposed::wrap(device.clone(), move |kind| {
            let mut open = open.clone();
            Box::pin(async move {
                if kind != IoKind::Sync {
                    let _ = open.wait_for(|open| *open).await;
                }
            })
        });
        let volume = Arc::new(
            Volume::open_on(
                "zeros",
                gated,
                journal,
                Role::Primary,
                Metrics::new().volume("zeros"),
                "mem".into(),
            )
            .await
            .expect("open"),
        );
        let stop = Rc::new(std::cell::Cell::new(false));
        let done = Rc::new(std::cell::Cell::new(0u64));
        let local = tokio::task::LocalSet::new();
        const CLIENTS: u64 = 64;
        for client in 0..CLIENTS {
            let (volume, stop, done) = (volume.clone(), stop.clone(), done.clone());
            local.spawn_local(async move {
                // Bounded: at most this many requests per client.
                for i in 0..100_000u64 {
                    if stop.get() {
                        return;
                    }
                    // 512 bytes every 1 KiB: no two records touch.
                    let offset = ((i * CLIENTS + client) * 1024) % SMALL_VOLUME_BYTES;
                    let result = if i % 2 == 0 {
                        volume.trim(offset, 512, false).await
                    } else {
                        volume.write_zeroes(offset, 512, false, i % 4 == 1).await
                    };
                    result.expect("a full journal never fails a write");
                    done.set(done.get() + 1);
                }
            });
        }
        let records_max = UNAPPLIED_MEMORY_BYTES_MAX / RECORD_MEMORY_BYTES;
        // The batches in flight when the cap is reached may pass it.
        let batches_max = 8;
        local
            .run_until(async {
                // Until the writes wait, or 20 s (bounded).
                for _ in 0..2000 {
                    if volume.journal_stats().full_waits > 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Let whatever was queued settle against the cap.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let stats = volume.journal_stats();
                println!(
                    "zero records: {} completed, journal {} of {} bytes used, {} waits",
                    done.get(),
                    stats.used_bytes,
                    stats.capacity_bytes,
                    stats.full_waits
                );
                assert!(
                    stats.full_waits > 0,
                    "{} zero records and no write waited: {stats:?}",
                    done.get()
                );
                assert!(
                    done.get() <= records_max + batches_max * RECORDS_PER_BATCH_MAX as u64,
                    "{} records completed unapplied, the cap allows {records_max}",
                    done.get()
                );
                // The cap stopped them, not a full ring.
                assert!(
                    stats.used_bytes < stats.capacity_bytes / 2,
                    "the ring filled up: {stats:?}"
                );
                stop.set(true);
                gate.send(true).expect("gate");
            })
            .await;
        local.await;
        volume.close().await;
        assert_eq!(
            volume.journal_stats().used_bytes,
            0,
            "close applies everything"
        );
    });
}
