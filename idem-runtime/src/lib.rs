//! Idempotent message and HTTP handlers with one attribute.
//!
//! Queues and HTTP clients deliver *at least once*. Put `#[idempotent]` on an `async fn`
//! handler and its effect happens once per business key, whatever arrives twice,
//! concurrently, or after a crash:
//!
//! ```
//! use idem_runtime::{idempotent, MemoryStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize)]
//! struct OrderPaid { order_no: String, amount: u64 }
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Receipt { points: u64 }
//!
//! #[derive(Debug)]
//! enum AppError { Idem(idem_runtime::Error) }
//! impl From<idem_runtime::Error> for AppError {
//!     fn from(e: idem_runtime::Error) -> Self { AppError::Idem(e) }
//! }
//!
//! #[idempotent(key = "order_no", store = store)]
//! async fn on_order_paid(store: &MemoryStore, msg: OrderPaid) -> Result<Receipt, AppError> {
//!     // Credit the points: runs once per order_no.
//!     Ok(Receipt { points: msg.amount / 10 })
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let paid = || OrderPaid { order_no: "A-1001".into(), amount: 250 };
//! let first = on_order_paid(&store, paid()).await.unwrap();
//! let again = on_order_paid(&store, paid()).await.unwrap(); // replayed, body not run
//! assert_eq!(first, again);
//! # }
//! ```
//!
//! # What `#[idempotent]` expands to
//!
//! The function keeps its signature; its body becomes the `body` future of [`run`]:
//!
//! ```text
//! async fn on_order_paid(store: &MemoryStore, msg: OrderPaid) -> Result<Receipt, AppError> {
//!     let store = &(store);                                     // `store = …`
//!     let key = record_key("my_crate::on_order_paid", &(msg.order_no)); // `scope`, `key = …`
//!     let fingerprint = fingerprint(&(msg));                    // `fingerprint = …`
//!     let body = async { /* the original body */ };
//!     run(store, key, fingerprint, Policy::new() /* ttl, lease, wait, heartbeat */, body).await
//! }
//! ```
//!
//! See [`idempotent`] for the options and [`run`] for what happens at run time.
//!
//! # Strategies
//!
//! * `claim` (the default, any store): claim the key, run the body, record the result — see
//!   [`run`].
//! * `tx` (SQL stores): the claim, the body's writes and the result in the handler's own
//!   transaction, committed together — see [`tx`] (features `sqlite`, `postgres`,
//!   `mysql`).
//! * `state` (SQL): a guarded transition of the row's own state, declared on an enum deriving
//!   `StateMachine` and checked at compile time — see [`state`].
//! * `version` (SQL): an optimistic lock, `UPDATE … SET …, version = version + 1 WHERE id = ?
//!   AND version = ?`, telling a duplicate from a missing row and from a conflict — see
//!   [`version`].
//!
//! And without a strategy: `insert_once` reads a unique-key conflict as a duplicate, and
//! `Upsert` inserts a row or updates the one its key holds and says which — see [`unique`].
//!
//! # HTTP
//!
//! With the feature `axum`, [`http::IdempotencyLayer`] makes an axum route idempotent by its
//! `Idempotency-Key` header: retries get the stored response, concurrent copies a `409`, and a
//! client that disconnects does not cut the handler off. In `tx` mode
//! ([`IdempotencyLayer::in_tx`](http::IdempotencyLayer::in_tx), SQL stores) the handler takes
//! the request's transaction ([`http::Tx`]), in which the key is claimed and its response
//! stored, committed with its writes.
//!
//! # Stores
//!
//! | store | feature | survives a restart | shared between processes |
//! |---|---|---|---|
//! | [`MemoryStore`] | always | no | no |
//! | [`sqlite::SqliteStore`] | `sqlite` | yes (file database) | processes on one host |
//! | [`postgres::PostgresStore`] | `postgres` | yes | yes |
//! | [`mysql::MySqlStore`] | `mysql` | yes | yes |
//! | [`redis::RedisStore`] | `redis` | only with AOF (see the module) | yes |
//!
//! Implement [`Store`] for another backend; the conformance suite in
//! `idem_runtime::testing` (feature `testing`) checks it.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
mod error;
mod fingerprint;
mod handler;
#[cfg(feature = "axum")]
pub mod http;
mod key;
mod name;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod sql;
mod store;

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod tx;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod version;

// The stores and the SQL helpers live in `store/` and `sql/`; their public paths stay at the
// root.
#[cfg(feature = "mysql")]
pub use sql::mysql;
#[cfg(feature = "postgres")]
pub use sql::postgres;
#[cfg(feature = "sqlite")]
pub use sql::sqlite;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use sql::unique;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) use sql::upsert;
pub use store::cache;
pub(crate) use store::memory;
#[cfg(feature = "redis")]
pub use store::redis;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use error::{BoxError, Error, StoreError};
pub use fingerprint::Fingerprint;
pub use handler::{Policy, run};
pub use key::{HASHED_PREFIX, IdempotencyKey, MAX_KEY_BYTES, RecordKey};
pub use memory::MemoryStore;
pub use store::sweeper::Sweeper;
pub use store::{Claim, Lease, Store};

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use sql::Backend as SqlDatabase;

#[doc(inline)]
pub use idem_macros::idempotent;

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
#[doc(inline)]
pub use idem_macros::StateMachine;
