//! The points service: it consumes [`OrderPaid`] events from a stream's consumer group and
//! credits `amount_cents / 100` points to the user, **once per order**, however often the event
//! arrives.
//!
//! # The credit
//!
//! [`Points::credit`] runs one `#[idempotent(strategy = "tx")]` handler in one database
//! transaction: idem's claim of the order number, the ledger row (one per order: `order_no` is
//! the ledger's primary key) and the balance update are committed together or not at all.
//!
//! ```text
//! BEGIN
//!   SAVEPOINT idem_…; INSERT INTO idem_records … (claim `points.credit` / order_no)
//!   INSERT INTO points_ledger (order_no, user_id, points, entry_id) …
//!   INSERT INTO points_balances … ON CONFLICT / ON DUPLICATE KEY: points = points + ?
//!   UPDATE idem_records SET completed …, result = <the Credit>; RELEASE SAVEPOINT idem_…
//! COMMIT
//! ```
//!
//! A redelivery, a producer's resend (a new entry, the same order) or a copy handled by
//! another consumer at the same time finds the committed record (a concurrent one waits on its
//! row lock until the commit) and gets the stored [`Credit`] back without writing anything:
//! [`Outcome::Replayed`]. A consumer that dies mid-handler leaves an uncommitted transaction,
//! which the database rolls back: nothing of it remains, and the redelivery credits once.
//! Should idem's record be gone (it is kept for 30 days), the ledger's key still stops a second
//! credit: [`Outcome::InLedger`].
//!
//! Works on SQLite (a file), PostgreSQL and MySQL / MariaDB: [`Points`] is generic over the
//! database ([`PointsDb`]), whose SQL is in `points/db.rs`.
//!
//! # The consumer
//!
//! A [`Consumer`] is one member of a consumer group: it first takes over entries that other
//! (dead) consumers left pending for longer than its `min_idle`, then reads new ones, and
//! handles each:
//!
//! | what happened | counter | the entry |
//! |---|---|---|
//! | credited now | `credited` | acknowledged |
//! | a duplicate: idem replayed the stored credit | `replayed` | acknowledged |
//! | a duplicate idem forgot, found in the ledger | `in_ledger` | acknowledged |
//! | the order number was used with another payment (fingerprint mismatch), the entry is not an `OrderPaid`, or it was delivered more than `max_deliveries` times | `dead_lettered` | acknowledged, with an error line: a dead letter |
//! | in progress elsewhere, the database failed, anything else | `not_acked` | left pending: claimed again after `min_idle` |
//!
//! Several consumers (in one process or many, each with its own name) share a group: each
//! entry goes to one of them, and the survivors take over what a dead one left. Stop one with
//! its [`CancellationToken`]: it finishes the entries it holds, acknowledges them, and returns.

mod db;

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_runtime::unique::Inserted;
use idem_runtime::{Error, RecordKey, idempotent};
use serde::{Deserialize, Serialize};
use sqlx::{Pool, Transaction};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use self::db::{PointsDb, Statements};
use crate::events::{MAX_ORDER_NO_BYTES, OrderPaid};
use crate::stream::{Entry, EventStream, SCAN_START, StreamError};

/// The idem scope of the credit: its records are keyed `points.credit` / order number.
pub const SCOPE: &str = "points.credit";

/// The consumer group of the points service.
pub const GROUP: &str = "points";

/// The default prefix of the points tables: `points_ledger` and `points_balances`.
pub const DEFAULT_PREFIX: &str = "points";

/// The names of the points tables: `<prefix>_ledger` (one row per credited order) and
/// `<prefix>_balances` (one row per user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    ledger: String,
    balances: String,
}

