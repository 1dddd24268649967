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

#[idempotent(key = "order_no", store = store, fail_open = "yes")]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<u32, AppError> {
    Ok(msg.order_no.len() as u32)
}

fn main() {}
