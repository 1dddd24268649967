//! Upsert on PostgreSQL, MySQL / MariaDB and SQLite: the first delivery inserts the row, later
//! ones update it, and the caller is told which — a unique-key conflict is a typed outcome, not
//! a database error.

/// The same tests for each database: `$db`, `$pool` gives `Option<(pool, guard)>` for a table
/// name, `$p` numbers `?` placeholders where needed, `$id` is the database's surrogate id
/// column (an `AUTO_INCREMENT` one on MySQL), `$nowhere` a URL no server answers, and
/// `$click` / `$keys_only` the statements expected of [`click`] / [`keys_only`] on the table
/// `activity_stats`; `other_key` is what an upsert keyed by the surrogate id answers (and the row it
/// leaves) when the other unique key conflicts, and `partial_key` what the first and second
/// upsert keyed by only a part of the primary key answer.
/// A value whose encoding fails, in every database: it claims to be a `BIGINT`.
struct Unencodable;

impl<DB: sqlx::Database> sqlx::Type<DB> for Unencodable
where
    i64: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <i64 as sqlx::Type<DB>>::type_info()
    }
}

impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for Unencodable {
    fn encode_by_ref(
        &self,
        _: &mut DB::ArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Err("this value never encodes".into())
    }
}

macro_rules! upsert_tests {
    (
        $name:ident,
        $db:ty,
        |$table:ident| $pool:expr,
        $p:expr,
        id: $id:literal,
        nowhere: $nowhere:literal,
        click: $click:literal,
        keys_only: $keys_only:literal,
        other_key: $other_key:pat => $other_key_row:expr,
        partial_key: $partial_first:pat, $partial_second:pat $(,)?
    ) => {
        mod $name {
            use std::sync::Arc;
            use std::time::Duration;

            use super::Unencodable;
            use idem_runtime::Error;
            use idem_runtime::unique::{Upsert, Upserted};
            use sqlx::{AssertSqlSafe, Pool};
            use tokio::sync::Barrier;

            /// The two shapes of the statistics table: keyed by its primary key, or by a
            /// unique key next to a surrogate (auto-increment) id.
            #[derive(Clone, Copy, Debug)]
            enum Shape {
                PrimaryKey,
                SurrogateId,
            }

            const SHAPES: [Shape; 2] = [Shape::PrimaryKey, Shape::SurrogateId];

            /// A pool and a fresh activity-statistics table, removed when dropped.
            struct Stats {
                pool: Pool<$db>,
                table: &'static str,
                _drop: Box<dyn std::any::Any + Send + Sync>,
            }

            async fn stats(shape: Shape) -> Option<Arc<Stats>> {
                let $table = idem_tests::servers::unique_name("activity_stats");
                let (pool, drop) = $pool?;
                // `Upsert` takes `&'static str` names, as written in code; a test's table name
                // is made at run time, so it is leaked (a few bytes per test).
                let table: &'static str = Box::leak($table.into_boxed_str());
                let columns = "act_code VARCHAR(64) NOT NULL, usr_id BIGINT NOT NULL, \
                               clicks BIGINT NOT NULL, updated_at BIGINT NOT NULL, \
                               created_at BIGINT NOT NULL";
                let create = match shape {
                    Shape::PrimaryKey => {
                        format!("CREATE TABLE {table} ({columns}, PRIMARY KEY (act_code, usr_id))")
                    }
                    Shape::SurrogateId => format!(
                        "CREATE TABLE {table} ({}, {columns}, UNIQUE (act_code, usr_id))",
                        $id
                    ),
                };
                sqlx::raw_sql(AssertSqlSafe(create))
                    .execute(&pool)
                    .await
                    .expect("create the statistics table");
                Some(Arc::new(Stats {
                    pool,
                    table,
                    _drop: drop,
                }))
            }

            /// A click of `usr_id` on `act_code` at `now`, in an order that mixes the roles:
            /// counts it, moves `updated_at`, sets `created_at` only on the first.
            fn click(table: &'static str, act_code: &str, usr_id: i64, now: i64) -> Upsert<$db> {
                Upsert::into_table(table)
                    .key("act_code", act_code.to_owned())
                    .insert_only("created_at", now)
                    .add("clicks", 1_i64)
                    .key("usr_id", usr_id)
                    .set("updated_at", now)
            }

            /// An upsert with nothing to update: every column but the keys is insert-only.
            fn keys_only(table: &'static str, act_code: &str, usr_id: i64, now: i64) -> Upsert<$db> {
                Upsert::into_table(table)
                    .key("act_code", act_code.to_owned())
                    .key("usr_id", usr_id)
                    .insert_only("clicks", 1_i64)
                    .insert_only("updated_at", now)
                    .insert_only("created_at", now)
            }

            impl Stats {
                /// `(clicks, updated_at, created_at)` of a key, read through `executor`.
                async fn row_in<'c, E>(&self, executor: E, act_code: &str, usr_id: i64) -> Option<(i64, i64, i64)>
                where
                    E: sqlx::Executor<'c, Database = $db>,
                {
                    let statement = ($p)(&format!(
                        "SELECT clicks, updated_at, created_at FROM {} \
                         WHERE act_code = ? AND usr_id = ?",
                        self.table
                    ));
                    sqlx::query_as(AssertSqlSafe(statement))
                        .bind(act_code.to_owned())
                        .bind(usr_id)
                        .fetch_optional(executor)
                        .await
                        .expect("read the row")
                }

                async fn row(&self, act_code: &str, usr_id: i64) -> Option<(i64, i64, i64)> {
                    self.row_in(&self.pool, act_code, usr_id).await
                }

                async fn rows(&self) -> i64 {
                    let statement = format!("SELECT COUNT(*) FROM {}", self.table);
                    sqlx::query_scalar(AssertSqlSafe(statement))
                        .fetch_one(&self.pool)
                        .await
                        .expect("count")
                }
            }

            /// A pool whose every connection attempt fails: an answer other than
            /// `Error::Store` from it proves that nothing was sent.
            fn nowhere() -> Pool<$db> {
                sqlx::pool::PoolOptions::<$db>::new()
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_lazy($nowhere)
                    .expect("a well-formed URL")
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn first_upsert_inserts_and_later_ones_update() {
                for shape in SHAPES {
                    let Some(stats) = stats(shape).await else {
                        return;
                    };
                    let t = stats.table;
                    let first = click(t, "spring", 7, 100).execute(&stats.pool).await;
                    assert_eq!(first.expect("first click"), Upserted::Inserted, "{shape:?}");
                    assert_eq!(stats.row("spring", 7).await, Some((1, 100, 100)), "{shape:?}");

                    let second = click(t, "spring", 7, 200).execute(&stats.pool).await;
                    assert_eq!(second.expect("second click"), Upserted::Updated, "{shape:?}");
                    // `add` counted, `set` moved, `insert_only` kept the first click's time.
                    assert_eq!(stats.row("spring", 7).await, Some((2, 200, 100)), "{shape:?}");

                    let third = click(t, "spring", 7, 300).execute(&stats.pool).await;
                    assert!(!third.expect("third click").is_inserted(), "{shape:?}");
                    assert_eq!(stats.row("spring", 7).await, Some((3, 300, 100)), "{shape:?}");

                    // Another user, another activity: keys of their own.
                    let other_user = click(t, "spring", 8, 400).execute(&stats.pool).await;
                    assert!(other_user.expect("other user").is_inserted(), "{shape:?}");
                    let other_act = click(t, "autumn", 7, 500).execute(&stats.pool).await;
                    assert!(other_act.expect("other activity").is_inserted(), "{shape:?}");
                    assert_eq!(stats.row("spring", 8).await, Some((1, 400, 400)), "{shape:?}");
                    assert_eq!(stats.row("autumn", 7).await, Some((1, 500, 500)), "{shape:?}");
                    assert_eq!(stats.row("spring", 7).await, Some((3, 300, 100)), "{shape:?}");
                    assert_eq!(stats.rows().await, 3, "{shape:?}");
                }
            }

            /// An update that writes the values the row already holds is still an update
            /// (MySQL counts such a row as found, not changed).
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn identical_update_reads_updated() {
                for shape in SHAPES {
                    let Some(stats) = stats(shape).await else {
                        return;
                    };
                    let same = || {
                        Upsert::<$db>::into_table(stats.table)
                            .key("act_code", "spring")
                            .key("usr_id", 7_i64)
                            .set("clicks", 1_i64)
                            .set("updated_at", 100_i64)
                            .insert_only("created_at", 100_i64)
                    };
                    assert_eq!(same().execute(&stats.pool).await.expect("first"), Upserted::Inserted, "{shape:?}");
                    for _ in 0..3 {
                        assert_eq!(same().execute(&stats.pool).await.expect("same again"), Upserted::Updated, "{shape:?}");
                    }
                    assert_eq!(stats.row("spring", 7).await, Some((1, 100, 100)), "{shape:?}");
                    assert_eq!(stats.rows().await, 1, "{shape:?}");
                }
            }

            /// With nothing to set or add, a second upsert is an update that changes nothing.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn upsert_without_updates_reads_updated_and_changes_nothing() {
                for shape in SHAPES {
                    let Some(stats) = stats(shape).await else {
                        return;
                    };
                    let t = stats.table;
                    let first = keys_only(t, "spring", 7, 100).execute(&stats.pool).await;
                    assert_eq!(first.expect("first"), Upserted::Inserted, "{shape:?}");
                    let second = keys_only(t, "spring", 7, 200).execute(&stats.pool).await;
                    assert_eq!(second.expect("second"), Upserted::Updated, "{shape:?}");
                    assert_eq!(stats.row("spring", 7).await, Some((1, 100, 100)), "{shape:?}");
                    assert_eq!(stats.rows().await, 1, "{shape:?}");
                }
            }

            /// 64 clicks at once on one key: exactly one inserts, every click counts.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_upserts_insert_once() {
                for shape in SHAPES {
                    let Some(stats) = stats(shape).await else {
                        return;
                    };
                    let start = Arc::new(Barrier::new(64));
                    let tasks: Vec<_> = (0..64)
                        .map(|i| {
                            let (stats, start) = (stats.clone(), start.clone());
                            tokio::spawn(async move {
                                start.wait().await;
                                click(stats.table, "spring", 7, 1000 + i).execute(&stats.pool).await
                            })
                        })
                        .collect();
                    let (mut inserted, mut updated) = (0, 0);
                    for task in tasks {
                        match task.await.expect("task").expect("upsert") {
                            Upserted::Inserted => inserted += 1,
                            Upserted::Updated => updated += 1,
                        }
                    }
                    assert_eq!((inserted, updated), (1, 63), "{shape:?}");
                    let (clicks, updated_at, created_at) =
                        stats.row("spring", 7).await.expect("the row");
                    assert_eq!(clicks, 64, "{shape:?}");
                    assert!((1000..1064).contains(&updated_at), "{shape:?}");
                    assert!((1000..1064).contains(&created_at), "{shape:?}");
                    assert_eq!(stats.rows().await, 1, "{shape:?}");
                }
            }

            /// 64 clicks racing 32 deletes of the row: every click settles, each life of the
            /// row begins with exactly one `Inserted`, and no click is lost or counted twice.
            /// (On SQLite this is the insert-then-update retry: a delete between the two.)
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn upserts_racing_deletes_count_every_click_once() {
                let Some(stats) = stats(Shape::PrimaryKey).await else {
                    return;
                };
                let start = Arc::new(Barrier::new(65));
                let clicks: Vec<_> = (0..64)
                    .map(|i| {
                        let (stats, start) = (stats.clone(), start.clone());
                        tokio::spawn(async move {
                            start.wait().await;
                            click(stats.table, "spring", 7, i).execute(&stats.pool).await
                        })
                    })
                    .collect();
                let deleter = {
                    let (stats, start) = (stats.clone(), start.clone());
                    tokio::spawn(async move {
                        // `DELETE … RETURNING`: PostgreSQL, SQLite, MariaDB.
                        let delete = ($p)(&format!(
                            "DELETE FROM {} WHERE act_code = ? AND usr_id = ? RETURNING clicks",
                            stats.table
                        ));
                        start.wait().await;
                        let (mut lives, mut counted) = (0, 0);
                        for _ in 0..32 {
                            let deleted: Option<i64> = sqlx::query_scalar(AssertSqlSafe(delete.clone()))
                                .bind("spring")
                                .bind(7_i64)
                                .fetch_optional(&stats.pool)
                                .await
                                .expect("delete");
                            if let Some(clicks) = deleted {
                                lives += 1;
                                counted += clicks;
                            }
                            tokio::task::yield_now().await;
                        }
                        (lives, counted)
                    })
                };
                let mut inserted = 0;
                for task in clicks {
                    if task.await.expect("task").expect("upsert").is_inserted() {
                        inserted += 1;
                    }
                }
                let (mut lives, mut counted) = deleter.await.expect("deleter");
                if let Some((clicks, _, _)) = stats.row("spring", 7).await {
                    lives += 1;
                    counted += clicks;
                }
                assert_eq!(inserted, lives, "one insert per life of the row");
                assert_eq!(counted, 64, "every click counted once");
            }

            /// In a transaction: the upserts see each other, and a rollback leaves nothing.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn rolled_back_upserts_leave_nothing() {
                for shape in SHAPES {
                    let Some(stats) = stats(shape).await else {
                        return;
                    };
                    let t = stats.table;
                    let mut tx = stats.pool.begin().await.expect("begin");
                    let first = click(t, "spring", 7, 100).execute(&mut *tx).await;
                    assert_eq!(first.expect("in the transaction"), Upserted::Inserted, "{shape:?}");
                    let second = click(t, "spring", 7, 200).execute(&mut tx).await;
                    assert_eq!(second.expect("again in it"), Upserted::Updated, "{shape:?}");
                    assert_eq!(stats.row_in(&mut *tx, "spring", 7).await, Some((2, 200, 100)), "{shape:?}");
                    tx.rollback().await.expect("roll back");

                    assert_eq!(stats.rows().await, 0, "{shape:?}");
                    let after = click(t, "spring", 7, 300).execute(&stats.pool).await;
                    assert_eq!(after.expect("after the rollback"), Upserted::Inserted, "{shape:?}");
                    assert_eq!(stats.row("spring", 7).await, Some((1, 300, 300)), "{shape:?}");
                }
            }

            /// A committed transaction keeps its upserts.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn committed_upserts_stay() {
                let Some(stats) = stats(Shape::PrimaryKey).await else {
                    return;
                };
                let t = stats.table;
                let mut tx = stats.pool.begin().await.expect("begin");
                assert!(click(t, "spring", 7, 100).execute(&mut *tx).await.expect("first").is_inserted());
                assert!(!click(t, "spring", 7, 200).execute(&mut *tx).await.expect("second").is_inserted());
                tx.commit().await.expect("commit");
                assert_eq!(stats.row("spring", 7).await, Some((2, 200, 100)));
            }

            /// A `NOT NULL` violation is an error, not a duplicate, whether or not the key
            /// holds a row, and changes nothing.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn not_null_violation_is_a_store_error() {
                for shape in SHAPES {
                    let Some(stats) = stats(shape).await else {
                        return;
                    };
                    let null_time = || {
                        Upsert::<$db>::into_table(stats.table)
                            .key("act_code", "spring")
                            .key("usr_id", 7_i64)
                            .add("clicks", 1_i64)
                            .set("updated_at", None::<i64>)
                            .insert_only("created_at", 100_i64)
                    };
                    let refused = null_time().execute(&stats.pool).await;
                    assert!(matches!(refused, Err(Error::Store(_))), "{shape:?}: {refused:?}");
                    assert_eq!(stats.rows().await, 0, "{shape:?}");

                    let first = click(stats.table, "spring", 7, 100).execute(&stats.pool).await;
                    assert!(first.expect("a valid click").is_inserted(), "{shape:?}");
                    let refused = null_time().execute(&stats.pool).await;
                    assert!(matches!(refused, Err(Error::Store(_))), "{shape:?}: {refused:?}");
                    assert_eq!(stats.row("spring", 7).await, Some((1, 100, 100)), "{shape:?}");
                }
            }

            /// Bad names are refused before anything is sent: the pool here cannot connect.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn bad_names_are_refused_without_the_database() {
                let nowhere = nowhere();
                // A good upsert does reach for the database, and fails there.
                let sent = click("activity_stats", "spring", 7, 100).execute(&nowhere).await;
                assert!(matches!(sent, Err(Error::Store(_))), "{sent:?}");

                for table in ["orders; DROP", "", "1stats", "app.stats", "\"stats\""] {
                    let refused = click(table, "spring", 7, 100).execute(&nowhere).await;
                    assert!(
                        matches!(
                            &refused,
                            Err(Error::InvalidName { what: "table name", name, .. }) if name == table
                        ),
                        "{table:?}: {refused:?}"
                    );
                }
                for column in ["orders; DROP", "", "x y", "clicks--"] {
                    let as_key = Upsert::<$db>::into_table("activity_stats")
                        .key(column, 1_i64)
                        .execute(&nowhere)
                        .await;
                    let as_set = Upsert::<$db>::into_table("activity_stats")
                        .key("act_code", "spring")
                        .set(column, 1_i64)
                        .execute(&nowhere)
                        .await;
                    let as_insert_only = Upsert::<$db>::into_table("activity_stats")
                        .key("act_code", "spring")
                        .insert_only(column, 1_i64)
                        .execute(&nowhere)
                        .await;
                    let as_add = Upsert::<$db>::into_table("activity_stats")
                        .key("act_code", "spring")
                        .add(column, 1_i64)
                        .execute(&nowhere)
                        .await;
                    for refused in [as_key, as_set, as_insert_only, as_add] {
                        assert!(
                            matches!(
                                &refused,
                                Err(Error::InvalidName { what: "column name", name, .. }) if name == column
                            ),
                            "{column:?}: {refused:?}"
                        );
                    }
                }
                // The first bad name is the one reported.
                let refused = Upsert::<$db>::into_table("stats; DROP")
                    .key("bad column", 1_i64)
                    .execute(&nowhere)
                    .await;
                assert!(
                    matches!(&refused, Err(Error::InvalidName { what: "table name", .. })),
                    "{refused:?}"
                );
            }

            /// A value that does not encode is an error of the store, reported before
            /// anything is sent (the message names the column; the pool cannot connect).
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn value_that_does_not_encode_is_a_store_error() {
                let refused = Upsert::<$db>::into_table("activity_stats")
                    .key("act_code", "spring")
                    .add("clicks", Unencodable)
                    .execute(&nowhere())
                    .await;
                match refused {
                    Err(Error::Store(error)) => {
                        let message = error.to_string();
                        assert!(message.contains("`clicks` does not encode"), "{message}");
                    }
                    other => panic!("an unencodable value: {other:?}"),
                }
            }

            /// An upsert without a key, or with a column twice, is refused before anything
            /// is sent.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn missing_key_and_repeated_columns_are_refused() {
                let nowhere = nowhere();
                let no_key = Upsert::<$db>::into_table("activity_stats")
                    .set("updated_at", 100_i64)
                    .add("clicks", 1_i64)
                    .execute(&nowhere)
                    .await;
                match no_key {
                    Err(Error::InvalidUpsert { table, reason }) => {
                        assert_eq!(table, "activity_stats");
                        assert!(reason.contains("no key column"), "{reason}");
                    }
                    other => panic!("no key: {other:?}"),
                }
                let empty = Upsert::<$db>::into_table("activity_stats").execute(&nowhere).await;
                assert!(matches!(empty, Err(Error::InvalidUpsert { .. })), "{empty:?}");

                for twice in [
                    Upsert::<$db>::into_table("activity_stats")
                        .key("act_code", "spring")
                        .set("clicks", 1_i64)
                        .add("clicks", 1_i64),
                    Upsert::<$db>::into_table("activity_stats")
                        .key("act_code", "spring")
                        .key("ACT_CODE", "autumn"),
                ] {
                    match twice.execute(&nowhere).await {
                        Err(Error::InvalidUpsert { reason, .. }) => {
                            assert!(reason.contains("given twice"), "{reason}");
                        }
                        other => panic!("a column twice: {other:?}"),
                    }
                }
            }

            /// A conflict on a unique key the upsert does not name: PostgreSQL and SQLite
            /// refuse it (their conflict target is the named key), MySQL's `ON DUPLICATE KEY
            /// UPDATE` takes any unique key and updates the row it found.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn conflict_on_another_unique_key() {
                let Some(stats) = stats(Shape::SurrogateId).await else {
                    return;
                };
                let first = click(stats.table, "spring", 7, 100).execute(&stats.pool).await;
                assert!(first.expect("first").is_inserted());
                let by_id = Upsert::<$db>::into_table(stats.table)
                    .key("id", 1000_i64)
                    .set("act_code", "spring")
                    .set("usr_id", 7_i64)
                    .set("clicks", 5_i64)
                    .set("updated_at", 200_i64)
                    .insert_only("created_at", 200_i64)
                    .execute(&stats.pool)
                    .await;
                assert!(matches!(by_id, $other_key), "{by_id:?}");
                assert_eq!(stats.row("spring", 7).await, Some($other_key_row));
                assert_eq!(stats.rows().await, 1);
            }

            /// Keys that are not all the columns of a unique key: PostgreSQL and SQLite
            /// refuse the statement, MySQL does not check them.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn keys_that_are_no_unique_key() {
                let Some(stats) = stats(Shape::PrimaryKey).await else {
                    return;
                };
                let by_user = || {
                    Upsert::<$db>::into_table(stats.table)
                        .key("usr_id", 7_i64)
                        .set("act_code", "spring")
                        .add("clicks", 1_i64)
                        .set("updated_at", 100_i64)
                        .insert_only("created_at", 100_i64)
                };
                let first = by_user().execute(&stats.pool).await;
                assert!(matches!(first, $partial_first), "{first:?}");
                let second = by_user().execute(&stats.pool).await;
                assert!(matches!(second, $partial_second), "{second:?}");
            }

            #[test]
            fn the_statements_are_the_documented_ones() {
                assert_eq!(click("activity_stats", "spring", 7, 100).statement(), $click);
                assert_eq!(keys_only("activity_stats", "spring", 7, 100).statement(), $keys_only);
            }
        }
    };
}

