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

trait Handler {
    #[idempotent(key = "order_no", store = store)]
    async fn pay(&self, store: &MemoryStore, msg: OrderPaid) -> Result<u32, AppError>;
}

fn main() {}
