//! Insert-once on PostgreSQL, MySQL / MariaDB and SQLite: a unique key makes the second
//! delivery's `INSERT` a duplicate outcome, not a database error.

/// The same tests for each database: `$db` and its `insert_once`, `$pool` gives
/// `Option<(pool, guard)>` for a table name, `$p` numbers `?` placeholders where needed, and
/// `$skip` is the database's insert that skips a conflicting row.
macro_rules! insert_once_tests {
    ($name:ident, $db:ty, $insert_once:path, |$table:ident| $pool:expr, $p:expr, $skip:literal) => {
        mod $name {
            use std::sync::Arc;

            use idem_runtime::Error;
            use idem_runtime::unique::Inserted;
            use sqlx::{AssertSqlSafe, Pool};
            use tokio::sync::Barrier;

            /// A pool and a fresh `payments` table, removed when dropped.
            struct Payments {
                pool: Pool<$db>,
                table: String,
                _drop: Box<dyn std::any::Any + Send + Sync>,
            }

            async fn payments() -> Option<Arc<Payments>> {
                let $table = idem_tests::servers::unique_name("payments");
                let table = $table.clone();
                let (pool, drop) = $pool?;
                let payments = Payments {
                    pool,
                    table,
                    _drop: drop,
                };
                let create = format!(
                    "CREATE TABLE {} (order_no VARCHAR(64) PRIMARY KEY, amount BIGINT NOT NULL)",
                    payments.table
                );
                sqlx::raw_sql(AssertSqlSafe(create))
                    .execute(&payments.pool)
                    .await
                    .expect("create the payments table");
                Some(Arc::new(payments))
            }

            impl Payments {
                /// Records the payment of `order_no` once, with a plain `INSERT`.
                async fn record(
                    &self,
                    order_no: &str,
                    amount: Option<i64>,
                ) -> Result<Inserted, Error> {
                    let statement = ($p)(&format!(
                        "INSERT INTO {} (order_no, amount) VALUES (?, ?)",
                        self.table
                    ));
                    let insert = sqlx::query(AssertSqlSafe(statement))
                        .bind(order_no.to_owned())
                        .bind(amount);
                    $insert_once(&self.pool, insert).await
                }

                /// The same with the database's own skip-on-conflict clause.
                async fn record_skipping(&self, order_no: &str) -> Result<Inserted, Error> {
                    let statement = ($p)(&format!($skip, self.table));
                    let insert = sqlx::query(AssertSqlSafe(statement))
                        .bind(order_no.to_owned())
                        .bind(5_i64);
                    $insert_once(&self.pool, insert).await
                }

                async fn rows(&self) -> i64 {
                    let statement = format!("SELECT COUNT(*) FROM {}", self.table);
                    sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(&self.pool)
                        .await
                        .expect("count")
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn second_plain_insert_is_a_duplicate() {
                let Some(payments) = payments().await else {
                    return;
                };
                assert_eq!(
                    payments.record("A-1", Some(5)).await.expect("first"),
                    Inserted::New
                );
                assert_eq!(
                    payments.record("A-1", Some(5)).await.expect("second"),
                    Inserted::Duplicate
                );
                assert_eq!(
                    payments.record("A-2", Some(5)).await.expect("other"),
                    Inserted::New
                );
                assert_eq!(payments.rows().await, 2);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn second_skipping_insert_is_a_duplicate() {
                let Some(payments) = payments().await else {
                    return;
                };
                assert!(
                    payments
                        .record_skipping("A-1")
                        .await
                        .expect("first")
                        .is_new()
                );
                assert_eq!(
                    payments.record_skipping("A-1").await.expect("second"),
                    Inserted::Duplicate
                );
                assert_eq!(payments.rows().await, 1);
            }

            /// 64 deliveries at once: exactly one row goes in.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_inserts_insert_once() {
                let Some(payments) = payments().await else {
                    return;
                };
                let start = Arc::new(Barrier::new(64));
                let tasks: Vec<_> = (0..64)
                    .map(|i| {
                        let (payments, start) = (payments.clone(), start.clone());
                        tokio::spawn(async move {
                            start.wait().await;
                            if i % 2 == 0 {
                                payments.record("A-1", Some(5)).await
                            } else {
                                payments.record_skipping("A-1").await
                            }
                        })
                    })
                    .collect();
                let mut new = 0;
                for task in tasks {
                    if task.await.expect("task").expect("insert").is_new() {
                        new += 1;
                    }
                }
                assert_eq!(new, 1);
                assert_eq!(payments.rows().await, 1);
            }

            /// Another constraint is an error, never a duplicate.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn other_constraint_is_an_error_not_a_duplicate() {
                let Some(payments) = payments().await else {
                    return;
                };
                let refused = payments.record("A-1", None).await;
                assert!(matches!(refused, Err(Error::Store(_))), "{refused:?}");
                assert_eq!(payments.rows().await, 0);
            }

            /// In a transaction, a skipped duplicate leaves the transaction usable.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn skipped_duplicate_keeps_the_transaction_usable() {
                let Some(payments) = payments().await else {
                    return;
                };
                assert!(
                    payments
                        .record_skipping("A-1")
                        .await
                        .expect("first")
                        .is_new()
                );
                let mut tx = payments.pool.begin().await.expect("begin");
                let skip = ($p)(&format!($skip, payments.table));
                let insert = sqlx::query(AssertSqlSafe(skip.clone()))
                    .bind("A-1")
                    .bind(5_i64);
                assert_eq!(
                    $insert_once(&mut *tx, insert).await.expect("duplicate"),
                    Inserted::Duplicate
                );
                let insert = sqlx::query(AssertSqlSafe(skip)).bind("A-2").bind(5_i64);
                assert_eq!(
                    $insert_once(&mut *tx, insert).await.expect("new"),
                    Inserted::New
                );
                tx.commit()
                    .await
                    .expect("the transaction goes on after the duplicate");
                assert_eq!(payments.rows().await, 2);
            }
        }
    };
}

insert_once_tests!(
    postgres,
    sqlx::Postgres,
    idem_runtime::postgres::insert_once,
    |table| idem_tests::sql_servers::postgres_scratch(&table).await,
    idem_tests::sql_servers::numbered,
    "INSERT INTO {} (order_no, amount) VALUES (?, ?) ON CONFLICT DO NOTHING"
);

insert_once_tests!(
    mysql,
    sqlx::MySql,
    idem_runtime::mysql::insert_once,
    |table| idem_tests::sql_servers::mysql_scratch(&table).await,
    idem_tests::sql_servers::question_marks,
    "INSERT IGNORE INTO {} (order_no, amount) VALUES (?, ?)"
);

insert_once_tests!(
    sqlite,
    sqlx::Sqlite,
    idem_runtime::sqlite::insert_once,
    |table| idem_tests::sql_servers::sqlite_scratch(&table).await,
    idem_tests::sql_servers::question_marks,
    "INSERT INTO {} (order_no, amount) VALUES (?, ?) ON CONFLICT DO NOTHING"
);
