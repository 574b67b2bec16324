//! Hand-built bytes over raw sockets (SPEC §7): malformed handshakes, unknown options,
//! out-of-range, misaligned and oversized requests, garbage mid-stream. After each, the daemon
//! must still serve a new connection (Unix and TCP) and the data must be unchanged.

use std::io::Write;

use crate::harness::{Daemon, VolumeOptions};
use crate::nbd_wire::{self as wire, NbdConn, NbdError, Stream};

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A daemon whose first and last 64 KiB hold known patterns, and a health check.
struct Fixture {
    daemon: Daemon,
    size: u64,
}

const HEAD_PATTERN: u8 = 0x5a;
const TAIL_PATTERN: u8 = 0xa5;
const PROBE_LEN: u64 = 64 * 1024;

impl Fixture {
    fn new() -> Fixture {
        let daemon = Daemon::start_with(VolumeOptions {
            size: "64MiB".to_string(),
            journal_size: "16MiB".to_string(),
            ..VolumeOptions::default()
        });
        let size = daemon.volume_size_bytes();
        let mut conn = NbdConn::connect_unix(&daemon.nbd_socket, "vol0").expect("connect");
        assert_eq!(conn.info.size, size, "export size");
        conn.write(0, &vec![HEAD_PATTERN; PROBE_LEN as usize], false)
            .expect("write head");
        conn.write(
            size - PROBE_LEN,
            &vec![TAIL_PATTERN; PROBE_LEN as usize],
            true,
        )
        .expect("write tail");
        conn.disconnect();
        Fixture { daemon, size }
    }

    fn unix(&self) -> Box<dyn Stream> {
        Box::new(wire::connect_unix_raw(&self.daemon.nbd_socket).expect("connect unix"))
    }

    fn conn(&self) -> NbdConn {
        NbdConn::connect_unix(&self.daemon.nbd_socket, "vol0").expect("connect + GO")
    }

    /// The daemon still runs, serves new connections on both listeners, and the data is as
    /// written in `new`.
    fn assert_healthy(&mut self, after: &str) {
        assert!(self.daemon.is_running(), "daemon died after {after}");
        let unix = NbdConn::connect_unix(&self.daemon.nbd_socket, "vol0");
        let tcp = NbdConn::connect_tcp(&self.daemon.tcp_addr(), "vol0");
        for (name, conn) in [("unix", unix), ("tcp", tcp)] {
            let mut conn = conn.unwrap_or_else(|error| {
                panic!("after {after}: new {name} connection failed: {error}")
            });
            let head = conn
                .read(0, PROBE_LEN as u32)
                .unwrap_or_else(|error| panic!("after {after}: read: {error}"));
            assert!(
                head.iter().all(|byte| *byte == HEAD_PATTERN),
                "after {after}: head data changed"
            );
            let tail = conn
                .read(self.size - PROBE_LEN, PROBE_LEN as u32)
                .unwrap_or_else(|error| panic!("after {after}: read tail: {error}"));
            assert!(
                tail.iter().all(|byte| *byte == TAIL_PATTERN),
                "after {after}: tail data changed"
            );
            conn.disconnect();
        }
    }
}

fn expect_server_error(result: Result<(), NbdError>, allowed: &[u32], what: &str) {
    match result {
        Err(NbdError::Server(errno)) => {
            assert!(
                allowed.contains(&errno),
                "{what}: error {errno}, expected one of {allowed:?}"
            )
        }
        Ok(()) => panic!("{what}: accepted, expected an error reply"),
        Err(other) => panic!("{what}: {other}, expected an error reply on a live connection"),
    }
}

