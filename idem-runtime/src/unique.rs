//! Insert-once: a unique key that turns a second delivery's `INSERT` into a no-op, read as a
//! duplicate rather than as a database error.
//!
//! The seed articles' simplest dedup is a unique index on the business key: the first
//! delivery's `INSERT` goes in, the second one conflicts. Written by hand, the conflict comes
//! back as a database error that the caller must tell apart from a real failure. Each SQL
//! store module has an `insert_once` (for example
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
