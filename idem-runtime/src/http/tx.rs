//! The `tx` mode: the key is claimed, the handler writes and its response is stored in one
//! database transaction, committed together.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse as _, Response};
use sqlx::{Database, Transaction};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::Problem;
use super::layer::{IdempotencyLayer, Mode, Settings};
use super::problem_type::HANDLER_FAILED;
use super::request::{
    Prepared, call, handler_failed, not_processed, outcome_unknown, prepare, read_response, refused,
};
use super::stored::StoredResponse;
use crate::tx::{TxClaim, TxLease, TxStore};
use crate::{Error, Fingerprint, RecordKey};

/// How long, in `tx` mode, a copy of a request waits for the first one's commit (on the
/// record's row lock) before it answers `409`, when the [`Policy`](crate::Policy) sets no
/// `wait`: 1 second. A bound keeps a burst of retries of one slow request from holding a
/// database connection each.
pub const DEFAULT_TX_WAIT: Duration = Duration::from_secs(1);

/// The mode of [`IdempotencyLayer::in_tx`]: the key is claimed in a transaction the handler
/// is handed as [`Tx`], and its response is stored in that transaction when it returns; the
/// layer commits. The handler's writes, the record and the stored response are committed
/// together or not at all (see the [module](super)).
#[derive(Clone, Copy, Debug)]
pub enum TxMode {}

impl<S: TxStore> IdempotencyLayer<S, TxMode> {
    /// A `tx`-mode layer: like [`new`](IdempotencyLayer::new), but each request with a key
    /// runs in a transaction of `store`'s database, which the handler takes as [`Tx`]:
    ///
    /// 1. `BEGIN`, then the key is claimed in the transaction ([`TxStore::claim_in_within`]).
    ///    A completed key replays its stored response (the transaction is rolled back, nothing
    ///    runs). A copy of a request that is running waits on the record's row lock until
    ///    the first commits, then replays its response (or runs, if the first rolled back);
    ///    it waits at most the [`Policy`](crate::Policy)'s `wait` ([`DEFAULT_TX_WAIT`], 1 s,
    ///    without one) and then answers `409` (on SQLite, the pool's busy timeout, then `503`).
    /// 2. The handler runs and writes through its [`Tx`].
    /// 3. A final response (see [`keep`](IdempotencyLayer::keep)) is stored in the
    ///    transaction ([`TxStore::complete_in`]), which is then committed; any other response
    ///    rolls it back, with the handler's writes, and is returned as it is.
    ///
    /// A process killed, a connection cut or a panic anywhere before the commit rolls
    /// everything back: a retry runs the request once. A commit whose answer is lost gets
    /// `502` (outcome unknown): a retry at once replays the response if the commit landed and
    /// runs the request if it did not. Requests without a key (with
    /// [`required(false)`](IdempotencyLayer::required)) run in a transaction too, committed
    /// when the response is final.
    ///
    /// ```
    /// use axum::{Json, Router, routing::post};
    /// use idem_runtime::http::{IdempotencyLayer, Tx};
    /// use idem_runtime::sqlite::SqliteStore;
    /// use sqlx::Sqlite;
    ///
    /// async fn create_order(mut tx: Tx<Sqlite>, Json(amount): Json<i64>) -> Result<String, String> {
    ///     sqlx::query("INSERT INTO orders (amount) VALUES (?)")
    ///         .bind(amount)
    ///         .execute(&mut **tx)
    ///         .await
    ///         .map_err(|error| error.to_string())?;
    ///     Ok("created".to_owned())
    /// }
    ///
    /// # fn app(store: SqliteStore) -> Result<Router, idem_runtime::Error> {
    /// let layer = IdempotencyLayer::in_tx(store, "orders.create")?;
    /// Ok(Router::new().route("/orders", post(create_order).layer(layer)))
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::EmptyScope`] for an empty or blank scope.
    pub fn in_tx(store: S, scope: &str) -> Result<Self, Error> {
        Self::in_tx_shared(Arc::new(store), scope)
    }

    /// [`in_tx`](Self::in_tx) with a store shared with other layers or handlers.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyScope`] for an empty or blank scope.
    pub fn in_tx_shared(store: Arc<S>, scope: &str) -> Result<Self, Error> {
        Self::with_mode(store, scope)
    }
}

/// Where the request's transaction waits for the handler to take it, and where the handler's
/// [`Tx`] puts it back.
type Slot<DB> = Arc<Mutex<Option<Transaction<'static, DB>>>>;

/// The request extension that holds the [`Slot`].
struct TxSlot<DB: Database>(Slot<DB>);

impl<DB: Database> Clone for TxSlot<DB> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