impl Tables {
    /// `<prefix>_ledger` and `<prefix>_balances`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] unless `prefix` is a plain identifier (an ASCII letter or `_`,
    /// then ASCII letters, digits or `_`) of at most 48 bytes: it is pasted into statements.
    pub fn with_prefix(prefix: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidName {
            what: "points table prefix",
            name: prefix.to_owned(),
            reason,
        };
        let mut chars = prefix.chars();
        match chars.next() {
            None => return Err(invalid("it is empty")),
            Some(first) if !(first.is_ascii_alphabetic() || first == '_') => {
                return Err(invalid("it must start with an ASCII letter or `_`"));
            }
            Some(_) => {}
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid("it may hold ASCII letters, digits and `_` only"));
        }
        if prefix.len() > 48 {
            return Err(invalid("it is longer than 48 bytes"));
        }
        Ok(Self {
            ledger: format!("{prefix}_ledger"),
            balances: format!("{prefix}_balances"),
        })
    }

    /// The ledger table.
    pub fn ledger(&self) -> &str {
        &self.ledger
    }

    /// The balances table.
    pub fn balances(&self) -> &str {
        &self.balances
    }
}

impl Default for Tables {
    fn default() -> Self {
        Self {
            ledger: format!("{DEFAULT_PREFIX}_ledger"),
            balances: format!("{DEFAULT_PREFIX}_balances"),
        }
    }
}

/// One credit: a row of the ledger, and what the credit handler returns (idem stores it and
/// replays it to duplicates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// The order credited.
    pub order_no: String,
    /// The user credited.
    pub user_id: i64,
    /// The points credited.
    pub points: i64,
    /// The stream entry whose handling credited them.
    pub entry_id: String,
}

impl From<(String, i64, i64, String)> for Credit {
    fn from((order_no, user_id, points, entry_id): (String, i64, i64, String)) -> Self {
        Self {
            order_no,
            user_id,
            points,
            entry_id,
        }
    }
}

/// A ledger row is a credit.
pub type LedgerRow = Credit;

/// What [`Points::credit`] did with an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Credited now: the ledger row and the balance were written and committed.
    Credited(Credit),
    /// A duplicate: idem replayed the stored credit; nothing was written.
    Replayed(Credit),
    /// The ledger had the order already, although idem no longer remembered it (its record
    /// expired or was purged): nothing was written.
    InLedger(Credit),
}

impl Outcome {
    /// The credit of the order, made now or before.
    pub fn credit(&self) -> &Credit {
        match self {
            Self::Credited(credit) | Self::Replayed(credit) | Self::InLedger(credit) => credit,
        }
    }
}

/// Why an event was not credited.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PointsError {
    /// idem's outcome or failure: in progress elsewhere, a reused order number, the store
    /// failing, …
    #[error(transparent)]
    Idem(#[from] Error),
    /// The points tables could not be read or written.
    #[error("points database: {0}")]
    Database(#[from] sqlx::Error),
    /// The event cannot be credited as it is.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The ledger has the order with another user or amount (and idem no longer remembers
    /// it): a reused order number.
    #[error("order `{order_no}` was credited before with another payment: {credited:?}")]
    Conflict {
        /// The order.
        order_no: String,
        /// The ledger's row.
        credited: Credit,
    },
}

/// What a consumer does with an entry whose credit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Leave it pending: it is delivered again later and may succeed then.
    Retry,
    /// Acknowledge it with an error line: delivering it again cannot help.
    DeadLetter,
}

impl PointsError {
    /// Whether delivering the event again can help.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::InvalidEvent(_) | Self::Conflict { .. } => Disposition::DeadLetter,
            Self::Idem(
                Error::FingerprintMismatch { .. } | Error::EmptyKey { .. } | Error::EmptyScope,
            ) => Disposition::DeadLetter,
            // In progress, lease lost, the store or the database failing, a stored credit that
            // no longer decodes (fix the type): not final.
            Self::Idem(_) | Self::Database(_) => Disposition::Retry,
        }
    }
}

/// What the credit handler's body did in one call (a replay does not run it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ran {
    /// Not run: idem replayed the stored credit.
    NotRun = 0,
    /// Credited.
    Credited = 1,
    /// Found the order in the ledger.
    InLedger = 2,
}

/// Where the body says what it did: the handler's result is stored and replayed, so it cannot
/// say whether it was produced now.
#[derive(Debug, Default)]
struct BodyRun(AtomicU8);

impl BodyRun {
    fn set(&self, ran: Ran) {
        self.0.store(ran as u8, Ordering::SeqCst);
    }

