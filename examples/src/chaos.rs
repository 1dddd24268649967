//! The chaos run: consumers as child processes, killed with `SIGKILL` and frozen with
//! `SIGSTOP` mid-handler, on a stream full of duplicates — then every effect reconciled.
//!
//! # What it does
//!
//! 1. Drops and creates the run's tables in the SQL database (PostgreSQL or MySQL /
//!    MariaDB): accounts, orders, an effects table **without** a unique key (so a doubled
//!    effect is a second row, not an error), the points service's ledger and balances, and
//!    idem's table.
//! 2. Plans `deliveries` stream entries over business keys, a quarter for each strategy:
//!    * `tx` — the points service's credit ([`Points::credit`](crate::points::Points::credit)):
//!      idem's claim, the ledger row and the balance in one transaction;
//!    * `version` — `UPDATE chaos_accounts SET amount = amount + ?, version = version + 1
//!      WHERE id = ? AND version = 0` and an effect row, in one transaction;
//!    * `state` — `UPDATE chaos_orders SET status = 'Paid' WHERE id = ? AND status =
//!      'Created'` and an effect row, in one transaction;
//!    * `claim` — idem's claim in **Redis**, then an effect row written outside any
//!      transaction (like a call to another service), then the completion.
//!
//!    `duplicates` of the entries are the producer publishing a key again (a new stream
//!    entry, so a new message id, with the same payload); half of them land within a few
//!    entries of the first, so consumers handle them at the same time.
//! 3. Starts `consumers` child processes (`chaos consume`), each a member of the stream's
//!    consumer group: it takes over entries left pending by dead consumers (`XAUTOCLAIM`
//!    after `min_idle`), reads new ones (`XREADGROUP`), runs the handler and acknowledges
//!    the entry unless the handler failed or found the key in progress.
//! 4. While they work it kills `kills` of them with `SIGKILL` right after they report a body
//!    has written its effect (the transaction is not committed yet; for `claim`, the effect
//!    is in but idem's record is not completed) and starts a new one in its place, and
//!    freezes `stalls` of them with `SIGSTOP` for `stall_for` (longer than the `claim`
//!    handler's 2 s lease), so their keys are taken over and their completions must be
//!    fenced when they wake.
//! 5. When every entry has been delivered and acknowledged, it stops the consumers and
//!    reconciles the database against the plan.
//!
//! # What must hold
//!
//! * `tx`, `version`, `state`: every key's effect exactly once — one effect row (one ledger
//!   row and the balances summing to the plan for `tx`), the account at version 1 with the
//!   planned amount, the order `Paid`. `doubled = 0`, `lost = 0`, and no credit idem forgot.
//! * `claim`: every key's effect at least once (`lost = 0`). A body killed or frozen after
//!   its effect and before its completion **runs again** when the key is taken over — that
//!   is the limit of a claim around a non-transactional effect, counted as extra effect rows
//!   and bounded by the `claim` bodies killed or frozen; a frozen holder's late completion
//!   is refused (`fenced`).

mod child;
mod work;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use idem_runtime::Error;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub use self::child::{ChildConfig, consume};
pub use self::work::{
    ChaosDb, ChaosOrder, ClaimStore, Done, Holdings, IDEM_TABLE, POINTS_PREFIX, VersionTask,
    Watched, claim_store,
};
use crate::events::OrderPaid;
use crate::points::PointsError;
use crate::stream::{EventStream as _, RedisStream, StreamError};

/// The consumer group of a chaos run.
pub const GROUP: &str = "chaos";

/// Which strategy guards a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `strategy = "tx"`: the points service's credit.
    Tx,
    /// `strategy = "version"`.
    Version,
    /// `strategy = "state"`.
    State,
    /// The plain claim strategy (the default), on Redis.
    Claim,
}

impl Kind {
    /// Every strategy, in the order keys are dealt to them.
    pub const ALL: [Self; 4] = [Self::Tx, Self::Version, Self::State, Self::Claim];

    /// The strategy's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tx => "tx",
            Self::Version => "version",
            Self::State => "state",
            Self::Claim => "claim",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// One task on the stream: apply `amount` to `key` once, with the strategy `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The business key.
    pub key: String,
    /// The strategy.
    pub kind: Kind,
    /// The user (the points credit's).
    pub user_id: i64,
    /// The amount (points for `tx`).
    pub amount: i64,
}

