//! Procedural macros of idem. Depend on `idem-runtime`, which re-exports them: the generated
//! code calls into it.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod state;
mod valid;

use proc_macro::TokenStream;

/// Makes an `async fn` handler idempotent: its body runs once per business key, and
/// duplicates get the stored result back.
///
/// ```
/// use idem_runtime::{idempotent, MemoryStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize)] struct OrderPaid { order_no: String, amount: u64 }
/// # #[derive(Serialize, Deserialize)] struct Receipt { points: u64 }
/// # #[derive(Debug)] struct AppError;
/// # impl From<idem_runtime::Error> for AppError { fn from(_: idem_runtime::Error) -> Self { AppError } }
///
/// struct Points { store: MemoryStore }
///
/// impl Points {
///     #[idempotent(key = "order_no", store = &self.store, ttl = "7d", lease = "1m")]
///     async fn on_order_paid(&self, msg: OrderPaid) -> Result<Receipt, AppError> {
///         Ok(Receipt { points: msg.amount / 10 })
///     }
/// }
/// ```
///
/// The function keeps its signature (free functions, `&self` methods, generic functions).
/// It must be an `async fn` returning `Result<T, E>` where `T: Serialize + DeserializeOwned`
/// (the stored result) and `E: From<idem_runtime::Error>` (so idem's outcomes, such as
/// "in progress", reach the caller).
///
/// # Options
///
/// | option | value | default |
/// |---|---|---|
/// | `key` | `"field"`, `"arg.field.field"`, or any expression over the arguments | required |
/// | `store` | an expression giving the store (`&self.store`, an argument, …) | required |
/// | `scope` | a string naming the key space | `module_path!()::fn_name` |
/// | `ttl` | how long a completed result is kept: `"24h"`, or a `Duration` expression | `"24h"` |
/// | `lease` | how long an in-progress claim lives: `"30s"`, or a `Duration` expression | `"30s"` |
/// | `fingerprint` | an expression to hash, `true`, or `false` | the key's argument(s) |
/// | `wait` | a duplicate that finds the key in progress waits up to this for the result | fail at once |
/// | `heartbeat` | `true` extends the lease every third of it while the body runs | `false` |
/// | `fail_open` | `true` runs the body, unrecorded, when the claim fails with a store error (see below); `claim` only | `false` |
/// | `strategy` | `"claim"`, `"tx"`, `"state"` or `"version"` (below) | `"claim"` |
/// | `tx` | with `strategy = "tx"`, `"state"` or `"version"`: the argument holding the transaction | required there |
/// | `machine`, `from`, `to` | with `strategy = "state"`: the enum deriving `StateMachine` and the transition | required there |
/// | `table`, `id`, `column`, `id_column` | with `strategy = "state"`: the row (`column` defaults to `status`, `id_column` to `id`) | `table`, `id` required there |
/// | `table`, `set(…)` | with `strategy = "version"`: the table and the assignments (`col = v`, `col += v`, `col -= v`) | required there |
/// | `version`, `id_column`, `version_column`, `stale` | with `strategy = "version"`: the expected version, the columns, and what a row past the version means (`"duplicate"` or `"conflict"`) | the key's sibling field `version`, the key's field name, `version`, `"duplicate"` |
/// | `crate` | the path idem is reachable at, for crates that re-export it | `"::idem_runtime"` |
///
/// Durations are strings with a unit (`"500ms"`, `"30s"`, `"5m"`, `"24h"`, `"7d"`), checked at
/// compile time, or expressions of type `std::time::Duration`.
///
/// # Keys
///
/// * `key = "order_no"` reads the field `order_no` of the **last** argument (the message); a
///   misspelt field is a compile error that names it.
/// * `key = "msg.order.id"` starts from the argument `msg`; `key = "order_no"` where
///   `order_no` is itself an argument uses that argument.
/// * `key = <expression>`: anything implementing `idem_runtime::IdempotencyKey` — strings,
///   integers, uuids, and tuples of those for composite keys:
///   `key = (msg.tenant.as_str(), msg.order_no)`.
///
/// Use the *business* key (order number, request id), not the broker's message id: a producer
/// that resends creates a new message id. An empty key, or a composite key with an empty part,
/// is an error at run time; a long one is hashed.
///
/// # Store
///
/// The `store` expression is evaluated once, before the body, and borrowed for the whole call.
/// With `store = &self.store` the method takes `&self`: a body that moves `self` does not
/// compile (E0505) — clone the store (an `Arc`, say) out of `self` before the handler instead.
///
/// # Scope
///
/// Keys live in a scope, by default the handler's module path and name. Pin it with
/// `scope = "points.credit"` so that renaming or moving the function does not silently start
/// a new key space (every stored key would be forgotten). Two handlers must not share a scope
/// unless they are the same operation; two methods with the same name in one module do share
/// the default scope, so give them a `scope`.
///
/// # Fingerprint
///
/// A reused key with another payload is not a duplicate: the call fails with
/// `Error::FingerprintMismatch` instead of replaying the wrong result. By default the argument
/// the key is read from (or the arguments a key expression mentions) is hashed, so it must
/// implement `Serialize`. Keep delivery metadata (a broker message id, a send timestamp) out
/// of it with `#[serde(skip_serializing)]` (the field is still decoded; `#[serde(skip)]`
/// would leave it empty in the handler), or a resend would look like a reused key.
/// `fingerprint = (msg.amount, msg.currency)` hashes something else; `fingerprint = false`
/// turns the check off.
///
/// # When the store is down: `fail_open`
///
/// By default a handler **fails closed**: if the claim cannot reach the store (it is down,
/// the network drops, a timeout fires), the body does not run and the call returns
/// `Error::Store` (do not ack; the message is redelivered once the store is back).
/// `fail_open = true` turns that around for one handler: the body runs anyway, without
/// idempotency, its result is returned and not recorded, and a `tracing` warning says so.
///
/// **While the store is down, a fail-open handler is not idempotent**: every delivery in that
/// window runs the body, so duplicates double their effects. Keep it for bodies whose
/// duplicates are harmless. Only a store error at the claim fails open; `InProgress`, a
/// fingerprint mismatch, an empty key and a record that does not decode fail as always, and
/// a result that cannot be recorded after the body ran still returns the store error. It is
/// a compile error with `strategy = "tx"`, `"state"` and `"version"`, whose claim commits with
/// the body's writes: without the database the body cannot run either. See
/// `Policy::with_fail_open`.
///
/// # `strategy = "tx"`
///
/// When the body's effects are writes to the database the store is in, the record can be
/// written in the same transaction: the claim, the writes and the result are committed
/// together, or not at all, so they happen exactly once even across a crash. The handler
/// takes the transaction and names it with `tx`; the store is the SQL store of that database:
///
/// ```text
/// #[idempotent(key = "order_no", store = &self.store, strategy = "tx", tx = tx)]
/// async fn on_order_paid(
///     &self,
///     tx: &mut sqlx::Transaction<'_, Postgres>,
///     msg: OrderPaid,
/// ) -> Result<Receipt, AppError> {
///     sqlx::query("UPDATE accounts SET money = money - $1 WHERE id = $2")
///         .bind(msg.amount)
///         .bind(msg.account)
///         .execute(&mut **tx)
///         .await?;
///     Ok(Receipt { order_no: msg.order_no })
/// }
/// ```
///
/// The generated code runs `SAVEPOINT idem_<unique>` and the store's claim statement on `tx`,
/// then the body, then the store's `UPDATE … SET completed, result … WHERE owner = ? AND
/// fence = ?` and `RELEASE SAVEPOINT idem_<unique>`; the caller commits (only once the handler
/// returned). A duplicate waits on the record's row
/// lock until that commit and replays the stored result; an `Err` from the body rolls back to
/// the savepoint, undoing the claim and the body's writes. `wait` and `heartbeat` mean nothing
/// here. See `idem_runtime::tx`.
///
/// # `strategy = "state"`
///
/// A handler that moves a row from one state to the next, in the caller's transaction:
///
/// ```text
/// #[idempotent(strategy = "state", machine = OrderStatus, from = Created, to = Paid,
///              table = "orders", id = msg.order_id, tx = tx)]
/// async fn on_order_paid(
///     tx: &mut sqlx::Transaction<'_, Postgres>,
///     msg: OrderPaid,
/// ) -> Result<Transitioned<Receipt, OrderStatus>, AppError> {
///     // … writes through `&mut **tx` …
///     Ok(Receipt { order_id: msg.order_id })
/// }
/// ```
///
/// `from → to` must be a transition `OrderStatus` declares (`#[state(to(Paid))]` on `Created`),
/// checked at compile time; table and column names must be plain identifiers. The generated
/// code runs `UPDATE orders SET status = <to> WHERE id = ? AND status = <from>` under a
/// savepoint, then the body (whose `Ok(T)` becomes `Transitioned::Applied(T)`), keeping or
/// rolling back both together. A row already at `to` or past it is
/// `Transitioned::Duplicate(current)` without running the body; another state is
/// `Error::InvalidTransition`, no row `Error::RowMissing`. See `idem_runtime::state`.
///
/// # `strategy = "version"`
///
/// An optimistic lock: the message carries the version of the row it was written against,
/// and the update applies only at that version, in the caller's transaction:
///
/// ```text
/// #[idempotent(key = "id", strategy = "version", table = "accounts",
///              set(money -= msg.money), tx = tx)]
/// async fn on_debit(
///     tx: &mut sqlx::Transaction<'_, Postgres>,
///     msg: Debit, // { id, money, version }
/// ) -> Result<Versioned<Receipt>, AppError> {
///     // … writes through `&mut **tx` …
///     Ok(Receipt { account: msg.id })
/// }
/// ```
///
/// The generated code runs, under a savepoint, `UPDATE accounts SET money = money - $1,
/// version = version + 1 WHERE id = $2 AND version = $3` binding `msg.money`, `msg.id` and
/// `msg.version`, then the body (whose `Ok(T)` becomes `Versioned::Applied(T)`), keeping or
/// rolling back both together. A field key names the id column (`id_column` changes it) and
/// its sibling field `version` is the expected version (`version = …` changes it); a key
/// expression needs both options. Names are checked as plain identifiers at compile time; the
/// version column may not be in `set(…)`. When no row changed: a row past the version is
/// `Versioned::AlreadyApplied { current }` (or `Error::StaleVersion` with `stale =
/// "conflict"`), a row behind it `Error::VersionAhead`, no row `Error::RowMissing`. See
/// `idem_runtime::version`.
///
/// # At run time
///
/// See `idem_runtime::run`, which the body is handed to: the first call returns its result as
/// the record decodes it (what every replay returns); a completed key replays the stored
/// result without running the body; a key in progress gives `Error::InProgress` (do not ack,
/// redeliver later) or, with `wait`, the first call's result; an `Err` from the body releases
/// the claim so a retry runs again; a panic or a dropped future leaves the claim to expire
/// with its lease.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}

