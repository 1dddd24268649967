//! Property tests of bad input and corrupt state, on every store.
//!
//! * **Inputs** — random scopes, keys and payloads (empty, whitespace only, arbitrary unicode
//!   with control characters and NUL, `sha256:`-prefixed, just under and over the 128-byte
//!   limit, up to 1 MiB) go through [`idem_runtime::run`] and through an `#[idempotent]`
//!   handler. An empty scope or a blank key is a clear error before anything else: the body
//!   does not run and the store is not called. Anything else is idempotent: the body runs
//!   once, a duplicate replays an equal result, the same key with another payload is a
//!   fingerprint mismatch, and exactly one record is written per call site.
//! * **Collisions** — pairs of distinct (scope, key) that look alike (case, trailing space,
//!   zero-width characters, composed and decomposed accents, NUL, separators and braces moved
//!   between scope and key, a long key and the literal text of its hash, long keys one
//!   character apart) are distinct records: each runs its body and replays its own result.
//! * **Corrupt state** — values no claim writes, put straight into a SQL row or a Redis hash
//!   (random result bytes, fingerprints of the wrong length or another payload's, flags out of
//!   range, fences that cannot rise, times of any value, values of the wrong SQLite type,
//!   random and unknown Redis fields, keys of another Redis type). A claim answers
//!   `Error::Decode` (never a panic, never a store error, never another record's or garbled
//!   bytes as a replay), or, for values that are merely unusual, exactly what the protocol
//!   says for them; `run` never runs the body over a record it cannot read; and the other
//!   records of the store still replay, a new key still runs, a purge still works.
//!
//! What the conformance suite and the stores' own tests already check with one fixed value
//! (a garbage result, a 1-byte fingerprint, `completed = 7`, a NULL result, `fence = 0`, a text
//! lease, a string/list/set in place of a Redis hash) is not repeated here for that value: these
//! properties draw the values at random and check the rest of the store afterwards.
//!
//! Cases per property and store: `IDEM_BAD_INPUT_CASES`, else 256 on memory and 128 on the
//! others; `PROPTEST_RNG_SEED` replays a run (the seed is printed on failure).

#![deny(unused_qualifications, clippy::all)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::clock::ManualClock;
use idem_runtime::{
    Claim, Error, Fingerprint, HASHED_PREFIX, Lease, MAX_KEY_BYTES, Policy, RecordKey, Store,
    idempotent,
};
use idem_tests::{AppError, Runs};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use serde::{Deserialize, Serialize};

/// Where every case's clock starts.
const START: i64 = 1_700_000_000_000;

/// A time past every record a case writes: a purge there deletes them all.
const WIPE_AT: i64 = 1 << 52;

/// The scope of the `#[idempotent]` handler.
const HANDLER_SCOPE: &str = "bad_input.echo";

// ---------------------------------------------------------------------------------------------
// Running properties
// ---------------------------------------------------------------------------------------------

/// How many cases to run: `IDEM_BAD_INPUT_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    match std::env::var("IDEM_BAD_INPUT_CASES") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("IDEM_BAD_INPUT_CASES={value:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs `test` on `cases` values of `strategy`; panics with the smallest failing value found.
fn check<T: Strategy>(
    name: &str,
    cases: u32,
    strategy: T,
    test: impl Fn(T::Value) -> Result<(), String>,
) where
    T::Value: Debug,
{
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
        max_shrink_iters: 1024,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let started = Instant::now();
    let outcome =
        TestRunner::new(config).run(&strategy, |value| test(value).map_err(TestCaseError::fail));
    match outcome {
        Ok(()) => {
            // Straight to stderr, past the harness's capture: how long each property took.
            let line = format!(
                "bad_input: {name}: {cases} cases passed in {:.1?}\n",
                started.elapsed()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
        Err(TestError::Fail(reason, value)) => panic!(
            "{name} failed (PROPTEST_RNG_SEED={seed} replays this run): {reason}\n\
             smallest failing input: {}",
            shorten(&format!("{value:?}"))
        ),
        Err(TestError::Abort(reason)) => panic!("{name}: proptest gave up: {reason}"),
    }
}

/// A value's `Debug` text, cut to 2000 characters (keys go up to 1 MiB).
fn shorten(text: &str) -> String {
    match text.char_indices().nth(2000) {
        Some((cut, _)) => format!("{}… ({} bytes in all)", &text[..cut], text.len()),
        None => text.to_owned(),
    }
}

/// Fails the case with `message` unless `condition` holds.
macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(format!($($message)+));
        }
    };
}

/// A runtime for one test: the cases run one after the other on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Deletes every record (a purge at a time past all of them), sets the clock back to
/// [`START`], and returns how many records there were.
async fn wipe<S: Store>(store: &S, clock: &ManualClock) -> Result<u64, String> {
    clock.set(WIPE_AT);
    let mut deleted = 0;
    loop {
        match store.purge_expired(10_000).await {
            Ok(0) => break,
            Ok(n) => deleted += n,
            Err(error) => return Err(format!("purging every record failed: {error}")),
        }
    }
    clock.set(START);
    Ok(deleted)
}

/// A store that counts the calls made to it.
struct Spy<S> {
    inner: S,
    calls: AtomicUsize,
}

impl<S> Spy<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            calls: AtomicUsize::new(0),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn called(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

impl<S: Store> Store for Spy<S> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        self.called();
        self.inner.claim(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.called();
        self.inner.complete(key, lease, result, ttl).await
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.called();
        self.inner.release(key, lease).await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        self.called();
        self.inner.extend(key, lease, duration).await
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        self.called();
        self.inner.purge_expired(limit).await
    }
}

// ---------------------------------------------------------------------------------------------
// Strings
// ---------------------------------------------------------------------------------------------

/// Every character with the Unicode `White_Space` property: what `str::trim` removes.
const WHITESPACE: &[char] = &[
    '\t', '\n', '\u{b}', '\u{c}', '\r', ' ', '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}',
    '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}', '\u{2005}', '\u{2006}', '\u{2007}', '\u{2008}',
    '\u{2009}', '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
];

/// Characters that look blank but are not whitespace: a key of them is a valid key.
const INVISIBLE: &[char] = &[
    '\u{200b}', '\u{200c}', '\u{200d}', '\u{2060}', '\u{feff}', '\u{180e}',
];

/// Any characters, control characters and NUL included.
fn text(len: std::ops::Range<usize>) -> impl Strategy<Value = String> + Clone {
    proptest::collection::vec(any::<char>(), len).prop_map(String::from_iter)
}

fn whitespace() -> impl Strategy<Value = String> + Clone {
    proptest::collection::vec(proptest::sample::select(WHITESPACE), 1..12)
        .prop_map(String::from_iter)
}

