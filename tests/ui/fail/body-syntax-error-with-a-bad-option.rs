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

// Both mistakes are reported, each at its own token: the option's, and rustc's own in the body.
#[idempotent(key = "order_no", store = store, tll = "1h")]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<u32, AppError> {
    let length = ;
    Ok(msg.order_no.len() as u32)
}

fn main() {}
