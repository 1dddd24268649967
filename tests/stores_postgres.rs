//! Tests of the postgres store (being written).
