//! A TCP proxy on loopback between a client and a real server, with the faults of an outage.
//!
//! The stores under test are built on pools and connection managers pointed at the proxy, so
//! the real drivers meet real disconnects and silences:
//!
//! * [`FaultProxy::cut`] — the server is down: every open connection is closed at once and
//!   every new one is reset as soon as it is accepted;
//! * [`FaultProxy::stall`] — a black-holed network: connections are accepted, but nothing is
//!   forwarded either way (bytes already sent wait in the proxy), so only the clients'
//!   timeouts can end a call;
//! * [`FaultProxy::restore`] — forwarding resumes, on the connections that survived (a stall)
//!   and on new ones.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Open,
    /// Accepts connections, forwards nothing.
    Stalled,
    /// Resets new connections; the open ones were closed when it was cut.
    Cut,
}

/// A loopback proxy to one server; stops (and closes its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// The mode and the token that closes the connections accepted under it, changed together
    /// so that no connection accepted before a cut outlives it.
    state: Mutex<(Mode, CancellationToken)>,
    /// The mode, for the connections to wait on while stalled.
    mode: watch::Sender<Mode>,
    accepted: AtomicUsize,
    reset: AtomicUsize,
    /// Bytes whose next appearance in what a client sends cuts the proxy before they reach
    /// the server.
    trigger: Mutex<Option<&'static [u8]>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, (Mode, CancellationToken)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `sent` trips the armed trigger (which it then disarms).
    fn trips(&self, sent: &[u8]) -> bool {
        let mut trigger = self.trigger.lock().unwrap_or_else(PoisonError::into_inner);
        match *trigger {
            Some(pattern) if sent.windows(pattern.len()).any(|window| window == pattern) => {
                *trigger = None;
                true
            }
            _ => false,
        }
    }

    fn set(&self, mode: Mode) {
        let mut state = self.state();
        if mode == Mode::Cut {
            // Close every connection accepted so far; later ones get a fresh token.
            state.1.cancel();
            state.1 = CancellationToken::new();
        }
        state.0 = mode;
        self.mode.send_replace(mode);
    }
}

impl FaultProxy {
    /// A proxy on `127.0.0.1:0` forwarding to `upstream`, open.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new((Mode::Open, CancellationToken::new())),
            mode: watch::Sender::new(Mode::Open),
            accepted: AtomicUsize::new(0),
            reset: AtomicUsize::new(0),
            trigger: Mutex::new(None),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server goes down: open connections are closed now, new ones are reset.
    pub fn cut(&self) {
        self.shared.set(Mode::Cut);
    }

    /// The server goes down the moment a client sends `pattern` (say `b"COMMIT"`): the bytes
    /// that hold it are not forwarded, and the proxy is [`cut`](Self::cut) as if the server had
    /// died just before they arrived. Once.
    pub fn cut_before(&self, pattern: &'static [u8]) {
        *self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(pattern);
    }

    /// The network goes silent: nothing is forwarded until [`restore`](Self::restore) (or a
    /// cut, which closes the connections).
    pub fn stall(&self) {
        self.shared.set(Mode::Stalled);
    }

    /// The server and the network are back.
    pub fn restore(&self) {
        self.shared.set(Mode::Open);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.state().0
    }

    /// How many connections were accepted and forwarded (or held, while stalled).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// How many connections were reset because the proxy was cut.
    pub fn reset(&self) -> usize {
        self.shared.reset.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.state().1.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // A client that went away before it was accepted: nothing to forward.
            Err(_) => continue,
        };
        let (mode, closed) = {
            let state = shared.state();
            (state.0, state.1.clone())
        };
        if mode == Mode::Cut {
            // A reset, as from a port nobody listens on any more. Setting it can only fail on
            // a socket that is already gone.
            let _ = client.set_zero_linger();
            drop(client);
            shared.reset.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let mode = shared.mode.subscribe();
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = closed.cancelled() => {}
                () = forward(client, &shared, mode) => {}
            }
            // Both sockets are dropped here: closed, as by a server that went away.
        });
    }
}

async fn forward(client: TcpStream, shared: &Shared, mode: watch::Receiver<Mode>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return; // the real server is down: close the client's connection
    };
    // Small messages go out at once, as without the proxy; failing to set it only slows.
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, mode.clone(), Some(shared)),
        pump(server_read, client_write, mode, None),
    );
}

/// Copies one direction until end of file or an error, holding the bytes while stalled; on the
/// way to the server (`trigger`), cuts the proxy instead of forwarding what trips it.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    trigger: Option<&Shared>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        if mode.wait_for(|mode| *mode != Mode::Stalled).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        // Read just before a stall: held until the network is back.
        if mode.wait_for(|mode| *mode != Mode::Stalled).await.is_err() {
            return;
        }
        if let Some(shared) = trigger
            && shared.trips(&buffer[..read])
        {
            shared.set(Mode::Cut);
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    // Pass the end of file on; the other side may have gone already.
    let _ = to.shutdown().await;
}

/// The `host:port` of a URL such as `postgres://user@host:port/db` (the port defaulting to
/// `default_port`), and the URL with that part replaced by `proxy`.
pub fn through(url: &str, default_port: u16, proxy: SocketAddr) -> (String, String) {
    let start = url.find("://").map_or(0, |at| at + 3);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |at| start + at);
    let host_start = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    let host = &url[host_start..end];
    let upstream = if host
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    };
    let proxied = format!("{}{proxy}{}", &url[..host_start], &url[end..]);
    (upstream, proxied)
}

/// A proxy in front of the server at `url` (a database or Redis URL, `default_port` when it
/// names none), and the same URL through the proxy.
pub async fn in_front_of(url: &str, default_port: u16) -> (FaultProxy, String) {
    let placeholder = SocketAddr::from(([127, 0, 0, 1], 1));
    let (upstream, _) = through(url, default_port, placeholder);
    let upstream = resolve(&upstream)
        .await
        .unwrap_or_else(|error| panic!("resolve {upstream}: {error}"));
    let proxy = FaultProxy::start(upstream).await.expect("start the proxy");
    let (_, proxied) = through(url, default_port, proxy.addr());
    (proxy, proxied)
}

/// The first address `host:port` resolves to.
pub async fn resolve(host_port: &str) -> io::Result<SocketAddr> {
    tokio::net::lookup_host(host_port)
        .await?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host_port} resolves to nothing"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_the_host_of_a_url() {
        let proxy: SocketAddr = "127.0.0.1:4000".parse().expect("address");
        assert_eq!(
            through("postgres://postgres@127.0.0.1:5432/test", 5432, proxy),
            (
                "127.0.0.1:5432".to_owned(),
                "postgres://postgres@127.0.0.1:4000/test".to_owned()
            )
        );
        assert_eq!(
            through("redis://127.0.0.1/", 6379, proxy),
            (
                "127.0.0.1:6379".to_owned(),
                "redis://127.0.0.1:4000/".to_owned()
            )
        );
        assert_eq!(
            through(
                "mysql://root:p%40ss@localhost:3306/test?ssl-mode=disabled",
                3306,
                proxy
            ),
            (
                "localhost:3306".to_owned(),
                "mysql://root:p%40ss@127.0.0.1:4000/test?ssl-mode=disabled".to_owned()
            )
        );
    }
}
