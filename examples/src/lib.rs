//! Programs that use idem for real, and the pieces they are built from.
//!
//! * [`stream`] — the event stream services talk through: [`RedisStream`](stream::RedisStream)
//!   (Redis Streams and consumer groups) and [`MemoryStream`](stream::MemoryStream) (the same
//!   semantics in one process, so the demo runs without Redis).
//! * [`events`] — the events on it: [`OrderPaid`](events::OrderPaid).
//! * [`orders`] — the order service: an axum API whose `POST /orders` takes an
//!   `Idempotency-Key`, whose pay and cancel are guarded transitions (`strategy = "state"`),
//!   and whose `OrderPaid` events go through an outbox to the stream.
//! * [`points`] — the points service: a consumer group member that credits the points of
//!   each paid order exactly once, with `#[idempotent(strategy = "tx")]` on SQLite,
//!   PostgreSQL or MySQL / MariaDB.
//!
//! * [`demo`] — both services end to end in one process, with the faults of real queues
//!   injected, reconciled against the databases.
//!
//! Binaries: `demo` (the [`demo`], on an embedded SQLite file and in-process stream by
//! default), `order-service` (the HTTP API and the outbox relay, until Ctrl-C) and
//! `points-service` (one consumer of a Redis Stream, until Ctrl-C):
//!
//! ```text
//! cargo run -p idem-examples --bin order-service -- \
//!     --database-url postgres://postgres@127.0.0.1/test --redis-url redis://127.0.0.1:6379/
//! cargo run -p idem-examples --bin points-service -- \
//!     --database-url postgres://postgres@127.0.0.1/test --redis-url redis://127.0.0.1:6379/ \
//!     --consumer points-1
//! ```
//!
//! Publishing an event and consuming it, in one process:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use idem_examples::events::OrderPaid;
//! use idem_examples::points::{Consumer, GROUP, Points};
//! use idem_examples::stream::{EventStream, MemoryStream};
//! use idem_runtime::sqlite::SqliteStore;
//!
//! let points = Arc::new(Points::<sqlx::Sqlite>::new(SqliteStore::in_memory().await?));
//! points.migrate().await?;
//! let stream = MemoryStream::new("orders.paid");
//! stream.create_group(GROUP).await?;
//!
//! let paid = OrderPaid::new("A-1001", 7, 12_000);
//! paid.publish(&stream).await?;
//! paid.publish(&stream).await?; // the producer resends: a new entry, the same order
//!
//! let consumer = Consumer::new(stream.clone(), points.clone(), GROUP, "points-1")
//!     .block(Duration::ZERO);
//! consumer.poll().await?;
//! let tally = consumer.counters().get();
//! assert_eq!((tally.credited, tally.replayed), (1, 1));
//! assert_eq!(points.balance(7).await?, 120);
//! # Ok(())
//! # }
//! ```

pub mod chaos;
pub mod demo;
pub mod events;
pub mod orders;
pub mod points;
pub mod stream;
