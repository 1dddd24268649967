//! A model-based test of the store protocol, on every store.
//!
//! [`Model`] is a reference implementation of the [`Store`] contract small enough to check by
//! reading: per record key either nothing, an in-progress record (holder, fence, payload,
//! lease end) or a completed one (fence, payload, result, expiry). proptest generates random
//! sequences of claims (3 keys, 2 payloads or none, 3 callers), completions, releases, extends,
//! clock moves (random, and exactly onto a record's deadline ±1 ms) and purges; each sequence
//! runs against a real store and the model step by step, and every answer must be one the
//! model allows. On a difference proptest shrinks the sequence, and the failure prints the
//! shortest one found with what the store answered at each step.
//!
//! # What the model encodes (read off `store/mod.rs`, `store/memory.rs`, `sql/mod.rs` and the claim of each
//! SQL dialect, and the Lua of `redis.rs`)
//!
//! * A record is **live** while its deadline is in the future: the lease end for an
//!   in-progress record, the expiry for a completed one (`deadline > now`; at `deadline ==
//!   now` it is dead).
//! * **claim** of a live record: [`Claim::Mismatch`] if both the stored and the given
//!   fingerprint are present and differ; otherwise [`Claim::Completed`] with the stored bytes or
//!   [`Claim::InProgress`] with exactly `lease_until - now` (the stores count whole ms). Of a
//!   dead record: taken over, fence + 1, the new claim's fingerprint (or none) replaces the
//!   old one, no fingerprint comparison. Of no record: fence 1. The lease runs `now + lease`.
//! * **complete / release / extend** succeed only for the current holder of an in-progress
//!   record (same claim: owner token and fence), **whether or not its lease has run out**: a
//!   holder nobody took over may still complete, release or extend (which revives the
//!   lease). Anything else — a completed record, a record taken over or purged and recreated,
//!   no record — is [`Error::LeaseLost`] and changes nothing. complete sets expiry to
//!   `now + ttl`; release ends the lease now (the record is dead at once); extend moves the
//!   lease end to `now + duration` and returns it.
//! * **purge_expired(limit)** deletes dead records, at most `limit`, and says how many. A
//!   purged key starts again at fence 1, and the purged holder's lease is lost.
//!
//! # Fences
//!
//! Every store numbers fences the same way (1 for a key without a record, +1 on every
//! takeover, 1 again once the record is deleted), so fences are compared **exactly**, not just
//! as "greater than the previous one".
//!
//! # Where a store may legitimately differ, and how the comparison allows it
//!
//! * **Which records a purge deletes** when more are dead than `limit`: no store promises an
//!   order (SQLite and PostgreSQL delete any `limit` of them, MySQL the oldest expiry first,
//!   Redis in `SCAN` order, memory in hash order). The model then branches into every
//!   possible choice, each with the same count, and later answers (a claim's fence, a lost
//!   lease) decide between them: the comparison keeps the set of model states that agree with
//!   everything the store said so far.
//! * **Redis deletes a completed record by itself** after a relative `PEXPIRE` of its ttl in
//!   *real* time, whatever the `ManualClock` says. Completions with a ttl shorter than
//!   [`REDIS_SELF_EXPIRY_MS`] may therefore vanish at any later step (the next claim then gets
//!   fence 1, and a purge does not count them); the model branches on that too. Longer ttls,
//!   and in-progress records (kept a grace of 10 minutes past their lease), outlive any case.
//!
//! Each case runs on the store built once per test, with a fresh scope (so no record of
//! another case can answer a claim) after a purge of everything (so purge counts are the
//! case's own), on a `ManualClock` set back to [`START`].
//!
//! Cases per store: `IDEM_MODEL_CASES`, else 1024 on memory and 256 on the others;
//! `PROPTEST_RNG_SEED` replays a run (the seed is printed on failure).

