//! The `tx` strategy on PostgreSQL, MySQL / MariaDB and SQLite: the claim, the business write
//! and the stored result in one transaction, driven through `idem_runtime::tx::TxStore`.
//!
//! The business is the seed articles' account: `{id = 1, money = 200}`, debited 50 by a
//! message that may arrive many times, at once, or after a crash.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a debit returns, and what duplicates get back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    account: i64,
    debited: i64,
    balance: i64,
}

/// A part of a result that its JSON form leaves out: it decodes with `note` empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Noted {
    balance: i64,
    #[serde(skip)]
    note: String,
}

/// What a handler returning `(Some(None), Some(()), Noted { note, .. })` hands back: the value
/// its JSON form decodes to, on the first call as on every replay.
type Lossy = (Option<Option<i64>>, Option<()>, Noted);

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// The same tests for each database: `$store` is the concrete store, `$db` its database,
/// `$make` builds `Option<(Guarded store, guard)>` for a table name, `$p` turns a statement
/// written with `?` into the database's placeholders, `$reads_first` says whether a
/// transaction may read before its handler claims (not on SQLite, whose deferred transactions
/// cannot then take the write lock).
macro_rules! tx_tests {
    ($name:ident, $store:ty, $db:ty, |$accounts:ident| $make:expr, $p:expr, $reads_first:expr) => {
        mod $name {
            use std::sync::Arc;

            use idem_runtime::tx::{TxClaim, TxStore};
            use idem_runtime::{Error, RecordKey, idempotent};
            use idem_tests::Guarded;
            use sqlx::{AssertSqlSafe, Transaction};
            use tokio::sync::{Barrier, Notify};

            use super::{LEASE, Lossy, Noted, Receipt, TTL};

            type Db = $db;

            /// A store and a table of accounts holding `{id = 1, money = 200}`, both removed
            /// when dropped.
            struct Bank {
                store: Guarded<$store>,
                accounts: String,
                _drop: Box<dyn std::any::Any + Send + Sync>,
            }

            async fn bank() -> Option<Arc<Bank>> {
                let $accounts = idem_tests::servers::unique_name("accounts");
                let (store, drop) = $make?;
                let accounts = $accounts;
                let bank = Bank {
                    store,
                    accounts,
                    _drop: drop,
                };
                bank.run(&format!(
                    "CREATE TABLE {} (id BIGINT PRIMARY KEY, money BIGINT NOT NULL)",
                    bank.accounts
                ))
                .await;
                bank.run(&format!(
                    "INSERT INTO {} (id, money) VALUES (1, 200)",
                    bank.accounts
                ))
                .await;
                Some(Arc::new(bank))
            }

            impl Bank {
                fn store(&self) -> &$store {
                    &self.store.store
                }

                async fn run(&self, statement: &str) {
                    sqlx::raw_sql(AssertSqlSafe(statement.to_owned()))
                        .execute(self.store().pool())
                        .await
                        .unwrap_or_else(|error| panic!("{statement}: {error}"));
                }

                async fn money(&self) -> i64 {
                    let statement = format!("SELECT money FROM {} WHERE id = 1", self.accounts);
                    sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(self.store().pool())
                        .await
                        .expect("read the account")
                }

                /// The body: debits `amount` from account 1 in `tx`, or fails after debiting
                /// when `fail` is set.
                async fn debit_in(
                    &self,
                    tx: &mut Transaction<'static, Db>,
                    amount: i64,
                    fail: bool,
                ) -> Result<Receipt, Error> {
                    let statement = ($p)(&format!(
                        "UPDATE {} SET money = money - ? WHERE id = ?",
                        self.accounts
                    ));
                    sqlx::query(AssertSqlSafe(statement))
                        .bind(amount)
                        .bind(1_i64)
                        .execute(&mut **tx)
                        .await
                        .map_err(|error| {
                            Error::Store(idem_runtime::StoreError::new("test", error))
                        })?;
                    if fail {
                        return Err(Error::EmptyScope); // any error of the body
                    }
                    let statement = format!("SELECT money FROM {} WHERE id = 1", self.accounts);
                    let balance: i64 = sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(&mut **tx)
                        .await
                        .map_err(|error| {
                            Error::Store(idem_runtime::StoreError::new("test", error))
                        })?;
                    Ok(Receipt {
                        account: 1,
                        debited: amount,
                        balance,
                    })
                }

                /// One delivery of the debit message `key`, the way the `tx` strategy runs it:
                /// claim in the transaction, body, record, commit.
                async fn deliver(
                    &self,
                    key: &str,
                    fail: bool,
                    hold: Option<&Notify>,
                ) -> Result<Receipt, Error> {
                    let key = RecordKey::new("tests.tx.debit", key)?;
                    let store = self.store();
                    let mut tx = store.pool().begin().await.map_err(|error| {
                        Error::Store(idem_runtime::StoreError::new("test", error))
                    })?;
                    let lease = match store.claim_in(&mut tx, &key, None, LEASE).await? {
                        TxClaim::Completed(stored) => {
                            return serde_json::from_slice(&stored).map_err(|error| {
                                Error::Decode {
                                    scope: key.scope().to_owned(),
                                    key: key.key().to_owned(),
                                    source: Box::new(error),
                                }
                            });
                        }
                        TxClaim::Run(lease) => lease,
                    };
                    let outcome = self.debit_in(&mut tx, 50, fail).await;
                    if let Some(hold) = hold {
                        hold.notify_one();
                        std::future::pending::<()>().await; // "crash" here
                    }
                    match outcome {
                        Ok(receipt) => {
                            let stored =
                                serde_json::to_vec(&receipt).expect("a receipt serializes");
                            store
                                .complete_in(&mut tx, &key, &lease, &stored, TTL)
                                .await?;
                            tx.commit().await.map_err(|error| {
                                Error::Store(idem_runtime::StoreError::new("test", error))
                            })?;
                            Ok(receipt)
                        }
                        Err(error) => {
                            store.abandon_in(&mut tx, &lease).await?;
                            tx.commit().await.map_err(|error| {
                                Error::Store(idem_runtime::StoreError::new("test", error))
                            })?;
                            Err(error)
                        }
                    }
                }
            }

            /// The same debit as a handler: `strategy = "tx"` claims the key in `tx`, runs
            /// the body on it and records the receipt there; the caller commits.
            #[idempotent(key = order_no, store = store, strategy = "tx", tx = tx, scope = "tests.tx.macro")]
            async fn debit(
                store: &$store,
                tx: &mut Transaction<'_, Db>,
                accounts: &str,
                fail: bool,
                order_no: &str,
            ) -> Result<Receipt, Error> {
                let statement = ($p)(&format!("UPDATE {accounts} SET money = money - ? WHERE id = ?"));
                sqlx::query(AssertSqlSafe(statement))
                    .bind(50_i64)
                    .bind(1_i64)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                if fail {
                    return Err(Error::EmptyScope); // any error of the body
                }
                let statement = format!("SELECT money FROM {accounts} WHERE id = 1");
                let balance: i64 = sqlx::query_scalar(AssertSqlSafe(statement))
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                Ok(Receipt {
                    account: 1,
                    debited: 50,
                    balance,
                })
            }

            impl Bank {
                /// One delivery through the `#[idempotent(strategy = "tx")]` handler, committed
                /// whatever it returns (its failure is rolled back to its savepoint).
                async fn deliver_to_handler(&self, order_no: &str, fail: bool) -> Result<Receipt, Error> {
                    let store = self.store();
                    let mut tx = store.pool().begin().await.expect("begin");
                    let outcome = debit(store, &mut tx, &self.accounts, fail, order_no).await;
                    tx.commit().await.expect("commit");
                    outcome
                }
            }

            /// The handler written with the attribute: twice, then 64 at once → one debit.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn handler_debits_once() {
                let Some(bank) = bank().await else {
                    return;
                };
                assert_eq!(bank.deliver_to_handler("order-1", false).await.expect("first"), FIRST);
                assert_eq!(bank.deliver_to_handler("order-1", false).await.expect("again"), FIRST);
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let bank = bank.clone();
                        tokio::spawn(async move { bank.deliver_to_handler("order-1", false).await })
                    })
                    .collect();
                for task in tasks {
                    assert_eq!(task.await.expect("task").expect("replay"), FIRST);
                }
                assert_eq!(bank.money().await, 150);
            }

            /// The attribute's handler failing after its write: rolled back, retried once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn handler_failure_rolls_back_its_writes() {
                let Some(bank) = bank().await else {
                    return;
                };
                let failed = bank.deliver_to_handler("order-1", true).await;
                assert!(matches!(failed, Err(Error::EmptyScope)), "{failed:?}");
                assert_eq!(bank.money().await, 200);
                assert_eq!(bank.deliver_to_handler("order-1", false).await.expect("retry"), FIRST);
                assert_eq!(bank.money().await, 150);
            }

            /// A transaction that read before its handler ran, while a duplicate committed the
            /// debit: the claim still finds the committed record and replays it (at MySQL's
            /// `REPEATABLE READ` too, where the transaction's snapshot predates the commit).
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn duplicate_in_a_transaction_that_read_first_replays() {
                if !$reads_first {
                    return; // SQLite: begin with `BEGIN IMMEDIATE` instead (see `idem_runtime::tx`)
                }
                let Some(bank) = bank().await else {
                    return;
                };
                let store = bank.store();
                let mut late = store.pool().begin().await.expect("begin");
                let statement = format!("SELECT money FROM {} WHERE id = 1", bank.accounts);
                let seen: i64 = sqlx::query_scalar(AssertSqlSafe(statement))
                    .fetch_one(&mut *late)
                    .await
                    .expect("read first");
                assert_eq!(seen, 200);
                assert_eq!(bank.deliver_to_handler("order-1", false).await.expect("first"), FIRST);
                let replayed = debit(store, &mut late, &bank.accounts, false, "order-1").await;
                late.commit().await.expect("commit");
                assert_eq!(replayed.expect("the late duplicate replays"), FIRST);
                assert_eq!(bank.money().await, 150);
            }

            /// The debit, returning a result whose JSON form decodes to another value.
            #[idempotent(key = order_no, store = store, strategy = "tx", tx = tx, scope = "tests.tx.lossy")]
            async fn debit_lossy(
                store: &$store,
                tx: &mut Transaction<'_, Db>,
                accounts: &str,
                order_no: &str,
            ) -> Result<Lossy, Error> {
                let statement = ($p)(&format!("UPDATE {accounts} SET money = money - ? WHERE id = ?"));
                sqlx::query(AssertSqlSafe(statement))
                    .bind(50_i64)
                    .bind(1_i64)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                let statement = format!("SELECT money FROM {accounts} WHERE id = 1");
                let balance: i64 = sqlx::query_scalar(AssertSqlSafe(statement))
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                let note = "set by the body".to_owned();
                Ok((Some(None), Some(()), Noted { balance, note }))
            }

            /// `Some(None)`, `Some(())` and a `#[serde(skip)]` field come back from the first
            /// call as every replay decodes them (`None`, `None`, an empty note), and the
            /// account is debited once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn handler_first_caller_gets_what_replays_get() {
                let Some(bank) = bank().await else {
                    return;
                };
                let deliver = || async {
                    let store = bank.store();
                    let mut tx = store.pool().begin().await.expect("begin");
                    let outcome = debit_lossy(store, &mut tx, &bank.accounts, "order-1").await;
                    tx.commit().await.expect("commit");
                    outcome
                };
                let decoded = (None, None, Noted { balance: 150, note: String::new() });
                let first = deliver().await.expect("first");
                assert_eq!(first, decoded, "the first caller gets the decoded result");
                for _ in 0..2 {
                    assert_eq!(deliver().await.expect("replay"), first);
                }
                assert_eq!(bank.money().await, 150, "the body ran once");
            }

            /// A fee charged by a handler of its own, called from inside another handler.
            #[idempotent(key = order_no, store = store, strategy = "tx", tx = tx, scope = "tests.tx.fee")]
            async fn fee(
                store: &$store,
                tx: &mut Transaction<'_, Db>,
                accounts: &str,
                order_no: &str,
            ) -> Result<i64, Error> {
                let statement = ($p)(&format!("UPDATE {accounts} SET money = money - ? WHERE id = 1"));
                sqlx::query(AssertSqlSafe(statement))
                    .bind(10_i64)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                Ok(10)
            }

            /// Debits 50 and a fee of 10 (a nested `tx` handler on the same transaction), then
            /// fails if told to.
            #[idempotent(key = order_no, store = store, strategy = "tx", tx = tx, scope = "tests.tx.pay")]
            async fn pay_with_fee(
                store: &$store,
                tx: &mut Transaction<'_, Db>,
                accounts: &str,
                fail: bool,
                order_no: &str,
            ) -> Result<i64, Error> {
                let statement = ($p)(&format!("UPDATE {accounts} SET money = money - ? WHERE id = 1"));
                sqlx::query(AssertSqlSafe(statement))
                    .bind(50_i64)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| Error::Store(idem_runtime::StoreError::new("test", error)))?;
                let fee = fee(store, tx, accounts, order_no).await?;
                if fail {
                    return Err(Error::EmptyScope); // any error of the body
                }
                Ok(50 + fee)
            }

            /// Nested handlers commit or roll back together: a failing outer body undoes the
            /// inner handler's debit and record too (each claim has a savepoint of its own).
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn nested_handlers_commit_or_roll_back_together() {
                let Some(bank) = bank().await else {
                    return;
                };
                let store = bank.store();
                let deliver = |fail: bool| {
                    let bank = bank.clone();
                    async move {
                        let store = bank.store();
                        let mut tx = store.pool().begin().await.expect("begin");
                        let outcome = pay_with_fee(store, &mut tx, &bank.accounts, fail, "order-9").await;
                        tx.commit().await.expect("commit");
                        outcome
                    }
                };
                let failed = deliver(true).await;
                assert!(matches!(failed, Err(Error::EmptyScope)), "{failed:?}");
                assert_eq!(bank.money().await, 200, "the outer failure undid both debits");
                assert_eq!(deliver(false).await.expect("redelivery"), 60);
                assert_eq!(bank.money().await, 140);
                assert_eq!(deliver(false).await.expect("duplicate"), 60);
                assert_eq!(bank.money().await, 140);
                let _ = store;
            }

            const FIRST: Receipt = Receipt {
                account: 1,
                debited: 50,
                balance: 150,
            };

            /// The seed scenario: the account is debited once however often the message comes.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn account_delivered_twice_is_debited_once() {
                let Some(bank) = bank().await else {
                    return;
                };
                assert_eq!(
                    bank.deliver("pay-1", false, None).await.expect("first"),
                    FIRST
                );
                assert_eq!(
                    bank.deliver("pay-1", false, None).await.expect("duplicate"),
                    FIRST,
                    "the duplicate gets the stored receipt"
                );
                assert_eq!(bank.money().await, 150);
                assert_eq!(
                    bank.deliver("pay-2", false, None)
                        .await
                        .expect("another")
                        .balance,
                    100
                );
            }

            /// 64 deliveries at once, each in its own transaction: one debit; the others wait
            /// for it to commit and replay its receipt.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_deliveries_debit_once() {
                let Some(bank) = bank().await else {
                    return;
                };
                let start = Arc::new(Barrier::new(64));
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (bank, start) = (bank.clone(), start.clone());
                        tokio::spawn(async move {
                            start.wait().await;
                            bank.deliver("pay-1", false, None).await
                        })
                    })
                    .collect();
                for task in tasks {
                    assert_eq!(task.await.expect("task").expect("delivery"), FIRST);
                }
                assert_eq!(bank.money().await, 150);
            }

            /// A body that fails after its write leaves nothing: the write and the claim are
            /// rolled back to the savepoint, and the redelivery debits once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn failed_body_leaves_no_partial_effect() {
                let Some(bank) = bank().await else {
                    return;
                };
                let failed = bank.deliver("pay-1", true, None).await;
                assert!(matches!(failed, Err(Error::EmptyScope)), "{failed:?}");
                assert_eq!(bank.money().await, 200, "the failed debit was undone");
                assert_eq!(
                    bank.deliver("pay-1", false, None).await.expect("retry"),
                    FIRST
                );
                assert_eq!(bank.money().await, 150);
            }

            /// A delivery dropped mid-body (its transaction never commits) leaves nothing, and
            /// the redelivery debits once, without waiting for a lease.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn dropped_delivery_leaves_no_partial_effect() {
                let Some(bank) = bank().await else {
                    return;
                };
                let written = Arc::new(Notify::new());
                let crashing = tokio::spawn({
                    let (bank, written) = (bank.clone(), written.clone());
                    async move { bank.deliver("pay-1", false, Some(&written)).await }
                });
                written.notified().await;
                crashing.abort();
                assert!(crashing.await.expect_err("aborted").is_cancelled());
                let redelivered = tokio::time::timeout(
                    std::time::Duration::from_secs(20),
                    bank.deliver("pay-1", false, None),
                )
                .await
                .expect("the redelivery waited on the dropped transaction");
                assert_eq!(redelivered.expect("redelivery"), FIRST);
                assert_eq!(bank.money().await, 150);
            }
        }
    };
}

