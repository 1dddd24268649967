//! The store conformance suite: the [`Store`] contract as executable cases, written once and
//! run against every store.
//!
//! Each case is a `pub async fn case<S: Store + 'static>(store: S, clock: ManualClock)` that
//! gets a fresh, empty store reading time from `clock`, moves the clock instead of sleeping,
//! and asserts what the store answers: the [`Claim`] variants, the fences, the stored bytes,
//! how many records a purge deleted. A case panics with a message saying what the contract
//! expected and what the store did.
//!
//! The store under test must take its time from the given [`ManualClock`]: leases and expiry
//! are tested by moving that clock (which starts at [`START_MILLIS`]).
//!
//! [`conformance_tests!`](crate::conformance_tests) turns the whole suite into one
//! `#[tokio::test]` per case, so a store's test file is one macro call. The crate that calls it
//! needs `tokio` with the `macros` and `rt-multi-thread` features:
//!
//! ```no_run
//! use idem_runtime::MemoryStore;
//! use idem_runtime::clock::ManualClock;
//!
//! idem_runtime::conformance_tests!(|clock: ManualClock| async move {
//!     MemoryStore::with_clock(clock)
//! });
//! # fn main() {}
//! ```
//!
//! [`CASES`] lists the case names; [`run_case`] runs one case by hand.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;

use crate::clock::{Clock, ManualClock};
use crate::{Claim, Error, Fingerprint, HASHED_PREFIX, Lease, RecordKey, Store};

/// Where every case's clock starts: 2023-11-14T22:13:20Z, in milliseconds since the Unix epoch.
pub const START_MILLIS: i64 = 1_700_000_000_000;

/// The names of the conformance cases, one function of this module each, in the order
/// [`conformance_tests!`](crate::conformance_tests) declares them.
pub const CASES: &[&str] = crate::__idem_conformance_cases!(names());

/// Expands to one `#[tokio::test]` per conformance case, each running the case against a store
/// built by `$make` on a fresh [`ManualClock`](crate::clock::ManualClock).
///
/// `$make` is a closure taking the clock and returning a future of the store (anything
/// implementing [`Store`](crate::Store) that is `'static`); it is called once per test, so every
/// case gets an empty store. The tests run on a multi-thread runtime with 4 workers; the
/// calling crate needs `tokio` with the `macros` and `rt-multi-thread` features. Call the macro
/// once per module: the tests are named after the cases ([`CASES`](crate::testing::CASES)).
///
/// ```no_run
/// mod sqlite {
///     use idem_runtime::clock::ManualClock;
///     use idem_runtime::sqlite::SqliteStore;
///
///     idem_runtime::conformance_tests!(|clock: ManualClock| async move {
///         let store = SqliteStore::in_memory().await.expect("open SQLite").with_clock(clock);
///         store.migrate().await.expect("create the table");
///         store
///     });
/// }
/// # fn main() {}
/// ```
///
/// For a store behind a server that may be absent, write `optional` before the closure and
/// return `Option<store>`: a test whose closure returns `None` ends at once (say why from the
/// closure; failing instead is the closure's choice).
#[macro_export]
macro_rules! conformance_tests {
    (optional $make:expr $(,)?) => {
        $crate::__idem_conformance_cases! { optional_tests($make) }
    };
    ($make:expr $(,)?) => {
        $crate::__idem_conformance_cases! { tests($make) }
    };
}

/// The list of cases, written once, handed to the arm named by its first token.
#[doc(hidden)]
#[macro_export]
macro_rules! __idem_conformance_cases {
    ($then:ident $args:tt) => {
        $crate::__idem_conformance_cases! { @$then $args [
            new_key_is_acquired_with_fence_1,
            completed_key_replays_exact_bytes,
            in_progress_key_reports_remaining_lease,
            fingerprint_mismatch_on_in_progress_record,
            fingerprint_mismatch_on_completed_record,
            missing_fingerprint_skips_the_check,
            released_key_is_acquired_at_once_with_higher_fence,
            expired_lease_is_taken_over_with_next_fence,
            takeover_replaces_the_fingerprint,
            extend_moves_the_lease,
            complete_after_expiry_without_takeover_succeeds,
            completed_record_cannot_be_changed_by_its_lease,
            completed_record_expires_after_ttl,
            purge_deletes_only_expired_records_in_batches,
            purged_in_progress_record_loses_its_lease,
            concurrent_claims_of_one_key_acquire_once,
            concurrent_distinct_keys_each_replay_their_own_value,
            large_result_round_trips,
            unicode_and_long_keys_stay_distinct,
            wrong_owner_lease_is_rejected,
        ] }
    };
    (@tests($make:expr) [$($case:ident),* $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::testing::run_case($make, $crate::testing::$case).await;
            }
        )*
    };
    (@optional_tests($make:expr) [$($case:ident),* $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::testing::run_optional_case($make, $crate::testing::$case).await;
            }
        )*
    };
    (@names() [$($case:ident),* $(,)?]) => {
        &[$(::core::stringify!($case)),*]
    };
}

