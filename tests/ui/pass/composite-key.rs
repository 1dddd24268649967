// Composite keys: a tuple over two arguments, and a tuple over two fields of the message (the
// fields are borrowed, not moved out of the message the body still uses).

use idem_runtime::{MemoryStore, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct OrderPaid {
    tenant: String,
    order_no: String,
}

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = (tenant, order_no), store = store)]
async fn by_arguments(store: &MemoryStore, tenant: String, order_no: u64) -> Result<u64, AppError> {
    Ok(tenant.len() as u64 + order_no)
}

#[idempotent(key = (msg.tenant, msg.order_no), store = store)]
async fn by_fields(store: &MemoryStore, msg: OrderPaid) -> Result<usize, AppError> {
    Ok(msg.tenant.len() + msg.order_no.len())
}

fn main() {
    let _ = by_arguments;
    let _ = by_fields;
}
