//! Running one call through the claim/complete protocol.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::store::{Claim, Lease, Store};
use crate::{Error, Fingerprint, RecordKey};

/// How one idempotent handler treats its records and duplicates.
///
/// The defaults: completed results are kept for 24 hours, a claim's lease runs for 30 seconds,
/// a duplicate that finds the key in progress fails at once with [`Error::InProgress`], the
/// lease is not extended while the body runs, and a store that cannot be reached fails the call
/// closed (the body does not run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    ttl: Duration,
    lease: Duration,
    wait: Option<Duration>,
    heartbeat: bool,
    fail_open: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy {
    /// How long a completed result is kept by default: 24 hours.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
    /// How long an in-progress claim lives by default: 30 seconds.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

    /// The default policy.
    pub const fn new() -> Self {
        Self {
            ttl: Self::DEFAULT_TTL,
            lease: Self::DEFAULT_LEASE,
            wait: None,
            heartbeat: false,
            fail_open: false,
        }
    }

    /// Keeps completed results for `ttl`; a duplicate after that runs the body again.
    pub const fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Lets an in-progress claim live for `lease`. Choose it longer than the body ever takes
    /// (or turn on the heartbeat): when it runs out, a duplicate takes the key over and runs
    /// the body again.
    ///
    /// Stores count time in whole milliseconds, so the lease is rounded up to the next
    /// millisecond and is at least 1 ms: a zero lease would let every duplicate take the key
    /// over at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_runtime::Policy;
    ///
    /// assert_eq!(Policy::new().with_lease(Duration::ZERO).lease(), Duration::from_millis(1));
    /// assert_eq!(Policy::new().with_lease(Duration::from_micros(1500)).lease(), Duration::from_millis(2));
    /// ```
    pub const fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = whole_millis(lease);
        self
    }

    /// A duplicate that finds the key in progress waits up to `wait` for the first call's
    /// result (polling the store) instead of failing at once with [`Error::InProgress`].
    pub const fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Extends the lease every third of its length while the body runs, so a slow but live
    /// body is not taken over.
    pub const fn with_heartbeat(mut self, heartbeat: bool) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// With `true`, a call whose **claim** fails with [`Error::Store`] (the store is down,
    /// unreachable or timed out) runs the body anyway, without idempotency, and returns its
    /// result unrecorded; a `tracing` warning says so. The default, `false`, fails closed: the
    /// body does not run and the caller gets the store error (do not ack; redeliver later).
    ///
    /// **Failing open gives up the guarantee while the store is down**: every delivery that
    /// arrives during the outage runs the body, so duplicates then double their effects, and
    /// a key that is completed later does not know about the runs that happened meanwhile.
    /// Use it only for bodies whose duplicates are harmless or checked elsewhere (a read, a
    /// cache fill, a notification you can afford twice) and that must not stop when the store
    /// does.
    ///
    /// Only a store error *at the claim* fails open. A key found in progress
    /// ([`Error::InProgress`], also after waiting), a fingerprint mismatch, an empty key and a
    /// stored record that does not decode fail as before, and so does a duplicate that was
    /// waiting ([`with_wait`](Self::with_wait)) for a call it saw in progress when the store
    /// then fails: another call is running the body. A body that ran under a claim and whose
    /// result cannot be recorded (the store went down meanwhile) still returns the store
    /// error, as without this option.
    ///
    /// Refused by the macro for `strategy = "tx"`, `"state"` and `"version"`: there the claim
    /// and the body's writes commit in one transaction, so without the database the body
    /// cannot run either.
    pub const fn with_fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// How long completed results are kept.
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long a claim lives without a heartbeat.
    pub const fn lease(&self) -> Duration {
        self.lease
    }

    /// How long a duplicate waits for an in-progress call, if at all.
    pub const fn wait(&self) -> Option<Duration> {
        self.wait
    }

    /// Whether the lease is extended while the body runs.
    pub const fn heartbeat(&self) -> bool {
        self.heartbeat
    }

    /// Whether a store error at the claim runs the body anyway, unrecorded (see
    /// [`with_fail_open`](Self::with_fail_open)).
    pub const fn fail_open(&self) -> bool {
        self.fail_open
    }
}

/// `duration` rounded up to whole milliseconds, at least 1 ms.
const fn whole_millis(duration: Duration) -> Duration {
    const MAX_MILLIS: u128 = u64::MAX as u128;
    let mut millis = duration.as_millis();
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        millis += 1;
    }
    if millis == 0 {
        millis = 1;
    }
    if millis > MAX_MILLIS {
        millis = MAX_MILLIS;
    }
    #[expect(clippy::cast_possible_truncation, reason = "clamped to u64::MAX above")]
    Duration::from_millis(millis as u64)
}

