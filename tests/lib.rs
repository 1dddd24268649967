//! Shared pieces of idem's integration tests: handlers written with `#[idempotent]` the way
//! users write them, counters that tell how often their bodies ran, and the stores the tests
//! run on (temporary SQLite files, the test servers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_runtime::{Claim, Error, Fingerprint, Lease, RecordKey, Store, idempotent};
use serde::{Deserialize, Serialize};

pub mod counting;
pub mod http_client;
pub mod proxy;

/// A message as a queue delivers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OrderPaid {
    /// The business key.
    pub order_no: String,
    /// Paid amount in cents.
    pub amount: u64,
}

impl OrderPaid {
    /// A message for `order_no` paying `amount`.
    pub fn new(order_no: &str, amount: u64) -> Self {
        Self {
            order_no: order_no.to_owned(),
            amount,
        }
    }
}

/// What crediting points returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    /// The order credited.
    pub order_no: String,
    /// Points credited.
    pub points: u64,
    /// Which run of the body produced this receipt (1 for the first).
    pub run: usize,
}

/// The application's error type: carries idem's errors and its own.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// idem refused or failed.
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    /// The business logic failed.
    #[error("business failure: {0}")]
    Business(String),
}

impl AppError {
    /// The idem error inside, if any.
    pub fn idem(&self) -> Option<&idem_runtime::Error> {
        match self {
            AppError::Idem(error) => Some(error),
            AppError::Business(_) => None,
        }
    }
}

/// Counts how many times a handler body ran.
#[derive(Debug, Default)]
pub struct Runs(AtomicUsize);