impl Task {
    /// The `OrderPaid` event a `tx` task is: `amount` points are `amount × 100` cents.
    pub fn order_paid(&self) -> OrderPaid {
        let cents = u64::try_from(self.amount).unwrap_or(0).saturating_mul(100);
        OrderPaid::new(self.key.clone(), self.user_id, cents)
    }
}

/// What went wrong in a chaos run (not a finding: those are in the [`Report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChaosError {
    /// idem's error.
    #[error(transparent)]
    Idem(#[from] Error),
    /// The SQL database's.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The points service's.
    #[error(transparent)]
    Points(#[from] PointsError),
    /// The stream's.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Redis', outside the stream and the store.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A consumer process could not be started, signalled or read.
    #[error("consumer process: {0}")]
    Process(String),
    /// The settings cannot make a run.
    #[error("invalid settings: {0}")]
    Config(String),
    /// The consumers stopped making progress.
    #[error("no progress for {0:?}: {1}")]
    Stuck(Duration, String),
}

/// The settings of a run.
#[derive(Clone, Debug)]
pub struct Config {
    /// `postgres://…` or `mysql://…`.
    pub database_url: String,
    /// The Redis of the stream and of the `claim` handler's records.
    pub redis_url: String,
    /// Stream entries to publish, duplicates included.
    pub deliveries: usize,
    /// The share of `deliveries` that are duplicate publishes, from 0 to 0.9.
    pub duplicates: f64,
    /// Consumer processes running at once.
    pub consumers: usize,
    /// Consumers to kill with `SIGKILL` mid-handler (each is replaced at once).
    pub kills: usize,
    /// Consumers to freeze with `SIGSTOP` for `stall_for`.
    pub stalls: usize,
    /// How long each body goes on after writing its effect: the window the kills land in.
    pub pause: Duration,
    /// How long a frozen consumer stays frozen: longer than the `claim` lease (2 s) and
    /// `min_idle`, so its keys are taken over.
    pub stall_for: Duration,
    /// Entries pending this long on a consumer are taken over by another.
    pub min_idle: Duration,
    /// The seed of the plan and of the kill points.
    pub seed: u64,
    /// The executable whose `consume` subcommand is a consumer (the `chaos` binary).
    pub program: PathBuf,
    /// Print progress lines while running.
    pub progress: bool,
    /// Fail when nothing is acknowledged for this long.
    pub stuck_after: Duration,
}

impl Config {
    /// The CI-sized defaults for `database_url` and `redis_url`, run by `program`.
    pub fn new(database_url: &str, redis_url: &str, program: PathBuf) -> Self {
        Self {
            database_url: database_url.to_owned(),
            redis_url: redis_url.to_owned(),
            deliveries: 4_000,
            duplicates: 0.35,
            consumers: 4,
            kills: 10,
            stalls: 2,
            pause: Duration::from_millis(5),
            stall_for: Duration::from_secs(4),
            min_idle: Duration::from_secs(1),
            seed: 1,
            program,
            progress: false,
            stuck_after: Duration::from_secs(120),
        }
    }
}

/// What the consumers reported, counted from their lines.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Handler calls started.
    pub handled: u64,
    /// Of them, on an entry delivered before (taken over from a dead or frozen consumer).
    pub redelivered: u64,
    /// Bodies that wrote their effect.
    pub bodies: u64,
    /// Claims that took a key over from a holder whose lease ran out.
    pub takeovers: u64,
    /// Outcomes by strategy and name (`applied`, `duplicate`, `busy`, `fenced`, `error`,
    /// `forgotten`).
    pub outcomes: BTreeMap<(Kind, String), u64>,
    /// Entries that were not tasks.
    pub bad: u64,
}

