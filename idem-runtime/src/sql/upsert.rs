//! [`Upsert`]: an insert-or-update of one row by its unique key that says which it did. The
//! user-facing docs are in [`unique`](crate::unique), which re-exports it.

use std::fmt;
use std::sync::Arc;

use sqlx::{
    Acquire, Arguments as _, AssertSqlSafe, Encode, Executor, FromRow, IntoArguments, Type,
};

use crate::sql::{Backend, Dialect, sql, store_error};
use crate::{Error, name};

/// What the update path of a MySQL upsert passes to `LAST_INSERT_ID(expr)`. The server reports
/// it as the statement's insert id; the insert path reports the row's `AUTO_INCREMENT` value,
/// or 0 in a table without one — never this.
const UPDATED_ID: u64 = u64::MAX;

/// How many times SQLite's insert-then-update is tried when the row comes and goes between the
/// two statements.
const SQLITE_ATTEMPTS: usize = 8;

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "an update means the key already held a row: this is not the first delivery"]
pub enum Upserted {
    /// No row held the key: the row went in with every value given.
    Inserted,
    /// A row held the key: its `set` columns were overwritten and its `add` columns raised,
    /// its key and `insert_only` columns were left alone.
    Updated,
}

impl Upserted {
    /// Whether the row went in (the key held no row before).
    pub fn is_inserted(self) -> bool {
        self == Self::Inserted
    }
}

/// What an upsert does with a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Part of the unique key: inserted, never overwritten.
    Key,
    /// Inserted, and overwritten when the key held a row.
    Set,
    /// Inserted, and left alone when the key held a row.
    InsertOnly,
    /// Inserted as the value, and added to the stored value when the key held a row.
    Add,
}

/// One column of an upsert, in the order it was given (the order of the bound values).
#[derive(Clone, Copy, Debug)]
struct Column {
    name: &'static str,
    role: Role,
}

/// An insert-or-update of one row, keyed by a unique key of its table: the row goes in, or
/// the row its key already holds is updated, in one atomic step, and
/// [`execute`](Self::execute) says which ([`Upserted`]). Every name is checked to be a plain
/// identifier and every value is bound, never pasted into the statement.
///
/// Each column has one of four roles:
///
/// * [`key`](Self::key) — a column of the unique key (the primary key or a unique index,
///   all of its columns): inserted, never overwritten;
/// * [`set`](Self::set) — inserted, and overwritten when the key held a row (`updated_at`);
/// * [`insert_only`](Self::insert_only) — inserted, and left alone when the key held a row
///   (`created_at`);
/// * [`add`](Self::add) — inserted as the value, and added to the stored value when the key
///   held a row (a counter).
///
/// A bad name or a value that does not encode is not reported by the builder: the first such
/// error comes back from [`execute`](Self::execute), before anything is sent.
///
/// The statements, for `into_table("activity_stats")`, keys `act_code` and `usr_id`,
/// `add("clicks", …)`, `set("updated_at", …)` and `insert_only("created_at", …)`:
///
/// * **PostgreSQL** — one statement; a new row version has no `xmax`, while the update path
///   locks the row first and its new version carries the lock:
///
///   ```text
///   INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at)
///   VALUES ($1, $2, $3, $4, $5) ON CONFLICT (act_code, usr_id) DO UPDATE SET
///   clicks = activity_stats.clicks + EXCLUDED.clicks, updated_at = EXCLUDED.updated_at
///   RETURNING (xmax = 0)
///   ```
///
///   The keys must be exactly the columns of a unique index or constraint (PostgreSQL's
///   conflict target), else the statement fails. With nothing to `set` or `add`, the update
///   assigns the first key column its own value, so the row is still locked and returned.
///
/// * **MySQL / MariaDB** — one statement; the update path passes 18446744073709551615 to
///   `LAST_INSERT_ID(expr)`, which the server reports with the result (sqlx reports an
///   unchanged row as changed, so the count of changed rows cannot tell):
///
///   ```text
///   INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at)
///   VALUES (?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE clicks = clicks + VALUES(clicks),
///   updated_at = VALUES(updated_at),
///   act_code = IF(LAST_INSERT_ID(18446744073709551615), act_code, act_code)
///   ```
///
///   `ON DUPLICATE KEY UPDATE` fires on a conflict with **any** unique key of the table, not
///   only the one named by `key`: a table with a second unique index can update the row that
///   index found, and read [`Upserted::Updated`]. Give such a table one unique key, or use
///   [insert-once](crate::unique). The update path leaves 18446744073709551615 in the
///   session's `LAST_INSERT_ID()`: in a transaction, read the id of your own insert before.
///   `VALUES(column)` is deprecated by MySQL 8.0.20 (a warning), but it is the form MariaDB
///   and every MySQL version accept.
///
/// * **SQLite** — two statements, since no single one reports whether it inserted or
///   updated: an insert that skips a conflict on the key, then, if it inserted nothing, the
///   update; if neither changed a row (another connection deleted the row in between), both
///   run again, up to 8 times:
///
///   ```text
///   INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at)
///   VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (act_code, usr_id) DO NOTHING;
///   UPDATE activity_stats SET clicks = clicks + ?3, updated_at = ?4
///   WHERE act_code = ?1 AND usr_id = ?2
///   ```
///
///   As on PostgreSQL, the keys must be the columns of a unique index. In a transaction
///   the first statement takes SQLite's write lock, so nothing can come between the two;
///   begin the transaction with `BEGIN IMMEDIATE` if it reads before the upsert.
///
/// On every database, of any number of concurrent upserts of one key exactly one reads
/// [`Upserted::Inserted`]. Any failure other than the key's conflict — a `NOT NULL` or
/// foreign-key violation, a lost connection — is [`Error::Store`].
pub struct Upsert<DB: Backend> {
    table: &'static str,
    columns: Vec<Column>,
    arguments: DB::Arguments,
    error: Option<Error>,
}

