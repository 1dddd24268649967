//! The end-to-end demo: the order service and the points service in one process, driven the
//! way clients and brokers really behave — retries, concurrent duplicates, lost replies, lost
//! acks, a consumer killed mid-handler — and then reconciled against the databases.
//!
//! [`run`] goes through these steps, printing one line per request, stream entry and delivery:
//!
//! 1. A client creates six orders through the real axum [`Router`] of the
//!    [order service](crate::orders) (`POST /orders` with an `Idempotency-Key`, in process with
//!    `tower::ServiceExt::oneshot`): a create is retried after its response was lost (the same
//!    order comes back, `Idempotent-Replayed`), eight copies of another are sent at once, and a
//!    key is reused with another body (`422`).
//! 2. It pays four of them (`POST /orders/{order_no}/pay`, the `state` strategy): one pay is
//!    retried, eight pays of one order arrive at once; it cancels #5 and then tries to pay it
//!    (`409`). #4 is paid in step 5.
//! 3. Three points consumers join the consumer group. Two faults are armed: the consumer that
//!    gets order #6 will be killed mid-handler (via [`Points::stall_next_credit`]: its task is
//!    aborted inside the credit's transaction, after the ledger row and the balance were
//!    written), and the first acknowledgement for order #2 is lost on its way.
//! 4. The outbox [`relay`] publishes the `OrderPaid` events while the consumers credit them.
//!    Its first pass appends #1's event, but the stream's reply is lost: the relay fails before
//!    marking it published, and its second pass publishes it again. The consumer crediting #6
//!    is killed; its entry stays pending on it.
//! 5. Duplicates at the same moment: #4 is paid, two relay replicas poll the outbox at once and
//!    a producer's retry loop sends #4's event twice more, so that several consumers handle
//!    copies of one order concurrently. Later a producer resends #3's event, and a buggy one
//!    reuses #1's number with another amount (a dead letter).
//! 6. The survivors take over what was left pending (the killed consumer's entry, the entry
//!    whose ack was lost) once it has been idle for [`MIN_IDLE`], until every entry is
//!    acknowledged.
//!
//! The [`Report`] then compares what the demo asked for (the paid orders' amounts) with what
//! the databases hold: order rows, payments, outbox events, the points ledger and balances.
//! [`Report::is_ok`] is `false` if any effect was lost or doubled; its [`Display`] is the
//! reconciliation table.
//!
//! By default everything is embedded: a SQLite file in a temporary directory (removed at the
//! end) and a [`MemoryStream`]. [`Options::database_url`] names a PostgreSQL, MySQL / MariaDB or
//! SQLite database instead (its rows are kept; the demo uses user ids no earlier run used), and
//! [`Options::redis_url`] a Redis whose stream key is fresh for each run and deleted at the end.
//! The order and points services share the database (different tables). Give the demo a
//! database no order service is running on: the relay publishes *every* unpublished event of
//! the `outbox` table (those of earlier runs too, which are then credited but not reconciled).

use std::collections::HashMap;
use std::fmt::{self, Display};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use idem_runtime::http::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use serde::de::DeserializeOwned;
use sqlx::Pool;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::events::{ORDER_PAID_STREAM, OrderPaid};
use crate::orders::{Moved, NewOrder, Order, OrderDb, OrderError, OrderService, relay, sql};
use crate::points::{
    Consumer, Counters, GROUP, Handled, Outcome, Points, PointsDb, PointsError, Tally,
};
use crate::stream::{
    Claimed, Entry, EventStream, MemoryStream, Pending, RedisStream, SCAN_START, StreamError,
};

/// How long an entry stays pending before another consumer takes it over.
pub const MIN_IDLE: Duration = Duration::from_secs(1);

/// How long a consumer's read waits for new entries.
const BLOCK: Duration = Duration::from_millis(100);

/// How long the demo waits for the consumers to get somewhere before it gives up.
const WAIT: Duration = Duration::from_secs(30);

/// The consumers of the group.
const CONSUMERS: [&str; 3] = ["points-1", "points-2", "points-3"];

/// The client identity the order service scopes `Idempotency-Key`s by.
const CLIENT: &str = "shop-web";

/// Demo users get ids below this, so that other programs' users (say, tests with random ids)
/// do not push them up.
const USER_CEILING: i64 = 1_000_000_000;

/// What to run the demo on.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `sqlite://FILE`, `postgres://…` or `mysql://…` (`mariadb://…`); `None`: a SQLite file in
    /// a temporary directory, removed at the end.
    pub database_url: Option<String>,
    /// `redis://…`: the events go through a Redis Stream under a fresh key, deleted at the end;
    /// `None`: an in-process [`MemoryStream`].
    pub redis_url: Option<String>,
    /// Print nothing while running (the [`Report`] is returned all the same).
    pub quiet: bool,
}

/// Why the demo could not run to the end (a lost or doubled effect is not an error: it is in
/// the [`Report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The options cannot be used.
    #[error("{0}")]
    Usage(String),
    /// The order service failed.
    #[error("order service: {0}")]
    Orders(#[from] OrderError),
    /// The points service failed.
    #[error("points service: {0}")]
    Points(#[from] PointsError),
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    /// A database query of the demo failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// idem refused something the demo set up (a scope, a header name).
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    /// A request or an event could not be encoded.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The temporary directory could not be made.
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
    /// Something happened that the demo cannot go on from: an answer it did not expect, or
    /// consumers that got nowhere.
    #[error("{0}")]
    Unexpected(String),
}

/// What one order went through, and what the databases hold for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderLine {
    /// The demo's name for it: `#1` … `#6`.
    pub label: String,
    /// The order number the service gave it.
    pub order_no: String,
    /// Who ordered.
    pub user_id: i64,
    /// What it costs.
    pub amount_cents: i64,
    /// Whether the demo paid it (otherwise it cancelled it).
    pub paid: bool,
    /// `POST /orders` requests sent with its `Idempotency-Key` and body.
    pub create_requests: u32,
    /// Rows in `orders` for its user and amount (its create, and any doubled one).
    pub orders: i64,
    /// Its status in `orders`.
    pub state: Option<String>,
    /// `POST …/pay` requests sent for it.
    pub pay_requests: u32,
    /// Rows in `payments` for it.
    pub payments: i64,
    /// Rows in `outbox` for it, and how many of them are still unpublished.
    pub outbox: (i64, i64),
    /// Stream entries carrying its `OrderPaid` (relayed, relayed again, resent).
    pub events: u32,
    /// Deliveries of those entries to consumers (redeliveries counted again).
    pub deliveries: u32,
    /// Deliveries acknowledged as duplicates, without crediting (idem replayed the credit, or
    /// the ledger had it).
    pub absorbed: u32,
    /// Points it should have earned: `amount_cents / 100` if paid, else 0.
    pub expected_points: i64,
    /// Points the ledger credited for it.
    pub credited_points: i64,
    /// Ledger rows for it.
    pub ledger_rows: i64,
    /// Whether expected and actual agree.
    pub verdict: Verdict,
}

/// How an order (or a user) reconciles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every effect happened once.
    Ok,
    /// An effect that should have happened did not.
    Lost,
    /// An effect happened more than once.
    Doubled,
    /// An effect happened with the wrong value, or where none should have.
    Wrong,
}

impl Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Lost => "LOST",
            Self::Doubled => "DOUBLED",
            Self::Wrong => "WRONG",
        })
    }
}

/// One user's orders and points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserLine {
    /// The user.
    pub user_id: i64,
    /// Orders the demo created for the user, and rows in `orders` for the user.
    pub orders: (i64, i64),
    /// Points the user should have: the paid orders' amounts / 100.
    pub expected_points: i64,
    /// The sum of the user's ledger rows.
    pub ledger_points: i64,
    /// The user's balance.
    pub balance: i64,
    /// Whether expected and actual agree.
    pub verdict: Verdict,
}

/// What happened on the way, counted by the demo and its consumers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// HTTP requests sent to the order service.
    pub requests: u32,
    /// Responses replayed by the `Idempotency-Key` layer (`Idempotent-Replayed`).
    pub replayed_responses: u32,
    /// `409` answers: a create with the same key still in progress, or an order that cannot
    /// move.
    pub conflicts: u32,
    /// `422` answers: a key reused with another body.
    pub key_reused: u32,
    /// Entries appended to the stream.
    pub entries: u32,
    /// Entries of orders that are not the demo's (left unpublished in the outbox earlier).
    pub foreign_entries: u32,
    /// Stream replies lost on purpose (the entry was appended, its appender saw an error).
    pub lost_replies: u32,
    /// Acknowledgements lost on purpose.
    pub lost_acks: u32,
    /// Consumers killed mid-handler.
    pub killed: u32,
    /// Deliveries of entries taken over from another consumer (or from an earlier delivery
    /// to the same one) after they had been pending for [`MIN_IDLE`].
    pub taken_over: u32,
    /// Entries still pending when the demo stopped.
    pub pending_left: u32,
    /// The consumers' counters.
    pub consumers: Tally,
}