/// Builds a store with `make` on a fresh [`ManualClock`] set to [`START_MILLIS`] and runs
/// `case` on it (what every test of [`conformance_tests!`](crate::conformance_tests) does).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use idem_runtime::MemoryStore;
/// use idem_runtime::testing::{extend_moves_the_lease, run_case};
///
/// run_case(|clock| async move { MemoryStore::with_clock(clock) }, extend_moves_the_lease).await;
/// # }
/// ```
pub async fn run_case<S, Make, Built, Case, Checked>(make: Make, case: Case)
where
    S: Store,
    Make: FnOnce(ManualClock) -> Built,
    Built: Future<Output = S>,
    Case: FnOnce(S, ManualClock) -> Checked,
    Checked: Future<Output = ()>,
{
    let clock = ManualClock::new(START_MILLIS);
    let store = make(clock.clone()).await;
    case(store, clock).await;
}

/// As [`run_case`], for a store that may be unavailable: when `make` gives `None`, nothing runs.
pub async fn run_optional_case<S, Make, Built, Case, Checked>(make: Make, case: Case)
where
    S: Store,
    Make: FnOnce(ManualClock) -> Built,
    Built: Future<Output = Option<S>>,
    Case: FnOnce(S, ManualClock) -> Checked,
    Checked: Future<Output = ()>,
{
    let clock = ManualClock::new(START_MILLIS);
    if let Some(store) = make(clock.clone()).await {
        case(store, clock).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// A key the store has never seen is acquired with fence 1, a lease running for the asked
/// duration from the store's now, and an owner token unique to the claim; claiming it again
/// while the lease runs does not acquire it.
pub async fn new_key_is_acquired_with_fence_1<S: Store + 'static>(store: S, clock: ManualClock) {
    let first = key("new-1");
    let second = key("new-2");

    let a = expect_acquired(
        claim(&store, &first, None, LEASE).await,
        "first claim of new-1",
    );
    assert_eq!(a.fence(), 1, "a new key's first lease has fence 1");
    assert_eq!(
        a.until_millis(),
        clock.now_millis() + millis(LEASE),
        "the lease runs for the asked {LEASE:?} from the clock's now"
    );
    assert!(!a.owner().is_empty(), "the owner token is empty");

    let fp = fingerprint("payload");
    let b = expect_acquired(
        claim(&store, &second, Some(&fp), LEASE).await,
        "first claim of new-2",
    );
    assert_eq!(b.fence(), 1, "fences count per key: new-2 starts at 1 too");
    assert_ne!(a.owner(), b.owner(), "two claims got the same owner token");

    assert_in_progress(
        &claim(&store, &first, None, LEASE).await,
        LEASE,
        "second claim of new-1 while its lease runs",
    );
}

/// A completed key replays exactly the stored bytes, however short or JSON-falsy they are
/// (empty, `null`, `0`, `false`, `[]`, …), with or without a fingerprint, as often as asked.
pub async fn completed_key_replays_exact_bytes<S: Store + 'static>(store: S, _clock: ManualClock) {
    let results: [&[u8]; 11] = [
        b"",
        b"null",
        b"0",
        b"false",
        b"[]",
        b"{}",
        b"\"\"",
        br#"{"points":25}"#,
        b"\x00",
        b"\x00\xff\x00\xfe",
        "ünïcødé ✓ 🚀".as_bytes(),
    ];
    for (i, result) in results.iter().enumerate() {
        let key = key(&format!("replay-{i}"));
        let fp = fingerprint(&format!("payload-{i}"));
        let lease = expect_acquired(claim(&store, &key, Some(&fp), LEASE).await, "a new key");
        complete(&store, &key, &lease, result, TTL).await;
        for round in 0..2 {
            assert_completed(
                &claim(&store, &key, Some(&fp), LEASE).await,
                result,
                &format!("replay {round} of {key} with its fingerprint"),
            );
        }
        assert_completed(
            &claim(&store, &key, None, LEASE).await,
            result,
            &format!("replay of {key} without a fingerprint"),
        );
    }
}

/// A key held by a live lease answers [`Claim::InProgress`] with `retry_after` equal to what is
/// left of the holder's lease (never more, never zero), whatever lease the asker wants, and
/// the asking does not disturb the holder.
pub async fn in_progress_key_reports_remaining_lease<S: Store + 'static>(
    store: S,
    clock: ManualClock,
) {
    let key = key("busy");
    let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");

    assert_in_progress(&claim(&store, &key, None, LEASE).await, LEASE, "at once");
    clock.advance(Duration::from_secs(10));
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        LEASE - Duration::from_secs(10),
        "after 10 s",
    );
    assert_in_progress(
        &claim(&store, &key, None, Duration::from_secs(300)).await,
        LEASE - Duration::from_secs(10),
        "after 10 s, asking for a 300 s lease",
    );
    clock.advance(LEASE - Duration::from_secs(10) - Duration::from_millis(1));
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        Duration::from_millis(1),
        "1 ms before the lease runs out",
    );

    complete(&store, &key, &lease, b"done", TTL).await;
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"done",
        "the holder completed after the other claims",
    );
}