#![deny(unused_qualifications, clippy::all)]

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::clock::ManualClock;
use idem_runtime::{Claim, Error, Fingerprint, Lease, MemoryStore, RecordKey, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// Where every case's clock starts.
const START: i64 = 1_700_000_000_000;

/// A time past every deadline a case can reach (leases and ttls are at most
/// [`HUGE_MS`] each, 60 steps at most), and still exact in Redis's Lua doubles.
const WIPE_AT: i64 = 1 << 52;

/// The longest lease or ttl generated: about 317 years.
const HUGE_MS: u64 = 10_000_000_000_000;

/// Completions on Redis with a ttl below this (real milliseconds) may be deleted by Redis
/// before the case ends; longer ones outlive any case.
const REDIS_SELF_EXPIRY_MS: u64 = 30_000;

/// How many keys, payloads and callers the sequences use.
const KEYS: usize = 3;
const PAYLOADS: usize = 2;
const CALLERS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// One step of a sequence.
#[derive(Clone, Debug)]
enum Op {
    /// `caller` claims key `key` with payload `payload` (none: no fingerprint).
    Claim {
        caller: usize,
        key: usize,
        payload: Option<usize>,
        lease_ms: u64,
    },
    /// `caller` completes with one of the leases it got (`nth` from its latest, wrapping).
    Complete {
        caller: usize,
        nth: usize,
        result: Vec<u8>,
        ttl_ms: u64,
    },
    /// `caller` releases one of its leases.
    Release { caller: usize, nth: usize },
    /// `caller` extends one of its leases.
    Extend {
        caller: usize,
        nth: usize,
        lease_ms: u64,
    },
    /// The clock moves forward.
    Advance { ms: u64 },
    /// The clock moves to key `key`'s deadline (lease end or expiry) plus `offset` ms, if
    /// that is ahead.
    ToDeadline { key: usize, offset: i64 },
    /// `purge_expired(limit)`.
    Purge { limit: u32 },
}

fn lease_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0_u64),
        1 => Just(1_u64),
        6 => 1_u64..=60_000,
        1 => Just(HUGE_MS),
    ]
}

fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0_u64),
        1 => Just(1_u64),
        2 => 2_u64..=5_000,
        6 => REDIS_SELF_EXPIRY_MS..=120_000,
        1 => Just(HUGE_MS),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let nth = prop_oneof![4 => Just(0_usize), 1 => 1_usize..3];
    prop_oneof![
        30 => (0..CALLERS, 0..KEYS, proptest::option::weighted(0.8, 0..PAYLOADS), lease_ms())
            .prop_map(|(caller, key, payload, lease_ms)| Op::Claim { caller, key, payload, lease_ms }),
        18 => (0..CALLERS, nth.clone(), proptest::collection::vec(any::<u8>(), 0..12), ttl_ms())
            .prop_map(|(caller, nth, result, ttl_ms)| Op::Complete { caller, nth, result, ttl_ms }),
        7 => (0..CALLERS, nth.clone()).prop_map(|(caller, nth)| Op::Release { caller, nth }),
        9 => (0..CALLERS, nth, lease_ms())
            .prop_map(|(caller, nth, lease_ms)| Op::Extend { caller, nth, lease_ms }),
        14 => prop_oneof![Just(1_u64), 0_u64..=2_000, 0_u64..=70_000]
            .prop_map(|ms| Op::Advance { ms }),
        12 => (0..KEYS, -1_i64..=1).prop_map(|(key, offset)| Op::ToDeadline { key, offset }),
        7 => prop_oneof![Just(0_u32), 1_u32..=2, Just(100)].prop_map(|limit| Op::Purge { limit }),
    ]
}

/// 20 to 60 steps. A step is an `Option`, rarely `None` (nothing happens): every step shrinks
/// to `None` in one move, so a failing sequence shrinks below its 20 steps (the transcript
/// leaves the `None`s out).
fn sequences() -> impl Strategy<Value = Vec<Option<Op>>> {
    proptest::collection::vec(proptest::option::weighted(0.97, op()), 20..=60)
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// Which claim holds a lease: its index among the case's acquired leases.
type LeaseId = usize;

/// A record of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Record {
    InProgress {
        holder: LeaseId,
        fence: u64,
        payload: Option<usize>,
        lease_until: i64,
    },
    Completed {
        fence: u64,
        payload: Option<usize>,
        result: Vec<u8>,
        expires_at: i64,
        /// Redis may delete it by its own clock at any time.
        may_vanish: bool,
    },
}