/// The result of a run: one line per order and per user, the totals, and every mismatch
/// found. Its [`Display`] is the reconciliation table.
#[derive(Clone, Debug)]
pub struct Report {
    /// The database it ran on.
    pub database: String,
    /// The stream it ran on.
    pub stream: String,
    /// The orders.
    pub orders: Vec<OrderLine>,
    /// The users.
    pub users: Vec<UserLine>,
    /// The totals.
    pub totals: Totals,
    /// Every lost or doubled effect, and anything else that does not add up; empty when all
    /// is well.
    pub problems: Vec<String>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether everything reconciled: no effect lost or doubled.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
            && self.orders.iter().all(|order| order.verdict == Verdict::Ok)
            && self.users.iter().all(|user| user.verdict == Verdict::Ok)
    }

    /// Points the paid orders should have earned.
    pub fn expected_points(&self) -> i64 {
        self.orders.iter().map(|order| order.expected_points).sum()
    }

    /// Points the ledger holds for the demo's orders.
    pub fn credited_points(&self) -> i64 {
        self.orders.iter().map(|order| order.credited_points).sum()
    }
}

/// Runs the demo (see the [module](self)) and returns what it found.
///
/// # Errors
///
/// [`DemoError`] if it cannot run to the end: bad options, a server that cannot be reached, a
/// failing query, an answer it did not expect. A lost or doubled effect is not an error: it
/// makes [`Report::is_ok`] false.
pub async fn run(options: &Options) -> Result<Report, DemoError> {
    let started = Instant::now();
    let say = Say(!options.quiet);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let temp;
    let url = match &options.database_url {
        Some(url) => url.clone(),
        None => {
            temp = TempDir::new(&run_id)?;
            temp.url()
        }
    };
    let kind = Kind::of(&url)?;
    let shown_url = if options.database_url.is_some() {
        url.clone()
    } else {
        format!("{url} (temporary)")
    };
    let (inner, stream_name) = match &options.redis_url {
        Some(redis) => {
            let key = format!("idem-demo:{run_id}:{ORDER_PAID_STREAM}");
            let stream = RedisStream::connect(redis, &key).await?;
            (
                Inner::Redis {
                    stream,
                    url: redis.clone(),
                },
                format!("Redis Stream `{key}` at {redis}"),
            )
        }
        None => (
            Inner::Memory(MemoryStream::new(ORDER_PAID_STREAM)),
            format!("in-process stream `{ORDER_PAID_STREAM}` (MemoryStream)"),
        ),
    };
    let stream = DemoStream {
        inner,
        journal: Arc::new(Journal::new(say)),
        source: "relay",
    };
    say.line(format_args!(
        "idem demo (run {run_id}): the order service and the points service in one process"
    ));
    say.line(format_args!("  database  {shown_url}"));
    say.line(format_args!("  stream    {stream_name}"));
    let setup = Setup {
        url,
        run_id,
        say,
        stream: stream.clone(),
    };
    let result = match kind {
        Kind::Sqlite => flow::<sqlx::Sqlite>(setup).await,
        Kind::Postgres => flow::<sqlx::Postgres>(setup).await,
        Kind::MySql => flow::<sqlx::MySql>(setup).await,
    };
    if let Inner::Redis { stream, .. } = &stream.inner
        && let Err(error) = stream.delete().await
    {
        // The run's result stands; the key is left behind, and said so.
        say.line(format_args!(
            "could not delete the stream key `{}`: {error}",
            stream.name()
        ));
    }
    let mut report = result?;
    report.database = shown_url;
    report.stream = stream_name;
    report.elapsed = started.elapsed();
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Setup

/// The database a URL names.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
    MySql,
}

impl Kind {
    fn of(url: &str) -> Result<Self, DemoError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Ok(Self::MySql)
        } else {
            Err(DemoError::Usage(format!(
                "database URL `{url}`: expected sqlite://FILE, postgres://… or mysql://…"
            )))
        }
    }
}

/// A temporary directory for the default SQLite file, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(run_id: &str) -> Result<Self, std::io::Error> {
        let path = std::env::temp_dir().join(format!("idem-demo-{}-{run_id}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.0.join("demo.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Nothing to do about a directory that cannot be removed: it is in the temp dir.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Printing progress, or not.
#[derive(Clone, Copy, Debug)]
struct Say(bool);

impl Say {
    fn line(self, text: impl Display) {
        if self.0 {
            println!("{text}");
        }
    }

    fn step(self, n: u32, text: impl Display) {
        if self.0 {
            println!("\n{n}. {text}");
        }
    }
}

struct Setup {
    url: String,
    run_id: String,
    say: Say,
    stream: DemoStream,
}

// ---------------------------------------------------------------------------------------------
// The stream, as the demo sees it

/// The stream the demo runs on.
#[derive(Clone)]
enum Inner {
    Memory(MemoryStream),
    Redis { stream: RedisStream, url: String },
}

/// One handle on the run's stream: it forwards to the real stream, writes every append and
/// acknowledgement into the [`Journal`], and injects the faults the journal is armed with.
#[derive(Clone)]
struct DemoStream {
    inner: Inner,
    journal: Arc<Journal>,
    /// Who appends through this handle: `relay`, `producer`, …
    source: &'static str,
}

impl DemoStream {
    /// Another handle on the same stream for `source`: a connection of its own for Redis (a
    /// blocking read holds its connection), a clone for the memory stream.
    async fn open(&self, source: &'static str) -> Result<Self, StreamError> {
        let inner = match &self.inner {
            Inner::Memory(stream) => Inner::Memory(stream.clone()),
            Inner::Redis { stream, url } => Inner::Redis {
                stream: RedisStream::connect(url, stream.name()).await?,
                url: url.clone(),
            },
        };
        Ok(Self {
            inner,
            journal: self.journal.clone(),
            source,
        })
    }
}

/// The error a lost reply looks like to the appender.
fn lost_reply() -> StreamError {
    StreamError::Redis(redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset before the reply arrived (injected fault)",
    )))
}

impl EventStream for DemoStream {
    fn name(&self) -> &str {
        match &self.inner {
            Inner::Memory(stream) => stream.name(),
            Inner::Redis { stream, .. } => stream.name(),
        }
    }

    async fn create_group(&self, group: &str) -> Result<(), StreamError> {
        match &self.inner {
            Inner::Memory(stream) => stream.create_group(group).await,
            Inner::Redis { stream, .. } => stream.create_group(group).await,
        }
    }

    async fn append(&self, event: &str) -> Result<String, StreamError> {
        // Held until the entry is in the journal: a consumer that reads it first waits for it.
        let _logging = self.journal.appending.lock().await;
        let id = match &self.inner {
            Inner::Memory(stream) => stream.append(event).await?,
            Inner::Redis { stream, .. } => stream.append(event).await?,
        };
        if self.journal.appended(&id, event, self.source) {
            return Err(lost_reply());
        }
        Ok(id)
    }