fn lock<DB: Database>(
    slot: &Slot<DB>,
) -> std::sync::MutexGuard<'_, Option<Transaction<'static, DB>>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The request's transaction, for a handler behind [`IdempotencyLayer::in_tx`]: the key is
/// claimed in it, and the layer stores the handler's response in it and commits once the
/// handler returned. Write through it as through a `sqlx::Transaction` (`&mut **tx` is the
/// connection); do not keep it past the handler: the layer takes it back when it is dropped.
///
/// A statement that fails ends the transaction on PostgreSQL (every later statement is
/// refused): a handler that answers after a statement it expects to fail (a unique violation
/// it reports as `409`) runs that statement in a nested transaction (`tx.begin()`, a
/// savepoint). On MySQL, a statement that commits implicitly (DDL, `LOCK TABLES`) commits the
/// claim with it: keep such statements out of a `Tx`.
///
/// A handler on a route without the layer (or with a layer of another database) is refused
/// with `500` when it asks for one.
pub struct Tx<DB: Database> {
    tx: Option<Transaction<'static, DB>>,
    slot: Slot<DB>,
}

impl<DB: Database> fmt::Debug for Tx<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").field("database", &DB::NAME).finish()
    }
}

impl<DB: Database> Deref for Tx<DB> {
    type Target = Transaction<'static, DB>;

    fn deref(&self) -> &Self::Target {
        self.tx
            .as_ref()
            .expect("a Tx holds its transaction until it is dropped")
    }
}

impl<DB: Database> DerefMut for Tx<DB> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.tx
            .as_mut()
            .expect("a Tx holds its transaction until it is dropped")
    }
}

impl<DB: Database> Drop for Tx<DB> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            *lock(&self.slot) = Some(tx);
        }
    }
}

impl<DB: Database, State: Send + Sync> FromRequestParts<State> for Tx<DB> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &State) -> Result<Self, Problem> {
        let wiring = |why: &str| {
            tracing::error!("{why}");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Handler failed", why)
                .with_type(HANDLER_FAILED)
        };
        let Some(TxSlot(slot)) = parts.extensions.get::<TxSlot<DB>>().cloned() else {
            return Err(wiring(&format!(
                "the handler takes a Tx<{}>, but its route is not behind an IdempotencyLayer::in_tx of a {} store",
                DB::NAME,
                DB::NAME
            )));
        };
        let Some(tx) = lock(&slot).take() else {
            return Err(wiring("the handler takes the request's Tx twice"));
        };
        Ok(Self { tx: Some(tx), slot })
    }
}

impl super::layer::sealed::Sealed for TxMode {}

impl<S, Inner> Mode<S, Inner> for TxMode
where
    S: TxStore + 'static,
    Inner:
        tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    Inner::Future: Send,
{
    fn handle(
        layer: IdempotencyLayer<S, Self>,
        inner: Inner,
        request: Request,
    ) -> impl Future<Output = Response> + Send + 'static {
        handle(layer, inner, request)
    }
}

async fn handle<S, Inner>(
    layer: IdempotencyLayer<S, TxMode>,
    inner: Inner,
    request: Request,
) -> Response
where
    S: TxStore + 'static,
    Inner: tower::Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    Inner::Future: Send,
{
    let (keyed, request) = match prepare(&layer.settings, request).await {
        Prepared::Keyed {
            record,
            fingerprint,
            request,
        } => (Some((record, fingerprint)), request),
        Prepared::Unkeyed(request) => (None, request),
        Prepared::Refused(response) => return response,
    };
    // The transaction runs on the runtime: a client that disconnects does not cut it off
    // between the handler's writes and the commit (which would roll it back, harmlessly, but
    // for nothing).
    let running = layer.settings.running.clone();
    let span = match &keyed {
        Some((record, _)) => tracing::info_span!(
            "idempotent",
            scope = record.scope(),
            key = record.key(),
            mode = "tx",
            fence = Empty,
            outcome = Empty,
        ),
        None => tracing::Span::none(),
    };
    let run = async move {
        let response = in_tx(layer, inner, keyed, request).await;
        // Inside the span, which shows the outcome.
        tracing::debug!(status = response.status().as_u16(), "answered");
        response
    }
    .instrument(span);
    match running.spawn(run.in_current_span()).await {
        Ok(response) => response,
        Err(join) => handler_failed(
            &join,
            "the handler did not finish; its transaction was rolled back, so nothing of this request was committed: a retry with the same Idempotency-Key runs it once",
        ),
    }
}