impl Record {
    fn deadline(&self) -> i64 {
        match self {
            Record::InProgress { lease_until, .. } => *lease_until,
            Record::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn is_live(&self, now: i64) -> bool {
        self.deadline() > now
    }
}

/// The records of the model, one slot per key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    records: [Option<Record>; KEYS],
}

/// What the store may do with its records on its own (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    /// Records go only when purged.
    Exact,
    /// Redis: completions with a short ttl may vanish at any time.
    Redis,
}

/// A step with the lease it uses resolved.
#[derive(Clone, Debug)]
enum Call {
    Claim {
        key: usize,
        payload: Option<usize>,
        lease_ms: u64,
        /// The id the lease gets if the claim acquires.
        id: LeaseId,
    },
    Complete {
        key: usize,
        id: LeaseId,
        result: Vec<u8>,
        ttl_ms: u64,
    },
    Release {
        key: usize,
        id: LeaseId,
    },
    Extend {
        key: usize,
        id: LeaseId,
        lease_ms: u64,
    },
    Purge {
        limit: u32,
    },
}

/// An answer, of the store or of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Acquired {
        fence: u64,
        until: i64,
    },
    Completed(Vec<u8>),
    InProgress {
        retry_after: Duration,
    },
    Mismatch,
    Done,
    Extended {
        until: i64,
    },
    LeaseLost,
    Purged(u64),
    /// The clock now reads this.
    Clock(i64),
    /// The step did nothing (the caller held no lease, or the deadline was behind).
    Skipped,
    /// Anything else the store said: never what the model allows.
    Unexpected(String),
}

impl Answer {
    /// The kind of answer, for the coverage count; `None` for clock moves and skipped steps.
    fn kind(&self) -> Option<&'static str> {
        Some(match self {
            Answer::Acquired { .. } => "acquired",
            Answer::Completed(_) => "completed",
            Answer::InProgress { .. } => "in progress",
            Answer::Mismatch => "mismatch",
            Answer::Done => "ok",
            Answer::Extended { .. } => "extended",
            Answer::LeaseLost => "lease lost",
            Answer::Purged(0) => "purged none",
            Answer::Purged(_) => "purged some",
            Answer::Clock(_) | Answer::Skipped | Answer::Unexpected(_) => return None,
        })
    }
}

/// Every kind of answer a run of [`MIN_CASES_FOR_COVERAGE`] cases or more must have seen.
const KINDS: [&str; 9] = [
    "acquired",
    "completed",
    "in progress",
    "mismatch",
    "ok",
    "extended",
    "lease lost",
    "purged none",
    "purged some",
];

/// Below this many cases a run is too short to be sure to see every kind of answer.
const MIN_CASES_FOR_COVERAGE: u32 = 32;

/// How often the store gave each kind of answer (and the model agreed), over a whole run.
type Coverage = Mutex<BTreeMap<&'static str, usize>>;

fn deadline(now: i64, ms: u64) -> i64 {
    now.saturating_add(i64::try_from(ms).expect("generated durations fit in i64"))
}

