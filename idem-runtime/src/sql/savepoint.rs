//! Savepoints: a claim in the caller's transaction sets one of its own, so that it can be
//! undone alone; and the claim in a transaction, settled or given up.

use std::time::Duration;

use sqlx::{AssertSqlSafe, Executor};

use super::{Backend, CLAIM_ATTEMPTS, TxClaim, TxLease, store_error};
use crate::store::Claim;
use crate::{Error, RecordKey, StoreError};

/// [`TxStore::claim_in`](crate::tx::TxStore::claim_in) with the wait on another transaction's
/// record bounded by `wait` where the database lets idem bound it: a claim that waited that
/// long is [`Error::InProgress`].
pub(crate) async fn claim_in_within<DB, F>(
    tx: &mut sqlx::Transaction<'_, DB>,
    key: &RecordKey,
    lease: Duration,
    wait: Duration,
    claim: F,
) -> Result<TxClaim, Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    F: AsyncFnOnce(&mut sqlx::Transaction<'_, DB>) -> Result<TxClaim, Error>,
{
    let Some((bound, unbound)) = DB::lock_wait(wait) else {
        return claim(tx).await;
    };
    sqlx::raw_sql(AssertSqlSafe(bound))
        .execute(&mut **tx)
        .await
        .map_err(store_error::<DB>)?;
    let claimed = match claim(tx).await {
        Err(Error::Store(store)) if is_lock_timeout::<DB>(&store) => Err(Error::InProgress {
            scope: key.scope().to_owned(),
            key: key.key().to_owned(),
            retry_after: lease,
        }),
        other => other,
    };
    // The handler's own statements wait as the session says; and on MySQL the session outlives
    // the transaction, on its pooled connection.
    let lifted = sqlx::raw_sql(AssertSqlSafe(unbound.to_owned()))
        .execute(&mut **tx)
        .await
        .map_err(store_error::<DB>);
    match (claimed, lifted) {
        (claimed, Ok(_)) => claimed,
        (Err(claim), Err(_)) => Err(claim),
        // As every error of a claim: nothing of it stays in the transaction.
        (Ok(TxClaim::Run(claim)), Err(error)) => {
            match abandon::<DB>(&mut **tx, claim.savepoint()).await {
                Ok(()) => Err(error),
                Err(undo) => Err(store_error::<DB>(format!("{error}; then {undo}"))),
            }
        }
        (Ok(TxClaim::Completed(_)), Err(error)) => Err(error),
    }
}

fn is_lock_timeout<DB: Backend>(store: &StoreError) -> bool {
    std::error::Error::source(store)
        .and_then(|source| source.downcast_ref::<sqlx::Error>())
        .is_some_and(DB::is_lock_timeout)
}

/// A savepoint name no other claim uses: handlers nested in one transaction must not share
/// one (MySQL replaces a savepoint of the same name instead of stacking it).
pub(crate) fn new_savepoint() -> String {
    format!("idem_{}", uuid::Uuid::new_v4().simple())
}

/// Runs `statement` (savepoint statements naming a savepoint from [`new_savepoint`], one or
/// more separated by `;`) on `connection` in one round trip, in the text protocol: not every
/// database prepares these.
async fn savepoint<DB>(
    connection: &mut DB::Connection,
    statement: String,
) -> Result<(), sqlx::Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    sqlx::raw_sql(AssertSqlSafe(statement))
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Sets the savepoint `name`.
pub(crate) async fn set_savepoint<DB>(
    connection: &mut DB::Connection,
    name: &str,
) -> Result<(), Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    savepoint::<DB>(connection, format!("SAVEPOINT {name}"))
        .await
        .map_err(store_error::<DB>)
}

/// Ends the savepoint `name`, keeping what was written since.
pub(crate) async fn release_savepoint<DB>(
    connection: &mut DB::Connection,
    name: &str,
) -> Result<(), Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    savepoint::<DB>(connection, format!("RELEASE SAVEPOINT {name}"))
        .await
        .map_err(store_error::<DB>)
}

/// Undoes what was written since the savepoint `name` and ends it. Its error says that the
/// transaction must be rolled back: it still holds what the savepoint should have undone, or
/// the database has already rolled it back.
pub(crate) async fn abandon<DB>(connection: &mut DB::Connection, name: &str) -> Result<(), Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    // Both statements in one round trip: the second runs only if the first succeeded.
    let undone = savepoint::<DB>(
        connection,
        format!("ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"),
    );
    undone.await.map_err(|error| {
        store_error::<DB>(format!(
            "could not roll back to the savepoint of the claim ({error}); the transaction may \
             hold the claim and the body's writes, or the database rolled it back already: \
             roll it back, do not commit it"
        ))
    })
}

/// `error`, after undoing what was written since the savepoint `name` (or the error of that
/// undo too, which says to roll the transaction back).
pub(crate) async fn undo<DB>(tx: &mut sqlx::Transaction<'_, DB>, name: &str, error: Error) -> Error
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    match abandon::<DB>(&mut **tx, name).await {
        Ok(()) => error,
        Err(undo) => store_error::<DB>(format!("{error}; then {undo}")),
    }
}

/// What a claim in a transaction tells its caller; anything but an acquired key undoes the
/// savepoint `name` first.
pub(crate) async fn settle_in<DB>(
    connection: &mut DB::Connection,
    key: &RecordKey,
    name: String,
    claim: Result<Option<Claim>, Error>,
) -> Result<TxClaim, Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let settled = match claim {
        Ok(Some(Claim::Acquired(lease))) => return Ok(TxClaim::Run(TxLease::new(lease, name))),
        Ok(Some(Claim::Completed(stored))) => Ok(TxClaim::Completed(stored)),
        Ok(Some(Claim::InProgress { retry_after })) => Err(Error::InProgress {
            scope: key.scope().to_owned(),
            key: key.key().to_owned(),
            retry_after,
        }),
        Ok(Some(Claim::Mismatch)) => Err(Error::FingerprintMismatch {
            scope: key.scope().to_owned(),
            key: key.key().to_owned(),
        }),
        Ok(None) => Err(store_error::<DB>(format!(
            "the record for {key} kept changing during {CLAIM_ATTEMPTS} claim attempts"
        ))),
        Err(error) => Err(error),
    };
    match (settled, abandon::<DB>(connection, &name).await) {
        (settled, Ok(())) => settled,
        // The transaction is lost (MySQL rolls it back on a deadlock): that is what the caller
        // must act on, whatever the claim said.
        (Err(claim), Err(undo)) => Err(store_error::<DB>(format!("{claim}; then {undo}"))),
        (Ok(_), Err(undo)) => Err(undo),
    }
}