impl Runs {
    /// Records one run and returns its number (1 for the first).
    pub fn record(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many runs were recorded.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The card's handler: credits points for a paid order, once per `order_no`.
#[idempotent(key = "order_no", store = store, scope = "tests.credit_points")]
pub async fn credit_points<S: Store>(
    store: &S,
    runs: &Runs,
    msg: OrderPaid,
) -> Result<Receipt, AppError> {
    let run = runs.record();
    tokio::task::yield_now().await;
    Ok(Receipt {
        order_no: msg.order_no,
        points: msg.amount / 10,
        run,
    })
}

/// The servers the store tests talk to, and what to do when one is not there.
pub mod servers {
    use std::fmt::Display;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Environment variable with the PostgreSQL URL; default [`POSTGRES_DEFAULT`].
    pub const POSTGRES_VAR: &str = "IDEM_POSTGRES_URL";
    /// PostgreSQL on loopback, trust auth, database `test`.
    pub const POSTGRES_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
    /// Environment variable with the MySQL / MariaDB URL; default [`MYSQL_DEFAULT`].
    pub const MYSQL_VAR: &str = "IDEM_MYSQL_URL";
    /// MariaDB on loopback, root with an empty password, database `test`.
    pub const MYSQL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";
    /// Environment variable with the Redis URL; default [`REDIS_DEFAULT`].
    pub const REDIS_VAR: &str = "IDEM_REDIS_URL";
    /// Redis on loopback.
    pub const REDIS_DEFAULT: &str = "redis://127.0.0.1:6379/";
    /// Set to `1` by `scripts/test.sh`: an unreachable server fails the tests.
    pub const REQUIRE_VAR: &str = "IDEM_REQUIRE_SERVERS";

    /// The URL from `var`, or `default`.
    pub fn url(var: &str, default: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    /// Whether an unreachable server must fail the tests (`IDEM_REQUIRE_SERVERS=1`).
    pub fn required() -> bool {
        std::env::var(REQUIRE_VAR).is_ok_and(|value| value == "1")
    }

    /// Reports a server that cannot be reached: panics when servers are required, otherwise
    /// says on stderr that the test is skipped and how to run it.
    pub fn unreachable(server: &str, url: &str, error: &dyn Display) {
        if required() {
            panic!("{server} at {url} is unreachable ({error}); scripts/services.sh starts it");
        }
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and a skip must be seen.
        let line = format!(
            "SKIPPED: {server} at {url} is unreachable ({error}); run scripts/test.sh, which \
             starts the servers and sets {REQUIRE_VAR}=1 so that this is a failure\n"
        );
        // Nothing to do if stderr itself is gone.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }

    /// A name no other test of any concurrent run uses: `prefix_<pid>_<n>`, with only ASCII
    /// letters, digits and `_` (a valid table name).
    pub fn unique_name(prefix: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        format!(
            "{prefix}_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// SQLite databases in temporary files, deleted when dropped.
pub mod sqlite_file {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use idem_runtime::clock::Clock;
    use idem_runtime::sqlite::SqliteStore;

    use crate::Guarded;

    /// A path for a new database file, unique in this run and across runs, with no file left
    /// there by an earlier run; the file (and its WAL files) are deleted on drop.
    pub struct TempDb {
        path: PathBuf,
    }

    impl TempDb {
        /// A fresh path named after `purpose`.
        pub fn new(purpose: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos());
            let path = std::env::temp_dir().join(format!(
                "idem-stores-{purpose}-{}-{nanos}-{}.db",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let db = Self { path };
            db.remove();
            db
        }

        /// The `sqlite://` URL of the file.
        pub fn url(&self) -> String {
            format!("sqlite://{}", self.path.display())
        }

        fn remove(&self) {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut file = self.path.clone().into_os_string();
                file.push(suffix);
                // Missing files are fine: not every one is created.
                let _ = std::fs::remove_file(file);
            }
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            self.remove();
        }
    }

    /// A migrated SQLite store in a fresh database file, deleted when the store is dropped.
    pub type FileStore = Guarded<SqliteStore>;

    impl FileStore {
        /// Opens a fresh file named after `purpose`, with time from `clock`.
        pub async fn open(purpose: &str, clock: impl Clock) -> Self {
            let file = TempDb::new(purpose);
            let store = SqliteStore::connect(&file.url())
                .await
                .unwrap_or_else(|error| panic!("open {}: {error}", file.url()))
                .with_clock(clock);
            store
                .migrate()
                .await
                .expect("create the idem_records table");
            Guarded::new(store, file)
        }
    }
}

/// A store that owns what it was built on — a temporary file, a test table, a key prefix — and
/// cleans that up when dropped, also when the test panicked.
pub struct Guarded<S> {
    /// The store.
    pub store: S,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl<S> Guarded<S> {
    /// `store`, with `guard` dropped when it is.
    pub fn new(store: S, guard: impl Send + Sync + 'static) -> Self {
        Self {
            store,
            _guard: Box::new(guard),
        }
    }
}

impl<S: Store> Store for Guarded<S> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        self.store.claim(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.store.complete(key, lease, result, ttl).await
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.store.release(key, lease).await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        self.store.extend(key, lease, duration).await
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        self.store.purge_expired(limit).await
    }
}

/// The Redis server of the tests: connections, and stores under a fresh key prefix.
pub mod redis_server {
    use std::time::Duration;

    use idem_runtime::clock::Clock;
    use idem_runtime::redis::RedisStore;
    use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};

    use crate::{Guarded, servers};

    /// The URL of the test server.
    pub fn url() -> String {
        servers::url(servers::REDIS_VAR, servers::REDIS_DEFAULT)
    }

    /// A client for the test server, or `None` (after saying so) when it does not answer a PING.
    pub async fn client() -> Option<redis::Client> {
        let url = url();
        let client = match redis::Client::open(url.as_str()) {
            Ok(client) => client,
            Err(error) => {
                servers::unreachable("Redis", &url, &error);
                return None;
            }
        };
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut connection).await
        };
        match tokio::time::timeout(Duration::from_secs(5), ping).await {
            Ok(Ok(())) => Some(client),
            Ok(Err(error)) => {
                servers::unreachable("Redis", &url, &error);
                None
            }
            Err(elapsed) => {
                servers::unreachable("Redis", &url, &elapsed);
                None
            }
        }
    }

    /// A `ConnectionManager` to the test server, or `None` (after saying so) without one.
    pub async fn manager() -> Option<ConnectionManager> {
        let client = client().await?;
        Some(
            ConnectionManager::new(client)
                .await
                .expect("a ConnectionManager to a server that answered PING"),
        )
    }

    /// A multiplexed connection to the test server, or `None` (after saying so) without one.
    pub async fn multiplexed() -> Option<MultiplexedConnection> {
        let client = client().await?;
        Some(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("a multiplexed connection to a server that answered PING"),
        )
    }

    /// Deletes every key under `<prefix>:` when dropped, also when the test panicked.
    pub struct Cleanup {
        /// The prefix.
        pub prefix: String,
    }

    impl Cleanup {
        /// A fresh prefix.
        pub fn fresh() -> Self {
            Self {
                prefix: servers::unique_name("idem_test"),
            }
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let delete = || -> redis::RedisResult<()> {
                let client = redis::Client::open(url().as_str())?;
                let mut connection = client.get_connection()?;
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{}:*", self.prefix))
                        .arg("COUNT")
                        .arg(1000)
                        .query(&mut connection)?;
                    if !keys.is_empty() {
                        redis::cmd("DEL").arg(keys).query::<()>(&mut connection)?;
                    }
                    if next == 0 {
                        return Ok(());
                    }
                    cursor = next;
                }
            };
            if let Err(error) = delete() {
                eprintln!("could not delete the keys under {}: {error}", self.prefix);
            }
        }
    }

    /// A store under a fresh prefix on `clock`, whose keys are deleted when it is dropped.
    pub fn store<C>(connection: C, clock: impl Clock) -> Guarded<RedisStore<C>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let cleanup = Cleanup::fresh();
        let store = RedisStore::new(connection)
            .with_prefix(&cleanup.prefix)
            .expect("a unique name is a valid prefix")
            .with_clock(clock);
        Guarded::new(store, cleanup)
    }
}

/// The SQL servers of the tests: pools, and stores on a fresh table each.
pub mod sql_servers {
    use std::time::Duration;

    use idem_runtime::clock::Clock;
    use idem_runtime::mysql::MySqlStore;
    use idem_runtime::postgres::PostgresStore;
    use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
    use sqlx::postgres::{PgPool, PgPoolOptions};
    use sqlx::{AssertSqlSafe, Connection, Database, Pool};

    use crate::{Guarded, servers};

    /// Connections per test pool: enough for claimers to race on separate connections.
    pub const POOL_SIZE: u32 = 16;

    /// The PostgreSQL URL of the tests.
    pub fn postgres_url() -> String {
        servers::url(servers::POSTGRES_VAR, servers::POSTGRES_DEFAULT)
    }

    /// A pool of [`POOL_SIZE`] connections to the test PostgreSQL, or `None` (after saying so)
    /// when it cannot be reached.
    pub async fn postgres_pool() -> Option<PgPool> {
        pool("PostgreSQL", &postgres_url(), PgPoolOptions::new()).await
    }

    /// The MySQL / MariaDB URL of the tests.
    pub fn mysql_url() -> String {
        servers::url(servers::MYSQL_VAR, servers::MYSQL_DEFAULT)
    }

    /// A pool of [`POOL_SIZE`] connections to the test MariaDB, or `None` (after saying so)
    /// when it cannot be reached.
    pub async fn mysql_pool() -> Option<MySqlPool> {
        pool("MariaDB", &mysql_url(), MySqlPoolOptions::new()).await
    }

    async fn pool<DB: Database>(
        server: &str,
        url: &str,
        options: sqlx::pool::PoolOptions<DB>,
    ) -> Option<Pool<DB>> {
        // One plain connection first: a refused connection fails at once, where a pool would
        // keep retrying until its acquire timeout.
        match tokio::time::timeout(Duration::from_secs(5), DB::Connection::connect(url)).await {
            Ok(Ok(connection)) => {
                // Only a probe: an error closing it does not matter.
                let _ = connection.close().await;
            }
            Ok(Err(error)) => {
                servers::unreachable(server, url, &error);
                return None;
            }
            Err(elapsed) => {
                servers::unreachable(server, url, &elapsed);
                return None;
            }
        }
        let pool = options
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url);
        match tokio::time::timeout(Duration::from_secs(15), pool).await {
            Ok(Ok(pool)) => Some(pool),
            Ok(Err(error)) => {
                servers::unreachable(server, url, &error);
                None
            }
            Err(elapsed) => {
                servers::unreachable(server, url, &elapsed);
                None
            }
        }
    }

    /// A migrated store on a fresh table of `pool` on `clock`; the table is dropped with it.
    pub async fn postgres_store(pool: PgPool, clock: impl Clock) -> Guarded<PostgresStore> {
        let table = servers::unique_name("idem_test");
        let store = PostgresStore::new(pool)
            .with_table(&table)
            .expect("a unique name is a valid table name")
            .with_clock(clock);
        let guard = DropTable {
            server: Server::Postgres,
            table,
        };
        store.migrate().await.expect("create the test table");
        Guarded::new(store, guard)
    }

    /// A migrated store on a fresh table of `pool` on `clock`; the table is dropped with it.
    pub async fn mysql_store(pool: MySqlPool, clock: impl Clock) -> Guarded<MySqlStore> {
        mysql_store_with(MySqlStore::new(pool), clock).await
    }

    /// The same as [`mysql_store`], claiming as it does on MySQL, without `INSERT …
    /// RETURNING` (a claim that changed nothing is followed by a read), whichever server it is.
    pub async fn mysql_store_as_on_mysql(
        pool: MySqlPool,
        clock: impl Clock,
    ) -> Guarded<MySqlStore> {
        mysql_store_with(MySqlStore::new(pool).with_returning(false), clock).await
    }

    async fn mysql_store_with(store: MySqlStore, clock: impl Clock) -> Guarded<MySqlStore> {
        let table = servers::unique_name("idem_test");
        let store = store
            .with_table(&table)
            .expect("a unique name is a valid table name")
            .with_clock(clock);
        let guard = DropTable {
            server: Server::Mysql,
            table,
        };
        store.migrate().await.expect("create the test table");
        Guarded::new(store, guard)
    }

    /// A pool of the test PostgreSQL and a guard that drops `table` when dropped, for tests
    /// that create tables of their own.
    pub async fn postgres_scratch(table: &str) -> Option<(PgPool, Scratch)> {
        let guard = DropTable {
            server: Server::Postgres,
            table: table.to_owned(),
        };
        Some((postgres_pool().await?, Box::new(guard)))
    }

    /// A pool of the test MariaDB and a guard that drops `table` when dropped.
    pub async fn mysql_scratch(table: &str) -> Option<(MySqlPool, Scratch)> {
        let guard = DropTable {
            server: Server::Mysql,
            table: table.to_owned(),
        };
        Some((mysql_pool().await?, Box::new(guard)))
    }

    /// A pool of a fresh SQLite file (several connections) and a guard that deletes the file
    /// when dropped; `table` goes with the file.
    pub async fn sqlite_scratch(table: &str) -> Option<(sqlx::SqlitePool, Scratch)> {
        let _ = table;
        let file =
            crate::sqlite_file::FileStore::open("scratch", idem_runtime::clock::SystemClock).await;
        let pool = file.store.pool().clone();
        Some((pool, Box::new(file)))
    }

    /// What removes a scratch table (or file) when dropped.
    pub type Scratch = Box<dyn std::any::Any + Send + Sync>;

    /// `?` placeholders as they are (MySQL, SQLite).
    pub fn question_marks(statement: &str) -> String {
        statement.to_owned()
    }

    /// `?` placeholders numbered `$1`, `$2`, … (PostgreSQL).
    pub fn numbered(statement: &str) -> String {
        let mut numbered = String::with_capacity(statement.len() + 8);
        let mut n = 0;
        for c in statement.chars() {
            if c == '?' {
                n += 1;
                numbered.push('$');
                numbered.push_str(&n.to_string());
            } else {
                numbered.push(c);
            }
        }
        numbered
    }

    /// Which server a table lives on.
    #[derive(Clone, Copy, Debug)]
    pub enum Server {
        /// PostgreSQL at [`postgres_url`].
        Postgres,
        /// MySQL / MariaDB at [`mysql_url`].
        Mysql,
    }

    /// Drops a test table when dropped, also when the test panicked.
    #[derive(Debug)]
    pub struct DropTable {
        /// Where the table is.
        pub server: Server,
        /// The table.
        pub table: String,
    }

    impl DropTable {
        async fn drop_table(server: Server, table: &str) -> Result<(), sqlx::Error> {
            // `table` comes from `servers::unique_name`: letters, digits and `_` only.
            let statement = AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}"));
            match server {
                Server::Postgres => {
                    let mut connection = sqlx::PgConnection::connect(&postgres_url()).await?;
                    sqlx::raw_sql(statement).execute(&mut connection).await?;
                    connection.close().await
                }
                Server::Mysql => {
                    let mut connection = sqlx::MySqlConnection::connect(&mysql_url()).await?;
                    sqlx::raw_sql(statement).execute(&mut connection).await?;
                    connection.close().await
                }
            }
        }
    }

