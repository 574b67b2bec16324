//! Which congestion controller Ferry's QUIC links should use over a WAN: quinn's Cubic (its
//! default), NewReno and BBR, measured on the relay (testkit) with a long fat pipe's delay, a
//! bandwidth cap and loss, with Ferry's own transport settings, certificates and sockets.
//!
//! Two workloads per controller and loss rate, one connection each:
//! - **bulk**: 48 MiB on one stream as fast as the link takes it (a catch-up); the figures are
//!   the goodput as a share of the cap, and the share of the sender's datagrams the link's
//!   queue dropped (tail drops behind the cap, not the random loss): what the controller's
//!   overshoot costs everything else on that link.
//! - **batches**: a 3 MiB batch every second for 12 s on one stream (a regional primary at
//!   a quarter of the link), each answered by the receiver once it has all of it; the figures
//!   are the p50 and max time from the batch's first byte sent to its answer (what a batch
//!   adds to the RPO).
//!
//! Run: `cargo bench -p ferry --bench congestion` (about 3 minutes; `-- --quick` for one
//! loss rate). Only ratios within one run mean anything on a shared machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::replication::tls::{self, TlsIdentity};
use ferry::replication::transport::{bind_udp, transport_config};
use ferry_testkit::relay::Relay;
use quinn::congestion::{BbrConfig, ControllerFactory, CubicConfig, NewRenoConfig};

const ONE_WAY: Duration = Duration::from_millis(20);
const RATE_BYTES_PER_SECOND: u64 = 100_000_000 / 8;
const BULK_BYTES: usize = 48 << 20;
const BATCH_BYTES: usize = 3 << 20;
const BATCHES: usize = 12;
const CHUNK: usize = 256 << 10;

fn controllers() -> Vec<(&'static str, Arc<dyn ControllerFactory + Send + Sync>)> {
    vec![
        ("cubic", Arc::new(CubicConfig::default())),
        ("newreno", Arc::new(NewRenoConfig::default())),
        ("bbr", Arc::new(BbrConfig::default())),
    ]
}

struct Pair {
    client: quinn::Endpoint,
    server: quinn::Endpoint,
    relay: Relay,
}

fn pair(
    a: &TlsIdentity,
    b: &TlsIdentity,
    controller: Arc<dyn ControllerFactory + Send + Sync>,
    loss: f64,
) -> Pair {
    let peer_timeout = Duration::from_secs(10);
    let idle = quinn::IdleTimeout::try_from(peer_timeout).expect("idle timeout");
    // Ferry's settings, with the controller under test in place of the one Ferry picks for a
    // link (Cubic).
    let mut transport = transport_config(idle, peer_timeout);
    transport.congestion_controller_factory(controller);
    let transport = Arc::new(transport);
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let runtime = quinn::default_runtime().expect("tokio runtime");
    let mut server_config = tls::server_config(b, vec!["a".into()]).expect("server config");
    server_config.transport_config(transport.clone());
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        bind_udp(any).expect("bind b"),
        runtime.clone(),
    )
    .expect("endpoint b");
    let mut client_config = tls::client_config(a, "b").expect("client config");
    client_config.transport_config(transport);
    let mut client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bind_udp(any).expect("bind a"),
        runtime,
    )
    .expect("endpoint a");
    client.set_default_client_config(client_config);
    let relay = Relay::start(
        client.local_addr().expect("a addr"),
        server.local_addr().expect("b addr"),
        7,
    );
    relay
        .both()
        .set_delay(ONE_WAY)
        .set_rate(Some(RATE_BYTES_PER_SECOND))
        .set_loss(loss);
    Pair {
        client,
        server,
        relay,
    }
}

/// One stream's two ends, and the connections that must live as long as it does.
type Ends = (
    (quinn::SendStream, quinn::RecvStream),
    (quinn::SendStream, quinn::RecvStream),
    [quinn::Connection; 2],
);

/// Connects and opens one stream; returns (sender side, receiver side, connections).
async fn connect(pair: &Pair) -> Ends {
    let accept = async {
        let connection = pair
            .server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("accepted");
        let stream = connection.accept_bi().await.expect("stream");
        (stream, connection)
    };
    let dial = async {
        let connection = pair
            .client
            .connect(pair.relay.addr_for_a(), "b")
            .expect("connect")
            .await
            .expect("connected");
        let (mut send, recv) = connection.open_bi().await.expect("stream");
        // The stream exists for the peer once something is sent on it.
        send.write_all(&[0]).await.expect("first byte");
        ((send, recv), connection)
    };
    let ((sender, dialed), ((receive_send, mut receive_recv), accepted)) =
        tokio::join!(dial, accept);
    let mut first = [0u8; 1];
    receive_recv
        .read_exact(&mut first)
        .await
        .expect("first byte");
    (sender, (receive_send, receive_recv), [dialed, accepted])
}