/// A live in-progress record claimed with another payload's fingerprint answers
/// [`Claim::Mismatch`]; the same fingerprint (or none) answers [`Claim::InProgress`].
pub async fn fingerprint_mismatch_on_in_progress_record<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let key = key("in-progress-fp");
    let a = fingerprint("payload-a");
    let b = fingerprint("payload-b");
    let lease = expect_acquired(claim(&store, &key, Some(&a), LEASE).await, "a new key");

    assert_mismatch(
        &claim(&store, &key, Some(&b), LEASE).await,
        "in progress with payload a, claimed with payload b",
    );
    assert_in_progress(
        &claim(&store, &key, Some(&a), LEASE).await,
        LEASE,
        "in progress with payload a, claimed with payload a",
    );
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        LEASE,
        "in progress with payload a, claimed without a fingerprint",
    );

    complete(&store, &key, &lease, b"a", TTL).await;
    assert_completed(
        &claim(&store, &key, Some(&a), LEASE).await,
        b"a",
        "the mismatching claim did not disturb the holder",
    );
}

/// A completed record claimed with another payload's fingerprint answers [`Claim::Mismatch`]
/// (replaying would hand a reused key the wrong result); the same fingerprint (or none)
/// replays.
pub async fn fingerprint_mismatch_on_completed_record<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let key = key("completed-fp");
    let a = fingerprint("payload-a");
    let b = fingerprint("payload-b");
    let lease = expect_acquired(claim(&store, &key, Some(&a), LEASE).await, "a new key");
    complete(&store, &key, &lease, b"result-a", TTL).await;

    assert_mismatch(
        &claim(&store, &key, Some(&b), LEASE).await,
        "completed with payload a, claimed with payload b",
    );
    assert_completed(
        &claim(&store, &key, Some(&a), LEASE).await,
        b"result-a",
        "completed with payload a, claimed with payload a",
    );
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"result-a",
        "completed with payload a, claimed without a fingerprint",
    );
}

/// When the stored record or the claim has no fingerprint, the payloads are not compared:
/// in-progress and completed records answer as if they matched.
pub async fn missing_fingerprint_skips_the_check<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let b = fingerprint("payload-b");
    let stored_none = key("stored-without-fp");
    let lease = expect_acquired(claim(&store, &stored_none, None, LEASE).await, "a new key");
    assert_in_progress(
        &claim(&store, &stored_none, Some(&b), LEASE).await,
        LEASE,
        "in progress without a fingerprint, claimed with one",
    );
    complete(&store, &stored_none, &lease, b"none", TTL).await;
    assert_completed(
        &claim(&store, &stored_none, Some(&b), LEASE).await,
        b"none",
        "completed without a fingerprint, claimed with one",
    );

    let a = fingerprint("payload-a");
    let stored_a = key("stored-with-fp");
    let lease = expect_acquired(claim(&store, &stored_a, Some(&a), LEASE).await, "a new key");
    assert_in_progress(
        &claim(&store, &stored_a, None, LEASE).await,
        LEASE,
        "in progress with a fingerprint, claimed without one",
    );
    complete(&store, &stored_a, &lease, b"a", TTL).await;
    assert_completed(
        &claim(&store, &stored_a, None, LEASE).await,
        b"a",
        "completed with a fingerprint, claimed without one",
    );
}

/// A released key (its body failed) is acquired by the next claim at once, with a higher
/// fence; the releasing lease is then lost.
pub async fn released_key_is_acquired_at_once_with_higher_fence<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let key = key("released");
    let fp = fingerprint("payload");
    let first = expect_acquired(claim(&store, &key, Some(&fp), LEASE).await, "a new key");
    store
        .release(&key, &first)
        .await
        .expect("the holder releases its own live lease");

    let second = expect_acquired(
        claim(&store, &key, Some(&fp), LEASE).await,
        "the claim right after a release",
    );
    assert!(
        second.fence() > first.fence(),
        "the fence must rise after a release: {} then {}",
        first.fence(),
        second.fence()
    );
    assert_ne!(
        first.owner(),
        second.owner(),
        "the new holder got the old owner token"
    );
    assert_lease_lost(
        store.complete(&key, &first, b"stale", TTL).await,
        &key,
        first.fence(),
        "complete by the lease released before",
    );
    assert_lease_lost(
        store.release(&key, &first).await,
        &key,
        first.fence(),
        "release by the lease released before",
    );

    store
        .release(&key, &second)
        .await
        .expect("the second holder releases its own live lease");
    let third = expect_acquired(
        claim(&store, &key, Some(&fp), LEASE).await,
        "the claim after the second release",
    );
    assert!(
        third.fence() > second.fence(),
        "the fence must rise after every release: {} then {}",
        second.fence(),
        third.fence()
    );
    complete(&store, &key, &third, b"third", TTL).await;
    assert_completed(
        &claim(&store, &key, Some(&fp), LEASE).await,
        b"third",
        "the third holder's result",
    );
}

