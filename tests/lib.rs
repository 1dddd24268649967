//! Shared pieces of idem's integration tests: handlers written with `#[idempotent]` the way
//! users write them, and counters that tell how often their bodies ran.

use std::sync::atomic::{AtomicUsize, Ordering};

use idem_runtime::{Store, idempotent};
use serde::{Deserialize, Serialize};

/// A message as a queue delivers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OrderPaid {
    /// The business key.
    pub order_no: String,
    /// Paid amount in cents.
    pub amount: u64,
}

impl OrderPaid {
    /// A message for `order_no` paying `amount`.
    pub fn new(order_no: &str, amount: u64) -> Self {
        Self {
            order_no: order_no.to_owned(),
            amount,
        }
    }
}

/// What crediting points returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    /// The order credited.
    pub order_no: String,
    /// Points credited.
    pub points: u64,
    /// Which run of the body produced this receipt (1 for the first).
    pub run: usize,
}

/// The application's error type: carries idem's errors and its own.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// idem refused or failed.
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    /// The business logic failed.
    #[error("business failure: {0}")]
    Business(String),
}

impl AppError {
    /// The idem error inside, if any.
    pub fn idem(&self) -> Option<&idem_runtime::Error> {
        match self {
            AppError::Idem(error) => Some(error),
            AppError::Business(_) => None,
        }
    }
}

/// Counts how many times a handler body ran.
#[derive(Debug, Default)]
pub struct Runs(AtomicUsize);

impl Runs {
    /// Records one run and returns its number (1 for the first).
    pub fn record(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many runs were recorded.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The card's handler: credits points for a paid order, once per `order_no`.
#[idempotent(key = "order_no", store = store, scope = "tests.credit_points")]
pub async fn credit_points<S: Store>(
    store: &S,
    runs: &Runs,
    msg: OrderPaid,
) -> Result<Receipt, AppError> {
    let run = runs.record();
    tokio::task::yield_now().await;
    Ok(Receipt {
        order_no: msg.order_no,
        points: msg.amount / 10,
        run,
    })
}

/// The servers the store tests talk to, and what to do when one is not there.
pub mod servers {
    use std::fmt::Display;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Environment variable with the PostgreSQL URL; default [`POSTGRES_DEFAULT`].
    pub const POSTGRES_VAR: &str = "IDEM_POSTGRES_URL";
    /// PostgreSQL on loopback, trust auth, database `test`.
    pub const POSTGRES_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
    /// Environment variable with the MySQL / MariaDB URL; default [`MYSQL_DEFAULT`].
    pub const MYSQL_VAR: &str = "IDEM_MYSQL_URL";
    /// MariaDB on loopback, root with an empty password, database `test`.
    pub const MYSQL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";
    /// Environment variable with the Redis URL; default [`REDIS_DEFAULT`].
    pub const REDIS_VAR: &str = "IDEM_REDIS_URL";
    /// Redis on loopback.
    pub const REDIS_DEFAULT: &str = "redis://127.0.0.1:6379/";
    /// Set to `1` by `scripts/test.sh`: an unreachable server fails the tests.
    pub const REQUIRE_VAR: &str = "IDEM_REQUIRE_SERVERS";

    /// The URL from `var`, or `default`.
    pub fn url(var: &str, default: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    /// Whether an unreachable server must fail the tests (`IDEM_REQUIRE_SERVERS=1`).
    pub fn required() -> bool {
        std::env::var(REQUIRE_VAR).is_ok_and(|value| value == "1")
    }

    /// Reports a server that cannot be reached: panics when servers are required, otherwise
    /// says on stderr that the test is skipped and how to run it.
    pub fn unreachable(server: &str, url: &str, error: &dyn Display) {
        if required() {
            panic!("{server} at {url} is unreachable ({error}); scripts/services.sh starts it");
        }
        eprintln!(
            "SKIPPED: {server} at {url} is unreachable ({error}); run scripts/test.sh, which \
             starts the servers and sets {REQUIRE_VAR}=1 so that this is a failure"
        );
    }

    /// A name no other test of any concurrent run uses: `prefix_<pid>_<n>`, with only ASCII
    /// letters, digits and `_` (a valid table name).
    pub fn unique_name(prefix: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        format!(
            "{prefix}_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }
}
