//! idem's demo: a points consumer that receives `OrderPaid` messages *at least once* — late
//! redeliveries, concurrent duplicates, producer resends, a failing attempt, a worker that dies
//! mid-handler, a reused key with another payload — and credits every order exactly once.
//!
//! ```text
//! cargo run -p idem-examples --bin demo                         # SQLite file in a temp dir
//! cargo run -p idem-examples --bin demo -- --database-url sqlite://points.db
//! ```
//!
//! The points ledger has no unique index: a doubled credit would show as two rows. The demo
//! ends with a reconciliation table and exits non-zero if any credit was lost or doubled.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_runtime::sqlite::SqliteStore;
use idem_runtime::{Error, idempotent};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use tokio::sync::Notify;

/// The message: the business key is `order_no`; `message_id` is the broker's and changes when
/// the producer resends.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OrderPaid {
    #[serde(skip)]
    message_id: u64,
    order_no: String,
    amount_cents: u64,
}

/// What crediting returns; stored by idem and replayed to duplicates.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Credited {
    order_no: String,
    points: i64,
    by_message: u64,
}

#[derive(Debug, thiserror::Error)]
enum ConsumerError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error("points ledger: {0}")]
    Ledger(#[from] sqlx::Error),
    #[error("loyalty gateway timed out")]
    GatewayTimeout,
}

/// The consumer: its store, its ledger, and switches to inject faults.
struct Consumer {
    store: SqliteStore,
    ledger: SqlitePool,
    fail_next_gateway_call: std::sync::atomic::AtomicBool,
    hang: Notify,
    hang_order: std::sync::Mutex<Option<String>>,
    bodies_run: AtomicU64,
}

impl Consumer {
    /// Credits points for a paid order: once per `order_no`, whatever is delivered.
    #[idempotent(key = "order_no", store = &self.store, scope = "points.credit", lease = "2s")]
    async fn credit(&self, msg: OrderPaid) -> Result<Credited, ConsumerError> {
        self.bodies_run.fetch_add(1, Ordering::SeqCst);
        let hang = self
            .hang_order
            .lock()
            .map(|order| order.as_deref() == Some(msg.order_no.as_str()))
            .unwrap_or(false);
        if hang {
            // The worker dies here: this future is dropped before anything is written.
            self.hang.notified().await;
        }
        if self.fail_next_gateway_call.swap(false, Ordering::SeqCst) {
            return Err(ConsumerError::GatewayTimeout);
        }
        tokio::time::sleep(Duration::from_millis(30)).await; // the loyalty gateway
        let points = i64::try_from(msg.amount_cents / 100).unwrap_or(i64::MAX);
        sqlx::query("INSERT INTO points_ledger (order_no, points, message_id) VALUES (?1, ?2, ?3)")
            .bind(&msg.order_no)
            .bind(points)
            .bind(i64::try_from(msg.message_id).unwrap_or(i64::MAX))
            .execute(&self.ledger)
            .await?;
        Ok(Credited {
            order_no: msg.order_no,
            points,
            by_message: msg.message_id,
        })
    }
}

/// What happened to one delivery, as the consumer would act on it.
enum Outcome {
    Executed(Credited),
    Replayed(Credited),
    RetryLater(Duration),
    Rejected(String),
    Failed(String),
}

#[derive(Default)]
struct Tally {
    deliveries: u64,
    executed: u64,
    replayed: u64,
    retried: u64,
    rejected: u64,
    failed: u64,
    crashed: u64,
}

struct Demo {
    consumer: Arc<Consumer>,
    next_message_id: AtomicU64,
    tally: std::sync::Mutex<Tally>,
}

