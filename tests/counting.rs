//! A TCP proxy on loopback that counts the round trips between a client and a real server, and
//! names the requests the client sent.
//!
//! A **round trip** (an *exchange*) is one turn of the conversation: the client sends one or
//! more bytes, then the server answers. The proxy counts an exchange when the server's first
//! bytes after a client turn arrive, so it does not depend on how TCP cut the bytes into
//! segments, nor on how many protocol messages a driver packed into one turn (sqlx's extended
//! protocol sends PostgreSQL's `Bind`, `Execute` and `Sync` together: one exchange). A client
//! that pipelines a second request before the first answer would count once for both; the
//! requests each exchange carried are therefore named too, from the protocol:
//!
//! * **PostgreSQL** — every frontend message by its type byte (`Parse`, `Bind`, `Describe`,
//!   `Execute`, `Sync`, `Query` with the first word of its SQL, …), after the untyped startup
//!   packets;
//! * **MySQL / MariaDB** — every command-phase packet (sequence id 0) by its command byte
//!   (`COM_QUERY`, `COM_STMT_PREPARE`, `COM_STMT_EXECUTE`, `COM_PING`, …);
//! * **Redis** — every RESP array by its command name (`EVALSHA`, `SCRIPT`, …).
//!
//! The proxied URLs turn TLS off (`sslmode=disable`, `ssl-mode=disabled`): the proxy must read
//! the protocol in the clear.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The wire protocol the proxy reads requests in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// PostgreSQL's frontend/backend protocol 3.
    Postgres,
    /// MySQL's client/server protocol.
    MySql,
    /// RESP (Redis).
    Redis,
}

/// The traffic so far: how many exchanges, and the requests the client sent, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Exchanges (round trips) completed: client turns the server answered.
    pub exchanges: usize,
    /// The requests, by name, in the order the client sent them.
    pub requests: Vec<String>,
}

impl Traffic {
    /// What happened after `earlier` (a snapshot of the same proxy).
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            exchanges: self.exchanges - earlier.exchanges,
            requests: self.requests[earlier.requests.len()..].to_vec(),
        }
    }
}

/// A counting proxy to one server; stops (and closes its connections) when dropped.
pub struct CountingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    protocol: Protocol,
    traffic: Mutex<Traffic>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn traffic(&self) -> MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CountingProxy {
    /// A proxy on `127.0.0.1:0` forwarding to `upstream`, reading `protocol`.
    pub async fn start(upstream: SocketAddr, protocol: Protocol) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            protocol,
            traffic: Mutex::new(Traffic::default()),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// A proxy in front of the server of `url` (port `default_port` if it names none), and
    /// `url` rewritten to go through it with TLS turned off.
    pub async fn in_front_of(
        url: &str,
        default_port: u16,
        protocol: Protocol,
    ) -> io::Result<(Self, String)> {
        let (upstream, _) = crate::proxy::through(
            url,
            default_port,
            "127.0.0.1:1".parse().map_err(io::Error::other)?,
        );
        let proxy = Self::start(crate::proxy::resolve(&upstream).await?, protocol).await?;
        let (_, proxied) = crate::proxy::through(url, default_port, proxy.addr);
        let proxied = match protocol {
            Protocol::Postgres => with_param(&proxied, "sslmode=disable"),
            Protocol::MySql => with_param(&proxied, "ssl-mode=disabled"),
            Protocol::Redis => proxied,
        };
        Ok((proxy, proxied))
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The traffic so far.
    pub fn traffic(&self) -> Traffic {
        self.shared.traffic().clone()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let connections = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for connection in connections.iter() {
            connection.abort();
        }
    }
}

/// `url` with the query parameter `param` added.
fn with_param(url: &str, param: &str) -> String {
    if url.contains('?') {
        format!("{url}&{param}")
    } else {
        format!("{url}?{param}")
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue; // a client that went away before it was accepted
        };
        let connection = tokio::spawn(forward(client, shared.clone()));
        shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(connection);
    }
}

/// Whose turn it is on one connection.
#[derive(Default)]
struct Turn {
    /// The client sent bytes the server has not begun to answer.
    client_spoke: bool,
}

async fn forward(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return; // the real server is down: close the client's connection
    };
    // Small messages go out at once, as without the proxy; failing to set it only slows.
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let turn = Arc::new(Mutex::new(Turn::default()));
    tokio::join!(
        requests(client_read, server_write, shared.clone(), turn.clone()),
        answers(server_read, client_write, shared, turn),
    );
}

