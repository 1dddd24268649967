//! Optimistic locking: the message carries the version of the row it was written against, and
//! the update applies only to that version.
//!
//! The seed articles' scheme: the producer reads the account `{id = 1, money = 200, version =
//! 1}` and sends "debit 100 at version 1"; the consumer runs
//!
//! ```text
//! UPDATE accounts SET money = money - ?, version = version + 1 WHERE id = ? AND version = ?
//! ```
//!
//! The first delivery changes the row and moves it to version 2; a redelivery matches no row,
//! so the debit happens once. [`update_in`] runs that statement in the caller's transaction,
//! under a savepoint of its own, and says what a delivery that changed nothing is — the trap
//! of the scheme is that "zero rows updated" has three causes:
//!
//! * the row is **past** the expected version: the change was applied already (a duplicate),
//!   or another change came first. A version alone cannot tell these apart; [`Stale`] says
//!   which the caller assumes: [`Stale::Duplicate`] (the default of the attribute) answers
//!   [`Versioned::AlreadyApplied`], [`Stale::Conflict`] answers [`Error::StaleVersion`];
//! * the row is **behind** the expected version: a change the message builds on has not been
//!   applied yet (messages overtook each other) — [`Error::VersionAhead`]: do not acknowledge
//!   it, redeliver it later;
//! * there is **no row** with the id — [`Error::RowMissing`].
//!
//! A row at the expected version is updated and [`Versioned::Applied`] hands back a [`Pending`]
//! update: run the body on the same transaction, then [`finish_in`], which keeps both or rolls
//! both back. Concurrent deliveries wait on the row lock; exactly one of them applies.
//!
//! Isolation: on PostgreSQL run the transaction at `READ COMMITTED` (the default); at
//! `REPEATABLE READ` or above, a delivery that waited for a concurrent one to commit fails with
//! a serialization error ([`Error::Store`]) instead of reading as already applied. MySQL /
//! MariaDB work at their default `REPEATABLE READ` (an `UPDATE` and the locking read after it
//! see the latest commit).
//!
//! The update is built with [`Update`]: `set` assigns a value, `add` and `subtract` change a
//! column by one (`money = money - ?`); every value is bound as a parameter, every name is
//! checked to be a plain identifier. The attribute's `strategy = "version"` writes this for
//! you and checks the names at compile time.

use std::fmt;

use sqlx::{Arguments as _, Database, Encode, Executor, IntoArguments, Transaction, Type};

use crate::Error;
use crate::sql::{self, Backend};
pub use crate::tx::{Pending, finish_in};

/// How many times the update is tried when the row reaches the expected version between the
/// update and the read that follows it.
const ATTEMPTS: usize = 4;

/// What a row **past** the expected version means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stale {
    /// The change was applied already: [`Versioned::AlreadyApplied`], nothing is written. Right
    /// when every change of the row goes through versioned messages of one producer, so the
    /// only way past the version is this very change.
    #[default]
    Duplicate,
    /// Something changed the row since the message was written: [`Error::StaleVersion`]. Right
    /// when others write the row too; the message must then be recomputed from the new row.
    Conflict,
}

/// What a versioned update did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Versioned<T> {
    /// The row was at the expected version and was updated (and the body ran): its result.
    Applied(T),
    /// The row was past the expected version (with [`Stale::Duplicate`]): nothing was written
    /// and the body did not run.
    AlreadyApplied {
        /// The row's version.
        current: i64,
    },
}

impl<T> Versioned<T> {
    /// The body's result, if the update was applied now.
    pub fn applied(self) -> Option<T> {
        match self {
            Self::Applied(value) => Some(value),
            Self::AlreadyApplied { .. } => None,
        }
    }
}

/// How an assignment changes its column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Set,
    Add,
    Subtract,
}

