// A method taking `&self`, its store a field: `store = &self.store`.

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

struct Points {
    store: MemoryStore,
    rate: u64,
}

impl Points {
    #[idempotent(key = "order_no", store = &self.store)]
    async fn credit(&self, msg: OrderPaid) -> Result<u64, AppError> {
        Ok(msg.order_no.len() as u64 * self.rate)
    }
}

fn main() {
    let _ = Points::credit;
}