impl Counts {
    fn outcome(&self, kind: Kind, name: &str) -> u64 {
        self.outcomes
            .get(&(kind, name.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn total(&self, name: &str) -> u64 {
        Kind::ALL.iter().map(|kind| self.outcome(*kind, name)).sum()
    }

    fn count(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("H"), Some(deliveries), _) => {
                self.handled += 1;
                if deliveries.parse::<u64>().is_ok_and(|n| n > 1) {
                    self.redelivered += 1;
                }
            }
            (Some("B"), ..) => self.bodies += 1,
            (Some("T"), ..) => self.takeovers += 1,
            (Some("O"), Some(kind), Some(outcome)) => match Kind::from_name(kind) {
                Some(kind) => *self.outcomes.entry((kind, outcome.to_owned())).or_default() += 1,
                None => self.bad += 1,
            },
            _ => {}
        }
    }
}

/// The faults done to the consumers of a run.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Consumers killed with `SIGKILL` in the middle of a handler: right after its body wrote
    /// its effect, while it pauses before returning (so before the commit, or for `claim`
    /// before idem's record is completed).
    pub kills: u64,
    /// The kills by the strategy of the handler they interrupted.
    pub kills_in: BTreeMap<Kind, u64>,
    /// Consumers frozen with `SIGSTOP` right after a `claim` body wrote its effect.
    pub stalls: u64,
    /// Consumer processes started, replacements included.
    pub processes: u64,
}

/// One strategy's reconciliation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Business keys of the strategy.
    pub keys: u64,
    /// Keys whose effect is in exactly once.
    pub once: u64,
    /// Keys whose effect is in more than once (for `claim`, a body that ran again after its
    /// holder was killed or frozen: see [`Report::held`]).
    pub doubled: u64,
    /// Keys whose effect is missing.
    pub lost: u64,
    /// Effect rows beyond one per key (for `claim`: bodies that ran again).
    pub extra: u64,
}

/// The figures of a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// `PostgreSQL` or `MySQL`.
    pub database: &'static str,
    /// Stream entries published.
    pub deliveries: u64,
    /// Of them, duplicate publishes of a key.
    pub duplicates: u64,
    /// Business keys.
    pub keys: u64,
    /// The faults done to the consumers.
    pub faults: Faults,
    /// What the consumers reported.
    pub counts: Counts,
    /// By strategy.
    pub reconciled: BTreeMap<Kind, Reconciled>,
    /// For `tx`: users whose balance differs from the sum of their planned credits.
    pub wrong_balances: u64,
    /// How long the consumers took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every guarantee held: nothing lost, nothing doubled by `tx` / `version` /
    /// `state`, no credit forgotten, no more `claim` re-runs than `claim` bodies killed or
    /// frozen.
    pub fn held(&self) -> bool {
        let strict = [Kind::Tx, Kind::Version, Kind::State]
            .iter()
            .all(|kind| self.reconciled.get(kind).is_some_and(|r| r.doubled == 0));
        let lost = self.reconciled.values().map(|r| r.lost).sum::<u64>();
        let claim_reruns = self.reconciled.get(&Kind::Claim).map_or(0, |r| r.extra);
        let claim_faults =
            self.faults.kills_in.get(&Kind::Claim).copied().unwrap_or(0) + self.faults.stalls;
        strict
            && lost == 0
            && self.wrong_balances == 0
            && self.counts.total("forgotten") == 0
            && claim_reruns <= claim_faults
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "chaos run on {} + Redis: {} deliveries ({} duplicate publishes, {:.0} %) of {} keys, \
             {:.1} s",
            self.database,
            self.deliveries,
            self.duplicates,
            percent(self.duplicates, self.deliveries),
            self.keys,
            self.elapsed.as_secs_f64()
        )?;
        let by_kind: Vec<String> = self
            .faults
            .kills_in
            .iter()
            .map(|(kind, n)| format!("{} {n}", kind.name()))
            .collect();
        writeln!(
            f,
            "faults: {} SIGKILLs mid-handler ({}), {} SIGSTOPs of a claim body past its lease, \
             {} consumer processes",
            self.faults.kills,
            by_kind.join(", "),
            self.faults.stalls,
            self.faults.processes
        )?;
        writeln!(
            f,
            "handled {} (redelivered {}), bodies {}, takeovers {}, replays {}, in progress {}, \
             fenced {}, errors {}",
            c.handled,
            c.redelivered,
            c.bodies,
            c.takeovers,
            c.total("duplicate"),
            c.total("busy"),
            c.total("fenced"),
            c.total("error")
        )?;
        writeln!(
            f,
            "| strategy | keys | once | doubled | lost | extra effect rows |\n\
             |---|---:|---:|---:|---:|---:|"
        )?;
        for (kind, r) in &self.reconciled {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} |",
                kind.name(),
                r.keys,
                r.once,
                r.doubled,
                r.lost,
                r.extra
            )?;
        }
        write!(
            f,
            "tx balances wrong: {}, credits idem forgot: {} → {}",
            self.wrong_balances,
            c.total("forgotten"),
            if self.held() { "HELD" } else { "BROKEN" }
        )
    }
}

