//! The layer and its settings, shared by both modes.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use tokio_util::task::TaskTracker;

use super::caller::{Caller, OneCaller};
use super::claim::ClaimMode;
use crate::{Error, Policy};

/// The default limit of a request body the layer reads: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// The default of [`IdempotencyLayer::retry_after`]: 1 second.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

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

/// The layer: wrap a route (or a router) in it. See the [module](super).
///
/// `M` is the mode: [`ClaimMode`] from [`new`](IdempotencyLayer::new), or
/// [`TxMode`](super::TxMode) from [`in_tx`](IdempotencyLayer::in_tx).
pub struct IdempotencyLayer<S, M = ClaimMode> {
    pub(crate) store: Arc<S>,
    pub(crate) settings: Settings,
    mode: PhantomData<fn() -> M>,
}

/// What the layer does with a request, whatever its mode.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) scope: Arc<str>,
    pub(crate) policy: Policy,
    pub(crate) required: bool,
    pub(crate) caller: Arc<dyn Caller>,
    pub(crate) max_body: usize,
    pub(crate) keep: Keep,
    pub(crate) retry_after: Duration,
    /// The claimed calls running on the runtime, for [`IdempotencyLayer::finished`].
    pub(crate) running: TaskTracker,
}

impl<S, M> Clone for IdempotencyLayer<S, M> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            settings: self.settings.clone(),
            mode: PhantomData,
        }
    }
}

impl<S, M> fmt::Debug for IdempotencyLayer<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.settings;
        f.debug_struct("IdempotencyLayer")
            .field("mode", &std::any::type_name::<M>())
            .field("scope", &settings.scope)
            .field("policy", &settings.policy)
            .field("required", &settings.required)
            .field("max_body", &settings.max_body)
            .field("retry_after", &settings.retry_after)
            .finish_non_exhaustive()
    }
}

impl<S> IdempotencyLayer<S, ClaimMode> {
    /// A `claim`-mode layer recording keys in `store` under `scope` (name the operation:
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
        Self::with_mode(store, scope)
    }
}

impl<S, M> IdempotencyLayer<S, M> {
    pub(crate) fn with_mode(store: Arc<S>, scope: &str) -> Result<Self, Error> {
        if scope.trim().is_empty() {
            return Err(Error::EmptyScope);
        }
        Ok(Self {
            store,
            settings: Settings {
                scope: scope.into(),
                policy: Policy::new(),
                required: true,
                caller: Arc::new(OneCaller),
                max_body: DEFAULT_MAX_BODY,
                keep: Arc::new(is_final),
                retry_after: DEFAULT_RETRY_AFTER,
                running: TaskTracker::new(),
            },
            mode: PhantomData,
        })
    }

    /// Who is calling (see [`Caller`]): keys are scoped by it.
    #[must_use]
    pub fn caller(mut self, caller: impl Caller) -> Self {
        self.settings.caller = Arc::new(caller);
        self
    }

    /// How long responses are kept (`ttl`), how long a running request holds its key
    /// (`lease`, with `heartbeat` for long handlers) and how long a copy of a running request
    /// waits for its response (`wait`; without it a copy gets `409` at once in `claim` mode,
    /// and after [`DEFAULT_TX_WAIT`](super::DEFAULT_TX_WAIT) on the record's row lock in `tx`
    /// mode).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// Whether a request without a key is refused with `400` (`true`, the default) or passed
    /// to the handler as it is.
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.settings.required = required;
        self
    }

    /// The largest request body read, in bytes; a larger one is refused with `413`.
    #[must_use]
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.settings.max_body = bytes;
        self
    }

    /// Which statuses are final: stored and replayed to retries. Any other response releases
    /// the key. Default: [`is_final`].
    #[must_use]
    pub fn keep(mut self, keep: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.settings.keep = Arc::new(keep);
        self
    }

    /// The longest `Retry-After` of a `409` for a request still in progress (default
    /// [`DEFAULT_RETRY_AFTER`], 1 s). The `409` says the time the first request's lease still
    /// runs, if that is shorter; a lease is sized for the slowest handler, so telling a
    /// client to wait it out would make it wait 30 s for a handler that answers in
    /// milliseconds.
    #[must_use]
    pub fn retry_after(mut self, longest: Duration) -> Self {
        self.settings.retry_after = longest;
        self
    }

    /// Waits until every request this layer (and its clones) claimed has finished and its
    /// response is recorded — including those whose client went away. Call it on shutdown,
    /// after the server stopped taking requests (`axum::serve(…).with_graceful_shutdown(…)`
    /// returned); requests claimed while it waits are waited for too.
    pub async fn finished(&self) {
        self.settings.running.close();
        self.settings.running.wait().await;
    }
}

impl<S, M, Inner> tower::Layer<Inner> for IdempotencyLayer<S, M> {
    type Service = Idempotency<S, Inner, M>;

    fn layer(&self, inner: Inner) -> Self::Service {
        Idempotency {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around a route.
pub struct Idempotency<S, Inner, M = ClaimMode> {
    pub(crate) layer: IdempotencyLayer<S, M>,
    pub(crate) inner: Inner,
}

impl<S, Inner: Clone, M> Clone for Idempotency<S, Inner, M> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S, Inner, M> fmt::Debug for Idempotency<S, Inner, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

/// How a mode runs a request: [`ClaimMode`] or [`TxMode`](super::TxMode). Sealed: the modes
/// are idem's.
pub trait Mode<S, Inner>: sealed::Sealed + Sized + 'static {
    /// Runs `request` through `inner` under `layer`.
    #[doc(hidden)]
    fn handle(
        layer: IdempotencyLayer<S, Self>,
        inner: Inner,
        request: Request,
    ) -> impl Future<Output = Response> + Send + 'static;
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

impl<S, Inner, M> tower::Service<Request> for Idempotency<S, Inner, M>
where
    Inner: tower::Service<Request, Response = Response, Error = Infallible> + Clone,
    M: Mode<S, Inner>,
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
        let handled = M::handle(self.layer.clone(), inner, request);
        Box::pin(async move { Ok(handled.await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