impl Model {
    /// Every state the model may be in after `call` at `now`, with what it answers there.
    fn step(&self, call: &Call, now: i64, profile: Profile) -> Vec<(Model, Answer)> {
        let mut next = self.clone();
        let answer = match *call {
            Call::Claim {
                key,
                payload,
                lease_ms,
                id,
            } => match &self.records[key] {
                Some(record) if record.is_live(now) => {
                    let stored = match record {
                        Record::InProgress { payload, .. } | Record::Completed { payload, .. } => {
                            *payload
                        }
                    };
                    match (stored, payload, record) {
                        (Some(stored), Some(given), _) if stored != given => Answer::Mismatch,
                        (_, _, Record::Completed { result, .. }) => {
                            Answer::Completed(result.clone())
                        }
                        (_, _, Record::InProgress { lease_until, .. }) => Answer::InProgress {
                            retry_after: Duration::from_millis(
                                u64::try_from(lease_until - now).expect("a live lease"),
                            ),
                        },
                    }
                }
                dead_or_none => {
                    let fence = match dead_or_none {
                        Some(
                            Record::InProgress { fence, .. } | Record::Completed { fence, .. },
                        ) => fence + 1,
                        None => 1,
                    };
                    let until = deadline(now, lease_ms);
                    next.records[key] = Some(Record::InProgress {
                        holder: id,
                        fence,
                        payload,
                        lease_until: until,
                    });
                    Answer::Acquired { fence, until }
                }
            },
            Call::Complete {
                key,
                id,
                ref result,
                ttl_ms,
            } => match &self.records[key] {
                Some(Record::InProgress {
                    holder,
                    fence,
                    payload,
                    ..
                }) if *holder == id => {
                    next.records[key] = Some(Record::Completed {
                        fence: *fence,
                        payload: *payload,
                        result: result.clone(),
                        expires_at: deadline(now, ttl_ms),
                        may_vanish: profile == Profile::Redis && ttl_ms < REDIS_SELF_EXPIRY_MS,
                    });
                    Answer::Done
                }
                _ => Answer::LeaseLost,
            },
            Call::Release { key, id } => match &mut next.records[key] {
                Some(Record::InProgress {
                    holder,
                    lease_until,
                    ..
                }) if *holder == id => {
                    *lease_until = now;
                    Answer::Done
                }
                _ => Answer::LeaseLost,
            },
            Call::Extend { key, id, lease_ms } => match &mut next.records[key] {
                Some(Record::InProgress {
                    holder,
                    lease_until,
                    ..
                }) if *holder == id => {
                    *lease_until = deadline(now, lease_ms);
                    Answer::Extended {
                        until: *lease_until,
                    }
                }
                _ => Answer::LeaseLost,
            },
            Call::Purge { limit } => return self.purge(now, limit),
        };
        vec![(next, answer)]
    }

    /// Every way of deleting `min(limit, dead)` of the dead records.
    fn purge(&self, now: i64, limit: u32) -> Vec<(Model, Answer)> {
        let dead: Vec<usize> = (0..KEYS)
            .filter(|&key| self.records[key].as_ref().is_some_and(|r| !r.is_live(now)))
            .collect();
        let count = dead.len().min(limit as usize);
        let mut outcomes = Vec::new();
        for chosen in 0_u32..(1 << dead.len()) {
            if chosen.count_ones() as usize != count {
                continue;
            }
            let mut next = self.clone();
            for (bit, &key) in dead.iter().enumerate() {
                if chosen & (1 << bit) != 0 {
                    next.records[key] = None;
                }
            }
            outcomes.push((next, Answer::Purged(count as u64)));
        }
        outcomes
    }

