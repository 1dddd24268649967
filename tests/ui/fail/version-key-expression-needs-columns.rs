use idem_runtime::version::Versioned;
use idem_runtime::{Error, idempotent};
use sqlx::{Postgres, Transaction};

struct Debit {
    id: i64,
    money: i64,
    version: i64,
    note: String,
    parts: Vec<Vec<String>>,
}

#[idempotent(key = msg.id, strategy = "version", table = "accounts", set(money -= msg.money), tx = tx)]
async fn on_debit(tx: &mut Transaction<'_, Postgres>, msg: Debit) -> Result<Versioned<i64>, Error> {
    let _ = (&tx, msg.id, msg.version, &msg.note, &msg.parts);
    Ok(msg.money)
}

fn main() {}
