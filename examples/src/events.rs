//! The events the services exchange, as they travel on a stream: JSON in an entry's field
//! `event`.

use serde::{Deserialize, Serialize};

use crate::stream::{EventStream, StreamError};

/// The stream `OrderPaid` events are published to.
pub const ORDER_PAID_STREAM: &str = "orders.paid";

/// The longest order number, in bytes, an event may carry (it is the points ledger's key).
pub const MAX_ORDER_NO_BYTES: usize = 128;

/// An order was paid: the order service publishes it, the points service credits
/// `amount_cents / 100` points to the user for it.
///
/// The business key is `order_no`. The event carries no delivery metadata (no message id, no
/// timestamp), so that a producer's resend is the same event: idem fingerprints it to tell a
/// duplicate from an order number reused with another payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaid {
    /// The order's number: the business key.
    pub order_no: String,
    /// The user who paid.
    pub user_id: i64,
    /// What was paid, in cents.
    pub amount_cents: u64,
}

impl OrderPaid {
    /// The event for `order_no`, paid by `user_id`, of `amount_cents`.
    pub fn new(order_no: impl Into<String>, user_id: i64, amount_cents: u64) -> Self {
        Self {
            order_no: order_no.into(),
            user_id,
            amount_cents,
        }
    }

    /// The points the payment earns: one per whole 100 cents.
    pub fn points(&self) -> u64 {
        self.amount_cents / 100
    }

    /// The event as it is written to a stream.
    ///
    /// # Errors
    ///
    /// The serializer's error (not expected for this type).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// The event read back from a stream entry.
    ///
    /// # Errors
    ///
    /// When `json` is not an `OrderPaid`.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Appends the event to `stream` and returns the entry's id. Publishing it again appends
    /// another entry, with another id: the consumer tells the two apart by `order_no`.
    ///
    /// # Errors
    ///
    /// [`StreamError`] if the stream refuses it.
    pub async fn publish<S: EventStream>(&self, stream: &S) -> Result<String, StreamError> {
        stream.append(&self.to_json()?).await
    }
}
