//! Tests of the mysql store (being written).
