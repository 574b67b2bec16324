//! A slow disk for tests (feature `fault-injection`): every write and zeroing through
//! [`with_write_delay`] starts only after a fixed delay, so it takes at least that much longer
//! than the disk underneath. Reads and syncs are not delayed. `FERRY_FAULT_DEVICE_WRITE_DELAY_US`
//! applies it to the backing device of every volume (never to the journal), through
//! [`super::maybe_device_write_delay`], to make one node's disk slower than its peer's.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::{AlignedBuf, IoFuture, SharedBuf, Storage};

/// The environment variable holding the delay in microseconds: unset, empty or `0` for none.
pub const DEVICE_WRITE_DELAY_ENV: &str = "FERRY_FAULT_DEVICE_WRITE_DELAY_US";

/// The delay `FERRY_FAULT_DEVICE_WRITE_DELAY_US` asks for, if any.
pub fn device_write_delay_from_env() -> io::Result<Option<Duration>> {
    parse_delay_us(std::env::var(DEVICE_WRITE_DELAY_ENV).ok().as_deref())
}

fn parse_delay_us(value: Option<&str>) -> io::Result<Option<Duration>> {
    let Some(text) = value.filter(|text| !text.is_empty()) else {
        return Ok(None);
    };
    match text.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(delay_us) => Ok(Some(Duration::from_micros(delay_us))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{DEVICE_WRITE_DELAY_ENV}={text:?}: expected a number of microseconds"),
        )),
    }
}

/// `inner` with every `write_at` and `zero_range` delayed by `delay` before it is issued.
pub fn with_write_delay(inner: Arc<dyn Storage>, delay: Duration) -> Arc<dyn Storage> {
    Arc::new(DelayedWrites { inner, delay })
}

struct DelayedWrites {
    inner: Arc<dyn Storage>,
    delay: Duration,
}

impl DelayedWrites {
    /// Sleeps on the blocking pool rather than on tokio's timer, whose granularity is a
    /// millisecond: a delay of a few hundred microseconds stays a few hundred microseconds.
    /// Concurrent writes sleep side by side, as requests queued in a slow device would.
    async fn wait(&self) -> io::Result<()> {
        let delay = self.delay;
        tokio::task::spawn_blocking(move || std::thread::sleep(delay))
            .await
            .map_err(io::Error::other)
    }
}

impl Storage for DelayedWrites {
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }

    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        dsync: bool,
    ) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await?;
            self.inner.write_at(offset, bufs, dsync).await
        })
    }

    fn read_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (io::Result<()>, AlignedBuf)> {
        self.inner.read_at(offset, buf)
    }

    fn sync(&self) -> IoFuture<'_, io::Result<()>> {
        self.inner.sync()
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.wait().await?;
            self.inner.zero_range(offset, len, punch).await
        })
    }

    fn logical_block_bytes(&self) -> u64 {
        self.inner.logical_block_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn the_delay_is_read_in_microseconds() {
        assert_eq!(parse_delay_us(None).unwrap(), None);
        assert_eq!(parse_delay_us(Some("")).unwrap(), None);
        assert_eq!(parse_delay_us(Some("0")).unwrap(), None);
        assert_eq!(
            parse_delay_us(Some("1500")).unwrap(),
            Some(Duration::from_micros(1500))
        );
        for bad in ["-1", "1ms", " 5", "x"] {
            let error = parse_delay_us(Some(bad)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(
                error.to_string().contains(DEVICE_WRITE_DELAY_ENV),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn writes_and_zeroing_take_at_least_the_delay_and_reads_pass_through() {
        let delay = Duration::from_millis(30);
        let inner = MemStorage::new(1 << 16);
        let storage = with_write_delay(inner.clone(), delay);

        let started = Instant::now();
        storage
            .write_at(512, vec![AlignedBuf::copy_from(&[7; 512]).freeze()], false)
            .await
            .unwrap();
        assert!(
            started.elapsed() >= delay,
            "write took {:?}",
            started.elapsed()
        );

        let started = Instant::now();
        storage.zero_range(512, 256, true).await.unwrap();
        assert!(
            started.elapsed() >= delay,
            "zeroing took {:?}",
            started.elapsed()
        );

        let (result, buf) = storage.read_at(512, AlignedBuf::zeroed(512)).await;
        result.unwrap();
        assert_eq!(&buf[..256], &[0; 256][..]);
        assert_eq!(&buf[256..], &[7; 256][..]);
        assert_eq!(inner.snapshot()[512..1024], buf[..]);
        storage.sync().await.unwrap();
    }
}