    /// This state and every state with some of its vanishing records gone.
    fn vanishings(&self) -> Vec<Model> {
        let vanishing: Vec<usize> = (0..KEYS)
            .filter(|&key| {
                matches!(
                    self.records[key],
                    Some(Record::Completed {
                        may_vanish: true,
                        ..
                    })
                )
            })
            .collect();
        (0_u32..(1 << vanishing.len()))
            .map(|gone| {
                let mut next = self.clone();
                for (bit, &key) in vanishing.iter().enumerate() {
                    if gone & (1 << bit) != 0 {
                        next.records[key] = None;
                    }
                }
                next
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Running a sequence against a store and the model
// ---------------------------------------------------------------------------------------------

/// A lease a caller got.
struct Held {
    caller: usize,
    key: usize,
    lease: Lease,
}

/// One case: the store, the model states that agree with everything the store said, and the
/// transcript for the failure message.
struct Case<'a, S> {
    store: &'a S,
    coverage: &'a Coverage,
    clock: &'a ManualClock,
    profile: Profile,
    keys: Vec<RecordKey>,
    payloads: Vec<Fingerprint>,
    now: i64,
    candidates: Vec<Model>,
    leases: Vec<Held>,
    /// The lease of the claim being checked, until the model agrees that it acquired.
    pending: Option<Lease>,
    transcript: String,
}

impl<'a, S: Store> Case<'a, S> {
    fn new(store: &'a S, coverage: &'a Coverage, clock: &'a ManualClock, profile: Profile) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let scope = format!("model::case-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let names = [
            "k0".to_owned(),
            "订单-№1 ✓".to_owned(),
            format!("long-{}", "ключ".repeat(40)), // 165 bytes: stored as its hash
        ];
        Self {
            store,
            coverage,
            clock,
            profile,
            keys: names
                .iter()
                .map(|name| RecordKey::new(&scope, name).expect("a non-empty key"))
                .collect(),
            payloads: (0..PAYLOADS)
                .map(|i| Fingerprint::of(&format!("payload-{i}")).expect("a string serializes"))
                .collect(),
            now: START,
            candidates: vec![Model::default()],
            leases: Vec::new(),
            pending: None,
            transcript: String::new(),
        }
    }

    /// The lease `caller` uses for `nth`: its `nth` latest, wrapping; `None` if it has none.
    fn lease_of(&self, caller: usize, nth: usize) -> Option<LeaseId> {
        let mine: Vec<LeaseId> = (0..self.leases.len())
            .filter(|&id| self.leases[id].caller == caller)
            .collect();
        (!mine.is_empty()).then(|| mine[mine.len() - 1 - nth % mine.len()])
    }

    async fn run(&mut self, ops: &[Option<Op>]) -> Result<(), String> {
        for (index, op) in ops.iter().enumerate() {
            if let Some(op) = op {
                self.step(index, op).await?;
            }
        }
        Ok(())
    }

    async fn step(&mut self, index: usize, op: &Op) -> Result<(), String> {
        if self.profile == Profile::Redis {
            let mut all = Vec::new();
            for model in &self.candidates {
                for variant in model.vanishings() {
                    if !all.contains(&variant) {
                        all.push(variant);
                    }
                }
            }
            self.candidates = all;
        }
        let (call, actual) = match *op {
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(ms));
                self.now = deadline(self.now, ms);
                return self.record(index, op, &Answer::Clock(self.now));
            }
            Op::ToDeadline { key, offset } => {
                let target = self.candidates[0].records[key]
                    .as_ref()
                    .map(|record| record.deadline().saturating_add(offset));
                let answer = match target {
                    Some(target) if target > self.now => {
                        self.clock.set(target);
                        self.now = target;
                        Answer::Clock(target)
                    }
                    _ => Answer::Skipped,
                };
                return self.record(index, op, &answer);
            }
            Op::Claim {
                key,
                payload,
                lease_ms,
                ..
            } => {
                let call = Call::Claim {
                    key,
                    payload,
                    lease_ms,
                    id: self.leases.len(),
                };
                let fingerprint = payload.map(|p| self.payloads[p]);
                let found = self
                    .store
                    .claim(
                        &self.keys[key],
                        fingerprint.as_ref(),
                        Duration::from_millis(lease_ms),
                    )
                    .await;
                (call, self.claim_answer(found))
            }
            Op::Complete {
                caller,
                nth,
                ref result,
                ttl_ms,
            } => {
                let Some(id) = self.lease_of(caller, nth) else {
                    return self.record(index, op, &Answer::Skipped);
                };
                let held = &self.leases[id];
                let done = self
                    .store
                    .complete(
                        &self.keys[held.key],
                        &held.lease,
                        result,
                        Duration::from_millis(ttl_ms),
                    )
                    .await;
                let call = Call::Complete {
                    key: held.key,
                    id,
                    result: result.clone(),
                    ttl_ms,
                };
                (call, self.lease_answer(id, done.map(|()| Answer::Done)))
            }
            Op::Release { caller, nth } => {
                let Some(id) = self.lease_of(caller, nth) else {
                    return self.record(index, op, &Answer::Skipped);
                };
                let held = &self.leases[id];
                let done = self.store.release(&self.keys[held.key], &held.lease).await;
                let call = Call::Release { key: held.key, id };
                (call, self.lease_answer(id, done.map(|()| Answer::Done)))
            }
            Op::Extend {
                caller,
                nth,
                lease_ms,
            } => {
                let Some(id) = self.lease_of(caller, nth) else {
                    return self.record(index, op, &Answer::Skipped);
                };
                let held = &self.leases[id];
                let extended = self
                    .store
                    .extend(
                        &self.keys[held.key],
                        &held.lease,
                        Duration::from_millis(lease_ms),
                    )
                    .await;
                let call = Call::Extend {
                    key: held.key,
                    id,
                    lease_ms,
                };
                let answer = match extended {
                    Ok(lease)
                        if lease.owner() == held.lease.owner()
                            && lease.fence() == held.lease.fence() =>
                    {
                        let until = lease.until_millis();
                        self.leases[id].lease = lease;
                        Ok(Answer::Extended { until })
                    }
                    Ok(lease) => Ok(Answer::Unexpected(format!(
                        "extend returned another lease: {lease:?}"
                    ))),
                    Err(error) => Err(error),
                };
                (call, self.lease_answer(id, answer))
            }
            Op::Purge { limit } => {
                let answer = match self.store.purge_expired(limit).await {
                    Ok(deleted) => Answer::Purged(deleted),
                    Err(error) => Answer::Unexpected(format!("{error} ({error:?})")),
                };
                (Call::Purge { limit }, answer)
            }
        };

        let mut agreeing: Vec<Model> = Vec::new();
        let mut allowed: Vec<Answer> = Vec::new();
        for model in &self.candidates {
            for (next, answer) in model.step(&call, self.now, self.profile) {
                if answer == actual {
                    if !agreeing.contains(&next) {
                        agreeing.push(next);
                    }
                } else if !allowed.contains(&answer) {
                    allowed.push(answer);
                }
            }
        }
        if agreeing.is_empty() {
            let _ = writeln!(
                self.transcript,
                "{index:>3}. {} -> {}   <== DIFFERS",
                Shown(op),
                Shown(&actual)
            );
            let allowed: Vec<String> = allowed.iter().map(|a| Shown(a).to_string()).collect();
            return Err(format!(
                "step {index} ({}): the store answered {}, the model allows {}\n\
                 the model's states before the step: {:?}\n\
                 the sequence (times from the start, t+ms), as run:\n{}",
                Shown(op),
                Shown(&actual),
                allowed.join(" or "),
                self.candidates,
                self.transcript
            ));
        }
        self.candidates = agreeing;
        if let Some(kind) = actual.kind() {
            let mut coverage = self.coverage.lock().unwrap_or_else(|e| e.into_inner());
            *coverage.entry(kind).or_default() += 1;
            if matches!(call, Call::Purge { .. }) && self.candidates.len() > 1 {
                *coverage.entry("purge left a choice").or_default() += 1;
            }
        }
        if let (Call::Claim { key, .. }, Answer::Acquired { .. }) = (&call, &actual)
            && let Op::Claim { caller, .. } = *op
        {
            let lease = self
                .pending
                .take()
                .expect("an acquired claim keeps its lease");
            self.leases.push(Held {
                caller,
                key: *key,
                lease,
            });
        }
        self.record(index, op, &actual)
    }