#[allow(clippy::cast_precision_loss)]
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The planned tasks: one per key, and the order of the stream's entries.
struct Plan {
    tasks: Vec<Task>,
    entries: Vec<usize>,
}

impl Plan {
    fn new(config: &Config) -> Result<Self, ChaosError> {
        if !(0.0..=0.9).contains(&config.duplicates) {
            return Err(ChaosError::Config(format!(
                "duplicates is a share from 0 to 0.9, not {}",
                config.duplicates
            )));
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let duplicates = (config.deliveries as f64 * config.duplicates).round() as usize;
        let keys = config.deliveries.saturating_sub(duplicates);
        if keys < Kind::ALL.len() {
            return Err(ChaosError::Config(format!(
                "{} deliveries leave fewer than 4 keys",
                config.deliveries
            )));
        }
        let tasks: Vec<Task> = (0..keys)
            .map(|i| Task {
                key: format!("K{i:07}"),
                kind: Kind::ALL[i % Kind::ALL.len()],
                user_id: i64::try_from(i % 97).unwrap_or(0) + 1,
                amount: i64::try_from(i % 50).unwrap_or(0) + 1,
            })
            .collect();
        let mut rng = fastrand::Rng::with_seed(config.seed);
        // Each key once, in a shuffled order; then the duplicates, half of them close
        // behind the first publish (handled at the same time), half anywhere.
        let mut order: Vec<usize> = (0..keys).collect();
        rng.shuffle(&mut order);
        let mut placed: Vec<(f64, usize)> = order
            .iter()
            .enumerate()
            .map(|(position, &task)| (position as f64, task))
            .collect();
        let mut position_of = vec![0.0; keys];
        for (position, &task) in order.iter().enumerate() {
            position_of[task] = position as f64;
        }
        for _ in 0..duplicates {
            let task = rng.usize(..keys);
            let position = if rng.bool() {
                position_of[task] + 1.0 + rng.f64() * 24.0
            } else {
                rng.f64() * keys as f64
            };
            placed.push((position, task));
        }
        placed.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Self {
            tasks,
            entries: placed.into_iter().map(|(_, task)| task).collect(),
        })
    }

    fn duplicates(&self) -> u64 {
        (self.entries.len() - self.tasks.len()) as u64
    }
}

/// A consumer process and what the orchestrator knows of it.
struct Slot {
    child: Child,
    pid: Pid,
    generation: u64,
    frozen_until: Option<Instant>,
}

/// A line from a consumer: its slot, generation, and the line.
type Line = (usize, u64, String);

/// Runs a chaos run on `DB` and returns its figures (check [`Report::held`]).
///
/// # Errors
///
/// When a server cannot be reached, a consumer cannot be started, or the consumers stop
/// making progress: not a finding about idem, a failed run.
pub async fn run<DB: ChaosDb>(config: &Config) -> Result<Report, ChaosError> {
    let plan = Plan::new(config)?;
    let pool = DB::connect_pool(&config.database_url).await?;
    DB::reset(&pool).await?;
    let of = |kind: Kind| -> Vec<String> {
        plan.tasks
            .iter()
            .filter(|task| task.kind == kind)
            .map(|task| task.key.clone())
            .collect()
    };
    DB::seed(&pool, &of(Kind::Version), &of(Kind::State)).await?;

    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let stream_key = format!("chaos.{run_id}");
    let prefix = format!("chaos_{run_id}");
    let client = redis::Client::open(config.redis_url.as_str())?;
    let mut redis = ConnectionManager::new(client).await?;
    let stream = RedisStream::connect(&config.redis_url, &stream_key).await?;
    stream.create_group(GROUP).await?;
    publish(&mut redis, &stream_key, &plan).await?;
    progress(
        config,
        &format!(
            "published {} entries ({} duplicates) of {} keys to {stream_key}",
            plan.entries.len(),
            plan.duplicates(),
            plan.tasks.len()
        ),
    );

    let started = Instant::now();
    let outcome = Orchestra::new(config, &stream_key, &prefix)
        .conduct(&mut redis, plan.entries.len())
        .await;
    let elapsed = started.elapsed();
    let cleanup = cleanup(&mut redis, &stream_key, &prefix).await;
    let (counts, faults) = outcome?;
    cleanup?;

    let holdings = DB::holdings(&pool).await?;
    let (reconciled, wrong_balances) = reconcile(&plan, &holdings);
    Ok(Report {
        database: DB::NAME,
        deliveries: plan.entries.len() as u64,
        duplicates: plan.duplicates(),
        keys: plan.tasks.len() as u64,
        faults,
        counts,
        reconciled,
        wrong_balances,
        elapsed,
    })
}