tx_tests!(
    postgres,
    idem_runtime::postgres::PostgresStore,
    sqlx::Postgres,
    |accounts| {
        use idem_tests::sql_servers::{DropTable, Server, postgres_pool, postgres_store};
        let store = postgres_store(postgres_pool().await?, idem_runtime::clock::SystemClock).await;
        let drop = DropTable {
            server: Server::Postgres,
            table: accounts.clone(),
        };
        Some((store, Box::new(drop)))
    },
    idem_tests::sql_servers::numbered,
    true
);

tx_tests!(
    mysql,
    idem_runtime::mysql::MySqlStore,
    sqlx::MySql,
    |accounts| {
        use idem_tests::sql_servers::{DropTable, Server, mysql_pool, mysql_store};
        let store = mysql_store(mysql_pool().await?, idem_runtime::clock::SystemClock).await;
        let drop = DropTable {
            server: Server::Mysql,
            table: accounts.clone(),
        };
        Some((store, Box::new(drop)))
    },
    idem_tests::sql_servers::question_marks,
    true
);

tx_tests!(
    sqlite,
    idem_runtime::sqlite::SqliteStore,
    sqlx::Sqlite,
    |accounts| {
        // A file shared by a pool of several connections; the accounts table goes with it.
        let store =
            idem_tests::sqlite_file::FileStore::open("tx", idem_runtime::clock::SystemClock).await;
        Some((store, Box::new(())))
    },
    idem_tests::sql_servers::question_marks,
    false
);

