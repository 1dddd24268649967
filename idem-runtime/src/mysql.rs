//! The mysql store (being written).
