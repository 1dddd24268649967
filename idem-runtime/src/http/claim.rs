//! The `claim` mode: the handler runs under a claim in the store; its response is recorded
//! after it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::Request;
use axum::response::Response;
use tracing::Instrument as _;

use super::layer::{IdempotencyLayer, Mode};
use super::request::{
    Prepared, call, handler_failed, outcome_unknown, prepare, read_response, refused,
};
use super::stored::StoredResponse;
use crate::handler::outcome_of;
use crate::{Error, Fingerprint, RecordKey, Store};

/// The mode of [`IdempotencyLayer::new`]: the key is claimed in the store, the handler runs,
/// its response is recorded. Any store, any effect; a process that dies between the effect
/// and the record leaves the key in progress until its lease ends, and a retry after that
/// runs the handler again (see the [module](super)).
#[derive(Clone, Copy, Debug)]
pub enum ClaimMode {}

impl super::layer::sealed::Sealed for ClaimMode {}

impl<S, Inner> Mode<S, Inner> for ClaimMode
where
    S: Store + 'static,
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

/// Why a call through [`run`](crate::run) did not give a response to store.
enum Failure {
    /// idem's outcome: in progress, mismatch, store error, …
    Idem(Error),
    /// The handler's response is not final: returned as it is, the key released.
    NotKept(Response),
}

/// What the claimed call gives [`run`](crate::run) to record: the response, or a response
/// whose body could not be read. The latter has no stored form: serializing it fails, so
/// `run` keeps the claim, as for any result of a body that ran and cannot be recorded (the
/// handler's effect happened; releasing the key would let a retry repeat it at once).
enum Recorded {
    Response(StoredResponse),
    Unreadable(String),
}

impl serde::Serialize for Recorded {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Response(stored) => stored.serialize(serializer),
            Self::Unreadable(why) => Err(serde::ser::Error::custom(format!(
                "the response body could not be read: {why}"
            ))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Recorded {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        StoredResponse::deserialize(deserializer).map(Self::Response)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self::Idem(error)
    }
}

async fn handle<S, Inner>(
    layer: IdempotencyLayer<S, ClaimMode>,
    mut inner: Inner,
    request: Request,
) -> Response
where
    S: Store + 'static,
    Inner: tower::Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    Inner::Future: Send,
{
    let (record, fingerprint, request) = match prepare(&layer.settings, request).await {
        Prepared::Keyed {
            record,
            fingerprint,
            request,
        } => (record, fingerprint, request),
        Prepared::Unkeyed(request) => return call(&mut inner, request).await,
        Prepared::Refused(response) => return response,
    };
    // From the claim on, the call runs on the runtime: a client that disconnects (its request
    // future dropped) does not cut the handler off between its effect and the record.
    let running = layer.settings.running.clone();
    let claimed = claimed(layer, inner, record, fingerprint, request);
    match running.spawn(claimed.in_current_span()).await {
        Ok(response) => response,
        Err(join) => handler_failed(
            &join,
            "the handler did not finish; its key stays in progress until its lease ends, and a retry with the same Idempotency-Key after that runs the request again",
        ),
    }
}

async fn claimed<S, Inner>(
    layer: IdempotencyLayer<S, ClaimMode>,
    mut inner: Inner,
    record: RecordKey,
    fingerprint: Fingerprint,
    request: Request,
) -> Response
where
    S: Store + 'static,
    Inner: tower::Service<Request, Response = Response, Error = Infallible> + Send,
    Inner::Future: Send,
{
    let settings = &layer.settings;
    let started = OnceLock::<Instant>::new();
    let body = async {
        let _ = started.set(Instant::now());
        let response = call(&mut inner, request).await;
        match read_response(settings, response).await {
            Ok(Ok(stored)) => Ok::<Recorded, Failure>(Recorded::Response(stored)),
            Ok(Err(response)) => Err(Failure::NotKept(response)),
            Err(error) => Ok(Recorded::Unreadable(error.to_string())),
        }
    };
    let (scope, key) = (record.scope().to_owned(), record.key().to_owned());
    let outcome = crate::run(
        &*layer.store,
        record,
        Some(fingerprint),
        settings.policy,
        body,
    )
    .await;
    let (response, outcome) = match outcome {
        Ok(Recorded::Response(stored)) => match started.get() {
            None => (stored.into_response(true), "replayed"),
            Some(_) => (stored.into_response(false), "executed"),
        },
        // Never recorded (it does not serialize), so never returned by `run`.
        Ok(Recorded::Unreadable(why)) => (
            handler_failed(&why, "the handler's response body could not be read"),
            "failed",
        ),
        Err(Failure::NotKept(response)) => (response, "failed"),
        Err(Failure::Idem(error)) => match started.get() {
            Some(at) if !matches!(error, Error::LeaseLost { .. }) => {
                let left = settings.policy.lease().saturating_sub(at.elapsed());
                let response = outcome_unknown(
                    &error,
                    format!(
                        "the handler ran, but its response could not be recorded ({error}), so whether it took effect is not known here. The key stays in progress until its lease ends, in about {} s: a retry with the same Idempotency-Key gets 409 until then and runs the request again after that",
                        left.as_millis().div_ceil(1000)
                    ),
                    left,
                );
                (response, "outcome_unknown")
            }
            _ => (refused(settings, &error), outcome_of(&error)),
        },
    };
    // After the call's span closed: the outcome shows once.
    tracing::debug!(
        scope,
        key,
        outcome,
        status = response.status().as_u16(),
        "answered"
    );
    response
}