/// Once a lease has run out, the next claim takes the record over with the next fence; the old
/// holder's complete, release and extend then all fail with [`Error::LeaseLost`] and change
/// nothing, and the new holder's result is the one replayed.
pub async fn expired_lease_is_taken_over_with_next_fence<S: Store + 'static>(
    store: S,
    clock: ManualClock,
) {
    let key = key("taken-over");
    let old = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    clock.advance(LEASE - Duration::from_millis(1));
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        Duration::from_millis(1),
        "1 ms before the lease runs out",
    );
    clock.advance(Duration::from_millis(2));

    let new = expect_acquired(
        claim(&store, &key, None, LEASE).await,
        "the claim 1 ms after the lease ran out",
    );
    assert_eq!(
        new.fence(),
        old.fence() + 1,
        "a takeover raises the fence by one"
    );
    assert_ne!(
        new.owner(),
        old.owner(),
        "the new holder got the old owner token"
    );

    assert_lease_lost(
        store.complete(&key, &old, b"old", TTL).await,
        &key,
        old.fence(),
        "complete by the old holder",
    );
    assert_lease_lost(
        store.release(&key, &old).await,
        &key,
        old.fence(),
        "release by the old holder",
    );
    assert_lease_lost(
        store.extend(&key, &old, Duration::from_secs(3600)).await,
        &key,
        old.fence(),
        "extend by the old holder",
    );
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        LEASE,
        "the new holder's lease, untouched by the old holder's calls",
    );

    complete(&store, &key, &new, b"new", TTL).await;
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"new",
        "the new holder's result",
    );
    assert_lease_lost(
        store.complete(&key, &old, b"old", TTL).await,
        &key,
        old.fence(),
        "complete by the old holder after the new one completed",
    );
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"new",
        "the new holder's result, after the old holder tried again",
    );
}

/// Taking over an expired record (in progress or completed) does not compare fingerprints, and
/// the record then carries the new claim's fingerprint.
pub async fn takeover_replaces_the_fingerprint<S: Store + 'static>(store: S, clock: ManualClock) {
    let a = fingerprint("payload-a");
    let b = fingerprint("payload-b");

    let abandoned = key("abandoned");
    expect_acquired(
        claim(&store, &abandoned, Some(&a), LEASE).await,
        "a new key",
    );
    let done = key("done");
    let lease = expect_acquired(claim(&store, &done, Some(&a), LEASE).await, "a new key");
    complete(&store, &done, &lease, b"a", TTL).await;

    clock.advance(TTL + Duration::from_millis(1));
    for key in [&abandoned, &done] {
        let taken = expect_acquired(
            claim(&store, key, Some(&b), LEASE).await,
            &format!("expired {key} claimed with another payload"),
        );
        assert_eq!(
            taken.fence(),
            2,
            "the takeover of {key} raises the fence by one"
        );
        assert_mismatch(
            &claim(&store, key, Some(&a), LEASE).await,
            &format!("{key} taken over with payload b, claimed with payload a"),
        );
        assert_in_progress(
            &claim(&store, key, Some(&b), LEASE).await,
            LEASE,
            &format!("{key} taken over with payload b, claimed with payload b"),
        );
    }
}

/// `extend` moves the lease to run the given duration from now and returns it with the same
/// owner and fence: past the original end the key is still in progress, past the extended end
/// it can be taken over, and then the extended lease is lost.
pub async fn extend_moves_the_lease<S: Store + 'static>(store: S, clock: ManualClock) {
    let key = key("extended");
    let original = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    clock.advance(Duration::from_secs(20));

    let extended = store
        .extend(&key, &original, LEASE)
        .await
        .expect("the holder extends its own live lease");
    assert_eq!(
        extended.owner(),
        original.owner(),
        "extend changed the owner"
    );
    assert_eq!(
        extended.fence(),
        original.fence(),
        "extend changed the fence"
    );
    assert_eq!(
        extended.until_millis(),
        clock.now_millis() + millis(LEASE),
        "the extended lease runs for {LEASE:?} from the time of the extend"
    );

    // Extended at 20 s to run until 50 s; at 41 s the original lease (30 s) has run out.
    clock.advance(Duration::from_secs(21));
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        Duration::from_secs(9),
        "11 s past the original lease, 9 s before the extended one runs out",
    );
    assert_eq!(
        purge(&store, 100).await,
        0,
        "a purge past the original lease deleted the extended record"
    );

    clock.advance(Duration::from_secs(9) + Duration::from_millis(1));
    let taker = expect_acquired(
        claim(&store, &key, None, LEASE).await,
        "the claim past the extended lease",
    );
    assert_eq!(
        taker.fence(),
        original.fence() + 1,
        "a takeover raises the fence by one"
    );
    assert_lease_lost(
        store.extend(&key, &extended, LEASE).await,
        &key,
        extended.fence(),
        "extend by the holder taken over",
    );
    assert_lease_lost(
        store.complete(&key, &extended, b"late", TTL).await,
        &key,
        extended.fence(),
        "complete by the holder taken over",
    );
}