/// The versioned `UPDATE` of one table: its assignments, with their values bound in order.
///
/// ```
/// # #[cfg(feature = "postgres")] {
/// use idem_runtime::version::Update;
///
/// let debit = Update::<sqlx::Postgres>::table("accounts").subtract("money", 100_i64);
/// assert_eq!(
///     debit.statement(),
///     "UPDATE accounts SET money = money - $1, version = version + 1 WHERE id = $2 AND version = $3"
/// );
/// # }
/// ```
pub struct Update<DB: Database> {
    table: &'static str,
    id: &'static str,
    version: &'static str,
    assignments: Vec<(&'static str, Change)>,
    values: DB::Arguments,
    /// Names come checked from the attribute; by hand they are checked by [`update_in`].
    checked: bool,
    /// The first value that could not be encoded.
    error: Option<String>,
}

impl<DB: Database> fmt::Debug for Update<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Update")
            .field("table", &self.table)
            .field("id", &self.id)
            .field("version", &self.version)
            .field("assignments", &self.assignments)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Update<DB> {
    /// An update of `table`, its rows keyed by the column `id` and versioned by the column
    /// `version` (change those with [`id_column`](Self::id_column) and
    /// [`version_column`](Self::version_column)).
    pub fn table(table: &'static str) -> Self {
        Self {
            table,
            id: "id",
            version: "version",
            assignments: Vec::new(),
            values: DB::Arguments::default(),
            checked: false,
            error: None,
        }
    }

    /// The update of names the attribute checked at compile time.
    pub(crate) fn checked(table: &'static str, id: &'static str, version: &'static str) -> Self {
        Self {
            id,
            version,
            checked: true,
            ..Self::table(table)
        }
    }

    /// The column the rows are keyed by (`id` by default).
    pub fn id_column(mut self, column: &'static str) -> Self {
        self.id = column;
        self.checked = false;
        self
    }

    /// The column holding the version (`version` by default).
    pub fn version_column(mut self, column: &'static str) -> Self {
        self.version = column;
        self.checked = false;
        self
    }

    /// `column = value`.
    pub fn set<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.assign(column, Change::Set, value)
    }

    /// `column = column + value`.
    pub fn add<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.assign(column, Change::Add, value)
    }

    /// `column = column - value`.
    pub fn subtract<V>(self, column: &'static str, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.assign(column, Change::Subtract, value)
    }

    fn assign<V>(mut self, column: &'static str, change: Change, value: V) -> Self
    where
        V: for<'q> Encode<'q, DB> + Type<DB>,
    {
        if let Err(error) = self.values.add(value)
            && self.error.is_none()
        {
            self.error = Some(format!("the value for `{column}` does not encode: {error}"));
        }
        self.assignments.push((column, change));
        self
    }

    /// The statement [`update_in`] runs, with the placeholders of the database.
    pub fn statement(&self) -> String {
        let p = DB::placeholder;
        let mut statement = format!("UPDATE {} SET ", self.table);
        for (n, (column, change)) in self.assignments.iter().enumerate() {
            let value = p(n + 1);
            let assignment = match change {
                Change::Set => format!("{column} = {value}, "),
                Change::Add => format!("{column} = {column} + {value}, "),
                Change::Subtract => format!("{column} = {column} - {value}, "),
            };
            statement.push_str(&assignment);
        }
        let n = self.assignments.len();
        statement.push_str(&format!(
            "{version} = {version} + 1 WHERE {id} = {} AND {version} = {}",
            p(n + 1),
            p(n + 2),
            version = self.version,
            id = self.id,
        ));
        statement
    }

    /// The read of the row's version after an update that changed nothing.
    fn read(&self) -> String {
        format!(
            "SELECT {version} FROM {table} WHERE {id} = {}{}",
            DB::placeholder(1),
            DB::LOCKING_READ,
            version = self.version,
            table = self.table,
            id = self.id,
        )
    }

    /// Every name a plain identifier, at least one assignment, no column twice, the version
    /// left to idem, every value encoded.
    fn check(&self) -> Result<(), Error> {
        if !self.checked {
            crate::name::sql_identifier("table name", self.table)?;
            crate::name::sql_identifier("column name", self.id)?;
            crate::name::sql_identifier("column name", self.version)?;
            for (column, _) in &self.assignments {
                crate::name::sql_identifier("column name", column)?;
            }
        }
        let invalid = |name: &str, reason| {
            Err(Error::InvalidName {
                what: "column name",
                name: name.to_owned(),
                reason,
            })
        };
        if self.assignments.is_empty() {
            return invalid(
                "",
                "a versioned update needs at least one assignment besides the version",
            );
        }
        for (n, (column, _)) in self.assignments.iter().enumerate() {
            if *column == self.version {
                return invalid(column, "the version column is incremented by idem");
            }
            if self.assignments[..n]
                .iter()
                .any(|(other, _)| other == column)
            {
                return invalid(column, "the column is assigned twice");
            }
        }
        match &self.error {
            Some(error) => Err(sql::store_error::<DB>(error.clone())),
            None => Ok(()),
        }
    }
}

