// Generic over the store, the message and the result, with a `where` clause.

use idem_runtime::{Store, idempotent};
use serde::Serialize;
use serde::de::DeserializeOwned;

trait Message: Serialize {
    fn id(&self) -> u64;
}

struct AppError;

impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[idempotent(key = msg.id(), store = store)]
async fn handle<S, M, T>(store: &S, msg: M) -> Result<T, AppError>
where
    S: Store + ?Sized,
    M: Message,
    T: Serialize + DeserializeOwned + From<u64>,
{
    Ok(T::from(msg.id()))
}

fn main() {
    #[derive(Serialize)]
    struct Ping(u64);
    impl Message for Ping {
        fn id(&self) -> u64 {
            self.0
        }
    }
    let _ = handle::<idem_runtime::MemoryStore, Ping, u64>;
}
