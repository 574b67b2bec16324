//! What one metro round trip costs in the transport alone: a 4 KiB write record out, a 16-byte
//! acknowledgement back, at QD1, over loopback, with nothing else (no journal, no NBD).
//!
//! Two threads stand for the two daemons, each with a current-thread tokio runtime (as
//! `ferry run` has), and each round trip is timed on the sending side:
//! - **udp**: plain UDP sockets (blocking `send`/`recv`), one 4,128-byte datagram out and a
//!   16-byte one back: the floor the metro FUA goal is stated against.
//! - **udp-tokio**: the same over tokio's `UdpSocket` on the two runtimes: what the runtime's
//!   wake-ups add.
//! - **quic**: one QUIC stream with Ferry's transport settings and certificates
//!   (`transport_config`, mutual TLS), the record written with `write_all` and the answer read
//!   with `read_exact`, as `replication/stream.rs` does.
//!
//! Run: `cargo bench -p ferry --bench quic_rtt` (about 30 s; `-- --rounds N`, default 20,000
//! round trips per transport after 2,000 of warm-up). Only ratios within one run mean anything
//! on a shared machine.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::replication::tls::{self, TlsIdentity};
use ferry::replication::transport::{bind_udp, transport_config};

/// A 4 KiB write record with its frame header.
const RECORD_BYTES: usize = 4096 + 32;
const ACK_BYTES: usize = 16;
const WARMUP: usize = 2_000;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// p50, p99 and p99.9 in µs.
fn percentiles(mut times: Vec<Duration>) -> (f64, f64, f64) {
    times.sort_unstable();
    let at = |per_mille: usize| times[(times.len() - 1) * per_mille / 1000].as_secs_f64() * 1e6;
    (at(500), at(990), at(999))
}

/// Two loopback sockets, the client connected to the server.
fn socket_pair() -> (UdpSocket, UdpSocket) {
    let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .connect(server.local_addr().expect("addr"))
        .expect("connect");
    (server, client)
}

fn udp(rounds: usize) -> Vec<Duration> {
    let (server, client) = socket_pair();
    // Loopback does not lose datagrams, but a bench must not hang if it ever does.
    for socket in [&server, &client] {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
    }
    let total = WARMUP + rounds;
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        for _ in 0..total {
            let (_, from) = server.recv_from(&mut buf).expect("recv");
            server.send_to(&buf[..ACK_BYTES], from).expect("send");
        }
    });
    let record = vec![0x5au8; RECORD_BYTES];
    let mut ack = [0u8; 64];
    let mut times = Vec::with_capacity(rounds);
    for i in 0..total {
        let started = Instant::now();
        client.send(&record).expect("send");
        client.recv(&mut ack).expect("recv");
        if i >= WARMUP {
            times.push(started.elapsed());
        }
    }
    echo.join().expect("echo thread");
    times
}

fn udp_tokio(rounds: usize) -> Vec<Duration> {
    let (server, client) = socket_pair();
    server.set_nonblocking(true).expect("nonblocking");
    client.set_nonblocking(true).expect("nonblocking");
    let total = WARMUP + rounds;
    let echo = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let server = tokio::net::UdpSocket::from_std(server).expect("tokio socket");
            let mut buf = vec![0u8; 65536];
            for _ in 0..total {
                let (_, from) =
                    tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
                        .await
                        .expect("a datagram within 5 s")
                        .expect("recv");
                server.send_to(&buf[..ACK_BYTES], from).await.expect("send");
            }
        })
    });
    let times = current_thread().block_on(async move {
        let client = tokio::net::UdpSocket::from_std(client).expect("tokio socket");
        let record = vec![0x5au8; RECORD_BYTES];
        let mut ack = [0u8; 64];
        let mut times = Vec::with_capacity(rounds);
        for i in 0..total {
            let started = Instant::now();
            client.send(&record).await.expect("send");
            tokio::time::timeout(Duration::from_secs(5), client.recv(&mut ack))
                .await
                .expect("an answer within 5 s")
                .expect("recv");
            if i >= WARMUP {
                times.push(started.elapsed());
            }
        }
        times
    });
    echo.join().expect("echo thread");
    times
}