impl Demo {
    fn message(&self, order_no: &str, amount_cents: u64) -> OrderPaid {
        OrderPaid {
            message_id: self.next_message_id.fetch_add(1, Ordering::SeqCst) + 1,
            order_no: order_no.to_owned(),
            amount_cents,
        }
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers `msg` once and prints what the consumer does with it.
    async fn deliver(&self, msg: OrderPaid, why: &str) -> Outcome {
        let id = msg.message_id;
        let order = msg.order_no.clone();
        let outcome = match self.consumer.credit(msg).await {
            Ok(credited) if credited.by_message == id => Outcome::Executed(credited),
            Ok(credited) => Outcome::Replayed(credited),
            Err(ConsumerError::Idem(Error::InProgress { retry_after, .. })) => {
                Outcome::RetryLater(retry_after)
            }
            Err(ConsumerError::Idem(error @ Error::FingerprintMismatch { .. })) => {
                Outcome::Rejected(error.to_string())
            }
            Err(error) => Outcome::Failed(error.to_string()),
        };
        let mut tally = self.tally();
        tally.deliveries += 1;
        let what = match &outcome {
            Outcome::Executed(c) => {
                tally.executed += 1;
                format!("executed  → credited {} points, ack", c.points)
            }
            Outcome::Replayed(c) => {
                tally.replayed += 1;
                format!(
                    "replayed  → stored result of message #{}, body not run, ack",
                    c.by_message
                )
            }
            Outcome::RetryLater(after) => {
                tally.retried += 1;
                format!(
                    "in progress → not acked, redeliver in {} ms",
                    after.as_millis()
                )
            }
            Outcome::Rejected(why) => {
                tally.rejected += 1;
                format!("rejected  → {why}; dead-letter")
            }
            Outcome::Failed(why) => {
                tally.failed += 1;
                format!("failed    → {why}; not acked, claim released")
            }
        };
        println!("  msg #{id:<3} {order:<7} {why:<34} {what}");
        outcome
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::from(2)
        }
    }
}

