//! The problem types of the layers' error responses ([`Problem`](super::Problem), RFC 9457):
//! what happened, and what a retry with the same key will do.
//!
//! The type of each problem is the address of its heading below (the constants of this
//! module). Where the IETF draft *The
//! Idempotency-Key HTTP Header Field* names a status (`400` for a missing key, `422` for a key
//! reused with another request, `409` for a request still in progress), the layers answer with
//! it; the other statuses are idem's choice, said here.
//!
//! # key-missing
//!
//! `400`: the route needs an `Idempotency-Key` and the request has none. Nothing ran.
//!
//! # key-malformed
//!
//! `400`: the `Idempotency-Key` is not a key idem accepts (see
//! [`IdempotencyLayer`](super::IdempotencyLayer)'s key syntax), or it is sent twice. Nothing
//! ran.
//!
//! # caller-unknown
//!
//! `401` from [`CallerHeader`](super::CallerHeader): the request does not say who is calling.
//! Nothing ran.
//!
//! # body-too-large
//!
//! `413`: the request body is larger than the layer reads. Nothing ran.
//!
//! # body-invalid
//!
//! `400`, `415` or `422` from the handler: the request body is not what the route takes (not
//! JSON, the wrong content type, a missing field). Offered to handlers through
//! [`Problem::body_invalid`](super::Problem::body_invalid); a deliberate answer, so it is stored and replayed like a
//! success.
//!
//! # key-reused
//!
//! `422`: the key was used before with another request (another method, path, content type or
//! body). Use a new key for a new request. Nothing ran.
//!
//! # in-progress
//!
//! `409` with `Retry-After`: a request with this key is still being processed. Retry after the
//! given seconds to get its response. Nothing ran for this copy.
//!
//! # taken-over
//!
//! `409` with `Retry-After`: this request outlived its lease and a retry took the key over; the
//! retry's response is the one that stands.
//!
//! # not-processed
//!
//! `503` with `Retry-After`: the idempotency store could not be reached before the handler ran.
//! The request was not processed; retry it with the same key.
//!
//! # outcome-unknown
//!
//! `502` with `Retry-After`: the handler ran (or may have run), but its response could not be
//! recorded, so whether its effect stands is not known to this server. The detail says what a
//! retry with the same key does and when: with the `claim` layer the key stays in progress
//! until its lease ends (`409` until then), and a retry after that runs the handler again; with
//! the `tx` layer the effect and the record are committed together or not at all, so a retry
//! at once replays the response if the commit landed and runs the request once if it did not.
//! `502` rather than `500` or `503`: the failure is the store's (an upstream of this server),
//! and `503` would say "not processed", which is not known.
//!
//! # record-unusable
//!
//! `500`: the stored response of this key does not decode (the record was edited or is
//! corrupt). A retry gets the same answer; purge the key.
//!
//! # handler-failed
//!
//! `500`: the handler did not give a response that can be recorded — it panicked, its response
//! body could not be read, its transaction failed (a statement in it failed, `tx` layer), it
//! kept its [`Tx`](super::Tx) past its return, or it asks for a `Tx` on a route without the
//! `tx` layer. The detail says what a retry does: with the `claim` layer a key whose handler
//! ran stays in progress until its lease ends; with the `tx` layer its writes were rolled back
//! and a retry runs it again.

/// Where the problem types are described: this module's documentation.
macro_rules! base {
    () => {
        "https://docs.rs/idem-runtime/latest/idem_runtime/http/problem_type/index.html#"
    };
}

#[cfg(test)]
pub(crate) const BASE: &str = base!();

macro_rules! problem_types {
    ($($name:ident = $anchor:literal: $doc:literal,)*) => {$(
        #[doc = $doc]
        pub const $name: &str = concat!(base!(), $anchor);
    )*};
}

problem_types! {
    KEY_MISSING = "key-missing": "The type of a request without the `Idempotency-Key` it needs.",
    KEY_MALFORMED = "key-malformed": "The type of a request whose `Idempotency-Key` is malformed.",
    CALLER_UNKNOWN = "caller-unknown": "The type of a request that does not say who calls.",
    BODY_TOO_LARGE = "body-too-large": "The type of a request whose body is too large to read.",
    BODY_INVALID = "body-invalid": "The type of a request whose body the handler cannot take.",
    KEY_REUSED = "key-reused": "The type of a key used before with another request.",
    IN_PROGRESS = "in-progress": "The type of a copy of a request that is still running.",
    TAKEN_OVER = "taken-over": "The type of a request whose key a retry took over.",
    NOT_PROCESSED = "not-processed": "The type of a request not processed: the store was unreachable.",
    OUTCOME_UNKNOWN = "outcome-unknown": "The type of a request that ran but whose response was not recorded.",
    RECORD_UNUSABLE = "record-unusable": "The type of a key whose stored response does not decode.",
    HANDLER_FAILED = "handler-failed": "The type of a request whose handler failed to give a response that can be recorded.",
}
