//! `VOLUME.stage`: where a regional secondary stores each complete batch before it
//! acknowledges and applies it (the format is `ferry_protocol::stage`). Written through
//! [`Storage`], so the power-loss tests cover it. The file has a fixed size, reserved when it
//! is created ([`STAGE_FILE_BYTES`]: the largest batch a secondary accepts), so storing a
//! batch never runs out of space.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_protocol::repl::WriteRecord;
use ferry_protocol::replication::regional::BATCH_RECEIVE_BYTES_MAX;
use ferry_protocol::stage::{self, StageError, HEADER_BYTES};

use crate::storage::{self, AlignedBuf, OpenOptions, Storage};

/// Bytes of the stage file: the header, the largest batch a secondary accepts (which counts
/// more per record than its descriptor takes, see `BATCH_RECORD_COST_BYTES`) and padding.
pub const STAGE_FILE_BYTES: u64 = BATCH_RECEIVE_BYTES_MAX + 2 * HEADER_BYTES as u64;

/// The stage file of one volume.
pub struct StageFile {
    path: PathBuf,
    storage: Arc<dyn Storage>,
}

impl std::fmt::Debug for StageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageFile")
            .field("path", &self.path)
            .finish()
    }
}

impl StageFile {
    /// Opens the stage file, creating (and reserving) it when missing.
    pub fn open_or_create(path: &Path) -> io::Result<StageFile> {
        let storage = storage::open(
            path,
            &OpenOptions {
                direct: false,
                create_len_bytes: Some(STAGE_FILE_BYTES),
            },
        )?;
        if storage.len_bytes() < STAGE_FILE_BYTES {
            return Err(io::Error::other(format!(
                "{} has {} bytes, fewer than the {STAGE_FILE_BYTES} a stage file needs; remove it (it is recreated) only if the volume's journal is empty",
                path.display(),
                storage.len_bytes()
            )));
        }
        Ok(StageFile {
            path: path.to_path_buf(),
            storage,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores a complete batch durably, replacing the previous one.
    pub async fn store(&self, lsn: u64, records: &[WriteRecord]) -> io::Result<()> {
        let image = stage::encode(lsn, records)
            .filter(|image| image.len() as u64 <= STAGE_FILE_BYTES)
            .ok_or_else(|| io::Error::other("the batch does not fit the stage file"))?;
        self.storage
            .write_at(0, vec![AlignedBuf::copy_from(&image).freeze()], false)
            .await?;
        self.storage.sync().await
    }

    /// Forgets the stored batch (it is applied): a later start must never apply it again,
    /// whatever the journal's head is by then.
    pub async fn clear(&self) -> io::Result<()> {
        self.storage
            .write_at(0, vec![AlignedBuf::zeroed(HEADER_BYTES).freeze()], false)
            .await?;
        self.storage.sync().await
    }

    /// The stored batch, if a whole one is there: `(lsn, records)`.
    pub async fn load(&self) -> io::Result<Option<(u64, Vec<WriteRecord>)>> {
        let (result, header_buf) = self
            .storage
            .read_at(0, AlignedBuf::zeroed(HEADER_BYTES))
            .await;
        result?;
        let header = match stage::decode_header(&header_buf) {
            Ok(header) => header,
            Err(StageError::Empty) => return Ok(None),
            Err(error) => {
                tracing::info!(path = %self.path.display(), %error, "no whole batch in the stage file (never acknowledged)");
                return Ok(None);
            }
        };
        let body_len = (header.body_bytes as usize).next_multiple_of(512);
        if (HEADER_BYTES + body_len) as u64 > self.storage.len_bytes() {
            return Ok(None);
        }
        let (result, body) = self
            .storage
            .read_at(HEADER_BYTES as u64, AlignedBuf::zeroed(body_len.max(512)))
            .await;
        result?;
        match stage::decode_body(&header, &body) {
            Ok(records) => Ok(Some((header.lsn, records))),
            Err(error) => {
                tracing::info!(path = %self.path.display(), %error, "no whole batch in the stage file (never acknowledged)");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_protocol::journal::RecordKind;

    #[tokio::test]
    async fn a_stored_batch_loads_back_and_a_new_file_holds_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.stage");
        let file = StageFile::open_or_create(&path).expect("create");
        assert_eq!(file.load().await.expect("load"), None);
        let records = vec![WriteRecord {
            lsn: 5,
            kind: RecordKind::Write,
            fua: false,
            offset_bytes: 8192,
            len_bytes: 4096,
            data: Bytes::from(vec![3u8; 4096]),
        }];
        file.store(6, &records).await.expect("store");
        drop(file);
        let file = StageFile::open_or_create(&path).expect("open");
        assert_eq!(file.load().await.expect("load"), Some((6, records)));
    }
}
