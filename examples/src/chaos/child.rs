//! One chaos consumer: a process the orchestrator starts, kills and stops. It reads the run's
//! stream through the consumer group, takes over what dead consumers left pending, runs each
//! task's handler and acknowledges the entry when the handler succeeded or found a duplicate.
//!
//! It reports on stdout, one line per event, for the orchestrator to count and to time its
//! kills by:
//!
//! | line | meaning |
//! |---|---|
//! | `R` | connected, consuming |
//! | `H <deliveries> <strategy>` | a task's handler starts (the entry's delivery count) |
//! | `B <strategy>` | a body has written its effect and is about to return |
//! | `T <fence>` | a claim took a key over from a holder whose lease ran out |
//! | `O <strategy> <applied\|duplicate\|busy\|fenced\|error\|bad>` | the handler's outcome |

use std::io::Write as _;
use std::time::Duration;

use idem_runtime::Error;

use super::work::{ChaosDb, ClaimStore, Done, POINTS_PREFIX, claim_store};
use super::{ChaosError, GROUP, Kind, Task};
use crate::points::{Outcome, Points, PointsError, Tables};
use crate::stream::{Entry, EventStream, RedisStream, SCAN_START};

/// Writes one report line to stdout. A closed stdout (the orchestrator is gone) ends the
/// process: nobody is left to count.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").is_err() || out.flush().is_err() {
        std::process::exit(0);
    }
}

/// What a consumer process needs to know.
#[derive(Clone, Debug)]
pub struct ChildConfig {
    /// The SQL database.
    pub database_url: String,
    /// The Redis with the stream and the `claim` handler's records.
    pub redis_url: String,
    /// The stream of the run.
    pub stream: String,
    /// The Redis key prefix of the `claim` handler's records.
    pub prefix: String,
    /// This consumer's name in the group.
    pub consumer: String,
    /// Entries pending this long on another consumer are taken over.
    pub min_idle: Duration,
    /// How long each body goes on after writing its effect (the window kills land in).
    pub pause: Duration,
}

/// Consumes until killed. Returns only on a setup error.
///
/// # Errors
///
/// When the database or Redis cannot be reached at the start.
pub async fn consume<DB: ChaosDb>(config: &ChildConfig) -> Result<(), ChaosError> {
    let pool = DB::connect_pool(&config.database_url).await?;
    let points = Points::<DB>::with_tables(
        DB::idem_store(pool.clone())?,
        Tables::with_prefix(POINTS_PREFIX)?,
    )
    .pause_each_credit(config.pause, |_| say("B tx"));
    let claims = claim_store(&config.redis_url, &config.prefix).await?;
    let stream = RedisStream::connect(&config.redis_url, &config.stream).await?;
    let consumer = Consumer {
        pool,
        points,
        claims,
        stream,
        config,
    };
    say("R");
    loop {
        consumer.round().await;
    }
}

struct Consumer<'a, DB: ChaosDb> {
    pool: sqlx::Pool<DB>,
    points: Points<DB>,
    claims: ClaimStore,
    stream: RedisStream,
    config: &'a ChildConfig,
}

impl<DB: ChaosDb> Consumer<'_, DB> {
    /// Takes over what dead consumers left, then reads new entries; handles each.
    async fn round(&self) {
        let name = &self.config.consumer;
        let mut entries = match self
            .stream
            .autoclaim(GROUP, name, self.config.min_idle, SCAN_START, 16)
            .await
        {
            Ok(claimed) => claimed.entries,
            Err(error) => {
                eprintln!("{name}: autoclaim: {error}");
                Vec::new()
            }
        };
        match self
            .stream
            .read_group(GROUP, name, 16, Duration::from_millis(200))
            .await
        {
            Ok(read) => entries.extend(read),
            Err(error) => eprintln!("{name}: read: {error}"),
        }
        if entries.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for entry in &entries {
            self.handle(entry).await;
        }
    }

    async fn handle(&self, entry: &Entry) {
        let Some(task) = entry
            .event
            .as_deref()
            .and_then(|event| serde_json::from_str::<Task>(event).ok())
        else {
            say("O - bad");
            self.ack(entry).await;
            return;
        };
        let kind = task.kind.name();
        say(&format!("H {} {kind}", entry.deliveries));
        let outcome = match task.kind {
            Kind::Tx => match self.points.credit(&entry.id, &task.order_paid()).await {
                Ok(Outcome::Credited(_)) => Ok(Done::Applied),
                Ok(Outcome::Replayed(_)) => Ok(Done::Duplicate),
                Ok(Outcome::InLedger(_)) => {
                    // idem forgot a credit the ledger has: a guarantee broken.
                    say(&format!("O {kind} forgotten"));
                    self.ack(entry).await;
                    return;
                }
                Err(PointsError::Idem(error)) => Err(ChaosError::Idem(error)),
                Err(error) => Err(ChaosError::Points(error)),
            },
            Kind::Version => DB::apply_version(&self.pool, &task, self.config.pause).await,
            Kind::State => DB::apply_state(&self.pool, &task, self.config.pause).await,
            Kind::Claim => {
                DB::apply_claim(&self.claims, &self.pool, &task, self.config.pause).await
            }
        };
        match outcome {
            Ok(Done::Applied) => {
                say(&format!("O {kind} applied"));
                self.ack(entry).await;
            }
            Ok(Done::Duplicate) => {
                say(&format!("O {kind} duplicate"));
                self.ack(entry).await;
            }
            // Left pending: the entry comes back after `min_idle`.
            Err(ChaosError::Idem(Error::InProgress { .. })) => say(&format!("O {kind} busy")),
            Err(ChaosError::Idem(Error::LeaseLost { .. })) => say(&format!("O {kind} fenced")),
            Err(error) => {
                eprintln!("{}: {kind} {}: {error}", self.config.consumer, task.key);
                say(&format!("O {kind} error"));
            }
        }
    }

    async fn ack(&self, entry: &Entry) {
        if let Err(error) = self.stream.ack(GROUP, &entry.id).await {
            // Not acknowledged: it comes back, and idem answers it as a duplicate.
            eprintln!("{}: ack {}: {error}", self.config.consumer, entry.id);
        }
    }
}
