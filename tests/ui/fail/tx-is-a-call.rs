// `tx` is used before and after the body, so it must name the transaction, not make one.
use idem_runtime::postgres::PostgresStore;
use idem_runtime::idempotent;
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

#[idempotent(key = "order_no", store = store, strategy = "tx", tx = store.pool().begin())]
async fn pay(store: &PostgresStore, msg: OrderPaid) -> Result<usize, AppError> {
    Ok(msg.order_no.len())
}

fn main() {}