/// At least `bytes` bytes: one character repeated, then a random tail.
fn long(bytes: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> + Clone {
    (any::<char>(), bytes, text(0..6)).prop_map(|(c, bytes, tail)| {
        let mut long = c.to_string().repeat(bytes.div_ceil(c.len_utf8()));
        long.push_str(&tail);
        long
    })
}

/// 126 to 130 bytes (the limit is 128): a 1-, 2-, 3- or 4-byte character repeated, padded
/// with ASCII to the exact length.
fn near_the_limit() -> impl Strategy<Value = String> + Clone {
    (
        proptest::sample::select(vec!['k', 'é', '€', '🔑']),
        MAX_KEY_BYTES - 2..=MAX_KEY_BYTES + 2,
    )
        .prop_map(|(c, bytes)| {
            let mut text = c.to_string().repeat(bytes / c.len_utf8());
            text.push_str(&"x".repeat(bytes - text.len()));
            text
        })
}

fn with_nul() -> impl Strategy<Value = String> + Clone {
    (text(0..20), text(0..20)).prop_map(|(a, b)| format!("{a}\0{b}"))
}

fn prefixed() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        text(0..40).prop_map(|t| format!("{HASHED_PREFIX}{t}")),
        "[0-9a-f]{64}".prop_map(|hex| format!("{HASHED_PREFIX}{hex}")),
    ]
}

/// A 1 MiB key of one repeated character.
fn mebibyte() -> impl Strategy<Value = String> + Clone {
    any::<char>().prop_map(|c| c.to_string().repeat((1 << 20) / c.len_utf8()))
}

fn scope() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        4 => text(1..24),
        1 => whitespace(),
        1 => long(MAX_KEY_BYTES + 1..=4096),
        1 => near_the_limit(),
        1 => with_nul(),
        1 => prefixed(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        3 => whitespace(),
        1 => proptest::collection::vec(proptest::sample::select(INVISIBLE), 1..4)
            .prop_map(String::from_iter),
        1 => (whitespace(), text(1..4), whitespace()).prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        6 => text(1..40),
        2 => long(MAX_KEY_BYTES + 1..=16 * 1024),
        2 => near_the_limit(),
        2 => with_nul(),
        2 => prefixed(),
        1 => mebibyte(),
    ]
}

fn payload() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => text(0..64),
        1 => long(1..=8192),
    ]
}

/// How a part of a record key must be stored: as given, or as its hash.
fn check_stored(what: &str, given: &str, stored: &str) -> Result<(), String> {
    let hashed =
        given.len() > MAX_KEY_BYTES || given.contains('\0') || given.starts_with(HASHED_PREFIX);
    if hashed {
        let hex = stored.strip_prefix(HASHED_PREFIX).unwrap_or_default();
        ensure!(
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                && stored != given,
            "the {what} ({} bytes) must be stored as `sha256:` and 64 hex digits, not {}",
            given.len(),
            shorten(stored)
        );
    } else {
        ensure!(
            stored == given,
            "the {what} must be stored as given: {given:?} became {stored:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inputs: through `run` and through a handler
// ---------------------------------------------------------------------------------------------

/// A message: the key is the business key, the whole message the payload.
#[derive(Clone, Debug, Serialize)]
struct Message {
    key: String,
    payload: String,
}

/// What the bodies return: enough to tell one call's result from another's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Echo {
    key_bytes: usize,
    key_start: String,
    payload: String,
    run: usize,
}

impl Echo {
    fn of(key: &str, payload: &str, run: usize) -> Self {
        Self {
            key_bytes: key.len(),
            key_start: key.chars().take(16).collect(),
            payload: payload.to_owned(),
            run,
        }
    }
}

#[idempotent(key = msg.key.as_str(), store = store, scope = "bad_input.echo")]
async fn echo<S: Store>(store: &S, runs: &Runs, msg: Message) -> Result<Echo, AppError> {
    let run = runs.record();
    Ok(Echo::of(&msg.key, &msg.payload, run))
}

/// What `#[idempotent]` does, by hand, for any scope: the record key (refusing an empty
/// scope or a blank key), the payload's fingerprint, then [`idem_runtime::run`].
async fn through_run<S: Store>(
    store: &S,
    runs: &Runs,
    scope: &str,
    msg: &Message,
) -> Result<Echo, Error> {
    let key = RecordKey::new(scope, &msg.key)?;
    let fingerprint = Fingerprint::of(msg)?;
    idem_runtime::run(store, key, Some(fingerprint), Policy::new(), async {
        let run = runs.record();
        Ok(Echo::of(&msg.key, &msg.payload, run))
    })
    .await
}

/// The error a call with this scope and key must fail with before anything runs, if any.
fn refused(scope: &str, key: &str) -> Option<&'static str> {
    if scope.is_empty() {
        Some("EmptyScope")
    } else if key.trim().is_empty() {
        Some("EmptyKey")
    } else {
        None
    }
}

fn error_name(error: &Error) -> &'static str {
    match error {
        Error::EmptyScope => "EmptyScope",
        Error::EmptyKey { .. } => "EmptyKey",
        Error::FingerprintMismatch { .. } => "FingerprintMismatch",
        Error::Decode { .. } => "Decode",
        Error::Store(_) => "Store",
        Error::InProgress { .. } => "InProgress",
        Error::LeaseLost { .. } => "LeaseLost",
        Error::Encode { .. } => "Encode",
        _ => "another error",
    }
}

/// One call site (`run` with `scope`, or the handler): refused before the store, or run once
/// and then replayed, and a mismatch for another payload. Returns how many records it wrote.
async fn one_call_site<S, F, Fut>(
    store: &Spy<S>,
    site: &str,
    scope: &str,
    msg: &Message,
    call: F,
) -> Result<u64, String>
where
    S: Store,
    F: Fn(Message, Arc<Runs>) -> Fut,
    Fut: Future<Output = Result<Echo, Error>>,
{
    let runs = Arc::new(Runs::default());
    let calls_before = store.calls();
    let first = call(msg.clone(), runs.clone()).await;
    if let Some(expected) = refused(scope, &msg.key) {
        ensure!(
            matches!(&first, Err(error) if error_name(error) == expected),
            "{site}: expected Err({expected}), got {first:?}"
        );
        if let Err(Error::EmptyKey { scope: named }) = &first {
            ensure!(
                named == scope,
                "{site}: EmptyKey names the scope {named:?}, not {scope:?}"
            );
        }
        ensure!(runs.count() == 0, "{site}: the body ran for refused input");
        ensure!(
            store.calls() == calls_before,
            "{site}: refused input reached the store ({} calls)",
            store.calls() - calls_before
        );
        return Ok(0);
    }

    let expected = Echo::of(&msg.key, &msg.payload, 1);
    ensure!(
        matches!(&first, Ok(echo) if *echo == expected),
        "{site}: the first call must run the body: {first:?}"
    );
    let again = call(msg.clone(), runs.clone()).await;
    ensure!(
        matches!(&again, Ok(echo) if *echo == expected),
        "{site}: a duplicate must replay {expected:?}, got {again:?}"
    );
    let other = Message {
        key: msg.key.clone(),
        payload: format!("{}·", msg.payload),
    };
    let reused = call(other, runs.clone()).await;
    let record = RecordKey::new(scope, &msg.key).map_err(|error| format!("{error}"))?;
    ensure!(
        matches!(&reused, Err(Error::FingerprintMismatch { scope: s, key: k })
            if *s == record.scope() && *k == record.key()),
        "{site}: the key with another payload must be FingerprintMismatch, got {reused:?}"
    );
    ensure!(
        runs.count() == 1,
        "{site}: the body ran {} times",
        runs.count()
    );
    check_stored("scope", scope, record.scope())?;
    check_stored("key", &msg.key, record.key())?;
    Ok(1)
}