/// MySQL rolls the whole transaction back when a claim inside it deadlocks. The claim's error
/// must say so (roll back, do not commit) rather than read like a skipped message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_deadlock_in_a_claim_says_the_transaction_is_lost() {
    use std::sync::Arc;

    use idem_runtime::RecordKey;
    use idem_runtime::tx::{TxClaim, TxStore};
    use tokio::sync::Barrier;

    let Some(pool) = idem_tests::sql_servers::mysql_pool().await else {
        return;
    };
    let store = Arc::new(
        idem_tests::sql_servers::mysql_store(pool, idem_runtime::clock::SystemClock).await,
    );
    let barrier = Arc::new(Barrier::new(2));
    let tasks: Vec<_> = [["a", "b"], ["b", "a"]]
        .into_iter()
        .map(|order| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                let store = &store.store;
                let mut tx = store.pool().begin().await.expect("begin");
                let mut errors = Vec::new();
                for (n, name) in order.iter().enumerate() {
                    let key = RecordKey::new("tests.tx.deadlock", name).expect("key");
                    let claimed = store.claim_in(&mut tx, &key, None, LEASE).await;
                    if n == 0 {
                        barrier.wait().await;
                    }
                    match claimed {
                        Ok(TxClaim::Run(claim)) => {
                            store
                                .complete_in(&mut tx, &key, &claim, b"1", TTL)
                                .await
                                .expect("complete");
                        }
                        Ok(other) => panic!("{name}: {other:?}"),
                        Err(error) => errors.push(error.to_string()),
                    }
                }
                if errors.is_empty() {
                    tx.commit().await.expect("commit");
                } else {
                    tx.rollback().await.expect("roll back");
                }
                errors
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("task"));
    }
    assert_eq!(errors.len(), 1, "one of the two deadlocks: {errors:?}");
    assert!(
        errors[0].contains("Deadlock") && errors[0].contains("roll it back, do not commit it"),
        "{}",
        errors[0]
    );
}

