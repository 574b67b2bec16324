//! `VOLUME.meta`: where a copy keeps its [`Meta`] (role, lineage, consistency, what it knows of
//! each peer, a pending split-brain resolution). The contents are `ferry_protocol`'s; this
//! module only stores them, atomically and durably, through [`Storage`] (so power-loss and
//! torn-write tests cover it).
//!
//! # File format
//!
//! Two slots of [`SLOT_BYTES`], at offsets 0 and `SLOT_BYTES`. Each store writes the slot the
//! newest one is not in, then fdatasyncs:
//!
//! ```text
//!  0  magic      b"FERRYMT2"
//!  8  sequence   u64 LE, one more than the newest slot's
//! 16  length     u32 LE, bytes of the encoded meta that follow
//! 20  CRC-32     u32 LE (crc32fast) of bytes 0..20 and the encoded meta
//! 24  the encoded meta (`Meta::encode`), zero padding to a multiple of 512
//! ```
//!
//! A torn or failed store leaves its slot failing the CRC (or an older valid sequence), and the
//! other slot still holds the previous meta, so a load always finds the newest *completed*
//! store. A meta is only relied on once its store returned, so losing a torn one loses nothing
//! promised. A file whose two slots are both invalid is refused with the path and what to do,
//! never silently reset: a reset would forget the lineage that split-brain detection rests on.
//!
//! Earlier builds stored a JSON object here; it is read once and replaced by this format.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_protocol::generation::{GenerationEntry, GenerationInfo, Role};
use ferry_protocol::replication::Meta;
use serde::Deserialize;
use thiserror::Error;

use crate::datadir;
use crate::storage::{self, AlignedBuf, OpenOptions, Storage};

/// Bytes of one slot: room for the largest meta (64 generations and 64 peers of 255-byte
/// names take under 40 KiB).
pub const SLOT_BYTES: u64 = 64 << 10;
const MAGIC: [u8; 8] = *b"FERRYMT2";
const HEADER_BYTES: usize = 24;
const SECTOR_BYTES: usize = crate::usize_from(crate::storage::SECTOR_BYTES);

const _: () = assert!(SLOT_BYTES.is_multiple_of(crate::storage::SECTOR_BYTES));

#[derive(Debug, Error)]
pub enum MetaError {
    #[error("volume metadata {}: {reason}; restore it from a backup, or move it away to start this copy from the config's initial_role (it will then be resynced in full)", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("volume metadata {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The open `VOLUME.meta` of one volume.
pub struct MetaFile {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    /// The sequence number of the newest slot.
    sequence: AtomicU64,
}

impl std::fmt::Debug for MetaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaFile")
            .field("path", &self.path)
            .finish()
    }
}

