//! `ferry demo`: Ferry's main job on an embedded default, on this machine, with nothing to
//! install. A standalone volume in a temporary directory is served by a real `ferry run`
//! process; Ferry's own NBD client writes and reads it; the daemon is killed with SIGKILL in
//! the middle of the work and restarted; every write whose completion the client saw must read
//! back exactly. The report shows latency percentiles and what recovery found.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use thiserror::Error;

use crate::nbd_client::NbdClient;

const VOLUME: &str = "demo";
const VOLUME_BYTES: u64 = 256 << 20;
const BLOCK_BYTES: usize = 4096;
const WRITES: usize = 3000;
const READS: usize = 1000;

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("demo setup failed: {0}")]
    Setup(String),
    #[error("the daemon did not become ready within {0:?}; its log is in {1}")]
    NotReady(Duration, String),
    #[error("NBD client error: {0}")]
    Client(String),
    #[error("VERIFICATION FAILED: {0}")]
    Verify(String),
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> DemoError {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

fn client<E: std::fmt::Display>(e: E) -> DemoError {
    DemoError::Client(e.to_string())
}

/// Runs the demo and prints its report.
pub fn run() -> Result<(), DemoError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("runtime"))?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir_in(demo_parent())
        .map_err(setup("temporary directory"))?;
    let result = runtime.block_on(scenario(dir.path()));
    if result.is_err() {
        // Keep the evidence for whoever reads the error.
        let kept = dir.keep();
        eprintln!("demo files kept in {}", kept.display());
    }
    result
}