/// A holder whose lease ran out but whom nobody took over can still complete: completion is
/// fenced by owner and fence, not by time, so a slow body's result is kept when no other call
/// ran the body meanwhile.
pub async fn complete_after_expiry_without_takeover_succeeds<S: Store + 'static>(
    store: S,
    clock: ManualClock,
) {
    let key = key("slow");
    let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    clock.advance(LEASE + Duration::from_secs(5));

    store
        .complete(&key, &lease, b"slow but unchallenged", TTL)
        .await
        .expect("completing an expired lease nobody took over succeeds");
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"slow but unchallenged",
        "the late result",
    );
}

/// Once completed, a record no longer belongs to the lease that completed it: completing
/// again, releasing or extending fail with [`Error::LeaseLost`] and the first result stays.
pub async fn completed_record_cannot_be_changed_by_its_lease<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let key = key("final");
    let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    complete(&store, &key, &lease, b"first", TTL).await;

    assert_lease_lost(
        store.complete(&key, &lease, b"second", TTL).await,
        &key,
        lease.fence(),
        "a second complete",
    );
    assert_lease_lost(
        store.release(&key, &lease).await,
        &key,
        lease.fence(),
        "release after complete",
    );
    assert_lease_lost(
        store.extend(&key, &lease, LEASE).await,
        &key,
        lease.fence(),
        "extend after complete",
    );
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"first",
        "the first result",
    );
}

/// A completed record replays until its ttl has passed (counted from completion) and is then
/// acquired again with a higher fence, as a new operation.
pub async fn completed_record_expires_after_ttl<S: Store + 'static>(store: S, clock: ManualClock) {
    let key = key("expiring");
    let fp = fingerprint("payload");
    let first = expect_acquired(claim(&store, &key, Some(&fp), LEASE).await, "a new key");
    clock.advance(Duration::from_secs(1));
    complete(&store, &key, &first, b"first", TTL).await;

    clock.advance(TTL - Duration::from_millis(1));
    assert_completed(
        &claim(&store, &key, Some(&fp), LEASE).await,
        b"first",
        "1 ms before the ttl has passed",
    );

    clock.advance(Duration::from_millis(2));
    let second = expect_acquired(
        claim(&store, &key, Some(&fp), LEASE).await,
        "the claim 1 ms after the ttl passed",
    );
    assert!(
        second.fence() > first.fence(),
        "the fence must rise when an expired record is claimed: {} then {}",
        first.fence(),
        second.fence()
    );
    complete(&store, &key, &second, b"second", TTL).await;
    assert_completed(
        &claim(&store, &key, Some(&fp), LEASE).await,
        b"second",
        "the result of the run after expiry",
    );
}

/// `purge_expired` deletes only records past their expiry (completed records past their ttl,
/// in-progress records past their lease, released records), at most `limit` per call, and
/// reports how many it deleted; live records are untouched.
pub async fn purge_deletes_only_expired_records_in_batches<S: Store + 'static>(
    store: S,
    clock: ManualClock,
) {
    let short_ttl = Duration::from_secs(60);
    let long = Duration::from_secs(24 * 3600);

    for i in 0..6 {
        let key = key(&format!("expired-completed-{i}"));
        let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
        complete(&store, &key, &lease, b"short", short_ttl).await;
    }
    for i in 0..2 {
        let key = key(&format!("expired-in-progress-{i}"));
        expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    }
    for i in 0..2 {
        let key = key(&format!("released-{i}"));
        let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
        store
            .release(&key, &lease)
            .await
            .expect("the holder releases its own live lease");
    }
    let mut live_completed = Vec::new();
    for i in 0..2 {
        let key = key(&format!("live-completed-{i}"));
        let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
        let result = format!("live-{i}").into_bytes();
        complete(&store, &key, &lease, &result, long).await;
        live_completed.push((key, result));
    }
    let live_busy = key("live-in-progress");
    let live_lease = expect_acquired(claim(&store, &live_busy, None, long).await, "a new key");

    clock.advance(Duration::from_secs(120));
    assert_eq!(
        purge(&store, 0).await,
        0,
        "purge with limit 0 deleted records"
    );
    assert_eq!(
        purge(&store, 4).await,
        4,
        "first batch of 4 out of 10 expired"
    );
    assert_eq!(
        purge(&store, 4).await,
        4,
        "second batch of 4 out of 10 expired"
    );
    assert_eq!(purge(&store, 4).await, 2, "last 2 out of 10 expired");
    assert_eq!(purge(&store, 4).await, 0, "nothing expired is left");

    for (key, result) in &live_completed {
        assert_completed(
            &claim(&store, key, None, LEASE).await,
            result,
            &format!("live {key} after the purges"),
        );
    }
    assert_in_progress(
        &claim(&store, &live_busy, None, LEASE).await,
        long - Duration::from_secs(120),
        "the live in-progress record after the purges",
    );
    complete(&store, &live_busy, &live_lease, b"busy", TTL).await;
    assert_completed(
        &claim(&store, &live_busy, None, LEASE).await,
        b"busy",
        "the live in-progress record completed after the purges",
    );
    assert_eq!(purge(&store, 100).await, 0, "live records were purged");
}