/// Runs `update` on the row `id` at version `expected` in the transaction `tx`, under a
/// savepoint of its own (see the [module](self)). On [`Versioned::Applied`] run the body on
/// `tx`, then [`finish_in`] with its outcome.
///
/// # Errors
///
/// [`Error::StaleVersion`] for a row past `expected` with [`Stale::Conflict`],
/// [`Error::VersionAhead`] for a row behind `expected`, [`Error::RowMissing`] for no row,
/// [`Error::InvalidName`] for a name that is not a plain identifier (or an update without
/// assignments), [`Error::Store`] when a value does not encode or a statement fails.
pub async fn update_in<DB, I>(
    tx: &mut Transaction<'_, DB>,
    update: Update<DB>,
    id: I,
    expected: i64,
    stale: Stale,
) -> Result<Versioned<Pending>, Error>
where
    DB: Backend,
    I: for<'q> Encode<'q, DB> + Type<DB> + Clone + fmt::Debug + Send,
    DB::Arguments: Clone + IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB> + sqlx::Decode<'q, DB>,
    for<'q> i32: sqlx::Decode<'q, DB> + Type<DB>,
    for<'q> i16: sqlx::Decode<'q, DB> + Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    update.check()?;
    let mut values = update.values.clone();
    values
        .add(id.clone())
        .and_then(|()| values.add(expected))
        .map_err(|error| sql::store_error::<DB>(format!("the id does not encode: {error}")))?;
    let (statement, read) = (update.statement(), update.read());

    let savepoint = sql::new_savepoint();
    sql::set_savepoint::<DB>(&mut **tx, &savepoint).await?;
    let mut settled = Err(sql::store_error::<DB>(format!(
        "the row kept changing during {ATTEMPTS} attempts to update it"
    )));
    for _ in 0..ATTEMPTS {
        let query =
            sqlx::query_with::<DB, _>(sqlx::AssertSqlSafe(statement.clone()), values.clone());
        let changed = match query.execute(&mut **tx).await {
            Ok(done) => DB::rows_affected(&done),
            Err(error) => {
                let error = sql::store_error::<DB>(error);
                return Err(sql::undo::<DB>(tx, &savepoint, error).await);
            }
        };
        if changed > 0 {
            return Ok(Versioned::Applied(Pending::new(savepoint)));
        }
        // Nothing changed: what version is the row at? (A locking read sees the latest commit
        // even in an older snapshot.)
        let found = match sqlx::query::<DB>(sqlx::AssertSqlSafe(read.clone()))
            .bind(id.clone())
            .fetch_optional(&mut **tx)
            .await
        {
            Ok(found) => found,
            Err(error) => {
                let error = sql::store_error::<DB>(error);
                return Err(sql::undo::<DB>(tx, &savepoint, error).await);
            }
        };
        let table = update.table;
        settled = match found.as_ref().map(sql::read_integer::<DB>) {
            None => Err(Error::RowMissing {
                table,
                id: format!("{id:?}"),
            }),
            Some(Err(error)) => Err(sql::store_error::<DB>(format!(
                "the version column `{}` does not hold an integer: {error}",
                update.version
            ))),
            Some(Ok(None)) => Err(sql::store_error::<DB>(format!(
                "the version column `{}` of the row is NULL",
                update.version
            ))),
            // The row reached the version since the update looked (the read waited for its
            // lock): try again, now that it is locked.
            Some(Ok(Some(current))) if current == expected => continue,
            Some(Ok(Some(current))) if current > expected => match stale {
                Stale::Duplicate => Ok(Versioned::AlreadyApplied { current }),
                Stale::Conflict => Err(Error::StaleVersion {
                    table,
                    id: format!("{id:?}"),
                    expected,
                    current,
                }),
            },
            Some(Ok(Some(current))) => Err(Error::VersionAhead {
                table,
                id: format!("{id:?}"),
                expected,
                current,
            }),
        };
        break;
    }
    match sql::abandon::<DB>(&mut **tx, &savepoint).await {
        Ok(()) => settled,
        Err(undo) => Err(undo),
    }
}
