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

struct Client {
    name: String,
}

#[idempotent(key = "order_no", store = store, fingerprint = (client, msg.order_no.as_str()))]
async fn pay(store: &MemoryStore, client: &Client, msg: OrderPaid) -> Result<u32, AppError> {
    Ok((client.name.len() + msg.order_no.len()) as u32)
}

fn main() {}