/// A holder whose expired in-progress record was purged has lost its lease: complete, release
/// and extend fail with [`Error::LeaseLost`], also after a new claim recreated the record
/// (possibly with the same fence: the owner token tells the holders apart).
pub async fn purged_in_progress_record_loses_its_lease<S: Store + 'static>(
    store: S,
    clock: ManualClock,
) {
    let key = key("purged");
    let old = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    clock.advance(LEASE + Duration::from_secs(1));
    assert_eq!(
        purge(&store, 100).await,
        1,
        "the expired in-progress record is purged"
    );

    assert_lease_lost(
        store.complete(&key, &old, b"old", TTL).await,
        &key,
        old.fence(),
        "complete after the record was purged",
    );
    assert_lease_lost(
        store.extend(&key, &old, LEASE).await,
        &key,
        old.fence(),
        "extend after the record was purged",
    );
    assert_lease_lost(
        store.release(&key, &old).await,
        &key,
        old.fence(),
        "release after the record was purged",
    );

    let new = expect_acquired(claim(&store, &key, None, LEASE).await, "a purged key");
    assert_ne!(
        new.owner(),
        old.owner(),
        "the new holder got the old owner token"
    );
    assert_lease_lost(
        store.complete(&key, &old, b"old", TTL).await,
        &key,
        old.fence(),
        "complete by the purged holder after a new claim",
    );
    assert_lease_lost(
        store.release(&key, &old).await,
        &key,
        old.fence(),
        "release by the purged holder after a new claim",
    );
    assert_lease_lost(
        store.extend(&key, &old, LEASE).await,
        &key,
        old.fence(),
        "extend by the purged holder after a new claim",
    );
    complete(&store, &key, &new, b"new", TTL).await;
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"new",
        "the new holder's result",
    );
}

/// 64 tasks claiming one key at the same moment: exactly one acquires it (with fence 1), the
/// 63 others see it in progress; once completed, all 64 replay its result.
pub async fn concurrent_claims_of_one_key_acquire_once<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    const CLAIMERS: usize = 64;
    let store = Arc::new(store);
    let key = key("contended");
    let fp = fingerprint("payload");

    let claims = claim_all(&store, &key, fp, CLAIMERS).await;
    let mut leases = Vec::new();
    let mut in_progress = 0;
    for found in claims {
        match found {
            Claim::Acquired(lease) => leases.push(lease),
            Claim::InProgress { retry_after } => {
                assert!(
                    retry_after > Duration::ZERO && retry_after <= LEASE,
                    "retry_after {retry_after:?} is not within (0, {LEASE:?}]"
                );
                in_progress += 1;
            }
            other => panic!("a concurrent claim answered {}", describe(&other)),
        }
    }
    assert_eq!(
        leases.len(),
        1,
        "{} of {CLAIMERS} claims acquired the key",
        leases.len()
    );
    assert_eq!(
        in_progress,
        CLAIMERS - 1,
        "claims that saw the key in progress"
    );
    let lease = &leases[0];
    assert_eq!(lease.fence(), 1, "the winner of a new key has fence 1");

    complete(&*store, &key, lease, b"winner", TTL).await;
    for found in claim_all(&store, &key, fp, CLAIMERS).await {
        assert_completed(&found, b"winner", "a concurrent claim after completion");
    }
}

/// 200 keys claimed, completed and replayed by 200 concurrent tasks: each key is acquired
/// with fence 1 and replays its own result, during and after the run.
pub async fn concurrent_distinct_keys_each_replay_their_own_value<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    const KEYS: usize = 200;
    let store = Arc::new(store);
    let start = Arc::new(Barrier::new(KEYS));
    let tasks: Vec<_> = (0..KEYS)
        .map(|i| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                let key = key(&format!("many-{i}"));
                let result = value_of(i);
                start.wait().await;
                let lease = expect_acquired(
                    claim(&*store, &key, None, LEASE).await,
                    &format!("the only claim of {key}"),
                );
                assert_eq!(lease.fence(), 1, "{key} is new: fence 1");
                complete(&*store, &key, &lease, &result, TTL).await;
                assert_completed(
                    &claim(&*store, &key, None, LEASE).await,
                    &result,
                    &format!("{key} right after its completion"),
                );
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a task claiming its own key panicked");
    }
    for i in 0..KEYS {
        let key = key(&format!("many-{i}"));
        assert_completed(
            &claim(&*store, &key, None, LEASE).await,
            &value_of(i),
            &format!("{key} after all tasks finished"),
        );
    }
}

