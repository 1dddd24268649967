//! [`RedisStream`]: a Redis Stream, over the redis crate's streams API.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimOptions, StreamId, StreamPendingCountReply, StreamReadOptions,
};
use redis::{AsyncTypedCommands, ErrorKind, RedisError};

use super::{Claimed, Entry, EventStream, Pending, StreamError, millis};

/// The longest `BLOCK` of a [`read_group`](EventStream::read_group) on a stream built with
/// [`RedisStream::connect`]; longer waits are cut to this. Its connection waits this plus five
/// seconds for a reply.
pub const MAX_BLOCK: Duration = Duration::from_secs(10);

/// The longest `BLOCK` on a connection of the caller's ([`RedisStream::new`]), unless
/// [`RedisStream::with_max_block`] says more: half of the redis crate's default response
/// timeout (500 ms), which would otherwise cut a blocking read short.
const DEFAULT_MAX_BLOCK: Duration = Duration::from_millis(250);

/// The field of an entry that holds the event's JSON.
const EVENT_FIELD: &str = "event";

/// A Redis Stream (see the [module](super)), over a [`ConnectionManager`] or a multiplexed
/// connection.
///
/// A blocking [`read_group`](EventStream::read_group) holds its connection until it returns:
/// commands sent on that connection meanwhile (another consumer's acknowledgements, say) wait
/// behind it. So give each consumer a stream of its own — [`connect`](Self::connect) opens a
/// new connection each time; clones share theirs.
///
/// The redis crate gives up on a reply after a *response timeout* (500 ms by default in redis
/// 1.x). A blocking read that outlives it fails on the client, while Redis may still hand
/// entries to the consumer: they stay pending until someone claims them. So reads block at
/// most [`MAX_BLOCK`] on streams from [`connect`](Self::connect), whose connection waits
/// longer than that, and at most 250 ms on a connection of yours unless you raise its response
/// timeout and say so with [`with_max_block`](Self::with_max_block).
#[derive(Clone)]
pub struct RedisStream<C = ConnectionManager> {
    connection: C,
    key: String,
    max_block: Duration,
}

impl RedisStream<ConnectionManager> {
    /// Opens a connection of its own (a [`ConnectionManager`], which reconnects) to the Redis
    /// at `url`, such as `redis://127.0.0.1:6379/`, for the stream at key `stream`.
    ///
    /// # Errors
    ///
    /// [`StreamError::Redis`] if the URL is malformed or Redis cannot be reached.
    pub async fn connect(url: &str, stream: &str) -> Result<Self, StreamError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(MAX_BLOCK + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let connection = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            connection,
            key: stream.to_owned(),
            max_block: MAX_BLOCK,
        })
    }
}

impl<C> RedisStream<C>
where
    C: ConnectionLike + Clone + Send + Sync,
{
    /// The stream at key `stream`, on `connection` (a [`ConnectionManager`] or a
    /// `MultiplexedConnection`). Reads block at most 250 ms: see
    /// [`with_max_block`](Self::with_max_block).
    pub fn new(connection: C, stream: &str) -> Self {
        Self {
            connection,
            key: stream.to_owned(),
            max_block: DEFAULT_MAX_BLOCK,
        }
    }

    /// Lets reads block up to `max_block`: keep it below the connection's response timeout.
    pub fn with_max_block(mut self, max_block: Duration) -> Self {
        self.max_block = max_block;
        self
    }

    /// Removes the stream's key, with its entries and groups (`DEL`).
    ///
    /// # Errors
    ///
    /// [`StreamError::Redis`] if Redis fails.
    pub async fn delete(&self) -> Result<(), StreamError> {
        self.connection.clone().del(&self.key).await?;
        Ok(())
    }

    /// The delivery counts of `ids`, if they are still pending under `consumer` (one
    /// `XPENDING s g id id 1 consumer` per id, in one round trip).
    async fn deliveries(
        &self,
        group: &str,
        consumer: &str,
        ids: &[&str],
    ) -> Result<HashMap<String, u64>, StreamError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.xpending_consumer_count(&self.key, group, *id, *id, 1, consumer);
        }
        let replies: Vec<StreamPendingCountReply> =
            pipe.query_async(&mut self.connection.clone()).await?;
        Ok(replies
            .into_iter()
            .flat_map(|reply| reply.ids)
            .filter(|pending| pending.consumer == consumer)
            .map(|pending| (pending.id, to_u64(pending.times_delivered)))
            .collect())
    }
}

impl<C> std::fmt::Debug for RedisStream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStream")
            .field("key", &self.key)
            .field("max_block", &self.max_block)
            .finish_non_exhaustive()
    }
}