/// Goodput of a bulk transfer as a share of the cap, or why the connection was lost.
/// The bulk transfer's goodput as a share of the cap, and the share of the datagrams a sent
/// that the rate queue dropped.
async fn bulk(pair: &Pair) -> (Result<f64, String>, f64) {
    let before = pair.relay.a_to_b().stats();
    let share = bulk_transfer(pair).await;
    let after = pair.relay.a_to_b().stats();
    let received = after.received_datagrams - before.received_datagrams;
    let dropped = after.dropped_queue_datagrams - before.dropped_queue_datagrams;
    (share, dropped as f64 / received.max(1) as f64)
}

async fn bulk_transfer(pair: &Pair) -> Result<f64, String> {
    let ((mut send, _), (_, mut recv), _connections) = connect(pair).await;
    let chunk = vec![0x5au8; CHUNK];
    let started = Instant::now();
    let writer = async {
        let mut sent = 0;
        while sent < BULK_BYTES {
            send.write_all(&chunk).await.map_err(|e| e.to_string())?;
            sent += chunk.len();
        }
        Ok::<(), String>(())
    };
    let reader = async {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        while got < BULK_BYTES {
            got += recv
                .read(&mut buf)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("stream finished early")?;
        }
        Ok::<(), String>(())
    };
    let (written, read) = tokio::join!(writer, reader);
    read.and(written)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(BULK_BYTES as f64 / seconds / RATE_BYTES_PER_SECOND as f64)
}

/// Seconds from each batch's first byte sent to the receiver's answer, sorted.
async fn batches(pair: &Pair) -> Vec<f64> {
    let ((mut send, mut answers), (mut answer, mut recv), _connections) = connect(pair).await;
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..BATCHES {
            let mut got = 0;
            while got < BATCH_BYTES {
                let want = (BATCH_BYTES - got).min(buf.len());
                got += recv
                    .read(&mut buf[..want])
                    .await
                    .expect("read")
                    .expect("open");
            }
            answer.write_all(&[1]).await.expect("answer");
        }
    });
    let chunk = vec![0xa5u8; CHUNK];
    let mut times = Vec::new();
    let start = Instant::now();
    for n in 0..BATCHES {
        tokio::time::sleep_until((start + Duration::from_secs(n as u64)).into()).await;
        let sent_at = Instant::now();
        for _ in 0..BATCH_BYTES / CHUNK {
            send.write_all(&chunk).await.expect("write");
        }
        let mut one = [0u8; 1];
        answers.read_exact(&mut one).await.expect("answer");
        times.push(sent_at.elapsed().as_secs_f64());
    }
    receiver.await.expect("receiver");
    times.sort_by(f64::total_cmp);
    times
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    tls::cert_init(dir.path(), &["a".to_string(), "b".to_string()]).expect("certificates");
    let identity =
        |name: &str| TlsIdentity::load_from_cert_dir(dir.path(), name).expect("identity");
    let (a, b) = (identity("a"), identity("b"));
    let losses: &[f64] = if quick {
        &[0.005]
    } else {
        &[0.0, 0.001, 0.005, 0.02]
    };
    println!(
        "QUIC congestion control over the relay: RTT {} ms, cap {} Mbit/s; bulk {} MiB, batches of {} MiB every 1 s",
        ONE_WAY.as_millis() * 2,
        RATE_BYTES_PER_SECOND * 8 / 1_000_000,
        BULK_BYTES >> 20,
        BATCH_BYTES >> 20
    );
    println!(
        "{:<9}{:>7}{:>16}{:>14}{:>16}{:>16}",
        "control", "loss", "bulk (of cap)", "queue drops", "batch p50 (s)", "batch max (s)"
    );
    runtime.block_on(async {
        for &loss in losses {
            for (name, controller) in controllers() {
                let bulk_pair = pair(&a, &b, controller.clone(), loss);
                let (share, drops) = bulk(&bulk_pair).await;
                drop(bulk_pair);
                let share = match share {
                    Ok(share) => format!("{:.0}%", share * 100.0),
                    Err(error) => {
                        println!(
                            "{name:<9}{:>6.1}%  bulk: connection lost: {error}",
                            loss * 100.0
                        );
                        "lost".to_string()
                    }
                };
                let batch_pair = pair(&a, &b, controller, loss);
                let times = batches(&batch_pair).await;
                println!(
                    "{name:<9}{:>6.1}%{share:>16}{:>13.1}%{:>16.3}{:>16.3}",
                    loss * 100.0,
                    drops * 100.0,
                    times[times.len() / 2],
                    times[times.len() - 1]
                );
            }
        }
    });
}
