//! `Idempotency-Key` for axum: a tower layer that runs a request once per key and replays its
//! response to retries (feature `axum`).
//!
//! HTTP clients retry: a timeout, a dropped connection or an impatient user sends the same
//! `POST` again. Following the IETF draft *The Idempotency-Key HTTP Header Field*, a client
//! marks a request with a unique key, and the server answers every retry of it with the first
//! answer:
//!
//! ```
//! use axum::{Router, routing::post};
//! use idem_runtime::MemoryStore;
//! use idem_runtime::http::{CallerHeader, IdempotencyLayer};
//!
//! async fn create_order() -> &'static str {
//!     "created"
//! }
//!
//! let layer = IdempotencyLayer::new(MemoryStore::new(), "orders.create")
//!     .expect("a scope")
//!     .caller(CallerHeader::new("x-api-key").expect("a header name"));
//! let app: Router = Router::new().route("/orders", post(create_order).layer(layer));
//! ```
//!
//! For each request the layer:
//!
//! | request | response |
//! |---|---|
//! | no `Idempotency-Key` (when [`required`](IdempotencyLayer::required), the default) | `400`, nothing runs |
//! | a key that is empty, not visible ASCII, longer than 255 bytes or sent twice | `400` |
//! | no caller identity (see [`Caller`]) | what the caller says (`401` for [`CallerHeader`]) |
//! | a body over [`max_body`](IdempotencyLayer::max_body) | `413` |
//! | a new key | the handler runs; its response is stored if its status is final (below) and returned |
//! | a key whose response is stored | the stored status, headers and body, with `Idempotent-Replayed: true`; the handler does not run |
//! | a key whose first request is still running | `409` with `Retry-After` (or, with a [`Policy`] `wait`, the first response once it is there) |
//! | a key used before with another method, path, content type or body | `422` |
//! | the store is unreachable | `503`, nothing runs (fail closed) |
//!
//! Errors are `application/problem+json` ([`Problem`]). Keys are scoped by the layer's scope and
//! by the caller's identity, so one caller can never receive another's stored response — use a
//! [`Caller`] that names the authenticated client (an API key, a tenant), not something a
//! client can choose freely. The fingerprint that tells a retry from a reused key covers the
//! method, the path and query, the `Content-Type` and the body.
//!
//! Which responses are final is set by [`keep`](IdempotencyLayer::keep): by default every
//! status below 500 except `401`, `403`, `408`, `409`, `425` and `429` — a deliberate answer
//! that a retry must get again. Any other response (a `5xx`, a rate limit) releases the key,
//! so a retry runs the handler again. A handler that panics, or a connection dropped while it
//! runs, leaves the key in progress until the [`Policy`] lease ends.
//!
//! The layer is [`run`](crate::run) around the inner service: every store works, the claim
//! strategy's guarantees hold, and each request is traced in an `idempotent` span.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, request};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Error, Fingerprint, Policy, RecordKey, Store};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// The default limit of a request body the layer reads: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// An error response in the `application/problem+json` format of RFC 9457.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(serialize_with = "status_code")]
    status: StatusCode,
    title: String,
    detail: String,
    #[serde(skip)]
    retry_after: Option<Duration>,
}

fn status_code<S: serde::Serializer>(
    status: &StatusCode,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u16(status.as_u16())
}

impl Problem {
    /// A problem with a status, a short title and a detail saying what to do.
    pub fn new(status: StatusCode, title: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            title: title.into(),
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header (whole seconds, rounded up).
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.title,
            self.detail
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        // A struct of strings and a number always serializes.
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let seconds = after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Who is calling: the identity that scopes keys, so that one caller never receives another's
/// stored response.
pub trait Caller: Send + Sync + 'static {
    /// The caller of `request`, or the problem that refuses it.
    ///
    /// # Errors
    ///
    /// The response to send instead of running the request, such as `401`.
    fn identify(&self, request: &request::Parts) -> Result<String, Problem>;
}

impl<F> Caller for F
where
    F: Fn(&request::Parts) -> Result<String, Problem> + Send + Sync + 'static,
{
    fn identify(&self, request: &request::Parts) -> Result<String, Problem> {
        self(request)
    }
}

/// The caller named by a request header, such as an API key or a tenant id set by an
/// authenticating proxy; a request without it is refused with `401`.
#[derive(Clone, Debug)]
pub struct CallerHeader {
    name: HeaderName,
}

impl CallerHeader {
    /// The caller is the value of the header `name` (any case).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] if `name` is not a header name.
    pub fn new(name: &str) -> Result<Self, Error> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| Error::InvalidName {
            what: "header name",
            name: name.to_owned(),
            reason: "it is not an HTTP header name",
        })?;
        Ok(Self { name })
    }
}

