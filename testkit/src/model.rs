//! The write model shared by `crash` (kill -9 of one daemon) and `metro` (kill -9 of a
//! replicated primary): concurrent writers record when each write was issued and when it
//! completed on one logical clock, which ticks at every issue and every completion; every block
//! a write puts down names the write (see [`Stamp`]); a region read back afterwards is checked
//! against that history.
//!
//! A block may hold the contents of write W unless some write W' to the same block was issued
//! after W completed and W' completed too (then W is definitely overwritten). A block may hold
//! its pre-round contents unless some write to it completed. Anything else (a torn block, bytes
//! from no write, a lost completed write) is a violation. After a power loss (`power_loss`)
//! the same rule holds with "made durable" (FUA, or a later completed FLUSH) in place of
//! "completed": FLUSHes are recorded on the same clock for that.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::RngExt;

use crate::nbd_wire::NbdConn;

pub const BLOCK_BYTES: usize = 4096;
/// Blocks read per NBD READ when reading a region back.
const READ_CHUNK_BLOCKS: u64 = 256;

/// A FLUSH on the same clock as the writes.
#[derive(Clone, Debug)]
pub struct FlushRecord {
    pub issued_at: u64,
    /// None while in flight, or when the outcome was never seen.
    pub completed_at: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct WriteRecord {
    pub first_block: u64,
    pub block_count: u64,
    pub issued_at: u64,
    /// None while in flight, or when the outcome was never seen (error, connection lost).
    pub completed_at: Option<u64>,
    pub fua: bool,
}

/// A write's id: writer in the top bits, sequence below; unique within a round.
fn write_id(writer: u64, sequence: u64) -> u64 {
    (writer << 48) | sequence
}

/// How a workload's blocks name the write they came from.
pub trait Stamp {
    /// The id of the write of this round that `actual` (read from `block`) says it came from,
    /// or None if it names none.
    fn write_of(&self, block: u64, actual: &[u8]) -> Option<u64>;
    /// The exact bytes write `id` puts in `block`.
    fn contents(&self, id: u64, block: u64) -> Vec<u8>;
    /// What a block holds, for violation messages.
    fn describe(&self, actual: &[u8], baseline: &[u8]) -> String;
}

/// Where and how large one writer's writes are.
#[derive(Clone, Copy, Debug)]
pub struct WriteShape {
    /// Writes land in blocks [0, region_blocks) so that overwrites are common.
    pub region_blocks: u64,
    pub max_blocks_per_write: u64,
    /// A writer stops after this many writes even if nobody stops it (bounded loop).
    pub writes_max: u64,
    /// One write in this many (seeded) has FUA; 0 for none.
    pub fua_one_in: u32,
    /// One write in this many (seeded) is followed by a FLUSH; 0 for none.
    pub flush_one_in: u32,
}

/// What concurrent writers share: the logical clock, the record of every write, a stop flag,
/// and the errors they saw.
#[derive(Default)]
pub struct History {
    clock: AtomicU64,
    stop: AtomicBool,
    records: Mutex<HashMap<u64, WriteRecord>>,
    flushes: Mutex<Vec<FlushRecord>>,
    completed: AtomicU64,
    /// Errors the writers saw, with when they saw them.
    errors: Mutex<Vec<(Instant, String)>>,
}

impl History {
    /// Tells the writers to stop before their next write.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The logical clock now: writes issued later have a larger `issued_at`.
    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// How many writes have completed so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    pub fn error(&self, text: String) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), text));
    }

    pub fn errors(&self) -> Vec<(Instant, String)> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn records(&self) -> HashMap<u64, WriteRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn flushes(&self) -> Vec<FlushRecord> {
        self.flushes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ticks the clock and records a FLUSH as issued; returns its index.
    fn issue_flush(&self) -> usize {
        let mut flushes = self.flushes.lock().unwrap_or_else(|p| p.into_inner());
        let issued_at = self.clock.fetch_add(1, Ordering::SeqCst);
        flushes.push(FlushRecord {
            issued_at,
            completed_at: None,
        });
        flushes.len() - 1
    }

    /// Ticks the clock and records FLUSH `index` as completed.
    fn complete_flush(&self, index: usize) {
        let mut flushes = self.flushes.lock().unwrap_or_else(|p| p.into_inner());
        flushes[index].completed_at = Some(self.clock.fetch_add(1, Ordering::SeqCst));
    }

    /// Ticks the clock and records write `id` as issued (in flight).
    fn issue(&self, id: u64, first_block: u64, block_count: u64, fua: bool) {
        let issued_at = self.clock.fetch_add(1, Ordering::SeqCst);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                WriteRecord {
                    first_block,
                    block_count,
                    issued_at,
                    completed_at: None,
                    fua,
                },
            );
    }