upsert_tests!(
    postgres,
    sqlx::Postgres,
    |table| idem_tests::sql_servers::postgres_scratch(&table).await,
    idem_tests::sql_servers::numbered,
    id: "id BIGSERIAL PRIMARY KEY",
    nowhere: "postgres://idem@127.0.0.1:1/nowhere",
    click: "INSERT INTO activity_stats (act_code, created_at, clicks, usr_id, updated_at) \
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT (act_code, usr_id) DO UPDATE SET \
            clicks = activity_stats.clicks + EXCLUDED.clicks, updated_at = EXCLUDED.updated_at \
            RETURNING (xmax = 0)",
    keys_only: "INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at) \
                VALUES ($1, $2, $3, $4, $5) ON CONFLICT (act_code, usr_id) DO UPDATE SET \
                act_code = activity_stats.act_code RETURNING (xmax = 0)",
    other_key: Err(Error::Store(_)) => (1, 100, 100),
    partial_key: Err(Error::Store(_)), Err(Error::Store(_)),
);

upsert_tests!(
    mysql,
    sqlx::MySql,
    |table| idem_tests::sql_servers::mysql_scratch(&table).await,
    idem_tests::sql_servers::question_marks,
    id: "id BIGINT AUTO_INCREMENT PRIMARY KEY",
    nowhere: "mysql://idem@127.0.0.1:1/nowhere",
    click: "INSERT INTO activity_stats (act_code, created_at, clicks, usr_id, updated_at) \
            VALUES (?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE clicks = clicks + VALUES(clicks), \
            updated_at = VALUES(updated_at), \
            act_code = IF(LAST_INSERT_ID(18446744073709551615), act_code, act_code)",
    keys_only: "INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at) \
                VALUES (?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
                act_code = IF(LAST_INSERT_ID(18446744073709551615), act_code, act_code)",
    other_key: Ok(Upserted::Updated) => (5, 200, 100),
    partial_key: Ok(Upserted::Inserted), Ok(Upserted::Updated),
);

upsert_tests!(
    sqlite,
    sqlx::Sqlite,
    |table| idem_tests::sql_servers::sqlite_scratch(&table).await,
    idem_tests::sql_servers::question_marks,
    id: "id INTEGER PRIMARY KEY AUTOINCREMENT",
    nowhere: "sqlite:///nonexistent-idem-directory/upsert.db",
    click: "INSERT INTO activity_stats (act_code, created_at, clicks, usr_id, updated_at) \
            VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (act_code, usr_id) DO NOTHING;\n\
            UPDATE activity_stats SET clicks = clicks + ?3, updated_at = ?5 \
            WHERE act_code = ?1 AND usr_id = ?4",
    keys_only: "INSERT INTO activity_stats (act_code, usr_id, clicks, updated_at, created_at) \
                VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (act_code, usr_id) DO NOTHING;\n\
                UPDATE activity_stats SET act_code = act_code WHERE act_code = ?1 AND usr_id = ?2",
    other_key: Err(Error::Store(_)) => (1, 100, 100),
    partial_key: Err(Error::Store(_)), Err(Error::Store(_)),
);
