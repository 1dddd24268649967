// A guarded transition commits with the body's writes: it cannot fail open.
use idem_runtime::state::Transitioned;
use idem_runtime::{Error, StateMachine, idempotent};
use sqlx::{Postgres, Transaction};

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum OrderStatus {
    #[state(to(Paid))]
    Created,
    Paid,
}

#[idempotent(strategy = "state", machine = OrderStatus, from = Created, to = Paid, table = "orders", id = order_id, tx = tx, fail_open = true)]
async fn pay(
    tx: &mut Transaction<'_, Postgres>,
    order_id: i64,
) -> Result<Transitioned<(), OrderStatus>, Error> {
    let _ = (&tx, order_id);
    Ok(())
}

fn main() {}
