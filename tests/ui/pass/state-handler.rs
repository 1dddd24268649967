// A state handler, clean under strict lints: the transition is checked at compile time, the
// row keyed by a field of the message, integer storage, custom column names.

#![deny(unused_qualifications, warnings, clippy::all)]

use idem_runtime::state::Transitioned;
use idem_runtime::{Error, StateMachine, idempotent};
use sqlx::{MySql, Transaction};

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
#[state(storage = "int")]
enum Shipment {
    #[state(to(Packed))]
    Ordered = 1,
    #[state(to(Sent))]
    Packed = 2,
    Sent = 3,
}

struct Packed {
    shipment: i64,
}

#[idempotent(
    strategy = "state",
    machine = Shipment,
    from = Ordered,
    to = Packed,
    table = "shipments",
    id = msg.shipment,
    id_column = "shipment_id",
    column = "stage",
    tx = tx,
)]
async fn on_packed(
    tx: &mut Transaction<'_, MySql>,
    msg: Packed,
) -> Result<Transitioned<i64, Shipment>, Error> {
    sqlx::query("UPDATE shipments SET packed_at = NOW() WHERE shipment_id = ?")
        .bind(msg.shipment)
        .execute(&mut **tx)
        .await
        .map_err(|error| Error::Store(idem_runtime::StoreError::new("app", error)))?;
    Ok(msg.shipment)
}

fn main() {
    let _ = on_packed;
}
