// `from`, `to` and `table` belong to `strategy = "state"`.
use idem_runtime::state::Transitioned;
use idem_runtime::{Error, StateMachine, idempotent};
use sqlx::{Postgres, Transaction};

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum OrderStatus {
    #[state(to(Paid, Cancelled))]
    Created,
    #[state(to(Shipped))]
    Paid,
    Shipped,
    Cancelled,
}

#[idempotent(key = order_id, store = store, from = Created, to = Paid, table = "orders")]
async fn pay(store: &idem_runtime::MemoryStore, order_id: i64) -> Result<u64, Error> {
    let _ = order_id;
    Ok(1)
}

fn main() {
    let _: Option<(Transitioned<(), OrderStatus>, Transaction<'static, Postgres>)> = None;
}