/// Runs `body` at most once per `key`: what `#[idempotent]` expands to.
///
/// * The key is claimed. If it was completed before, the stored result is decoded and
///   returned, and `body` is not polled. If another call holds it, [`Error::InProgress`] is
///   returned (or, with [`Policy::with_wait`], the call waits for that result). If it was used
///   with another `fingerprint`, [`Error::FingerprintMismatch`] is returned.
/// * Otherwise `body` runs. `Ok(value)` is serialized (JSON) and recorded, and what the record
///   decodes to is returned: the value every replay gets, which differs from `value` when its
///   JSON form loses something (`Some(None)` as `Option<Option<_>>` comes back `None`,
///   `Some(())` as `Option<()>` too, a `#[serde(skip)]` field comes back as its default). If
///   the record cannot be written (the lease was lost, the store failed) that error is
///   returned instead, because the result was not recorded: a later delivery may run the body
///   again once the claim expires. A result that cannot be serialized, or does not deserialize
///   back, is [`Error::Encode`] and leaves the claim to expire as well. `Err` releases the
///   claim so the next delivery runs the body again at once.
/// * If the returned future is dropped (cancelled) or `body` panics, the claim is left to
///   expire with its lease: until then duplicates get [`Error::InProgress`].
/// * If the claim fails with [`Error::Store`], that error is returned and `body` is not polled
///   (fail closed), unless [`Policy::with_fail_open`] is set: then `body` runs without a claim
///   and its result is returned unrecorded.
///
/// Every call runs in a `tracing` span named `idempotent` with the fields `scope`, `key`,
/// `fence` and `outcome` (`executed`, `replayed`, `in_progress`, `mismatch`, `failed`,
/// `lease_lost`, `store_error` or `failed_open`).
///
/// # Errors
///
/// The body's own errors, and [`Error`] converted with `E: From<Error>`.
pub async fn run<S, T, E, F>(
    store: &S,
    key: RecordKey,
    fingerprint: Option<Fingerprint>,
    policy: Policy,
    body: F,
) -> Result<T, E>
where
    S: Store + ?Sized,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let span = tracing::info_span!(
        "idempotent",
        scope = key.scope(),
        key = key.key(),
        fence = Empty,
        outcome = Empty,
    );
    run_in_span(store, &key, fingerprint.as_ref(), policy, body)
        .instrument(span)
        .await
}

async fn run_in_span<S, T, E, F>(
    store: &S,
    key: &RecordKey,
    fingerprint: Option<&Fingerprint>,
    policy: Policy,
    body: F,
) -> Result<T, E>
where
    S: Store + ?Sized,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let span = Span::current();
    let lease = match acquire(store, key, fingerprint, policy).await {
        Ok(Acquired::Lease(lease)) => lease,
        Ok(Acquired::Replay(stored)) => {
            span.record("outcome", "replayed");
            tracing::debug!("replayed the stored result");
            return decode(key, &stored).map_err(E::from);
        }
        Ok(Acquired::Unreachable(error)) => {
            span.record("outcome", "failed_open");
            tracing::warn!(
                %error,
                "the store cannot be reached: running the body without idempotency (fail_open); \
                 its result is not recorded and a duplicate will run it again"
            );
            return body.await;
        }
        Err(error) => {
            span.record("outcome", outcome_of(&error));
            tracing::debug!(%error, "body not run");
            return Err(E::from(error));
        }
    };
    span.record("fence", lease.fence());

    let (output, lease) = if policy.heartbeat {
        with_heartbeat(store, key, lease, policy.lease, body).await
    } else {
        (body.await, lease)
    };

    let value = match output {
        Ok(value) => value,
        Err(error) => {
            span.record("outcome", "failed");
            if let Err(release) = store.release(key, &lease).await {
                tracing::warn!(error = %release, "could not release the claim; it will expire with its lease");
            }
            return Err(error);
        }
    };
    // The body ran, so its effect happened: a result that cannot be recorded must not
    // release the claim (the next delivery would repeat the effect at once). The claim is left
    // to expire with its lease, and the error says why.
    let Encoded { stored, decoded } = match encode(&value) {
        Ok(encoded) => encoded,
        Err(error) => {
            span.record("outcome", "failed");
            tracing::error!(%error, "the body ran but its result cannot be recorded; the claim is left to expire");
            return Err(E::from(error));
        }
    };
    match store.complete(key, &lease, &stored, policy.ttl).await {
        Ok(()) => {
            span.record("outcome", "executed");
            Ok(decoded)
        }
        Err(error) => {
            span.record("outcome", outcome_of(&error));
            tracing::warn!(%error, "the body ran but its result was not recorded");
            Err(E::from(error))
        }
    }
}

enum Acquired {
    Lease(Lease),
    Replay(Vec<u8>),
    /// The claim failed with a store error and the policy fails open.
    Unreachable(Error),
}