impl MetaFile {
    /// Opens the meta at `path` and loads it, or creates it holding `initial()` when there is
    /// none (a first start).
    pub async fn open_or_create(
        path: &Path,
        initial: impl FnOnce() -> Meta,
    ) -> Result<(MetaFile, Meta), MetaError> {
        let io_error = |source| MetaError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| MetaError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) if bytes.first() == Some(&b'{') => {
                let meta = from_json(&bytes).map_err(corrupt)?;
                create(path, &meta).await.map_err(io_error)?;
                tracing::info!(path = %path.display(), "volume metadata converted from JSON");
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                create(path, &initial()).await.map_err(io_error)?;
            }
            Err(error) => return Err(io_error(error)),
        }
        let storage = storage::open(
            path,
            &OpenOptions {
                direct: false,
                create_len_bytes: None,
            },
        )
        .map_err(io_error)?;
        if storage.len_bytes() != 2 * SLOT_BYTES {
            return Err(corrupt(format!(
                "the file has {} bytes, not {}",
                storage.len_bytes(),
                2 * SLOT_BYTES
            )));
        }
        let (result, buf) = storage
            .read_at(0, AlignedBuf::zeroed(2 * crate::usize_from(SLOT_BYTES)))
            .await;
        result.map_err(io_error)?;
        let slots = [
            decode_slot(&buf[..crate::usize_from(SLOT_BYTES)]),
            decode_slot(&buf[crate::usize_from(SLOT_BYTES)..]),
        ];
        let newest = match slots {
            [Ok(a), Ok(b)] => Some(if a.0 >= b.0 { a } else { b }),
            [Ok(a), Err(_)] | [Err(_), Ok(a)] => Some(a),
            [Err(a), Err(b)] => {
                return Err(corrupt(format!(
                    "neither slot holds a valid meta (first: {a}; second: {b})"
                )))
            }
        };
        let (sequence, meta) = newest.expect("one slot is valid");
        Ok((
            MetaFile {
                path: path.to_path_buf(),
                storage,
                sequence: AtomicU64::new(sequence),
            },
            meta,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores `meta` durably, in the slot the newest is not in. One store at a time.
    pub async fn store(&self, meta: &Meta) -> io::Result<()> {
        let sequence = self.sequence.load(Ordering::SeqCst) + 1;
        let slot = encode_slot(sequence, meta)?;
        let offset = (sequence % 2) * SLOT_BYTES;
        self.storage
            .write_at(offset, vec![AlignedBuf::copy_from(&slot).freeze()], false)
            .await?;
        self.storage.sync().await?;
        self.sequence.store(sequence, Ordering::SeqCst);
        Ok(())
    }
}

/// Writes a new file holding `meta` in its first slot (sequence 1 goes to slot 1, so the
/// first store after this one writes slot 0).
async fn create(path: &Path, meta: &Meta) -> io::Result<()> {
    let slot = encode_slot(1, meta)?;
    datadir::create_durably(path, |tmp| async move {
        let mut bytes = vec![0u8; 2 * crate::usize_from(SLOT_BYTES)];
        bytes[crate::usize_from(SLOT_BYTES)..crate::usize_from(SLOT_BYTES) + slot.len()]
            .copy_from_slice(&slot);
        std::fs::write(tmp, bytes)
    })
    .await
}

fn encode_slot(sequence: u64, meta: &Meta) -> io::Result<Vec<u8>> {
    let payload = meta
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    if HEADER_BYTES + payload.len() > crate::usize_from(SLOT_BYTES) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the meta encodes to {} bytes, more than a slot",
                payload.len()
            ),
        ));
    }
    let mut slot = Vec::with_capacity(crate::usize_from(SLOT_BYTES));
    slot.extend_from_slice(&MAGIC);
    slot.extend_from_slice(&sequence.to_le_bytes());
    slot.extend_from_slice(&u32::try_from(payload.len()).expect("checked").to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&slot[..20]);
    crc.update(&payload);
    slot.extend_from_slice(&crc.finalize().to_le_bytes());
    slot.extend_from_slice(&payload);
    slot.resize(slot.len().div_ceil(SECTOR_BYTES) * SECTOR_BYTES, 0);
    Ok(slot)
}