/// Client to server: notes the turn and names the requests before passing them on (so they
/// are counted before the server can answer them).
async fn requests(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    turn: Arc<Mutex<Turn>>,
) {
    let mut framer = Framer::new(shared.protocol);
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let named = framer.push(&buffer[..read]);
        turn.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .client_spoke = true;
        shared.traffic().requests.extend(named);
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Server to client: the first bytes after a client turn complete an exchange, counted before
/// they are passed on (so the client's call has not returned yet when it is counted).
async fn answers(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    turn: Arc<Mutex<Turn>>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        {
            let mut turn = turn.lock().unwrap_or_else(PoisonError::into_inner);
            if turn.client_spoke {
                turn.client_spoke = false;
                shared.traffic().exchanges += 1;
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Cuts the client's byte stream into protocol messages and names them.
struct Framer {
    protocol: Protocol,
    pending: Vec<u8>,
    /// PostgreSQL: still in the untyped startup packets.
    startup: bool,
}

impl Framer {
    fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            pending: Vec::new(),
            startup: true,
        }
    }

    /// Takes more bytes and returns the names of the messages they completed.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut named = Vec::new();
        loop {
            let next = match self.protocol {
                Protocol::Postgres => self.postgres(),
                Protocol::MySql => mysql(&self.pending),
                Protocol::Redis => redis(&self.pending),
            };
            let Some((length, name)) = next else { break };
            self.pending.drain(..length);
            named.extend(name);
        }
        named
    }

    /// The next PostgreSQL frontend message: its length and name.
    fn postgres(&mut self) -> Option<(usize, Option<String>)> {
        const SSL_REQUEST: u32 = 80_877_103;
        const GSSENC_REQUEST: u32 = 80_877_104;
        if self.startup {
            // Untyped: length (with itself), then a code or the protocol version.
            let length = read_u32(&self.pending, 0)? as usize;
            let code = read_u32(&self.pending, 4)?;
            if self.pending.len() < length {
                return None;
            }
            if code != SSL_REQUEST && code != GSSENC_REQUEST {
                self.startup = false; // the StartupMessage: typed messages follow
            }
            return Some((length, None));
        }
        let kind = *self.pending.first()?;
        let length = 1 + read_u32(&self.pending, 1)? as usize;
        if self.pending.len() < length {
            return None;
        }
        let name = match kind {
            b'P' => "Parse".to_owned(),
            b'B' => "Bind".to_owned(),
            b'D' => "Describe".to_owned(),
            b'E' => "Execute".to_owned(),
            b'S' => "Sync".to_owned(),
            b'H' => "Flush".to_owned(),
            b'C' => "Close".to_owned(),
            b'X' => "Terminate".to_owned(),
            b'Q' => {
                let sql = String::from_utf8_lossy(&self.pending[5..length]);
                let word = sql.split_whitespace().next().unwrap_or("").to_owned();
                format!("Query({word})")
            }
            other => format!("'{}'", other as char),
        };
        Some((length, Some(name)))
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
}

/// The next MySQL packet: its length and, for a command (sequence id 0), its name.
fn mysql(bytes: &[u8]) -> Option<(usize, Option<String>)> {
    let header = bytes.get(..4)?;
    let length =
        4 + (usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16);
    if bytes.len() < length {
        return None;
    }
    if header[3] != 0 || length == 4 {
        return Some((length, None)); // the handshake answer, or a continuation
    }
    let name = match bytes[4] {
        0x01 => "COM_QUIT".to_owned(),
        0x02 => "COM_INIT_DB".to_owned(),
        0x03 => "COM_QUERY".to_owned(),
        0x0e => "COM_PING".to_owned(),
        0x16 => "COM_STMT_PREPARE".to_owned(),
        0x17 => "COM_STMT_EXECUTE".to_owned(),
        0x19 => "COM_STMT_CLOSE".to_owned(),
        0x1a => "COM_STMT_RESET".to_owned(),
        0x1f => "COM_RESET_CONNECTION".to_owned(),
        other => format!("COM_{other:#04x}"),
    };
    Some((length, Some(name)))
}

/// The next RESP command (an array of bulk strings): its length and name.
fn redis(bytes: &[u8]) -> Option<(usize, Option<String>)> {
    fn line(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&bytes[at..at + end], at + end + 2))
    }
    fn number(text: &[u8]) -> Option<usize> {
        std::str::from_utf8(text).ok()?.parse().ok()
    }
    let (header, mut at) = line(bytes, 0)?;
    let Some(count) = header.strip_prefix(b"*").and_then(number) else {
        // Not an array: an inline command, named by its first word.
        let name = String::from_utf8_lossy(header)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_uppercase();
        return Some((at, Some(name)));
    };
    let mut name = None;
    for _ in 0..count {
        let (size, body) = line(bytes, at)?;
        let size = size.strip_prefix(b"$").and_then(number)?;
        if bytes.len() < body + size + 2 {
            return None;
        }
        if name.is_none() {
            name = Some(String::from_utf8_lossy(&bytes[body..body + size]).to_uppercase());
        }
        at = body + size + 2;
    }
    Some((at, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_messages_across_reads() {
        let mut pg = Framer::new(Protocol::Postgres);
        let startup = [0, 0, 0, 8, 0, 3, 0, 0];
        assert!(pg.push(&startup).is_empty());
        let sync = [b'S', 0, 0, 0, 4];
        let bind = [b'B', 0, 0, 0, 6, 1, 2];
        assert!(pg.push(&bind[..3]).is_empty());
        assert_eq!(pg.push(&[&bind[3..], &sync[..]].concat()), ["Bind", "Sync"]);

        let mut my = Framer::new(Protocol::MySql);
        assert_eq!(
            my.push(&[5, 0, 0, 0, 0x17, 1, 0, 0, 0]),
            ["COM_STMT_EXECUTE"]
        );
        assert!(my.push(&[1, 0, 0, 1, 9]).is_empty());

        let mut resp = Framer::new(Protocol::Redis);
        let evalsha = b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n";
        assert!(resp.push(&evalsha[..10]).is_empty());
        assert_eq!(resp.push(&evalsha[10..]), ["EVALSHA"]);
    }
}
