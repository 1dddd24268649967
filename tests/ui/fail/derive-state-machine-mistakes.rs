// `#[derive(StateMachine)]` names each mistake: a transition to a state that does not exist, a
// state with fields, an unknown storage.

use idem_runtime::StateMachine;

#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
#[state(storage = "json")]
enum OrderStatus {
    #[state(to(Payed))]
    Created,
    Paid(u32),
}

fn main() {}
