// A state handler returns `Result<Transitioned<T, State>, E>`: duplicates have no `T`.
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

#[idempotent(strategy = "state", machine = OrderStatus, from = Created, to = Paid, table = "orders", id = order_id, tx = tx)]
async fn pay(tx: &mut Transaction<'_, Postgres>, order_id: i64) -> Result<u64, Error> {
    let _ = (&tx, order_id);
    Ok(1)
}

fn main() {}
