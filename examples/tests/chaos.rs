//! The CI-sized chaos runs: 4 consumer processes on 4,000 deliveries (35 % duplicate
//! publishes), 12 of them killed with SIGKILL mid-handler and replaced, 3 frozen with SIGSTOP
//! past their lease; every effect reconciled. One run on PostgreSQL + Redis, one on MySQL /
//! MariaDB + Redis. The full run is `cargo run --release -p idem-examples --bin chaos -- …`
//! (docs/RELIABILITY.md).
//!
//! Servers: `IDEM_POSTGRES_URL`, `IDEM_MYSQL_URL`, `IDEM_REDIS_URL` (loopback defaults). An
//! unreachable one skips the run, or fails it under `IDEM_REQUIRE_SERVERS=1` (scripts/test.sh).

use std::path::PathBuf;
use std::time::Duration;

use idem_examples::chaos::{self, ChaosDb, Config, Kind};

fn url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Whether the servers are reachable; when they are not, fails under
/// `IDEM_REQUIRE_SERVERS=1` and says the run is skipped otherwise.
async fn reachable<DB: ChaosDb>(database_url: &str, redis_url: &str) -> bool {
    let database = <DB::Connection as sqlx::Connection>::connect(database_url)
        .await
        .map(|_| ())
        .map_err(|error| error.to_string());
    let redis = match redis::Client::open(redis_url) {
        Ok(client) => client
            .get_multiplexed_async_connection()
            .await
            .map(|_| ())
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let problem = match (database, redis) {
        (Ok(()), Ok(())) => return true,
        (Err(error), _) => format!("{database_url} is unreachable ({error})"),
        (_, Err(error)) => format!("{redis_url} is unreachable ({error})"),
    };
    if std::env::var("IDEM_REQUIRE_SERVERS").is_ok_and(|value| value == "1") {
        panic!("{problem}; scripts/services.sh starts it");
    }
    let line = format!("SKIPPED: {problem}; scripts/test.sh starts the servers\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

async fn ci_run<DB: ChaosDb>(database_url: &str) {
    let redis_url = url("IDEM_REDIS_URL", "redis://127.0.0.1:6379/");
    if !reachable::<DB>(database_url, &redis_url).await {
        return;
    }
    let mut config = Config::new(
        database_url,
        &redis_url,
        PathBuf::from(env!("CARGO_BIN_EXE_chaos")),
    );
    config.deliveries = 4_000;
    config.kills = 12;
    config.stalls = 3;
    config.stuck_after = Duration::from_secs(120);
    let report = chaos::run::<DB>(&config).await.expect("the chaos run");
    println!("{report}");
    assert!(report.held(), "a guarantee broke:\n{report}");
    assert_eq!(report.deliveries, 4_000);
    assert!(report.duplicates * 100 >= 30 * report.deliveries);
    assert_eq!(report.faults.kills, 12);
    assert_eq!(report.faults.stalls, 3);
    for kind in Kind::ALL {
        let reconciled = report.reconciled[&kind];
        assert_eq!(reconciled.lost, 0, "{kind:?} lost effects:\n{report}");
        assert_eq!(
            reconciled.keys,
            reconciled.once + reconciled.doubled,
            "{report}"
        );
        if kind != Kind::Claim {
            assert_eq!(reconciled.doubled, 0, "{kind:?} doubled effects:\n{report}");
        }
        assert_eq!(report.faults.kills_in[&kind], 3, "kills spread evenly");
    }
    // Every frozen claim holder's key was taken over; its late completion was fenced or
    // timed out on the client (a frozen process's timers run out while it sleeps).
    assert!(report.counts.takeovers >= report.faults.stalls, "{report}");
}

/// PostgreSQL + Redis: `tx`, `version` and `state` effects exactly once, `claim` effects at
/// least once with every re-run explained by a kill or a freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_postgres_and_redis() {
    ci_run::<sqlx::Postgres>(&url(
        "IDEM_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ))
    .await;
}

/// MySQL / MariaDB + Redis: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_mysql_and_redis() {
    ci_run::<sqlx::MySql>(&url("IDEM_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")).await;
}