fn progress(config: &Config, line: &str) {
    if config.progress {
        println!("chaos: {line}");
    }
}

/// `XADD`s every planned entry, pipelined.
async fn publish(
    redis: &mut ConnectionManager,
    stream: &str,
    plan: &Plan,
) -> Result<(), ChaosError> {
    for batch in plan.entries.chunks(1_000) {
        let mut pipe = redis::pipe();
        for &task in batch {
            let event = serde_json::to_string(&plan.tasks[task]).map_err(StreamError::Encode)?;
            pipe.xadd(stream, "*", &[("event", event)]).ignore();
        }
        pipe.exec_async(redis).await?;
    }
    Ok(())
}

/// Deletes the run's stream and the `claim` handler's records.
async fn cleanup(
    redis: &mut ConnectionManager,
    stream: &str,
    prefix: &str,
) -> Result<(), ChaosError> {
    let _: () = redis.del(stream).await?;
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = redis.scan_match::<_, String>(format!("{prefix}:*")).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
    }
    for batch in keys.chunks(500) {
        let _: () = redis.del(batch).await?;
    }
    Ok(())
}

/// Compares the database with the plan.
fn reconcile(plan: &Plan, holdings: &Holdings) -> (BTreeMap<Kind, Reconciled>, u64) {
    let mut reconciled: BTreeMap<Kind, Reconciled> = BTreeMap::new();
    let mut balances: BTreeMap<i64, i64> = BTreeMap::new();
    for task in &plan.tasks {
        let effects = holdings
            .effects
            .get(&(task.kind.name().to_owned(), task.key.clone()))
            .copied()
            .unwrap_or(0);
        let times = match task.kind {
            Kind::Tx => {
                *balances.entry(task.user_id).or_default() += task.amount;
                match holdings.ledger.get(&task.key) {
                    Some(&(user, points)) if (user, points) == (task.user_id, task.amount) => 1,
                    Some(_) => 2,
                    None => 0,
                }
            }
            Kind::Version => match holdings.accounts.get(&task.key) {
                Some(&(amount, 1)) if amount == task.amount && effects == 1 => 1,
                Some(&(0, 0)) if effects == 0 => 0,
                _ => effects.max(2),
            },
            Kind::State => match holdings.orders.get(&task.key).map(String::as_str) {
                Some("Paid") if effects == 1 => 1,
                Some("Created") if effects == 0 => 0,
                _ => effects.max(2),
            },
            Kind::Claim => effects,
        };
        let entry = reconciled.entry(task.kind).or_default();
        entry.keys += 1;
        entry.extra += u64::try_from(effects.saturating_sub(1)).unwrap_or(0);
        match times {
            0 => entry.lost += 1,
            1 => entry.once += 1,
            _ => entry.doubled += 1,
        }
    }
    let wrong_balances = balances
        .iter()
        .filter(|(user, points)| holdings.balances.get(user) != Some(points))
        .count() as u64;
    (reconciled, wrong_balances)
}

/// The consumer processes of a run, and the faults done to them.
struct Orchestra<'a> {
    config: &'a Config,
    stream: &'a str,
    prefix: &'a str,
    slots: Vec<Slot>,
    lines: mpsc::UnboundedSender<Line>,
    received: mpsc::UnboundedReceiver<Line>,
    counts: Counts,
    kills: u64,
    kills_in: BTreeMap<Kind, u64>,
    stalls: u64,
    processes: u64,
    /// The faults still to do, the next last: `(strategy of the handler, freeze?)`.
    schedule: Vec<(Kind, bool)>,
    rng: fastrand::Rng,
}