#[test]
fn malformed_handshakes_do_not_hurt_the_daemon() {
    let mut fixture = Fixture::new();

    // Connect and hang up at once.
    drop(fixture.unix());
    fixture.assert_healthy("connect and close");

    // Hang up in the middle of the client flags.
    let mut stream = fixture.unix();
    wire::read_u64(stream.as_mut()).expect("NBDMAGIC");
    wire::read_u64(stream.as_mut()).expect("IHAVEOPT");
    wire::read_u16(stream.as_mut()).expect("handshake flags");
    stream.write_all(&[0, 0]).expect("half client flags");
    drop(stream);
    fixture.assert_healthy("half client flags");

    // Unknown client flags: the server must close (proto.md, "client flags").
    let mut stream = fixture.unix();
    wire::read_u64(stream.as_mut()).expect("NBDMAGIC");
    wire::read_u64(stream.as_mut()).expect("IHAVEOPT");
    wire::read_u16(stream.as_mut()).expect("handshake flags");
    stream
        .write_all(&0x8000_0001u32.to_be_bytes())
        .expect("client flags");
    let _ = wire::send_option(
        stream.as_mut(),
        wire::OPT_GO,
        &wire::go_option_data("vol0", &[]),
    );
    match wire::read_option_reply(stream.as_mut()) {
        Ok((_, reply_type, _)) if reply_type == wire::REP_ACK || reply_type == wire::REP_INFO => {
            panic!("server accepted unknown client flags")
        }
        _ => {}
    }
    drop(stream);
    fixture.assert_healthy("unknown client flags");

    // Garbage instead of an option header.
    let mut stream = fixture.unix();
    wire::client_greeting(stream.as_mut()).expect("greeting");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("garbage");
    assert!(
        wire::is_closed(stream.as_mut()),
        "server kept a connection that sent garbage options"
    );
    fixture.assert_healthy("garbage option header");

    // An option that claims 4 GiB of data: the server must neither wait forever for it nor
    // allocate it; replying an error or closing are both fine.
    let mut stream = fixture.unix();
    wire::client_greeting(stream.as_mut()).expect("greeting");
    let mut header = Vec::new();
    header.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    header.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    header.extend_from_slice(&[0u8; 64]);
    stream.write_all(&header).expect("huge option");
    drop(stream);
    fixture.assert_healthy("4 GiB option length");

    // GO whose name length runs past the option data.
    let mut stream = fixture.unix();
    wire::client_greeting(stream.as_mut()).expect("greeting");
    let mut data = Vec::new();
    data.extend_from_slice(&1000u32.to_be_bytes());
    data.extend_from_slice(b"vol0");
    data.extend_from_slice(&0u16.to_be_bytes());
    wire::send_option(stream.as_mut(), wire::OPT_GO, &data).expect("bad GO");
    match wire::read_option_reply(stream.as_mut()) {
        Ok((_, reply_type, _)) => {
            assert_eq!(
                reply_type,
                wire::REP_ERR_INVALID,
                "GO with a name past its data"
            )
        }
        Err(NbdError::Io(_)) => {} // closing is allowed too
        Err(other) => panic!("GO with a name past its data: {other}"),
    }
    drop(stream);
    fixture.assert_healthy("GO name length past data");

    // GO for an export that does not exist: an error reply, and the session can go on.
    let mut stream = fixture.unix();
    wire::client_greeting(stream.as_mut()).expect("greeting");
    match wire::opt_go(stream.as_mut(), "no-such-volume") {
        Err(NbdError::Server(reply_type)) => {
            assert!(
                reply_type & (1 << 31) != 0,
                "error reply type {reply_type:#x}"
            )
        }
        other => panic!("GO for a missing export: {other:?}"),
    }
    let info = wire::opt_go(stream.as_mut(), "vol0").expect("GO vol0 after a failed GO");
    assert_eq!(info.size, fixture.size);
    fixture.assert_healthy("GO for a missing export");
}

