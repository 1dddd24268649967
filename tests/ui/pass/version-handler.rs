// The card's `#[idempotent(key = "order_no", strategy = "version")]` with the row's details,
// clean under strict lints: `UPDATE orders SET status = ?, paid_cents = paid_cents + ?,
// version = version + 1 WHERE order_no = ? AND version = ?`, the key's field naming its column
// and the message's `version` field giving the expected version.

#![deny(unused_qualifications, warnings, clippy::all)]

use idem_runtime::version::Versioned;
use idem_runtime::{Error, idempotent};
use sqlx::{MySql, Transaction};

struct OrderPaid {
    order_no: String,
    amount_cents: i64,
    version: u32,
}

struct Receipt {
    order_no: String,
}

#[idempotent(
    key = "order_no",
    strategy = "version",
    table = "orders",
    set(status = "paid", paid_cents += msg.amount_cents),
    tx = db
)]
async fn on_order_paid(
    db: &mut Transaction<'_, MySql>,
    msg: OrderPaid,
) -> Result<Versioned<Receipt>, Error> {
    sqlx::query("INSERT INTO receipts (order_no) VALUES (?)")
        .bind(&msg.order_no)
        .execute(&mut **db)
        .await
        .map_err(|error| Error::Store(idem_runtime::StoreError::new("app", error)))?;
    Ok(Receipt {
        order_no: msg.order_no,
    })
}

fn main() {
    let _ = on_order_paid;
    let _ = |receipt: Receipt| receipt.order_no;
}
