//! `Idempotency-Key` for axum: tower layers that run a request once per key and replay its
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
//! # Two modes: `claim` and `tx`
//!
//! | | [`IdempotencyLayer::new`] (`claim`) | [`IdempotencyLayer::in_tx`] (`tx`) |
//! |---|---|---|
//! | stores | every store | the SQL stores |
//! | the handler's effects | anything: other services, files, the database | writes to the store's database, through the [`Tx`] it is handed |
//! | the record | claimed, then completed with the response, in the store | claimed and completed in the handler's own transaction, committed with its writes |
//! | the process dies, or the store's connection is cut, after the effect and before the record | the key stays in progress until its lease ends; a retry after that **runs the handler again** | the transaction is rolled back with the effect; a retry runs the handler once |
//! | a copy while the first runs | `409` (or waits, with a [`Policy`] `wait`) | waits for the first's commit on the record's row lock, then replays; `409` after the [`Policy`] `wait` ([`DEFAULT_TX_WAIT`], 1 s) |
//!
//! Use `tx` for handlers whose effects are database writes (creating an order, moving money
//! between rows): a crash anywhere leaves either the effect and its stored response, or
//! neither. Use `claim` when the handler calls out to something else; size its lease above
//! the slowest handler.
//!
//! In both modes a request whose key is claimed runs to completion on the runtime even if the
//! client disconnects or the request's future is dropped (a client timeout, a proxy that gives
//! up): its response is recorded and a retry replays it. On shutdown, await
//! [`IdempotencyLayer::finished`] after the server has stopped accepting requests, so that
//! handlers whose clients went away finish too; a process that exits without it (or is
//! killed) leaves a `claim`-mode key in progress until its lease ends, and rolls a `tx`-mode
//! transaction back.
//!
//! # What each request gets
//!
//! | request | response |
//! |---|---|
//! | no `Idempotency-Key` (when [`required`](IdempotencyLayer::required), the default) | `400`, nothing runs |
//! | a malformed key (see [the key](#the-key)), or a key sent twice | `400` |
//! | no caller identity (see [`Caller`]) | what the caller says (`401` for [`CallerHeader`]) |
//! | a body over [`max_body`](IdempotencyLayer::max_body) | `413` |
//! | a new key | the handler runs; its response is stored if its status is final (below) and returned |
//! | a key whose response is stored | the stored status, headers and body, with `Idempotent-Replayed: true`; the handler does not run |
//! | a key whose first request is still running | `409` with a short `Retry-After` ([`retry_after`](IdempotencyLayer::retry_after)) |
//! | a key used before with another method, path, content type or body | `422` |
//! | the store is unreachable before the handler ran | `503` + `Retry-After`: not processed |
//! | the handler ran but its response could not be recorded | `502` + `Retry-After`: outcome unknown |
//!
//! Errors are `application/problem+json` ([`Problem`]), each with a [problem type](problem_type)
//! that says what happened and what a retry does. Keys are scoped by the layer's scope and by
//! the caller's identity, so one caller can never receive another's stored response — use a
//! [`Caller`] that names the authenticated client (an API key, a tenant), not something a
//! client can choose freely; it is kept and traced only as its SHA-256 ([`record_key`]). The fingerprint that tells a retry from a reused key covers the
//! method, the path and query, the `Content-Type` and the body.
//!
//! Which responses are final is set by [`keep`](IdempotencyLayer::keep): by default every
//! status below 500 except `401`, `403`, `408`, `409`, `425` and `429` — a deliberate answer
//! that a retry must get again. Any other response (a `5xx`, a rate limit) releases the key
//! (in `tx` mode: rolls the transaction back), so a retry runs the handler again.
//!
//! # The key
//!
//! The draft defines the field as an RFC 8941 structured-field string:
//! `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`. idem accepts a subset of those
//! strings — no escapes, no spaces, no parameters — and also a bare key without the quotes, since many clients send a UUID as it is; `"abc"` and `abc` are the
//! same key. Either way the key is 1 to [`MAX_KEY_LEN`] visible ASCII characters other than
//! `"` and `\` (so no escapes are ever needed), and a bare key holds no `,` or `;` either
//! (they would make the field a list or give it parameters). Spaces or tabs around the value
//! are ignored, as HTTP does. Anything else is refused with `400`: a key sent twice, a space
//! inside, a control character or a byte beyond ASCII, an inner or unbalanced quote, a
//! backslash, text after the closing quote.
//!
//! Each request with a key is traced in an `idempotent` span (see [`run`](crate::run)).

mod caller;
mod claim;
mod key;
mod layer;
mod problem;
pub mod problem_type;
mod request;
mod stored;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod tx;

pub use caller::{Caller, CallerHeader, OneCaller};
pub use claim::ClaimMode;
pub use key::{IDEMPOTENCY_KEY, MAX_KEY_LEN};
pub use layer::{
    DEFAULT_MAX_BODY, DEFAULT_RETRY_AFTER, Idempotency, IdempotencyLayer, Mode, is_final,
};
pub use problem::Problem;
pub use request::record_key;
pub use stored::IDEMPOTENT_REPLAYED;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use tx::{DEFAULT_TX_WAIT, Tx, TxMode};

#[cfg(doc)]
use crate::Policy;
