//! Insert-once and upsert: a unique key that makes a second delivery a typed outcome rather
//! than a database error.
//!
//! The seed articles' simplest dedup is a unique index on the business key: the first
//! delivery's `INSERT` goes in, the second one conflicts. Written by hand, the conflict comes
//! back as a database error that the caller must tell apart from a real failure. Two helpers
//! read it for you, on PostgreSQL, MySQL / MariaDB and SQLite:
//!
//! * **insert-once** — your own `INSERT`; a conflict is [`Inserted::Duplicate`] and writes
//!   nothing. For "do it once": record a payment, an order, a processed message id.
//! * **upsert** — [`Upsert`] builds one row's insert-or-update: the first delivery inserts the
//!   row, a later one updates the row its key holds (overwrites some columns, adds to
//!   counters, leaves others alone), and [`execute`](Upsert::execute) answers
//!   [`Upserted::Inserted`] or [`Upserted::Updated`]. For "keep the latest": statistics,
//!   last-seen times, projections.
//!
//! Either way, any other failure (a `NOT NULL` or foreign-key violation, a lost connection)
//! is [`Error::Store`](crate::Error::Store), never a duplicate.
//!
//! # Upsert
//!
//! An activity-statistics table with a unique key on `(act_code, usr_id)`: the first click
//! inserts the row, later clicks count and move `updated_at`; `created_at` stays the first
//! click's.
//!
//! ```
//! # #[cfg(feature = "postgres")] {
//! use idem_runtime::unique::{Upsert, Upserted};
//!
//! fn click(act_code: &str, usr_id: i64, now: i64) -> Upsert<sqlx::Postgres> {
//!     Upsert::into_table("activity_stats")
//!         .key("act_code", act_code)
//!         .key("usr_id", usr_id)
//!         .add("clicks", 1_i64)
//!         .set("updated_at", now)
//!         .insert_only("created_at", now)
//! }
//!
//! async fn on_click(
//!     pool: &sqlx::PgPool,
//!     usr_id: i64,
//!     now: i64,
//! ) -> Result<(), idem_runtime::Error> {
//!     if click("spring-sale", usr_id, now).execute(pool).await? == Upserted::Inserted {
//!         // The user's first click on this activity.
//!     }
//!     Ok(())
//! }
//!
//! assert_eq!(
//!     click("spring-sale", 42, 1_700_000_000).statement(),
//!     "INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at) \
//!      VALUES ($1, $2, $3, $4, $5) ON CONFLICT (act_code, usr_id) DO UPDATE SET \
//!      clicks = activity_stats.clicks + EXCLUDED.clicks, updated_at = EXCLUDED.updated_at \
//!      RETURNING (xmax = 0)"
//! );
//! # }
//! ```
//!
//! It is one atomic statement on PostgreSQL and MySQL, and an insert and an update on SQLite;
//! of any number of concurrent upserts of one key exactly one reads `Inserted`. See
//! [`Upsert`] for each database's statement and its caveats — on MySQL, `ON DUPLICATE KEY
//! UPDATE` fires on a conflict with *any* unique key of the table.
//!
//! An upsert is as idempotent as what it writes: a redelivered message `set`s the same values
//! again (and reads `Updated`), but its `add` adds again. To count each message once, run the
//! upsert in one transaction with an insert-once of the message id, and skip it when that is
//! a duplicate — or put it in an `#[idempotent]` handler.
//!
//! # Insert-once
//!
//! Each SQL store module has an `insert_once` (for example
#![cfg_attr(
    feature = "postgres",
    doc = "[`postgres::insert_once`](crate::postgres::insert_once))"
)]
#![cfg_attr(not(feature = "postgres"), doc = "`postgres::insert_once`)")]
//! that runs an insert and answers [`Inserted::New`] or [`Inserted::Duplicate`]:
//!
//! * a plain `INSERT` that violates a unique key or primary key is a duplicate;
//! * an `INSERT … ON CONFLICT DO NOTHING` (PostgreSQL, SQLite) that changes no row is a
//!   duplicate — that clause skips uniqueness conflicts only;
//! * any other error (a `NOT NULL` or foreign-key violation, a lost connection) is
//!   [`Error::Store`](crate::Error::Store): it is not a duplicate, and the message must not be
//!   acknowledged as one.
//!
//! In a PostgreSQL transaction a failed statement aborts the transaction, so there write
//! `ON CONFLICT DO NOTHING`: the duplicate then costs nothing and the transaction goes on.
//!
//! On MySQL write a plain `INSERT`. `INSERT IGNORE` is read correctly too (no row changed: a
//! duplicate), but it also turns other errors into warnings — a `NULL` into a `NOT NULL`
//! column goes in as `0` or `''` — and `INSERT … ON DUPLICATE KEY UPDATE key = key` cannot be
//! used at all: sqlx counts the unchanged row as changed, so a duplicate would read as new.
//! Likewise SQLite's `INSERT OR IGNORE` skips `NOT NULL` and `CHECK` failures as if they were
//! duplicates; use `ON CONFLICT DO NOTHING` there.

pub use crate::upsert::{Upsert, Upserted};

/// What an insert-once did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a duplicate usually means: acknowledge the message without doing the work again"]
pub enum Inserted {
    /// The row went in: this is the first delivery.
    New,
    /// The unique key already held a row: a duplicate, nothing was written.
    Duplicate,
}

impl Inserted {
    /// Whether the row went in.
    pub fn is_new(self) -> bool {
        self == Self::New
    }
}
