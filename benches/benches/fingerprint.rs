//! The cost of `Fingerprint::of`, which the `#[idempotent]` handlers pay on every message
//! (unless `fingerprint = false`): on the benchmarks' message [`Paid`], and on a larger
//! payload with nested structs, a map and a list.
//!
//! Run with `cargo bench -p idem-benches --bench fingerprint`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use idem_benches::Paid;
use idem_runtime::Fingerprint;
use serde::Serialize;

/// A larger payload: an order with its lines and free-form attributes.
#[derive(Serialize)]
struct Order {
    order_no: String,
    customer: Customer,
    lines: Vec<Line>,
    attributes: HashMap<String, String>,
    note: Option<String>,
}

#[derive(Serialize)]
struct Customer {
    id: u64,
    name: String,
    email: String,
}

#[derive(Serialize)]
struct Line {
    sku: String,
    quantity: u32,
    unit_price: f64,
}

fn order() -> Order {
    Order {
        order_no: "A-1001".to_owned(),
        customer: Customer {
            id: 42,
            name: "Zoë Example".to_owned(),
            email: "zoe@example.com".to_owned(),
        },
        lines: (0..8)
            .map(|i| Line {
                sku: format!("SKU-{i:04}"),
                quantity: i + 1,
                unit_price: 9.99 + f64::from(i),
            })
            .collect(),
        attributes: (0..8)
            .map(|i| (format!("attr{i}"), format!("value {i}")))
            .collect(),
        note: None,
    }
}

fn fingerprint(c: &mut Criterion) {
    let paid = Paid::new("A-1001".to_owned());
    c.bench_function("fingerprint/paid", |b| {
        b.iter(|| Fingerprint::of(black_box(&paid)).expect("a message fingerprints"));
    });
    let order = order();
    c.bench_function("fingerprint/order", |b| {
        b.iter(|| Fingerprint::of(black_box(&order)).expect("an order fingerprints"));
    });
}

criterion_group!(benches, fingerprint);
criterion_main!(benches);