impl Caller for CallerHeader {
    fn identify(&self, request: &request::Parts) -> Result<String, Problem> {
        let missing = || {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "Caller unknown",
                format!("send the `{}` header that identifies you", self.name),
            )
        };
        let value = request.headers.get(&self.name).ok_or_else(missing)?;
        match value.to_str() {
            Ok(caller) if !caller.trim().is_empty() => Ok(caller.to_owned()),
            _ => Err(missing()),
        }
    }
}

/// Every request comes from one caller: for a service whose clients all share one key space
/// (an internal API behind a gateway that already separates tenants).
#[derive(Clone, Copy, Debug, Default)]
pub struct OneCaller;

impl Caller for OneCaller {
    fn identify(&self, _: &request::Parts) -> Result<String, Problem> {
        Ok("*".to_owned())
    }
}

/// Which responses are stored and replayed.
type Keep = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// The default of [`IdempotencyLayer::keep`]: below 500, except the statuses that ask for a
/// retry or depend on credentials.
pub fn is_final(status: StatusCode) -> bool {
    status.as_u16() < 500
        && !matches!(
            status,
            StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::CONFLICT
                | StatusCode::TOO_EARLY
                | StatusCode::TOO_MANY_REQUESTS
        )
}

/// The layer: wrap a route (or a router) in it. See the [module](self).
pub struct IdempotencyLayer<S> {
    store: Arc<S>,
    scope: Arc<str>,
    policy: Policy,
    required: bool,
    caller: Arc<dyn Caller>,
    max_body: usize,
    keep: Keep,
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            scope: self.scope.clone(),
            policy: self.policy,
            required: self.required,
            caller: self.caller.clone(),
            max_body: self.max_body,
            keep: self.keep.clone(),
        }
    }
}

impl<S> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("scope", &self.scope)
            .field("policy", &self.policy)
            .field("required", &self.required)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl<S: Store + 'static> IdempotencyLayer<S> {
    /// A layer recording keys in `store` under `scope` (name the operation:
    /// `"orders.create"`), with every request from [`OneCaller`] until
    /// [`caller`](Self::caller) says otherwise, the default [`Policy`], keys required.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyScope`] for an empty or blank scope.
    pub fn new(store: S, scope: &str) -> Result<Self, Error> {
        Self::shared(Arc::new(store), scope)
    }

    /// [`new`](Self::new) with a store shared with other layers or handlers.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyScope`] for an empty or blank scope.
    pub fn shared(store: Arc<S>, scope: &str) -> Result<Self, Error> {
        if scope.trim().is_empty() {
            return Err(Error::EmptyScope);
        }
        Ok(Self {
            store,
            scope: scope.into(),
            policy: Policy::new(),
            required: true,
            caller: Arc::new(OneCaller),
            max_body: DEFAULT_MAX_BODY,
            keep: Arc::new(is_final),
        })
    }

    /// Who is calling (see [`Caller`]): keys are scoped by it.
    #[must_use]
    pub fn caller(mut self, caller: impl Caller) -> Self {
        self.caller = Arc::new(caller);
        self
    }

    /// How long responses are kept (`ttl`), how long a running request holds its key
    /// (`lease`, with `heartbeat` for long handlers) and whether a retry waits for it (`wait`).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Whether a request without a key is refused with `400` (`true`, the default) or passed
    /// to the handler as it is.
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// The largest request body read, in bytes; a larger one is refused with `413`.
    #[must_use]
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Which statuses are final: stored and replayed to retries. Any other response releases
    /// the key. Default: [`is_final`].
    #[must_use]
    pub fn keep(mut self, keep: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.keep = Arc::new(keep);
        self
    }
}

impl<S, Inner> tower::Layer<Inner> for IdempotencyLayer<S> {
    type Service = Idempotency<S, Inner>;

    fn layer(&self, inner: Inner) -> Self::Service {
        Idempotency {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around a route.
pub struct Idempotency<S, Inner> {
    layer: IdempotencyLayer<S>,
    inner: Inner,
}

impl<S, Inner: Clone> Clone for Idempotency<S, Inner> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S, Inner> fmt::Debug for Idempotency<S, Inner> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl<S, Inner> tower::Service<Request> for Idempotency<S, Inner>
where
    S: Store + 'static,
    Inner:
        tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    Inner::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The ready service goes into the call; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move { Ok(handle(layer, inner, request).await) })
    }
}

/// Why a call through [`run`](crate::run) did not give a response to store.
enum Failure {
    /// idem's outcome: in progress, mismatch, store error, …
    Idem(Error),
    /// The handler's response is not final: returned as it is, the key released.
    NotKept(Response),
    /// The handler's response body could not be read.
    Body(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self::Idem(error)
    }
}