async fn acquire<S: Store + ?Sized>(
    store: &S,
    key: &RecordKey,
    fingerprint: Option<&Fingerprint>,
    policy: Policy,
) -> Result<Acquired, Error> {
    const FIRST_PAUSE: Duration = Duration::from_millis(5);
    const LONGEST_PAUSE: Duration = Duration::from_millis(250);
    // A wait too long to represent (`Duration::MAX`) waits without a deadline.
    let deadline = policy
        .wait
        .map(|wait| tokio::time::Instant::now().checked_add(wait));
    let mut pause = FIRST_PAUSE;
    // A duplicate that saw the key in progress knows that another call runs the body: a store
    // error while it waits must not let it run the body too.
    let mut seen_in_progress = false;
    loop {
        let claim = match store.claim(key, fingerprint, policy.lease).await {
            Ok(claim) => claim,
            Err(error @ Error::Store(_)) if policy.fail_open && !seen_in_progress => {
                return Ok(Acquired::Unreachable(error));
            }
            Err(error) => return Err(error),
        };
        match claim {
            Claim::Acquired(lease) => return Ok(Acquired::Lease(lease)),
            Claim::Completed(stored) => return Ok(Acquired::Replay(stored)),
            Claim::Mismatch => {
                return Err(Error::FingerprintMismatch {
                    scope: key.scope().to_owned(),
                    key: key.key().to_owned(),
                });
            }
            Claim::InProgress { retry_after } => {
                seen_in_progress = true;
                let now = tokio::time::Instant::now();
                let left = match deadline {
                    None => Duration::ZERO,
                    Some(None) => Duration::MAX,
                    Some(Some(deadline)) => deadline.saturating_duration_since(now),
                };
                if left.is_zero() {
                    return Err(Error::InProgress {
                        scope: key.scope().to_owned(),
                        key: key.key().to_owned(),
                        retry_after,
                    });
                }
                let nap = pause.min(left).min(retry_after.max(FIRST_PAUSE));
                tokio::time::sleep(nap).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

async fn with_heartbeat<S, F>(
    store: &S,
    key: &RecordKey,
    lease: Lease,
    duration: Duration,
    body: F,
) -> (F::Output, Lease)
where
    S: Store + ?Sized,
    F: Future,
{
    let every = (duration / 3).max(Duration::from_millis(1));
    let mut body = pin!(body);
    let mut lease = lease;
    loop {
        tokio::select! {
            biased;
            output = &mut body => return (output, lease),
            () = tokio::time::sleep(every) => match store.extend(key, &lease, duration).await {
                Ok(extended) => lease = extended,
                // Another call took the key over: extending again cannot succeed.
                Err(error @ Error::LeaseLost { .. }) => {
                    tracing::warn!(%error, "the lease was lost; the body goes on without it");
                    break;
                }
                // A store hiccup: the lease still runs, so try again at the next beat.
                Err(error) => {
                    tracing::warn!(%error, "could not extend the lease; retrying at the next beat");
                }
            },
        }
    }
    (body.await, lease)
}

/// A result as it is recorded.
pub(crate) struct Encoded<T> {
    /// The bytes the store keeps.
    pub(crate) stored: Vec<u8>,
    /// What `stored` decodes to: what every replay returns, so what the first caller gets too.
    pub(crate) decoded: T,
}

/// Serializes a result and decodes it again. A value that does not survive the round trip (a
/// map with non-string keys, a `NaN`, a type whose `Deserialize` rejects what its `Serialize`
/// wrote) is an error: it would otherwise be stored and fail every replay. A value that comes
/// back as another value (`Some(None)` as `Option<Option<_>>` is `None`, a `#[serde(skip)]`
/// field gets its default) is returned as it came back, so the first caller sees what the
/// replays will.
pub(crate) fn encode<T: Serialize + DeserializeOwned>(value: &T) -> Result<Encoded<T>, Error> {
    let stored = serde_json::to_vec(value).map_err(|source| Error::Encode {
        what: "handler's result",
        source,
    })?;
    let decoded = serde_json::from_slice::<T>(&stored).map_err(|source| Error::Encode {
        what: "handler's result (it serializes, but does not deserialize back)",
        source,
    })?;
    Ok(Encoded { stored, decoded })
}

pub(crate) fn decode<T: DeserializeOwned>(key: &RecordKey, stored: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(stored).map_err(|source| Error::Decode {
        scope: key.scope().to_owned(),
        key: key.key().to_owned(),
        source: Box::new(source),
    })
}

pub(crate) fn outcome_of(error: &Error) -> &'static str {
    match error {
        Error::InProgress { .. } => "in_progress",
        Error::FingerprintMismatch { .. } => "mismatch",
        Error::LeaseLost { .. } => "lease_lost",
        _ => "store_error",
    }
}
