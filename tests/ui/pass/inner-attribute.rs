// Doc comments, outer attributes and an inner attribute of the body survive the expansion.
#![deny(unused_variables)]

use idem_runtime::{MemoryStore, idempotent};

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

/// Handles a message.
#[idempotent(key = "id", store = store)]
#[must_use = "the result says whether the message may be acked"]
async fn handle(store: &MemoryStore, id: u64) -> Result<u64, AppError> {
    #![allow(unused_variables)]
    let unused = 1;
    Ok(id)
}

fn main() {
    let _ = handle;
}
