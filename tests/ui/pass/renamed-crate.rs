// idem reached under another name: an `extern crate … as`, and a re-export in a module, each
// with `crate = "…"`; the paths generated from it stay lint-clean with idem's names in scope.

#![deny(unused_qualifications)]

extern crate idem_runtime as idem;

use idem::{MemoryStore, Policy, Store};
use serde::Serialize;

#[derive(Serialize)]
struct OrderPaid {
    order_no: String,
}

struct AppError;

impl From<idem::Error> for AppError {
    fn from(_: idem::Error) -> Self {
        AppError
    }
}

mod support {
    pub use idem_runtime as reexported;
}

#[idem::idempotent(crate = "idem", key = "order_no", store = store)]
async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<usize, AppError> {
    Ok(msg.order_no.len())
}

#[support::reexported::idempotent(crate = "crate::support::reexported", key = "order_no", store = store, ttl = "1h")]
async fn refund<S: Store>(store: &S, msg: OrderPaid) -> Result<usize, AppError> {
    Ok(msg.order_no.len())
}

fn main() {
    let _ = pay;
    let _ = refund::<MemoryStore>;
    let _ = Policy::new();
}
