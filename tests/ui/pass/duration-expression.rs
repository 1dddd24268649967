// Durations given as expressions of type `Duration`: a call, a const, a path.

use std::time::Duration;

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

const LEASE: Duration = Duration::from_secs(10);

#[idempotent(
    key = "order_no",
    store = store,
    ttl = std::time::Duration::from_secs(60),
    lease = LEASE,
    wait = Duration::from_millis(LEASE.as_millis() as u64 / 2),
)]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<usize, AppError> {
    Ok(msg.order_no.len())
}

fn main() {
    let _ = pay;
}
