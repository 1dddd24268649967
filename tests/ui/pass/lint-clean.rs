// The expansion is clean under strict lints (`clippy::all` too, when clippy checks this file),
// with every option in use and idem's names in scope.

#![deny(unused_qualifications, warnings, clippy::all)]

use std::time::Duration;

use idem_runtime::{MemoryStore, Store, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct OrderPaid {
    order_no: String,
    amount: u64,
}

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(
    key = "order_no",
    store = store,
    scope = "orders.pay",
    ttl = "1d",
    lease = "30s",
    fingerprint = msg.amount,
    wait = "5s",
    heartbeat = true,
    fail_open = true,
    strategy = "claim",
)]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<u64, AppError> {
    Ok(msg.amount)
}

#[idempotent(
    key = order_no,
    store = store,
    ttl = Duration::from_secs(90),
    lease = Duration::from_millis(500),
    wait = Duration::ZERO,
    fingerprint = false,
    heartbeat = false,
    fail_open = false,
)]
async fn refund<S: Store>(store: &S, order_no: &str) -> Result<(), AppError> {
    let _ = order_no;
    Ok(())
}

// A body of one expression: no `unused_braces` on the user's braces.
#[idempotent(key = order_no, store = store)]
async fn settle(store: &MemoryStore, order_no: u64) -> Result<u64, AppError> {
    Ok(order_no)
}

fn main() {
    let _ = pay;
    let _ = refund::<MemoryStore>;
    let _ = settle;
}
