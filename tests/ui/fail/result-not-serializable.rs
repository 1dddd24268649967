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

struct Receipt {
    points: u64,
}

#[idempotent(key = "order_no", store = store)]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<Receipt, AppError> {
    Ok(Receipt {
        points: msg.order_no.len() as u64,
    })
}

fn main() {}
