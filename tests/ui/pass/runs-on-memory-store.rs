// A handler runs on a `MemoryStore`: the body runs once per key, a duplicate replays.

use std::sync::atomic::{AtomicU32, Ordering};

use idem_runtime::{MemoryStore, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct OrderPaid {
    order_no: String,
    amount: u64,
}

#[derive(Debug)]
struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = "order_no", store = store)]
async fn pay(store: &MemoryStore, runs: &AtomicU32, msg: OrderPaid) -> Result<u64, AppError> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(msg.amount / 10)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let runs = AtomicU32::new(0);
    let paid = |order_no: &str| OrderPaid {
        order_no: order_no.into(),
        amount: 250,
    };
    runtime.block_on(async {
        assert_eq!(pay(&store, &runs, paid("A-1")).await.unwrap(), 25);
        assert_eq!(pay(&store, &runs, paid("A-1")).await.unwrap(), 25);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the duplicate replays");
        assert_eq!(pay(&store, &runs, paid("A-2")).await.unwrap(), 25);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "another key runs the body");
    });
}