/// One input through `run` and through the handler, on a store emptied first.
async fn inputs_case<S: Store>(
    store: &Spy<S>,
    clock: &ManualClock,
    (scope, key, payload): (String, String, String),
) -> Result<(), String> {
    wipe(&store.inner, clock).await?;
    let msg = Message { key, payload };
    let by_run = one_call_site(store, "run", &scope, &msg, |msg, runs| {
        let scope = scope.clone();
        async move { through_run(store, &runs, &scope, &msg).await }
    })
    .await?;
    let by_handler = one_call_site(
        store,
        "handler",
        HANDLER_SCOPE,
        &msg,
        |msg, runs| async move {
            echo(store, &runs, msg).await.map_err(|error| match error {
                AppError::Idem(error) => error,
                AppError::Business(text) => panic!("the handler has no business error: {text}"),
            })
        },
    )
    .await?;
    let written = wipe(&store.inner, clock).await?;
    ensure!(
        written == by_run + by_handler,
        "{written} records were written, expected {}",
        by_run + by_handler
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Collisions: distinct scopes and keys are distinct records
// ---------------------------------------------------------------------------------------------

/// Two (scope, key) pairs.
type Pair = ((String, String), (String, String));

/// A key that is never blank.
fn word() -> impl Strategy<Value = String> + Clone {
    (text(0..12), proptest::char::range('!', '~')).prop_map(|(t, c)| format!("{c}{t}"))
}

fn lookalike_pairs() -> impl Strategy<Value = Pair> {
    let scope = prop_oneof![3 => Just("bad_input.pairs".to_owned()), 1 => word()];
    (scope, word(), 0..9_u8).prop_map(|(scope, key, how)| {
        let other = match how {
            0 => key.to_uppercase() + "x",
            1 => format!("{key} "),
            2 => format!(" {key}"),
            3 => format!("{key}\u{200b}"),
            4 => format!("{key}e\u{301}"), // decomposed é
            5 => format!("{key}\0"),       // hashed, the other not
            6 => format!("{key}\u{ff41}"), // fullwidth a
            7 => key.replace(|c: char| c.is_ascii_lowercase(), "A") + "\u{131}",
            _ => format!("{key}%7B"),
        };
        let key = match how {
            4 => format!("{key}\u{e9}"), // composed é
            5 => key,
            6 => format!("{key}a"),
            _ => key,
        };
        ((scope.clone(), key), (scope, other))
    })
}

fn long_pairs() -> impl Strategy<Value = Pair> {
    (long(MAX_KEY_BYTES - 8..=4096), any::<char>(), 0..4_u8).prop_map(|(key, c, how)| {
        let scope = "bad_input.pairs".to_owned();
        let other = match how {
            // One character more.
            0 => format!("{key}{c}"),
            // The last character changed.
            1 => {
                let mut other = key.clone();
                let last = other.pop().unwrap_or('a');
                other.push(if last == c { '\u{1}' } else { c });
                other
            }
            // The literal text of the key's stored hash.
            2 => RecordKey::new(&scope, &key)
                .map(|record| record.key().to_owned())
                .unwrap_or_default(),
            // The same bytes behind the hashed prefix.
            _ => format!("{HASHED_PREFIX}{key}"),
        };
        ((scope.clone(), key), (scope, other))
    })
}

fn moved_separator_pairs() -> impl Strategy<Value = Pair> {
    let sep = proptest::sample::select(vec![":", "::", "{", "}", "%", "%25", "/", "\0", "1:"]);
    (word(), word(), word(), sep).prop_map(|(p, q, r, sep)| {
        (
            (format!("{p}{sep}{q}"), r.clone()),
            (p, format!("{q}{sep}{r}")),
        )
    })
}

fn pairs() -> impl Strategy<Value = Pair> {
    prop_oneof![lookalike_pairs(), long_pairs(), moved_separator_pairs()].prop_filter(
        "two distinct valid pairs",
        |((s1, k1), (s2, k2))| {
            (s1, k1) != (s2, k2) && refused(s1, k1).is_none() && refused(s2, k2).is_none()
        },
    )
}

/// Both pairs run their bodies and replay their own results.
async fn collisions_case<S: Store>(
    store: &S,
    clock: &ManualClock,
    ((s1, k1), (s2, k2)): Pair,
) -> Result<(), String> {
    wipe(store, clock).await?;
    let a = RecordKey::new(&s1, &k1).map_err(|error| format!("{error}"))?;
    let b = RecordKey::new(&s2, &k2).map_err(|error| format!("{error}"))?;
    ensure!(
        a != b,
        "two distinct inputs share the record key {a}: ({s1:?}, {k1:?}) and ({s2:?}, {k2:?})"
    );
    let runs = Runs::default();
    for round in 0..2 {
        for (record, name) in [(&a, "a"), (&b, "b")] {
            let got: Result<String, Error> =
                idem_runtime::run(store, record.clone(), None, Policy::new(), async {
                    runs.record();
                    Ok(name.to_owned())
                })
                .await;
            ensure!(
                matches!(&got, Ok(value) if value == name),
                "round {round}: {record} must give {name:?}, got {got:?}"
            );
        }
    }
    ensure!(runs.count() == 2, "the bodies ran {} times", runs.count());
    let written = wipe(store, clock).await?;
    ensure!(written == 2, "{written} records for two keys");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Corrupt state, common part
// ---------------------------------------------------------------------------------------------

const SCOPE: &str = "bad_input.corrupt";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// The result the records are completed with: a `Receipt` as JSON.
const STORED: &[u8] = br#"{"points":25}"#;

/// The result type the records hold.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    points: u64,
}

/// The record keys of one corruption case: under a scope of its own, so that what an
/// earlier case left behind (records no purge deletes) cannot answer for it.
struct Names {
    scope: String,
}

impl Names {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            scope: format!("{SCOPE}#{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        }
    }

    fn key(&self, name: &str) -> RecordKey {
        RecordKey::new(&self.scope, name).expect("a valid key")
    }
}

fn payload_print(name: &str) -> Fingerprint {
    Fingerprint::of(name).expect("a string serializes")
}

/// Claims `key` and leaves it in progress.
async fn hold<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Option<&Fingerprint>,
) -> Result<Lease, String> {
    match store.claim(key, fingerprint, LEASE).await {
        Ok(Claim::Acquired(lease)) => Ok(lease),
        other => Err(format!("a new key {key} must be acquired, got {other:?}")),
    }
}

/// Claims and completes `key` with `result`.
async fn complete<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Option<&Fingerprint>,
    result: &[u8],
) -> Result<Lease, String> {
    let lease = hold(store, key, fingerprint).await?;
    store
        .complete(key, &lease, result, TTL)
        .await
        .map_err(|error| format!("completing {key}: {error}"))?;
    Ok(lease)
}

/// `run` over `key`: returns what it answered and whether the body ran.
async fn run_over<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Option<Fingerprint>,
) -> (Result<Receipt, Error>, bool) {
    let ran = AtomicUsize::new(0);
    let outcome = idem_runtime::run(store, key.clone(), fingerprint, Policy::new(), async {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok(Receipt { points: 1 })
    })
    .await;
    (outcome, ran.load(Ordering::SeqCst) > 0)
}

fn is_decode<T>(outcome: &Result<T, Error>, key: &RecordKey) -> bool {
    matches!(outcome, Err(Error::Decode { scope, key: k, .. }) if scope == key.scope() && k == key.key())
}

