//! Engine tests that drive it directly, below the gRPC surface.

use super::create::creatable_states;

#[test]
fn the_create_refusal_names_the_states_a_create_may_ask_for() {
    assert_eq!(
        creatable_states(),
        "DISCOVERED, REGISTERED, CONNECTED or IGNORED"
    );
}