    fn record(&mut self, index: usize, op: &Op, answer: &Answer) -> Result<(), String> {
        let _ = writeln!(
            self.transcript,
            "{index:>3}. {} -> {}",
            Shown(op),
            Shown(answer)
        );
        Ok(())
    }

    fn claim_answer(&mut self, found: Result<Claim, Error>) -> Answer {
        match found {
            Ok(Claim::Acquired(lease)) => {
                if lease.owner().is_empty()
                    || self.leases.iter().any(|h| h.lease.owner() == lease.owner())
                {
                    return Answer::Unexpected(format!(
                        "a lease whose owner token is empty or not new: {lease:?}"
                    ));
                }
                let answer = Answer::Acquired {
                    fence: lease.fence(),
                    until: lease.until_millis(),
                };
                self.pending = Some(lease);
                answer
            }
            Ok(Claim::Completed(result)) => Answer::Completed(result),
            Ok(Claim::InProgress { retry_after }) => Answer::InProgress { retry_after },
            Ok(Claim::Mismatch) => Answer::Mismatch,
            Err(error) => Answer::Unexpected(format!("{error} ({error:?})")),
        }
    }

    /// `outcome` of an operation on lease `id`; `LeaseLost` must name the lease's key and
    /// fence.
    fn lease_answer(&self, id: LeaseId, outcome: Result<Answer, Error>) -> Answer {
        let held = &self.leases[id];
        match outcome {
            Ok(answer) => answer,
            Err(Error::LeaseLost { scope, key, fence })
                if scope == self.keys[held.key].scope()
                    && key == self.keys[held.key].key()
                    && fence == held.lease.fence() =>
            {
                Answer::LeaseLost
            }
            Err(error) => Answer::Unexpected(format!("{error} ({error:?})")),
        }
    }
}

