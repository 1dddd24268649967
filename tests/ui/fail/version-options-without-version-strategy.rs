
use idem_runtime::{Error, idempotent};
use sqlx::{Postgres, Transaction};

struct Debit {
    id: i64,
    money: i64,
    version: i64,
    note: String,
    parts: Vec<Vec<String>>,
}

#[idempotent(key = "id", store = &idem_runtime::MemoryStore::new(), set(money -= msg.money), stale = "conflict", version_column = "rev")]
async fn on_debit(tx: &mut Transaction<'_, Postgres>, msg: Debit) -> Result<i64, Error> {
    let _ = (&tx, msg.id, msg.version, &msg.note, &msg.parts);
    Ok(msg.money)
}

fn main() {}
