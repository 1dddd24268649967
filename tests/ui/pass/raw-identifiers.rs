// Raw identifiers as arguments, fields and the function's name: the key, the fingerprint and
// the default scope use them as written (the scope is `…::match`, without `r#`).

use idem_runtime::{MemoryStore, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct Message {
    r#type: String,
}

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = "r#type", store = store)]
async fn r#match(store: &MemoryStore, r#ref: Message) -> Result<usize, AppError> {
    Ok(r#ref.r#type.len())
}

#[idempotent(key = r#type.as_str(), store = store)]
async fn by_expression(store: &MemoryStore, r#type: String) -> Result<usize, AppError> {
    Ok(r#type.len())
}

#[idempotent(key = "r#ref.r#type", store = store)]
async fn by_path(store: &MemoryStore, r#ref: Message) -> Result<usize, AppError> {
    Ok(r#ref.r#type.len())
}

fn main() {
    let _ = r#match;
    let _ = by_expression;
    let _ = by_path;
}
