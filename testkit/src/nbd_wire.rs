//! A small, independent, blocking NBD client written from the protocol document
//! (github.com/NetworkBlockDevice/nbd, doc/proto.md), so the tests do not trust the daemon's own
//! codec to check the daemon. It speaks fixed newstyle, NBD_OPT_GO and simple replies only, and
//! can also send hand-built bytes for the malformed-input tests.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1;

pub const TRANSMIT_HAS_FLAGS: u16 = 1;
pub const TRANSMIT_READ_ONLY: u16 = 2;
pub const TRANSMIT_SEND_FLUSH: u16 = 4;
pub const TRANSMIT_SEND_FUA: u16 = 8;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Every blocking read or write on a test connection gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub enum NbdError {
    /// The connection failed (closed, reset, timed out).
    Io(io::Error),
    /// The server answered the request with this NBD error number.
    Server(u32),
    /// The server sent something the protocol does not allow.
    Protocol(String),
}

impl From<io::Error> for NbdError {
    fn from(error: io::Error) -> Self {
        NbdError::Io(error)
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Io(error) => write!(f, "I/O error: {error}"),
            NbdError::Server(errno) => write!(f, "server error {errno}"),
            NbdError::Protocol(text) => write!(f, "protocol violation: {text}"),
        }
    }
}

/// A byte stream the client can run over.
pub trait Stream: Read + Write + Send {}
impl Stream for UnixStream {}
impl Stream for TcpStream {}

pub fn connect_unix_raw(path: &Path) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

pub fn connect_tcp_raw(addr: &str) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub fn read_u16(stream: &mut dyn Stream) -> io::Result<u16> {
    let mut bytes = [0u8; 2];
    stream.read_exact(&mut bytes)?;
    Ok(u16::from_be_bytes(bytes))
}

pub fn read_u32(stream: &mut dyn Stream) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

pub fn read_u64(stream: &mut dyn Stream) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

/// Reads the server greeting and answers with fixed newstyle + no zeroes.
pub fn client_greeting(stream: &mut dyn Stream) -> Result<u16, NbdError> {
    let magic = read_u64(stream)?;
    if magic != NBDMAGIC {
        return Err(NbdError::Protocol(format!("bad NBDMAGIC {magic:#x}")));
    }
    let opt_magic = read_u64(stream)?;
    if opt_magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!("not newstyle: {opt_magic:#x}")));
    }
    let handshake_flags = read_u16(stream)?;
    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "server is not fixed newstyle".to_string(),
        ));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (handshake_flags & FLAG_NO_ZEROES));
    stream.write_all(&client_flags.to_be_bytes())?;
    Ok(handshake_flags)
}

pub fn send_option(stream: &mut dyn Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(16 + data.len());
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(
        &u32::try_from(data.len())
            .expect("option fits u32")
            .to_be_bytes(),
    );
    bytes.extend_from_slice(data);
    stream.write_all(&bytes)
}

/// One option reply: (option, reply type, data).
pub fn read_option_reply(stream: &mut dyn Stream) -> Result<(u32, u32, Vec<u8>), NbdError> {
    let magic = read_u64(stream)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let option = read_u32(stream)?;
    let reply_type = read_u32(stream)?;
    let length = read_u32(stream)?;
    // The spec lets servers send error strings; anything above 64 KiB in a test is a bug.
    if length > 64 * 1024 {
        return Err(NbdError::Protocol(format!(
            "option reply of {length} bytes"
        )));
    }
    let mut data = vec![0u8; length as usize];
    stream.read_exact(&mut data)?;
    Ok((option, reply_type, data))
}

/// What NBD_OPT_GO told about the export.
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub transmission_flags: u16,
    pub block_size_min: Option<u32>,
    pub block_size_preferred: Option<u32>,
    pub block_size_max: Option<u32>,
}

pub fn go_option_data(export: &str, info_requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(
        &u32::try_from(export.len())
            .expect("name fits")
            .to_be_bytes(),
    );
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(
        &u16::try_from(info_requests.len())
            .expect("few")
            .to_be_bytes(),
    );
    for request in info_requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// Sends NBD_OPT_GO and reads replies up to the ACK (or the first error reply).
pub fn opt_go(stream: &mut dyn Stream, export: &str) -> Result<ExportInfo, NbdError> {
    send_option(stream, OPT_GO, &go_option_data(export, &[INFO_BLOCK_SIZE]))?;
    let mut info = ExportInfo::default();
    let mut saw_export_info = false;
    // Bounded: a server sends a handful of INFO replies before ACK.
    for _ in 0..64 {
        let (option, reply_type, data) = read_option_reply(stream)?;
        if option != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "reply for option {option}, expected GO"
            )));
        }
        match reply_type {
            REP_ACK => {
                if !saw_export_info {
                    return Err(NbdError::Protocol(
                        "GO acked without NBD_INFO_EXPORT".to_string(),
                    ));
                }
                return Ok(info);
            }
            REP_INFO => {
                if data.len() < 2 {
                    return Err(NbdError::Protocol("short INFO reply".to_string()));
                }
                let info_type = u16::from_be_bytes([data[0], data[1]]);
                if info_type == INFO_EXPORT && data.len() == 12 {
                    info.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    info.transmission_flags = u16::from_be_bytes([data[10], data[11]]);
                    saw_export_info = true;
                } else if info_type == INFO_BLOCK_SIZE && data.len() == 14 {
                    info.block_size_min =
                        Some(u32::from_be_bytes(data[2..6].try_into().expect("4")));
                    info.block_size_preferred =
                        Some(u32::from_be_bytes(data[6..10].try_into().expect("4")));
                    info.block_size_max =
                        Some(u32::from_be_bytes(data[10..14].try_into().expect("4")));
                }
            }
            error if error & (1 << 31) != 0 => return Err(NbdError::Server(error)),
            other => {
                return Err(NbdError::Protocol(format!(
                    "unexpected GO reply type {other}"
                )))
            }
        }
    }
    Err(NbdError::Protocol("more than 64 replies to GO".to_string()))
}

