//! [`MemoryStream`]: a stream and its consumer groups in this process.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Claimed, Entry, EventStream, Pending, StreamError};

/// A stream and its consumer groups in this process, with the semantics of a Redis Stream
/// (see the [module](super)): entries with rising ids, groups that hand each new entry to one
/// consumer, a pending entries list per group that records each delivered entry's owner,
/// delivery time and delivery count until it is acknowledged, and autoclaim of entries idle
/// for long enough.
///
/// Clones share the stream, so consumers on several tasks read one stream. It lives as long
/// as its clones and is lost with the process: use it where Redis is not at hand (the demo,
/// tests), not to carry events between processes. Idle times are measured on tokio's clock.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_examples::stream::StreamError> {
/// use std::time::Duration;
/// use idem_examples::stream::{EventStream, MemoryStream, SCAN_START};
///
/// let stream = MemoryStream::new("orders.paid");
/// stream.create_group("points").await?;
/// let id = stream.append(r#"{"order_no":"A-1"}"#).await?;
///
/// let read = stream.read_group("points", "worker-1", 10, Duration::ZERO).await?;
/// assert_eq!(read[0].id, id);
/// // worker-1 dies before acknowledging: worker-2 takes the entry over.
/// let claimed = stream.autoclaim("points", "worker-2", Duration::ZERO, SCAN_START, 10).await?;
/// assert_eq!(claimed.entries[0].deliveries, 2);
/// assert!(stream.ack("points", &id).await?);
/// assert!(stream.pending("points", 10).await?.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStream {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    state: Mutex<State>,
    /// Woken on every append, for blocked readers.
    appended: Notify,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<Id, String>,
    last: Id,
    groups: HashMap<String, Group>,
}

struct Group {
    /// The last entry handed out by `read_group`.
    last_delivered: Id,
    pending: BTreeMap<Id, Delivery>,
}

struct Delivery {
    consumer: String,
    at: Instant,
    count: u64,
}

/// An entry id: milliseconds and a sequence number within them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Id {
    ms: u64,
    seq: u64,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Id {
    type Err = StreamError;

    /// `<ms>-<seq>`, or `<ms>` for `<ms>-0`, as Redis reads a start id.
    fn from_str(text: &str) -> Result<Self, StreamError> {
        let invalid = || StreamError::InvalidId(text.to_owned());
        let (ms, seq) = match text.split_once('-') {
            Some((ms, seq)) => (ms, seq.parse().map_err(|_| invalid())?),
            None => (text, 0),
        };
        Ok(Self {
            ms: ms.parse().map_err(|_| invalid())?,
            seq,
        })
    }
}

impl MemoryStream {
    /// An empty stream called `name`, without groups.
    pub fn new(name: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                state: Mutex::new(State::default()),
                appended: Notify::new(),
            }),
        }
    }

    /// How many entries the stream holds (acknowledged or not: like a Redis Stream, it keeps
    /// them).
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// Whether the stream holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock still holds a whole state.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn no_group(&self, group: &str) -> StreamError {
        StreamError::NoGroup {
            stream: self.inner.name.clone(),
            group: group.to_owned(),
        }
    }

    /// Hands up to `count` new entries of `group` to `consumer`, if there are any.
    fn take_new(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Entry>, StreamError> {
        let mut state = self.state();
        let State {
            entries, groups, ..
        } = &mut *state;
        let group = groups.get_mut(group).ok_or_else(|| self.no_group(group))?;
        let now = Instant::now();
        let after = (Bound::Excluded(group.last_delivered), Bound::Unbounded);
        let new: Vec<(Id, String)> = entries
            .range(after)
            .take(count.max(1))
            .map(|(id, event)| (*id, event.clone()))
            .collect();
        if let Some((last, _)) = new.last() {
            group.last_delivered = *last;
        }
        let mut read = Vec::with_capacity(new.len());
        for (id, event) in new {
            group.pending.insert(
                id,
                Delivery {
                    consumer: consumer.to_owned(),
                    at: now,
                    count: 1,
                },
            );
            read.push(Entry {
                id: id.to_string(),
                event: Some(event),
                deliveries: 1,
            });
        }
        Ok(read)
    }
}

impl fmt::Debug for MemoryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryStream")
            .field("name", &self.inner.name)
            .field("entries", &state.entries.len())
            .field("groups", &state.groups.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl EventStream for MemoryStream {
    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn create_group(&self, group: &str) -> Result<(), StreamError> {
        self.state()
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| Group {
                last_delivered: Id::default(),
                pending: BTreeMap::new(),
            });
        Ok(())
    }

    async fn append(&self, event: &str) -> Result<String, StreamError> {
        let id = {
            let mut state = self.state();
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                });
            // Rising ids even if the wall clock steps back, as in Redis.
            let id = if ms > state.last.ms {
                Id { ms, seq: 0 }
            } else {
                Id {
                    ms: state.last.ms,
                    seq: state.last.seq + 1,
                }
            };
            state.last = id;
            state.entries.insert(id, event.to_owned());
            id
        };
        self.inner.appended.notify_waiters();
        Ok(id.to_string())
    }

    async fn read_group(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError> {
        let deadline = Instant::now() + block;
        loop {
            // Registered before looking, so that an append in between wakes it.
            let appended = self.inner.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let read = self.take_new(group, consumer, count)?;
            if !read.is_empty() || Instant::now() >= deadline {
                return Ok(read);
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(&self, group: &str, id: &str) -> Result<bool, StreamError> {
        let id: Id = id.parse()?;
        // Like XACK, a missing group acknowledges nothing rather than failing.
        Ok(self
            .state()
            .groups
            .get_mut(group)
            .is_some_and(|group| group.pending.remove(&id).is_some()))
    }

    async fn autoclaim(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<Claimed, StreamError> {
        let start: Id = start.parse()?;
        let mut state = self.state();
        let State {
            entries, groups, ..
        } = &mut *state;
        let group = groups.get_mut(group).ok_or_else(|| self.no_group(group))?;
        let now = Instant::now();
        let mut claimed = Claimed::default();
        let mut scan = group.pending.range_mut(start..);
        for (id, delivery) in scan.by_ref() {
            if now.saturating_duration_since(delivery.at) < min_idle {
                continue;
            }
            delivery.consumer = consumer.to_owned();
            delivery.at = now;
            delivery.count += 1;
            claimed.entries.push(Entry {
                id: id.to_string(),
                event: entries.get(id).cloned(),
                deliveries: delivery.count,
            });
            if claimed.entries.len() >= count.max(1) {
                break;
            }
        }
        claimed.next = scan.next().map(|(id, _)| id.to_string());
        Ok(claimed)
    }

    async fn pending(&self, group: &str, count: usize) -> Result<Vec<Pending>, StreamError> {
        let state = self.state();
        let group = state
            .groups
            .get(group)
            .ok_or_else(|| self.no_group(group))?;
        let now = Instant::now();
        Ok(group
            .pending
            .iter()
            .take(count)
            .map(|(id, delivery)| Pending {
                id: id.to_string(),
                consumer: delivery.consumer.clone(),
                idle: now.saturating_duration_since(delivery.at),
                deliveries: delivery.count,
            })
            .collect())
    }
}
