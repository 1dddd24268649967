//! State machines whose transitions are checked at compile time, and the guarded transition
//! that makes a handler idempotent by the row's own state.
//!
//! Derive [`StateMachine`](macro@crate::StateMachine) on a fieldless enum and declare, on each
//! state, the states it may go to:
//!
//! ```
//! use idem_runtime::StateMachine;
//!
//! #[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
//! enum OrderStatus {
//!     #[state(to(Paid, Cancelled))]
//!     Created,
//!     #[state(to(Shipped))]
//!     Paid,
//!     Shipped,
//!     Cancelled,
//! }
//!
//! use idem_runtime::state::StateMachine as _;
//! assert!(OrderStatus::Created.reaches(OrderStatus::Shipped));
//! assert!(!OrderStatus::Shipped.reaches(OrderStatus::Paid));
//! assert_eq!(OrderStatus::from_text("Paid"), Some(OrderStatus::Paid));
//! ```
//!
//! The states are stored as their names (`TEXT` / `VARCHAR`), or with `#[state(storage =
//! "int")]` on the enum as their discriminants (`BIGINT`).
//!
//! [`transition_in`] moves one row from one state to the next in the caller's transaction:
//! `UPDATE <table> SET <column> = <to> WHERE <id column> = ? AND <column> = <from>`. The row's
//! current state then says what a delivery is: `from` → the transition happens
//! ([`Transitioned::Applied`], the body runs); `to` or a state reachable from it → a message
//! for a step already taken ([`Transitioned::Duplicate`], nothing is written); any other state
//! → [`Error::InvalidTransition`]; no row → [`Error::RowMissing`]. Concurrent deliveries wait on
//! the row lock, so exactly one of them applies the transition.
//!
//! The attribute checks `from → to` against the declared transitions at compile time;
//! [`transition_in`] called by hand does not (it moves the row as told). Transitions inside a
//! cycle (`A → B → A`) reach every state of the cycle, so there a row at any of them reads as a
//! duplicate. Several transitions in one transaction are finished innermost first, like the
//! savepoints they are.

use std::fmt;

use sqlx::{Database, Encode, Executor, IntoArguments, Transaction, Type};

use crate::Error;
use crate::sql::{self, Backend};
pub use crate::tx::{Pending, finish_in};

/// How many times a transition is tried when the row reaches `from` between the update and
/// the read that follows it.
const ATTEMPTS: usize = 4;

/// Where the storage of a state machine lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The state's name, as written in the enum.
    Text,
    /// The state's discriminant.
    Int,
}

/// A fieldless enum of states with declared transitions; derive it with
/// [`#[derive(StateMachine)]`](macro@crate::StateMachine).
pub trait StateMachine: Copy + Eq + fmt::Debug + Send + Sync + 'static {
    /// How the states are stored.
    const STORAGE: Storage;

    /// The state's name.
    fn name(self) -> &'static str;

    /// The state named `name`.
    fn from_text(name: &str) -> Option<Self>;

    /// The state's discriminant.
    fn to_int(self) -> i64;

    /// The state with the discriminant `value`.
    fn from_int(value: i64) -> Option<Self>;

    /// Whether `self` leads to `other` in zero or more declared transitions.
    fn reaches(self, other: Self) -> bool;
}

/// What a guarded transition did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transitioned<T, S> {
    /// The row moved to the new state and the body ran: its result.
    Applied(T),
    /// The row was already at the new state or past it: a duplicate; the body did not run.
    Duplicate(S),
}

impl<T, S> Transitioned<T, S> {
    /// The body's result, if the transition was applied now.
    pub fn applied(self) -> Option<T> {
        match self {
            Self::Applied(value) => Some(value),
            Self::Duplicate(_) => None,
        }
    }
}

/// The row a transition guards: `table`, its key column `id` and its state column `state`,
/// all plain identifiers (the attribute checks them at compile time; [`Guard::new`] at run
/// time).
#[derive(Clone, Copy, Debug)]
pub struct Guard {
    table: &'static str,
    id: &'static str,
    state: &'static str,
}

impl Guard {
    /// A guard of names the attribute checked at compile time.
    pub(crate) const fn checked(
        table: &'static str,
        id: &'static str,
        state: &'static str,
    ) -> Self {
        Self { table, id, state }
    }

    /// The guard of `table`'s `state` column, rows keyed by `id`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] unless every name is a plain identifier.
    pub fn new(table: &'static str, id: &'static str, state: &'static str) -> Result<Self, Error> {
        crate::name::sql_identifier("table name", table)?;
        crate::name::sql_identifier("column name", id)?;
        crate::name::sql_identifier("column name", state)?;
        Ok(Self { table, id, state })
    }
}

