// `tx` must name a transaction (or a connection in one), not the pool it came from.
use idem_runtime::postgres::PostgresStore;
use idem_runtime::{MemoryStore, idempotent};
use serde::Serialize;

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

#[idempotent(key = "order_no", store = store, strategy = "tx", tx = db)]
async fn pay(
    store: &PostgresStore,
    db: &mut sqlx::PgPool,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let _ = db;
    Ok(msg.order_no.len())
}

fn main() {
    let _ = MemoryStore::new();
}
