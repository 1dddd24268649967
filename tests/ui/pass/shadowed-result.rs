// The generated code names nothing from the caller's scope: a module-local `Result` alias,
// and a user type called `Result` (with `Ok`, `Err` and `Duration` look-alikes) shadowing the
// prelude, leave the expansion unaffected.

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

mod alias {
    use super::*;

    type Result<T> = std::result::Result<T, AppError>;

    #[idempotent(key = "order_no", store = store, ttl = "1h")]
    pub async fn pay(store: &MemoryStore, msg: OrderPaid) -> Result<usize> {
        Ok(msg.order_no.len())
    }
}

mod shadowed {
    use super::*;

    /// Not core's `Result`: the prelude's is shadowed in this module.
    #[allow(dead_code)]
    pub struct Result;

    #[allow(dead_code)]
    pub enum Outcome {
        Ok,
        Err,
    }
    #[allow(unused_imports)]
    pub use Outcome::*;

    #[allow(dead_code)]
    pub struct Duration;

    type Handled<T> = core::result::Result<T, AppError>;

    #[idempotent(key = "order_no", store = store, ttl = "1h", lease = "10s")]
    pub async fn pay(store: &MemoryStore, msg: OrderPaid) -> Handled<usize> {
        core::result::Result::Ok(msg.order_no.len())
    }
}

fn main() {
    let _ = alias::pay;
    let _ = shadowed::pay;
}