/// What a holder completes with after the corruption.
const LATE: &[u8] = br#"{"points":3}"#;

/// The neighbour completed before the corruption, the key that is never corrupted.
const NEIGHBOUR: &[u8] = br#"{"points":7}"#;

/// Sets up the neighbour record (completed) before a case corrupts another one.
async fn neighbour<S: Store>(store: &S, names: &Names) -> Result<(RecordKey, Fingerprint), String> {
    let key = names.key("neighbour");
    let print = payload_print("neighbour");
    complete(store, &key, Some(&print), NEIGHBOUR).await?;
    Ok((key, print))
}

/// After a corruption: the neighbour still replays, a new key runs once and replays, and a
/// purge works.
async fn nothing_else_damaged<S: Store>(
    store: &S,
    clock: &ManualClock,
    names: &Names,
    (neighbour, print): &(RecordKey, Fingerprint),
) -> Result<(), String> {
    let replay = store.claim(neighbour, Some(print), LEASE).await;
    ensure!(
        matches!(&replay, Ok(Claim::Completed(bytes)) if bytes == NEIGHBOUR),
        "the untouched neighbour must still replay its result, got {replay:?}"
    );
    let fresh = names.key("fresh");
    for round in 0..2 {
        let (outcome, ran) = run_over(store, &fresh, Some(payload_print("fresh"))).await;
        ensure!(
            matches!(outcome, Ok(Receipt { points: 1 })) && ran == (round == 0),
            "a new key after the corruption, round {round}: {outcome:?}, body ran: {ran}"
        );
    }
    clock.set(WIPE_AT);
    let purged = store.purge_expired(10_000).await;
    ensure!(
        purged.is_ok(),
        "a purge over the corrupt record failed: {purged:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Corrupt state: SQL rows
// ---------------------------------------------------------------------------------------------

/// A SQL store's table, for writing to it by hand.
enum Sql {
    Sqlite(sqlx::SqlitePool, String),
    Postgres(sqlx::PgPool, String),
    Mysql(sqlx::MySqlPool, String),
}

/// A value written into a column by hand.
#[derive(Clone, Debug)]
enum SqlValue {
    Int(i64),
    Bytes(Vec<u8>),
    Text(String),
    Real(f64),
}

macro_rules! bind_value {
    ($query:expr, $value:expr) => {
        match $value {
            SqlValue::Int(v) => $query.bind(*v),
            SqlValue::Bytes(v) => $query.bind(v.clone()),
            SqlValue::Text(v) => $query.bind(v.clone()),
            SqlValue::Real(v) => $query.bind(*v),
        }
    };
}

impl Sql {
    /// `UPDATE <table> SET <column> = <value>` on the row of `key`, which must exist.
    /// `column` is one of the schema's columns, `table` a name from `unique_name`.
    async fn set(&self, key: &RecordKey, column: &str, value: &SqlValue) -> Result<(), String> {
        let done = match self {
            Sql::Sqlite(pool, table) => {
                let statement = format!(
                    "UPDATE {table} SET {column} = ?1 WHERE scope = ?2 AND business_key = ?3"
                );
                let query = sqlx::query(sqlx::AssertSqlSafe(statement));
                bind_value!(query, value)
                    .bind(key.scope())
                    .bind(key.key())
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
            }
            Sql::Postgres(pool, table) => {
                let statement = format!(
                    "UPDATE {table} SET {column} = $1 WHERE scope = $2 AND business_key = $3"
                );
                let query = sqlx::query(sqlx::AssertSqlSafe(statement));
                bind_value!(query, value)
                    .bind(key.scope())
                    .bind(key.key())
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
            }
            Sql::Mysql(pool, table) => {
                let statement =
                    format!("UPDATE {table} SET {column} = ? WHERE scope = ? AND business_key = ?");
                let query = sqlx::query(sqlx::AssertSqlSafe(statement));
                bind_value!(query, value)
                    .bind(key.scope())
                    .bind(key.key())
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
            }
        };
        match done {
            Ok(1) => Ok(()),
            Ok(n) => Err(format!("setting {column} changed {n} rows")),
            Err(error) => Err(format!("setting {column} = {value:?} failed: {error}")),
        }
    }
}

/// Which SQL database, for what its columns can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
    Mysql,
}

/// A value no claim writes, put into one record by hand.
#[derive(Clone, Debug)]
enum SqlCorruption {
    /// A completed record's result: any bytes.
    Result(Vec<u8>),
    /// A stored fingerprint of another length than 32 bytes.
    FingerprintLength(Vec<u8>),
    /// 32 bytes that are not the payload's fingerprint.
    FingerprintOther([u8; 32]),
    /// A `completed` flag that is neither 0 nor 1 (PostgreSQL's is a BOOLEAN).
    CompletedFlag(i64),
    /// The fence of an in-progress record whose lease ran out (the next claim raises it).
    FenceOfDead(i64),
    /// The expiry of a completed record: unusual, but every value is a time.
    Expiry(i64),
    /// SQLite keeps a value of any type in any column.
    SqliteType {
        column: &'static str,
        value: SqlValue,
    },
}

fn results() -> impl Strategy<Value = Vec<u8>> {
    let cut = (0..STORED.len()).prop_map(|at| STORED[..at].to_vec());
    let flipped = (0..STORED.len(), any::<u8>()).prop_map(|(at, byte)| {
        let mut bytes = STORED.to_vec();
        bytes[at] = byte;
        bytes
    });
    let shapes = proptest::sample::select(vec![
        b"null".to_vec(),
        b"{}".to_vec(),
        b"[25]".to_vec(),
        br#"{"points":-1}"#.to_vec(),
        br#"{"points":1e400}"#.to_vec(),
        br#"{"points":"25"}"#.to_vec(),
        br#"{"points":25,"extra":true}"#.to_vec(),
        br#"{"points":25} trailing"#.to_vec(),
        br#""{\"points\":25}""#.to_vec(),
        br#"{"points":18446744073709551616}"#.to_vec(),
        b"\xef\xbb\xbf{\"points\":25}".to_vec(),
    ]);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        cut,
        flipped,
        shapes,
    ]
}

fn sqlite_values() -> impl Strategy<Value = SqlValue> {
    prop_oneof![
        text(0..12).prop_map(SqlValue::Text),
        "-?[0-9]{1,19}".prop_map(SqlValue::Text),
        (-1e20_f64..1e20).prop_map(SqlValue::Real),
        Just(SqlValue::Real(0.5)),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(SqlValue::Bytes),
    ]
}

