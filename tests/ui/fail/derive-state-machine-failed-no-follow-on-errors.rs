// A `#[derive(StateMachine)]` that fails still gives the enum a stand-in impl: the handler that
// names the machine and the code that calls its methods get no errors of their own, so the
// derive's mistake is the only one reported.

use idem_runtime::state::{StateMachine as _, Transitioned};
use idem_runtime::{Error, StateMachine, idempotent};
use sqlx::{Sqlite, Transaction};

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum OrderStatus {
    #[state(to(Payed))]
    Created,
    Paid,
}

#[idempotent(
    strategy = "state",
    machine = OrderStatus,
    from = Created,
    to = Paid,
    table = "orders",
    id = order_no,
    id_column = "order_no",
    tx = tx,
)]
async fn paid(
    tx: &mut Transaction<'_, Sqlite>,
    order_no: &str,
) -> Result<Transitioned<(), OrderStatus>, Error> {
    let _ = order_no;
    Ok(())
}

fn main() {
    let _ = paid;
    let _ = OrderStatus::Created.name();
}
