// A `tx` handler's claim commits with the body's writes: without the database the body cannot
// run either, so it cannot fail open.
use idem_runtime::postgres::PostgresStore;
use idem_runtime::{MemoryStore, idempotent};
use serde::Serialize;
use sqlx::{Postgres, Transaction};

#[derive(Serialize)]
struct OrderPaid {
    order_no: String,
}

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = "order_no", store = store, strategy = "tx", tx = tx, fail_open = true)]
async fn pay(
    store: &PostgresStore,
    tx: &mut Transaction<'_, Postgres>,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let _ = (tx, &msg);
    Ok(1)
}

fn main() {
    let _ = MemoryStore::new();
}