fn sql_corruptions(dialect: Dialect) -> BoxedStrategy<SqlCorruption> {
    let fingerprint_lengths = if dialect == Dialect::Mysql {
        0..=31_usize // VARBINARY(32)
    } else {
        0..=64_usize
    };
    let fences = prop_oneof![
        Just(0_i64),
        Just(-1),
        Just(i64::MIN),
        i64::MIN..0,
        Just(i64::MAX),
        Just(i64::MAX - 1),
        1..i64::MAX - 1,
    ];
    let expiries = prop_oneof![
        any::<i64>(),
        START - 2..=START + 2,
        Just(i64::MIN),
        Just(i64::MAX),
    ];
    let common = prop_oneof![
        results().prop_map(SqlCorruption::Result),
        proptest::collection::vec(any::<u8>(), fingerprint_lengths)
            .prop_filter("not 32 bytes", |bytes| bytes.len() != 32)
            .prop_map(SqlCorruption::FingerprintLength),
        any::<[u8; 32]>().prop_map(SqlCorruption::FingerprintOther),
        fences.prop_map(SqlCorruption::FenceOfDead),
        expiries.prop_map(SqlCorruption::Expiry),
    ];
    let flags = match dialect {
        Dialect::Mysql => (-128_i64..=127).boxed(),
        _ => any::<i64>().boxed(),
    }
    .prop_filter("neither 0 nor 1", |flag| !matches!(flag, 0 | 1))
    .prop_map(SqlCorruption::CompletedFlag);
    match dialect {
        Dialect::Postgres => common.boxed(),
        Dialect::Mysql => prop_oneof![4 => common, 1 => flags].boxed(),
        Dialect::Sqlite => {
            let columns = proptest::sample::select(vec![
                "completed",
                "owner",
                "fence",
                "lease_until",
                "expires_at",
                "fingerprint",
                "result",
            ]);
            let types = (columns, sqlite_values())
                .prop_map(|(column, value)| SqlCorruption::SqliteType { column, value });
            prop_oneof![5 => common, 1 => flags, 3 => types].boxed()
        }
    }
}

/// The bytes SQLite hands back for `value` read as a BLOB, where that is defined.
fn sqlite_bytes(value: &SqlValue) -> Option<Vec<u8>> {
    match value {
        SqlValue::Bytes(bytes) => Some(bytes.clone()),
        SqlValue::Text(text) => Some(text.as_bytes().to_vec()),
        _ => None,
    }
}

/// One corruption of one record: what claim and `run` answer over it, and then the rest of the
/// store.
async fn sql_case<S: Store>(
    store: &S,
    sql: &Sql,
    clock: &ManualClock,
    corruption: SqlCorruption,
) -> Result<(), String> {
    clock.set(START);
    let names = Names::fresh();
    let neighbour = neighbour(store, &names).await?;
    let target = names.key("target");
    let print = payload_print("target");

    if let SqlCorruption::FenceOfDead(fence) = corruption {
        hold(store, &target, Some(&print)).await?;
        clock.set(START + 31_000);
        sql.set(&target, "fence", &SqlValue::Int(fence)).await?;
        let claimed = store.claim(&target, Some(&print), LEASE).await;
        match fence.checked_add(1) {
            Some(next) if next >= 1 => ensure!(
                matches!(&claimed, Ok(Claim::Acquired(lease)) if lease.fence() == next.unsigned_abs()),
                "a dead record at fence {fence} must be taken over with fence {next}, got {claimed:?}"
            ),
            _ => ensure!(
                is_decode(&claimed, &target),
                "a dead record at fence {fence} cannot be taken over with a positive fence: \
                 expected Err(Decode), got {claimed:?}"
            ),
        }
        let (outcome, ran) = run_over(store, &target, Some(print)).await;
        ensure!(
            !ran && matches!(
                outcome,
                Err(Error::InProgress { .. } | Error::Decode { .. })
            ),
            "run after the claim over fence {fence}: {outcome:?}, body ran: {ran}"
        );
        return nothing_else_damaged(store, clock, &names, &neighbour).await;
    }

    complete(store, &target, Some(&print), STORED).await?;
    let (column, value) = match &corruption {
        SqlCorruption::Result(bytes) => ("result", SqlValue::Bytes(bytes.clone())),
        SqlCorruption::FingerprintLength(bytes) => ("fingerprint", SqlValue::Bytes(bytes.clone())),
        SqlCorruption::FingerprintOther(bytes) => ("fingerprint", SqlValue::Bytes(bytes.to_vec())),
        SqlCorruption::CompletedFlag(flag) => ("completed", SqlValue::Int(*flag)),
        SqlCorruption::Expiry(at) => ("expires_at", SqlValue::Int(*at)),
        SqlCorruption::SqliteType { column, value } => (*column, value.clone()),
        SqlCorruption::FenceOfDead(_) => unreachable!("handled above"),
    };
    sql.set(&target, column, &value).await?;
    let with_print = store.claim(&target, Some(&print), LEASE).await;
    let without = store.claim(&target, None, LEASE).await;
    let (outcome, ran) = run_over(store, &target, Some(print)).await;
    ensure!(
        !ran,
        "the body ran over a completed record ({corruption:?}): {outcome:?}"
    );
    let stored = Claim::Completed(STORED.to_vec());

    match &corruption {
        SqlCorruption::Result(bytes) => {
            ensure!(
                matches!(&with_print, Ok(Claim::Completed(got)) if got == bytes),
                "the store must hand the stored bytes back as they are, got {with_print:?}"
            );
            match serde_json::from_slice::<Receipt>(bytes) {
                Ok(receipt) => ensure!(
                    matches!(&outcome, Ok(got) if *got == receipt),
                    "bytes that decode as a Receipt replay as it: {outcome:?}"
                ),
                Err(_) => ensure!(
                    is_decode(&outcome, &target),
                    "bytes that do not decode must be Err(Decode), got {outcome:?}"
                ),
            }
        }
        SqlCorruption::FingerprintLength(_) => {
            ensure!(
                is_decode(&with_print, &target) && is_decode(&outcome, &target),
                "a fingerprint of the wrong length, compared: expected Err(Decode) from claim \
                 and run, got {with_print:?} and {outcome:?}"
            );
            ensure!(
                matches!(&without, Ok(claim) if *claim == stored),
                "a claim without a fingerprint does not read it: {without:?}"
            );
        }
        SqlCorruption::FingerprintOther(bytes) => {
            if bytes == print.as_bytes() {
                return Ok(()); // the real fingerprint, drawn by chance
            }
            ensure!(
                matches!(with_print, Ok(Claim::Mismatch))
                    && matches!(outcome, Err(Error::FingerprintMismatch { .. })),
                "another payload's fingerprint: expected Mismatch and FingerprintMismatch, got \
                 {with_print:?} and {outcome:?}"
            );
            ensure!(
                matches!(&without, Ok(claim) if *claim == stored),
                "a claim without a fingerprint replays: {without:?}"
            );
        }
        SqlCorruption::CompletedFlag(_) => ensure!(
            is_decode(&with_print, &target)
                && is_decode(&without, &target)
                && is_decode(&outcome, &target),
            "a completed flag out of range: expected Err(Decode), got {with_print:?}, \
             {without:?}, {outcome:?}"
        ),
        SqlCorruption::Expiry(at) => {
            if *at > START {
                ensure!(
                    matches!(&with_print, Ok(claim) if *claim == stored)
                        && matches!(outcome, Ok(Receipt { points: 25 })),
                    "a record expiring at {at} is live at {START}: {with_print:?}, {outcome:?}"
                );
            } else {
                ensure!(
                    matches!(&with_print, Ok(Claim::Acquired(lease)) if lease.fence() == 2)
                        && matches!(without, Ok(Claim::InProgress { .. }))
                        && matches!(outcome, Err(Error::InProgress { .. })),
                    "a record that expired at {at} is taken over at {START}: {with_print:?}, \
                     {without:?}, {outcome:?}"
                );
            }
        }
        SqlCorruption::SqliteType { column, value } => {
            let fine = |claim: &Result<Claim, Error>| match claim {
                Err(Error::Decode { .. }) => true,
                Ok(Claim::Completed(bytes)) => {
                    bytes == STORED
                        || (*column == "result" && Some(bytes) == sqlite_bytes(value).as_ref())
                }
                Ok(Claim::Mismatch) => *column == "fingerprint",
                // A time or flag that SQLite reads as a past time or as "in progress".
                Ok(Claim::Acquired(_) | Claim::InProgress { .. }) => {
                    matches!(*column, "completed" | "lease_until" | "expires_at")
                }
                Err(_) => false,
            };
            ensure!(
                fine(&with_print) && fine(&without),
                "{column} = {value:?}: claims answered {with_print:?} and {without:?}"
            );
            ensure!(
                !matches!(outcome, Err(Error::Store(_))),
                "{column} = {value:?}: run answered a store error {outcome:?}"
            );
        }
        SqlCorruption::FenceOfDead(_) => unreachable!("handled above"),
    }
    nothing_else_damaged(store, clock, &names, &neighbour).await
}

