//! A real HTTP/1.1 client over loopback TCP, with what real clients do to a server: wait for the
//! answer, give up waiting after a timeout, or hang up mid-request.
//!
//! Every request is sent with `Connection: close`, so an answer is read to the end of the
//! connection. Shared by the tests of `idem-tests` and of `idem-examples` (which includes this
//! file by path).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A request to send.
#[derive(Clone, Debug)]
pub struct Request {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    /// `POST path` with a JSON `body`.
    pub fn post(path: &str, body: &str) -> Self {
        Self {
            method: "POST",
            path: path.to_owned(),
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.to_owned(),
        }
    }

    /// `GET path`.
    pub fn get(path: &str) -> Self {
        Self {
            method: "GET",
            path: path.to_owned(),
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// The same request with one more header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The same request with its `Content-Type` replaced.
    #[must_use]
    pub fn content_type(mut self, value: &str) -> Self {
        self.headers.retain(|(name, _)| name != "content-type");
        self.headers
            .push(("content-type".to_owned(), value.to_owned()));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
            self.method,
            self.path,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// A response read whole.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Answer {
    /// The first value of the header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the answer is a replay (`Idempotent-Replayed: true`).
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The problem type of a problem+json answer (`None` for any other answer).
    pub fn problem_type(&self) -> Option<String> {
        if self.header("content-type") != Some("application/problem+json") {
            return None;
        }
        self.json()["type"].as_str().map(str::to_owned)
    }

    /// `Retry-After`, in seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")?.parse().ok()
    }

    fn parse(raw: &[u8]) -> io::Result<Self> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
        let split = raw
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .ok_or_else(|| bad("no end of the head"))?;
        let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| bad("no status line"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"))
        {
            body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
        }
        Ok(Self {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = body.windows(2).position(|window| window == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line]).ok()?.trim(), 16).ok()?;
        body = &body[line + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// Sends `request` to `addr` and reads the whole answer.
pub async fn send(addr: SocketAddr, request: &Request) -> io::Result<Answer> {
    let mut connection = TcpStream::connect(addr).await?;
    connection.write_all(&request.bytes()).await?;
    let mut raw = Vec::new();
    connection.read_to_end(&mut raw).await?;
    Answer::parse(&raw)
}

/// Sends `request` and waits at most `timeout` for the answer; `None` if the client gave up
/// and hung up, as an HTTP client with a timeout does.
pub async fn send_within(
    addr: SocketAddr,
    request: &Request,
    timeout: Duration,
) -> io::Result<Option<Answer>> {
    match tokio::time::timeout(timeout, send(addr, request)).await {
        Ok(answer) => answer.map(Some),
        Err(_) => Ok(None),
    }
}

/// Sends `request`, waits `after`, and hangs up without reading the answer.
pub async fn hang_up_after(addr: SocketAddr, request: &Request, after: Duration) -> io::Result<()> {
    let mut connection = TcpStream::connect(addr).await?;
    connection.write_all(&request.bytes()).await?;
    tokio::time::sleep(after).await;
    drop(connection);
    Ok(())
}

/// Sends `request` until it gets an answer that is not `409` (the first is still running),
/// waiting 50 ms between tries, for at most `within`.
pub async fn send_until_settled(
    addr: SocketAddr,
    request: &Request,
    within: Duration,
) -> io::Result<Answer> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = send(addr, request).await?;
        if answer.status != 409 || tokio::time::Instant::now() >= deadline {
            return Ok(answer);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `router` on a fresh loopback port until the test's runtime ends.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// How many requests the server dropped before they finished — their client hung up, and
/// hyper dropped the request's future — counted by [`watch`].
#[derive(Clone, Debug, Default)]
pub struct CutOffs(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl CutOffs {
    /// The count so far.
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the count passes `than`, for at most `within`; whether it did.
    pub async fn passes(&self, than: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.count() <= than {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// `router` with every request watched: one whose future is dropped before it finished is
/// counted in the returned [`CutOffs`]. Put it outside the layers under test.
pub fn watch(router: axum::Router) -> (axum::Router, CutOffs) {
    struct Watch(Option<CutOffs>);
    impl Drop for Watch {
        fn drop(&mut self) {
            if let Some(cut_offs) = self.0.take() {
                cut_offs.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    async fn watched(
        axum::extract::State(cut_offs): axum::extract::State<CutOffs>,
        request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        let mut watch = Watch(Some(cut_offs));
        let response = next.run(request).await;
        watch.0 = None;
        response
    }
    let cut_offs = CutOffs::default();
    let router = router.layer(axum::middleware::from_fn_with_state(
        cut_offs.clone(),
        watched,
    ));
    (router, cut_offs)
}