/// The `event` field of an entry, if it is text.
fn event_of(entry: &StreamId) -> Option<String> {
    entry.get::<String>(EVENT_FIELD)
}

/// A count from the redis crate, which reports them as `usize`.
fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `NOGROUP` as [`StreamError::NoGroup`], anything else as it is.
fn no_group(error: RedisError, stream: &str, group: &str) -> StreamError {
    if error.code() == Some("NOGROUP") {
        StreamError::NoGroup {
            stream: stream.to_owned(),
            group: group.to_owned(),
        }
    } else {
        StreamError::Redis(error)
    }
}

impl<C> EventStream for RedisStream<C>
where
    C: ConnectionLike + Clone + Send + Sync,
{
    fn name(&self) -> &str {
        &self.key
    }

    async fn create_group(&self, group: &str) -> Result<(), StreamError> {
        let created = self
            .connection
            .clone()
            .xgroup_create_mkstream(&self.key, group, "0")
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    async fn append(&self, event: &str) -> Result<String, StreamError> {
        let id = self
            .connection
            .clone()
            .xadd(&self.key, "*", &[(EVENT_FIELD, event)])
            .await?;
        // `XADD` answers nil only with NOMKSTREAM on a missing stream, which is not sent here.
        id.ok_or_else(|| {
            StreamError::Redis(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "XADD returned no id",
            )))
        })
    }

    async fn read_group(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError> {
        let mut options = StreamReadOptions::default()
            .group(group, consumer)
            .count(count.max(1));
        let block = block.min(self.max_block);
        if !block.is_zero() {
            options = options.block(usize::try_from(millis(block)).unwrap_or(usize::MAX));
        }
        let reply = self
            .connection
            .clone()
            .xread_options(&[&self.key], &[">"], &options)
            .await
            .map_err(|error| no_group(error, &self.key, group))?;
        // No reply: the block ran out without an entry.
        let Some(reply) = reply else {
            return Ok(Vec::new());
        };
        Ok(reply
            .keys
            .into_iter()
            .filter(|key| key.key == self.key)
            .flat_map(|key| key.ids)
            .map(|entry| Entry {
                event: event_of(&entry),
                id: entry.id,
                deliveries: 1,
            })
            .collect())
    }

    async fn ack(&self, group: &str, id: &str) -> Result<bool, StreamError> {
        let acked = self
            .connection
            .clone()
            .xack(&self.key, group, &[id])
            .await?;
        Ok(acked > 0)
    }

    async fn autoclaim(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<Claimed, StreamError> {
        let reply = self
            .connection
            .clone()
            .xautoclaim_options(
                &self.key,
                group,
                consumer,
                millis(min_idle),
                start,
                StreamAutoClaimOptions::default().count(count.max(1)),
            )
            .await
            .map_err(|error| no_group(error, &self.key, group))?;
        if !reply.deleted_ids.is_empty() {
            // Entries deleted from the stream while pending: Redis dropped them from the list.
            tracing::warn!(
                stream = %self.key,
                ids = ?reply.deleted_ids,
                "pending entries were deleted from the stream before being handled"
            );
        }
        let next = (reply.next_stream_id != "0-0").then_some(reply.next_stream_id);
        if reply.claimed.is_empty() {
            return Ok(Claimed {
                entries: Vec::new(),
                next,
            });
        }
        // XAUTOCLAIM does not say how often an entry was delivered; XPENDING does.
        let ids: Vec<&str> = reply
            .claimed
            .iter()
            .map(|entry| entry.id.as_str())
            .collect();
        let deliveries = self.deliveries(group, consumer, &ids).await?;
        let entries = reply
            .claimed
            .iter()
            .filter_map(|entry| {
                // Not pending under `consumer` any more: acknowledged or claimed again since,
                // by someone else, whose entry it is now.
                let deliveries = *deliveries.get(&entry.id)?;
                Some(Entry {
                    id: entry.id.clone(),
                    event: event_of(entry),
                    deliveries,
                })
            })
            .collect();
        Ok(Claimed { entries, next })
    }

    async fn pending(&self, group: &str, count: usize) -> Result<Vec<Pending>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let reply = self
            .connection
            .clone()
            .xpending_count(&self.key, group, "-", "+", count)
            .await
            .map_err(|error| no_group(error, &self.key, group))?;
        Ok(reply
            .ids
            .into_iter()
            .map(|pending| Pending {
                id: pending.id,
                consumer: pending.consumer,
                // The extended XPENDING reports the time since the last delivery, which the
                // crate calls `last_delivered_ms`.
                idle: Duration::from_millis(to_u64(pending.last_delivered_ms)),
                deliveries: to_u64(pending.times_delivered),
            })
            .collect())
    }
}
