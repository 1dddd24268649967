// The card's spelling alone: the version strategy still needs the row (`table`), what the
// update writes (`set`) and the transaction (`tx`).
use idem_runtime::version::Versioned;
use idem_runtime::{Error, idempotent};
use sqlx::{Postgres, Transaction};

struct OrderPaid {
    order_no: String,
    version: i64,
}

#[idempotent(key = "order_no", strategy = "version")]
async fn on_order_paid(
    db: &mut Transaction<'_, Postgres>,
    msg: OrderPaid,
) -> Result<Versioned<String>, Error> {
    let _ = (db, msg.version);
    Ok(msg.order_no)
}

fn main() {}
