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

use crate::Error;

pub use crate::sql::{TxClaim, TxLease, TxStore};

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
