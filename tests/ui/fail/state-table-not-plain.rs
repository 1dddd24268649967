// Table and column names are checked as plain SQL identifiers at compile time.
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

#[idempotent(strategy = "state", machine = OrderStatus, from = Created, to = Paid, table = "orders; DROP TABLE orders", column = "order status", id = order_id, tx = tx)]
async fn pay(
    tx: &mut Transaction<'_, Postgres>,
    order_id: i64,
) -> Result<Transitioned<(), OrderStatus>, Error> {
    let _ = (&tx, order_id);
    Ok(())
}

fn main() {}
