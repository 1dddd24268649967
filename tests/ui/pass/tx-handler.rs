// A `tx` handler: a method whose store is a field, its writes on the caller's transaction,
// clean under strict lints.

#![deny(unused_qualifications, warnings, clippy::all)]

use idem_runtime::postgres::PostgresStore;
use idem_runtime::{Error, idempotent};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};

#[derive(Serialize)]
struct OrderPaid {
    order_no: String,
    amount: i64,
}

#[derive(Serialize, Deserialize)]
struct Receipt {
    balance: i64,
}

struct Ledger {
    store: PostgresStore,
}

impl Ledger {
    #[idempotent(key = "order_no", store = &self.store, strategy = "tx", tx = tx, ttl = "7d")]
    async fn debit(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: OrderPaid,
    ) -> Result<Receipt, Error> {
        let balance: i64 = sqlx::query_scalar(
            "UPDATE accounts SET money = money - $1 WHERE id = 1 RETURNING money",
        )
        .bind(msg.amount)
        .fetch_one(&mut **tx)
        .await
        .map_err(|error| Error::Store(idem_runtime::StoreError::new("app", error)))?;
        Ok(Receipt { balance })
    }
}

fn main() {
    let _ = Ledger::debit;
}