#[test]
fn unknown_option_gets_err_unsup_then_go_works() {
    let mut fixture = Fixture::new();
    let mut stream = fixture.unix();
    wire::client_greeting(stream.as_mut()).expect("greeting");
    wire::send_option(stream.as_mut(), 0x0dea_dbee, b"some option data").expect("send option");
    let (option, reply_type, _) =
        wire::read_option_reply(stream.as_mut()).expect("reply to unknown option");
    assert_eq!(option, 0x0dea_dbee, "reply names the option");
    assert_eq!(reply_type, wire::REP_ERR_UNSUP, "unknown option");
    // LIST works and names vol0.
    wire::send_option(stream.as_mut(), wire::OPT_LIST, &[]).expect("LIST");
    let mut names = Vec::new();
    for _ in 0..64 {
        let (_, reply_type, data) = wire::read_option_reply(stream.as_mut()).expect("LIST reply");
        if reply_type == wire::REP_ACK {
            break;
        }
        assert_eq!(reply_type, wire::REP_SERVER, "LIST reply type");
        let length = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8_lossy(&data[4..4 + length]).into_owned());
    }
    assert!(names.contains(&"vol0".to_string()), "LIST: {names:?}");
    let info = wire::opt_go(stream.as_mut(), "vol0").expect("GO after unknown option");
    assert_eq!(info.size, fixture.size);
    assert_eq!(info.block_size_min, Some(512));
    assert_eq!(info.block_size_preferred, Some(4096));
    assert_eq!(info.block_size_max, Some(32 * 1024 * 1024));
    let flags = info.transmission_flags;
    assert!(flags & wire::TRANSMIT_HAS_FLAGS != 0, "flags {flags:#x}");
    assert!(flags & wire::TRANSMIT_SEND_FLUSH != 0, "flags {flags:#x}");
    assert!(flags & wire::TRANSMIT_SEND_FUA != 0, "flags {flags:#x}");
    assert!(flags & wire::TRANSMIT_READ_ONLY == 0, "flags {flags:#x}");
    let header = wire::request_bytes(0, wire::CMD_READ, 7, 0, 4096);
    stream.write_all(&header).expect("read request");
    let reply = wire::read_simple_reply(stream.as_mut(), 4096).expect("read reply");
    assert_eq!(reply.error, 0);
    assert_eq!(reply.handle, 7);
    assert!(reply.data.iter().all(|byte| *byte == HEAD_PATTERN));
    fixture.assert_healthy("unknown option");
}