    /// Ticks the clock and records write `id` as completed.
    fn complete(&self, id: u64) {
        let completed_at = self.clock.fetch_add(1, Ordering::SeqCst);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
            .expect("record")
            .completed_at = Some(completed_at);
        self.completed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Writer `writer`'s loop on `conn`: seeded writes of `shape` (some FUA, some followed by a
/// FLUSH) with the contents `stamp` gives them, each recorded in `history`, until `history` is
/// told to stop. The first error ends it and is noted in `history`; a write that failed stays
/// in flight in the model (it may or may not have happened). Returns true if no error ended it.
pub fn run_writer(
    conn: &mut NbdConn,
    writer: u64,
    rng: &mut StdRng,
    shape: WriteShape,
    stamp: &impl Stamp,
    history: &History,
) -> bool {
    for sequence in 0..shape.writes_max {
        if history.stop.load(Ordering::SeqCst) {
            break;
        }
        let block_count = rng.random_range(1..=shape.max_blocks_per_write);
        let first_block = rng.random_range(0..shape.region_blocks - block_count + 1);
        let fua = shape.fua_one_in > 0 && rng.random_ratio(1, shape.fua_one_in);
        let flush_after = shape.flush_one_in > 0 && rng.random_ratio(1, shape.flush_one_in);
        let id = write_id(writer, sequence);
        let mut payload = Vec::with_capacity(block_count as usize * BLOCK_BYTES);
        for block in first_block..first_block + block_count {
            payload.extend_from_slice(&stamp.contents(id, block));
        }
        history.issue(id, first_block, block_count, fua);
        if let Err(error) = conn.write(first_block * BLOCK_BYTES as u64, &payload, fua) {
            history.error(format!(
                "writer {writer}: write {id:#x} of blocks {first_block}+{block_count}: {error}"
            ));
            return false;
        }
        history.complete(id);
        if flush_after {
            let flush = history.issue_flush();
            if let Err(error) = conn.flush() {
                history.error(format!("writer {writer}: flush: {error}"));
                return false;
            }
            history.complete_flush(flush);
        }
    }
    true
}

/// Reads blocks [0, blocks) of `export` at `socket`.
pub fn read_region(socket: &Path, export: &str, blocks: u64) -> Vec<u8> {
    let mut conn = NbdConn::connect_unix(socket, export)
        .unwrap_or_else(|error| panic!("connect {} to read back: {error}", socket.display()));
    let mut region = Vec::with_capacity(blocks as usize * BLOCK_BYTES);
    let mut first = 0;
    while first < blocks {
        let count = READ_CHUNK_BLOCKS.min(blocks - first);
        let data = conn
            .read(
                first * BLOCK_BYTES as u64,
                (count as usize * BLOCK_BYTES) as u32,
            )
            .unwrap_or_else(|error| {
                panic!(
                    "read blocks {first}+{count} from {}: {error}",
                    socket.display()
                )
            });
        region.extend_from_slice(&data);
        first += count;
    }
    conn.disconnect();
    region
}

/// Every violation of the model in `region` (read back after a round whose writes are
/// `records`; `baseline` is the same blocks before the round), one line per block. The crash
/// rule: every write whose completion a client saw must survive.
pub fn verify_region(
    region: &[u8],
    baseline: &[u8],
    records: &HashMap<u64, WriteRecord>,
    stamp: &impl Stamp,
) -> Vec<String> {
    verify_region_with(region, baseline, records, stamp, "completed", |record| {
        record.completed_at.is_some()
    })
}

/// Like [`verify_region`] with the power-loss rule: only writes made durable must survive. A
/// write is durable when it completed with FUA, or completed before a FLUSH was issued that
/// completed (Ferry advertises multi-connection consistency, so a FLUSH on any connection
/// covers the writes completed on every connection).
pub fn verify_region_after_power_loss(
    region: &[u8],
    baseline: &[u8],
    records: &HashMap<u64, WriteRecord>,
    flushes: &[FlushRecord],
    stamp: &impl Stamp,
) -> Vec<String> {
    let last_flush_issued_at = flushes
        .iter()
        .filter(|flush| flush.completed_at.is_some())
        .map(|flush| flush.issued_at)
        .max();
    verify_region_with(
        region,
        baseline,
        records,
        stamp,
        "was made durable",
        |record| {
            record.completed_at.is_some_and(|completed_at| {
                record.fua || last_flush_issued_at.is_some_and(|issued_at| issued_at > completed_at)
            })
        },
    )
}

/// The check shared by both rules: `must_survive` says which writes a block must not lose;
/// `why` names it in violation messages.
fn verify_region_with(
    region: &[u8],
    baseline: &[u8],
    records: &HashMap<u64, WriteRecord>,
    stamp: &impl Stamp,
    why: &str,
    must_survive: impl Fn(&WriteRecord) -> bool,
) -> Vec<String> {
    assert_eq!(region.len(), baseline.len(), "region and baseline sizes");
    let mut per_block: HashMap<u64, Vec<(u64, &WriteRecord)>> = HashMap::new();
    for (id, record) in records {
        for block in record.first_block..record.first_block + record.block_count {
            per_block.entry(block).or_default().push((*id, record));
        }
    }
    let mut violations = Vec::new();
    for block in 0..(region.len() / BLOCK_BYTES) as u64 {
        let range = block as usize * BLOCK_BYTES..(block as usize + 1) * BLOCK_BYTES;
        let writers_of_block = per_block.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        if let Err(violation) = check_block(
            block,
            &region[range.clone()],
            &baseline[range],
            writers_of_block,
            stamp,
            why,
            &must_survive,
        ) {
            violations.push(violation);
        }
    }
    violations
}

/// Checks one block against the model; returns a description of the violation if any. A block
/// may hold write W unless some write W' to it that must survive was issued after W completed;
/// it may hold its pre-round contents unless some write to it must survive.
fn check_block(
    block: u64,
    actual: &[u8],
    baseline: &[u8],
    writers_of_block: &[(u64, &WriteRecord)],
    stamp: &impl Stamp,
    why: &str,
    must_survive: &impl Fn(&WriteRecord) -> bool,
) -> Result<(), String> {
    let latest_surviving = writers_of_block
        .iter()
        .filter(|(_, record)| must_survive(record))
        .filter_map(|(id, record)| record.completed_at.map(|at| (at, *id, record.fua)))
        .max();
    if actual == baseline {
        if let Some((at, id, fua)) = latest_surviving {
            return Err(format!(
                "block {block}: holds its pre-round contents, but write {id:#x} (fua {fua}, \
                 completed at {at}) {why}"
            ));
        }
        return Ok(());
    }
    let Some(id) = stamp.write_of(block, actual) else {
        return Err(format!(
            "block {block}: contents from no write of this round to this block; {}",
            stamp.describe(actual, baseline)
        ));
    };
    let Some((_, record)) = writers_of_block
        .iter()
        .find(|(candidate, _)| *candidate == id)
    else {
        return Err(format!(
            "block {block}: stamped by write {id:#x}, which never wrote this block; {}",
            stamp.describe(actual, baseline)
        ));
    };
    if actual != stamp.contents(id, block).as_slice() {
        return Err(format!(
            "block {block}: write {id:#x} is there but torn or mixed; {}",
            stamp.describe(actual, baseline)
        ));
    }
    if let Some(completed_at) = record.completed_at {
        if let Some((newer_id, newer)) = writers_of_block
            .iter()
            .find(|(_, other)| other.issued_at > completed_at && must_survive(other))
        {
            return Err(format!(
                "block {block}: holds write {id:#x} (completed at {completed_at}), but write \
                 {newer_id:#x} issued at {} after that, completed at {:?} (fua {}), {why} and \
                 is lost",
                newer.issued_at, newer.completed_at, newer.fua
            ));
        }
    }
    Ok(())
}