fn quic(a: TlsIdentity, b: TlsIdentity, rounds: usize) -> Vec<Duration> {
    let peer_timeout = Duration::from_secs(10);
    let idle = quinn::IdleTimeout::try_from(peer_timeout).expect("idle timeout");
    let transport = Arc::new(transport_config(idle, peer_timeout));
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let server_socket = bind_udp(any).expect("bind b");
    let server_addr = server_socket.local_addr().expect("b addr");
    let client_socket = bind_udp(any).expect("bind a");
    let total = WARMUP + rounds;
    let server_transport = transport.clone();
    let echo = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let mut server_config =
                tls::server_config(&b, vec!["a".into()]).expect("server config");
            server_config.transport_config(server_transport);
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_config),
                server_socket,
                quinn::default_runtime().expect("tokio runtime"),
            )
            .expect("endpoint b");
            let connection = endpoint
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("accepted");
            let (mut send, mut recv) = connection.accept_bi().await.expect("stream");
            let mut record = vec![0u8; RECORD_BYTES];
            let ack = [0xa5u8; ACK_BYTES];
            for _ in 0..total {
                recv.read_exact(&mut record).await.expect("record");
                send.write_all(&ack).await.expect("ack");
            }
            // Let the last acknowledgement reach the client before the connection goes.
            connection.closed().await;
        })
    });
    let times = current_thread().block_on(async move {
        let mut client_config = tls::client_config(&a, "b").expect("client config");
        client_config.transport_config(transport);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            client_socket,
            quinn::default_runtime().expect("tokio runtime"),
        )
        .expect("endpoint a");
        endpoint.set_default_client_config(client_config);
        let connection = endpoint
            .connect(server_addr, "b")
            .expect("connect")
            .await
            .expect("connected");
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        let record = vec![0x5au8; RECORD_BYTES];
        let mut ack = [0u8; ACK_BYTES];
        let mut times = Vec::with_capacity(rounds);
        for i in 0..total {
            let started = Instant::now();
            send.write_all(&record).await.expect("record");
            recv.read_exact(&mut ack).await.expect("ack");
            if i >= WARMUP {
                times.push(started.elapsed());
            }
        }
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        times
    });
    echo.join().expect("echo thread");
    times
}

fn main() {
    let mut rounds = 20_000;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|arg| arg == "--rounds") {
        rounds = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("--rounds N");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    tls::cert_init(dir.path(), &["a".to_string(), "b".to_string()]).expect("certificates");
    let identity =
        |name: &str| TlsIdentity::load_from_cert_dir(dir.path(), name).expect("identity");
    println!(
        "4 KiB record out, 16-byte answer back, QD1 over loopback, {rounds} round trips each (two threads, a current-thread runtime each)"
    );
    println!(
        "{:<11}{:>10}{:>10}{:>11}{:>20}",
        "transport", "p50 us", "p99 us", "p99.9 us", "p50 vs udp-tokio"
    );
    let plain = percentiles(udp(rounds));
    let tokio_udp = percentiles(udp_tokio(rounds));
    let rows = [
        ("udp", plain),
        ("udp-tokio", tokio_udp),
        (
            "quic",
            percentiles(quic(identity("a"), identity("b"), rounds)),
        ),
    ];
    for (name, (p50, p99, p999)) in rows {
        println!(
            "{name:<11}{p50:>10.1}{p99:>10.1}{p999:>11.1}{:>19.2}x",
            p50 / tokio_udp.0
        );
    }
    // The blocking pair can run on one CPU, each thread woken where the other just went to
    // sleep: a few µs. Two daemons' runtimes, like udp-tokio, are woken across CPUs.
    println!(
        "(udp's p50 is bimodal on a VM: a few µs when the echo thread is woken on the sender's CPU, \
         tens of µs when on another; compare quic with udp-tokio)"
    );
}