// ---------------------------------------------------------------------------------------------
// Corrupt state: Redis hashes
// ---------------------------------------------------------------------------------------------

/// The fields of a record hash.
const FIELDS: [&str; 7] = [
    "completed",
    "owner",
    "fence",
    "lease_until",
    "expires_at",
    "fingerprint",
    "result",
];

/// A hand edit of one record.
#[derive(Clone, Debug)]
enum RedisCorruption {
    /// A field of a completed or in-progress record set to `value`, or deleted (`None`).
    Field {
        completed: bool,
        field: &'static str,
        value: Option<Vec<u8>>,
    },
    /// A field the store does not know, added to a completed record.
    Unknown { field: Vec<u8>, value: Vec<u8> },
    /// The key replaced by a value of another type (0 string, 1 list, 2 set, 3 sorted set).
    WrongType { kind: u8, member: Vec<u8> },
}

fn redis_values() -> impl Strategy<Value = Option<Vec<u8>>> {
    let edges = proptest::sample::select(vec![
        "",
        "0",
        "1",
        "2",
        "-1",
        "-0",
        "00",
        "+1",
        " 1",
        "1 ",
        "1.5",
        "1e3",
        "0x1F",
        "１",
        "9007199254740991",
        "9007199254740992",
        "-9007199254740991",
        "99999999999999999",
        "1700000000000",
        "1700000000001",
        "1699999999999",
    ]);
    prop_oneof![
        1 => Just(None),
        3 => edges.prop_map(|edge| Some(edge.as_bytes().to_vec())),
        2 => any::<i64>().prop_map(|n| Some(n.to_string().into_bytes())),
        1 => (START - 5..START + 5).prop_map(|n| Some(n.to_string().into_bytes())),
        2 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ]
}

fn redis_corruptions() -> impl Strategy<Value = RedisCorruption> {
    prop_oneof![
        6 => (any::<bool>(), proptest::sample::select(FIELDS.to_vec()), redis_values())
            .prop_map(|(completed, field, value)| RedisCorruption::Field { completed, field, value }),
        1 => (proptest::collection::vec(any::<u8>(), 0..12), proptest::collection::vec(any::<u8>(), 0..12))
            .prop_filter("not a field of the record", |(field, _)| {
                !FIELDS.iter().any(|known| known.as_bytes() == field.as_slice())
            })
            .prop_map(|(field, value)| RedisCorruption::Unknown { field, value }),
        1 => (0..4_u8, proptest::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(kind, member)| RedisCorruption::WrongType { kind, member }),
    ]
}

/// What the claim scripts accept as an integer: optional `-`, ASCII digits, at most 16
/// characters, within ±(2^53 - 1).
fn lua_int(value: &[u8]) -> Option<i64> {
    let digits = value.strip_prefix(b"-").unwrap_or(value);
    if value.len() > 16 || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: i64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    (n.abs() < 1 << 53).then_some(n)
}

/// What a claim must answer for a Redis record, as the store documents its records.
#[derive(Debug)]
enum Expect {
    /// A field the scripts cannot read: every operation is `Error::Decode`.
    Unreadable,
    /// A stored fingerprint of the wrong length, compared by a claim: `Error::Decode`.
    BadFingerprint,
    /// This answer (for `Acquired`, only the fence counts).
    Answer(Claim),
}

/// What a claim at `now` with `given` must answer for a hash with `fields`.
fn redis_expect(
    fields: &BTreeMap<Vec<u8>, Vec<u8>>,
    now: i64,
    given: Option<&Fingerprint>,
) -> Expect {
    let field = |name: &str| fields.get(name.as_bytes());
    let completed = match field("completed").map(Vec::as_slice) {
        Some(b"0") => false,
        Some(b"1") => true,
        _ => return Expect::Unreadable,
    };
    let fence = field("fence").and_then(|v| lua_int(v)).filter(|&f| f >= 1);
    let lease_until = field("lease_until").and_then(|v| lua_int(v));
    let expires_at = field("expires_at").and_then(|v| lua_int(v));
    let result = field("result");
    let (Some(fence), Some(lease_until), Some(expires_at), Some(_)) =
        (fence, lease_until, expires_at, field("owner"))
    else {
        return Expect::Unreadable;
    };
    let result = match (completed, result) {
        (true, None) => return Expect::Unreadable,
        (_, result) => result.cloned().unwrap_or_default(),
    };
    let live_until = if completed { expires_at } else { lease_until };
    if live_until <= now {
        let next = u64::try_from(fence + 1).expect("a fence of at most 2^53");
        return Expect::Answer(Claim::Acquired(Lease::new(String::new(), next, 0)));
    }
    if let (Some(stored), Some(given)) = (field("fingerprint"), given) {
        if stored.len() != 32 {
            return Expect::BadFingerprint;
        }
        if stored.as_slice() != given.as_bytes() {
            return Expect::Answer(Claim::Mismatch);
        }
    }
    Expect::Answer(if completed {
        Claim::Completed(result)
    } else {
        let left = u64::try_from(lease_until - now).expect("a live lease");
        Claim::InProgress {
            retry_after: Duration::from_millis(left),
        }
    })
}

/// Whether the scripts see `lease` as the holder of the (readable) record `fields`.
fn redis_held(fields: &BTreeMap<Vec<u8>, Vec<u8>>, lease: &Lease) -> bool {
    let field = |name: &str| fields.get(name.as_bytes()).map(Vec::as_slice);
    field("completed") == Some(b"0".as_slice())
        && field("owner") == Some(lease.owner().as_bytes())
        && field("fence").and_then(lua_int) == i64::try_from(lease.fence()).ok()
}

async fn redis_command<T: redis::FromRedisValue>(
    connection: &mut redis::aio::ConnectionManager,
    command: &redis::Cmd,
) -> Result<T, String> {
    command
        .query_async(connection)
        .await
        .map_err(|error| format!("redis: {error}"))
}

async fn hash_of(
    connection: &mut redis::aio::ConnectionManager,
    key: &str,
) -> Result<(String, BTreeMap<Vec<u8>, Vec<u8>>), String> {
    let kind: String = redis_command(connection, redis::cmd("TYPE").arg(key)).await?;
    let fields = if kind == "hash" {
        redis_command(connection, redis::cmd("HGETALL").arg(key)).await?
    } else {
        BTreeMap::new()
    };
    Ok((kind, fields))
}