    fn get(&self) -> Ran {
        match self.0.load(Ordering::SeqCst) {
            1 => Ran::Credited,
            2 => Ran::InLedger,
            _ => Ran::NotRun,
        }
    }
}

/// The points of a database: its idem store, its tables, and the credit handler.
pub struct Points<DB: PointsDb> {
    store: DB::Store,
    tables: Tables,
    statements: Statements,
    stall: Mutex<Option<(String, Arc<Notify>)>>,
    pause: Option<Pause>,
}

impl<DB: PointsDb> fmt::Debug for Points<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Points")
            .field("database", &DB::NAME)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

impl<DB: PointsDb> Points<DB> {
    /// The points on `store`'s database, in the default tables (see [`Tables`]).
    pub fn new(store: DB::Store) -> Self {
        Self::with_tables(store, Tables::default())
    }

    /// The points on `store`'s database, in `tables`.
    pub fn with_tables(store: DB::Store, tables: Tables) -> Self {
        Self {
            statements: DB::statements(&tables),
            store,
            tables,
            stall: Mutex::new(None),
            pause: None,
        }
    }

    /// Fault injection, for the chaos run: every credit calls `reached` with the order number
    /// inside its transaction, after writing its ledger row and balance and before idem
    /// records it, then waits `pause` — a window in which a killed process leaves an
    /// uncommitted credit behind.
    #[must_use]
    pub fn pause_each_credit(
        mut self,
        pause: Duration,
        reached: impl Fn(&str) + Send + Sync + 'static,
    ) -> Self {
        self.pause = Some(Pause {
            pause,
            reached: Box::new(reached),
        });
        self
    }

    /// Opens the database at `url` (`sqlite://points.db`, `postgres://…`, `mysql://…`) with
    /// idem's store in its default table.
    ///
    /// # Errors
    ///
    /// [`PointsError::Idem`] ([`Error::Store`]) if it cannot be opened.
    pub async fn connect(url: &str) -> Result<Self, PointsError> {
        Ok(Self::new(DB::connect(url).await?))
    }

    /// Creates idem's table and the points tables if they are missing; safe to run often.
    ///
    /// # Errors
    ///
    /// [`PointsError`] if a statement fails.
    pub async fn migrate(&self) -> Result<(), PointsError> {
        DB::migrate_store(&self.store).await?;
        DB::create_tables(self.pool(), &self.statements).await
    }

    /// The idem store.
    pub fn store(&self) -> &DB::Store {
        &self.store
    }

    /// The pool of the database.
    pub fn pool(&self) -> &Pool<DB> {
        DB::pool(&self.store)
    }

    /// The tables.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// idem's record key for `order_no` (scope [`SCOPE`]).
    ///
    /// # Errors
    ///
    /// [`Error::EmptyKey`] for a blank order number.
    pub fn record_key(order_no: &str) -> Result<RecordKey, Error> {
        RecordKey::from_value(SCOPE, order_no)
    }

    /// Credits the points of `event`, which the stream entry `entry_id` carried, once per
    /// order number: in one transaction, committed here (see the [module](self)).
    ///
    /// # Errors
    ///
    /// [`PointsError`]; its [`disposition`](PointsError::disposition) says whether delivering
    /// the event again can help. Nothing was written then.
    pub async fn credit(&self, entry_id: &str, event: &OrderPaid) -> Result<Outcome, PointsError> {
        let points = checked_points(event)?;
        let mut tx = self.pool().begin().await?;
        let body = BodyRun::default();
        match self
            .credit_in(&mut tx, entry_id, points, &body, event)
            .await
        {
            Ok(credit) => {
                // The handler returned: its record and writes go in together.
                tx.commit().await?;
                Ok(match body.get() {
                    Ran::Credited => Outcome::Credited(credit),
                    Ran::InLedger => Outcome::InLedger(credit),
                    Ran::NotRun => Outcome::Replayed(credit),
                })
            }
            Err(error) => {
                if let Err(rollback) = tx.rollback().await {
                    // The connection is closed instead, which rolls back too.
                    tracing::warn!(%rollback, "could not roll back a failed credit");
                }
                Err(error)
            }
        }
    }