    impl Drop for DropTable {
        fn drop(&mut self) {
            let (server, table) = (self.server, self.table.clone());
            // A runtime of its own on a thread of its own: the test's runtime may be gone or
            // be the one calling this destructor.
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| error.to_string())?;
                runtime
                    .block_on(Self::drop_table(server, &table))
                    .map_err(|error| error.to_string())
            })
            .join();
            match dropped {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    eprintln!("could not drop the test table {}: {error}", self.table)
                }
                Err(_) => eprintln!("dropping the test table {} panicked", self.table),
            }
        }
    }
}

/// Checks that every store's own tests make, written once.
pub mod checks {
    use std::sync::Arc;
    use std::time::Duration;

    use idem_runtime::{Claim, Error, Fingerprint, Policy, RecordKey, Store};
    use tokio::sync::Barrier;

    /// The lease the checks claim with.
    pub const LEASE: Duration = Duration::from_secs(30);
    /// The ttl the checks complete with.
    pub const TTL: Duration = Duration::from_secs(3600);
    /// The result the checks complete with.
    pub const STORED: &[u8] = br#"{"points":25}"#;

    /// Claims `key` and completes it with [`STORED`].
    pub async fn complete_key<S: Store + ?Sized>(
        store: &S,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
    ) {
        let Claim::Acquired(lease) = store.claim(key, fingerprint, LEASE).await.expect("claim")
        else {
            panic!("{key} is new and must be acquired");
        };
        store
            .complete(key, &lease, STORED, TTL)
            .await
            .expect("complete");
    }