/// An operation or answer as the failure message shows it.
struct Shown<'a, T>(&'a T);

/// Bytes, escaped, at most 24 of them.
fn bytes(data: &[u8]) -> String {
    let mut text = String::from("b\"");
    for &byte in data.iter().take(24) {
        text.extend(std::ascii::escape_default(byte).map(char::from));
    }
    text.push('"');
    if data.len() > 24 {
        let _ = write!(text, "…({} bytes)", data.len());
    }
    text
}

fn ms(ms: u64) -> String {
    if ms == HUGE_MS {
        "HUGE".to_owned()
    } else {
        format!("{ms}ms")
    }
}

impl fmt::Display for Shown<'_, Op> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Op::Claim {
                caller,
                key,
                payload,
                lease_ms,
            } => {
                let payload = payload.map_or("none".to_owned(), |p| format!("p{p}"));
                write!(
                    f,
                    "caller {caller}: claim k{key} payload {payload} lease {}",
                    ms(*lease_ms)
                )
            }
            Op::Complete {
                caller,
                nth,
                result,
                ttl_ms,
            } => write!(
                f,
                "caller {caller}: complete (lease #{nth} from its latest) {} ttl {}",
                bytes(result),
                ms(*ttl_ms)
            ),
            Op::Release { caller, nth } => {
                write!(f, "caller {caller}: release (lease #{nth} from its latest)")
            }
            Op::Extend {
                caller,
                nth,
                lease_ms,
            } => write!(
                f,
                "caller {caller}: extend (lease #{nth} from its latest) by {}",
                ms(*lease_ms)
            ),
            Op::Advance { ms } => write!(f, "clock +{ms}ms"),
            Op::ToDeadline { key, offset } => write!(f, "clock to k{key}'s deadline {offset:+}ms"),
            Op::Purge { limit } => write!(f, "purge_expired({limit})"),
        }
    }
}

impl fmt::Display for Shown<'_, Answer> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Answer::Acquired { fence, until } => {
                write!(f, "Acquired fence {fence} until t+{}", until - START)
            }
            Answer::Completed(result) => write!(f, "Completed({})", bytes(result)),
            Answer::InProgress { retry_after } => {
                write!(f, "InProgress retry_after {retry_after:?}")
            }
            Answer::Mismatch => f.write_str("Mismatch"),
            Answer::Done => f.write_str("Ok"),
            Answer::Extended { until } => write!(f, "Ok, lease until t+{}", until - START),
            Answer::LeaseLost => f.write_str("LeaseLost"),
            Answer::Purged(n) => write!(f, "purged {n}"),
            Answer::Clock(now) => write!(f, "now t+{}", now - START),
            Answer::Skipped => f.write_str("skipped"),
            Answer::Unexpected(what) => write!(f, "UNEXPECTED {what}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------------------------

/// Deletes every record of earlier cases (a purge at a time past all their deadlines) and sets
/// the clock back to [`START`].
async fn wipe<S: Store>(store: &S, clock: &ManualClock) -> Result<(), String> {
    clock.set(WIPE_AT);
    loop {
        match store.purge_expired(10_000).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => return Err(format!("the purge before the case failed: {error}")),
        }
    }
    clock.set(START);
    Ok(())
}