    /// The credit handler: runs once per order number; duplicates get the stored [`Credit`].
    /// (`scope` is [`SCOPE`], written out: the attribute takes a literal.)
    #[idempotent(
        key = "order_no",
        store = &self.store,
        scope = "points.credit",
        strategy = "tx",
        tx = tx,
        ttl = "30d"
    )]
    async fn credit_in(
        &self,
        tx: &mut Transaction<'_, DB>,
        entry_id: &str,
        points: i64,
        body: &BodyRun,
        event: &OrderPaid,
    ) -> Result<Credit, PointsError> {
        let credit = Credit {
            order_no: event.order_no.clone(),
            user_id: event.user_id,
            points,
            entry_id: entry_id.to_owned(),
        };
        if DB::insert_ledger(tx, &self.statements, &credit).await? == Inserted::Duplicate {
            let credited = DB::ledger_row(tx, &self.statements, &event.order_no)
                .await?
                // Deleted since the insert found it: try again later.
                .ok_or(PointsError::Database(sqlx::Error::RowNotFound))?;
            if (credited.user_id, credited.points) != (credit.user_id, credit.points) {
                return Err(PointsError::Conflict {
                    order_no: credit.order_no,
                    credited,
                });
            }
            body.set(Ran::InLedger);
            return Ok(credited);
        }
        DB::add_to_balance(tx, &self.statements, event.user_id, points).await?;
        self.stall_if_asked(&event.order_no).await;
        if let Some(pause) = &self.pause {
            (pause.reached)(&event.order_no);
            tokio::time::sleep(pause.pause).await;
        }
        body.set(Ran::Credited);
        Ok(credit)
    }

    /// `user_id`'s points balance (0 if the user has none).
    ///
    /// # Errors
    ///
    /// [`PointsError::Database`] if it cannot be read.
    pub async fn balance(&self, user_id: i64) -> Result<i64, PointsError> {
        DB::balance(self.pool(), &self.statements, user_id).await
    }

    /// `user_id`'s ledger rows, by order number.
    ///
    /// # Errors
    ///
    /// [`PointsError::Database`] if they cannot be read.
    pub async fn ledger(&self, user_id: i64) -> Result<Vec<LedgerRow>, PointsError> {
        DB::ledger(self.pool(), &self.statements, user_id).await
    }

    /// Fault injection, for demos and tests: the next credit of `order_no` stops inside its
    /// transaction, after writing its ledger row and balance and before idem records it, and
    /// never returns — what a consumer killed mid-handler leaves behind. The returned
    /// [`Notify`] is notified when a credit stops there; abort its task then.
    pub fn stall_next_credit(&self, order_no: &str) -> Arc<Notify> {
        let reached = Arc::new(Notify::new());
        *self.stall.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((order_no.to_owned(), reached.clone()));
        reached
    }

    async fn stall_if_asked(&self, order_no: &str) {
        let reached = {
            let mut stall = self.stall.lock().unwrap_or_else(PoisonError::into_inner);
            match stall.take() {
                Some((order, reached)) if order == order_no => reached,
                other => {
                    *stall = other;
                    return;
                }
            }
        };
        tracing::warn!(order_no, "credit stalled mid-transaction (fault injection)");
        reached.notify_one();
        std::future::pending::<()>().await;
    }
}

/// A pause inside every credit: see [`Points::pause_each_credit`].
struct Pause {
    pause: Duration,
    reached: Box<dyn Fn(&str) + Send + Sync>,
}

/// The points `event` earns, once it is checked to be creditable.
fn checked_points(event: &OrderPaid) -> Result<i64, PointsError> {
    if event.order_no.trim().is_empty() {
        return Err(PointsError::InvalidEvent(
            "the order number is empty".into(),
        ));
    }
    if event.order_no.len() > MAX_ORDER_NO_BYTES {
        return Err(PointsError::InvalidEvent(format!(
            "the order number is longer than {MAX_ORDER_NO_BYTES} bytes"
        )));
    }
    i64::try_from(event.points()).map_err(|_| {
        PointsError::InvalidEvent(format!("{} cents is out of range", event.amount_cents))
    })
}