    /// Asserts a decode error for `expected_key` whose reason mentions `mentions`.
    #[track_caller]
    pub fn assert_decode_error(
        result: Result<Claim, Error>,
        expected_key: &RecordKey,
        mentions: &str,
    ) {
        match result {
            Err(Error::Decode { scope, key, source })
                if scope == expected_key.scope() && key == expected_key.key() =>
            {
                let reason = source.to_string();
                assert!(
                    reason.contains(mentions),
                    "the decode error for {expected_key} should name `{mentions}`: {reason}"
                );
            }
            other => panic!("expected Err(Decode) for {expected_key}, got {other:?}"),
        }
    }

    /// 64 claimers of one key at once, spread over `stores` (each on its own pool, as separate
    /// processes would be), in 5 rounds: exactly one acquires, with fence 1; the others see
    /// the key in progress.
    pub async fn one_of_64_claimers_acquires<S: Store + 'static>(stores: &[Arc<S>]) {
        const CLAIMERS: usize = 64;
        for round in 0..5 {
            let key = RecordKey::new("checks::race", &format!("race-{round}")).expect("key");
            let start = Arc::new(Barrier::new(CLAIMERS));
            let tasks: Vec<_> = (0..CLAIMERS)
                .map(|i| {
                    let store = stores[i % stores.len()].clone();
                    let (key, start) = (key.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        store.claim(&key, None, LEASE).await
                    })
                })
                .collect();
            let mut acquired = 0;
            for task in tasks {
                match task.await.expect("a claiming task panicked") {
                    Ok(Claim::Acquired(lease)) => {
                        acquired += 1;
                        assert_eq!(lease.fence(), 1);
                    }
                    Ok(Claim::InProgress { .. }) => {}
                    other => panic!("round {round}: unexpected claim: {other:?}"),
                }
            }
            assert_eq!(acquired, 1, "round {round}: exactly one claimer acquires");
        }
    }

    /// A completed `key` whose stored result was overwritten with `garbage`: the store hands
    /// the bytes back as they are, and `run` turns them into `Error::Decode` without running
    /// the body.
    pub async fn garbage_result_fails_to_decode_in_run<S: Store>(
        store: &S,
        key: &RecordKey,
        garbage: &[u8],
    ) {
        assert_eq!(
            store.claim(key, None, LEASE).await.expect("claim"),
            Claim::Completed(garbage.to_vec()),
            "the store returns the stored bytes undecoded"
        );
        let mut ran = false;
        let outcome: Result<serde_json::Value, Error> =
            idem_runtime::run(store, key.clone(), None, Policy::new(), async {
                ran = true;
                Ok(serde_json::Value::Null)
            })
            .await;
        assert!(!ran, "the body ran although the key was completed");
        assert!(
            matches!(outcome, Err(Error::Decode { .. })),
            "run over a garbage result: {outcome:?}"
        );
    }
}

