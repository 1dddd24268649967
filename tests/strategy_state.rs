//! Guarded state transitions (`idem_runtime::state`) on PostgreSQL, MySQL / MariaDB and
//! SQLite: `UPDATE orders SET status = <to> WHERE id = ? AND status = <from>` in the caller's
//! transaction, and what the row's state says when nothing moved.

use idem_runtime::StateMachine;

/// An order's life: paid once, then shipped, or cancelled before payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum OrderStatus {
    #[state(to(Paid, Cancelled))]
    Created,
    #[state(to(Shipped))]
    Paid,
    Shipped,
    Cancelled,
}

/// The same machine stored as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
#[state(storage = "int")]
enum Coded {
    #[state(to(Paid))]
    Created = 10,
    Paid = 20,
}

/// The same tests for each database: `$db`, `$pool` giving `Option<(pool, guard)>` for a table
/// name, and `$p` numbering `?` placeholders where needed.
macro_rules! state_tests {
    ($name:ident, $db:ty, |$table:ident| $pool:expr, $p:expr) => {
        mod $name {
            use std::sync::Arc;

            use idem_runtime::state::{Guard, Transitioned, finish_in, transition_in};
            use idem_runtime::{Error, idempotent};
            use sqlx::{AssertSqlSafe, Pool};
            use tokio::sync::{Barrier, Notify};

            use super::{Coded, OrderStatus};

            /// A pool, a fresh `orders` table (`id`, `status` as text, `code` as integer) with
            /// order 1 `Created`, and a `payments` table the body writes to.
            struct Shop {
                pool: Pool<$db>,
                orders: &'static str,
                payments: String,
                _drop: Vec<Box<dyn std::any::Any + Send + Sync>>,
            }

            async fn shop() -> Option<Arc<Shop>> {
                let $table = idem_tests::servers::unique_name("orders");
                let orders: &'static str = Box::leak($table.clone().into_boxed_str());
                let (pool, drop_orders) = $pool?;
                let payments = idem_tests::servers::unique_name("payments");
                let $table = payments.clone();
                let (_, drop_payments) = $pool?;
                let shop = Shop {
                    pool,
                    orders,
                    payments,
                    _drop: vec![drop_orders, drop_payments],
                };
                for statement in [
                    format!("CREATE TABLE {orders} (id BIGINT PRIMARY KEY, status VARCHAR(16) NOT NULL, code BIGINT NOT NULL)"),
                    format!("INSERT INTO {orders} (id, status, code) VALUES (1, 'Created', 10)"),
                    format!("CREATE TABLE {} (id BIGINT NOT NULL)", shop.payments),
                ] {
                    sqlx::raw_sql(AssertSqlSafe(statement))
                        .execute(&shop.pool)
                        .await
                        .expect("set up the tables");
                }
                Some(Arc::new(shop))
            }

            impl Shop {
                fn guard(&self) -> Guard {
                    Guard::new(self.orders, "id", "status").expect("plain names")
                }

                async fn scalar(&self, statement: String) -> i64 {
                    sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(&self.pool)
                        .await
                        .expect("read")
                }

                async fn payments(&self) -> i64 {
                    self.scalar(format!("SELECT COUNT(*) FROM {}", self.payments)).await
                }

                async fn status(&self) -> String {
                    let statement = format!("SELECT status FROM {} WHERE id = 1", self.orders);
                    sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(&self.pool)
                        .await
                        .expect("read the status")
                }

                /// One delivery of "order 1 was paid": `Created → Paid` with a payment row
                /// written in the same transaction, committed whatever happens.
                async fn pay(&self, id: i64, fail: bool) -> Result<Transitioned<(), OrderStatus>, Error> {
                    let mut tx = self.pool.begin().await.expect("begin");
                    let outcome = match transition_in(
                        &mut tx,
                        self.guard(),
                        id,
                        OrderStatus::Created,
                        OrderStatus::Paid,
                    )
                    .await
                    {
                        Err(error) => Err(error),
                        Ok(Transitioned::Duplicate(current)) => Ok(Transitioned::Duplicate(current)),
                        Ok(Transitioned::Applied(pending)) => {
                            let insert = ($p)(&format!("INSERT INTO {} (id) VALUES (?)", self.payments));
                            sqlx::query(AssertSqlSafe(insert))
                                .bind(id)
                                .execute(&mut *tx)
                                .await
                                .expect("write the payment");
                            finish_in(&mut tx, pending, !fail).await.expect("finish");
                            if fail {
                                Err(Error::EmptyScope) // any error of the body
                            } else {
                                Ok(Transitioned::Applied(()))
                            }
                        }
                    };
                    tx.commit().await.expect("commit");
                    outcome
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn transition_applies_once_and_duplicates_see_the_state() {
                let Some(shop) = shop().await else {
                    return;
                };
                assert_eq!(shop.pay(1, false).await.expect("first"), Transitioned::Applied(()));
                assert_eq!(
                    shop.pay(1, false).await.expect("duplicate"),
                    Transitioned::Duplicate(OrderStatus::Paid)
                );
                assert_eq!(shop.status().await, "Paid");
                assert_eq!(shop.payments().await, 1);

                // A later state is a duplicate too: the step was taken long ago.
                let ship = format!("UPDATE {} SET status = 'Shipped' WHERE id = 1", shop.orders);
                sqlx::raw_sql(AssertSqlSafe(ship)).execute(&shop.pool).await.expect("ship");
                assert_eq!(
                    shop.pay(1, false).await.expect("late duplicate"),
                    Transitioned::Duplicate(OrderStatus::Shipped)
                );
                assert_eq!(shop.payments().await, 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn state_off_the_path_is_an_invalid_transition() {
                let Some(shop) = shop().await else {
                    return;
                };
                let cancel = format!("UPDATE {} SET status = 'Cancelled' WHERE id = 1", shop.orders);
                sqlx::raw_sql(AssertSqlSafe(cancel)).execute(&shop.pool).await.expect("cancel");
                let refused = shop.pay(1, false).await;
                assert!(
                    matches!(refused, Err(Error::InvalidTransition { current: "Cancelled", from: "Created", to: "Paid" })),
                    "{refused:?}"
                );
                let missing = shop.pay(2, false).await;
                assert!(matches!(missing, Err(Error::RowMissing { .. })), "{missing:?}");
                assert_eq!(shop.payments().await, 0);
            }

            /// 64 deliveries at once, each in its own transaction: one applies.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_deliveries_apply_once() {
                let Some(shop) = shop().await else {
                    return;
                };
                let start = Arc::new(Barrier::new(64));
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (shop, start) = (shop.clone(), start.clone());
                        tokio::spawn(async move {
                            start.wait().await;
                            shop.pay(1, false).await
                        })
                    })
                    .collect();
                let mut applied = 0;
                for task in tasks {
                    match task.await.expect("task").expect("delivery") {
                        Transitioned::Applied(()) => applied += 1,
                        Transitioned::Duplicate(current) => assert_eq!(current, OrderStatus::Paid),
                    }
                }
                assert_eq!(applied, 1);
                assert_eq!(shop.payments().await, 1);
            }

            /// A body that fails rolls the transition back with its writes: the redelivery
            /// applies it once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn failed_body_leaves_the_row_where_it_was() {
                let Some(shop) = shop().await else {
                    return;
                };
                assert!(matches!(shop.pay(1, true).await, Err(Error::EmptyScope)));
                assert_eq!(shop.status().await, "Created");
                assert_eq!(shop.payments().await, 0);
                assert_eq!(shop.pay(1, false).await.expect("retry"), Transitioned::Applied(()));
                assert_eq!(shop.payments().await, 1);
            }

            /// The seed scenario through a state: "order 1 was paid" debits the account
            /// `{id = 1, money = 200, version = 1}` by 200 as the body of `Created → Paid`;
            /// delivered twice, the account is debited once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn seed_account_delivered_twice_is_debited_once() {
                let Some(shop) = shop().await else {
                    return;
                };
                let accounts = format!("{}_accounts", shop.payments);
                for statement in [
                    format!("CREATE TABLE {accounts} (id BIGINT PRIMARY KEY, money BIGINT NOT NULL, version BIGINT NOT NULL)"),
                    format!("INSERT INTO {accounts} (id, money, version) VALUES (1, 200, 1)"),
                ] {
                    sqlx::raw_sql(AssertSqlSafe(statement)).execute(&shop.pool).await.expect("set up");
                }
                let mut outcomes = Vec::new();
                for _ in 0..2 {
                    let mut tx = shop.pool.begin().await.expect("begin");
                    let moved = transition_in(&mut tx, shop.guard(), 1_i64, OrderStatus::Created, OrderStatus::Paid)
                        .await
                        .expect("transition");
                    let outcome = match moved {
                        Transitioned::Applied(pending) => {
                            let debit = ($p)(&format!("UPDATE {accounts} SET money = money - ? WHERE id = ?"));
                            sqlx::query(AssertSqlSafe(debit))
                                .bind(200_i64)
                                .bind(1_i64)
                                .execute(&mut *tx)
                                .await
                                .expect("debit");
                            finish_in(&mut tx, pending, true).await.expect("finish");
                            Transitioned::Applied(())
                        }
                        Transitioned::Duplicate(current) => Transitioned::Duplicate(current),
                    };
                    tx.commit().await.expect("commit");
                    outcomes.push(outcome);
                }
                assert_eq!(
                    outcomes,
                    [Transitioned::Applied(()), Transitioned::Duplicate(OrderStatus::Paid)]
                );
                let money = shop.scalar(format!("SELECT money FROM {accounts} WHERE id = 1")).await;
                assert_eq!(money, 0, "debited once");
                sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {accounts}")))
                    .execute(&shop.pool)
                    .await
                    .expect("drop");
            }

            /// A delivery dropped mid-body (its transaction never commits) leaves the row
            /// where it was; the redelivery waits for the row lock and applies once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn dropped_delivery_leaves_no_partial_effect() {
                let Some(shop) = shop().await else {
                    return;
                };
                let written = Arc::new(Notify::new());
                let crashing = tokio::spawn({
                    let (shop, written) = (shop.clone(), written.clone());
                    async move {
                        let mut tx = shop.pool.begin().await.expect("begin");
                        let moved = transition_in(&mut tx, shop.guard(), 1_i64, OrderStatus::Created, OrderStatus::Paid)
                            .await
                            .expect("transition");
                        assert!(moved.applied().is_some());
                        let insert = ($p)(&format!("INSERT INTO {} (id) VALUES (?)", shop.payments));
                        sqlx::query(AssertSqlSafe(insert))
                            .bind(1_i64)
                            .execute(&mut *tx)
                            .await
                            .expect("write the payment");
                        written.notify_one();
                        std::future::pending::<()>().await;
                    }
                });
                written.notified().await;
                crashing.abort();
                assert!(crashing.await.expect_err("aborted").is_cancelled());
                let redelivered = tokio::time::timeout(
                    std::time::Duration::from_secs(20),
                    shop.pay(1, false),
                )
                .await
                .expect("the redelivery waited on the dropped transaction");
                assert_eq!(redelivered.expect("redelivery"), Transitioned::Applied(()));
                assert_eq!(shop.status().await, "Paid");
                assert_eq!(shop.payments().await, 1);
            }

            /// The handler as users write it: the attribute checks `Created → Paid` against
            /// the machine at compile time and moves the row in `tx` around the body.
            #[idempotent(
                strategy = "state",
                machine = OrderStatus,
                from = Created,
                to = Paid,
                table = "idem_state_macro_orders",
                id = order_id,
                tx = tx,
            )]
            async fn on_order_paid(
                tx: &mut sqlx::Transaction<'_, $db>,
                payments: &str,
                fail: bool,
                order_id: i64,
            ) -> Result<Transitioned<i64, OrderStatus>, Error> {
                let insert = ($p)(&format!("INSERT INTO {payments} (id) VALUES (?)"));
                sqlx::query(AssertSqlSafe(insert))
                    .bind(order_id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                if fail {
                    return Err(Error::EmptyScope); // any error of the body
                }
                Ok(order_id)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn handler_moves_the_row_once() {
                let Some(shop) = shop().await else {
                    return;
                };
                for statement in [
                    "DROP TABLE IF EXISTS idem_state_macro_orders",
                    "CREATE TABLE idem_state_macro_orders (id BIGINT PRIMARY KEY, status VARCHAR(16) NOT NULL)",
                    "INSERT INTO idem_state_macro_orders (id, status) VALUES (7, 'Created')",
                ] {
                    sqlx::raw_sql(statement).execute(&shop.pool).await.expect(statement);
                }
                let deliver = |fail: bool| {
                    let shop = shop.clone();
                    async move {
                        let mut tx = shop.pool.begin().await.expect("begin");
                        let outcome = on_order_paid(&mut tx, &shop.payments, fail, 7).await;
                        tx.commit().await.expect("commit");
                        outcome
                    }
                };
                assert!(matches!(deliver(true).await, Err(Error::EmptyScope)));
                assert_eq!(shop.payments().await, 0, "the failed body was rolled back");
                let tasks: Vec<_> = (0..16).map(|_| tokio::spawn(deliver(false))).collect();
                let mut applied = 0;
                for task in tasks {
                    match task.await.expect("task").expect("delivery") {
                        Transitioned::Applied(id) => {
                            assert_eq!(id, 7);
                            applied += 1;
                        }
                        Transitioned::Duplicate(current) => assert_eq!(current, OrderStatus::Paid),
                    }
                }
                assert_eq!(applied, 1);
                assert_eq!(shop.payments().await, 1);
                sqlx::raw_sql("DROP TABLE idem_state_macro_orders")
                    .execute(&shop.pool)
                    .await
                    .expect("drop");
            }

            /// A `CHAR(n)` state column (padded with spaces) and an `INTEGER` one read back
            /// right on the duplicate path too.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn char_and_integer_columns_read_back() {
                let Some(shop) = shop().await else {
                    return;
                };
                let narrow = format!("{}_narrow", shop.payments);
                let narrow: &'static str = Box::leak(narrow.into_boxed_str());
                for statement in [
                    format!("CREATE TABLE {narrow} (id BIGINT PRIMARY KEY, status CHAR(16) NOT NULL, code INTEGER NOT NULL)"),
                    format!("INSERT INTO {narrow} (id, status, code) VALUES (1, 'Created', 10)"),
                ] {
                    sqlx::raw_sql(AssertSqlSafe(statement)).execute(&shop.pool).await.expect("set up");
                }
                let text = Guard::new(narrow, "id", "status").expect("plain names");
                let code = Guard::new(narrow, "id", "code").expect("plain names");
                for expected in [false, true] {
                    let mut tx = shop.pool.begin().await.expect("begin");
                    let moved = transition_in(&mut tx, text, 1_i64, OrderStatus::Created, OrderStatus::Paid)
                        .await
                        .expect("text transition");
                    let coded = transition_in(&mut tx, code, 1_i64, Coded::Created, Coded::Paid)
                        .await
                        .expect("integer transition");
                    // Innermost first: the second transition's savepoint is inside the first.
                    for done in [coded.applied(), moved.applied()] {
                        assert_eq!(done.is_none(), expected, "second round is a duplicate");
                        if let Some(pending) = done {
                            finish_in(&mut tx, pending, true).await.expect("finish");
                        }
                    }
                    tx.commit().await.expect("commit");
                }
                sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {narrow}")))
                    .execute(&shop.pool)
                    .await
                    .expect("drop");
            }

            /// Integer storage: the discriminants are what is written and compared.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn integer_states_use_their_discriminants() {
                let Some(shop) = shop().await else {
                    return;
                };
                let guard = Guard::new(shop.orders, "id", "code").expect("plain names");
                for expected in [Transitioned::Applied(()), Transitioned::Duplicate(Coded::Paid)] {
                    let mut tx = shop.pool.begin().await.expect("begin");
                    let done = transition_in(&mut tx, guard, 1_i64, Coded::Created, Coded::Paid)
                        .await
                        .expect("transition");
                    let done = match done {
                        Transitioned::Applied(pending) => {
                            finish_in(&mut tx, pending, true).await.expect("finish");
                            Transitioned::Applied(())
                        }
                        Transitioned::Duplicate(current) => Transitioned::Duplicate(current),
                    };
                    tx.commit().await.expect("commit");
                    assert_eq!(done, expected);
                }
                let code = shop.scalar(format!("SELECT code FROM {} WHERE id = 1", shop.orders)).await;
                assert_eq!(code, 20);
            }
        }
    };
}

state_tests!(
    postgres,
    sqlx::Postgres,
    |table| idem_tests::sql_servers::postgres_scratch(&table).await,
    idem_tests::sql_servers::numbered
);

state_tests!(
    mysql,
    sqlx::MySql,
    |table| idem_tests::sql_servers::mysql_scratch(&table).await,
    idem_tests::sql_servers::question_marks
);

state_tests!(
    sqlite,
    sqlx::Sqlite,
    |table| idem_tests::sql_servers::sqlite_scratch(&table).await,
    idem_tests::sql_servers::question_marks
);