impl<DB: Backend> fmt::Debug for Upsert<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upsert")
            .field("table", &self.table)
            .field("columns", &self.columns)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Upsert<DB> {
    /// An upsert into `table`, with no columns yet.
    pub fn into_table(table: &'static str) -> Self {
        Self {
            table,
            columns: Vec::new(),
            arguments: DB::Arguments::default(),
            error: name::sql_identifier("table name", table).err(),
        }
    }

    /// Adds `column`, bound to `value`, to the unique key: the row's key, which the upsert
    /// inserts and never overwrites. Give every column of the unique key, in any order.
    pub fn key<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.column(column, Role::Key, value)
    }

    /// Adds `column`, bound to `value`: inserted, and overwritten when the key held a row.
    pub fn set<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.column(column, Role::Set, value)
    }

    /// Adds `column`, bound to `value`: inserted, and left alone when the key held a row
    /// (such as `created_at`).
    pub fn insert_only<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.column(column, Role::InsertOnly, value)
    }

    /// Adds `column`, bound to `value`: inserted as `value`, and when the key held a row set
    /// to `column + value` (a counter). A redelivered message adds again: see
    /// [`unique`](crate::unique) for counting each message once.
    pub fn add<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.column(column, Role::Add, value)
    }

    fn column<V>(mut self, column: &'static str, role: Role, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        if self.error.is_none() {
            if let Err(error) = self.check_column(column) {
                self.error = Some(error);
            } else if let Err(error) = self.arguments.add(value) {
                self.error = Some(store_error::<DB>(format!(
                    "the value of `{column}` does not encode: {error}"
                )));
            }
        }
        self.columns.push(Column { name: column, role });
        self
    }

    /// Checks that `column` is a plain identifier not given before.
    fn check_column(&self, column: &'static str) -> Result<(), Error> {
        name::sql_identifier("column name", column)?;
        // Unquoted identifiers are compared without case.
        if self
            .columns
            .iter()
            .any(|given| given.name.eq_ignore_ascii_case(column))
        {
            return Err(self.invalid(format!("the column `{column}` is given twice")));
        }
        Ok(())
    }

    fn invalid(&self, reason: String) -> Error {
        Error::InvalidUpsert {
            table: self.table.to_owned(),
            reason,
        }
    }

    /// The SQL that [`execute`](Self::execute) runs, with the database's placeholders (see
    /// [`Upsert`]); on SQLite its two statements, separated by `;` and a newline. Names are
    /// written as given, even ones `execute` would refuse.
    pub fn statement(&self) -> String {
        match self.statements() {
            Statements::Postgres(statement) | Statements::MySql(statement) => statement,
            Statements::Sqlite { insert, update } => format!("{insert};\n{update}"),
        }
    }

    /// Runs the upsert on `connection`: the pool (`&pool`), a connection, or a transaction
    /// (`&mut tx` or `&mut *tx`), and says whether the row went in or the key already held one.
    /// (It takes an [`Acquire`] rather than an [`Executor`] because on SQLite it runs two
    /// statements on one connection.)
    ///
    /// # Errors
    ///
    /// Before anything is sent, the first of these in the order the upsert was built:
    /// [`Error::InvalidName`] for a table or column name that is not a plain identifier (an
    /// ASCII letter or `_`, then letters, digits or `_`, at most 63 bytes);
    /// [`Error::InvalidUpsert`] for a column given twice; [`Error::Store`] for a value that
    /// does not encode. Then [`Error::InvalidUpsert`] if no column is a key.
    ///
    /// After that, [`Error::Store`] for any failure other than the key's conflict: another
    /// constraint, a missing table, keys that are not a unique key (PostgreSQL, SQLite), a lost
    /// connection.
    pub async fn execute<'c, A>(self, connection: A) -> Result<Upserted, Error>
    where
        A: Acquire<'c, Database = DB>,
        for<'e> &'e mut DB::Connection: Executor<'e, Database = DB>,
        DB::Arguments: IntoArguments<DB> + Clone,
        for<'r> (bool,): FromRow<'r, DB::Row>,
    {
        if let Some(error) = self.error {
            return Err(error);
        }
        if !self.columns.iter().any(|column| column.role == Role::Key) {
            return Err(self.invalid(
                "it has no key column: give the columns of a unique key with `key`".to_owned(),
            ));
        }
        let statements = self.statements();
        let mut connection = connection.acquire().await.map_err(store_error::<DB>)?;
        let connection = &mut *connection;
        match statements {
            Statements::Postgres(statement) => {
                // `RETURNING (xmax = 0)`: true for an inserted row.
                let inserted: bool =
                    sqlx::query_scalar_with(AssertSqlSafe(statement), self.arguments)
                        .fetch_one(connection)
                        .await
                        .map_err(store_error::<DB>)?;
                Ok(if inserted {
                    Upserted::Inserted
                } else {
                    Upserted::Updated
                })
            }
            Statements::MySql(statement) => {
                let done = sqlx::query_with(AssertSqlSafe(statement), self.arguments)
                    .execute(connection)
                    .await
                    .map_err(store_error::<DB>)?;
                // Not the count of changed rows: sqlx counts an update that changes nothing
                // as one row, like an insert.
                Ok(if DB::insert_id(&done) == Some(UPDATED_ID) {
                    Upserted::Updated
                } else {
                    Upserted::Inserted
                })
            }
            Statements::Sqlite { insert, update } => {
                sqlite::<DB>(connection, &insert.into(), &update.into(), self.arguments).await
            }
        }
    }

    /// The statements of the upsert in the database's dialect.
    fn statements(&self) -> Statements {
        let table = self.table;
        let names = |role: Option<Role>| {
            self.columns
                .iter()
                .filter(|column| role.is_none_or(|role| column.role == role))
                .map(|column| column.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let columns = names(None);
        let keys = names(Some(Role::Key));
        let first_key = self
            .columns
            .iter()
            .find(|column| column.role == Role::Key)
            .map_or("", |column| column.name);
        let placeholders = (1..=self.columns.len())
            .map(DB::placeholder)
            .collect::<Vec<_>>()
            .join(", ");
        let insert = format!("INSERT INTO {table} ({columns}) VALUES ({placeholders})");
        // The assignments on conflict, from `(column, n)` (`n` its placeholder's number):
        // `set` and `add` columns in the order given, or `fallback` when there are none.
        let assignments = |assign: &dyn Fn(&str, Role, usize) -> String, fallback: String| {
            let assigned: Vec<String> = self
                .columns
                .iter()
                .enumerate()
                .filter(|(_, column)| matches!(column.role, Role::Set | Role::Add))
                .map(|(i, column)| assign(column.name, column.role, i + 1))
                .collect();
            if assigned.is_empty() {
                fallback
            } else {
                assigned.join(", ")
            }
        };
        match DB::DIALECT {
            Dialect::Postgres => {
                let set = assignments(
                    &|column, role, _| match role {
                        Role::Add => format!("{column} = {table}.{column} + EXCLUDED.{column}"),
                        _ => format!("{column} = EXCLUDED.{column}"),
                    },
                    format!("{first_key} = {table}.{first_key}"),
                );
                Statements::Postgres(format!(
                    "{insert} ON CONFLICT ({keys}) DO UPDATE SET {set} RETURNING (xmax = 0)"
                ))
            }
            Dialect::MySql => {
                let mut set = assignments(
                    &|column, role, _| match role {
                        Role::Add => format!("{column} = {column} + VALUES({column})"),
                        _ => format!("{column} = VALUES({column})"),
                    },
                    String::new(),
                );
                if !set.is_empty() {
                    set.push_str(", ");
                }
                Statements::MySql(format!(
                    "{insert} ON DUPLICATE KEY UPDATE {set}{first_key} = \
                     IF(LAST_INSERT_ID({UPDATED_ID}), {first_key}, {first_key})"
                ))
            }
            Dialect::Sqlite => {
                let set = assignments(
                    &|column, role, n| match role {
                        Role::Add => format!("{column} = {column} + {}", DB::placeholder(n)),
                        _ => format!("{column} = {}", DB::placeholder(n)),
                    },
                    format!("{first_key} = {first_key}"),
                );
                let matches = self
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(_, column)| column.role == Role::Key)
                    .map(|(i, column)| format!("{} = {}", column.name, DB::placeholder(i + 1)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                Statements::Sqlite {
                    insert: format!("{insert} ON CONFLICT ({keys}) DO NOTHING"),
                    update: format!("UPDATE {table} SET {set} WHERE {matches}"),
                }
            }
        }
    }
}

/// The statements of an upsert.
enum Statements {
    /// One statement that inserts or updates and returns `xmax = 0`.
    Postgres(String),
    /// One statement that inserts or updates, reporting [`UPDATED_ID`] for an update.
    MySql(String),
    /// SQLite's insert that skips a conflict on the key, and its update of the key's row.
    Sqlite { insert: String, update: String },
}

/// SQLite's upsert: `insert`, and if it skipped the row, `update` (both bind `arguments`, by
/// number), until one of them changes a row.
///
/// SQLite has no single statement that tells an insert from an update: its `RETURNING` shows
/// the row after the change (a subquery there sees the new row too), it has no `xmax`, and
/// `rowid = last_insert_rowid()` also holds on the update path when the same connection
/// inserted that row before. So the insert and the update are two statements. Outside a
/// transaction each is its own, and another connection may insert or delete the row between
/// them (SQLite serializes writers one statement at a time here): an insert that skips
/// the row followed by an update that finds none means the row was deleted in between, and
/// both are tried again. In a transaction the insert takes the write lock, so nothing comes
/// between them. The insert goes first because its `ON CONFLICT (keys)` fails unless the keys
/// are a unique key: an update by keys that are not could change many rows.
async fn sqlite<DB>(
    connection: &mut DB::Connection,
    insert: &Arc<str>,
    update: &Arc<str>,
    arguments: DB::Arguments,
) -> Result<Upserted, Error>
where
    DB: Backend,
    for<'e> &'e mut DB::Connection: Executor<'e, Database = DB>,
    DB::Arguments: IntoArguments<DB> + Clone,
{
    for _ in 0..SQLITE_ATTEMPTS {
        let inserted = sqlx::query_with(sql(insert), arguments.clone())
            .execute(&mut *connection)
            .await
            .map_err(store_error::<DB>)?;
        if DB::rows_affected(&inserted) > 0 {
            return Ok(Upserted::Inserted);
        }
        let updated = sqlx::query_with(sql(update), arguments.clone())
            .execute(&mut *connection)
            .await
            .map_err(store_error::<DB>)?;
        if DB::rows_affected(&updated) > 0 {
            return Ok(Upserted::Updated);
        }
    }
    Err(store_error::<DB>(format!(
        "the row kept appearing and disappearing during {SQLITE_ATTEMPTS} upsert attempts \
         (or the key's unique index compares values otherwise than `=`): {update}"
    )))
}