/// A reply to one transmission request.
#[derive(Debug)]
pub struct Reply {
    pub error: u32,
    pub handle: u64,
    pub data: Vec<u8>,
}

/// Encodes one transmission request header (28 bytes).
pub fn request_bytes(flags: u16, command: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut bytes = [0u8; 28];
    bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bytes[4..6].copy_from_slice(&flags.to_be_bytes());
    bytes[6..8].copy_from_slice(&command.to_be_bytes());
    bytes[8..16].copy_from_slice(&handle.to_be_bytes());
    bytes[16..24].copy_from_slice(&offset.to_be_bytes());
    bytes[24..28].copy_from_slice(&length.to_be_bytes());
    bytes
}

/// Reads a simple reply; `read_len` is how many data bytes follow a successful READ reply.
pub fn read_simple_reply(stream: &mut dyn Stream, read_len: usize) -> Result<Reply, NbdError> {
    let magic = read_u32(stream)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!("bad reply magic {magic:#x}")));
    }
    let error = read_u32(stream)?;
    let handle = read_u64(stream)?;
    let mut data = Vec::new();
    if error == 0 && read_len > 0 {
        data = vec![0u8; read_len];
        stream.read_exact(&mut data)?;
    }
    Ok(Reply {
        error,
        handle,
        data,
    })
}

/// An NBD connection in transmission phase, one request at a time.
pub struct NbdConn {
    stream: Box<dyn Stream>,
    pub info: ExportInfo,
    next_handle: u64,
}

impl NbdConn {
    pub fn connect_unix(path: &Path, export: &str) -> Result<NbdConn, NbdError> {
        NbdConn::handshake(Box::new(connect_unix_raw(path)?), export)
    }

    pub fn connect_tcp(addr: &str, export: &str) -> Result<NbdConn, NbdError> {
        NbdConn::handshake(Box::new(connect_tcp_raw(addr)?), export)
    }

    pub fn handshake(mut stream: Box<dyn Stream>, export: &str) -> Result<NbdConn, NbdError> {
        client_greeting(stream.as_mut())?;
        let info = opt_go(stream.as_mut(), export)?;
        Ok(NbdConn {
            stream,
            info,
            next_handle: 1,
        })
    }

    /// Access to the raw stream, for tests that send hand-built bytes mid-session.
    pub fn stream(&mut self) -> &mut dyn Stream {
        self.stream.as_mut()
    }

    /// Sends one request and waits for its reply; checks the handle echo.
    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Reply, NbdError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let header = request_bytes(flags, command, handle, offset, length);
        let mut bytes = Vec::with_capacity(28 + payload.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(payload);
        self.stream.write_all(&bytes)?;
        let read_len = if command == CMD_READ {
            length as usize
        } else {
            0
        };
        let reply = read_simple_reply(self.stream.as_mut(), read_len)?;
        if reply.handle != handle {
            return Err(NbdError::Protocol(format!(
                "reply handle {} for request {handle}",
                reply.handle
            )));
        }
        Ok(reply)
    }

    fn check(reply: Reply) -> Result<Vec<u8>, NbdError> {
        if reply.error != 0 {
            return Err(NbdError::Server(reply.error));
        }
        Ok(reply.data)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        let reply = self.request(CMD_READ, 0, offset, length, &[])?;
        NbdConn::check(reply)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let length = u32::try_from(data.len()).expect("write fits u32");
        let reply = self.request(CMD_WRITE, flags, offset, length, data)?;
        NbdConn::check(reply).map(|_| ())
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        let reply = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        NbdConn::check(reply).map(|_| ())
    }

    pub fn trim(&mut self, offset: u64, length: u32) -> Result<(), NbdError> {
        let reply = self.request(CMD_TRIM, 0, offset, length, &[])?;
        NbdConn::check(reply).map(|_| ())
    }

    pub fn write_zeroes(&mut self, offset: u64, length: u32) -> Result<(), NbdError> {
        let reply = self.request(CMD_WRITE_ZEROES, 0, offset, length, &[])?;
        NbdConn::check(reply).map(|_| ())
    }

    /// NBD_CMD_DISC: the server sends no reply and closes.
    pub fn disconnect(mut self) {
        let header = request_bytes(0, CMD_DISC, self.next_handle, 0, 0);
        let _ = self.stream.write_all(&header);
    }
}

/// True if the peer has closed the stream (EOF or reset) within the read timeout.
pub fn is_closed(stream: &mut dyn Stream) -> bool {
    let mut buffer = [0u8; 512];
    // Bounded: each read either returns data, EOF, an error, or times out after IO_TIMEOUT.
    for _ in 0..64 {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error)
                if error.kind() == io::ErrorKind::WouldBlock
                    || error.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}
