use idem_runtime::idempotent;

#[idempotent(key = "order_no", store = store)]
struct OrderPaid {
    order_no: String,
}

fn main() {}
