//! Ferry's own NBD client, for `ferry demo` and for tests.
//!
//! Fixed newstyle handshake with NBD_OPT_GO, simple replies only. Requests can be pipelined:
//! `send_*` returns the request's cookie and `recv_reply` yields replies in whatever order the
//! server sends them. The client checks nothing about alignment or range on purpose, so tests
//! can send the server any request they like.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use ferry_protocol::nbd as proto;
use ferry_protocol::nbd::{Command, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Requests one client keeps in flight at most; sending more is refused, not queued.
pub const PENDING_REQUESTS_MAX: usize = 1024;

/// What can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation by the server: {0}")]
    Protocol(#[from] proto::NbdError),
    #[error("server refused option {option} with reply type {reply_type:#x}: {message}")]
    OptionRefused {
        option: u32,
        reply_type: u32,
        message: String,
    },
    #[error("server does not speak fixed newstyle NBD")]
    NotFixedNewstyle,
    #[error("server answered the request with NBD error {errno}")]
    Request { errno: u32 },
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("{PENDING_REQUESTS_MAX} requests already in flight")]
    TooManyPending,
}

impl NbdClientError {
    /// The NBD error value, when the server refused a request.
    pub fn errno(&self) -> Option<u32> {
        match self {
            NbdClientError::Request { errno } => Some(*errno),
            _ => None,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// A request waiting for its reply: a READ's reply carries `length_bytes` of data.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: Command,
    length_bytes: u32,
}

/// One NBD connection in the transmission phase.
pub struct NbdClient {
    stream: Box<dyn Stream>,
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: Option<proto::BlockSizes>,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size_bytes", &self.size_bytes)
            .field("transmission_flags", &self.transmission_flags)
            .field("in_flight", &self.pending.len())
            .finish()
    }
}

impl NbdClient {
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
    ) -> Result<NbdClient, NbdClientError> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        NbdClient::handshake(Box::new(stream), export).await
    }

    pub async fn connect_tcp(
        address: impl tokio::net::ToSocketAddrs,
        export: &str,
    ) -> Result<NbdClient, NbdClientError> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        NbdClient::handshake(Box::new(stream), export).await
    }

    async fn handshake(
        mut stream: Box<dyn Stream>,
        export: &str,
    ) -> Result<NbdClient, NbdClientError> {
        let mut greeting = [0u8; proto::SERVER_GREETING_BYTES];
        stream.read_exact(&mut greeting).await?;
        let Some((handshake_flags, _)) = proto::decode_server_greeting(&greeting)? else {
            return Err(NbdClientError::Unexpected("short greeting".to_owned()));
        };
        if handshake_flags & proto::HANDSHAKE_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdClientError::NotFixedNewstyle);
        }
        let mut client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE;
        if handshake_flags & proto::HANDSHAKE_FLAG_NO_ZEROES != 0 {
            client_flags |= proto::CLIENT_FLAG_NO_ZEROES;
        }
        let mut out = Vec::with_capacity(64);
        proto::encode_client_flags(&mut out, client_flags);
        let mut data = Vec::new();
        proto::encode_info_request(&mut data, export, &[proto::INFO_BLOCK_SIZE]);
        proto::encode_option(&mut out, proto::OPT_GO, &data);
        stream.write_all(&out).await?;

        let mut export_info = None;
        let mut block_sizes = None;
        loop {
            let reply = read_option_reply(&mut stream).await?;
            if reply.option != proto::OPT_GO {
                return Err(NbdClientError::Unexpected(format!(
                    "reply to option {} during GO",
                    reply.option
                )));
            }
            match reply.reply_type {
                proto::REP_INFO => match proto::parse_info(&reply.data)? {
                    proto::Info::Export {
                        size_bytes,
                        transmission_flags,
                    } => export_info = Some((size_bytes, transmission_flags)),
                    proto::Info::BlockSize(sizes) => block_sizes = Some(sizes),
                    _ => {}
                },
                proto::REP_ACK => break,
                reply_type if proto::is_rep_error(reply_type) => {
                    return Err(NbdClientError::OptionRefused {
                        option: reply.option,
                        reply_type,
                        message: String::from_utf8_lossy(&reply.data).into_owned(),
                    });
                }
                other => {
                    return Err(NbdClientError::Unexpected(format!(
                        "option reply type {other:#x}"
                    )))
                }
            }
        }
        let Some((size_bytes, transmission_flags)) = export_info else {
            return Err(NbdClientError::Unexpected(
                "GO succeeded without NBD_INFO_EXPORT".to_owned(),
            ));
        };
        Ok(NbdClient {
            stream,
            size_bytes,
            transmission_flags,
            block_sizes,
            next_cookie: 1,
            pending: HashMap::new(),
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The server's block size constraints, if it sent them.
    pub fn block_sizes(&self) -> Option<proto::BlockSizes> {
        self.block_sizes
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sends any request (the cookie field is replaced by a fresh one, which is returned).
    /// `payload` is sent after the header as is; only a WRITE should carry one.
    pub async fn send_request(
        &mut self,
        mut request: Request,
        payload: &[u8],
    ) -> Result<u64, NbdClientError> {
        if self.pending.len() >= PENDING_REQUESTS_MAX {
            return Err(NbdClientError::TooManyPending);
        }
        request.cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut out = Vec::with_capacity(proto::REQUEST_BYTES + payload.len());
        proto::encode_request(&mut out, &request);
        out.extend_from_slice(payload);
        self.stream.write_all(&out).await?;
        // DISC has no reply.
        if request.kind != Command::Disc {
            self.pending.insert(
                request.cookie,
                Pending {
                    kind: request.kind,
                    length_bytes: request.length_bytes,
                },
            );
        }
        Ok(request.cookie)
    }

    pub async fn send_read(&mut self, offset: u64, len: u32) -> Result<u64, NbdClientError> {
        self.send_request(request(Command::Read, 0, offset, len), &[])
            .await
    }

    pub async fn send_write(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<u64, NbdClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdClientError::Unexpected("write over 4 GiB".to_owned()))?;
        self.send_request(request(Command::Write, fua_flag(fua), offset, len), data)
            .await
    }

    pub async fn send_write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<u64, NbdClientError> {
        self.send_request(
            request(Command::WriteZeroes, fua_flag(fua), offset, len),
            &[],
        )
        .await
    }

    pub async fn send_trim(
        &mut self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<u64, NbdClientError> {
        self.send_request(request(Command::Trim, fua_flag(fua), offset, len), &[])
            .await
    }

    pub async fn send_flush(&mut self) -> Result<u64, NbdClientError> {
        self.send_request(request(Command::Flush, 0, 0, 0), &[])
            .await
    }

    /// Waits for the next reply. The outer error is a broken connection; the inner result is
    /// the request's own outcome (a READ's data, empty for other commands).
    pub async fn recv_reply(
        &mut self,
    ) -> Result<(u64, Result<Vec<u8>, NbdClientError>), NbdClientError> {
        let mut header = [0u8; proto::SIMPLE_REPLY_BYTES];
        self.stream.read_exact(&mut header).await?;
        let Some((reply, _)) = proto::decode_simple_reply(&header)? else {
            return Err(NbdClientError::Unexpected("short reply header".to_owned()));
        };
        let Some(pending) = self.pending.remove(&reply.cookie) else {
            return Err(NbdClientError::Unexpected(format!(
                "reply for unknown cookie {}",
                reply.cookie
            )));
        };
        if reply.error != 0 {
            return Ok((
                reply.cookie,
                Err(NbdClientError::Request { errno: reply.error }),
            ));
        }
        let mut data = Vec::new();
        if pending.kind == Command::Read {
            // Bounded by what this client asked for, never by what the server claims.
            data.resize(pending.length_bytes as usize, 0);
            self.stream.read_exact(&mut data).await?;
        }
        Ok((reply.cookie, Ok(data)))
    }

    async fn complete(&mut self, cookie: u64) -> Result<Vec<u8>, NbdClientError> {
        let (got, result) = self.recv_reply().await?;
        if got != cookie {
            return Err(NbdClientError::Unexpected(format!(
                "reply for cookie {got} while waiting for {cookie}"
            )));
        }
        result
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdClientError> {
        let cookie = self.send_read(offset, len).await?;
        self.complete(cookie).await
    }

    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), NbdClientError> {
        let cookie = self.send_write(offset, data, fua).await?;
        self.complete(cookie).await.map(drop)
    }

    pub async fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), NbdClientError> {
        let cookie = self.send_write_zeroes(offset, len, fua).await?;
        self.complete(cookie).await.map(drop)
    }

    pub async fn trim(&mut self, offset: u64, len: u32, fua: bool) -> Result<(), NbdClientError> {
        let cookie = self.send_trim(offset, len, fua).await?;
        self.complete(cookie).await.map(drop)
    }

    pub async fn flush(&mut self) -> Result<(), NbdClientError> {
        let cookie = self.send_flush().await?;
        self.complete(cookie).await.map(drop)
    }

    /// Sends NBD_CMD_DISC (the soft disconnect) and closes the socket. The server finishes
    /// requests still in flight, but their replies are no longer read.
    pub async fn disconnect(mut self) -> Result<(), NbdClientError> {
        self.send_request(request(Command::Disc, 0, 0, 0), &[])
            .await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

fn request(kind: Command, flags: u16, offset: u64, length_bytes: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 0,
        offset,
        length_bytes,
    }
}

fn fua_flag(fua: bool) -> u16 {
    if fua {
        proto::CMD_FLAG_FUA
    } else {
        0
    }
}

async fn read_option_reply(
    stream: &mut Box<dyn Stream>,
) -> Result<proto::OptionReply, NbdClientError> {
    let mut bytes = vec![0u8; proto::OPTION_REPLY_HEADER_BYTES];
    stream.read_exact(&mut bytes).await?;
    loop {
        match proto::decode_option_reply(&bytes)? {
            Some((reply, _)) => return Ok(reply),
            None => {
                // The header is complete, so the missing part is the data; its length was
                // bounded by the decoder (OPTION_REPLY_DATA_BYTES_MAX) before we get here.
                let length_bytes =
                    u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as usize;
                let have = bytes.len();
                let want = proto::OPTION_REPLY_HEADER_BYTES + length_bytes;
                if want <= have {
                    return Err(NbdClientError::Unexpected(
                        "option reply decoder wanted no more bytes".to_owned(),
                    ));
                }
                bytes.resize(want, 0);
                stream.read_exact(&mut bytes[have..]).await?;
            }
        }
    }
}