/// How many cases to run: `IDEM_MODEL_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    match std::env::var("IDEM_MODEL_CASES") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("IDEM_MODEL_CASES={value:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs `cases` random sequences on `store` (on `clock`) and the model, on `runtime`; panics
/// with the shortest failing sequence found.
fn check<S: Store>(
    name: &str,
    runtime: &tokio::runtime::Runtime,
    store: &S,
    clock: &ManualClock,
    profile: Profile,
    cases: u32,
) {
    let seed = match std::env::var("PROPTEST_RNG_SEED") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("PROPTEST_RNG_SEED={value:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64),
    };
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let started = Instant::now();
    let coverage = Coverage::default();
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&sequences(), |ops| {
        runtime
            .block_on(async {
                wipe(store, clock).await?;
                Case::new(store, &coverage, clock, profile).run(&ops).await
            })
            .map_err(TestCaseError::fail)
    });
    match outcome {
        Ok(()) => {
            let coverage = coverage.into_inner().unwrap_or_else(|e| e.into_inner());
            let counts: Vec<String> = coverage
                .iter()
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect();
            // Straight to stderr, past the harness's capture: how long each store took.
            let line = format!(
                "model: {name}: {cases} sequences agreed with the model in {:.1?} ({})\n",
                started.elapsed(),
                counts.join(", ")
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            if cases >= MIN_CASES_FOR_COVERAGE {
                let missing: Vec<&str> = KINDS
                    .into_iter()
                    .filter(|kind| !coverage.contains_key(kind))
                    .collect();
                assert!(
                    missing.is_empty(),
                    "{name}: {cases} sequences never got these answers from the store: \
                     {missing:?}; the generator no longer reaches every state"
                );
            }
        }
        Err(TestError::Fail(reason, ops)) => panic!(
            "{name} and the model disagree (PROPTEST_RNG_SEED={seed} replays this run); the \
             shortest failing sequence found ({} steps that do something):\n{reason}",
            ops.iter().flatten().count()
        ),
        Err(TestError::Abort(reason)) => panic!("{name}: proptest gave up: {reason}"),
    }
}

/// A runtime for one store's test: the sequences run one after the other on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Builds the store with `make` on a fresh clock and checks it; `None` (a server that is not
/// there, already reported) checks nothing.
fn check_store<S, F, Fut>(name: &str, profile: Profile, default_cases: u32, make: F)
where
    S: Store,
    F: FnOnce(ManualClock) -> Fut,
    Fut: Future<Output = Option<S>>,
{
    let runtime = runtime();
    let clock = ManualClock::new(START);
    let Some(store) = runtime.block_on(make(clock.clone())) else {
        return;
    };
    check(
        name,
        &runtime,
        &store,
        &clock,
        profile,
        cases(default_cases),
    );
    // The store (its pool, the guard dropping its table) goes while the runtime still runs.
    drop(store);
}

#[test]
fn memory_agrees_with_the_model() {
    check_store("memory", Profile::Exact, 1024, |clock| async move {
        Some(MemoryStore::with_clock(clock))
    });
}

#[test]
fn sqlite_file_agrees_with_the_model() {
    check_store("sqlite (file)", Profile::Exact, 256, |clock| async move {
        Some(idem_tests::sqlite_file::FileStore::open("model", clock).await)
    });
}

#[test]
fn postgres_agrees_with_the_model() {
    check_store("postgres", Profile::Exact, 256, |clock| async move {
        let pool = idem_tests::sql_servers::postgres_pool().await?;
        Some(idem_tests::sql_servers::postgres_store(pool, clock).await)
    });
}

#[test]
fn mysql_agrees_with_the_model() {
    check_store("mysql", Profile::Exact, 256, |clock| async move {
        let pool = idem_tests::sql_servers::mysql_pool().await?;
        Some(idem_tests::sql_servers::mysql_store(pool, clock).await)
    });
}

#[test]
fn redis_agrees_with_the_model() {
    check_store("redis", Profile::Redis, 256, |clock| async move {
        let connection = idem_tests::redis_server::manager().await?;
        Some(idem_tests::redis_server::store(connection, clock))
    });
}
