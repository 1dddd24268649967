//! Optimistic locking (`idem_runtime::version` and `strategy = "version"`) on PostgreSQL,
//! MySQL / MariaDB and SQLite: `UPDATE accounts SET money = money - ?, version = version + 1
//! WHERE id = ? AND version = ?` in the caller's transaction, and what the row's version says
//! when nothing changed.
//!
//! The seed scenario: the account `{id = 1, money = 1000, version = 1}` receives the message
//! `{id = 1, money = 200, version = 1}` ("debit 200") twice; it is debited once.

/// The message of the seed article: debit `money` from account `id`, written against `version`.
#[derive(Clone, Debug)]
pub struct Debit {
    /// The account.
    pub id: i64,
    /// How much to debit.
    pub money: i64,
    /// The account's version the debit was written against.
    pub version: i64,
}

/// The same tests for each database: `$db`, `$pool` giving `Option<(pool, guard)>` for a table
/// name, and `$p` numbering `?` placeholders where needed.
macro_rules! version_tests {
    ($name:ident, $db:ty, |$table:ident| $pool:expr, $p:expr, $placeholders:expr) => {
        mod $name {
            use std::sync::Arc;
            use std::time::Duration;

            use idem_runtime::version::{Stale, Update, Versioned, finish_in, update_in};
            use idem_runtime::{Error, idempotent};
            use sqlx::{AssertSqlSafe, Pool};
            use tokio::sync::{Barrier, Mutex, Notify};

            use super::Debit;

            /// The table the attribute names (a literal, so one per database, each test on a
            /// row of its own).
            const ACCOUNTS: &str = "idem_version_accounts";

            /// Creating `ACCOUNTS` concurrently races in PostgreSQL's catalog: one at a time.
            static CREATE: Mutex<()> = Mutex::const_new(());

            /// A pool, the account `id` at `{money = 1000, version = 1}` in `ACCOUNTS`, and a
            /// fresh ledger table the body writes to.
            struct Bank {
                pool: Pool<$db>,
                id: i64,
                ledger: String,
                _drop: Box<dyn std::any::Any + Send + Sync>,
            }

            async fn bank(id: i64) -> Option<Arc<Bank>> {
                let $table = idem_tests::servers::unique_name("ledger");
                let ledger = $table.clone();
                let (pool, drop) = $pool?;
                let bank = Bank {
                    pool,
                    id,
                    ledger,
                    _drop: drop,
                };
                {
                    let _one = CREATE.lock().await;
                    bank.run(format!(
                        "CREATE TABLE IF NOT EXISTS {ACCOUNTS} (id BIGINT PRIMARY KEY, money BIGINT NOT NULL, version BIGINT NOT NULL)"
                    ))
                    .await;
                }
                for statement in [
                    format!("DELETE FROM {ACCOUNTS} WHERE id = {id}"),
                    format!("INSERT INTO {ACCOUNTS} (id, money, version) VALUES ({id}, 1000, 1)"),
                    format!("CREATE TABLE {} (account BIGINT NOT NULL, amount BIGINT NOT NULL)", bank.ledger),
                ] {
                    bank.run(statement).await;
                }
                Some(Arc::new(bank))
            }

            impl Bank {
                async fn run(&self, statement: String) {
                    sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                        .execute(&self.pool)
                        .await
                        .unwrap_or_else(|error| panic!("{statement}: {error}"));
                }

                async fn scalar(&self, statement: String) -> i64 {
                    sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(&self.pool)
                        .await
                        .expect("read")
                }

                /// The account's `(money, version)`.
                async fn account(&self) -> (i64, i64) {
                    let id = self.id;
                    (
                        self.scalar(format!("SELECT money FROM {ACCOUNTS} WHERE id = {id}")).await,
                        self.scalar(format!("SELECT version FROM {ACCOUNTS} WHERE id = {id}")).await,
                    )
                }

                async fn ledger_rows(&self) -> i64 {
                    self.scalar(format!("SELECT COUNT(*) FROM {}", self.ledger)).await
                }

                /// The seed message for this bank's account.
                fn debit(&self, version: i64) -> Debit {
                    Debit {
                        id: self.id,
                        money: 200,
                        version,
                    }
                }

                /// One delivery through the attribute, in a transaction committed when the
                /// handler returned.
                async fn deliver(&self, msg: Debit, fail: bool, hold: Option<&Notify>) -> Result<Versioned<i64>, Error> {
                    let mut tx = self.pool.begin().await.expect("begin");
                    let outcome = on_debit(&mut tx, &self.ledger, fail, hold, msg).await;
                    tx.commit().await.expect("commit");
                    outcome
                }

                async fn deliver_strict(&self, msg: Debit) -> Result<Versioned<()>, Error> {
                    let mut tx = self.pool.begin().await.expect("begin");
                    let outcome = on_debit_strict(&mut tx, msg).await;
                    tx.commit().await.expect("commit");
                    outcome
                }
            }

            /// The seed handler as users write it: the debit is the versioned update, the
            /// ledger row is the body's own write in the same transaction.
            #[idempotent(
                key = "id",
                strategy = "version",
                table = "idem_version_accounts",
                set(money -= msg.money),
                tx = tx,
            )]
            async fn on_debit(
                tx: &mut sqlx::Transaction<'_, $db>,
                ledger: &str,
                fail: bool,
                hold: Option<&Notify>,
                msg: Debit,
            ) -> Result<Versioned<i64>, Error> {
                let insert = ($p)(&format!("INSERT INTO {ledger} (account, amount) VALUES (?, ?)"));
                sqlx::query(AssertSqlSafe(insert))
                    .bind(msg.id)
                    .bind(msg.money)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                if let Some(hold) = hold {
                    hold.notify_one();
                    std::future::pending::<()>().await;
                }
                if fail {
                    return Err(Error::EmptyScope); // any error of the body
                }
                Ok(msg.money)
            }

            /// The same update where a row past the version is a conflict, with every column
            /// named.
            #[idempotent(
                key = msg.id,
                strategy = "version",
                table = "idem_version_accounts",
                id_column = "id",
                version = msg.version,
                version_column = "version",
                set(money -= msg.money),
                stale = "conflict",
                tx = tx,
            )]
            async fn on_debit_strict(
                tx: &mut sqlx::Transaction<'_, $db>,
                msg: Debit,
            ) -> Result<Versioned<()>, Error> {
                let _ = (&tx, &msg);
                Ok(())
            }

            /// The seed scenario: the same message twice → debited once, the second is a
            /// duplicate that reports the row's version.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn seed_debit_delivered_twice_is_applied_once() {
                let Some(bank) = bank(1).await else {
                    return;
                };
                let first = bank.deliver(bank.debit(1), false, None).await.expect("first");
                assert_eq!(first, Versioned::Applied(200));
                assert_eq!(bank.account().await, (800, 2));
                let again = bank.deliver(bank.debit(1), false, None).await.expect("duplicate");
                assert_eq!(again, Versioned::AlreadyApplied { current: 2 });
                assert_eq!(bank.account().await, (800, 2), "debited once");
                assert_eq!(bank.ledger_rows().await, 1, "the body ran once");
                // The next change, written against version 2, applies.
                let next = bank.deliver(bank.debit(2), false, None).await.expect("next");
                assert_eq!(next, Versioned::Applied(200));
                assert_eq!(bank.account().await, (600, 3));
            }

            /// 64 deliveries at once, each in its own transaction: one applies, the others
            /// waited on the row lock and see the version it left.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_deliveries_apply_once() {
                let Some(bank) = bank(2).await else {
                    return;
                };
                let start = Arc::new(Barrier::new(64));
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (bank, start) = (bank.clone(), start.clone());
                        tokio::spawn(async move {
                            start.wait().await;
                            bank.deliver(bank.debit(1), false, None).await
                        })
                    })
                    .collect();
                let mut applied = 0;
                for task in tasks {
                    match task.await.expect("task").expect("delivery") {
                        Versioned::Applied(amount) => {
                            assert_eq!(amount, 200);
                            applied += 1;
                        }
                        Versioned::AlreadyApplied { current } => assert_eq!(current, 2),
                    }
                }
                assert_eq!(applied, 1);
                assert_eq!(bank.account().await, (800, 2));
                assert_eq!(bank.ledger_rows().await, 1);
            }

            /// A body that fails rolls the update back with its writes: the redelivery
            /// applies it once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn failed_body_leaves_the_row_where_it_was() {
                let Some(bank) = bank(3).await else {
                    return;
                };
                let failed = bank.deliver(bank.debit(1), true, None).await;
                assert!(matches!(failed, Err(Error::EmptyScope)), "{failed:?}");
                assert_eq!(bank.account().await, (1000, 1));
                assert_eq!(bank.ledger_rows().await, 0);
                let retried = bank.deliver(bank.debit(1), false, None).await.expect("retry");
                assert_eq!(retried, Versioned::Applied(200));
                assert_eq!(bank.account().await, (800, 2));
                assert_eq!(bank.ledger_rows().await, 1);
            }

            /// A delivery dropped mid-body (its transaction never commits) leaves nothing; the
            /// redelivery waits for the row and debits once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn dropped_delivery_leaves_no_partial_effect() {
                let Some(bank) = bank(4).await else {
                    return;
                };
                let written = Arc::new(Notify::new());
                let crashing = tokio::spawn({
                    let (bank, written) = (bank.clone(), written.clone());
                    async move { bank.deliver(bank.debit(1), false, Some(&written)).await }
                });
                written.notified().await;
                crashing.abort();
                assert!(crashing.await.expect_err("aborted").is_cancelled());
                let redelivered = tokio::time::timeout(
                    Duration::from_secs(20),
                    bank.deliver(bank.debit(1), false, None),
                )
                .await
                .expect("the redelivery waited on the dropped transaction");
                assert_eq!(redelivered.expect("redelivery"), Versioned::Applied(200));
                assert_eq!(bank.account().await, (800, 2));
                assert_eq!(bank.ledger_rows().await, 1);
            }

            /// The three ways of changing nothing are told apart: past the version (a conflict
            /// when asked), behind it, no row.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn stale_ahead_and_missing_are_told_apart() {
                let Some(bank) = bank(5).await else {
                    return;
                };
                assert_eq!(
                    bank.deliver_strict(bank.debit(1)).await.expect("first"),
                    Versioned::Applied(())
                );
                let stale = bank.deliver_strict(bank.debit(1)).await;
                assert!(
                    matches!(stale, Err(Error::StaleVersion { table: "idem_version_accounts", expected: 1, current: 2, .. })),
                    "{stale:?}"
                );
                let ahead = bank.deliver(bank.debit(5), false, None).await;
                assert!(
                    matches!(ahead, Err(Error::VersionAhead { expected: 5, current: 2, .. })),
                    "{ahead:?}"
                );
                let missing = bank
                    .deliver(Debit { id: -5, money: 200, version: 1 }, false, None)
                    .await;
                assert!(matches!(missing, Err(Error::RowMissing { .. })), "{missing:?}");
                assert_eq!(bank.account().await, (800, 2), "only the first debit");
                assert_eq!(bank.ledger_rows().await, 0, "the bodies that write did not run");
            }

            /// By hand: the statement with the database's placeholders, `set`, `add` and
            /// `subtract` in one update, a narrower `INTEGER` version column, and names that
            /// are not plain identifiers refused before anything runs.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn update_by_hand() {
                let Some(bank) = bank(6).await else {
                    return;
                };
                let items = format!("{}_items", bank.ledger);
                let items: &'static str = Box::leak(items.into_boxed_str());
                bank.run(format!(
                    "CREATE TABLE {items} (sku VARCHAR(16) PRIMARY KEY, name VARCHAR(32) NOT NULL, stock BIGINT NOT NULL, sold BIGINT NOT NULL, rev INTEGER NOT NULL)"
                ))
                .await;
                bank.run(format!("INSERT INTO {items} (sku, name, stock, sold, rev) VALUES ('A-1', 'old', 10, 0, 7)")).await;
                let update = || {
                    Update::<$db>::table(items)
                        .id_column("sku")
                        .version_column("rev")
                        .set("name", "new")
                        .subtract("stock", 3_i64)
                        .add("sold", 3_i64)
                };
                assert_eq!(
                    update().statement(),
                    ($placeholders)(&format!(
                        "UPDATE {items} SET name = ?, stock = stock - ?, sold = sold + ?, rev = rev + 1 WHERE sku = ? AND rev = ?"
                    ))
                );
                for expected in [Versioned::Applied(()), Versioned::AlreadyApplied { current: 8 }] {
                    let mut tx = bank.pool.begin().await.expect("begin");
                    let done = match update_in(&mut tx, update(), "A-1", 7, Stale::Duplicate)
                        .await
                        .expect("update")
                    {
                        Versioned::Applied(pending) => {
                            finish_in(&mut tx, pending, true).await.expect("finish");
                            Versioned::Applied(())
                        }
                        Versioned::AlreadyApplied { current } => Versioned::AlreadyApplied { current },
                    };
                    tx.commit().await.expect("commit");
                    assert_eq!(done, expected);
                }
                let row: (String, i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT name, stock, sold FROM {items} WHERE sku = 'A-1'"
                )))
                .fetch_one(&bank.pool)
                .await
                .expect("read the item");
                assert_eq!(row, ("new".to_owned(), 7, 3));

                let mut tx = bank.pool.begin().await.expect("begin");
                for (update, name) in [
                    (Update::<$db>::table("items; DROP TABLE items").set("name", "x"), "items; DROP TABLE items"),
                    (Update::<$db>::table(items).set("na me", "x"), "na me"),
                    (Update::<$db>::table(items).id_column("").set("name", "x"), ""),
                    (Update::<$db>::table(items).version_column("rev").set("rev", 1_i64), "rev"),
                    (Update::<$db>::table(items).set("name", "x").set("name", "y"), "name"),
                    (Update::<$db>::table(items), ""),
                ] {
                    let refused = update_in(&mut tx, update, "A-1", 8, Stale::Duplicate).await;
                    assert!(
                        matches!(&refused, Err(Error::InvalidName { name: refused, .. }) if refused == name),
                        "{refused:?}"
                    );
                }
                tx.rollback().await.expect("rollback");
                bank.run(format!("DROP TABLE {items}")).await;
            }
        }
    };
}

version_tests!(
    postgres,
    sqlx::Postgres,
    |table| idem_tests::sql_servers::postgres_scratch(&table).await,
    idem_tests::sql_servers::numbered,
    idem_tests::sql_servers::numbered
);

version_tests!(
    mysql,
    sqlx::MySql,
    |table| idem_tests::sql_servers::mysql_scratch(&table).await,
    idem_tests::sql_servers::question_marks,
    idem_tests::sql_servers::question_marks
);

version_tests!(
    sqlite,
    sqlx::Sqlite,
    |table| idem_tests::sql_servers::sqlite_scratch(&table).await,
    idem_tests::sql_servers::question_marks,
    super::sqlite_numbered
);

/// `?` placeholders as SQLite's `?1`, `?2`, … (what idem writes there).
fn sqlite_numbered(statement: &str) -> String {
    idem_tests::sql_servers::numbered(statement).replace('$', "?")
}