impl<'a> Orchestra<'a> {
    fn new(config: &'a Config, stream: &'a str, prefix: &'a str) -> Self {
        let (lines, received) = mpsc::unbounded_channel();
        let mut rng = fastrand::Rng::with_seed(config.seed.wrapping_add(1));
        // Kills spread evenly over the strategies, freezes on `claim` handlers, shuffled.
        let mut schedule: Vec<(Kind, bool)> = (0..config.kills)
            .map(|n| (Kind::ALL[n % Kind::ALL.len()], false))
            .chain((0..config.stalls).map(|_| (Kind::Claim, true)))
            .collect();
        rng.shuffle(&mut schedule);
        Self {
            config,
            stream,
            prefix,
            slots: Vec::new(),
            lines,
            received,
            counts: Counts::default(),
            kills: 0,
            kills_in: BTreeMap::new(),
            stalls: 0,
            processes: 0,
            schedule,
            rng,
        }
    }

    fn spawn(&mut self, slot: usize, generation: u64) -> Result<Slot, ChaosError> {
        let url = &self.config.database_url;
        let mut child = Command::new(&self.config.program)
            .arg("consume")
            .args(["--database-url", url])
            .args(["--redis-url", &self.config.redis_url])
            .args(["--stream", self.stream])
            .args(["--prefix", self.prefix])
            .args(["--consumer", &format!("c{slot}-{generation}")])
            .args([
                "--min-idle",
                &self.config.min_idle.as_secs_f64().to_string(),
            ])
            .args(["--pause", &self.config.pause.as_secs_f64().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if self.config.progress {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                ChaosError::Process(format!("{}: {error}", self.config.program.display()))
            })?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
            .ok_or_else(|| ChaosError::Process("a consumer exited at once".to_owned()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ChaosError::Process("no stdout".to_owned()))?;
        let lines = self.lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if lines.send((slot, generation, line)).is_err() {
                    break;
                }
            }
        });
        self.processes += 1;
        Ok(Slot {
            child,
            pid,
            generation,
            frozen_until: None,
        })
    }

    /// Runs the consumers and the faults until every entry is acknowledged.
    async fn conduct(
        mut self,
        redis: &mut ConnectionManager,
        entries: usize,
    ) -> Result<(Counts, Faults), ChaosError> {
        for slot in 0..self.config.consumers.max(1) {
            let started = self.spawn(slot, 0)?;
            self.slots.push(started);
        }
        let result = self.work(redis, entries).await;
        for slot in &mut self.slots {
            // A frozen process cannot die of SIGKILL until it runs again.
            let _ = kill(slot.pid, Signal::SIGCONT);
            let _ = slot.child.start_kill();
            let _ = slot.child.wait().await;
        }
        result?;
        Ok((
            self.counts,
            Faults {
                kills: self.kills,
                kills_in: self.kills_in,
                stalls: self.stalls,
                processes: self.processes,
            },
        ))
    }

    async fn work(
        &mut self,
        redis: &mut ConnectionManager,
        entries: usize,
    ) -> Result<(), ChaosError> {
        // Spread the faults over the bodies the run will see (about one per key).
        let bodies = (entries as f64 * (1.0 - self.config.duplicates)).max(1.0);
        let faults = (self.config.kills + self.config.stalls + 1) as f64;
        let every = (bodies * 0.8 / faults).max(1.0);
        let mut next_fault = every * (0.5 + self.rng.f64());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_progress = (Instant::now(), usize::MAX);
        let mut last_report = Instant::now();
        let mut drained_ticks = 0;
        loop {
            tokio::select! {
                line = self.received.recv() => {
                    let Some((slot, generation, line)) = line else { break };
                    if self.slots.get(slot).is_none_or(|s| s.generation != generation) {
                        continue;
                    }
                    self.counts.count(&line);
                    // A body has written its effect and pauses before it returns.
                    let kind = line.strip_prefix("B ").and_then(Kind::from_name);
                    if let Some(kind) = kind
                        && self.counts.bodies as f64 >= next_fault
                        && self.fault(slot, kind).await?
                    {
                        next_fault += every * (0.5 + self.rng.f64());
                    }
                }
                _ = tick.tick() => {
                    self.thaw();
                    let (pending, undelivered) = group_state(redis, self.stream).await?;
                    let open = pending.saturating_add(undelivered);
                    if open == 0 {
                        if !self.all_faults_done() {
                            return Err(ChaosError::Config(format!(
                                "the run drained after {} of {} kills and {} of {} stalls: \
                                 give it more deliveries",
                                self.kills, self.config.kills, self.stalls, self.config.stalls
                            )));
                        }
                        // Every frozen consumer is awake: give the last of them a moment to
                        // report how its late completion was answered.
                        if self.slots.iter().all(|slot| slot.frozen_until.is_none()) {
                            drained_ticks += 1;
                            if drained_ticks >= 4 {
                                return Ok(());
                            }
                        }
                    } else {
                        drained_ticks = 0;
                    }
                    if open != last_progress.1 {
                        last_progress = (Instant::now(), open);
                    } else if open > 0 && last_progress.0.elapsed() > self.config.stuck_after {
                        return Err(ChaosError::Stuck(
                            self.config.stuck_after,
                            format!("{pending} entries pending, {undelivered} not delivered"),
                        ));
                    }
                    if self.config.progress && last_report.elapsed() > Duration::from_secs(5) {
                        last_report = Instant::now();
                        progress(self.config, &format!(
                            "{} handled, {} bodies, {} kills, {} stalls, {open} entries open",
                            self.counts.handled, self.counts.bodies, self.kills, self.stalls
                        ));
                    }
                }
            }
        }
        Err(ChaosError::Process(
            "the consumers' output ended".to_owned(),
        ))
    }

    fn all_faults_done(&self) -> bool {
        self.kills >= self.config.kills as u64 && self.stalls >= self.config.stalls as u64
    }

    /// Does the next scheduled fault to the consumer in `slot`, which is in the middle of a
    /// `kind` handler, if that fault is for a `kind` handler: a `SIGSTOP` (of `claim`
    /// handlers only, whose lease the freeze outlives) or a `SIGKILL` (a `tx` handler after a
    /// random pause of up to 3 ms, inside its transaction). Returns whether it did.
    async fn fault(&mut self, slot: usize, kind: Kind) -> Result<bool, ChaosError> {
        let Some(&(target, freeze)) = self.schedule.last() else {
            return Ok(false);
        };
        if target != kind || self.slots[slot].frozen_until.is_some() {
            return Ok(false);
        }
        self.schedule.pop();
        if freeze {
            kill(self.slots[slot].pid, Signal::SIGSTOP)
                .map_err(|error| ChaosError::Process(format!("SIGSTOP: {error}")))?;
            self.slots[slot].frozen_until = Some(Instant::now() + self.config.stall_for);
            self.stalls += 1;
            return Ok(true);
        }
        let generation = self.slots[slot].generation + 1;
        let old = &mut self.slots[slot];
        old.child
            .start_kill()
            .map_err(|error| ChaosError::Process(format!("SIGKILL: {error}")))?;
        let _ = old.child.wait().await;
        self.kills += 1;
        *self.kills_in.entry(kind).or_default() += 1;
        self.slots[slot] = self.spawn(slot, generation)?;
        Ok(true)
    }

    /// Wakes the frozen consumers whose time is up.
    fn thaw(&mut self) {
        for slot in &mut self.slots {
            if slot
                .frozen_until
                .is_some_and(|until| until <= Instant::now())
            {
                let _ = kill(slot.pid, Signal::SIGCONT);
                slot.frozen_until = None;
            }
        }
    }
}

/// The group's pending entries and the entries not delivered yet.
async fn group_state(
    redis: &mut ConnectionManager,
    stream: &str,
) -> Result<(usize, usize), ChaosError> {
    let info: redis::streams::StreamInfoGroupsReply = redis.xinfo_groups(stream).await?;
    let group = info
        .groups
        .into_iter()
        .find(|group| group.name == GROUP)
        .ok_or_else(|| ChaosError::Config(format!("the group {GROUP} is gone")))?;
    Ok((group.pending, group.lag.unwrap_or(usize::MAX)))
}
