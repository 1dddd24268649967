//! The `tx` strategy: the record is written in the handler's own database transaction.
//!
//! With the `claim` strategy a crash between the body's effect and the record of its result
//! lets a redelivery run the body again. When the body's effects are writes to the same
//! database as the store, `tx` closes that gap: the claim, the body's writes and the stored
//! result are one transaction, so they are committed together or not at all.
//!
//! In the caller's transaction (a `sqlx::Transaction`):
//!
//! 1. [`TxStore::claim_in`] sets a savepoint of its own and claims the key with the store's
//!    usual claim statement. A concurrent duplicate's claim waits on the record's row lock
//!    until this transaction ends: after a commit it finds the completed record and replays
//!    it; after a rollback it claims the key itself. A key completed before replays at once
//!    ([`TxClaim::Completed`]) and the savepoint is undone.
//! 2. The body writes through the same transaction.
//! 3. [`TxStore::complete_in`] records the result in the transaction (the savepoint is
//!    released); the caller commits. Each claim has its own savepoint, so handlers nested in
//!    one transaction each undo only their own work — and an outer handler that fails undoes
//!    the inner ones with it. If the body fails, [`TxStore::abandon_in`] rolls back to
//!    the savepoint: the claim and every write since are undone, and the transaction can go on
//!    or be rolled back. If even that rollback fails, the error says to roll the transaction
//!    back (MySQL, for one, has then already rolled it back after a deadlock). A crash or a
//!    dropped transaction rolls everything back, so the next delivery runs the body again,
//!    once.
//!
//! **Never commit a transaction whose handler did not return** (its future was dropped, or a
//! timeout around it fired): the claim would commit in progress, with the body's writes so
//! far, and the redelivery after the lease would run the body again. Roll it back.
//!
//! On MySQL and MariaDB the claim sets the session's `LAST_INSERT_ID()` (on MySQL that is how
//! the store learns what its statement did): read the id of your own insert before the handler
//! claims.
//!
//! Isolation: on PostgreSQL run the transaction at `READ COMMITTED` (the default); at
//! `REPEATABLE READ` or above, a claim that waited for a concurrent commit fails with a
//! serialization error instead of replaying, and a claim can report a key as in progress when
//! it completed after the transaction's snapshot. MySQL / MariaDB work at their default
//! `REPEATABLE READ` (the claim locks the record, and it and the read that may follow it see
//! the latest commit). On SQLite, begin the transaction with `BEGIN IMMEDIATE` if it reads before the
//! handler runs, so that taking the write lock cannot fail.

use std::future::Future;
use std::time::Duration;

use crate::{Error, Fingerprint, Lease, RecordKey, Store};

/// What a claim inside a transaction found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxClaim {
    /// The key is claimed in this transaction: run the body on it, then
    /// [`complete_in`](TxStore::complete_in) (or [`abandon_in`](TxStore::abandon_in) if the
    /// body failed).
    Run(TxLease),
    /// The key was completed and committed before: the stored result. Nothing was written.
    Completed(Vec<u8>),
}

/// A claim held in a transaction: its lease and the savepoint set before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxLease {
    lease: Lease,
    savepoint: String,
}

impl TxLease {
    /// A claim under `lease`, made after the savepoint `savepoint` (a plain identifier).
    pub fn new(lease: Lease, savepoint: String) -> Self {
        Self { lease, savepoint }
    }

    /// The lease of the claim.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The savepoint set before the claim: unique per claim, so that handlers nested in one
    /// transaction each undo only their own work.
    pub fn savepoint(&self) -> &str {
        &self.savepoint
    }
}

/// A store whose records can be written in the caller's own database transaction: the SQL
/// stores.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot keep records in your transaction",
    label = "`strategy = \"tx\"` needs a SQL store here",
    note = "use the `SqliteStore`, `PostgresStore` or `MySqlStore` of the database your transaction \
            is on (or a reference or `Arc` of one)"
)]
pub trait TxStore: Store {
    /// The database the store is in.
    type Database: sqlx::Database;

