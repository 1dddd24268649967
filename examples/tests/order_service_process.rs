//! The order service as a user runs it — its binary, a real process — killed with `SIGKILL`
//! mid-create and restarted, on SQLite, PostgreSQL and MariaDB, and a soak of client timeouts
//! and retries while it is killed and restarted again and again. `POST /orders` runs in
//! `tx` mode, so a create either committed with its stored response or not at all: the
//! retries never make a second order.
//!
//! The service runs without Redis here (its relay keeps trying `redis://127.0.0.1:1/`), as it
//! must: the HTTP API does not need the event stream. Servers: `IDEM_POSTGRES_URL`,
//! `IDEM_MYSQL_URL` (loopback defaults); an unreachable one skips its test, or fails it under
//! `IDEM_REQUIRE_SERVERS=1` (scripts/test.sh).

#[path = "../../tests/http_client.rs"]
#[allow(dead_code, reason = "shared with idem-tests, which uses all of it")]
mod http_client;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_client::{Answer, Request, send, send_until_settled, send_within};
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

fn url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Whether `database_url` is reachable; when it is not, fails under `IDEM_REQUIRE_SERVERS=1`
/// and says the test is skipped otherwise.
async fn reachable<C: sqlx::Connection>(database_url: &str) -> bool {
    let error = match C::connect(database_url).await {
        Ok(connection) => {
            let _ = connection.close().await;
            return true;
        }
        Err(error) => error,
    };
    let problem = format!("{database_url} is unreachable ({error})");
    if std::env::var("IDEM_REQUIRE_SERVERS").is_ok_and(|value| value == "1") {
        panic!("{problem}; scripts/services.sh starts it");
    }
    eprintln!("SKIPPED: {problem}; scripts/test.sh starts the servers");
    false
}

/// A running `order-service` process.
struct Service {
    child: Child,
    addr: SocketAddr,
}

impl Service {
    /// Starts the binary on `database_url`, listening on `listen` (`127.0.0.1:0` for any
    /// port), each create pausing `pause` after its insert; returns once it listens.
    async fn start(database_url: &str, listen: &str, pause: Duration) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-service"))
            .args(["--database-url", database_url])
            .args(["--redis-url", "redis://127.0.0.1:1/"])
            .args(["--listen", listen])
            .args(["--pause-each-create", &pause.as_millis().to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start order-service");
        let stdout = child.stdout.take().expect("its stdout");
        let mut lines = BufReader::new(stdout).lines();
        let listening = async {
            while let Some(line) = lines.next_line().await.expect("read its stdout") {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split(',').next().expect("an address");
                    return addr.parse::<SocketAddr>().expect("a socket address");
                }
            }
            panic!("order-service exited before it listened");
        };
        let addr = tokio::time::timeout(Duration::from_secs(60), listening)
            .await
            .expect("order-service listens within a minute");
        // Keep draining its stdout, so that it never blocks writing.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    /// `SIGKILL`: the process dies at once, its connections with it.
    async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }
}

/// A test's own caller and user.
struct Client {
    caller: String,
    user: i64,
}

impl Client {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4();
        let user = i64::from(u32::from_be_bytes(
            id.as_bytes()[..4].try_into().expect("4 bytes"),
        )) + 1;
        Self {
            caller: format!("client-{}", id.simple()),
            user,
        }
    }

    fn create(&self, key: &str) -> Request {
        let body = serde_json::json!({ "user_id": self.user, "amount_cents": 1500 });
        Request::post("/orders", &body.to_string())
            .header("x-client-id", &self.caller)
            .header("idempotency-key", key)
    }
}

fn order_no(answer: &Answer) -> String {
    answer.json()["order_no"]
        .as_str()
        .unwrap_or_else(|| panic!("an order: {answer:?}"))
        .to_owned()
}

/// A lock on the `orders` table (the whole file on SQLite) held by another session, and the
/// count of a user's orders: per database.
trait Database {
    type Connection: sqlx::Connection;
    /// Takes the lock on `connection`.
    async fn lock(connection: &mut Self::Connection);
    /// Releases it.
    async fn unlock(connection: &mut Self::Connection);
    /// The orders of `user`.
    async fn orders_of(connection: &mut Self::Connection, user: i64) -> i64;
}

/// [`Database`] for one database: its connection, the statements that take and release the
/// lock, and the count with its placeholder.
macro_rules! database {
    ($name:ident, $connection:ty, lock = $lock:literal, unlock = $unlock:literal, count = $count:literal) => {
        struct $name;

        impl Database for $name {
            type Connection = $connection;

            async fn lock(connection: &mut Self::Connection) {
                sqlx::raw_sql($lock)
                    .execute(connection)
                    .await
                    .expect("lock");
            }

            async fn unlock(connection: &mut Self::Connection) {
                sqlx::raw_sql($unlock)
                    .execute(connection)
                    .await
                    .expect("unlock");
            }

            async fn orders_of(connection: &mut Self::Connection, user: i64) -> i64 {
                sqlx::query_scalar($count)
                    .bind(user)
                    .fetch_one(connection)
                    .await
                    .expect("count")
            }
        }
    };
}

