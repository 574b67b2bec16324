//! Tests of every storage backend: one contract check run against all of them, the
//! differential test (io_uring against pread/pwrite against a `Vec<u8>` model), io_uring
//! concurrency and cancellation, and the fault model of [`FaultDisk`].
//!
//! Randomized tests print their seed; replay one with `FERRY_SEED=<seed>`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;

const BLOCK_BYTES: usize = 4096;

fn seed_from_env(test: &str) -> u64 {
    let seed = match std::env::var("FERRY_SEED") {
        Ok(text) => text.parse().expect("FERRY_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed {seed} (replay with FERRY_SEED={seed})");
    seed
}

fn shared(data: &[u8]) -> SharedBuf {
    AlignedBuf::copy_from(data).freeze()
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

async fn read(storage: &dyn Storage, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let (result, buf) = storage.read_at(offset, AlignedBuf::zeroed(len)).await;
    assert_eq!(
        buf.len(),
        len,
        "read_at hands back a buffer of the same length"
    );
    result.map(|()| buf.to_vec())
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Mem,
    Fault,
    Posix { direct: bool },
    Uring { direct: bool },
}

impl Backend {
    const ALL: [Backend; 6] = [
        Backend::Mem,
        Backend::Fault,
        Backend::Posix { direct: false },
        Backend::Posix { direct: true },
        Backend::Uring { direct: false },
        Backend::Uring { direct: true },
    ];

    fn direct(self) -> bool {
        matches!(
            self,
            Backend::Posix { direct: true } | Backend::Uring { direct: true }
        )
    }

    /// The file a file-backed backend uses in `dir`.
    fn path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{self:?}").replace([' ', '{', '}', ':'], ""))
    }

    fn open(self, dir: &Path, len_bytes: u64) -> Arc<dyn Storage> {
        let path = self.path(dir);
        let opts = OpenOptions {
            direct: self.direct(),
            create_len_bytes: Some(len_bytes),
        };
        match self {
            Backend::Mem => MemStorage::new(len_bytes),
            Backend::Fault => FaultDisk::new(len_bytes).storage(),
            Backend::Posix { .. } => open_posix(&path, &opts).expect("open posix"),
            Backend::Uring { .. } => open_uring(&path, &opts).expect("open io_uring"),
        }
    }
}

/// The behaviour every backend shares. With `direct`, only block-aligned I/O is used.
async fn check_contract(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let len_bytes: u64 = 1 << 20;
    let storage = backend.open(dir.path(), len_bytes);
    let context = format!("{backend:?}");
    assert_eq!(storage.len_bytes(), len_bytes, "{context}");
    assert_eq!(
        read(&*storage, 0, 3 * BLOCK_BYTES).await.unwrap(),
        vec![0; 3 * BLOCK_BYTES],
        "{context}"
    );

    // A vectored write of three buffers, one of them a sub-slice, read back whole.
    let (a, b, c) = (
        pattern(1, BLOCK_BYTES),
        pattern(2, 2 * BLOCK_BYTES),
        pattern(3, BLOCK_BYTES),
    );
    let b_full = shared(&[pattern(9, BLOCK_BYTES), b.clone()].concat());
    storage
        .write_at(
            8192,
            vec![
                shared(&a),
                b_full.slice(BLOCK_BYTES..3 * BLOCK_BYTES),
                shared(&c),
            ],
            false,
        )
        .await
        .unwrap();
    let expected = [a.clone(), b.clone(), c.clone()].concat();
    assert_eq!(
        read(&*storage, 8192, expected.len()).await.unwrap(),
        expected,
        "{context}"
    );

    // dsync and sync succeed and change nothing visible.
    storage
        .write_at(0, vec![shared(&pattern(4, BLOCK_BYTES))], true)
        .await
        .unwrap();
    storage.sync().await.unwrap();
    assert_eq!(
        read(&*storage, 0, BLOCK_BYTES).await.unwrap(),
        pattern(4, BLOCK_BYTES),
        "{context}"
    );

    // An empty write is a no-op.
    storage.write_at(0, vec![], false).await.unwrap();
    storage.write_at(0, vec![shared(&[])], true).await.unwrap();

    // zero_range, punching and not, leaves the neighbours alone.
    for punch in [false, true] {
        storage
            .write_at(65536, vec![shared(&pattern(5, 3 * BLOCK_BYTES))], false)
            .await
            .unwrap();
        storage
            .zero_range(65536 + BLOCK_BYTES as u64, BLOCK_BYTES as u64, punch)
            .await
            .unwrap();
        let got = read(&*storage, 65536, 3 * BLOCK_BYTES).await.unwrap();
        let mut expected = pattern(5, 3 * BLOCK_BYTES);
        expected[BLOCK_BYTES..2 * BLOCK_BYTES].fill(0);
        assert_eq!(got, expected, "{context} punch={punch}");
    }
    storage.zero_range(0, 0, true).await.unwrap();

    // The last block is usable; one byte further is not.
    let last = len_bytes - BLOCK_BYTES as u64;
    storage
        .write_at(last, vec![shared(&pattern(6, BLOCK_BYTES))], false)
        .await
        .unwrap();
    assert_eq!(
        read(&*storage, last, BLOCK_BYTES).await.unwrap(),
        pattern(6, BLOCK_BYTES),
        "{context}"
    );
    let past_end = read(&*storage, len_bytes, BLOCK_BYTES).await.unwrap_err();
    assert_eq!(past_end.kind(), io::ErrorKind::UnexpectedEof, "{context}");
    let straddling = read(&*storage, last, 2 * BLOCK_BYTES).await.unwrap_err();
    assert_eq!(straddling.kind(), io::ErrorKind::UnexpectedEof, "{context}");
    let write_past = storage
        .write_at(last, vec![shared(&pattern(7, 2 * BLOCK_BYTES))], false)
        .await
        .unwrap_err();
    assert_eq!(write_past.kind(), io::ErrorKind::InvalidInput, "{context}");
    let zero_past = storage
        .zero_range(last, 2 * BLOCK_BYTES as u64, false)
        .await
        .unwrap_err();
    assert_eq!(zero_past.kind(), io::ErrorKind::InvalidInput, "{context}");
    let overflow = storage
        .write_at(u64::MAX, vec![shared(&[1])], false)
        .await
        .unwrap_err();
    assert_eq!(overflow.kind(), io::ErrorKind::InvalidInput, "{context}");
    assert_eq!(
        read(&*storage, last, BLOCK_BYTES).await.unwrap(),
        pattern(6, BLOCK_BYTES),
        "{context}"
    );

    if !backend.direct() {
        // Odd sizes and offsets, and a read spanning several writes.
        storage
            .write_at(
                5,
                vec![shared(b"abc"), shared(&[]), shared(&pattern(8, 1000))],
                false,
            )
            .await
            .unwrap();
        storage.zero_range(7, 2, false).await.unwrap();
        let got = read(&*storage, 3, 1010).await.unwrap();
        let block = pattern(4, BLOCK_BYTES);
        let expected = [
            &block[3..5],
            b"ab",
            &[0, 0],
            &pattern(8, 1000)[1..],
            &block[1008..1013],
        ]
        .concat();
        assert_eq!(got, expected, "{context}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_keeps_the_contract() {
    for backend in Backend::ALL {
        check_contract(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_buffers_than_iov_max_are_written_in_several_calls() {
    let dir = tempfile::tempdir().unwrap();
    for backend in [
        Backend::Posix { direct: true },
        Backend::Uring { direct: true },
        Backend::Uring { direct: false },
    ] {
        let storage = backend.open(dir.path(), 16 << 20);
        let buffer_count = 2500;
        let bufs: Vec<Vec<u8>> = (0..buffer_count)
            .map(|i| pattern(i as u8, BLOCK_BYTES))
            .collect();
        let shared_bufs = bufs.iter().map(|data| shared(data)).collect();
        storage
            .write_at(BLOCK_BYTES as u64, shared_bufs, false)
            .await
            .unwrap();
        let got = read(&*storage, BLOCK_BYTES as u64, buffer_count * BLOCK_BYTES)
            .await
            .unwrap();
        assert!(got == bufs.concat(), "{backend:?}");
    }
}

#[tokio::test]
async fn opening_creates_reopens_and_refuses_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume");
    let missing = open(
        &path,
        &OpenOptions {
            direct: true,
            create_len_bytes: None,
        },
    )
    .err()
    .unwrap();
    assert_eq!(missing.kind(), io::ErrorKind::NotFound);

    let storage = open(
        &path,
        &OpenOptions {
            direct: true,
            create_len_bytes: Some(1 << 20),
        },
    )
    .unwrap();
    assert_eq!(storage.len_bytes(), 1 << 20);
    storage
        .write_at(4096, vec![shared(&pattern(1, BLOCK_BYTES))], true)
        .await
        .unwrap();
    drop(storage);
    // Created with its blocks reserved (ext4 and tmpfs preallocate), so that applying writes
    // later cannot fail with ENOSPC.
    let metadata = std::fs::metadata(&path).unwrap();
    assert!(std::os::unix::fs::MetadataExt::blocks(&metadata) * 512 >= 1 << 20);

    // An existing file keeps its size and contents, whatever create_len_bytes says.
    let storage = open_posix(
        &path,
        &OpenOptions {
            direct: false,
            create_len_bytes: Some(1 << 30),
        },
    )
    .unwrap();
    assert_eq!(storage.len_bytes(), 1 << 20);
    assert_eq!(
        read(&*storage, 4096, BLOCK_BYTES).await.unwrap(),
        pattern(1, BLOCK_BYTES)
    );

    let not_a_file = open_posix(dir.path(), &OpenOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            not_a_file.kind(),
            io::ErrorKind::InvalidInput | io::ErrorKind::IsADirectory
        ),
        "{not_a_file}"
    );
}

#[test]
fn opening_io_uring_outside_a_runtime_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        direct: false,
        create_len_bytes: Some(4096),
    };
    assert!(open_uring(&dir.path().join("f"), &opts).is_err());
}

/// A file shrunk behind the storage's back: the read gets what exists (a short read whose
/// rest is resubmitted), then end of file, reported as UnexpectedEof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_resubmit_short_reads_and_report_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    for backend in [
        Backend::Posix { direct: false },
        Backend::Uring { direct: false },
    ] {
        let storage = backend.open(dir.path(), 3 * BLOCK_BYTES as u64);
        storage
            .write_at(0, vec![shared(&pattern(1, 3 * BLOCK_BYTES))], false)
            .await
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(backend.path(dir.path()))
            .unwrap()
            .set_len(BLOCK_BYTES as u64 + 100)
            .unwrap();
        let (result, buf) = storage
            .read_at(0, AlignedBuf::zeroed(2 * BLOCK_BYTES))
            .await;
        assert_eq!(
            result.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "{backend:?}"
        );
        assert_eq!(
            buf[..BLOCK_BYTES + 100],
            pattern(1, 3 * BLOCK_BYTES)[..BLOCK_BYTES + 100],
            "{backend:?}"
        );
        assert_eq!(
            read(&*storage, 0, BLOCK_BYTES).await.unwrap(),
            pattern(1, BLOCK_BYTES),
            "{backend:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Differential test: io_uring vs pread/pwrite vs a Vec<u8> model.

const DIFFERENTIAL_FILE_BYTES: usize = 8 << 20;
const DIFFERENTIAL_IO_BYTES_MAX: usize = 256 << 10;

/// A random block-aligned range of at most `DIFFERENTIAL_IO_BYTES_MAX` bytes inside the file.
fn random_range(rng: &mut StdRng) -> (u64, usize) {
    let len = rng.random_range(1..=DIFFERENTIAL_IO_BYTES_MAX / BLOCK_BYTES) * BLOCK_BYTES;
    let offset = rng.random_range(0..=(DIFFERENTIAL_FILE_BYTES - len) / BLOCK_BYTES) * BLOCK_BYTES;
    (offset as u64, len)
}

async fn run_differential(seed: u64, op_count: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        direct: true,
        create_len_bytes: Some(DIFFERENTIAL_FILE_BYTES as u64),
    };
    let uring_path = dir.path().join("uring");
    let posix_path = dir.path().join("posix");
    let uring = open_uring(&uring_path, &opts).unwrap();
    let posix = open_posix(&posix_path, &opts).unwrap();
    let mut model = vec![0u8; DIFFERENTIAL_FILE_BYTES];

    for step in 0..op_count {
        let context = format!("seed {seed} step {step}");
        match rng.random_range(0..100) {
            0..=49 => {
                let (offset, len) = random_range(&mut rng);
                let mut data = AlignedBuf::zeroed(len);
                rng.fill(&mut data[..]);
                let data = data.freeze();
                // Cut into 1-4 block-aligned pieces.
                let blocks = len / BLOCK_BYTES;
                let piece_count = rng.random_range(1..=4usize).min(blocks);
                let mut cuts: Vec<usize> = (1..blocks).collect();
                for i in (1..cuts.len()).rev() {
                    cuts.swap(i, rng.random_range(0..=i));
                }
                let mut cuts: Vec<usize> = cuts
                    .into_iter()
                    .take(piece_count - 1)
                    .map(|b| b * BLOCK_BYTES)
                    .collect();
                cuts.sort_unstable();
                let mut bufs = Vec::new();
                let mut start = 0;
                for cut in cuts.into_iter().chain([len]) {
                    bufs.push(data.slice(start..cut));
                    start = cut;
                }
                let dsync = rng.random_bool(0.2);
                let (a, b) = tokio::join!(
                    uring.write_at(offset, bufs.clone(), dsync),
                    posix.write_at(offset, bufs, dsync)
                );
                a.unwrap_or_else(|e| panic!("{context}: io_uring write: {e}"));
                b.unwrap_or_else(|e| panic!("{context}: posix write: {e}"));
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            50..=64 => {
                let (offset, len) = random_range(&mut rng);
                let punch = rng.random_bool(0.5);
                let (a, b) = tokio::join!(
                    uring.zero_range(offset, len as u64, punch),
                    posix.zero_range(offset, len as u64, punch)
                );
                a.unwrap_or_else(|e| panic!("{context}: io_uring zero_range: {e}"));
                b.unwrap_or_else(|e| panic!("{context}: posix zero_range: {e}"));
                model[offset as usize..offset as usize + len].fill(0);
            }
            65..=74 => {
                let (a, b) = tokio::join!(uring.sync(), posix.sync());
                a.unwrap_or_else(|e| panic!("{context}: io_uring sync: {e}"));
                b.unwrap_or_else(|e| panic!("{context}: posix sync: {e}"));
            }
            _ => {
                let (offset, len) = random_range(&mut rng);
                let (a, b) = tokio::join!(read(&*uring, offset, len), read(&*posix, offset, len));
                let a = a.unwrap_or_else(|e| panic!("{context}: io_uring read: {e}"));
                let b = b.unwrap_or_else(|e| panic!("{context}: posix read: {e}"));
                let expected = &model[offset as usize..offset as usize + len];
                assert!(
                    a == expected,
                    "{context}: io_uring read at {offset}+{len} differs from the model"
                );
                assert!(
                    b == expected,
                    "{context}: posix read at {offset}+{len} differs from the model"
                );
            }
        }
    }
    let (a, b) = tokio::join!(uring.sync(), posix.sync());
    a.unwrap();
    b.unwrap();
    drop((uring, posix));
    let uring_bytes = std::fs::read(&uring_path).unwrap();
    let posix_bytes = std::fs::read(&posix_path).unwrap();
    assert_eq!(
        uring_bytes.len(),
        DIFFERENTIAL_FILE_BYTES,
        "seed {seed}: io_uring file changed size"
    );
    assert_eq!(
        posix_bytes.len(),
        DIFFERENTIAL_FILE_BYTES,
        "seed {seed}: posix file changed size"
    );
    assert!(
        uring_bytes == posix_bytes,
        "seed {seed}: io_uring and posix files differ"
    );
    assert!(
        uring_bytes == model,
        "seed {seed}: files differ from the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_io_uring_vs_posix_vs_model() {
    // FERRY_SLOW_TESTS runs a longer sequence.
    let op_count = if std::env::var_os("FERRY_SLOW_TESTS").is_some() {
        5000
    } else {
        400
    };
    run_differential(
        seed_from_env("differential_io_uring_vs_posix_vs_model"),
        op_count,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// io_uring specifics.

/// Many operations in flight at once, more than the ring holds, completing out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_handles_many_concurrent_operations() {
    let dir = tempfile::tempdir().unwrap();
    let block_count: usize = 600; // More than the queue depth, so some tasks wait for a permit.
    let opts = OpenOptions {
        direct: true,
        create_len_bytes: Some((block_count * BLOCK_BYTES) as u64),
    };
    let storage = open_uring(&dir.path().join("f"), &opts).unwrap();

    for round in 0..3u8 {
        let mut tasks = tokio::task::JoinSet::new();
        for block in 0..block_count {
            let storage = Arc::clone(&storage);
            tasks.spawn(async move {
                let data = shared(&pattern(block as u8 ^ round, BLOCK_BYTES));
                storage
                    .write_at((block * BLOCK_BYTES) as u64, vec![data], block % 7 == 0)
                    .await
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap().unwrap();
        }
        let mut tasks = tokio::task::JoinSet::new();
        for block in 0..block_count {
            let storage = Arc::clone(&storage);
            tasks.spawn(async move {
                let got = read(&*storage, (block * BLOCK_BYTES) as u64, BLOCK_BYTES)
                    .await
                    .unwrap();
                assert_eq!(
                    got,
                    pattern(block as u8 ^ round, BLOCK_BYTES),
                    "round {round} block {block}"
                );
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap();
        }
        storage.sync().await.unwrap();
    }
}

/// Polls `future` once, then drops it: the operation is in flight when the caller gives up.
async fn poll_once_then_drop<F: Future + Unpin>(mut future: F) {
    std::future::poll_fn(|context| {
        let _ = std::pin::Pin::new(&mut future).poll(context);
        Poll::Ready(())
    })
    .await;
    drop(future);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_survives_futures_dropped_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let len_bytes: usize = 32 << 20;
    let opts = OpenOptions {
        direct: true,
        create_len_bytes: Some(len_bytes as u64),
    };
    let storage = open_uring(&dir.path().join("f"), &opts).unwrap();

    // Large operations so they are still in flight when dropped. The only reference to each
    // buffer is the one given to the storage.
    for round in 0..8u8 {
        let data = AlignedBuf::copy_from(&pattern(round, 8 << 20)).freeze();
        poll_once_then_drop(storage.write_at(0, vec![data], round % 2 == 0)).await;
        poll_once_then_drop(storage.read_at(8 << 20, AlignedBuf::zeroed(8 << 20))).await;
        poll_once_then_drop(storage.sync()).await;
    }
    // The storage still works. (Elsewhere: the abandoned operations may still be running.)
    storage
        .write_at(24 << 20, vec![shared(&pattern(99, 8 << 20))], true)
        .await
        .unwrap();
    assert_eq!(
        read(&*storage, 24 << 20, 8 << 20).await.unwrap(),
        pattern(99, 8 << 20)
    );

    // Dropping the storage with operations in flight must not free their buffers early.
    poll_once_then_drop(storage.write_at(16 << 20, vec![shared(&pattern(7, 8 << 20))], false))
        .await;
    drop(storage);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

// ---------------------------------------------------------------------------------------------
// FaultDisk.

#[tokio::test]
async fn fault_disk_fails_the_nth_write_without_changing_anything() {
    let disk = FaultDisk::new(1 << 16);
    let storage = disk.storage();
    disk.set_fail_write(2);
    storage
        .write_at(0, vec![shared(&[1; 512])], false)
        .await
        .unwrap();
    let failed = storage
        .write_at(512, vec![shared(&[2; 512])], false)
        .await
        .unwrap_err();
    assert_eq!(failed.raw_os_error(), Some(libc::EIO));
    storage
        .write_at(1024, vec![shared(&[3; 512])], false)
        .await
        .unwrap();
    assert_eq!(disk.write_count(), 3);
    let got = read(&*storage, 0, 1536).await.unwrap();
    assert_eq!(got, [vec![1; 512], vec![0; 512], vec![3; 512]].concat());
    // zero_range counts as a write too.
    disk.set_fail_write(1);
    assert!(storage.zero_range(0, 512, true).await.is_err());
    assert_eq!(read(&*storage, 0, 512).await.unwrap(), vec![1; 512]);
}

#[tokio::test]
async fn fault_disk_tears_the_nth_write_and_kills_the_process() {
    let disk = FaultDisk::new(1 << 16);
    let storage = disk.storage();
    disk.set_tear_write(1, 1000);
    let torn = storage
        .write_at(0, vec![shared(&[7; 600]), shared(&[8; 600])], false)
        .await
        .unwrap_err();
    assert_eq!(torn.raw_os_error(), Some(libc::EIO));
    // The dead process can do nothing more.
    assert!(read(&*storage, 0, 512).await.is_err());
    assert!(storage
        .write_at(0, vec![shared(&[1])], false)
        .await
        .is_err());
    assert!(storage.sync().await.is_err());
    // The next boot sees the torn prefix in the cache; it was never synced.
    let rebooted = disk.storage();
    let got = read(&*rebooted, 0, 1200).await.unwrap();
    assert_eq!(got, [vec![7; 600], vec![8; 400], vec![0; 200]].concat());
    assert_eq!(disk.durable_image()[..1200], [0; 1200]);
}

#[tokio::test]
async fn fault_disk_fails_the_nth_sync_and_keeps_the_data_unsynced() {
    let disk = FaultDisk::new(1 << 16);
    let storage = disk.storage();
    storage
        .write_at(0, vec![shared(&[5; 512])], false)
        .await
        .unwrap();
    disk.set_fail_sync(1);
    let failed = storage.sync().await.unwrap_err();
    assert_eq!(failed.raw_os_error(), Some(libc::EIO));
    assert_eq!(disk.durable_image()[..512], [0; 512]);
    storage.sync().await.unwrap();
    assert_eq!(disk.durable_image()[..512], [5; 512]);
    assert_eq!(disk.sync_count(), 2);
}

#[tokio::test]
async fn fault_disk_process_crash_keeps_the_page_cache() {
    let disk = FaultDisk::new(1 << 16);
    let storage = disk.storage();
    storage
        .write_at(0, vec![shared(&[1; 512])], false)
        .await
        .unwrap();
    storage.sync().await.unwrap();
    storage
        .write_at(512, vec![shared(&[2; 512])], false)
        .await
        .unwrap();
    disk.crash_process();
    assert_eq!(
        read(&*storage, 0, 512).await.unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(storage
        .write_at(0, vec![shared(&[9; 512])], false)
        .await
        .is_err());
    let rebooted = disk.storage();
    assert_eq!(
        read(&*rebooted, 0, 1024).await.unwrap(),
        [vec![1; 512], vec![2; 512]].concat()
    );
    // Unsynced, so a power loss may still take it away.
    assert_eq!(
        disk.durable_image()[..1024],
        [vec![1; 512], vec![0; 512]].concat()[..]
    );
}

/// Builds the same history on a fresh disk: a synced base, then unsynced and dsync writes.
async fn power_loss_history() -> FaultDisk {
    let disk = FaultDisk::new(1 << 16);
    let storage = disk.storage();
    storage
        .write_at(0, vec![shared(&[1; 1 << 16])], false)
        .await
        .unwrap();
    storage.sync().await.unwrap();
    // 64 sectors written once, unsynced, and an unaligned write over two of them.
    storage
        .write_at(0, vec![shared(&[2; 64 * 512])], false)
        .await
        .unwrap();
    storage
        .write_at(700, vec![shared(&[3; 512])], false)
        .await
        .unwrap();
    // A dsync write over sectors 10..12, then an unsynced one over sector 11.
    storage
        .write_at(10 * 512, vec![shared(&[4; 1024])], true)
        .await
        .unwrap();
    storage
        .write_at(11 * 512, vec![shared(&[5; 512])], false)
        .await
        .unwrap();
    disk
}

#[tokio::test]
async fn fault_disk_power_loss_keeps_whole_sectors_and_dsync_writes() {
    let seed = seed_from_env("fault_disk_power_loss_keeps_whole_sectors_and_dsync_writes");
    let mut survived_sectors = 0;
    let mut lost_sectors = 0;
    for round in 0..8 {
        let seed = seed.wrapping_add(round);
        let disk = power_loss_history().await;
        let old_handle = disk.storage();
        disk.power_loss(seed);
        assert!(
            read(&*old_handle, 0, 512).await.is_err(),
            "seed {seed}: old handles die"
        );
        let image = read(&*disk.storage(), 0, 1 << 16).await.unwrap();
        assert!(
            image == disk.durable_image(),
            "seed {seed}: after power loss everything is durable"
        );

        let sector = |n: usize| &image[n * 512..(n + 1) * 512];
        for n in (0..64).filter(|n| ![1, 2, 10, 11].contains(n)) {
            if sector(n) == [2; 512] {
                survived_sectors += 1;
            } else {
                assert_eq!(
                    sector(n),
                    [1; 512],
                    "seed {seed}: sector {n} is all old or all new"
                );
                lost_sectors += 1;
            }
        }
        // Sectors 1 and 2: old, after the first write, or after both.
        let after_first = [2u8; 512];
        let mut after_both_1 = [2u8; 512];
        after_both_1[700 - 512..].fill(3);
        let mut after_both_2 = [2u8; 512];
        after_both_2[..700 + 512 - 1024].fill(3);
        assert!(
            [[1u8; 512], after_first, after_both_1]
                .iter()
                .any(|s| s == sector(1)),
            "seed {seed}"
        );
        assert!(
            [[1u8; 512], after_first, after_both_2]
                .iter()
                .any(|s| s == sector(2)),
            "seed {seed}"
        );
        // The dsync write always survives; the unsynced write after it may or may not.
        assert_eq!(sector(10), [4; 512], "seed {seed}");
        assert!(
            sector(11) == [4; 512] || sector(11) == [5; 512],
            "seed {seed}"
        );
        // Sectors the log never touched are untouched.
        assert!(image[64 * 512..].iter().all(|&b| b == 1), "seed {seed}");

        // The same seed gives the same outcome.
        let again = power_loss_history().await;
        again.power_loss(seed);
        assert!(
            again.durable_image() == image,
            "seed {seed}: power loss is deterministic"
        );
    }
    // 8 rounds of 60 independent coin flips: both outcomes show up.
    assert!(
        survived_sectors > 0 && lost_sectors > 0,
        "seed {seed}: {survived_sectors} survived, {lost_sectors} lost"
    );
}

#[tokio::test]
async fn fault_disk_without_faults_keeps_the_contract() {
    check_contract(Backend::Fault).await;
    check_contract(Backend::Mem).await;
    let memory = MemStorage::new(8192);
    memory
        .write_at(4096, vec![shared(&[1; 4096])], false)
        .await
        .unwrap();
    assert_eq!(memory.snapshot(), [vec![0; 4096], vec![1; 4096]].concat());
}

#[test]
fn o_direct_is_in_effect_where_the_filesystem_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let opened = file::open_file(
        &dir.path().join("f"),
        &OpenOptions {
            direct: true,
            create_len_bytes: Some(4096),
        },
        SECTOR_BYTES,
    )
    .unwrap();
    // /tmp is ext4 on the project's machines; elsewhere (tmpfs before Linux 6.6) the fallback
    // to buffered I/O is what is being exercised.
    eprintln!(
        "O_DIRECT in effect in {}: {}",
        dir.path().display(),
        opened.direct
    );
    let opened = file::open_file(
        &dir.path().join("f"),
        &OpenOptions {
            direct: false,
            create_len_bytes: None,
        },
        SECTOR_BYTES,
    )
    .unwrap();
    assert!(!opened.direct);
    assert!(!opened.is_block_device);
    assert_eq!(opened.len_bytes, 4096);
}

#[test]
fn o_direct_only_where_the_alignment_is_known_and_met() {
    use file::{direct_decision, DioAlignment, DirectDecision};
    let known = |offset_bytes, memory_bytes| DioAlignment::Known {
        offset_bytes,
        memory_bytes,
    };
    let journal = DIRECT_ALIGN as u64;
    let cases = [
        // A 512-byte device or filesystem: fits the volume's 512-byte I/O and the journal.
        (known(512, 512), SECTOR_BYTES, DirectDecision::Direct),
        (known(512, 4), journal, DirectDecision::Direct),
        // A 4Kn device: the volume's 512-byte requests would get EINVAL; the journal fits.
        (known(4096, 512), SECTOR_BYTES, DirectDecision::Buffered),
        (known(4096, 512), journal, DirectDecision::Direct),
        // Buffers must be aligned to more than Ferry's.
        (known(512, 4096), SECTOR_BYTES, DirectDecision::Buffered),
        (known(8192, 512), journal, DirectDecision::Buffered),
        // statx says direct I/O is not supported (alignment 0).
        (DioAlignment::Unsupported, journal, DirectDecision::Buffered),
        // The kernel does not say: a device stays buffered, a journal is probed.
        (
            DioAlignment::Unknown,
            SECTOR_BYTES,
            DirectDecision::Buffered,
        ),
        (DioAlignment::Unknown, journal, DirectDecision::Probe),
    ];
    for (alignment, io_align_bytes, expected) in cases {
        assert_eq!(
            direct_decision(alignment, io_align_bytes),
            expected,
            "{alignment:?} with {io_align_bytes}-byte I/O"
        );
    }
}

#[test]
fn ranges_split_at_logical_blocks() {
    let cases = [
        // (offset, len, block) -> head, middle, tail
        ((512, 1024, 4096), ((512, 1024), (1536, 0), (1536, 0))),
        ((0, 8192, 4096), ((0, 0), (0, 8192), (8192, 0))),
        ((512, 8192, 4096), ((512, 3584), (4096, 4096), (8192, 512))),
        ((4096, 4608, 4096), ((4096, 0), (4096, 4096), (8192, 512))),
        ((3584, 1024, 4096), ((3584, 1024), (4608, 0), (4608, 0))),
        ((512, 512, 512), ((512, 0), (512, 512), (1024, 0))),
    ];
    for ((offset, len, block), expected) in cases {
        let split = split_at_blocks(offset, len, block);
        assert_eq!(
            split, expected,
            "{len} bytes at {offset} in {block}-byte blocks"
        );
        let ((_, head), (_, middle), (_, tail)) = split;
        assert_eq!(head + middle + tail, len);
    }
}

#[tokio::test]
async fn zeroing_takes_any_sector_range_on_a_4k_device() {
    let disk = FaultDisk::with_logical_block_bytes(64 << 10, 4096);
    let storage = disk.storage();
    storage
        .write_at(0, vec![shared(&[0xab; 16 << 10])], false)
        .await
        .unwrap();
    // What the kernel says to a sub-block fallocate or BLKZEROOUT on such a device.
    let refused = storage.zero_range(512, 1024, true).await.unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EINVAL));
    for (offset, len) in [(512, 1024), (3584, 5120), (12288, 512)] {
        zero(&*storage, offset, len, true).await.unwrap();
    }
    let got = read(&*storage, 0, 16 << 10).await.unwrap();
    let mut expected = vec![0xab; 16 << 10];
    for (offset, len) in [(512, 1024), (3584, 5120), (12288, 512)] {
        expected[offset..offset + len].fill(0);
    }
    assert_eq!(got, expected);
}
