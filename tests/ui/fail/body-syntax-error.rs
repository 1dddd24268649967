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

// A body half-typed, as it is in an IDE: rustc's own error, at the statement, and nothing
// about the attribute.
#[idempotent(key = "order_no", store = store)]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<u32, AppError> {
    let length = ;
    Ok(msg.order_no.len() as u32)
}

fn main() {}