database!(
    Postgres,
    sqlx::PgConnection,
    lock = "BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE",
    unlock = "COMMIT",
    count = "SELECT COUNT(*) FROM orders WHERE user_id = $1"
);
database!(
    MariaDb,
    sqlx::MySqlConnection,
    lock = "LOCK TABLES orders WRITE",
    unlock = "UNLOCK TABLES",
    count = "SELECT COUNT(*) FROM orders WHERE user_id = ?"
);
// The whole file: a writer's lock.
database!(
    Sqlite,
    sqlx::SqliteConnection,
    lock = "BEGIN IMMEDIATE",
    unlock = "ROLLBACK",
    count = "SELECT COUNT(*) FROM orders WHERE user_id = ?"
);

/// The service is killed while its create waits on a lock another session holds (on
/// PostgreSQL and MariaDB the `orders` table, so the claim is made and the insert waits; on
/// SQLite the whole file, so the claim itself waits); the lock is
/// released (the dead process's database session may still finish the statement it was
/// waiting on, but never commits), the service is restarted, the client retries: exactly one
/// order.
async fn killed_while_its_create_waits_on_a_lock<DB: Database>(database_url: &str) {
    let service = Service::start(database_url, "127.0.0.1:0", Duration::ZERO).await;
    let mut locker = DB::Connection::connect(database_url)
        .await
        .expect("a second session");
    let client = Client::new();
    let request = client.create("\"kill-1\"");
    DB::lock(&mut locker).await;
    let gave_up = send_within(service.addr, &request, Duration::from_millis(1500))
        .await
        .expect("loopback");
    assert!(
        gave_up.is_none(),
        "the create waits on the lock: {gave_up:?}"
    );
    service.kill().await;
    // Released before the restart: the new process's migrations would otherwise wait behind
    // the dead one's session, which waits on the lock.
    DB::unlock(&mut locker).await;
    let service = Service::start(database_url, "127.0.0.1:0", Duration::ZERO).await;
    let retry = send_until_settled(service.addr, &request, Duration::from_secs(30))
        .await
        .expect("loopback");
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(
        !retry.replayed(),
        "the killed create committed nothing, so the retry created the order"
    );
    let again = send(service.addr, &request).await.expect("loopback");
    assert!(again.replayed());
    assert_eq!(order_no(&again), order_no(&retry));
    assert_eq!(DB::orders_of(&mut locker, client.user).await, 1);
    service.kill().await;
}

/// What the soak saw.
#[derive(Default)]
struct Tally {
    attempts: AtomicUsize,
    timeouts: AtomicUsize,
    refused: AtomicUsize,
    busy: AtomicUsize,
    first_answer_replayed: AtomicUsize,
    first_answer_created: AtomicUsize,
    retries_after_completion: AtomicUsize,
}