/// One hand edit of one record: what claim, the holder's operations and `run` answer, that
/// an unreadable record is left as it was, and then the rest of the store.
async fn redis_case<S: Store>(
    store: &S,
    redis_key: impl Fn(&RecordKey) -> String,
    mut connection: redis::aio::ConnectionManager,
    clock: &ManualClock,
    corruption: RedisCorruption,
) -> Result<(), String> {
    clock.set(START);
    let names = Names::fresh();
    let neighbour = neighbour(store, &names).await?;
    let target = names.key("target");
    let at = redis_key(&target);
    let print = payload_print("target");
    let in_progress = matches!(
        corruption,
        RedisCorruption::Field {
            completed: false,
            ..
        }
    );
    let lease = if in_progress {
        hold(store, &target, Some(&print)).await?
    } else {
        complete(store, &target, Some(&print), STORED).await?
    };
    match &corruption {
        RedisCorruption::Field { field, value, .. } => {
            let mut command = redis::cmd(if value.is_some() { "HSET" } else { "HDEL" });
            command.arg(&at).arg(*field);
            if let Some(value) = value {
                command.arg(value.as_slice());
            }
            redis_command::<()>(&mut connection, &command).await?;
        }
        RedisCorruption::Unknown { field, value } => {
            let command = redis::cmd("HSET")
                .arg(&at)
                .arg(field.as_slice())
                .arg(value.as_slice())
                .clone();
            redis_command::<()>(&mut connection, &command).await?;
        }
        RedisCorruption::WrongType { kind, member } => {
            redis_command::<()>(&mut connection, redis::cmd("DEL").arg(&at)).await?;
            let mut command = match kind {
                0 => redis::cmd("SET"),
                1 => redis::cmd("RPUSH"),
                2 => redis::cmd("SADD"),
                _ => {
                    let mut command = redis::cmd("ZADD");
                    command.arg(&at).arg(1);
                    command.arg(member.as_slice());
                    command
                }
            };
            if *kind < 3 {
                command.arg(&at).arg(member.as_slice());
            }
            redis_command::<()>(&mut connection, &command).await?;
        }
    }
    let before = hash_of(&mut connection, &at).await?;
    let readable =
        before.0 == "hash" && !matches!(redis_expect(&before.1, START, None), Expect::Unreadable);
    if !readable {
        let claimed = store.claim(&target, Some(&print), LEASE).await;
        let completed = store.complete(&target, &lease, LATE, TTL).await;
        let released = store.release(&target, &lease).await;
        let extended = store.extend(&target, &lease, LEASE).await;
        ensure!(
            is_decode(&claimed, &target)
                && is_decode(&completed, &target)
                && is_decode(&released, &target)
                && is_decode(&extended, &target),
            "an unreadable record ({before:?}): claim and the holder's complete, release and \
             extend must be Err(Decode), got {claimed:?}, {completed:?}, {released:?}, \
             {extended:?}"
        );
        let (outcome, ran) = run_over(store, &target, Some(print)).await;
        ensure!(
            !ran && is_decode(&outcome, &target),
            "run over an unreadable record: {outcome:?}, body ran: {ran}"
        );
        let after = hash_of(&mut connection, &at).await?;
        ensure!(
            after == before,
            "failed operations changed the record: {before:?} became {after:?}"
        );
        return nothing_else_damaged(store, clock, &names, &neighbour).await;
    }

    // Readable: the holder is fenced by owner and fence as edited.
    if in_progress {
        let held = redis_held(&before.1, &lease);
        let completed = store.complete(&target, &lease, LATE, TTL).await;
        ensure!(
            match &completed {
                Ok(()) => held,
                Err(Error::LeaseLost { .. }) => !held,
                Err(_) => false,
            },
            "the holder's complete over {before:?}: expected {}, got {completed:?}",
            if held { "Ok" } else { "LeaseLost" }
        );
    }
    let (_, fields) = hash_of(&mut connection, &at).await?;
    match redis_expect(&fields, START, Some(&print)) {
        Expect::Unreadable => return Err(format!("a complete made {fields:?} unreadable")),
        Expect::BadFingerprint => {
            let claimed = store.claim(&target, Some(&print), LEASE).await;
            let without = store.claim(&target, None, LEASE).await;
            let (outcome, ran) = run_over(store, &target, Some(print)).await;
            ensure!(
                is_decode(&claimed, &target) && !ran && is_decode(&outcome, &target),
                "a fingerprint of the wrong length, compared: expected Err(Decode) from claim \
                 and run, got {claimed:?} and {outcome:?} (body ran: {ran})"
            );
            let Expect::Answer(expected) = redis_expect(&fields, START, None) else {
                return Err(format!("{fields:?} reads without a fingerprint"));
            };
            ensure!(
                matches!(&without, Ok(claim) if *claim == expected),
                "a claim without a fingerprint does not read it: expected {expected:?}, got \
                 {without:?}"
            );
            let (_, after) = hash_of(&mut connection, &at).await?;
            ensure!(
                after == fields,
                "the claims changed the record: {fields:?} became {after:?}"
            );
        }
        Expect::Answer(expected) => {
            let claimed = store.claim(&target, Some(&print), LEASE).await;
            let agrees = match (&claimed, &expected) {
                (Ok(Claim::Acquired(got)), Claim::Acquired(want)) => got.fence() == want.fence(),
                (Ok(got), want) => got == want,
                (Err(_), _) => false,
            };
            ensure!(
                agrees,
                "a readable record ({fields:?}): the claim must answer {expected:?}, got {claimed:?}"
            );
        }
    }
    nothing_else_damaged(store, clock, &names, &neighbour).await
}

// ---------------------------------------------------------------------------------------------
// The tests, per store
// ---------------------------------------------------------------------------------------------

/// Builds a store with `make` on a fresh clock and runs `test` on it; `None` (a server that is
/// not there, already reported) runs nothing.
fn on_store<S, R, F, Fut>(
    make: F,
    test: impl FnOnce(&tokio::runtime::Runtime, &S, &R, &ManualClock),
) where
    F: FnOnce(ManualClock) -> Fut,
    Fut: Future<Output = Option<(S, R)>>,
{
    let runtime = runtime();
    let clock = ManualClock::new(START);
    let Some((store, raw)) = runtime.block_on(make(clock.clone())) else {
        return;
    };
    test(&runtime, &store, &raw, &clock);
    // The store (its pool, the guard that drops its table) goes while the runtime runs.
    drop(store);
}

fn inputs<S: Store>(
    name: &str,
    cases: u32,
    runtime: &tokio::runtime::Runtime,
    store: &S,
    clock: &ManualClock,
) {
    let spy = Spy::new(store);
    check(
        &format!("{name}: inputs"),
        cases,
        (scope(), key(), payload()),
        |input| runtime.block_on(inputs_case(&spy, clock, input)),
    );
}

fn collisions<S: Store>(
    name: &str,
    cases: u32,
    runtime: &tokio::runtime::Runtime,
    store: &S,
    clock: &ManualClock,
) {
    check(&format!("{name}: collisions"), cases, pairs(), |pair| {
        runtime.block_on(collisions_case(store, clock, pair))
    });
}