/// A 1 MiB result holding every byte value (NUL included) round-trips byte for byte.
pub async fn large_result_round_trips<S: Store + 'static>(store: S, _clock: ManualClock) {
    let result: Vec<u8> = (0..1_usize << 20).map(|i| (i * 7 % 256) as u8).collect();
    let key = key("large");
    let lease = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    complete(&store, &key, &lease, &result, TTL).await;
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        &result,
        "the 1 MiB result",
    );
}

/// Unicode keys and scopes are stored as given and a 10 KiB key is stored as its hash; keys
/// that differ only in their last character stay distinct records.
pub async fn unicode_and_long_keys_stay_distinct<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    const SCOPE_UNICODE: &str = "订单::支付";
    let long: String = "ключ-🔑-".repeat(10 * 1024 / "ключ-🔑-".len() + 1);
    let keys = [
        RecordKey::new(SCOPE_UNICODE, "订单-№1-🚀").expect("a non-empty key is valid"),
        RecordKey::new(SCOPE_UNICODE, "订单-№1-🚁").expect("a non-empty key is valid"),
        RecordKey::new(SCOPE, "订单-№1-🚀").expect("a non-empty key is valid"),
        RecordKey::new(SCOPE, &format!("{long}a")).expect("a non-empty key is valid"),
        RecordKey::new(SCOPE, &format!("{long}b")).expect("a non-empty key is valid"),
    ];
    assert_eq!(
        keys[0].key(),
        "订单-№1-🚀",
        "a short unicode key is kept as given"
    );
    assert!(
        long.len() >= 10 * 1024,
        "the long key has {} bytes",
        long.len()
    );
    assert!(
        keys[3].key().starts_with(HASHED_PREFIX) && keys[4].key().starts_with(HASHED_PREFIX),
        "a 10 KiB key is stored as its hash"
    );

    for (i, key) in keys.iter().enumerate() {
        let lease = expect_acquired(
            claim(&store, key, None, LEASE).await,
            &format!("key {i}, new and distinct from the others"),
        );
        assert_eq!(lease.fence(), 1, "key {i} is new: fence 1");
        complete(&store, key, &lease, &value_of(i), TTL).await;
    }
    for (i, key) in keys.iter().enumerate() {
        assert_completed(
            &claim(&store, key, None, LEASE).await,
            &value_of(i),
            &format!("key {i} replays its own result"),
        );
    }
    let again = RecordKey::new(SCOPE, &format!("{long}b")).expect("a non-empty key is valid");
    assert_completed(
        &claim(&store, &again, None, LEASE).await,
        &value_of(4),
        "the 10 KiB key built again",
    );
}

/// A lease the store did not hand out (the holder's fence with another owner token, or the
/// holder's owner with another fence) gets [`Error::LeaseLost`] from complete, release and
/// extend, and the holder's record stays as it was.
pub async fn wrong_owner_lease_is_rejected<S: Store + 'static>(store: S, clock: ManualClock) {
    let key = key("forged");
    let held = expect_acquired(claim(&store, &key, None, LEASE).await, "a new key");
    clock.advance(Duration::from_secs(10));

    let forged = [
        Lease::new("someone-else".to_owned(), held.fence(), held.until_millis()),
        Lease::new(String::new(), held.fence(), held.until_millis()),
        Lease::new(
            held.owner().to_owned(),
            held.fence() + 1,
            held.until_millis(),
        ),
        Lease::new(held.owner().to_owned(), 0, held.until_millis()),
        Lease::new(held.owner().to_owned(), u64::MAX, held.until_millis()),
    ];
    for lease in &forged {
        let what = format!("owner {:?} fence {}", lease.owner(), lease.fence());
        assert_lease_lost(
            store.complete(&key, lease, b"forged", TTL).await,
            &key,
            lease.fence(),
            &format!("complete with a forged lease ({what})"),
        );
        assert_lease_lost(
            store.extend(&key, lease, Duration::from_secs(3600)).await,
            &key,
            lease.fence(),
            &format!("extend with a forged lease ({what})"),
        );
        assert_lease_lost(
            store.release(&key, lease).await,
            &key,
            lease.fence(),
            &format!("release with a forged lease ({what})"),
        );
    }
    assert_in_progress(
        &claim(&store, &key, None, LEASE).await,
        LEASE - Duration::from_secs(10),
        "the holder's lease, neither released nor extended by the forged leases",
    );
    complete(&store, &key, &held, b"held", TTL).await;
    assert_completed(
        &claim(&store, &key, None, LEASE).await,
        b"held",
        "the holder's result",
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SCOPE: &str = "idem::conformance";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
/// How far below the exact remaining lease a store's `retry_after` may be (rounding).
const RETRY_TOLERANCE: Duration = Duration::from_secs(1);

fn key(name: &str) -> RecordKey {
    RecordKey::new(SCOPE, name).expect("a non-empty key is valid")
}

fn fingerprint(payload: &str) -> Fingerprint {
    Fingerprint::of(payload).expect("a string always serializes")
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).expect("test durations fit in i64 milliseconds")
}