/// Sends `request` until it gets a `201`, giving up after `timeout` each time; counts what it
/// met on the way.
async fn until_created(
    addr: &Mutex<SocketAddr>,
    request: &Request,
    timeout: Duration,
    tally: &Tally,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no 201 within two minutes");
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        let to = *addr.lock().await;
        match send_within(to, request, timeout).await {
            Ok(Some(answer)) if answer.status == 201 => return answer,
            Ok(Some(answer)) if matches!(answer.status, 409 | 502 | 503) => {
                tally.busy.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(answer)) => panic!("unexpected answer: {answer:?}"),
            Ok(None) => {
                tally.timeouts.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The service is down (killed, restarting) or cut the connection.
            Err(_) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 1,000 creates, each answered 150 ms late while its client gives up after 50 ms and retries
/// with the same key; the service is killed (`SIGKILL`) and restarted every 1.5 s meanwhile.
/// Orders = distinct keys; every retry after a create was answered replays that order.
async fn soak<DB: Database>(database_url: &str) {
    const KEYS: usize = 1_000;
    const COPIES_AT_ONCE: usize = 8;
    const KILLS: usize = 6;
    let started = Instant::now();
    let pause = Duration::from_millis(150);
    let service = Service::start(database_url, "127.0.0.1:0", pause).await;
    let listen = service.addr.to_string();
    let addr = Arc::new(Mutex::new(service.addr));
    let service = Arc::new(Mutex::new(Some(service)));
    let client = Arc::new(Client::new());
    let tally = Arc::new(Tally::default());
    let run = uuid::Uuid::new_v4().simple().to_string();

    let killer = tokio::spawn({
        let (service, addr, url) = (service.clone(), addr.clone(), database_url.to_owned());
        async move {
            for _ in 0..KILLS {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let mut running = service.lock().await;
                if let Some(old) = running.take() {
                    old.kill().await;
                }
                let new = Service::start(&url, &listen, pause).await;
                *addr.lock().await = new.addr;
                *running = Some(new);
            }
        }
    });

    let orders = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..COPIES_AT_ONCE {
        let (addr, client, tally, orders, next, run) = (
            addr.clone(),
            client.clone(),
            tally.clone(),
            orders.clone(),
            next.clone(),
            run.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= KEYS {
                    return;
                }
                let request = client.create(&format!("soak-{run}-{n}"));
                // The first try gives up before the create answers.
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                let to = *addr.lock().await;
                match send_within(to, &request, Duration::from_millis(50)).await {
                    Ok(None) => {
                        tally.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(_)) | Err(_) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let first = until_created(&addr, &request, Duration::from_secs(3), &tally).await;
                if first.replayed() {
                    tally.first_answer_replayed.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.first_answer_created.fetch_add(1, Ordering::Relaxed);
                }
                let order = order_no(&first);
                // A retry after the answer: the same order, replayed.
                let again = until_created(&addr, &request, Duration::from_secs(3), &tally).await;
                tally
                    .retries_after_completion
                    .fetch_add(1, Ordering::Relaxed);
                assert!(
                    again.replayed(),
                    "a retry after completion replays: {again:?}"
                );
                assert_eq!(order_no(&again), order);
                orders
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(n, order);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("a client");
    }
    killer.await.expect("the killer");

    // Every key once more, now that the kills are over: each replays its order.
    let orders = orders
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert_eq!(orders.len(), KEYS);
    let to = *addr.lock().await;
    for (n, order) in &orders {
        let request = client.create(&format!("soak-{run}-{n}"));
        let answer = send(to, &request).await.expect("loopback");
        assert!(answer.replayed(), "{answer:?}");
        assert_eq!(&order_no(&answer), order);
    }
    let mut connection = DB::Connection::connect(database_url)
        .await
        .expect("a session");
    let in_database = DB::orders_of(&mut connection, client.user).await;
    let tally = &*tally;
    eprintln!(
        "soak: {KEYS} keys, {in_database} orders, {KILLS} kills in {:.1} s; {} requests: {} client timeouts, {} refused or cut, {} 409/502/503; first 201 a replay {} times, a fresh create {} times (the timed-out try was rolled back by a kill); {} retries after completion, all replayed",
        started.elapsed().as_secs_f64(),
        tally.attempts.load(Ordering::Relaxed),
        tally.timeouts.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.busy.load(Ordering::Relaxed),
        tally.first_answer_replayed.load(Ordering::Relaxed),
        tally.first_answer_created.load(Ordering::Relaxed),
        tally.retries_after_completion.load(Ordering::Relaxed),
    );
    assert_eq!(in_database, KEYS as i64, "orders = distinct keys");
    if let Some(service) = service.lock().await.take() {
        service.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_create_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "idem-order-process-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let database_url = format!("sqlite://{}", dir.join("orders.db").display());
    killed_while_its_create_waits_on_a_lock::<Sqlite>(&database_url).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_create_on_mysql() {
    let database_url = url("IDEM_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
    if !reachable::<sqlx::MySqlConnection>(&database_url).await {
        return;
    }
    killed_while_its_create_waits_on_a_lock::<MariaDb>(&database_url).await;
}

/// The kill and the soak share the `orders` table, so they run one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_create_then_soak_on_postgres() {
    let database_url = url(
        "IDEM_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    if !reachable::<sqlx::PgConnection>(&database_url).await {
        return;
    }
    killed_while_its_create_waits_on_a_lock::<Postgres>(&database_url).await;
    soak::<Postgres>(&database_url).await;
}

/// What the service cannot open at startup is named in its error, and it exits with a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_name_what_failed() {
    let dir = std::env::temp_dir().join(format!("idem-no-such-dir-{}", uuid::Uuid::new_v4()));
    let database_url = format!("sqlite://{}", dir.join("orders.db").display());
    for (args, named) in [
        (
            vec!["--database-url", database_url.as_str()],
            database_url.as_str(),
        ),
        (
            vec![
                "--database-url",
                "sqlite::memory:",
                "--listen",
                "not-an-address",
            ],
            "not-an-address",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_order-service"))
            .args(&args)
            .args(["--redis-url", "redis://127.0.0.1:1/"])
            .output()
            .await
            .expect("run order-service");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}