fn decode_slot(slot: &[u8]) -> Result<(u64, Meta), String> {
    if slot[..8] != MAGIC {
        return Err("no magic".into());
    }
    let sequence = u64::from_le_bytes(slot[8..16].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(slot[16..20].try_into().expect("4 bytes")) as usize;
    if HEADER_BYTES + len > slot.len() {
        return Err(format!("length {len} runs past the slot"));
    }
    let stored = u32::from_le_bytes(slot[20..24].try_into().expect("4 bytes"));
    let mut crc = crc32fast::Hasher::new();
    crc.update(&slot[..20]);
    crc.update(&slot[HEADER_BYTES..HEADER_BYTES + len]);
    if crc.finalize() != stored {
        return Err("CRC mismatch (a torn or corrupt store)".into());
    }
    let meta = Meta::decode(&slot[HEADER_BYTES..HEADER_BYTES + len]).map_err(|e| e.to_string())?;
    Ok((sequence, meta))
}

/// The JSON meta of earlier builds.
#[derive(Deserialize)]
struct JsonMeta {
    role: String,
    #[serde(default)]
    volume_id: u64,
    #[serde(default)]
    history: Vec<JsonGeneration>,
    #[serde(default = "yes")]
    consistent: bool,
}

#[derive(Deserialize)]
struct JsonGeneration {
    generation: u64,
    start_lsn: u64,
    promoted_by: String,
}

fn yes() -> bool {
    true
}

fn from_json(bytes: &[u8]) -> Result<Meta, String> {
    let old: JsonMeta = serde_json::from_slice(bytes).map_err(|e| format!("JSON: {e}"))?;
    let role = match old.role.as_str() {
        "primary" => Role::Primary,
        "secondary" => Role::Secondary,
        other => return Err(format!("unknown role {other:?}")),
    };
    let mut meta = Meta::empty(role);
    meta.consistent = old.consistent;
    meta.lineage = GenerationInfo {
        volume_id: old.volume_id,
        history: old
            .history
            .into_iter()
            .map(|g| GenerationEntry {
                generation: g.generation,
                start_lsn: g.start_lsn,
                promoted_by: g.promoted_by,
            })
            .collect(),
        head_lsn: 0,
    };
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::replication::PeerMeta;

    fn sample(role: Role) -> Meta {
        let mut meta = Meta::empty(role);
        meta.lineage = GenerationInfo::create(7, "site-a").expect("lineage");
        meta.peers.push(PeerMeta {
            name: "site-b".into(),
            protecting: true,
        });
        meta
    }

    #[tokio::test]
    async fn stores_alternate_slots_and_the_newest_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.meta");
        let (mut file, meta) = MetaFile::open_or_create(&path, || sample(Role::Primary))
            .await
            .expect("created");
        assert_eq!(meta, sample(Role::Primary));
        let mut next = meta;
        for round in 0..5u32 {
            next.role = if round % 2 == 0 {
                Role::Secondary
            } else {
                Role::Primary
            };
            next.consistent = round % 3 != 0;
            file.store(&next).await.expect("stored");
            drop(file);
            let (reopened, loaded) =
                MetaFile::open_or_create(&path, || unreachable!("the file exists"))
                    .await
                    .expect("reopened");
            assert_eq!(loaded, next, "round {round}");
            file = reopened;
        }
    }

    #[tokio::test]
    async fn a_torn_store_leaves_the_previous_meta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.meta");
        let (file, first) = MetaFile::open_or_create(&path, || sample(Role::Primary))
            .await
            .expect("created");
        let mut second = first.clone();
        second.role = Role::Secondary;
        file.store(&second).await.expect("stored");
        // Tear the next store: its slot (slot 1, sequence 3) gets half a header.
        let mut third = second.clone();
        third.consistent = false;
        let slot = encode_slot(3, &third).expect("encode");
        let mut bytes = std::fs::read(&path).expect("read");
        let at = SLOT_BYTES as usize;
        bytes[at..at + 12].copy_from_slice(&slot[..12]);
        std::fs::write(&path, &bytes).expect("write");
        drop(file);
        let (_, loaded) = MetaFile::open_or_create(&path, || unreachable!())
            .await
            .expect("loads");
        assert_eq!(loaded, second, "the torn store is ignored");
        // Both slots bad: refused, with the path.
        std::fs::write(&path, vec![0u8; 2 * SLOT_BYTES as usize]).expect("write");
        let error = MetaFile::open_or_create(&path, || unreachable!())
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("neither slot holds a valid meta"), "{text}");
        assert!(text.contains("v.meta"), "{text}");
    }

    #[tokio::test]
    async fn json_meta_of_earlier_builds_is_converted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.meta");
        std::fs::write(
            &path,
            br#"{"role":"secondary","volume_id":9,"history":[{"generation":65537,"start_lsn":1,"promoted_by":"a"}],"consistent":false}"#,
        )
        .expect("write");
        let (_, meta) = MetaFile::open_or_create(&path, || unreachable!())
            .await
            .expect("converted");
        assert_eq!(meta.role, Role::Secondary);
        assert!(!meta.consistent);
        assert_eq!(meta.lineage.volume_id, 9);
        assert_eq!(meta.lineage.history.len(), 1);
        let (_, again) = MetaFile::open_or_create(&path, || unreachable!())
            .await
            .expect("reloaded");
        assert_eq!(again, meta);
        std::fs::write(&path, br#"{"role":"boss"}"#).expect("write");
        let error = MetaFile::open_or_create(&path, || unreachable!())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("unknown role"), "{error}");
    }
}