/// What the consumers of a group have done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Entries handed to the handler (redeliveries counted again).
    pub delivered: u64,
    /// Entries that credited points.
    pub credited: u64,
    /// Duplicates idem replayed, acknowledged without crediting.
    pub replayed: u64,
    /// Orders found in the ledger although idem no longer remembered them, acknowledged
    /// without crediting.
    pub in_ledger: u64,
    /// Deliveries left pending to be delivered again (in progress elsewhere, failures).
    pub not_acked: u64,
    /// Entries acknowledged without crediting because they cannot be credited.
    pub dead_lettered: u64,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered {} · credited {} · replayed {} · in ledger {} · not acked {} · \
             dead-lettered {}",
            self.delivered,
            self.credited,
            self.replayed,
            self.in_ledger,
            self.not_acked,
            self.dead_lettered
        )
    }
}

/// Live counters of one consumer or of several (clones share them): read a [`Tally`], or
/// wait for one.
#[derive(Clone, Debug)]
pub struct Counters {
    tally: Arc<watch::Sender<Tally>>,
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    /// Counters at zero.
    pub fn new() -> Self {
        Self {
            tally: Arc::new(watch::Sender::new(Tally::default())),
        }
    }

    /// The counts now.
    pub fn get(&self) -> Tally {
        *self.tally.borrow()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Tally> {
        self.tally.subscribe()
    }

    /// Waits until the counts satisfy `done` and returns them.
    pub async fn wait_for(&self, done: impl FnMut(&Tally) -> bool) -> Tally {
        let mut changes = self.subscribe();
        match changes.wait_for(done).await {
            Ok(tally) => *tally,
            // Only if the sender were gone, but `self` holds it.
            Err(_) => self.get(),
        }
    }

    fn record(&self, change: impl FnOnce(&mut Tally)) {
        self.tally.send_modify(change);
    }
}

/// What a consumer did with one entry.
#[derive(Debug)]
pub enum Handled {
    /// Credited, or a duplicate: acknowledged.
    Done(Outcome),
    /// Cannot be credited: acknowledged with an error line.
    DeadLettered(String),
    /// Left pending, to be delivered again.
    NotAcked(PointsError),
}

/// One consumer of a group: reads entries, credits them through [`Points`], acknowledges
/// what is done (see the [module](self)).
pub struct Consumer<S, DB: PointsDb> {
    stream: S,
    points: Arc<Points<DB>>,
    group: String,
    name: String,
    batch: usize,
    block: Duration,
    min_idle: Duration,
    max_deliveries: Option<u64>,
    retry_pause: Duration,
    counters: Counters,
}

impl<S, DB: PointsDb> fmt::Debug for Consumer<S, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("group", &self.group)
            .field("name", &self.name)
            .field("batch", &self.batch)
            .field("block", &self.block)
            .field("min_idle", &self.min_idle)
            .field("max_deliveries", &self.max_deliveries)
            .field("counters", &self.counters.get())
            .finish_non_exhaustive()
    }
}

impl<S: EventStream, DB: PointsDb> Consumer<S, DB> {
    /// The consumer `name` of `group` on `stream`, crediting through `points`. It reads
    /// batches of 16, blocks up to 1 s for new entries, takes over entries idle for 30 s,
    /// never gives up on an entry, and pauses 1 s after a stream error.
    pub fn new(stream: S, points: Arc<Points<DB>>, group: &str, name: &str) -> Self {
        Self {
            stream,
            points,
            group: group.to_owned(),
            name: name.to_owned(),
            batch: 16,
            block: Duration::from_secs(1),
            min_idle: Duration::from_secs(30),
            max_deliveries: None,
            retry_pause: Duration::from_secs(1),
            counters: Counters::new(),
        }
    }