async fn handle<S, Inner>(
    layer: IdempotencyLayer<S>,
    mut inner: Inner,
    request: Request,
) -> Response
where
    S: Store + 'static,
    Inner: tower::Service<Request, Response = Response, Error = Infallible> + Send,
    Inner::Future: Send,
{
    let (parts, body) = request.into_parts();
    let key = match idempotency_key(&parts.headers) {
        Ok(Some(key)) => key,
        Ok(None) if !layer.required => {
            return call(&mut inner, Request::from_parts(parts, body)).await;
        }
        Ok(None) => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key missing",
                "this endpoint needs an `Idempotency-Key` header: send a unique key (a UUID) and the same key on every retry of this request",
            )
            .into_response();
        }
        Err(problem) => return problem.into_response(),
    };
    let caller = match layer.caller.identify(&parts) {
        Ok(caller) => caller,
        Err(problem) => return problem.into_response(),
    };
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body too large",
            format!("the body must not exceed {} bytes", layer.max_body),
        )
        .into_response()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > layer.max_body) {
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(body, layer.max_body).await else {
        // Over the limit without a length, or the body could not be read.
        return too_large();
    };
    let record = match RecordKey::from_value(&layer.scope, &(caller.as_str(), key.as_str())) {
        Ok(record) => record,
        Err(error) => return problem_for(&error).into_response(),
    };
    let fingerprint = fingerprint(&parts, &bytes);
    let request = Request::from_parts(parts, Body::from(bytes));

    let executed = AtomicBool::new(false);
    let keep = layer.keep.clone();
    let body = async {
        executed.store(true, Ordering::Relaxed);
        let response = call(&mut inner, request).await;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|error| Failure::Body(error.to_string()))?;
        if keep(parts.status) {
            Ok(StoredResponse::new(parts.status, &parts.headers, &bytes))
        } else {
            Err(Failure::NotKept(Response::from_parts(
                parts,
                Body::from(bytes),
            )))
        }
    };
    match crate::run(&*layer.store, record, Some(fingerprint), layer.policy, body).await {
        Ok(stored) => {
            let replayed = !executed.load(Ordering::Relaxed);
            stored.into_response(replayed)
        }
        Err(Failure::NotKept(response)) => response,
        Err(Failure::Idem(error)) => problem_for(&error).into_response(),
        Err(Failure::Body(error)) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Response not recorded",
            format!("the handler's response body could not be read: {error}"),
        )
        .into_response(),
    }
}

async fn call<Inner>(inner: &mut Inner, request: Request) -> Response
where
    Inner: tower::Service<Request, Response = Response, Error = Infallible>,
{
    match inner.call(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    }
}