    /// Begins a transaction on the store's pool, for [`claim_in`](Self::claim_in) and the
    /// body's writes.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if no connection can be had or `BEGIN` fails.
    fn begin(
        &self,
    ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Database>, Error>> + Send;

    /// Sets a savepoint of its own in `tx` and claims `key` there (see the [module](self)).
    ///
    /// # Errors
    ///
    /// [`Error::FingerprintMismatch`] for a key used with another payload,
    /// [`Error::InProgress`] for a key another call holds under the `claim` strategy,
    /// [`Error::Store`] and [`Error::Decode`] as for [`Store::claim`]. The savepoint is undone
    /// when the claim does not acquire the key; if even that fails (MySQL rolls the whole
    /// transaction back on a deadlock), the error says so: roll the transaction back.
    fn claim_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> impl Future<Output = Result<TxClaim, Error>> + Send;

    /// [`claim_in`](Self::claim_in), waiting at most `wait` for another transaction that
    /// holds the record's row lock (a copy of this call that has not committed): after that
    /// the claim gives up with [`Error::InProgress`] instead of holding its connection until
    /// the other commits. PostgreSQL bounds the wait to the millisecond (`lock_timeout`, local
    /// to the transaction), MySQL / MariaDB to whole seconds (`innodb_lock_wait_timeout`); the
    /// value in force before is put back after the claim, so the body's statements wait as
    /// they would have. On MySQL the setting belongs to the session, which outlives the
    /// transaction: a call cancelled between the two (its future dropped) leaves the bound on
    /// the connection. On SQLite, where a writer waits for any other writer, the pool's busy
    /// timeout applies and its expiry is [`Error::Store`].
    ///
    /// # Errors
    ///
    /// As for [`claim_in`](Self::claim_in).
    fn claim_in_within(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
        wait: Duration,
    ) -> impl Future<Output = Result<TxClaim, Error>> + Send;

    /// Records `result` for `claim` in the transaction, kept for `ttl` once it is committed,
    /// and releases the claim's savepoint.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] if the record is not this claim's, [`Error::Store`] if a
    /// statement fails.
    fn complete_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        key: &RecordKey,
        claim: &TxLease,
        result: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Rolls the transaction back to the savepoint of `claim`: the claim and everything
    /// written since are undone.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if that fails: then roll the whole transaction back, because it still
    /// holds the claim and the body's writes.
    fn abandon_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Database>,
        claim: &TxLease,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

macro_rules! forward_tx_store {
    ($($ptr:ty),*) => {$(
        impl<S: TxStore + ?Sized> TxStore for $ptr {
            type Database = S::Database;

            fn begin(
                &self,
            ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Database>, Error>> + Send {
                (**self).begin()
            }

            fn claim_in(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: Duration,
            ) -> impl Future<Output = Result<TxClaim, Error>> + Send {
                (**self).claim_in(tx, key, fingerprint, lease)
            }

            fn claim_in_within(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: Duration,
                wait: Duration,
            ) -> impl Future<Output = Result<TxClaim, Error>> + Send {
                (**self).claim_in_within(tx, key, fingerprint, lease, wait)
            }

            fn complete_in(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                key: &RecordKey,
                claim: &TxLease,
                result: &[u8],
                ttl: Duration,
            ) -> impl Future<Output = Result<(), Error>> + Send {
                (**self).complete_in(tx, key, claim, result, ttl)
            }

            fn abandon_in(
                &self,
                tx: &mut sqlx::Transaction<'_, Self::Database>,
                claim: &TxLease,
            ) -> impl Future<Output = Result<(), Error>> + Send {
                (**self).abandon_in(tx, claim)
            }
        }
    )*};
}

forward_tx_store!(&S, std::sync::Arc<S>, Box<S>);

/// Work applied in a transaction under a savepoint of its own — a guarded state transition
/// ([`state::transition_in`](crate::state::transition_in)) or a versioned update
/// ([`version::update_in`](crate::version::update_in)) — whose body has not finished yet.
#[derive(Debug)]
#[must_use = "finish it with `finish_in`: keep it, or roll it back with the body's writes"]
pub struct Pending {
    savepoint: String,
}

impl Pending {
    pub(crate) fn new(savepoint: String) -> Self {
        Self { savepoint }
    }
}

/// Ends [`Pending`] work: keeps it with the body's writes when the body succeeded, or rolls
/// both back when it failed.
///
/// # Errors
///
/// [`Error::Store`] when the savepoint cannot be released or rolled back: then roll the
/// transaction back.
pub async fn finish_in<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    pending: Pending,
    succeeded: bool,
) -> Result<(), Error>
where
    DB: crate::sql::Backend,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    if succeeded {
        crate::sql::release_savepoint::<DB>(&mut **tx, &pending.savepoint).await
    } else {
        crate::sql::abandon::<DB>(&mut **tx, &pending.savepoint).await
    }
}

/// Ends [`Pending`] work with the body's outcome: the body's value when both are kept, its
/// error when both are rolled back, or the error of a rollback that failed.
pub(crate) async fn keep_or_undo<DB, T, E>(
    tx: &mut sqlx::Transaction<'_, DB>,
    pending: Pending,
    body: Result<T, E>,
) -> Result<T, E>
where
    DB: crate::sql::Backend,
    E: From<Error>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let kept = finish_in(tx, pending, body.is_ok()).await;
    match (body, kept) {
        (Ok(value), Ok(())) => Ok(value),
        (Err(error), Ok(())) => Err(error),
        (_, Err(undo)) => Err(E::from(undo)),
    }
}