fn sql_corrupt<S: Store>(
    name: &str,
    dialect: Dialect,
    runtime: &tokio::runtime::Runtime,
    store: &S,
    sql: &Sql,
    clock: &ManualClock,
) {
    check(
        &format!("{name}: corrupt rows"),
        cases(128),
        sql_corruptions(dialect),
        |corruption| runtime.block_on(sql_case(store, sql, clock, corruption)),
    );
}

mod memory {
    use super::*;

    async fn open(clock: ManualClock) -> Option<(idem_runtime::MemoryStore, ())> {
        Some((idem_runtime::MemoryStore::with_clock(clock), ()))
    }

    #[test]
    fn inputs_are_refused_or_idempotent() {
        on_store(open, |runtime, store, (), clock| {
            inputs("memory", cases(256), runtime, store, clock)
        });
    }

    #[test]
    fn distinct_keys_are_distinct_records() {
        on_store(open, |runtime, store, (), clock| {
            collisions("memory", cases(256), runtime, store, clock)
        });
    }
}

mod sqlite_file {
    use super::*;
    use idem_tests::sqlite_file::FileStore;

    async fn open(clock: ManualClock) -> Option<(FileStore, Sql)> {
        let store = FileStore::open("bad-input", clock).await;
        let sql = Sql::Sqlite(store.store.pool().clone(), store.store.table().to_owned());
        Some((store, sql))
    }

    #[test]
    fn inputs_are_refused_or_idempotent() {
        on_store(open, |runtime, store, _, clock| {
            inputs("sqlite", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn distinct_keys_are_distinct_records() {
        on_store(open, |runtime, store, _, clock| {
            collisions("sqlite", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn corrupt_rows_are_decode_errors() {
        on_store(open, |runtime, store, sql, clock| {
            sql_corrupt("sqlite", Dialect::Sqlite, runtime, store, sql, clock)
        });
    }
}

mod postgres {
    use super::*;
    use idem_runtime::postgres::PostgresStore;
    use idem_tests::Guarded;
    use idem_tests::sql_servers::{postgres_pool, postgres_store};

    async fn open(clock: ManualClock) -> Option<(Guarded<PostgresStore>, Sql)> {
        let store = postgres_store(postgres_pool().await?, clock).await;
        let sql = Sql::Postgres(store.store.pool().clone(), store.store.table().to_owned());
        Some((store, sql))
    }

    #[test]
    fn inputs_are_refused_or_idempotent() {
        on_store(open, |runtime, store, _, clock| {
            inputs("postgres", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn distinct_keys_are_distinct_records() {
        on_store(open, |runtime, store, _, clock| {
            collisions("postgres", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn corrupt_rows_are_decode_errors() {
        on_store(open, |runtime, store, sql, clock| {
            sql_corrupt("postgres", Dialect::Postgres, runtime, store, sql, clock)
        });
    }
}

mod mysql {
    use super::*;
    use idem_runtime::mysql::MySqlStore;
    use idem_tests::Guarded;
    use idem_tests::sql_servers::{mysql_pool, mysql_store, mysql_store_as_on_mysql};

    async fn open(clock: ManualClock) -> Option<(Guarded<MySqlStore>, Sql)> {
        let store = mysql_store(mysql_pool().await?, clock).await;
        let sql = Sql::Mysql(store.store.pool().clone(), store.store.table().to_owned());
        Some((store, sql))
    }

    /// The store claiming as on MySQL, without `INSERT … RETURNING`: its claims learn what
    /// they did from `LAST_INSERT_ID()` and a read.
    async fn open_as_on_mysql(clock: ManualClock) -> Option<(Guarded<MySqlStore>, Sql)> {
        let store = mysql_store_as_on_mysql(mysql_pool().await?, clock).await;
        let sql = Sql::Mysql(store.store.pool().clone(), store.store.table().to_owned());
        Some((store, sql))
    }

    #[test]
    fn inputs_are_refused_or_idempotent() {
        on_store(open, |runtime, store, _, clock| {
            inputs("mysql", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn distinct_keys_are_distinct_records() {
        on_store(open, |runtime, store, _, clock| {
            collisions("mysql", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn corrupt_rows_are_decode_errors() {
        on_store(open, |runtime, store, sql, clock| {
            sql_corrupt("mysql", Dialect::Mysql, runtime, store, sql, clock)
        });
    }

    #[test]
    fn corrupt_rows_are_decode_errors_as_on_mysql() {
        on_store(open_as_on_mysql, |runtime, store, sql, clock| {
            sql_corrupt("mysql", Dialect::Mysql, runtime, store, sql, clock)
        });
    }

    /// Regression (found by `corrupt_rows_are_decode_errors`, whose smallest failing input
    /// was `FenceOfDead(-1)`): a claim that took over a dead record whose fence was edited to
    /// -1 raised it to 0 and reported the takeover through `LAST_INSERT_ID(fence + 1)` = 0,
    /// which reads as "changed nothing"; it then answered `InProgress` for a record nobody
    /// holds. Such a fence is now raised out of the column's range: `Error::Decode`, as on
    /// SQLite and PostgreSQL. On both claim paths.
    #[test]
    fn dead_record_at_fence_minus_1_is_a_decode_error() {
        fence_minus_1(open);
    }

    #[test]
    fn dead_record_at_fence_minus_1_is_a_decode_error_as_on_mysql() {
        fence_minus_1(open_as_on_mysql);
    }

    fn fence_minus_1<F, Fut>(open: F)
    where
        F: FnOnce(ManualClock) -> Fut,
        Fut: Future<Output = Option<(Guarded<MySqlStore>, Sql)>>,
    {
        on_store(open, |runtime, store, sql, clock| {
            runtime.block_on(async {
                let names = Names::fresh();
                let key = names.key("fence-minus-1");
                hold(store, &key, None).await.expect("a new key");
                clock.set(START + 31_000); // the 30 s lease has run out
                sql.set(&key, "fence", &SqlValue::Int(-1))
                    .await
                    .expect("edit the fence");
                let claimed = store.claim(&key, None, LEASE).await;
                assert!(
                    is_decode(&claimed, &key),
                    "a dead record at fence -1 cannot be taken over with a positive fence: \
                     expected Err(Decode), got {claimed:?}"
                );
            });
        });
    }
}

mod redis_store {
    use super::*;
    use idem_runtime::redis::RedisStore;
    use idem_tests::Guarded;
    use idem_tests::redis_server::{manager, store};
    use redis::aio::ConnectionManager;

    async fn open(
        clock: ManualClock,
    ) -> Option<(Guarded<RedisStore<ConnectionManager>>, ConnectionManager)> {
        let connection = manager().await?;
        Some((store(connection.clone(), clock), connection))
    }

    #[test]
    fn inputs_are_refused_or_idempotent() {
        on_store(open, |runtime, store, _, clock| {
            inputs("redis", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn distinct_keys_are_distinct_records() {
        on_store(open, |runtime, store, _, clock| {
            collisions("redis", cases(128), runtime, store, clock)
        });
    }

    #[test]
    fn corrupt_hashes_are_decode_errors() {
        on_store(open, |runtime, store, connection, clock| {
            check(
                "redis: corrupt hashes",
                cases(128),
                redis_corruptions(),
                |corruption| {
                    let redis_key = |key: &RecordKey| store.store.redis_key(key);
                    runtime.block_on(redis_case(
                        store,
                        redis_key,
                        connection.clone(),
                        clock,
                        corruption,
                    ))
                },
            );
        });
    }
}
