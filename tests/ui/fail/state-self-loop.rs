// A transition from a state to itself cannot tell a redelivery from a new message: refused in
// the derive and in the attribute.

use idem_runtime::state::Transitioned;
use idem_runtime::{Error, StateMachine, idempotent};
use sqlx::{Postgres, Transaction};

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum Ticket {
    #[state(to(Open, Closed))]
    Open,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum Door {
    #[state(to(Shut))]
    Open,
    Shut,
}

#[idempotent(strategy = "state", machine = Door, from = Open, to = Open, table = "doors", id = door, tx = tx)]
async fn reopen(
    tx: &mut Transaction<'_, Postgres>,
    door: i64,
) -> Result<Transitioned<(), Door>, Error> {
    let _ = (&tx, door);
    Ok(())
}

fn main() {
    let _ = Ticket::Closed;
}