/// A directory on a real filesystem (O_DIRECT needs one; /dev/shm-backed /tmp would refuse it).
fn demo_parent() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, config: &Path) -> Result<Daemon, DemoError> {
        let exe = std::env::current_exe().map_err(setup("locating the ferry binary"))?;
        let log = dir.join(format!("ferry-{}.log", Instant::now().elapsed().as_nanos()));
        let log = unique(log);
        let stderr = std::fs::File::create(&log).map_err(setup("daemon log"))?;
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(setup("starting ferry run"))?;
        Ok(Daemon { child, log })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> Result<(), DemoError> {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(setup("waiting for the daemon"))?
            {
                return if status.success() {
                    Ok(())
                } else {
                    Err(DemoError::Verify(format!(
                        "clean shutdown exited with {status}; log: {}",
                        self.log.display()
                    )))
                };
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(DemoError::Verify(
                    "the daemon did not stop within 30 s of SIGTERM".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

fn unique(path: PathBuf) -> PathBuf {
    let mut candidate = path.clone();
    let mut n = 0;
    while candidate.exists() {
        n += 1;
        candidate = path.with_extension(format!("{n}.log"));
    }
    candidate
}

async fn connect(socket: &Path, daemon: &mut Daemon) -> Result<NbdClient, DemoError> {
    let limit = Duration::from_secs(20);
    let deadline = Instant::now() + limit;
    loop {
        match NbdClient::connect_unix(socket, VOLUME).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                if let Ok(Some(status)) = daemon.child.try_wait() {
                    return Err(DemoError::Setup(format!(
                        "ferry run exited with {status}; see {}",
                        daemon.log.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(_) => return Err(DemoError::NotReady(limit, daemon.log.display().to_string())),
        }
    }
}

#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn add(&mut self, since: Instant) {
        self.0.push(since.elapsed());
    }

    fn line(&mut self, what: &str) -> String {
        self.0.sort();
        let pick = |q: f64| {
            if self.0.is_empty() {
                return "-".to_string();
            }
            let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
            format!("{:.0}", self.0[i].as_secs_f64() * 1e6)
        };
        format!(
            "  {what:<22} {:>8} {:>10} {:>10} {:>10}",
            self.0.len(),
            pick(0.5),
            pick(0.99),
            pick(0.999)
        )
    }
}

async fn scenario(dir: &Path) -> Result<(), DemoError> {
    let seed: u64 = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!(
        "ferry demo: a journaled volume served over NBD, a kill -9, a restart, a verification"
    );
    println!(
        "  directory {}   seed {seed} (FERRY_SEED={seed} replays it)",
        dir.display()
    );
    let data_dir = dir.join("data");
    std::fs::create_dir(&data_dir).map_err(setup("data directory"))?;
    let socket = dir.join("nbd.sock");
    let control = dir.join("ferry.sock");
    let config_path = dir.join("ferry.toml");
    let config = format!(
        "[node]\nname = \"demo-node\"\ndata_dir = \"{}\"\ncontrol_socket = \"{}\"\n\n[nbd]\nlisten = [\"unix:{}\"]\n\n\
         [[volumes]]\nname = \"{VOLUME}\"\ndevice = \"{}\"\nsize = \"{}MiB\"\njournal_size = \"64MiB\"\n",
        data_dir.display(),
        control.display(),
        socket.display(),
        dir.join("demo.img").display(),
        VOLUME_BYTES >> 20,
    );
    std::fs::write(&config_path, config).map_err(setup("config"))?;

    let mut daemon = Daemon::start(dir, &config_path)?;
    let mut nbd = connect(&socket, &mut daemon).await?;
    let blocks = VOLUME_BYTES / BLOCK_BYTES as u64;
    if nbd.size_bytes() != VOLUME_BYTES {
        return Err(DemoError::Verify(format!(
            "export size {} != {VOLUME_BYTES}",
            nbd.size_bytes()
        )));
    }

    // Phase 1: random 4 KiB writes, some FUA, some followed by FLUSH, each with unique contents.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    let (mut write_lat, mut fua_lat, mut flush_lat, mut read_lat) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let started = Instant::now();
    for _ in 0..WRITES {
        let block = rng.gen_range(0..blocks);
        let mut data = vec![0u8; BLOCK_BYTES];
        rng.fill_bytes(&mut data);
        let fua = rng.gen_ratio(1, 8);
        let t = Instant::now();
        nbd.write(block * BLOCK_BYTES as u64, &data, fua)
            .await
            .map_err(client)?;
        if fua {
            fua_lat.add(t)
        } else {
            write_lat.add(t)
        }
        model.insert(block, data);
        if rng.gen_ratio(1, 20) {
            let t = Instant::now();
            nbd.flush().await.map_err(client)?;
            flush_lat.add(t);
        }
    }
    let write_seconds = started.elapsed().as_secs_f64();
    for _ in 0..READS {
        let block = *model
            .keys()
            .nth(rng.gen_range(0..model.len()))
            .expect("model is not empty");
        let t = Instant::now();
        let data = nbd
            .read(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
            .await
            .map_err(client)?;
        read_lat.add(t);
        if data != model[&block] {
            return Err(DemoError::Verify(format!(
                "block {block} read back different data before the crash"
            )));
        }
    }

    // Phase 2: keep writing without FLUSH, then kill -9 the daemon while writes are queued.
    for _ in 0..500 {
        let block = rng.gen_range(0..blocks);
        let mut data = vec![0u8; BLOCK_BYTES];
        rng.fill_bytes(&mut data);
        nbd.write(block * BLOCK_BYTES as u64, &data, false)
            .await
            .map_err(client)?;
        model.insert(block, data);
    }
    daemon.kill9();
    drop(nbd);
    println!(
        "  wrote {} blocks ({} writes in {:.2} s), then killed the daemon with SIGKILL",
        model.len(),
        WRITES + 500,
        write_seconds
    );

    // Phase 3: restart; recovery replays the journal; every completed write must be there.
    let mut daemon = Daemon::start(dir, &config_path)?;
    let mut nbd = connect(&socket, &mut daemon).await?;
    let status = crate::control::request(&control, serde_json::json!({"op": "status"}))
        .await
        .map_err(client)?;
    let recovery = &status["volumes"][0]["recovery"];
    let mut checked = 0;
    for (block, expected) in &model {
        let data = nbd
            .read(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
            .await
            .map_err(client)?;
        if &data != expected {
            return Err(DemoError::Verify(format!(
                "block {block}: a completed write was lost across kill -9"
            )));
        }
        checked += 1;
    }
    nbd.disconnect().await.map_err(client)?;
    daemon.terminate()?;

    println!(
        "  restart replayed {} journal records ({} bytes); torn tail {} bytes",
        recovery["records_replayed"], recovery["bytes_replayed"], recovery["torn_tail_bytes"]
    );
    println!(
        "  verified {checked} blocks: every write whose completion the client saw survived kill -9"
    );
    println!();
    println!(
        "  latency (µs, QD1, 4 KiB)  {:>8} {:>10} {:>10} {:>10}",
        "count", "p50", "p99", "p99.9"
    );
    println!("{}", write_lat.line("write"));
    println!("{}", fua_lat.line("write FUA"));
    println!("{}", flush_lat.line("flush"));
    println!("{}", read_lat.line("read"));
    println!();
    println!("PASS");
    Ok(())
}