/// Moves the row `id` of `guard` from `from` to `to` in the transaction `tx`, under a savepoint
/// of its own (see the [module](self)). On [`Transitioned::Applied`] run the body on `tx`, then
/// [`finish_in`] with its outcome.
///
/// # Errors
///
/// [`Error::InvalidTransition`] for a row in a state that does not lead to `to`,
/// [`Error::RowMissing`] for no row, [`Error::Store`] when a statement fails.
pub async fn transition_in<DB, S, I>(
    tx: &mut Transaction<'_, DB>,
    guard: Guard,
    id: I,
    from: S,
    to: S,
) -> Result<Transitioned<Pending, S>, Error>
where
    DB: Backend,
    S: StateMachine,
    I: for<'q> Encode<'q, DB> + Type<DB> + Clone + fmt::Debug + Send,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    <DB as Database>::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: sqlx::Decode<'q, DB> + Type<DB>,
    for<'q> i64: sqlx::Decode<'q, DB>,
    for<'q> i32: sqlx::Decode<'q, DB> + Type<DB>,
    for<'q> i16: sqlx::Decode<'q, DB> + Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let savepoint = sql::new_savepoint();
    sql::set_savepoint::<DB>(&mut **tx, &savepoint).await?;
    let p = DB::placeholder;
    let update = format!(
        "UPDATE {table} SET {state} = {} WHERE {id} = {} AND {state} = {}",
        p(1),
        p(2),
        p(3),
        table = guard.table,
        state = guard.state,
        id = guard.id,
    );
    let read = format!(
        "SELECT {state} FROM {table} WHERE {id} = {}{}",
        p(1),
        DB::LOCKING_READ,
        table = guard.table,
        state = guard.state,
        id = guard.id,
    );
    // A row the update missed may have reached `from` since (the read waited for its lock):
    // then the update is tried again, now that the row is locked.
    let mut settled = Err(sql::store_error::<DB>(format!(
        "the row kept changing during {ATTEMPTS} attempts to move it"
    )));
    for _ in 0..ATTEMPTS {
        let query = sqlx::query::<DB>(sqlx::AssertSqlSafe(update.clone()));
        let query = bind_state(query, to);
        let query = bind_state(query.bind(id.clone()), from);
        let changed = match query.execute(&mut **tx).await {
            Ok(done) => DB::rows_affected(&done),
            Err(error) => {
                let error = sql::store_error::<DB>(error);
                return Err(sql::undo::<DB>(tx, &savepoint, error).await);
            }
        };
        if changed > 0 {
            return Ok(Transitioned::Applied(Pending::new(savepoint)));
        }
        // Nothing moved: what is the row at now? (A locking read sees the latest commit even
        // in an older snapshot.)
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
        settled = match found {
            None => Err(Error::RowMissing {
                table: guard.table,
                id: format!("{id:?}"),
            }),
            Some(row) => match decode_state::<DB, S>(&row) {
                Err(error) => Err(error),
                Ok(current) if current == from => continue,
                Ok(current) if current == to || to.reaches(current) => {
                    Ok(Transitioned::Duplicate(current))
                }
                Ok(current) => Err(Error::InvalidTransition {
                    current: current.name(),
                    from: from.name(),
                    to: to.name(),
                }),
            },
        };
        break;
    }
    match sql::abandon::<DB>(&mut **tx, &savepoint).await {
        Ok(()) => settled,
        Err(undo) => Err(undo),
    }
}

fn bind_state<'q, DB, S>(
    query: sqlx::query::Query<'q, DB, <DB as Database>::Arguments>,
    state: S,
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments>
where
    DB: Database,
    S: StateMachine,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    match S::STORAGE {
        Storage::Text => query.bind(state.name()),
        Storage::Int => query.bind(state.to_int()),
    }
}

fn decode_state<DB, S>(row: &DB::Row) -> Result<S, Error>
where
    DB: Database,
    S: StateMachine,
    for<'q> String: sqlx::Decode<'q, DB> + Type<DB>,
    for<'q> i64: sqlx::Decode<'q, DB> + Type<DB>,
    for<'q> i32: sqlx::Decode<'q, DB> + Type<DB>,
    for<'q> i16: sqlx::Decode<'q, DB> + Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    use sqlx::Row as _;
    let undecodable = |what: String| Error::Store(crate::StoreError::new("state", what));
    match S::STORAGE {
        Storage::Text => {
            let name: Option<String> = row.try_get(0).map_err(|error| {
                undecodable(format!("the state column does not hold text: {error}"))
            })?;
            let name = name.ok_or_else(|| undecodable("the row's state is NULL".to_owned()))?;
            // A `CHAR(n)` column pads the name with spaces.
            let name = name.trim_end();
            S::from_text(name)
                .ok_or_else(|| undecodable(format!("`{name}` is not a state of the machine")))
        }
        Storage::Int => {
            let value = sql::read_integer::<DB>(row).map_err(|error| {
                undecodable(format!(
                    "the state column does not hold an integer: {error}"
                ))
            })?;
            let value = value.ok_or_else(|| undecodable("the row's state is NULL".to_owned()))?;
            S::from_int(value)
                .ok_or_else(|| undecodable(format!("{value} is not a state of the machine")))
        }
    }
}
