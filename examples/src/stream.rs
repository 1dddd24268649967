//! The event stream the points service consumes: a Redis Stream read through a consumer group,
//! or an in-process stream with the same semantics.
//!
//! A stream is an append-only log of entries, each with an id (`<ms>-<seq>`, rising) and an
//! event (the JSON of the event, in the entry's field `event`). A *consumer group* hands each
//! new entry to one of its consumers and remembers it in the group's *pending entries list*
//! until the consumer acknowledges it:
//!
//! | step | Redis | [`EventStream`] |
//! |---|---|---|
//! | create the group (and the stream) if missing | `XGROUP CREATE s g 0 MKSTREAM` | [`create_group`](EventStream::create_group) |
//! | publish an event | `XADD s * event <json>` | [`append`](EventStream::append) |
//! | read entries no consumer of the group has seen | `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s >` | [`read_group`](EventStream::read_group) |
//! | acknowledge one | `XACK s g id` | [`ack`](EventStream::ack) |
//! | take over entries pending too long on other (dead) consumers | `XAUTOCLAIM s g c min-idle start COUNT n` | [`autoclaim`](EventStream::autoclaim) |
//! | list the pending entries | `XPENDING s g - + n` | [`pending`](EventStream::pending) |
//!
//! That is *at-least-once* delivery: an entry whose consumer died before acknowledging it
//! stays pending, and another consumer claims it once it has been idle long enough — so it can
//! be handled twice, and a producer that resends adds the same event again under a new id. The
//! handler must be idempotent by the event's business key (see [`points`](crate::points)).
//!
//! Two implementations: [`RedisStream`] (the redis crate's streams API) and [`MemoryStream`]
//! (in-process, for the demo on a machine without Redis, and for tests).

mod memory;
mod redis;

use std::future::Future;
use std::time::Duration;

pub use self::memory::MemoryStream;
pub use self::redis::{MAX_BLOCK, RedisStream};

/// The cursor that starts an [`autoclaim`](EventStream::autoclaim) scan at the beginning of
/// the pending entries list.
pub const SCAN_START: &str = "0-0";

/// An entry handed to a consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's id in the stream, such as `1718000000000-0`. A producer that resends an
    /// event appends a new entry, with a new id.
    pub id: String,
    /// The entry's field `event`: the JSON of the event. `None` when the entry has no such
    /// field, or it is not UTF-8 (someone else wrote the entry).
    pub event: Option<String>,
    /// How many times the entry has been delivered to a consumer of the group, this delivery
    /// included (1 for the first).
    pub deliveries: u64,
}

/// The result of one [`autoclaim`](EventStream::autoclaim) call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The entries that now belong to the claiming consumer, with their delivery counts
    /// (raised by this claim).
    pub entries: Vec<Entry>,
    /// Where the next call should go on scanning, or `None` when the scan reached the end of
    /// the pending entries list.
    pub next: Option<String>,
}

/// An entry of a group's pending entries list: delivered, not acknowledged yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The entry's id.
    pub id: String,
    /// The consumer it was delivered to last.
    pub consumer: String,
    /// How long ago that was.
    pub idle: Duration,
    /// How many times it has been delivered.
    pub deliveries: u64,
}

/// What went wrong talking to a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Redis refused the command or could not be reached.
    #[error("redis stream: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// The group does not exist: create it with
    /// [`create_group`](EventStream::create_group) first.
    #[error("no consumer group `{group}` on the stream `{stream}`")]
    NoGroup {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
    },
    /// An entry id or scan cursor that is not of the form `<ms>` or `<ms>-<seq>`.
    #[error("`{0}` is not a stream entry id")]
    InvalidId(String),
    /// An event could not be encoded as JSON for the stream.
    #[error("the event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An event stream read through consumer groups, with Redis Streams' semantics (see the
/// [module](self)). One value is one stream; the group and the consumer are named on each
/// call, so several consumers can share it (or, for Redis, each have a connection of its own).
pub trait EventStream: Send + Sync {
    /// The stream's name (its Redis key).
    fn name(&self) -> &str;

    /// Creates `group` reading the stream from its first entry, and the stream if it is
    /// missing. A group that exists already is left as it is (Redis' `BUSYGROUP` is not an
    /// error).
    fn create_group(&self, group: &str) -> impl Future<Output = Result<(), StreamError>> + Send;

    /// Appends an entry whose field `event` is `event` (the event's JSON) and returns its id.
    fn append(&self, event: &str) -> impl Future<Output = Result<String, StreamError>> + Send;

    /// Hands up to `count` (at least 1) entries that no consumer of `group` has been given yet
    /// to `consumer`, which must acknowledge each; until then each is pending under
    /// `consumer`. Waits up to `block` for an entry when there is none (`Duration::ZERO`: do
    /// not wait) and returns an empty list if none came.
    fn read_group(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> impl Future<Output = Result<Vec<Entry>, StreamError>> + Send;

    /// Acknowledges the entry `id` for `group`: it leaves the pending entries list, whichever
    /// consumer held it. Returns whether it was pending (`false` for a group that does not
    /// exist, as Redis answers).
    fn ack(&self, group: &str, id: &str) -> impl Future<Output = Result<bool, StreamError>> + Send;

    /// Scans `group`'s pending entries list from `start` ([`SCAN_START`] at first, then the
    /// returned [`Claimed::next`]) and gives up to `count` (at least 1) entries that have been
    /// idle for `min_idle` or longer to `consumer`: their owner becomes `consumer`, their idle
    /// time restarts and their delivery count rises by one.
    fn autoclaim(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> impl Future<Output = Result<Claimed, StreamError>> + Send;

    /// The first `count` entries of `group`'s pending entries list, oldest first.
    fn pending(
        &self,
        group: &str,
        count: usize,
    ) -> impl Future<Output = Result<Vec<Pending>, StreamError>> + Send;
}

impl<S: EventStream + ?Sized> EventStream for std::sync::Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn create_group(&self, group: &str) -> impl Future<Output = Result<(), StreamError>> + Send {
        (**self).create_group(group)
    }

    fn append(&self, event: &str) -> impl Future<Output = Result<String, StreamError>> + Send {
        (**self).append(event)
    }

    fn read_group(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> impl Future<Output = Result<Vec<Entry>, StreamError>> + Send {
        (**self).read_group(group, consumer, count, block)
    }

    fn ack(&self, group: &str, id: &str) -> impl Future<Output = Result<bool, StreamError>> + Send {
        (**self).ack(group, id)
    }

    fn autoclaim(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> impl Future<Output = Result<Claimed, StreamError>> + Send {
        (**self).autoclaim(group, consumer, min_idle, start, count)
    }

    fn pending(
        &self,
        group: &str,
        count: usize,
    ) -> impl Future<Output = Result<Vec<Pending>, StreamError>> + Send {
        (**self).pending(group, count)
    }
}

/// Milliseconds of `duration`, saturating, as Redis takes them.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
