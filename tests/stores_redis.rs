//! Tests of the redis store (being written).
