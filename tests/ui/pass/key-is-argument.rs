// A string key naming an argument reads that argument; `"msg.order_no"` names the argument
// explicitly, even when it is not the last one.

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

#[idempotent(key = "order_no", store = store)]
async fn cancel(store: &MemoryStore, order_no: String, reason: &str) -> Result<usize, AppError> {
    Ok(order_no.len() + reason.len())
}

#[idempotent(key = "msg.order_no", store = store)]
async fn pay(store: &MemoryStore, msg: OrderPaid, attempt: u32) -> Result<usize, AppError> {
    Ok(msg.order_no.len() + attempt as usize)
}

fn main() {
    let _ = cancel;
    let _ = pay;
}
