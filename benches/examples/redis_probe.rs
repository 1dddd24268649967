//! Where the time of a Redis operation goes, for idem's store and the peer's: new keys and
//! replays (the handlers of the `stores` benchmark) at 1 and 64 tasks, and for each run the
//! operations per second, the server's `INFO commandstats` (reset before the run: `evalsha` and
//! the commands the scripts called), the server's CPU (`INFO cpu`) and this process's CPU,
//! per operation.
//!
//! ```sh
//! cargo run --release -p idem-benches --example redis_probe
//! ```
//!
//! `IDEM_REDIS_URL` points it at a server (give it one of its own: other clients' commands
//! would count in the statistics); `PROBE=idem` or `PROBE=peer` runs one side only,
//! `PROBE_ONLY="replay 64"` the runs whose name contains that, `PROBE_OPS` sets the
//! operations per run (20 000).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use idem_benches::{Paid, credit, peer, servers, unique_name};
use idem_runtime::redis::RedisStore;
use redis::aio::ConnectionManager;

type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How many completed keys the replays cycle through.
const REPLAY_KEYS: u64 = 256;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |n| Box::pin(f(n)))
}

/// This process's CPU time in seconds (user + system, from `/proc/self/stat`).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

async fn info(connection: &mut ConnectionManager, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(connection)
        .await
        .expect("INFO")
}

/// The server's CPU time in seconds, from `INFO cpu`.
fn server_cpu(info: &str) -> f64 {
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| matches!(*name, "used_cpu_sys" | "used_cpu_user"))
        .map(|(_, value)| value.trim().parse::<f64>().unwrap_or(0.0))
        .sum()
}

/// `command -> (calls, usec)` from `INFO commandstats`.
fn commandstats(info: &str) -> BTreeMap<String, (u64, u64)> {
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|line| line.split_once(':'))
        else {
            continue;
        };
        let (mut calls, mut usec) = (0, 0);
        for pair in rest.split(',') {
            match pair.split_once('=') {
                Some(("calls", value)) => calls = value.parse().unwrap_or(0),
                Some(("usec", value)) => usec = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        stats.insert(name.to_owned(), (calls, usec));
    }
    stats
}

/// Runs `ops` operations on `tasks` tasks and prints what they cost.
async fn run(connection: &mut ConnectionManager, name: &str, tasks: u64, ops: u64, op: Op) {
    let label = format!("{name} {tasks}");
    if std::env::var("PROBE_ONLY").is_ok_and(|only| !label.contains(&only)) {
        return;
    }
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(connection)
        .await
        .expect("CONFIG RESETSTAT");
    let server_before = server_cpu(&info(connection, "cpu").await);
    let own_before = own_cpu();
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= ops {
                        break;
                    }
                    op(n).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a task panicked");
    }
    let wall = start.elapsed().as_secs_f64();
    let own = own_cpu() - own_before;
    let stats = commandstats(&info(connection, "commandstats").await);
    let server = server_cpu(&info(connection, "cpu").await) - server_before;
    let per_call = |(calls, usec): (u64, u64)| usec as f64 / calls.max(1) as f64;
    let evalsha = stats.get("evalsha").copied().unwrap_or_default();
    let ops_f = ops as f64;
    println!(
        "{name:<12} tasks {tasks:>2}: {:>7.0} ops/s | evalsha {} calls {:.2} us/call, \
         {:.1} us/op | server cpu {:.1} us/op ({:.0}%) | client cpu {:.1} us/op ({:.0}%)",
        ops_f / wall,
        evalsha.0,
        per_call(evalsha),
        evalsha.1 as f64 / ops_f,
        server * 1e6 / ops_f,
        100.0 * server / wall,
        own * 1e6 / ops_f,
        100.0 * own / wall,
    );
    let called: Vec<String> = stats
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "evalsha" | "info" | "config|resetstat"))
        .map(|(name, &stat)| format!("{name} {}x {:.2} us", stat.0, per_call(stat)))
        .collect();
    println!("{:>24} called: {}", "", called.join(", "));
}

/// Deletes the keys matching `pattern`.
async fn delete(connection: &mut ConnectionManager, pattern: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(connection)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(connection).await;
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let ops: u64 = std::env::var("PROBE_OPS")
        .ok()
        .and_then(|ops| ops.parse().ok())
        .unwrap_or(20_000);
    let sides = std::env::var("PROBE").unwrap_or_else(|_| "idem,peer".into());
    runtime.block_on(async {
        let Some(mut connection) = servers::redis().await else {
            return;
        };
        let run_id = unique_name("probe");
        if sides.contains("idem") {
            let prefix = unique_name("idem_probe");
            let store = Arc::new(
                RedisStore::new(connection.clone())
                    .with_prefix(&prefix)
                    .expect("a valid prefix"),
            );
            let replay_key = |run: &str, n: u64| format!("{run}-r-{}", n % REPLAY_KEYS);
            for n in 0..REPLAY_KEYS {
                credit(&*store, 16, Paid::new(replay_key(&run_id, n)))
                    .await
                    .expect("a replay key");
            }
            for tasks in [1, 64] {
                let (s, id) = (store.clone(), run_id.clone());
                let new_key = op(move |n| {
                    let (s, key) = (s.clone(), format!("{id}-n{tasks}-{n}"));
                    async move {
                        credit(&*s, 16, Paid::new(key)).await.expect("a new key");
                    }
                });
                run(&mut connection, "idem new_key", tasks, ops, new_key).await;
                let (s, id) = (store.clone(), run_id.clone());
                let replay = op(move |n| {
                    let (s, key) = (s.clone(), replay_key(&id, n));
                    async move {
                        let receipt = credit(&*s, 16, Paid::new(key)).await.expect("a replay");
                        std::hint::black_box(receipt);
                    }
                });
                run(&mut connection, "idem replay", tasks, ops, replay).await;
            }
            delete(&mut connection, &format!("{prefix}:*")).await;
        }
        if sides.contains("peer") {
            let prefix = unique_name("peer_probe");
            let client = redis::Client::open(servers::redis_url().as_str()).expect("the URL");
            let store = Arc::new(
                idempotent::store::valkey::ValkeyStore::with_prefix(client, Some(&prefix))
                    .await
                    .expect("the peer's store"),
            );
            let replay_key = |run: &str, n: u64| format!("{run}-r-{}", n % REPLAY_KEYS);
            for n in 0..REPLAY_KEYS {
                peer::handle(&*store, replay_key(&run_id, n), 16).await;
            }
            for tasks in [1, 64] {
                let (s, id) = (store.clone(), run_id.clone());
                let new_key = op(move |n| {
                    let (s, key) = (s.clone(), format!("{id}-n{tasks}-{n}"));
                    async move {
                        std::hint::black_box(peer::handle(&*s, key, 16).await);
                    }
                });
                run(&mut connection, "peer new_key", tasks, ops, new_key).await;
                let (s, id) = (store.clone(), run_id.clone());
                let replay = op(move |n| {
                    let (s, key) = (s.clone(), replay_key(&id, n));
                    async move {
                        std::hint::black_box(peer::handle(&*s, key, 16).await);
                    }
                });
                run(&mut connection, "peer replay", tasks, ops, replay).await;
            }
            delete(&mut connection, &format!("{prefix}-*")).await;
        }
    });
}