    async fn read_group(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError> {
        match &self.inner {
            Inner::Memory(stream) => stream.read_group(group, consumer, count, block).await,
            Inner::Redis { stream, .. } => stream.read_group(group, consumer, count, block).await,
        }
    }

    async fn ack(&self, group: &str, id: &str) -> Result<bool, StreamError> {
        if self.journal.lose_ack(id) {
            // The consumer sent it; it never arrived.
            return Ok(true);
        }
        let acked = match &self.inner {
            Inner::Memory(stream) => stream.ack(group, id).await?,
            Inner::Redis { stream, .. } => stream.ack(group, id).await?,
        };
        self.journal.acked(id);
        Ok(acked)
    }

    async fn autoclaim(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<Claimed, StreamError> {
        match &self.inner {
            Inner::Memory(stream) => {
                stream
                    .autoclaim(group, consumer, min_idle, start, count)
                    .await
            }
            Inner::Redis { stream, .. } => {
                stream
                    .autoclaim(group, consumer, min_idle, start, count)
                    .await
            }
        }
    }

    async fn pending(&self, group: &str, count: usize) -> Result<Vec<Pending>, StreamError> {
        match &self.inner {
            Inner::Memory(stream) => stream.pending(group, count).await,
            Inner::Redis { stream, .. } => stream.pending(group, count).await,
        }
    }
}

/// Everything that went through the stream: entries, deliveries, outcomes; the faults armed;
/// the demo's names for orders and entries.
struct Journal {
    state: Mutex<JournalState>,
    /// Held by an append until its entry is in the journal.
    appending: tokio::sync::Mutex<()>,
    /// Woken whenever an entry is acknowledged.
    changed: Notify,
    say: Say,
}

#[derive(Default)]
struct JournalState {
    /// Entries in the order they were appended; an entry's name is `e<index + 1>`.
    entries: Vec<Logged>,
    by_id: HashMap<String, usize>,
    /// The demo's labels of its orders: order number → `#1` ….
    labels: HashMap<String, String>,
    /// Per order number: what happened to its entries.
    flows: HashMap<String, Flow>,
    /// The next append of this order's event reaches the stream, but its reply is lost.
    lose_reply: Option<String>,
    /// The next acknowledgement of an entry of this order is lost.
    lose_ack: Option<String>,
    /// Per order number: the consumers handling one of its entries right now, and the entry.
    in_flight: HashMap<String, Vec<(String, usize)>>,
    totals: Totals,
}

struct Logged {
    id: String,
    order_no: Option<String>,
    /// Counted in its order's flow: not a reused order number.
    counted: bool,
    /// The consumer it was delivered to last.
    holder: Option<String>,
    /// Deliveries handled to the end (and printed).
    handled: u32,
    /// Delivered to a consumer that was killed handling it.
    killed: bool,
    acked: bool,
}

/// What happened to one order's entries.
#[derive(Clone, Copy, Debug, Default)]
struct Flow {
    events: u32,
    deliveries: u32,
    absorbed: u32,
}

impl Journal {
    fn new(say: Say) -> Self {
        Self {
            state: Mutex::new(JournalState::default()),
            appending: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            say,
        }
    }

    fn state(&self) -> MutexGuard<'_, JournalState> {
        // Nothing panics while holding the lock; a poisoned lock still holds a whole journal.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn label(&self, order_no: &str, label: &str) {
        self.state()
            .labels
            .insert(order_no.to_owned(), label.to_owned());
    }

    /// Logs an append; `true` if its reply is to be lost.
    fn appended(&self, id: &str, event: &str, source: &'static str) -> bool {
        let paid = OrderPaid::from_json(event).ok();
        let mut state = self.state();
        let n = state.entries.len() + 1;
        let order_no = paid.as_ref().map(|paid| paid.order_no.clone());
        let counted = source != "buggy producer";
        let label = order_no
            .as_deref()
            .map_or_else(|| "(not an OrderPaid)".to_owned(), |no| state.label_of(no));
        if counted && let Some(no) = &order_no {
            state.flows.entry(no.clone()).or_default().events += 1;
        }
        if order_no
            .as_deref()
            .is_some_and(|no| !state.labels.contains_key(no))
        {
            state.totals.foreign_entries += 1;
        }
        state.totals.entries += 1;
        let lose = order_no.is_some() && state.lose_reply == order_no;
        if lose {
            state.lose_reply = None;
            state.totals.lost_replies += 1;
        }
        state.by_id.insert(id.to_owned(), n - 1);
        state.entries.push(Logged {
            id: id.to_owned(),
            order_no,
            counted,
            holder: None,
            handled: 0,
            killed: false,
            acked: false,
        });
        drop(state);
        let amount = paid.map_or_else(String::new, |paid| {
            format!("  user {} {}", paid.user_id, money(paid.amount_cents))
        });
        let lost = if lose {
            "  ✗ the reply is lost: the appender sees an error"
        } else {
            ""
        };
        self.say.line(format_args!(
            "  {source:<15} XADD → e{n:<3} {label}{amount}{lost}"
        ));
        lose
    }

    /// `true` if the acknowledgement of `id` is to be lost (and logs it).
    fn lose_ack(&self, id: &str) -> bool {
        let mut state = self.state();
        let Some(&index) = state.by_id.get(id) else {
            return false;
        };
        if state.lose_ack.is_none() || state.entries[index].order_no != state.lose_ack {
            return false;
        }
        state.lose_ack = None;
        state.totals.lost_acks += 1;
        true
    }

    fn acked(&self, id: &str) {
        let mut state = self.state();
        if let Some(&index) = state.by_id.get(id) {
            state.entries[index].acked = true;
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Notes that `consumer` got `entry` and begins handling it. Returns the consumer it was
    /// pending on before, and the entries of the same order other consumers are handling at
    /// this moment.
    async fn delivered(
        &self,
        entry: &Entry,
        consumer: &str,
        taken_over: bool,
    ) -> (Option<String>, Vec<String>) {
        if !self.state().by_id.contains_key(&entry.id) {
            // Read before its appender logged it: wait for that.
            drop(self.appending.lock().await);
        }
        let mut state = self.state();
        if taken_over {
            state.totals.taken_over += 1;
        }
        let Some(&index) = state.by_id.get(&entry.id) else {
            return (None, Vec::new());
        };
        let previous = state.entries[index].holder.replace(consumer.to_owned());
        let Some(no) = state.entries[index].order_no.clone() else {
            return (previous, Vec::new());
        };
        if state.entries[index].counted {
            state.flows.entry(no.clone()).or_default().deliveries += 1;
        }
        let busy = state.in_flight.entry(no).or_default();
        let others = busy
            .iter()
            .map(|(other, index)| format!("{other}'s e{}", index + 1))
            .collect();
        busy.push((consumer.to_owned(), index));
        (previous, others)
    }

    /// Notes that `consumer` is done with `entry` (or was killed handling it).
    fn done(&self, entry_id: &str, consumer: &str) {
        let mut state = self.state();
        let Some(&index) = state.by_id.get(entry_id) else {
            return;
        };
        if let Some(no) = state.entries[index].order_no.clone()
            && let Some(busy) = state.in_flight.get_mut(&no)
        {
            busy.retain(|(other, at)| !(other == consumer && *at == index));
        }
    }

    fn handled(&self, entry: &Entry, handled: &Handled) {
        let mut state = self.state();
        let Some(&index) = state.by_id.get(&entry.id) else {
            return;
        };
        if matches!(
            handled,
            Handled::Done(Outcome::Replayed(_) | Outcome::InLedger(_))
        ) && state.entries[index].counted
            && let Some(no) = state.entries[index].order_no.clone()
        {
            state.flows.entry(no).or_default().absorbed += 1;
        }
    }

    /// `e<n>` of the entry `id`, or the id itself.
    fn entry_name(&self, id: &str) -> String {
        self.state()
            .by_id
            .get(id)
            .map_or_else(|| id.to_owned(), |index| format!("e{}", index + 1))
    }

    /// The consumer that has been handling an entry of `order_no` the longest, and the
    /// entry's id.
    fn oldest_in_flight(&self, order_no: &str) -> Option<(String, String)> {
        let state = self.state();
        let (consumer, index) = state.in_flight.get(order_no)?.first()?;
        Some((consumer.clone(), state.entries.get(*index)?.id.clone()))
    }

    /// Notes that a delivery of `entry_id` was handled to the end.
    fn finish(&self, entry_id: &str) {
        let mut state = self.state();
        if let Some(&index) = state.by_id.get(entry_id) {
            state.entries[index].handled += 1;
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Waits until `done` holds; `false` if `deadline` came first.
    async fn wait_until(&self, deadline: Instant, done: impl Fn(&JournalState) -> bool) -> bool {
        loop {
            // Registered before looking, so that a change in between wakes it.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.state()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return done(&self.state());
            }
        }
    }
}

impl JournalState {
    fn unacked(&self) -> usize {
        self.entries.iter().filter(|entry| !entry.acked).count()
    }

    /// Entries no consumer has handled to the end yet, but for those of killed consumers.
    fn unhandled(&self) -> usize {
        self.entries
            .iter()
            .filter(|entry| entry.handled == 0 && !entry.killed)
            .count()
    }

    fn label_of(&self, order_no: &str) -> String {
        match self.labels.get(order_no) {
            Some(label) => format!("{label} {}", short(order_no)),
            None => format!("{} (not this run's)", short(order_no)),
        }
    }
}

/// The first characters of an order number: `O-` and 8 hex digits.
fn short(order_no: &str) -> &str {
    order_no.get(..10).unwrap_or(order_no)
}

/// Cents as `120.00`.
fn money(cents: impl Into<i128>) -> String {
    let cents = cents.into();
    format!("{}.{:02}", cents / 100, (cents % 100).abs())
}

// ---------------------------------------------------------------------------------------------
// The consumers

/// One points consumer: a [`Consumer`] of the group, fed by a loop that takes over idle
/// entries and reads new ones (what [`Consumer::poll`] does), so that the demo sees what
/// happened to each entry.
struct Worker<DB: PointsDb> {
    name: &'static str,
    consumer: Consumer<DemoStream, DB>,
    stream: DemoStream,
}

impl<DB: PointsDb> Worker<DB> {
    async fn work(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if let Err(error) = self.round().await {
                self.stream.journal.say.line(format_args!(
                    "  {:<15} stream error, trying again: {error}",
                    self.name
                ));
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(BLOCK) => {}
                }
            }
        }
    }

    /// Takes over the entries idle for [`MIN_IDLE`], then reads one new entry (waiting up to
    /// [`BLOCK`]), and handles each.
    async fn round(&self) -> Result<(), StreamError> {
        let mut start = SCAN_START.to_owned();
        loop {
            let claimed = self
                .stream
                .autoclaim(GROUP, self.name, MIN_IDLE, &start, 1)
                .await?;
            for entry in &claimed.entries {
                self.handle(entry, true).await?;
            }
            match claimed.next {
                Some(next) => start = next,
                None => break,
            }
        }
        // One at a time, so that copies of one event spread over the consumers.
        for entry in self.stream.read_group(GROUP, self.name, 1, BLOCK).await? {
            self.handle(&entry, false).await?;
        }
        Ok(())
    }

    async fn handle(&self, entry: &Entry, taken_over: bool) -> Result<(), StreamError> {
        let journal = &self.stream.journal;
        let (previous, others) = journal.delivered(entry, self.name, taken_over).await;
        let handled = self.consumer.handle(entry).await;
        journal.done(&entry.id, self.name);
        let handled = handled?;
        journal.handled(entry, &handled);
        let (lost_ack, label) = {
            let state = journal.state();
            let index = state.by_id.get(&entry.id).copied();
            let lost = index.is_some_and(|index| !state.entries[index].acked);
            let label = index
                .and_then(|index| state.entries[index].order_no.as_deref())
                .map_or_else(|| "?".to_owned(), |no| state.label_of(no));
            (lost, label)
        };
        let how = match (taken_over, previous) {
            (true, Some(previous)) if previous == self.name => format!(
                "delivery {}, taken back after {}s",
                entry.deliveries,
                MIN_IDLE.as_secs_f32()
            ),
            (true, Some(previous)) => format!(
                "delivery {}, taken over from {previous} after {}s",
                entry.deliveries,
                MIN_IDLE.as_secs_f32()
            ),
            _ => format!("delivery {}", entry.deliveries),
        };
        let how = if others.is_empty() {
            how
        } else {
            format!("{how}, while {} runs", others.join(", "))
        };
        let what = match &handled {
            Handled::Done(Outcome::Credited(credit)) => format!(
                "credited {} points to user {}; ack",
                credit.points, credit.user_id
            ),
            Handled::Done(Outcome::Replayed(credit)) if credit.entry_id == entry.id => {
                "duplicate: idem replays this entry's own earlier credit, nothing written; ack"
                    .to_owned()
            }
            Handled::Done(Outcome::Replayed(credit)) => format!(
                "duplicate: idem replays the credit of {}, nothing written; ack",
                journal.entry_name(&credit.entry_id)
            ),
            Handled::Done(Outcome::InLedger(credit)) => format!(
                "duplicate: the ledger has it from {}, nothing written; ack",
                journal.entry_name(&credit.entry_id)
            ),
            Handled::DeadLettered(reason) => format!("dead letter ({reason}); ack"),
            Handled::NotAcked(error) => format!("not acked ({error}): it will come back"),
        };
        let lost = if lost_ack && !matches!(handled, Handled::NotAcked(_)) {
            format!("\n  {:<15} ✗ the ack is lost: the entry stays pending", "")
        } else {
            String::new()
        };
        let name = journal.entry_name(&entry.id);
        journal.say.line(format_args!(
            "  {:<15} {name:<4} {label}  {how} → {what}{lost}",
            self.name
        ));
        journal.finish(&entry.id);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The order service's client

/// A response, read whole.
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: String,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, DemoError> {
        serde_json::from_str(&self.body).map_err(|error| {
            DemoError::Unexpected(format!(
                "{what}: answered {} with `{}` ({error})",
                self.status, self.body
            ))
        })
    }

    /// The problem's title and detail, or the body.
    fn problem(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|problem| {
                let title = problem.get("title")?.as_str()?.to_owned();
                let detail = problem.get("detail")?.as_str()?;
                Some(format!("{title}: {detail}"))
            })
            .unwrap_or_else(|| self.body.clone())
    }

    /// The problem's title, or the body.
    fn title(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|problem| Some(problem.get("title")?.as_str()?.to_owned()))
            .unwrap_or_else(|| self.body.clone())
    }

    fn unexpected(&self, what: &str) -> DemoError {
        DemoError::Unexpected(format!("{what}: unexpected {} {}", self.status, self.body))
    }
}

/// The order service's router, and what its answers were.
#[derive(Clone)]
struct Client {
    router: Router,
    totals: Arc<Mutex<Totals>>,
}

impl Client {
    async fn send(&self, request: Request<Body>) -> Result<Answer, DemoError> {
        let response = match self.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .map_err(|error| DemoError::Unexpected(format!("reading a response: {error}")))?;
        {
            let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
            totals.requests += 1;
            totals.replayed_responses += u32::from(replayed);
            totals.conflicts += u32::from(status == StatusCode::CONFLICT);
            totals.key_reused += u32::from(status == StatusCode::UNPROCESSABLE_ENTITY);
        }
        Ok(Answer {
            status,
            replayed,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    async fn create(
        &self,
        key: &str,
        user_id: i64,
        amount_cents: i64,
    ) -> Result<Answer, DemoError> {
        let body = serde_json::to_string(&NewOrder {
            user_id,
            amount_cents,
        })?;
        let request = Request::post("/orders")
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-client-id", CLIENT)
            .header(IDEMPOTENCY_KEY, key)
            .body(Body::from(body))
            .map_err(|error| DemoError::Unexpected(format!("building a request: {error}")))?;
        self.send(request).await
    }

    async fn post(&self, uri: &str) -> Result<Answer, DemoError> {
        let request = Request::post(uri)
            .body(Body::empty())
            .map_err(|error| DemoError::Unexpected(format!("building a request: {error}")))?;
        self.send(request).await
    }
}

/// One order of the demo: what it asks for, and what it sent.
struct Tracked {
    label: &'static str,
    key: String,
    user_id: i64,
    amount_cents: i64,
    paid: bool,
    order_no: String,
    create_requests: u32,
    pay_requests: u32,
}

impl Tracked {
    fn name(&self) -> String {
        format!("{} {}", self.label, short(&self.order_no))
    }

    fn event(&self) -> Result<OrderPaid, DemoError> {
        let cents = u64::try_from(self.amount_cents)
            .map_err(|_| DemoError::Unexpected(format!("{}: negative amount", self.label)))?;
        Ok(OrderPaid::new(self.order_no.clone(), self.user_id, cents))
    }
}

/// The orders: label, user (index into the run's three users), amount in cents, paid (or
/// cancelled).
const PLAN: [(&str, usize, i64, bool); 6] = [
    ("#1", 0, 12_000, true),
    ("#2", 0, 4_500, true),
    ("#3", 1, 99_900, true),
    ("#4", 2, 25_000, true),
    ("#5", 2, 3_000, false),
    ("#6", 1, 7_000, true),
];

// ---------------------------------------------------------------------------------------------
// Reading the databases back

/// A database both services run on, and the queries that read their effects back.
trait DemoDb: OrderDb + PointsDb {
    /// Takes the demo's lock on the database for the session of `connection`, if no other
    /// session holds it: `true` if taken. Always `true` on SQLite.
    fn try_lock(
        connection: &mut <Self as sqlx::Database>::Connection,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// The highest user id below [`USER_CEILING`] in `orders` and in `balances`.
    fn highest_user(
        pool: &Pool<Self>,
        balances: &str,
    ) -> impl Future<Output = Result<i64, sqlx::Error>> + Send;

    /// `(order_no, amount_cents, status)` of `user_id`'s orders.
    fn orders_of(
        pool: &Pool<Self>,
        user_id: i64,
    ) -> impl Future<Output = Result<Vec<(String, i64, String)>, sqlx::Error>> + Send;

    /// The amounts of the payments of `order_no`.
    fn payments_of(
        pool: &Pool<Self>,
        order_no: &str,
    ) -> impl Future<Output = Result<Vec<i64>, sqlx::Error>> + Send;

    /// How many outbox events `order_no` has, and how many of them are unpublished.
    fn outbox_of(
        pool: &Pool<Self>,
        order_no: &str,
    ) -> impl Future<Output = Result<(i64, i64), sqlx::Error>> + Send;
}

/// `$try_lock` answers 1 when it took the demo's lock for its session, 0 when another session
/// holds it.
macro_rules! demo_db {
    ($db:ty, try_lock = $try_lock:literal) => {
        impl DemoDb for $db {
            async fn try_lock(
                connection: &mut <Self as sqlx::Database>::Connection,
            ) -> Result<bool, sqlx::Error> {
                let taken: i64 = sqlx::query_scalar($try_lock)
                    .fetch_one(&mut *connection)
                    .await?;
                Ok(taken == 1)
            }

            async fn highest_user(pool: &Pool<Self>, balances: &str) -> Result<i64, sqlx::Error> {
                let orders: i64 = sqlx::query_scalar(sql::<Self>(
                    "SELECT COALESCE(MAX(user_id), 0) FROM orders WHERE user_id < ?",
                ))
                .bind(USER_CEILING)
                .fetch_one(pool)
                .await?;
                // `balances` is a checked identifier (see `points::Tables`).
                let points: i64 = sqlx::query_scalar(sql::<Self>(&format!(
                    "SELECT COALESCE(MAX(user_id), 0) FROM {balances} WHERE user_id < ?"
                )))
                .bind(USER_CEILING)
                .fetch_one(pool)
                .await?;
                Ok(orders.max(points))
            }

            async fn orders_of(
                pool: &Pool<Self>,
                user_id: i64,
            ) -> Result<Vec<(String, i64, String)>, sqlx::Error> {
                sqlx::query_as(sql::<Self>(
                    "SELECT order_no, amount_cents, status FROM orders WHERE user_id = ? ORDER BY order_no",
                ))
                .bind(user_id)
                .fetch_all(pool)
                .await
            }

            async fn payments_of(pool: &Pool<Self>, order_no: &str) -> Result<Vec<i64>, sqlx::Error> {
                sqlx::query_scalar(sql::<Self>(
                    "SELECT amount_cents FROM payments WHERE order_no = ?",
                ))
                .bind(order_no)
                .fetch_all(pool)
                .await
            }

            async fn outbox_of(pool: &Pool<Self>, order_no: &str) -> Result<(i64, i64), sqlx::Error> {
                let pattern = format!("%\"order_no\":\"{order_no}\"%");
                let all: i64 = sqlx::query_scalar(sql::<Self>(
                    "SELECT COUNT(*) FROM outbox WHERE payload LIKE ?",
                ))
                .bind(&pattern)
                .fetch_one(pool)
                .await?;
                let unpublished: i64 = sqlx::query_scalar(sql::<Self>(
                    "SELECT COUNT(*) FROM outbox WHERE payload LIKE ? AND published = 0",
                ))
                .bind(&pattern)
                .fetch_one(pool)
                .await?;
                Ok((all, unpublished))
            }
        }
    };
}

// A named SQLite file is seldom shared by two demos at once; it takes no lock.
demo_db!(sqlx::Sqlite, try_lock = "SELECT 1");
// "idemdemo" as a number.
demo_db!(
    sqlx::Postgres,
    try_lock = "SELECT CAST(CASE WHEN pg_try_advisory_lock(7594306392163708271) THEN 1 ELSE 0 END AS BIGINT)"
);
demo_db!(
    sqlx::MySql,
    try_lock = "SELECT CAST(COALESCE(GET_LOCK('idem_demo', 0), 0) AS SIGNED)"
);

// ---------------------------------------------------------------------------------------------
// The flow

async fn flow<DB: DemoDb>(setup: Setup) -> Result<Report, DemoError> {
    let Setup {
        url,
        run_id,
        say,
        stream,
    } = setup;
    let journal = stream.journal.clone();
    let points = Arc::new(Points::<DB>::connect(&url).await?);
    points.migrate().await?;
    let pool = points.pool().clone();
    // One demo at a time per database: another one's relay would publish this one's events
    // (the outbox is one table) and pick the same users. Held until the connection closes.
    let mut lock = pool.acquire().await?.detach();
    let deadline = Instant::now() + 2 * WAIT;
    let mut waiting = false;
    while !DB::try_lock(&mut lock).await? {
        if Instant::now() >= deadline {
            return Err(DemoError::Unexpected(format!(
                "another demo has been running on this database for {:?}",
                2 * WAIT
            )));
        }
        if !waiting {
            say.line("  another demo is running on this database: waiting for it to finish");
            waiting = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let service = OrderService::new(pool.clone()).await?;
    let client = Client {
        router: service.router()?,
        totals: Arc::new(Mutex::new(Totals::default())),
    };
    // Three users no earlier run used: balances start at 0.
    let base = (DB::highest_user(&pool, points.tables().balances()).await? / 100 + 1) * 100;
    let users = [base + 1, base + 2, base + 3];
    for user in users {
        if !DB::orders_of(&pool, user).await?.is_empty() || points.balance(user).await? != 0 {
            return Err(DemoError::Unexpected(format!(
                "user {user} has orders or points already; is another demo running on this database?"
            )));
        }
    }
    let mut orders: Vec<Tracked> = PLAN
        .iter()
        .enumerate()
        .map(|(n, &(label, user, amount_cents, paid))| Tracked {
            label,
            key: format!("{run_id}-{}", n + 1),
            user_id: users[user],
            amount_cents,
            paid,
            order_no: String::new(),
            create_requests: 0,
            pay_requests: 0,
        })
        .collect();
    let mut problems = Vec::new();

    say.step(
        1,
        format_args!(
            "a client creates orders: POST /orders with an Idempotency-Key (x-client-id: {CLIENT})"
        ),
    );
    for (n, order) in orders.iter_mut().enumerate() {
        if n == 2 {
            concurrent_creates(&client, order, &mut problems, say).await?;
        } else {
            create(&client, order, say).await?;
        }
        journal.label(&order.order_no, order.label);
        if n == 0 {
            // The response never reached the client: it retries with the same key.
            let retry = client
                .create(&order.key, order.user_id, order.amount_cents)
                .await?;
            order.create_requests += 1;
            let again: Order = retry.json("retrying a create")?;
            say.line(said(
                format_args!(
                    "POST /orders key {}  again: the response was lost",
                    order.key
                ),
                format_args!(
                    "{}{} {}, no new order",
                    retry.status.as_u16(),
                    if retry.replayed {
                        " Idempotent-Replayed:"
                    } else {
                        ":"
                    },
                    order.name()
                ),
            ));
            if again.order_no != order.order_no || !retry.replayed {
                problems.push(format!(
                    "{}: the retried create answered {} instead of replaying {}",
                    order.label, again.order_no, order.order_no
                ));
            }
        }
    }
    // A client bug: #2's key again, for another order.
    let reused = client.create(&orders[1].key, orders[1].user_id, 99).await?;
    say.line(said(
        format_args!(
            "POST /orders key {}  another body (a client bug)",
            orders[1].key
        ),
        format_args!(
            "{} {}; nothing created",
            reused.status.as_u16(),
            reused.title()
        ),
    ));
    if reused.status != StatusCode::UNPROCESSABLE_ENTITY {
        problems.push(format!(
            "a reused Idempotency-Key answered {}, not 422",
            reused.status
        ));
    }

    say.step(
        2,
        "it pays them: POST /orders/{order_no}/pay moves Created → Paid (strategy \"state\") and \
         writes the payment and its OrderPaid event to the outbox in one transaction",
    );
    for (n, order) in orders.iter_mut().enumerate() {
        match n {
            0 => {
                pay(&client, order, "", &mut problems, say).await?;
                pay(
                    &client,
                    order,
                    "again: the client timed out",
                    &mut problems,
                    say,
                )
                .await?;
            }
            2 => concurrent_pays(&client, order, &mut problems, say).await?,
            3 => say.line(format_args!("  ({} is paid later, in step 5)", order.label)),
            4 => cancel_then_pay(&client, order, &mut problems, say).await?,
            _ => pay(&client, order, "", &mut problems, say).await?,
        }
    }
    let mut unpublished = 0;
    for order in &orders {
        unpublished += DB::outbox_of(&pool, &order.order_no).await?.1;
    }
    say.line(format_args!(
        "  the outbox holds {unpublished} unpublished OrderPaid events, one per payment"
    ));

    say.step(
        3,
        format_args!(
            "three points consumers join the group `{GROUP}`: each credits an order's points once \
             (strategy \"tx\") and takes over entries left pending for {}s",
            MIN_IDLE.as_secs_f32()
        ),
    );
    stream.create_group(GROUP).await?;
    let counters = Counters::new();
    let stop = CancellationToken::new();
    // Whichever way this returns, the consumers stop.
    let _stop_on_return = stop.clone().drop_guard();
    let mut workers: Vec<(&'static str, JoinHandle<()>)> = Vec::new();
    for name in CONSUMERS {
        let handle = stream.open("consumer").await?;
        let consumer = Consumer::new(handle.clone(), points.clone(), GROUP, name)
            .with_counters(counters.clone());
        let worker = Worker {
            name,
            consumer,
            stream: handle,
        };
        workers.push((name, tokio::spawn(worker.work(stop.clone()))));
    }
    let (killed, lost_ack) = (orders[5].name(), orders[1].name());
    journal.state().lose_ack = Some(orders[1].order_no.clone());
    // Killed as soon as its credit stalls: on SQLite its open transaction holds the database's
    // write lock, which the relay and the other consumers wait for.
    let reaper = tokio::spawn(reap(
        points.stall_next_credit(&orders[5].order_no),
        stream.clone(),
        workers
            .iter()
            .map(|(name, task)| (*name, task.abort_handle()))
            .collect(),
        orders[5].order_no.clone(),
    ));
    say.line(format_args!(
        "  faults armed: the consumer that credits {killed} will be killed mid-handler; the \
         first ack for {lost_ack} will be lost"
    ));

    say.step(
        4,
        format_args!(
            "the outbox relay publishes the events (marking each published once the stream took \
             it) while the consumers credit them; the one crediting {killed} is killed"
        ),
    );
    journal.state().lose_reply = Some(orders[0].order_no.clone());
    let relay_stream = stream.open("relay").await?;
    match relay(&pool, &relay_stream).await {
        Err(_) => say.line(format_args!(
            "  relay pass 1 fails on the lost reply: {} stays unpublished in the outbox",
            orders[0].name()
        )),
        Ok(relayed) => problems.push(format!(
            "the relay published {} events although a stream reply was lost",
            relayed.published
        )),
    }
    let relayed = relay(&pool, &relay_stream).await?;
    say.line(format_args!(
        "  relay pass 2 publishes {} events, {} again: a duplicate on the stream",
        relayed.published,
        orders[0].name()
    ));
    let victim = reaper
        .await
        .map_err(|error| DemoError::Unexpected(format!("the reaper task: {error}")))??;
    handled_once(&journal).await?;

    say.step(
        5,
        format_args!(
            "duplicates at the same moment: {} is paid now, two relay replicas poll the outbox \
             at once while a producer's retry loop resends the event twice",
            orders[3].name()
        ),
    );
    pay(&client, &mut orders[3], "", &mut problems, say).await?;
    let second_relay = stream.open("relay replica 2").await?;
    let retrying = stream.open("producer retry").await?;
    let event = orders[3].event()?;
    let (one, two, three, four) = tokio::join!(
        relay(&pool, &relay_stream),
        relay(&pool, &second_relay),
        event.publish(&retrying),
        event.publish(&retrying),
    );
    say.line(format_args!(
        "  the relay replicas publish {} + {} events",
        one?.published, two?.published
    ));
    three?;
    four?;
    say.line("  later, a producer resends an event that was credited long ago, and a buggy one reuses an order number for another amount:");
    orders[2]
        .event()?
        .publish(&stream.open("producer resend").await?)
        .await?;
    OrderPaid::new(orders[0].order_no.clone(), orders[0].user_id, 1)
        .publish(&stream.open("buggy producer").await?)
        .await?;

    handled_once(&journal).await?;

    say.step(
        6,
        format_args!(
            "what was not acknowledged comes back: survivors take over entries idle for {}s",
            MIN_IDLE.as_secs_f32()
        ),
    );
    let all_acked = journal
        .wait_until(Instant::now() + WAIT, |state| state.unacked() == 0)
        .await;
    stop.cancel();
    for (name, task) in workers {
        match tokio::time::timeout(WAIT, task).await {
            Ok(Ok(())) if name != victim => {}
            Ok(Err(error)) if name == victim && error.is_cancelled() => {}
            Ok(Ok(())) => problems.push(format!("consumer {name} survived being killed")),
            Ok(Err(error)) => problems.push(format!("consumer {name} failed: {error}")),
            Err(_) => problems.push(format!("consumer {name} did not stop within {WAIT:?}")),
        }
    }
    if !all_acked {
        problems.push(format!(
            "{} entries were never acknowledged within {WAIT:?}",
            journal.state().unacked()
        ));
    }
    let left = stream.pending(GROUP, 1000).await?;
    let again = relay(&pool, &relay_stream).await?;
    say.line(format_args!(
        "  every entry acknowledged; {} pending; a last relay pass finds {} events to publish",
        left.len(),
        again.published
    ));

    // Reconciliation: expected from what the demo asked for, actual from the databases.
    let mut totals = {
        let mut totals = journal.state().totals;
        let http = *client.totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals.requests = http.requests;
        totals.replayed_responses = http.replayed_responses;
        totals.conflicts = http.conflicts;
        totals.key_reused = http.key_reused;
        totals
    };
    totals.pending_left = u32::try_from(left.len()).unwrap_or(u32::MAX);
    totals.consumers = counters.get();
    if !left.is_empty() {
        problems.push(format!(
            "{} entries are still pending on the stream",
            left.len()
        ));
    }
    let flows = journal.state().flows.clone();
    let mut lines = Vec::new();
    for order in &orders {
        lines.push(reconcile_order::<DB>(&pool, &points, order, &flows, &mut problems).await?);
    }
    let mut user_lines = Vec::new();
    for user in users {
        user_lines.push(reconcile_user::<DB>(&pool, &points, user, &orders, &mut problems).await?);
    }
    // Closing the session releases the lock; a close that fails drops the socket, which does
    // too.
    if let Err(error) = sqlx::Connection::close(lock).await {
        tracing::debug!(%error, "closing the demo's lock connection");
    }
    pool.close().await;
    Ok(Report {
        database: String::new(),
        stream: String::new(),
        orders: lines,
        users: user_lines,
        totals,
        problems,
        elapsed: Duration::ZERO,
    })
}

/// Waits until every entry has been handled once (but those whose consumer was killed).
async fn handled_once(journal: &Journal) -> Result<(), DemoError> {
    let done = journal
        .wait_until(Instant::now() + WAIT, |state| state.unhandled() == 0)
        .await;
    if done {
        Ok(())
    } else {
        Err(DemoError::Unexpected(format!(
            "{} entries were not handled within {WAIT:?}",
            journal.state().unhandled()
        )))
    }
}

/// A progress line: what was sent, and what came back.
fn said(sent: impl Display, answer: impl Display) -> String {
    format!("  {:<62} → {answer}", sent.to_string())
}

/// Creates `order` with one request, which must create it.
async fn create(client: &Client, order: &mut Tracked, say: Say) -> Result<(), DemoError> {
    let answer = client
        .create(&order.key, order.user_id, order.amount_cents)
        .await?;
    order.create_requests += 1;
    if answer.status != StatusCode::CREATED || answer.replayed {
        return Err(answer.unexpected(&format!("creating {}", order.label)));
    }
    let created: Order = answer.json("creating an order")?;
    order.order_no = created.order_no;
    say.line(said(
        format_args!(
            "POST /orders key {}  user {} {:>7}",
            order.key,
            order.user_id,
            money(order.amount_cents)
        ),
        format_args!("201 Created {}", order.name()),
    ));
    Ok(())
}

/// Eight copies of `order`'s create at once (a double click, a proxy's retry), then the copies
/// told to come back later, again.
async fn concurrent_creates(
    client: &Client,
    order: &mut Tracked,
    problems: &mut Vec<String>,
    say: Say,
) -> Result<(), DemoError> {
    let copies: Vec<_> = (0..8)
        .map(|_| {
            let (client, key) = (client.clone(), order.key.clone());
            let (user, amount) = (order.user_id, order.amount_cents);
            tokio::spawn(async move { client.create(&key, user, amount).await })
        })
        .collect();
    order.create_requests += 8;
    let (mut created, mut replayed, mut busy) = (Vec::new(), 0, 0);
    for copy in copies {
        let answer = copy
            .await
            .map_err(|error| DemoError::Unexpected(format!("a create task: {error}")))??;
        match answer.status {
            StatusCode::CREATED => {
                let order: Order = answer.json("creating an order")?;
                replayed += u32::from(answer.replayed);
                created.push(order.order_no);
            }
            StatusCode::CONFLICT => busy += 1,
            _ => return Err(answer.unexpected("a concurrent create")),
        }
    }
    created.sort();
    created.dedup();
    let Some(order_no) = created.first() else {
        return Err(DemoError::Unexpected(format!(
            "{}: none of 8 concurrent creates created the order",
            order.label
        )));
    };
    if created.len() > 1 {
        // A doubled create: the reconciliation counts the rows.
        problems.push(format!(
            "{}: 8 concurrent creates gave {} order numbers",
            order.label,
            created.len()
        ));
    }
    order.order_no = order_no.clone();
    say.line(said(
        format_args!(
            "8 × POST /orders key {} at once  user {} {}",
            order.key,
            order.user_id,
            money(order.amount_cents)
        ),
        format_args!(
            "{} × 201 Created {}, {replayed} × 201 Idempotent-Replayed{}",
            8 - replayed - busy,
            order.name(),
            if busy > 0 {
                format!(", {busy} × 409 in progress")
            } else {
                " (the copies waited on the record's row lock)".to_owned()
            }
        ),
    ));
    if busy > 0 {
        let mut same = 0;
        for _ in 0..busy {
            let answer = client
                .create(&order.key, order.user_id, order.amount_cents)
                .await?;
            order.create_requests += 1;
            let again: Order = answer.json("retrying a create")?;
            same += u32::from(answer.replayed && again.order_no == order.order_no);
        }
        say.line(said(
            format_args!(
                "{busy} × POST /orders key {} again (the first has answered)",
                order.key
            ),
            format_args!("{same} × 201 Idempotent-Replayed: {}", order.name()),
        ));
        if same != busy {
            problems.push(format!(
                "{}: {} of {busy} retried creates did not replay the order",
                order.label,
                busy - same
            ));
        }
    }
    Ok(())
}

/// Pays `order` once; `why` says why this request is sent (empty for the first).
async fn pay(
    client: &Client,
    order: &mut Tracked,
    why: &str,
    problems: &mut Vec<String>,
    say: Say,
) -> Result<(), DemoError> {
    let answer = client
        .post(&format!("/orders/{}/pay", order.order_no))
        .await?;
    order.pay_requests += 1;
    if answer.status != StatusCode::OK {
        return Err(answer.unexpected(&format!("paying {}", order.label)));
    }
    let moved: Moved = answer.json("paying")?;
    let first = why.is_empty();
    say.line(said(
        format_args!("POST /orders/{}/pay  {why}", order.label),
        if moved.moved {
            "200 Created → Paid: the payment and its OrderPaid event written"
        } else {
            "200 already Paid (moved: false): nothing written"
        },
    ));
    if moved.moved != first {
        problems.push(format!(
            "{}: pay request {} moved: {}",
            order.label, order.pay_requests, moved.moved
        ));
    }
    Ok(())
}

/// Eight pays of `order` at once: one moves it.
async fn concurrent_pays(
    client: &Client,
    order: &mut Tracked,
    problems: &mut Vec<String>,
    say: Say,
) -> Result<(), DemoError> {
    let uri = format!("/orders/{}/pay", order.order_no);
    let pays: Vec<_> = (0..8)
        .map(|_| {
            let (client, uri) = (client.clone(), uri.clone());
            tokio::spawn(async move { client.post(&uri).await })
        })
        .collect();
    order.pay_requests += 8;
    let mut moved = 0;
    for pay in pays {
        let answer = pay
            .await
            .map_err(|error| DemoError::Unexpected(format!("a pay task: {error}")))??;
        if answer.status != StatusCode::OK {
            return Err(answer.unexpected("a concurrent pay"));
        }
        moved += u32::from(answer.json::<Moved>("paying")?.moved);
    }
    say.line(said(
        format_args!("8 × POST /orders/{}/pay at once", order.label),
        format_args!(
            "8 × 200: {moved} moved it to Paid, {} found it Paid",
            8 - moved
        ),
    ));
    if moved != 1 {
        problems.push(format!(
            "{}: {moved} of 8 concurrent pays moved the order",
            order.label
        ));
    }
    Ok(())
}

/// Cancels `order`, then tries to pay it: `409`.
async fn cancel_then_pay(
    client: &Client,
    order: &mut Tracked,
    problems: &mut Vec<String>,
    say: Say,
) -> Result<(), DemoError> {
    let cancel = client
        .post(&format!("/orders/{}/cancel", order.order_no))
        .await?;
    let moved: Moved = cancel.json("cancelling")?;
    say.line(said(
        format_args!("POST /orders/{}/cancel", order.label),
        format_args!(
            "{} {}",
            cancel.status.as_u16(),
            if moved.moved {
                "Created → Cancelled"
            } else {
                "already Cancelled"
            }
        ),
    ));
    let refused = client
        .post(&format!("/orders/{}/pay", order.order_no))
        .await?;
    order.pay_requests += 1;
    say.line(said(
        format_args!("POST /orders/{}/pay  after the cancel", order.label),
        format_args!("{} {}", refused.status.as_u16(), refused.problem()),
    ));
    if !moved.moved || refused.status != StatusCode::CONFLICT {
        problems.push(format!(
            "{}: the cancel moved: {}, the pay after it answered {}, not 409",
            order.label, moved.moved, refused.status
        ));
    }
    Ok(())
}

/// Kills the consumer whose credit of `order_no` stalls (see [`Points::stall_next_credit`]) as
/// soon as it stalls: aborts its task, which drops its transaction uncommitted. Returns its
/// name.
async fn reap(
    stalled: Arc<Notify>,
    stream: DemoStream,
    consumers: Vec<(&'static str, AbortHandle)>,
    order_no: String,
) -> Result<&'static str, DemoError> {
    let journal = &stream.journal;
    let label = journal.state().label_of(&order_no);
    if tokio::time::timeout(WAIT, stalled.notified())
        .await
        .is_err()
    {
        return Err(DemoError::Unexpected(format!(
            "no consumer began crediting {label} within {WAIT:?}"
        )));
    }
    let (victim, entry_id) = journal.oldest_in_flight(&order_no).ok_or_else(|| {
        DemoError::Unexpected(format!(
            "no consumer is handling {label} although its credit stalled"
        ))
    })?;
    let (victim, task) = consumers
        .into_iter()
        .find(|(name, _)| *name == victim)
        .ok_or_else(|| DemoError::Unexpected(format!("no consumer is called `{victim}`")))?;
    task.abort();
    journal.done(&entry_id, victim);
    {
        let mut state = journal.state();
        state.totals.killed += 1;
        if let Some(&index) = state.by_id.get(&entry_id) {
            state.entries[index].killed = true;
        }
    }
    let entry = journal.entry_name(&entry_id);
    journal.say.line(format_args!(
        "  {victim:<15} {entry:<4} {label}  → ✗ killed after writing the ledger row and the \
         balance, before the commit; no ack"
    ));
    // What the broker knows: the entry is delivered and not acknowledged.
    let pending = stream.pending(GROUP, 1000).await?;
    let holder = pending
        .iter()
        .find(|pending| pending.id == entry_id)
        .ok_or_else(|| {
            DemoError::Unexpected(format!(
                "the entry of {label} is not pending although its consumer was killed"
            ))
        })?;
    journal.say.line(format_args!(
        "  {:<15} the database rolls its transaction back; {entry} stays pending on {}",
        "", holder.consumer
    ));
    Ok(victim)
}

async fn reconcile_order<DB: DemoDb>(
    pool: &Pool<DB>,
    points: &Points<DB>,
    order: &Tracked,
    flows: &HashMap<String, Flow>,
    problems: &mut Vec<String>,
) -> Result<OrderLine, DemoError> {
    let user_orders = DB::orders_of(pool, order.user_id).await?;
    let rows = user_orders
        .iter()
        .filter(|(_, amount, _)| *amount == order.amount_cents)
        .count();
    let state = user_orders
        .iter()
        .find(|(no, _, _)| *no == order.order_no)
        .map(|(_, _, status)| status.clone());
    let payments = DB::payments_of(pool, &order.order_no).await?;
    let outbox = DB::outbox_of(pool, &order.order_no).await?;
    let ledger: Vec<_> = points
        .ledger(order.user_id)
        .await?
        .into_iter()
        .filter(|row| row.order_no == order.order_no)
        .collect();
    let flow = flows.get(&order.order_no).copied().unwrap_or_default();
    let expected_points = if order.paid {
        order.amount_cents / 100
    } else {
        0
    };
    let credited_points: i64 = ledger.iter().map(|row| row.points).sum();
    let (expected_state, paid) = if order.paid {
        ("Paid", 1)
    } else {
        ("Cancelled", 0)
    };
    let mut verdict = Verdict::Ok;
    let mut flag = |what: Verdict, why: String| {
        problems.push(format!("{} {}: {why}", order.label, order.order_no));
        if verdict == Verdict::Ok {
            verdict = what;
        }
    };
    let rows = i64::try_from(rows).unwrap_or(i64::MAX);
    match rows {
        1 => {}
        0 => flag(Verdict::Lost, "no order row".to_owned()),
        n => flag(Verdict::Doubled, format!("{n} order rows for one create")),
    }
    if state.as_deref() != Some(expected_state) {
        flag(
            Verdict::Wrong,
            format!("state {state:?}, expected {expected_state}"),
        );
    }
    let payment_rows = i64::try_from(payments.len()).unwrap_or(i64::MAX);
    if payment_rows > paid {
        flag(Verdict::Doubled, format!("{payment_rows} payments"));
    } else if payment_rows < paid {
        flag(Verdict::Lost, "no payment".to_owned());
    } else if payments.iter().any(|&cents| cents != order.amount_cents) {
        flag(Verdict::Wrong, format!("payment of {payments:?} cents"));
    }
    if outbox.0 != paid {
        flag(
            if outbox.0 > paid {
                Verdict::Doubled
            } else {
                Verdict::Lost
            },
            format!("{} OrderPaid events in the outbox", outbox.0),
        );
    }
    if outbox.1 != 0 {
        flag(Verdict::Lost, "its event was never published".to_owned());
    }
    let ledger_rows = i64::try_from(ledger.len()).unwrap_or(i64::MAX);
    if credited_points > expected_points || ledger_rows > paid {
        flag(
            if order.paid {
                Verdict::Doubled
            } else {
                Verdict::Wrong
            },
            format!(
                "credited {credited_points} points in {ledger_rows} ledger rows, expected {expected_points}"
            ),
        );
    } else if credited_points < expected_points || ledger_rows < paid {
        flag(
            if ledger_rows == 0 {
                Verdict::Lost
            } else {
                Verdict::Wrong
            },
            format!("credited {credited_points} points, expected {expected_points}"),
        );
    }
    Ok(OrderLine {
        label: order.label.to_owned(),
        order_no: order.order_no.clone(),
        user_id: order.user_id,
        amount_cents: order.amount_cents,
        paid: order.paid,
        create_requests: order.create_requests,
        orders: rows,
        state,
        pay_requests: order.pay_requests,
        payments: payment_rows,
        outbox,
        events: flow.events,
        deliveries: flow.deliveries,
        absorbed: flow.absorbed,
        expected_points,
        credited_points,
        ledger_rows,
        verdict,
    })
}

async fn reconcile_user<DB: DemoDb>(
    pool: &Pool<DB>,
    points: &Points<DB>,
    user_id: i64,
    orders: &[Tracked],
    problems: &mut Vec<String>,
) -> Result<UserLine, DemoError> {
    let mine: Vec<&Tracked> = orders
        .iter()
        .filter(|order| order.user_id == user_id)
        .collect();
    let expected_orders = i64::try_from(mine.len()).unwrap_or(i64::MAX);
    let rows = i64::try_from(DB::orders_of(pool, user_id).await?.len()).unwrap_or(i64::MAX);
    let expected_points: i64 = mine
        .iter()
        .filter(|order| order.paid)
        .map(|order| order.amount_cents / 100)
        .sum();
    let ledger_points: i64 = points
        .ledger(user_id)
        .await?
        .iter()
        .map(|row| row.points)
        .sum();
    let balance = points.balance(user_id).await?;
    let verdict = if rows > expected_orders || balance > expected_points {
        Verdict::Doubled
    } else if rows < expected_orders || balance < expected_points {
        Verdict::Lost
    } else if ledger_points != balance {
        Verdict::Wrong
    } else {
        Verdict::Ok
    };
    if verdict != Verdict::Ok {
        problems.push(format!(
            "user {user_id}: {rows} orders (expected {expected_orders}), balance {balance} and \
             ledger {ledger_points} points (expected {expected_points})"
        ));
    }
    Ok(UserLine {
        user_id,
        orders: (expected_orders, rows),
        expected_points,
        ledger_points,
        balance,
        verdict,
    })
}

// ---------------------------------------------------------------------------------------------
// The table

/// Column alignment.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Writes a box-drawn table.
fn table(
    f: &mut fmt::Formatter<'_>,
    columns: &[(&str, Align)],
    rows: &[Vec<String>],
) -> fmt::Result {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(n, (title, _))| {
            rows.iter()
                .map(|row| row.get(n).map_or(0, |cell| cell.chars().count()))
                .chain([title.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let rule = |f: &mut fmt::Formatter<'_>, left: &str, mid: &str, right: &str| {
        let parts: Vec<String> = widths.iter().map(|w| "─".repeat(w + 2)).collect();
        writeln!(f, "  {left}{}{right}", parts.join(mid))
    };
    let line = |f: &mut fmt::Formatter<'_>, cells: Vec<(&str, Align)>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|((cell, align), &width)| match align {
                Align::Left => format!(" {cell:<width$} "),
                Align::Right => format!(" {cell:>width$} "),
            })
            .collect();
        writeln!(f, "  │{}│", parts.join("│"))
    };
    rule(f, "┌", "┬", "┐")?;
    line(
        f,
        columns
            .iter()
            .map(|(title, _)| (*title, Align::Left))
            .collect(),
    )?;
    rule(f, "├", "┼", "┤")?;
    for row in rows {
        line(
            f,
            row.iter()
                .zip(columns)
                .map(|(cell, (_, align))| (cell.as_str(), *align))
                .collect(),
        )?;
    }
    rule(f, "└", "┴", "┘")
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Align::{Left, Right};
        writeln!(
            f,
            "reconciliation: expected from what was asked, actual read back from the database"
        )?;
        writeln!(f, "  on {} · {}", self.database, self.stream)?;
        let rows: Vec<Vec<String>> = self
            .orders
            .iter()
            .map(|order| {
                vec![
                    format!("{} {}", order.label, short(&order.order_no)),
                    order.user_id.to_string(),
                    money(order.amount_cents),
                    order.state.clone().unwrap_or_else(|| "-".to_owned()),
                    format!("{} → {}", order.create_requests, order.orders),
                    format!("{} → {}", order.pay_requests, order.payments),
                    order.events.to_string(),
                    order.deliveries.to_string(),
                    order.absorbed.to_string(),
                    order.expected_points.to_string(),
                    order.credited_points.to_string(),
                    order.verdict.to_string(),
                ]
            })
            .collect();
        table(
            f,
            &[
                ("order", Left),
                ("user", Right),
                ("amount", Right),
                ("state", Left),
                ("creates", Right),
                ("pays", Right),
                ("events", Right),
                ("deliveries", Right),
                ("absorbed", Right),
                ("expected", Right),
                ("credited", Right),
                ("check", Left),
            ],
            &rows,
        )?;
        writeln!(
            f,
            "  creates, pays: requests sent → rows in orders, payments · events: entries on the \
             stream · deliveries: to consumers, redeliveries included · absorbed: duplicates \
             acked without crediting · expected: points of the paid amount · credited: points \
             in the ledger"
        )?;
        let rows: Vec<Vec<String>> = self
            .users
            .iter()
            .map(|user| {
                vec![
                    user.user_id.to_string(),
                    format!("{} → {}", user.orders.0, user.orders.1),
                    user.expected_points.to_string(),
                    user.ledger_points.to_string(),
                    user.balance.to_string(),
                    user.verdict.to_string(),
                ]
            })
            .collect();
        table(
            f,
            &[
                ("user", Right),
                ("orders", Right),
                ("expected", Right),
                ("ledger", Right),
                ("balance", Right),
                ("check", Left),
            ],
            &rows,
        )?;
        let t = &self.totals;
        let c = &t.consumers;
        writeln!(
            f,
            "  HTTP       {} requests · {} replayed (Idempotent-Replayed) · {} × 409 · {} × 422",
            t.requests, t.replayed_responses, t.conflicts, t.key_reused
        )?;
        let paid = self.orders.iter().filter(|order| order.paid).count();
        writeln!(
            f,
            "  stream     {} entries for {paid} payments{} · {} reply lost · {} ack lost · {} \
             consumer killed · {} deliveries taken over · {} left pending",
            t.entries,
            if t.foreign_entries > 0 {
                format!(
                    " (and {} of earlier runs' orders, credited but not reconciled here)",
                    t.foreign_entries
                )
            } else {
                String::new()
            },
            t.lost_replies,
            t.lost_acks,
            t.killed,
            t.taken_over,
            t.pending_left
        )?;
        writeln!(
            f,
            "  consumers  {} deliveries · {} credited · {} replayed · {} found in the ledger · \
             {} dead-lettered · {} not acked",
            c.delivered, c.credited, c.replayed, c.in_ledger, c.dead_lettered, c.not_acked
        )?;
        let balances: i64 = self.users.iter().map(|user| user.balance).sum();
        writeln!(
            f,
            "  points     expected {} · in the ledger {} · in the balances {}",
            self.expected_points(),
            self.credited_points(),
            balances
        )?;
        writeln!(f)?;
        if self.is_ok() {
            write!(
                f,
                "OK: {} orders created once, {paid} paid once, each paid order credited exactly \
                 once; nothing lost, nothing doubled ({:.1}s).",
                self.orders.len(),
                self.elapsed.as_secs_f32()
            )
        } else {
            writeln!(
                f,
                "MISMATCH: {} problem(s): an effect was lost or doubled",
                self.problems.len().max(1)
            )?;
            for problem in &self.problems {
                writeln!(f, "  - {problem}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(order_no: &str, user_id: i64, amount_cents: i64, paid: bool) -> Tracked {
        Tracked {
            label: "#t",
            key: format!("key-{order_no}"),
            user_id,
            amount_cents,
            paid,
            order_no: order_no.to_owned(),
            create_requests: 1,
            pay_requests: 1,
        }
    }

    /// The reconciliation reads its "actual" side from the tables: effects written twice or
    /// missing there are reported, whatever the counters say.
    #[tokio::test(flavor = "current_thread")]
    async fn reconciliation_finds_lost_and_doubled_effects_in_the_tables() {
        let store = idem_runtime::sqlite::SqliteStore::in_memory()
            .await
            .expect("SQLite in memory");
        let points = Points::<sqlx::Sqlite>::new(store);
        points.migrate().await.expect("the points tables");
        let pool = points.pool().clone();
        OrderService::new(pool.clone())
            .await
            .expect("the order tables");
        let rows = [
            // A paid order with every effect once.
            "INSERT INTO orders VALUES ('O-ok', 1, 12000, 'Paid')",
            "INSERT INTO payments VALUES ('O-ok', 12000)",
            r#"INSERT INTO outbox (topic, payload, published) VALUES ('order_paid', '{"order_no":"O-ok","user_id":1,"amount_cents":12000}', 1)"#,
            "INSERT INTO points_ledger (order_no, user_id, points, entry_id) VALUES ('O-ok', 1, 120, 'e1')",
            "INSERT INTO points_balances VALUES (1, 120)",
            // One create that made two orders.
            "INSERT INTO orders VALUES ('O-two', 2, 500, 'Cancelled')",
            "INSERT INTO orders VALUES ('O-two-again', 2, 500, 'Created')",
            // A paid order whose credit never happened.
            "INSERT INTO orders VALUES ('O-lost', 3, 7000, 'Paid')",
            "INSERT INTO payments VALUES ('O-lost', 7000)",
            r#"INSERT INTO outbox (topic, payload, published) VALUES ('order_paid', '{"order_no":"O-lost","user_id":3,"amount_cents":7000}', 1)"#,
            // A paid order credited once in the ledger, twice in the balance.
            "INSERT INTO orders VALUES ('O-twice', 4, 5000, 'Paid')",
            "INSERT INTO payments VALUES ('O-twice', 5000)",
            r#"INSERT INTO outbox (topic, payload, published) VALUES ('order_paid', '{"order_no":"O-twice","user_id":4,"amount_cents":5000}', 1)"#,
            "INSERT INTO points_ledger (order_no, user_id, points, entry_id) VALUES ('O-twice', 4, 50, 'e2')",
            "INSERT INTO points_balances VALUES (4, 100)",
        ];
        for row in rows {
            sqlx::raw_sql(sqlx::AssertSqlSafe(row))
                .execute(&pool)
                .await
                .expect(row);
        }
        let orders = [
            tracked("O-ok", 1, 12_000, true),
            tracked("O-two", 2, 500, false),
            tracked("O-lost", 3, 7_000, true),
            tracked("O-twice", 4, 5_000, true),
        ];
        let flows = HashMap::new();
        let mut problems = Vec::new();
        let mut verdicts = Vec::new();
        let mut lines = Vec::new();
        for order in &orders {
            let line =
                reconcile_order::<sqlx::Sqlite>(&pool, &points, order, &flows, &mut problems)
                    .await
                    .expect("read back");
            verdicts.push(line.verdict);
            lines.push(line);
        }
        assert_eq!(
            verdicts,
            [Verdict::Ok, Verdict::Doubled, Verdict::Lost, Verdict::Ok]
        );
        let mut users = Vec::new();
        let mut user_lines = Vec::new();
        for user in 1..=4 {
            let line = reconcile_user::<sqlx::Sqlite>(&pool, &points, user, &orders, &mut problems)
                .await
                .expect("read back");
            users.push(line.verdict);
            user_lines.push(line);
        }
        assert_eq!(
            users,
            [
                Verdict::Ok,
                Verdict::Doubled,
                Verdict::Lost,
                Verdict::Doubled
            ]
        );
        assert_eq!(problems.len(), 5, "{problems:#?}");

        let report = Report {
            database: "sqlite::memory:".to_owned(),
            stream: "none".to_owned(),
            orders: lines,
            users: user_lines,
            totals: Totals::default(),
            problems,
            elapsed: Duration::ZERO,
        };
        assert!(!report.is_ok());
        let shown = report.to_string();
        for expected in [
            "│ DOUBLED │",
            "│ LOST    │",
            "MISMATCH: 5 problem(s)",
            "O-lost",
        ] {
            assert!(shown.contains(expected), "no `{expected}` in\n{shown}");
        }
    }

    #[test]
    fn money_is_written_with_cents() {
        assert_eq!(money(12_000), "120.00");
        assert_eq!(money(4_505), "45.05");
        assert_eq!(money(7), "0.07");
    }

    #[test]
    fn database_kinds_come_from_the_url() {
        assert!(matches!(Kind::of("sqlite://demo.db"), Ok(Kind::Sqlite)));
        assert!(matches!(
            Kind::of("postgres://postgres@127.0.0.1/test"),
            Ok(Kind::Postgres)
        ));
        assert!(matches!(
            Kind::of("mysql://root@127.0.0.1/test"),
            Ok(Kind::MySql)
        ));
        assert!(matches!(Kind::of("oracle://x"), Err(DemoError::Usage(_))));
    }
}