    /// Reads up to `batch` entries at a time.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Waits up to `block` for new entries in each read. A stop takes effect when the read
    /// returns.
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// Takes over entries pending (on any consumer, itself included) for `min_idle` or longer.
    /// Keep it above the slowest credit, or a live consumer's entry is handled twice (which
    /// idem absorbs, at the cost of a wait).
    pub fn min_idle(mut self, min_idle: Duration) -> Self {
        self.min_idle = min_idle;
        self
    }

    /// Dead-letters an entry delivered more than `max` times instead of handling it again
    /// (`None`, the default: never give up — an entry that keeps failing keeps coming back).
    pub fn max_deliveries(mut self, max: Option<u64>) -> Self {
        self.max_deliveries = max;
        self
    }

    /// Pauses this long after a stream error before trying again.
    pub fn retry_pause(mut self, pause: Duration) -> Self {
        self.retry_pause = pause;
        self
    }

    /// Counts into `counters` (shared with other consumers, say) instead of counters of its
    /// own.
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = counters;
        self
    }

    /// The consumer's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The consumer's name in its group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consumes until `stop` is cancelled, then returns the counts. Creates the group if it
    /// is missing; stream errors are logged and retried after a pause.
    pub async fn run(&self, stop: CancellationToken) -> Tally {
        tracing::info!(
            consumer = %self.name,
            group = %self.group,
            stream = %self.stream.name(),
            "consumer started"
        );
        let mut group_ready = false;
        while !stop.is_cancelled() {
            if !group_ready {
                match self.stream.create_group(&self.group).await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        if self.pause_after(&error, &stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if let Err(error) = self.poll().await {
                group_ready = !matches!(error, StreamError::NoGroup { .. });
                if self.pause_after(&error, &stop).await {
                    break;
                }
            }
        }
        let tally = self.counters.get();
        tracing::info!(consumer = %self.name, %tally, "consumer stopped");
        tally
    }

    /// Logs `error` and pauses; `true` if `stop` was cancelled meanwhile.
    async fn pause_after(&self, error: &StreamError, stop: &CancellationToken) -> bool {
        tracing::warn!(
            consumer = %self.name,
            %error,
            "stream error; trying again in {:?}",
            self.retry_pause
        );
        tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(self.retry_pause) => false,
        }
    }

    /// One round: takes over and handles the entries idle for `min_idle` (scanning the whole
    /// pending list), then reads and handles one batch of new ones (waiting up to `block`).
    /// Returns how many entries it handled.
    ///
    /// # Errors
    ///
    /// [`StreamError`] if the stream fails; the entries not acknowledged then stay pending.
    pub async fn poll(&self) -> Result<usize, StreamError> {
        let mut handled = 0;
        let mut start = SCAN_START.to_owned();
        loop {
            let claimed = self
                .stream
                .autoclaim(&self.group, &self.name, self.min_idle, &start, self.batch)
                .await?;
            for entry in &claimed.entries {
                tracing::info!(
                    consumer = %self.name,
                    entry = %entry.id,
                    deliveries = entry.deliveries,
                    "took over an entry left pending"
                );
                self.handle(entry).await?;
                handled += 1;
            }
            match claimed.next {
                Some(next) => start = next,
                None => break,
            }
        }
        let entries = self
            .stream
            .read_group(&self.group, &self.name, self.batch, self.block)
            .await?;
        for entry in &entries {
            self.handle(entry).await?;
            handled += 1;
        }
        Ok(handled)
    }

    /// Handles one entry delivered to this consumer: credits it, and acknowledges it unless
    /// it is to be delivered again.
    ///
    /// # Errors
    ///
    /// [`StreamError`] if the acknowledgement fails (the entry stays pending; its redelivery
    /// is a duplicate).
    pub async fn handle(&self, entry: &Entry) -> Result<Handled, StreamError> {
        self.counters.record(|tally| tally.delivered += 1);
        let handled = self.decide(entry).await;
        let (consumer, id) = (&self.name, &entry.id);
        match &handled {
            Handled::Done(Outcome::Credited(credit)) => {
                self.counters.record(|tally| tally.credited += 1);
                tracing::info!(
                    consumer, entry = %id, order_no = %credit.order_no,
                    "credited {} points to user {}; ack",
                    credit.points, credit.user_id
                );
            }
            Handled::Done(outcome) => {
                let how = if let Outcome::InLedger(_) = outcome {
                    self.counters.record(|tally| tally.in_ledger += 1);
                    "found in the ledger"
                } else {
                    self.counters.record(|tally| tally.replayed += 1);
                    "replayed"
                };
                let credit = outcome.credit();
                tracing::info!(
                    consumer, entry = %id, order_no = %credit.order_no,
                    "duplicate, {how}: credited once by entry {}; ack",
                    credit.entry_id
                );
            }
            Handled::DeadLettered(reason) => {
                self.counters.record(|tally| tally.dead_lettered += 1);
                tracing::error!(
                    consumer, entry = %id, event = ?entry.event, deliveries = entry.deliveries,
                    "dead letter: {reason}; ack"
                );
            }
            Handled::NotAcked(error) => {
                self.counters.record(|tally| tally.not_acked += 1);
                tracing::warn!(
                    consumer, entry = %id, deliveries = entry.deliveries,
                    "not acked, to be delivered again: {error}"
                );
                return Ok(handled);
            }
        }
        if !self.stream.ack(&self.group, &entry.id).await? {
            tracing::debug!(consumer, entry = %id, "was no longer pending");
        }
        Ok(handled)
    }

    async fn decide(&self, entry: &Entry) -> Handled {
        if let Some(max) = self.max_deliveries
            && entry.deliveries > max
        {
            return Handled::DeadLettered(format!("delivered {} times", entry.deliveries));
        }
        let Some(json) = entry.event.as_deref() else {
            return Handled::DeadLettered("the entry has no `event` field".into());
        };
        let event = match OrderPaid::from_json(json) {
            Ok(event) => event,
            Err(error) => return Handled::DeadLettered(format!("not an OrderPaid: {error}")),
        };
        match self.points.credit(&entry.id, &event).await {
            Ok(outcome) => Handled::Done(outcome),
            Err(error) => match error.disposition() {
                Disposition::DeadLetter => Handled::DeadLettered(error.to_string()),
                Disposition::Retry => Handled::NotAcked(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_prefixes_must_be_plain_identifiers() {
        let tables = Tables::with_prefix("shop_7").expect("plain");
        assert_eq!(
            (tables.ledger(), tables.balances()),
            ("shop_7_ledger", "shop_7_balances")
        );
        assert_eq!(Tables::default().ledger(), "points_ledger");
        for bad in ["", "7shop", "shop-7", "shop; DROP TABLE x", &"p".repeat(49)] {
            assert!(
                matches!(Tables::with_prefix(bad), Err(Error::InvalidName { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn events_that_cannot_be_credited_are_dead_letters() {
        for (event, why) in [
            (OrderPaid::new(" ", 1, 100), "empty"),
            (
                OrderPaid::new("A".repeat(129), 1, 100),
                "longer than 128 bytes",
            ),
        ] {
            let error = checked_points(&event).expect_err("not creditable");
            assert!(error.to_string().contains(why), "{error}");
            assert_eq!(error.disposition(), Disposition::DeadLetter);
        }
        assert_eq!(
            checked_points(&OrderPaid::new("A-1", 1, 12_399)).ok(),
            Some(123)
        );
        assert_eq!(
            checked_points(&OrderPaid::new("A-1", 1, u64::MAX)).ok(),
            Some(184_467_440_737_095_516)
        );
    }

    #[test]
    fn idem_outcomes_decide_between_retry_and_dead_letter() {
        let in_progress = PointsError::Idem(Error::InProgress {
            scope: SCOPE.into(),
            key: "A-1".into(),
            retry_after: Duration::from_secs(1),
        });
        assert_eq!(in_progress.disposition(), Disposition::Retry);
        let reused = PointsError::Idem(Error::FingerprintMismatch {
            scope: SCOPE.into(),
            key: "A-1".into(),
        });
        assert_eq!(reused.disposition(), Disposition::DeadLetter);
        let database = PointsError::Database(sqlx::Error::PoolClosed);
        assert_eq!(database.disposition(), Disposition::Retry);
    }
}
