// `store = &self.store` borrows `self` for the whole call, so the body cannot move `self`:
// take `&self`, or clone the store (e.g. an `Arc`) out of `self` before the handler.

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
}

impl Points {
    #[idempotent(key = "order_no", store = &self.store)]
    async fn credit(self, msg: OrderPaid) -> Result<usize, AppError> {
        let points = self;
        drop(points);
        Ok(msg.order_no.len())
    }
}

fn main() {}