/// The request's key: `None` without the header, a problem for a malformed one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let malformed = |why: &str| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key malformed",
            format!(
                "the `Idempotency-Key` header {why}; send one key of 1 to {MAX_KEY_LEN} visible ASCII characters, e.g. a UUID"
            ),
        )
    };
    if values.next().is_some() {
        return Err(malformed("is sent more than once"));
    }
    let text = value
        .to_str()
        .map_err(|_| malformed("is not visible ASCII"))?;
    // The draft writes the key as a structured-field string: `"8e03978e-…"`. Bare tokens are
    // accepted too.
    let key = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or(text)
        .trim();
    if key.is_empty() {
        return Err(malformed("is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(malformed("is too long"));
    }
    if key.chars().any(|c| !c.is_ascii_graphic() && c != ' ') {
        return Err(malformed("holds characters other than visible ASCII"));
    }
    Ok(Some(key.to_owned()))
}

/// What tells a retry from a reused key: method, path and query, content type and body, each
/// length-prefixed so that no two requests run together into one input.
fn fingerprint(parts: &request::Parts, body: &[u8]) -> Fingerprint {
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

/// The response to an outcome of idem.
fn problem_for(error: &Error) -> Problem {
    match error {
        Error::InProgress { retry_after, .. } => Problem::new(
            StatusCode::CONFLICT,
            "Request in progress",
            "a request with this Idempotency-Key is still being processed; retry later to get its response",
        )
        .retry_after(*retry_after),
        Error::FingerprintMismatch { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key reused",
            "this Idempotency-Key was used for another request (another method, path or body); use a new key for a new request",
        ),
        Error::EmptyKey { .. } => Problem::new(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key malformed",
            "the Idempotency-Key or the caller identity is empty",
        ),
        Error::LeaseLost { .. } => Problem::new(
            StatusCode::CONFLICT,
            "Request taken over",
            "this request outlived its lease and a retry took the key over; retry to get that retry's response",
        )
        .retry_after(Duration::from_secs(1)),
        Error::Store(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Idempotency store unavailable",
            "the request was not processed; retry with the same Idempotency-Key",
        )
        .retry_after(Duration::from_secs(1)),
        other => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Idempotency record unusable",
            other.to_string(),
        ),
    }
}

/// A response as it is stored: its status, its end-to-end headers and its body.
#[derive(Serialize, Deserialize)]
struct StoredResponse {
    status: u16,
    /// Names and base64 values: a value need not be text.
    headers: Vec<(String, String)>,
    /// Base64.
    body: String,
}

/// Headers that describe one connection or one message, not the response: not stored.
const UNSTORED: &[HeaderName] = &[
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::DATE,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl StoredResponse {
    fn new(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Self {
        Self {
            status: status.as_u16(),
            headers: headers
                .iter()
                .filter(|(name, _)| !UNSTORED.contains(name) && name.as_str() != "keep-alive")
                .map(|(name, value)| (name.as_str().to_owned(), BASE64.encode(value.as_bytes())))
                .collect(),
            body: BASE64.encode(body),
        }
    }

    fn into_response(self, replayed: bool) -> Response {
        let unusable = |what: &str| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Idempotency record unusable",
                format!("the stored response's {what} does not decode"),
            )
            .into_response()
        };
        let Ok(status) = StatusCode::from_u16(self.status) else {
            return unusable("status");
        };
        let Ok(body) = BASE64.decode(self.body) else {
            return unusable("body");
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        for (name, value) in self.headers {
            let name = HeaderName::from_bytes(name.as_bytes());
            let value = BASE64
                .decode(value)
                .ok()
                .and_then(|value| HeaderValue::from_bytes(&value).ok());
            match (name, value) {
                (Ok(name), Some(value)) => {
                    response.headers_mut().append(name, value);
                }
                _ => return unusable("headers"),
            }
        }
        if replayed {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(
                IDEMPOTENCY_KEY,
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        map
    }

    #[test]
    fn keys_are_read_bare_or_quoted_and_checked() {
        assert_eq!(idempotency_key(&HeaderMap::new()), Ok(None));
        assert_eq!(
            idempotency_key(&headers(&["abc-1"])),
            Ok(Some("abc-1".to_owned()))
        );
        assert_eq!(
            idempotency_key(&headers(&["\"abc-1\""])),
            Ok(Some("abc-1".to_owned()))
        );
        for bad in [&[""][..], &["\"\""], &["  "], &["a", "b"]] {
            let refused = idempotency_key(&headers(bad)).expect_err("malformed");
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(idempotency_key(&headers(&[&long])).is_err());
        let mut map = HeaderMap::new();
        map.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"),
        );
        assert!(idempotency_key(&map).is_err());
    }

    #[test]
    fn default_final_statuses() {
        for kept in [200, 201, 204, 301, 400, 404, 410, 422] {
            assert!(
                is_final(StatusCode::from_u16(kept).expect("status")),
                "{kept}"
            );
        }
        for released in [401, 403, 408, 409, 425, 429, 500, 502, 503] {
            assert!(
                !is_final(StatusCode::from_u16(released).expect("status")),
                "{released}"
            );
        }
    }

    #[test]
    fn stored_responses_round_trip_without_connection_headers() {
        let mut map = HeaderMap::new();
        map.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        map.insert(header::LOCATION, HeaderValue::from_static("/orders/A-1"));
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        map.insert(header::CONNECTION, HeaderValue::from_static("close"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        let stored = StoredResponse::new(
            StatusCode::CREATED,
            &map,
            &Bytes::from_static(b"{\"ok\":1}\n"),
        );
        let json = serde_json::to_string(&stored).expect("serializes");
        let back: StoredResponse = serde_json::from_str(&json).expect("deserializes");
        let response = back.into_response(true);
        assert_eq!(response.status(), StatusCode::CREATED);
        let headers = response.headers();
        assert_eq!(headers[header::LOCATION], "/orders/A-1");
        assert_eq!(headers.get_all(header::SET_COOKIE).iter().count(), 2);
        assert!(headers.get(header::CONNECTION).is_none());
        assert_eq!(headers[IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn garbage_in_a_stored_response_is_a_500_not_a_panic() {
        let stored = StoredResponse {
            status: 99,
            headers: vec![],
            body: String::new(),
        };
        assert_eq!(
            stored.into_response(false).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let stored = StoredResponse {
            status: 200,
            headers: vec![("bad name".to_owned(), String::new())],
            body: String::new(),
        };
        assert_eq!(
            stored.into_response(false).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let stored = StoredResponse {
            status: 200,
            headers: vec![],
            body: "***".to_owned(),
        };
        assert_eq!(
            stored.into_response(false).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

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
