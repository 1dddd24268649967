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
async fn pay(store: &MemoryStore, msg: OrderPaid) {
    println!("{}", msg.order_no);
}

fn main() {}
