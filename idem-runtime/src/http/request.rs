//! What both modes do around the handler: read the request's key, caller and body; call the
//! handler and read its response; turn idem's outcomes into problems.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{self, HeaderValue};
use axum::http::{StatusCode, request};
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};

use super::Problem;
use super::key::idempotency_key;
use super::layer::Settings;
use super::problem_type::{
    BODY_TOO_LARGE, HANDLER_FAILED, IN_PROGRESS, KEY_MALFORMED, KEY_MISSING, KEY_REUSED,
    NOT_PROCESSED, OUTCOME_UNKNOWN, RECORD_UNUSABLE, TAKEN_OVER,
};
use super::stored::StoredResponse;
use crate::{Error, Fingerprint, RecordKey};

/// A request read by the layer.
pub(crate) enum Prepared {
    /// It has a key: run it once per key.
    Keyed {
        record: RecordKey,
        fingerprint: Fingerprint,
        request: Request,
    },
    /// It has no key and the route does not require one: pass it through.
    Unkeyed(Request),
    /// Refused before anything ran.
    Refused(Response),
}

/// Reads the key, the caller and the body of `request`.
pub(crate) async fn prepare(settings: &Settings, request: Request) -> Prepared {
    let (parts, body) = request.into_parts();
    let key = match idempotency_key(&parts.headers) {
        Ok(Some(key)) => key,
        Ok(None) if !settings.required => {
            return Prepared::Unkeyed(Request::from_parts(parts, body));
        }
        Ok(None) => {
            return Prepared::Refused(
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key missing",
                    "this endpoint needs an `Idempotency-Key` header: send a unique key (a UUID) and the same key on every retry of this request",
                )
                .with_type(KEY_MISSING)
                .into_response(),
            );
        }
        Err(problem) => return Prepared::Refused(problem.into_response()),
    };
    let caller = match settings.caller.identify(&parts) {
        Ok(caller) => caller,
        Err(problem) => return Prepared::Refused(problem.into_response()),
    };
    let too_large = || {
        Prepared::Refused(
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                format!("the body must not exceed {} bytes", settings.max_body),
            )
            .with_type(BODY_TOO_LARGE)
            .into_response(),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > settings.max_body) {
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(body, settings.max_body).await else {
        // Over the limit without a length, or the body could not be read.
        return too_large();
    };
    let record = match record_key(&settings.scope, &caller, &key) {
        Ok(record) => record,
        Err(error) => {
            return Prepared::Refused(
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key malformed",
                    error.to_string(),
                )
                .with_type(KEY_MALFORMED)
                .into_response(),
            );
        }
    };
    let fingerprint = fingerprint(&parts, &bytes);
    Prepared::Keyed {
        record,
        fingerprint,
        request: Request::from_parts(parts, Body::from(bytes)),
    }
}

/// The record under which the layer keeps the requests of `caller` with the `Idempotency-Key`
/// `key` on a layer of `scope` — to look one up or purge it. The caller is in it as the hex
/// SHA-256 of its identity, so that an identity that is a secret (an API key) is neither
/// stored nor traced.
///
/// ```
/// let record = idem_runtime::http::record_key("orders.create", "sk_live_123", "8e03978e")?;
/// assert!(!record.key().contains("sk_live_123"));
/// # Ok::<(), idem_runtime::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::EmptyScope`] or [`Error::EmptyKey`] for an empty scope, caller or key.
pub fn record_key(scope: &str, caller: &str, key: &str) -> Result<RecordKey, Error> {
    if caller.trim().is_empty() {
        return Err(Error::EmptyKey {
            scope: scope.to_owned(),
        });
    }
    let digest = Sha256::digest(caller.as_bytes());
    let caller: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    RecordKey::from_value(scope, &(caller.as_str(), key))
}

/// Calls the handler.
pub(crate) async fn call<Inner>(inner: &mut Inner, request: Request) -> Response
where
    Inner: tower::Service<Request, Response = Response, Error = Infallible>,
{
    match inner.call(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    }
}

/// The handler's response, read whole: to store (its status is final), or to return as it is
/// (`Err`: not final).
pub(crate) async fn read_response(
    settings: &Settings,
    response: Response,
) -> Result<Result<StoredResponse, Response>, axum::Error> {
    let (parts, body) = response.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, usize::MAX).await?;
    if (settings.keep)(parts.status) {
        Ok(Ok(StoredResponse::new(
            parts.status,
            &parts.headers,
            &bytes,
        )))
    } else {
        Ok(Err(Response::from_parts(parts, Body::from(bytes))))
    }
}

