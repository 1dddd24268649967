// A dotted key reads a nested field, including a tuple field.

use idem_runtime::{MemoryStore, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct Order {
    id: String,
}

#[derive(Serialize)]
struct OrderPaid {
    order: Order,
    refs: (u32, u64),
}

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = "order.id", store = store)]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<usize, AppError> {
    Ok(msg.order.id.len())
}

#[idempotent(key = "refs.1", store = store)]
async fn refund(store: &MemoryStore, msg: OrderPaid) -> Result<u64, AppError> {
    Ok(msg.refs.1)
}

fn main() {
    let _ = pay;
    let _ = refund;
}
