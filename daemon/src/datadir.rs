//! The data directory (`[node] data_dir`): the one type that knows its file names, the lock
//! that keeps a second daemon out, and the one way Ferry creates a durable file.
//!
//! ```text
//! DATA_DIR/ferry.lock            flock held for the daemon's lifetime
//! DATA_DIR/VOLUME.journal        the journal ring (journal/)
//! DATA_DIR/VOLUME.meta           role, lineage, consistency, peers (replication/meta_file.rs)
//! DATA_DIR/VOLUME.PEER.dirty     what PEER may lack or hold differently (replication/dirty_file.rs)
//! ```
//!
//! Every file is created by [`create_durably`]: written under a temporary name, fsynced,
//! renamed into place, and the directory fsynced, so a crash leaves either no file or a whole
//! one. After creation, each file is opened through [`crate::storage::open`] and written in
//! place with its own torn-write rules, so the fault-injecting storage (power loss, failed and
//! torn writes) covers all of them.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataDirError {
    #[error(
        "data directory {} is in use by another ferry daemon (or cannot be locked: {source})",
        path.display()
    )]
    Locked { path: PathBuf, source: io::Error },
}

/// The data directory, locked for this process.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Holds the `flock` for as long as the daemon runs.
    _lock: File,
}

impl DataDir {
    /// Takes an exclusive `flock` on `DATA_DIR/ferry.lock` for the daemon's lifetime (the
    /// kernel drops it when the process dies, even by SIGKILL, so there is no stale lock).
    pub fn lock(path: &Path) -> Result<DataDir, DataDirError> {
        let lock_path = path.join("ferry.lock");
        let locked = |source| DataDirError::Locked {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(locked)?;
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(locked(io::Error::last_os_error()));
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal ring of `volume`.
    pub fn journal(&self, volume: &str) -> PathBuf {
        journal_path(&self.path, volume)
    }

    /// The metadata of `volume` (role, lineage, consistency, peers).
    pub fn meta(&self, volume: &str) -> PathBuf {
        self.path.join(format!("{volume}.meta"))
    }

    /// The stage file of `volume` (a regional secondary's last batch).
    pub fn stage(&self, volume: &str) -> PathBuf {
        self.path.join(format!("{volume}.stage"))
    }

    /// The catch-up file of `volume` (a regional secondary's catch-up, stored whole before it
    /// reaches the device); its segments are this path with `.0`, `.1`, ... appended.
    pub fn catchup(&self, volume: &str) -> PathBuf {
        self.path.join(format!("{volume}.catchup"))
    }

    /// The dirty map `volume` keeps for `peer`.
    pub fn dirty_map(&self, volume: &str, peer: &str) -> PathBuf {
        self.path.join(format!("{volume}.{peer}.dirty"))
    }
}

/// The journal ring of `volume` in `data_dir` (also for tools that do not lock the directory).
pub fn journal_path(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join(format!("{volume}.journal"))
}

/// Creates `path` whole or not at all: `fill` writes the contents to the temporary path it is
/// given (any way it likes); then the temporary file is fsynced, renamed over `path`, and the
/// directory fsynced. A leftover temporary file from an earlier crash is replaced.
pub async fn create_durably<F, Fut>(path: &Path, fill: F) -> io::Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = io::Result<()>>,
{
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        ));
    };
    let mut tmp_name = name.to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = async {
        fill(tmp.clone()).await?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsyncs the directory holding `path`, so that a rename or creation in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creation_is_whole_or_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.meta");
        create_durably(&path, |tmp| async move { std::fs::write(tmp, b"contents") })
            .await
            .expect("created");
        assert_eq!(std::fs::read(&path).expect("read"), b"contents");
        // A failing fill leaves the old file and no temporary behind.
        let error = create_durably(&path, |tmp| async move {
            std::fs::write(&tmp, b"half")?;
            Err(io::Error::other("disk full"))
        })
        .await
        .unwrap_err();
        assert_eq!(error.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).expect("read"), b"contents");
        assert!(!dir.path().join("v.meta.tmp").exists());
    }

    #[test]
    fn a_second_lock_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDir::lock(dir.path()).expect("first lock");
        let error = DataDir::lock(dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("in use by another ferry daemon"),
            "{error}"
        );
        assert_eq!(
            first.dirty_map("pg", "site-b"),
            dir.path().join("pg.site-b.dirty")
        );
        drop(first);
        DataDir::lock(dir.path()).expect("free again");
    }
}