/// What tells a retry from a reused key: method, path and query, content type and body, each
/// length-prefixed so that no two requests run together into one input.
pub(crate) fn fingerprint(parts: &request::Parts, body: &[u8]) -> Fingerprint {
    let mut hasher = Sha256::new();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map_or(&[][..], HeaderValue::as_bytes);
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |target| target.as_str());
    for field in [
        parts.method.as_str().as_bytes(),
        target.as_bytes(),
        content_type,
        body,
    ] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field);
    }
    Fingerprint::from_bytes(hasher.finalize().into())
}

/// The response to an outcome of idem before the handler ran (or for a copy that did not run
/// it).
pub(crate) fn refused(settings: &Settings, error: &Error) -> Response {
    let problem = match error {
        Error::InProgress { retry_after, .. } => Problem::new(
            StatusCode::CONFLICT,
            "Request in progress",
            "a request with this Idempotency-Key is still being processed; retry later to get its response",
        )
        .with_type(IN_PROGRESS)
        .retry_after((*retry_after).min(settings.retry_after)),
        Error::FingerprintMismatch { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key reused",
            "this Idempotency-Key was used for another request (another method, path or body); use a new key for a new request",
        )
        .with_type(KEY_REUSED),
        Error::EmptyKey { .. } => Problem::new(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key malformed",
            "the Idempotency-Key or the caller identity is empty",
        )
        .with_type(KEY_MALFORMED),
        Error::LeaseLost { .. } => Problem::new(
            StatusCode::CONFLICT,
            "Request taken over",
            "this request outlived its lease and a retry took the key over; retry to get that retry's response",
        )
        .with_type(TAKEN_OVER)
        .retry_after(settings.retry_after),
        Error::Store(_) => {
            tracing::warn!(%error, "the idempotency store failed before the handler ran: 503, not processed");
            not_processed("the request was not processed; retry with the same Idempotency-Key")
        }
        other => {
            tracing::error!(error = %other, "the key's record is unusable");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Idempotency record unusable",
                other.to_string(),
            )
            .with_type(RECORD_UNUSABLE)
        }
    };
    problem.into_response()
}

/// `503`: the request was not processed.
pub(crate) fn not_processed(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Not processed: idempotency store unavailable",
        detail,
    )
    .with_type(NOT_PROCESSED)
    .retry_after(Duration::from_secs(1))
}

/// `502`: the handler ran, its response was not recorded; `detail` says what a retry does.
pub(crate) fn outcome_unknown(
    why: &dyn std::fmt::Display,
    detail: String,
    retry_after: Duration,
) -> Response {
    tracing::warn!(error = %why, "the handler ran but its response was not recorded: 502, outcome unknown");
    Problem::new(StatusCode::BAD_GATEWAY, "Outcome unknown", detail)
        .with_type(OUTCOME_UNKNOWN)
        .retry_after(retry_after)
        .into_response()
}

/// `500`: the handler panicked (or its task was cancelled); `detail` says what a retry does.
pub(crate) fn handler_failed(why: &dyn std::fmt::Display, detail: &str) -> Response {
    tracing::error!(error = %why, "the handler did not finish");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Handler failed", detail)
        .with_type(HANDLER_FAILED)
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_covers_method_target_type_and_body() {
        let parts = |method: &str, uri: &str, content_type: &str| {
            let (parts, ()) = Request::builder()
                .method(method)
                .uri(uri)
                .header(header::CONTENT_TYPE, content_type)
                .body(())
                .expect("a request")
                .into_parts();
            parts
        };
        let base = fingerprint(&parts("POST", "/orders", "application/json"), b"{}");
        assert_eq!(
            base,
            fingerprint(&parts("POST", "/orders", "application/json"), b"{}")
        );
        for other in [
            fingerprint(&parts("PUT", "/orders", "application/json"), b"{}"),
            fingerprint(&parts("POST", "/orders?x=1", "application/json"), b"{}"),
            fingerprint(&parts("POST", "/orders", "text/plain"), b"{}"),
            fingerprint(&parts("POST", "/orders", "application/json"), b"{ }"),
        ] {
            assert_ne!(base, other);
        }
    }
}