#[test]
fn out_of_range_misaligned_and_oversized_requests_are_refused() {
    let mut fixture = Fixture::new();
    let size = fixture.size;
    let mut conn = fixture.conn();
    let junk = vec![0xeeu8; 2 * BLOCK as usize];

    // Past the end: a write straddling the end, one wholly beyond it, one that overflows u64.
    expect_server_error(
        conn.write(size - BLOCK, &junk, false),
        &[wire::ENOSPC, wire::EINVAL],
        "write across end",
    );
    expect_server_error(
        conn.write(size, &junk[..4096], true),
        &[wire::ENOSPC, wire::EINVAL],
        "write past end",
    );
    expect_server_error(
        conn.write(u64::MAX - 4095, &junk[..4096], false),
        &[wire::ENOSPC, wire::EINVAL, wire::EOVERFLOW],
        "write at u64::MAX",
    );
    expect_server_error(
        conn.read(size - BLOCK, 8192).map(|_| ()),
        &[wire::EINVAL],
        "read across end",
    );
    expect_server_error(
        conn.trim(size - BLOCK, 8192),
        &[wire::EINVAL, wire::ENOSPC],
        "trim across end",
    );
    expect_server_error(
        conn.write_zeroes(size, 4096),
        &[wire::EINVAL, wire::ENOSPC],
        "write zeroes past end",
    );

    // Misaligned against the advertised 512-byte minimum.
    expect_server_error(
        conn.write(100, &junk[..512], false),
        &[wire::EINVAL],
        "write at offset 100",
    );
    expect_server_error(
        conn.write(0, &junk[..100], false),
        &[wire::EINVAL],
        "write of 100 bytes",
    );
    expect_server_error(
        conn.read(4096 + 7, 4096).map(|_| ()),
        &[wire::EINVAL],
        "read at offset 4103",
    );
    expect_server_error(
        conn.trim(512 + 1, 4096),
        &[wire::EINVAL],
        "trim at offset 513",
    );

    // Unknown command type: EINVAL and the connection goes on.
    let reply = conn
        .request(0x42, 0, 0, 4096, &[])
        .expect("reply to unknown command");
    assert_eq!(reply.error, wire::EINVAL, "unknown command type");

    // The connection survived all of that and sees the data unchanged.
    let head = conn.read(0, PROBE_LEN as u32).expect("read after errors");
    assert!(
        head.iter().all(|byte| *byte == HEAD_PATTERN),
        "head changed"
    );
    let tail = conn
        .read(size - PROBE_LEN, PROBE_LEN as u32)
        .expect("read tail after errors");
    assert!(
        tail.iter().all(|byte| *byte == TAIL_PATTERN),
        "tail changed"
    );

    // Oversized READ (64 MiB > the 32 MiB maximum): an error reply, or a closed connection.
    match conn.read(0, (64 * MIB) as u32) {
        Err(NbdError::Server(errno)) => assert!(
            [wire::EINVAL, wire::EOVERFLOW].contains(&errno),
            "errno {errno}"
        ),
        Err(NbdError::Io(_)) => {}
        other => panic!("64 MiB read: {:?}", other.map(|data| data.len())),
    }
    drop(conn);
    fixture.assert_healthy("oversized read");

    // Oversized WRITE with its full payload: must not be written, whether the server answers
    // an error (after reading the payload) or drops the connection.
    let mut conn = fixture.conn();
    let big = vec![0xeeu8; (64 * MIB) as usize];
    match conn.write(0, &big, true) {
        Err(NbdError::Server(errno)) => {
            assert!(
                [wire::EINVAL, wire::EOVERFLOW, wire::ENOSPC].contains(&errno),
                "errno {errno}"
            )
        }
        Err(NbdError::Io(_)) => {}
        other => panic!("64 MiB write: {other:?}"),
    }
    drop(conn);
    fixture.assert_healthy("oversized write");

    // A write header whose payload never comes: the server must not apply a partial write.
    let mut conn = fixture.conn();
    let header = wire::request_bytes(0, wire::CMD_WRITE, 99, 0, 65536);
    conn.stream().write_all(&header).expect("write header");
    conn.stream()
        .write_all(&junk[..1000])
        .expect("partial payload");
    drop(conn);
    fixture.assert_healthy("truncated write payload");
}

#[test]
fn garbage_mid_stream_closes_only_that_connection() {
    let mut fixture = Fixture::new();
    let mut bystander = fixture.conn();
    let mut conn = fixture.conn();
    conn.read(0, 4096).expect("first read");
    // A request header with a wrong magic: the protocol leaves no way to resynchronise.
    let mut garbage = [0u8; 28];
    for (index, byte) in garbage.iter_mut().enumerate() {
        *byte = (index as u8).wrapping_mul(37) ^ 0x5c;
    }
    conn.stream().write_all(&garbage).expect("garbage");
    conn.stream().write_all(&vec![0xeeu8; 4096]).ok();
    assert!(
        wire::is_closed(conn.stream()),
        "server kept a connection after a bad request magic"
    );
    // Another connection open at the same time is unaffected.
    let head = bystander.read(0, PROBE_LEN as u32).expect("bystander read");
    assert!(head.iter().all(|byte| *byte == HEAD_PATTERN));
    bystander.disconnect();
    fixture.assert_healthy("garbage mid-stream");

    // Half a request header, then hang up.
    let mut conn = fixture.conn();
    let header = wire::request_bytes(0, wire::CMD_WRITE, 5, 0, 4096);
    conn.stream().write_all(&header[..13]).expect("half header");
    drop(conn);
    fixture.assert_healthy("half a request header");
}