fn value_of(i: usize) -> Vec<u8> {
    format!("{{\"value\":{i}}}").into_bytes()
}

async fn claim<S: Store + ?Sized>(
    store: &S,
    key: &RecordKey,
    fingerprint: Option<&Fingerprint>,
    lease: Duration,
) -> Claim {
    match store.claim(key, fingerprint, lease).await {
        Ok(found) => found,
        Err(error) => panic!("claiming {key} failed: {error} ({error:?})"),
    }
}

async fn complete<S: Store + ?Sized>(
    store: &S,
    key: &RecordKey,
    lease: &Lease,
    result: &[u8],
    ttl: Duration,
) {
    if let Err(error) = store.complete(key, lease, result, ttl).await {
        panic!(
            "completing {key} with the live lease (fence {}) failed: {error} ({error:?})",
            lease.fence()
        );
    }
}

async fn purge<S: Store + ?Sized>(store: &S, limit: u32) -> u64 {
    match store.purge_expired(limit).await {
        Ok(deleted) => deleted,
        Err(error) => panic!("purge_expired({limit}) failed: {error} ({error:?})"),
    }
}

/// Claims `key` from `count` tasks released at the same moment and returns their answers.
async fn claim_all<S: Store + 'static>(
    store: &Arc<S>,
    key: &RecordKey,
    fingerprint: Fingerprint,
    count: usize,
) -> Vec<Claim> {
    let start = Arc::new(Barrier::new(count));
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let store = Arc::clone(store);
            let start = Arc::clone(&start);
            let key = key.clone();
            tokio::spawn(async move {
                start.wait().await;
                claim(&*store, &key, Some(&fingerprint), LEASE).await
            })
        })
        .collect();
    let mut claims = Vec::with_capacity(count);
    for task in tasks {
        claims.push(task.await.expect("a claiming task panicked"));
    }
    claims
}

#[track_caller]
fn expect_acquired(found: Claim, what: &str) -> Lease {
    match found {
        Claim::Acquired(lease) => lease,
        other => panic!("{what}: expected Acquired, got {}", describe(&other)),
    }
}

#[track_caller]
fn assert_completed(found: &Claim, expected: &[u8], what: &str) {
    match found {
        Claim::Completed(stored) if stored.as_slice() == expected => {}
        other => panic!(
            "{what}: expected Completed({}), got {}",
            bytes(expected),
            describe(other)
        ),
    }
}

#[track_caller]
fn assert_in_progress(found: &Claim, remaining: Duration, what: &str) {
    match found {
        Claim::InProgress { retry_after } => assert!(
            *retry_after > Duration::ZERO
                && *retry_after <= remaining
                && remaining - *retry_after < RETRY_TOLERANCE,
            "{what}: retry_after is {retry_after:?}, expected the {remaining:?} left of the lease"
        ),
        other => panic!(
            "{what}: expected InProgress {{ retry_after: {remaining:?} }}, got {}",
            describe(other)
        ),
    }
}

#[track_caller]
fn assert_mismatch(found: &Claim, what: &str) {
    if *found != Claim::Mismatch {
        panic!("{what}: expected Mismatch, got {}", describe(found));
    }
}

#[track_caller]
fn assert_lease_lost<T: std::fmt::Debug>(
    result: Result<T, Error>,
    expected_key: &RecordKey,
    expected_fence: u64,
    what: &str,
) {
    match result {
        Err(Error::LeaseLost { scope, key, fence })
            if scope == expected_key.scope()
                && key == expected_key.key()
                && fence == expected_fence => {}
        other => panic!(
            "{what}: expected Err(LeaseLost {{ key: {expected_key}, fence: {expected_fence} }}), \
             got {other:?}"
        ),
    }
}

/// A claim for a panic message, with long results cut short.
fn describe(found: &Claim) -> String {
    match found {
        Claim::Completed(stored) => format!("Completed({})", bytes(stored)),
        other => format!("{other:?}"),
    }
}

/// Bytes for a panic message: their length and at most their first 64 bytes.
fn bytes(data: &[u8]) -> String {
    let mut text = format!("{} bytes: b\"", data.len());
    for &byte in data.iter().take(64) {
        for c in std::ascii::escape_default(byte) {
            text.push(char::from(c));
        }
    }
    text.push('"');
    if data.len() > 64 {
        text.push('…');
    }
    text
}