/// The request in its transaction, from `BEGIN` to the commit.
async fn in_tx<S, Inner>(
    layer: IdempotencyLayer<S, TxMode>,
    mut inner: Inner,
    keyed: Option<(RecordKey, Fingerprint)>,
    mut request: Request,
) -> Response
where
    S: TxStore + 'static,
    Inner: tower::Service<Request, Response = Response, Error = Infallible> + Send,
    Inner::Future: Send,
{
    let settings = &layer.settings;
    let store = &*layer.store;
    let span = tracing::Span::current();
    let outcome = |outcome: &'static str| {
        span.record("outcome", outcome);
    };
    let mut tx = match store.begin().await {
        Ok(tx) => tx,
        Err(error) => {
            outcome("store_error");
            return refused(settings, &error);
        }
    };
    let claim = match &keyed {
        None => None,
        Some((record, fingerprint)) => {
            let wait = settings.policy.wait().unwrap_or(DEFAULT_TX_WAIT);
            let claimed = store
                .claim_in_within(
                    &mut tx,
                    record,
                    Some(fingerprint),
                    settings.policy.lease(),
                    wait,
                )
                .await;
            match claimed {
                Ok(TxClaim::Run(claim)) => {
                    span.record("fence", claim.lease().fence());
                    Some(claim)
                }
                Ok(TxClaim::Completed(stored)) => {
                    roll_back(tx).await;
                    return match crate::handler::decode::<StoredResponse>(record, &stored) {
                        Ok(stored) => {
                            outcome("replayed");
                            stored.into_response(true)
                        }
                        Err(error) => {
                            outcome("store_error");
                            refused(settings, &error)
                        }
                    };
                }
                Err(error) => {
                    outcome(crate::handler::outcome_of(&error));
                    return refused(settings, &error);
                }
            }
        }
    };

    let slot: Slot<S::Database> = Arc::new(Mutex::new(Some(tx)));
    request.extensions_mut().insert(TxSlot(slot.clone()));
    let response = call(&mut inner, request).await;
    let read = read_response(settings, response).await;
    let Some(mut tx) = lock(&slot).take() else {
        outcome("failed");
        return handler_failed(
            &"the handler kept its Tx past its return",
            "the handler kept the request's transaction after it returned, so nothing of this request was committed: a retry with the same Idempotency-Key runs it again",
        );
    };
    let stored = match read {
        Ok(Ok(stored)) => stored,
        Ok(Err(not_final)) => {
            outcome("failed");
            roll_back(tx).await;
            return not_final;
        }
        Err(error) => {
            outcome("failed");
            roll_back(tx).await;
            return handler_failed(
                &error,
                "the handler's response body could not be read; its transaction was rolled back, so nothing of this request was committed: a retry with the same Idempotency-Key runs it again",
            );
        }
    };
    if let (Some((record, _)), Some(claim)) = (&keyed, &claim)
        && let Err(error) = record_in(store, &mut tx, record, claim, &stored, settings).await
    {
        outcome(crate::handler::outcome_of(&error));
        roll_back(tx).await;
        return not_recorded(&error);
    }
    match tx.commit().await {
        Ok(()) => {
            outcome("executed");
            stored.into_response(false)
        }
        Err(error) => {
            outcome("outcome_unknown");
            outcome_unknown(
                &error,
                format!(
                    "the commit of the request's transaction failed ({error}): it may or may not have landed. A retry with the same Idempotency-Key, at once, replays this response if it landed and runs the request once if it did not"
                ),
                Duration::from_secs(1),
            )
        }
    }
}

/// The answer when the response could not be stored in the request's transaction, which was
/// then rolled back: what that means depends on why.
fn not_recorded(error: &Error) -> Response {
    let database_refused = match error {
        Error::Store(store) => std::error::Error::source(store)
            .and_then(|source| source.downcast_ref::<sqlx::Error>())
            .is_some_and(|source| matches!(source, sqlx::Error::Database(_))),
        _ => false,
    };
    match error {
        // The record is no longer this transaction's: the database ended the transaction
        // under the handler (MySQL rolls it back on a deadlock), and what the handler wrote
        // after that was committed statement by statement.
        Error::LeaseLost { .. } => outcome_unknown(
            error,
            "the request's transaction was ended by the database while the handler ran (a deadlock, say), so its response could not be stored; writes the handler made after that may have been committed on their own. A retry with the same Idempotency-Key runs the request again".to_owned(),
            Duration::from_secs(1),
        ),
        // The connection is fine, the transaction is not: a statement of the handler failed
        // (PostgreSQL then refuses every later statement of the transaction).
        _ if database_refused => handler_failed(
            error,
            "the request's transaction failed (a statement in it failed, which ends it on PostgreSQL), so nothing of this request was committed: a retry with the same Idempotency-Key runs it again. A handler that answers after a statement it expects to fail runs that statement in a nested transaction (`tx.begin()`, a savepoint)",
        ),
        _ => {
            tracing::warn!(%error, "the response could not be stored in the request's transaction: rolled back, 503");
            not_processed(format!(
                "the response could not be stored in the request's transaction ({error}), so the transaction was rolled back and nothing of this request was committed; retry with the same Idempotency-Key"
            ))
            .into_response()
        }
    }
}

/// Stores `stored` for `claim` in `tx`.
async fn record_in<S: TxStore>(
    store: &S,
    tx: &mut Transaction<'static, S::Database>,
    record: &RecordKey,
    claim: &TxLease,
    stored: &StoredResponse,
    settings: &Settings,
) -> Result<(), Error> {
    let bytes = serde_json::to_vec(stored).map_err(|source| Error::Encode {
        what: "response",
        source,
    })?;
    store
        .complete_in(tx, record, claim, &bytes, settings.policy.ttl())
        .await
}

/// Rolls `tx` back; a rollback that fails leaves it to the database, which rolls back a
/// transaction whose connection is gone.
async fn roll_back<DB: Database>(tx: Transaction<'static, DB>) {
    if let Err(error) = tx.rollback().await {
        tracing::debug!(%error, "rollback failed; the connection is closed, which rolls it back");
    }
}