/// The background sweeper on a real store.
pub mod sweeping {
    use std::sync::Arc;
    use std::time::Duration;

    use idem_runtime::clock::ManualClock;
    use idem_runtime::{Claim, RecordKey, Store, Sweeper};

    use crate::checks::{LEASE, STORED, complete_key};

    /// 300 completed records expire and one stays live; a [`Sweeper`] in batches of 64 works
    /// the backlog off. A purged key is claimed afresh (fence 1, not a takeover), and the live
    /// one still replays.
    pub async fn sweeper_works_off_a_backlog<S: Store + 'static>(
        store: Arc<S>,
        clock: ManualClock,
    ) {
        let keys: Vec<RecordKey> = (0..300)
            .map(|i| RecordKey::new("sweeping", &format!("old-{i}")).expect("key"))
            .collect();
        for key in &keys {
            complete_key(&*store, key, None).await; // kept for an hour
        }
        clock.advance(Duration::from_secs(2 * 3600));
        let live = RecordKey::new("sweeping", "live").expect("key");
        complete_key(&*store, &live, None).await;

        let sweeper = Sweeper::spawn(store.clone(), Duration::from_millis(10), 64);
        let drained = async {
            // The sweeper deletes in the background; wait until nothing is left to delete.
            while store.purge_expired(1).await.expect("purge") > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), drained)
            .await
            .expect("the sweeper did not work the backlog off within 60 s");
        sweeper.stop().await;

        for key in keys.iter().step_by(7) {
            match store.claim(key, None, LEASE).await.expect("claim") {
                Claim::Acquired(lease) => assert_eq!(lease.fence(), 1, "{key} was not purged"),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert_eq!(
            store.claim(&live, None, LEASE).await.expect("claim"),
            Claim::Completed(STORED.to_vec()),
            "the sweeper deleted a live record"
        );
    }
}