/// Derives `idem_runtime::state::StateMachine` for a fieldless enum of states, with the
/// transitions each state declares: `#[state(to(Paid, Cancelled))]` on `Created`.
///
/// What a state reaches (in zero or more declared transitions) is computed at compile time;
/// naming a state that is not a variant is a compile error at that name. States are stored
/// as their names; `#[state(storage = "int")]` on the enum stores their discriminants.
///
/// ```
/// use idem_runtime::StateMachine;
///
/// #[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
/// #[state(storage = "int")]
/// enum OrderStatus {
///     #[state(to(Paid, Cancelled))]
///     Created = 1,
///     #[state(to(Shipped))]
///     Paid = 2,
///     Shipped = 3,
///     Cancelled = 9,
/// }
///
/// use idem_runtime::state::StateMachine as _;
/// assert_eq!(OrderStatus::Paid.to_int(), 2);
/// assert_eq!(OrderStatus::from_int(9), Some(OrderStatus::Cancelled));
/// assert!(OrderStatus::Created.reaches(OrderStatus::Shipped));
/// assert!(!OrderStatus::Cancelled.reaches(OrderStatus::Paid));
/// ```
#[proc_macro_derive(StateMachine, attributes(state))]
pub fn derive_state_machine(item: TokenStream) -> TokenStream {
    state::derive(item.into()).into()
}