fn database_url() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--database-url" => {
                url = Some(
                    args.next()
                        .ok_or("--database-url needs a value, e.g. sqlite://points.db")?,
                );
            }
            "-h" | "--help" => {
                println!(
                    "usage: demo [--database-url sqlite://FILE]\n\nWithout a URL the demo uses a fresh SQLite file in the temp directory."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`; try --help")),
        }
    }
    if let Some(url) = url.or_else(|| std::env::var("DATABASE_URL").ok()) {
        return Ok(url);
    }
    let path = std::env::temp_dir().join(format!("idem-demo-{}.db", std::process::id()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(format!("sqlite://{}", path.display()))
}

async fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let url = database_url()?;
    let store = SqliteStore::connect(&url).await?;
    store.migrate().await?;
    let ledger = store.pool().clone();
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS points_ledger (order_no TEXT NOT NULL, points INTEGER NOT NULL, message_id INTEGER NOT NULL);
         DELETE FROM points_ledger; DELETE FROM idem_records WHERE scope = 'points.credit';",
    )
    .execute(&ledger)
    .await?;
    println!("idem demo: a points consumer on {url}");
    println!("every order must be credited exactly once, whatever the queue delivers\n");

    let demo = Arc::new(Demo {
        consumer: Arc::new(Consumer {
            store,
            ledger: ledger.clone(),
            fail_next_gateway_call: false.into(),
            hang: Notify::new(),
            hang_order: std::sync::Mutex::new(None),
            bodies_run: AtomicU64::new(0),
        }),
        next_message_id: AtomicU64::new(0),
        tally: std::sync::Mutex::new(Tally::default()),
    });
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();

    println!("1. first deliveries");
    for (order, cents) in [("A-1001", 12_000), ("A-1002", 4_500), ("A-1003", 99_900)] {
        expected.insert(order.into(), cents / 100);
        let msg = demo.message(order, cents as u64);
        demo.deliver(msg, "first delivery").await;
    }

    println!("\n2. the broker redelivers (the consumer's ack was lost)");
    for (order, cents) in [("A-1001", 12_000), ("A-1002", 4_500)] {
        let msg = demo.message(order, cents);
        demo.deliver(msg, "redelivery after lost ack").await;
    }

    println!("\n3. the producer resends with a new message id");
    let msg = demo.message("A-1003", 99_900);
    demo.deliver(msg, "producer resend, new message id").await;

    println!("\n4. eight copies of one message arrive at once (rebalance)");
    expected.insert("A-1004".into(), 250);
    let copies: Vec<_> = (0..8).map(|_| demo.message("A-1004", 25_000)).collect();
    let mut tasks = Vec::new();
    for msg in copies {
        let demo = demo.clone();
        tasks.push(tokio::spawn(async move {
            demo.deliver(msg, "concurrent duplicate").await
        }));
    }
    let mut redeliver = Vec::new();
    for task in tasks {
        if let Outcome::RetryLater(after) = task.await? {
            redeliver.push(after);
        }
    }
    if !redeliver.is_empty() {
        println!(
            "   … {} copies were not acked; the broker redelivers them:",
            redeliver.len()
        );
        for _ in redeliver {
            let msg = demo.message("A-1004", 25_000);
            demo.deliver(msg, "redelivery of unacked copy").await;
        }
    }

    println!("\n5. the loyalty gateway times out, the broker retries");
    expected.insert("A-1005".into(), 30);
    demo.consumer
        .fail_next_gateway_call
        .store(true, Ordering::SeqCst);
    let msg = demo.message("A-1005", 3_000);
    demo.deliver(msg, "first attempt").await;
    let msg = demo.message("A-1005", 3_000);
    demo.deliver(msg, "retry after failure").await;

    println!("\n6. a worker dies mid-handler (its claim is left behind)");
    expected.insert("A-1006".into(), 70);
    if let Ok(mut order) = demo.consumer.hang_order.lock() {
        *order = Some("A-1006".into());
    }
    let dying = {
        let demo = demo.clone();
        let msg = demo.message("A-1006", 7_000);
        tokio::spawn(async move { demo.consumer.credit(msg).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    dying.abort();
    let _ = dying.await;
    demo.tally().crashed += 1;
    demo.tally().deliveries += 1;
    println!(
        "  msg #{:<3} A-1006  {:<34} worker killed → no ack, claim stays until its lease ends",
        demo.next_message_id.load(Ordering::SeqCst),
        "first delivery"
    );
    if let Ok(mut order) = demo.consumer.hang_order.lock() {
        *order = None;
    }
    let msg = demo.message("A-1006", 7_000);
    let outcome = demo.deliver(msg, "redelivery while lease runs").await;
    if let Outcome::RetryLater(after) = outcome {
        tokio::time::sleep(after + Duration::from_millis(50)).await;
    }
    let msg = demo.message("A-1006", 7_000);
    demo.deliver(msg, "redelivery after the lease").await;

    println!("\n7. a buggy producer reuses an order number for another payment");
    let msg = demo.message("A-1001", 1);
    demo.deliver(msg, "same key, different payload").await;

    // Reconcile against the ledger.
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT order_no, COUNT(*), SUM(points) FROM points_ledger GROUP BY order_no ORDER BY order_no",
    )
    .fetch_all(&ledger)
    .await?;
    let actual: BTreeMap<String, (i64, i64)> = rows
        .into_iter()
        .map(|(order, n, sum)| (order, (n, sum)))
        .collect();

    println!("\nreconciliation");
    println!("  ┌─────────┬──────────┬─────────┬─────────┬────────┐");
    println!("  │ order   │ expected │ credits │  points │ status │");
    println!("  ├─────────┼──────────┼─────────┼─────────┼────────┤");
    let mut ok = true;
    for (order, points) in &expected {
        let (credits, sum) = actual.get(order).copied().unwrap_or((0, 0));
        let status = match credits {
            0 => "LOST",
            1 if sum == *points => "ok",
            1 => "WRONG",
            _ => "DOUBLE",
        };
        ok &= status == "ok";
        println!("  │ {order:<7} │ {points:>8} │ {credits:>7} │ {sum:>7} │ {status:<6} │");
    }
    for order in actual.keys().filter(|order| !expected.contains_key(*order)) {
        ok = false;
        println!(
            "  │ {order:<7} │ {:>8} │ {:>7} │ {:>7} │ {:<6} │",
            0, "?", "?", "EXTRA"
        );
    }
    println!("  └─────────┴──────────┴─────────┴─────────┴────────┘");
    let tally = demo.tally();
    let expected_total: i64 = expected.values().sum();
    let actual_total: i64 = actual.values().map(|(_, sum)| sum).sum();
    println!(
        "  deliveries {} · bodies run {} · executed {} · replayed {} · not acked (in progress) {} · failed and retried {} · workers killed {} · rejected {}",
        tally.deliveries,
        demo.consumer.bodies_run.load(Ordering::SeqCst),
        tally.executed,
        tally.replayed,
        tally.retried,
        tally.failed,
        tally.crashed,
        tally.rejected,
    );
    println!("  points expected {expected_total} · credited {actual_total}");
    if ok && expected_total == actual_total {
        println!("\nOK: every order credited exactly once; no credit lost or doubled.");
        Ok(true)
    } else {
        println!("\nFAILED: some credit was lost or doubled.");
        Ok(false)
    }
}