/// On PostgreSQL a claim statement that fails aborts the transaction; rolling back to the
/// claim's savepoint makes it usable again, and the error is the claim's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_failed_claim_leaves_the_transaction_usable() {
    use idem_runtime::RecordKey;
    use idem_runtime::tx::TxStore;

    let Some(pool) = idem_tests::sql_servers::postgres_pool().await else {
        return;
    };
    let store = idem_runtime::postgres::PostgresStore::new(pool.clone())
        .with_table("idem_no_such_table")
        .expect("a plain name");
    let mut tx = pool.begin().await.expect("begin");
    let key = RecordKey::new("tests.tx.missing", "k").expect("key");
    let failed = store.claim_in(&mut tx, &key, None, LEASE).await;
    assert!(
        matches!(&failed, Err(idem_runtime::Error::Store(error)) if error.to_string().contains("idem_no_such_table")),
        "{failed:?}"
    );
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .expect("the transaction is usable after the failed claim");
    assert_eq!(one, 1);
    tx.rollback().await.expect("roll back");
}

/// `claim_in_within` on PostgreSQL and MariaDB: a claim behind another transaction's
/// uncommitted claim of the key gives up after its wait with `InProgress` (instead of holding
/// its connection until the other commits), the wait's bound is lifted again for the rest of
/// the transaction, and once the other commits a claim replays.
macro_rules! claim_within_bounds_the_wait {
    ($name:ident, $pool:path, $store:path, $set:literal, $show:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            use std::time::{Duration, Instant};

            use idem_runtime::tx::{TxClaim, TxStore};
            use idem_runtime::{Error, RecordKey};

            let Some(pool) = $pool().await else {
                return;
            };
            let store = $store(pool, idem_runtime::clock::SystemClock).await;
            let store = &store.store;
            let key = RecordKey::new("tests.tx.within", "w-1").expect("key");
            let mut first = store.pool().begin().await.expect("begin");
            let TxClaim::Run(claim) = store
                .claim_in(&mut first, &key, None, LEASE)
                .await
                .expect("the first claim")
            else {
                panic!("a new key is claimed");
            };

            let mut copy = store.pool().begin().await.expect("begin");
            // A value of the application's own, which the claim must put back.
            sqlx::raw_sql($set)
                .execute(&mut *copy)
                .await
                .expect("the application's timeout");
            let before: String = sqlx::query_scalar($show)
                .fetch_one(&mut *copy)
                .await
                .expect("the timeout");
            let started = Instant::now();
            let waited = store
                .claim_in_within(&mut copy, &key, None, LEASE, Duration::from_millis(800))
                .await;
            let took = started.elapsed();
            assert!(
                matches!(waited, Err(Error::InProgress { .. })),
                "{waited:?}"
            );
            assert!(
                took >= Duration::from_millis(700) && took < Duration::from_secs(10),
                "waited {took:?}"
            );
            let after: String = sqlx::query_scalar($show)
                .fetch_one(&mut *copy)
                .await
                .expect("the timeout, after");
            assert_eq!(after, before, "the bound is lifted after the claim");
            assert!(before.starts_with('7'), "{before}");
            copy.rollback().await.expect("rollback");

            store
                .complete_in(&mut first, &key, &claim, b"\"done\"", TTL)
                .await
                .expect("complete");
            first.commit().await.expect("commit");
            let mut later = store.pool().begin().await.expect("begin");
            let replayed = store
                .claim_in_within(&mut later, &key, None, LEASE, Duration::from_millis(800))
                .await
                .expect("a claim after the commit");
            assert_eq!(replayed, TxClaim::Completed(b"\"done\"".to_vec()));
        }
    };
}

claim_within_bounds_the_wait!(
    postgres_claim_within_bounds_the_wait,
    idem_tests::sql_servers::postgres_pool,
    idem_tests::sql_servers::postgres_store,
    "SET LOCAL lock_timeout = '7s'",
    "SELECT current_setting('lock_timeout')"
);

claim_within_bounds_the_wait!(
    mysql_claim_within_bounds_the_wait,
    idem_tests::sql_servers::mysql_pool,
    idem_tests::sql_servers::mysql_store,
    "SET SESSION innodb_lock_wait_timeout = 7",
    "SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS CHAR)"
);
