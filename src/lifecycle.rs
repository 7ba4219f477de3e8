//! The connection lifecycle: states, triggers and the transition table of
//! `docs/LIFECYCLE.md`, as one total function.
//!
//! Pure: no I/O, no clock, no storage. Everything that moves a connection asks
//! [`check`] first; `DescribeLifecycle` is generated from [`targets`]. The
//! other lifecycle rules are tables here too: how a create reaches its initial
//! state ([`creation`]), which states are probed in the background
//! ([`probed`]), what a discovery report does to a known connection
//! ([`on_report`]), and where a failed attempt or a probe result moves a
//! connection ([`after_failed_attempt`], [`after_probe`]).
//!
//! Smaller rules the engine and the monitor ask rather than restate: where
//! every connection begins ([`INITIAL`]), which state is a tombstone
//! ([`is_tombstone`]), which connections are watched ([`monitored`]), which
//! state is probed once and soon ([`probed_once`]), which states count failed
//! probes to a threshold ([`counts_failures`]), and when a probe result
//! depends on where a connection was disconnected from
//! ([`needs_disconnected_from`]).

use std::fmt;

/// Where a connection is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Discovered,
    Registered,
    Connected,
    Ignored,
    Maintenance,
    Disconnected,
    Deleted,
    NotFound,
}

/// Who asks for a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// An administrative request through the API.
    User,
    /// The server itself: a verification or probe result, or a discovery report.
    System,
}

impl State {
    /// Every state, in wire order.
    pub(crate) const ALL: [State; 8] = [
        State::Discovered,
        State::Registered,
        State::Connected,
        State::Ignored,
        State::Maintenance,
        State::Disconnected,
        State::Deleted,
        State::NotFound,
    ];

    /// The stable number used on the wire and in the database.
    pub(crate) fn number(self) -> i32 {
        match self {
            State::Discovered => 1,
            State::Registered => 2,
            State::Connected => 3,
            State::Ignored => 4,
            State::Maintenance => 5,
            State::Disconnected => 6,
            State::Deleted => 7,
            State::NotFound => 8,
        }
    }

    /// The state with the given wire number, if there is one.
    pub(crate) fn from_number(n: i32) -> Option<State> {
        State::ALL.into_iter().find(|s| s.number() == n)
    }

    /// The name used in messages and on the wire (without the enum prefix).
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Discovered => "DISCOVERED",
            State::Registered => "REGISTERED",
            State::Connected => "CONNECTED",
            State::Ignored => "IGNORED",
            State::Maintenance => "MAINTENANCE",
            State::Disconnected => "DISCONNECTED",
            State::Deleted => "DELETED",
            State::NotFound => "NOT_FOUND",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Trigger {
    pub(crate) fn number(self) -> i32 {
        match self {
            Trigger::User => 1,
            Trigger::System => 2,
        }
    }

    pub(crate) fn from_number(n: i32) -> Option<Trigger> {
        match n {
            1 => Some(Trigger::User),
            2 => Some(Trigger::System),
            _ => None,
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::User => "USER",
            Trigger::System => "SYSTEM",
        })
    }
}

/// An allowed move out of a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Edge {
    pub(crate) to: State,
    /// The target must be verified (reachable, credentials accepted) before committing.
    pub(crate) needs_verification: bool,
}

const fn edge(to: State) -> Edge {
    Edge {
        to,
        needs_verification: false,
    }
}

const fn verified(to: State) -> Edge {
    Edge {
        to,
        needs_verification: true,
    }
}

/// Whether a USER move to `to` needs verification. That depends on the target
/// alone, whatever the state moved from
/// (`user_verification_depends_only_on_the_target`), so a request can be
/// sent down the path without a check before its row is read.
pub(crate) fn verified_target(to: State) -> bool {
    State::ALL
        .into_iter()
        .any(|from| check(from, to, Trigger::User).is_ok_and(|e| e.needs_verification))
}

/// The moves `trigger` may make out of `from`: the lifecycle table, row by row.
pub(crate) fn targets(from: State, trigger: Trigger) -> &'static [Edge] {
    use State::*;
    match (from, trigger) {
        (Discovered, Trigger::User) => {
            &const { [verified(Registered), edge(Ignored), edge(Deleted)] }
        }
        (Discovered, Trigger::System) => {
            &const { [edge(Registered), edge(NotFound), edge(Disconnected)] }
        }
        (Registered, Trigger::User) => {
            &const {
                [
                    verified(Connected),
                    edge(Maintenance),
                    edge(Ignored),
                    edge(Deleted),
                ]
            }
        }
        (Registered, Trigger::System) => {
            &const { [edge(Connected), edge(NotFound), edge(Disconnected)] }
        }
        (Connected, Trigger::User) => {
            &const {
                [
                    edge(Disconnected),
                    edge(Maintenance),
                    edge(Ignored),
                    edge(Deleted),
                ]
            }
        }
        (Connected, Trigger::System) => &const { [edge(Disconnected)] },
        (Ignored, Trigger::User) => &const { [verified(Registered), edge(Deleted)] },
        (Ignored, Trigger::System) => &const { [] },
        (Maintenance, Trigger::User) => {
            &const {
                [
                    verified(Connected),
                    verified(Registered),
                    edge(Ignored),
                    edge(Deleted),
                ]
            }
        }
        (Maintenance, Trigger::System) => &const { [] },
        (Disconnected, Trigger::User) => &const { [verified(Connected), edge(Deleted)] },
        (Disconnected, Trigger::System) => &const { [edge(Connected), edge(Registered)] },
        (NotFound, Trigger::User) => &const { [verified(Registered), edge(Deleted)] },
        (NotFound, Trigger::System) => &const { [edge(Discovered)] },
        (Deleted, Trigger::User) => &const { [] },
        (Deleted, Trigger::System) => &const { [] },
    }
}

/// Where every connection begins: one created by hand or reported by a
/// discovery agent is recorded here first (its `Created` event comes from
/// and goes to it), and a NOT_FOUND one reported again returns here.
pub(crate) const INITIAL: State = State::Discovered;

/// Whether `state` is a tombstone: what remains of a deleted connection. It
/// never changes again (no edge leaves it), keeps no credential or collected
/// data, and does not count as live (its identity is free for a new one).
pub(crate) fn is_tombstone(state: State) -> bool {
    use State::*;
    match state {
        Deleted => true,
        Discovered | Registered | Connected | Ignored | Maintenance | Disconnected | NotFound => {
            false
        }
    }
}

/// How a connection created by hand reaches the state its creator asked for:
/// it is recorded DISCOVERED, then moved along these USER edges of
/// [`targets`], in order, one event each. Whether it is verified first is the
/// table's answer for each step (a kind may only narrow which steps it allows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Creation {
    /// `(from, to)` for each USER move; empty: it stays DISCOVERED.
    pub(crate) steps: &'static [(State, State)],
}

/// How a create may reach `initial`; `None`: a create may not ask for it.
pub(crate) fn creation(initial: State) -> Option<Creation> {
    use State::*;
    let steps: &'static [(State, State)] = match initial {
        Discovered => &[],
        Registered => &[(Discovered, Registered)],
        Connected => &[(Discovered, Registered), (Registered, Connected)],
        Ignored => &[(Discovered, Ignored)],
        Maintenance | Disconnected | Deleted | NotFound => return None,
    };
    Some(Creation { steps })
}

/// Whether the server probes a managed connection in the background while it
/// is in `state`, which `entered_by` moved it into: DISCOVERED, REGISTERED and
/// CONNECTED always, DISCONNECTED only when the server put it there.
pub(crate) fn probed(state: State, entered_by: Trigger) -> bool {
    use State::*;
    match (state, entered_by) {
        (Discovered | Registered | Connected, Trigger::User | Trigger::System) => true,
        (Disconnected, Trigger::System) => true,
        (Disconnected, Trigger::User) => false,
        (Ignored | Maintenance | Deleted | NotFound, Trigger::User | Trigger::System) => false,
    }
}

/// Whether the server watches a connection: `managed` (it may move it on its
/// own), and in a state [`probed`] answers yes for.
pub(crate) fn monitored(managed: bool, state: State, entered_by: Trigger) -> bool {
    managed && probed(state, entered_by)
}

/// Whether a connection in `state` is probed once, as soon as it can be,
/// rather than on every interval: any finding moves it on at once (see
/// [`after_probe`]), so it is first in line, and the monitor starts such
/// probes at a bounded rate (one discovery report may bring thousands).
pub(crate) fn probed_once(state: State) -> bool {
    use State::*;
    match state {
        Discovered => true,
        Registered | Connected | Ignored | Maintenance | Disconnected | Deleted | NotFound => false,
    }
}

/// Whether failed probes in `state` move a connection only once enough of
/// them come in a row (the configured threshold): the reason of such a move
/// says how many failed. Elsewhere a failure moves it, or not, at once.
pub(crate) fn counts_failures(state: State) -> bool {
    use State::*;
    match state {
        Registered | Connected => true,
        Discovered | Ignored | Maintenance | Disconnected | Deleted | NotFound => false,
    }
}

/// Whether [`after_probe`] needs [`Probed::disconnected_from`] for `finding`
/// in `state`: only a DISCONNECTED connection that passes its check, which
/// goes back where it was. Elsewhere the caller need not look it up.
pub(crate) fn needs_disconnected_from(state: State, finding: Finding) -> bool {
    use Finding::*;
    use State::*;
    match (state, finding) {
        (Disconnected, Reachable) => true,
        (Disconnected, Unreachable | CredentialsRejected) => false,
        (
            Discovered | Registered | Connected | Ignored | Maintenance | Deleted | NotFound,
            Reachable | Unreachable | CredentialsRejected,
        ) => false,
    }
}

/// The states [`probed`] answers yes for under some trigger, in wire order:
/// where a storage query looks for connections to probe.
pub(crate) fn maybe_probed() -> impl Iterator<Item = State> {
    State::ALL
        .into_iter()
        .filter(|&s| probed(s, Trigger::User) || probed(s, Trigger::System))
}

/// What a discovery report does to a live connection that already has the
/// reported identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rereported {
    /// Left as it is, and the report says it is suppressed (IGNORED).
    Suppressed,
    /// Moved back to DISCOVERED ([`INITIAL`]) along the SYSTEM edge (NOT_FOUND).
    Rediscovered,
    /// Left as it is.
    Unchanged,
}

/// The answer to a discovery report of a connection already in `state`.
pub(crate) fn on_report(state: State) -> Rereported {
    use State::*;
    match state {
        Ignored => Rereported::Suppressed,
        NotFound => Rereported::Rediscovered,
        Discovered | Registered | Connected | Maintenance | Disconnected | Deleted => {
            Rereported::Unchanged
        }
    }
}

/// What a verification or a background probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finding {
    Reachable,
    Unreachable,
    CredentialsRejected,
}

/// Where a USER request that needed verification, and failed it, moves the
/// connection (trigger SYSTEM); `None`: it stays where it was. Only an
/// attempt from DISCOVERED or REGISTERED (to register or to connect) moves
/// it: unreachable to NOT_FOUND, credentials rejected to DISCONNECTED.
pub(crate) fn after_failed_attempt(from: State, finding: Finding) -> Option<State> {
    use State::*;
    match (from, finding) {
        (_, Finding::Reachable) => None,
        (Discovered | Registered, Finding::Unreachable) => Some(NotFound),
        (Discovered | Registered, Finding::CredentialsRejected) => Some(Disconnected),
        (
            Connected | Ignored | Maintenance | Disconnected | Deleted | NotFound,
            Finding::Unreachable | Finding::CredentialsRejected,
        ) => None,
    }
}

/// What the server knows when a background probe of a connection returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Probed {
    pub(crate) state: State,
    pub(crate) finding: Finding,
    /// Consecutive failures in this state reached the configured threshold.
    pub(crate) threshold_reached: bool,
    /// The connection's kind goes on from REGISTERED to CONNECTED by itself.
    pub(crate) auto_connects: bool,
    /// For a DISCONNECTED connection: the state the server disconnected it
    /// from, when that is known.
    pub(crate) disconnected_from: Option<State>,
}

/// The SYSTEM moves a background probe result calls for, in order (one event
/// each); empty: none. The "Automatic transitions" rules of the contract.
pub(crate) fn after_probe(p: Probed) -> &'static [State] {
    use Finding::*;
    use State::*;
    let auto = p.auto_connects;
    let reached = p.threshold_reached;
    match (p.state, p.finding) {
        // Verified once, no threshold.
        (Discovered, Reachable) if auto => &[Registered, Connected],
        (Discovered, Reachable) => &[Registered],
        (Discovered, Unreachable) => &[NotFound],
        (Discovered, CredentialsRejected) => &[Disconnected],
        (Registered, Reachable) if auto => &[Connected],
        (Registered, Reachable) => &[],
        (Registered, Unreachable) if reached => &[NotFound],
        (Registered, CredentialsRejected) if reached => &[Disconnected],
        (Registered, Unreachable | CredentialsRejected) => &[],
        (Connected, Reachable) => &[],
        (Connected, Unreachable | CredentialsRejected) if reached => &[Disconnected],
        (Connected, Unreachable | CredentialsRejected) => &[],
        // Back where it was: CONNECTED only if it was CONNECTED when the
        // server disconnected it. Anything else (DISCOVERED, REGISTERED, or
        // not known any more) goes to REGISTERED: a connection nobody took
        // into use never becomes CONNECTED unless its kind auto-connects.
        (Disconnected, Reachable) => match p.disconnected_from {
            Some(Connected) => &[Connected],
            _ if auto => &[Registered, Connected],
            _ => &[Registered],
        },
        (Disconnected, Unreachable | CredentialsRejected) => &[],
        // Never probed.
        (
            Ignored | Maintenance | Deleted | NotFound,
            Reachable | Unreachable | CredentialsRejected,
        ) => &[],
    }
}

/// A refused transition, with what the caller could have chosen instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub from: State,
    pub to: State,
    pub trigger: Trigger,
    pub allowed: Vec<State>,
}

/// Whether `trigger` may move a connection from `from` to `to`.
///
/// Asking for the state a connection is already in is not a transition: callers
/// treat it as a no-op before asking.
pub(crate) fn check(from: State, to: State, trigger: Trigger) -> Result<Edge, Refusal> {
    let edges = targets(from, trigger);
    edges
        .iter()
        .copied()
        .find(|e| e.to == to)
        .ok_or_else(|| Refusal {
            from,
            to,
            trigger,
            allowed: edges.iter().map(|e| e.to).collect(),
        })
}

/// No way out: nothing may move a connection out of this state.
pub(crate) fn is_terminal(state: State) -> bool {
    targets(state, Trigger::User).is_empty() && targets(state, Trigger::System).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    /// The table of `docs/LIFECYCLE.md`, transcribed independently of
    /// [`targets`]: (from, USER targets with `*` for verified, SYSTEM targets).
    /// One row: from, USER targets (with "needs verification"), SYSTEM targets.
    type Row = (State, &'static [(State, bool)], &'static [State]);

    const SPEC: &[Row] = &[
        (
            Discovered,
            &[(Registered, true), (Ignored, false), (Deleted, false)],
            &[Registered, NotFound, Disconnected],
        ),
        (
            Registered,
            &[
                (Connected, true),
                (Maintenance, false),
                (Ignored, false),
                (Deleted, false),
            ],
            &[Connected, NotFound, Disconnected],
        ),
        (
            Connected,
            &[
                (Disconnected, false),
                (Maintenance, false),
                (Ignored, false),
                (Deleted, false),
            ],
            &[Disconnected],
        ),
        (Ignored, &[(Registered, true), (Deleted, false)], &[]),
        (
            Maintenance,
            &[
                (Connected, true),
                (Registered, true),
                (Ignored, false),
                (Deleted, false),
            ],
            &[],
        ),
        (
            Disconnected,
            &[(Connected, true), (Deleted, false)],
            &[Connected, Registered],
        ),
        (Deleted, &[], &[]),
        (
            NotFound,
            &[(Registered, true), (Deleted, false)],
            &[Discovered],
        ),
    ];

    #[test]
    fn every_state_trigger_and_target_matches_the_spec() {
        assert_eq!(SPEC.len(), State::ALL.len());
        for &(from, user, system) in SPEC {
            for to in State::ALL {
                let user_row = user.iter().find(|(t, _)| *t == to);
                match (check(from, to, Trigger::User), user_row) {
                    (Ok(e), Some(&(_, v))) => assert_eq!(e.needs_verification, v, "{from}->{to}"),
                    (Err(r), None) => {
                        let want: Vec<State> = user.iter().map(|(t, _)| *t).collect();
                        assert_eq!(r.allowed, want, "{from}->{to} USER allowed list");
                    }
                    (got, want) => panic!("USER {from}->{to}: got {got:?}, spec {want:?}"),
                }
                let system_allowed = system.contains(&to);
                match check(from, to, Trigger::System) {
                    Ok(e) => {
                        assert!(system_allowed, "SYSTEM {from}->{to} is not in the spec");
                        assert!(
                            !e.needs_verification,
                            "SYSTEM edges are results, not requests"
                        );
                    }
                    Err(r) => {
                        assert!(!system_allowed, "SYSTEM {from}->{to} is in the spec");
                        assert_eq!(r.allowed, system.to_vec());
                    }
                }
            }
        }
    }

    #[test]
    fn user_verification_depends_only_on_the_target() {
        for to in State::ALL {
            let needs: Vec<bool> = State::ALL
                .into_iter()
                .filter_map(|from| check(from, to, Trigger::User).ok())
                .map(|e| e.needs_verification)
                .collect();
            assert!(needs.windows(2).all(|w| w[0] == w[1]), "{to}: {needs:?}");
            assert_eq!(verified_target(to), needs.contains(&true), "{to}");
        }
        assert!(verified_target(State::Connected) && !verified_target(State::Ignored));
    }

    /// Every SYSTEM move the policy tables make is an edge of the table.
    #[test]
    fn policy_moves_follow_the_table() {
        let findings = [
            Finding::Reachable,
            Finding::Unreachable,
            Finding::CredentialsRejected,
        ];
        for from in State::ALL {
            for finding in findings {
                if let Some(to) = after_failed_attempt(from, finding) {
                    check(from, to, Trigger::System).unwrap();
                }
                for (reached, auto) in [(false, false), (false, true), (true, false), (true, true)]
                {
                    for disconnected_from in [None, Some(Connected), Some(Registered)] {
                        let mut at = from;
                        for &to in after_probe(Probed {
                            state: from,
                            finding,
                            threshold_reached: reached,
                            auto_connects: auto,
                            disconnected_from,
                        }) {
                            check(at, to, Trigger::System).unwrap();
                            at = to;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn probes_follow_the_automatic_rules() {
        let p = |state, finding, reached, from| Probed {
            state,
            finding,
            threshold_reached: reached,
            auto_connects: false,
            disconnected_from: from,
        };
        use Finding::*;
        // REGISTERED waits for the threshold.
        assert!(after_probe(p(Registered, Unreachable, false, None)).is_empty());
        assert_eq!(
            after_probe(p(Registered, Unreachable, true, None)),
            [NotFound]
        );
        assert!(after_probe(p(Registered, CredentialsRejected, false, None)).is_empty());
        assert_eq!(
            after_probe(p(Registered, CredentialsRejected, true, None)),
            [Disconnected]
        );
        // DISCONNECTED goes back where it was.
        let back = |from| after_probe(p(Disconnected, Reachable, false, from));
        assert_eq!(back(Some(Connected)), [Connected]);
        assert_eq!(back(Some(Registered)), [Registered]);
        assert_eq!(back(Some(Discovered)), [Registered]);
        assert_eq!(back(None), [Registered]);
        // A failed attempt moves only from DISCOVERED or REGISTERED.
        assert_eq!(
            after_failed_attempt(Registered, CredentialsRejected),
            Some(Disconnected)
        );
        assert_eq!(
            after_failed_attempt(Registered, Unreachable),
            Some(NotFound)
        );
        assert_eq!(after_failed_attempt(Maintenance, Unreachable), None);
    }

    #[test]
    fn creation_follows_the_contract() {
        // (initial state, USER steps from DISCOVERED, verified before commit),
        // transcribed from the contract independently of [`creation`].
        let spec: [(State, Option<&[State]>, bool); 8] = [
            (Discovered, Some(&[]), false),
            (Registered, Some(&[Registered]), true),
            (Connected, Some(&[Registered, Connected]), true),
            (Ignored, Some(&[Ignored]), false),
            (Maintenance, None, false),
            (Disconnected, None, false),
            (Deleted, None, false),
            (NotFound, None, false),
        ];
        for (initial, steps, verified) in spec {
            let got = creation(initial);
            assert_eq!(got.is_some(), steps.is_some(), "{initial}");
            let (Some(got), Some(steps)) = (got, steps) else {
                continue;
            };
            let targets: Vec<State> = got.steps.iter().map(|&(_, to)| to).collect();
            assert_eq!(targets, steps, "{initial}");
            // A chain of USER edges of the table from DISCOVERED.
            let mut at = Discovered;
            let mut needs = false;
            for &(from, to) in got.steps {
                assert_eq!(from, at, "{initial}: {from}->{to}");
                needs |= check(from, to, Trigger::User).unwrap().needs_verification;
                at = to;
            }
            assert_eq!(at, initial);
            assert_eq!(needs, verified, "{initial}");
        }
    }

    #[test]
    fn probed_states_follow_the_contract() {
        // (state, probed when the server moved it there, when a user did).
        let spec = [
            (Discovered, true, true),
            (Registered, true, true),
            (Connected, true, true),
            (Ignored, false, false),
            (Maintenance, false, false),
            (Disconnected, true, false),
            (Deleted, false, false),
            (NotFound, false, false),
        ];
        assert_eq!(spec.len(), State::ALL.len());
        for (s, system, user) in spec {
            assert_eq!(probed(s, Trigger::System), system, "{s} SYSTEM");
            assert_eq!(probed(s, Trigger::User), user, "{s} USER");
        }
        assert_eq!(
            maybe_probed().collect::<Vec<_>>(),
            [Discovered, Registered, Connected, Disconnected]
        );
    }

    /// A probe result moves nothing in a state that is never probed.
    #[test]
    fn unprobed_states_have_no_probe_moves() {
        let findings = [
            Finding::Reachable,
            Finding::Unreachable,
            Finding::CredentialsRejected,
        ];
        for state in State::ALL
            .into_iter()
            .filter(|s| !maybe_probed().any(|p| p == *s))
        {
            for finding in findings {
                for (reached, auto) in [(false, false), (true, true)] {
                    let p = Probed {
                        state,
                        finding,
                        threshold_reached: reached,
                        auto_connects: auto,
                        disconnected_from: Some(Connected),
                    };
                    assert!(after_probe(p).is_empty(), "{state} {finding:?}");
                }
            }
        }
    }

    #[test]
    fn reports_of_known_connections_follow_the_contract() {
        use Rereported::*;
        let spec = [
            (Discovered, Unchanged),
            (Registered, Unchanged),
            (Connected, Unchanged),
            (Ignored, Suppressed),
            (Maintenance, Unchanged),
            (Disconnected, Unchanged),
            (Deleted, Unchanged),
            (NotFound, Rediscovered),
        ];
        assert_eq!(spec.len(), State::ALL.len());
        for (s, want) in spec {
            assert_eq!(on_report(s), want, "{s}");
            if want == Rediscovered {
                check(s, Discovered, Trigger::System).unwrap();
            }
        }
    }

    #[test]
    fn every_connection_begins_discovered() {
        assert_eq!(INITIAL, Discovered);
        for initial in State::ALL {
            if let Some(c) = creation(initial) {
                assert!(c.steps.first().is_none_or(|&(from, _)| from == INITIAL));
            }
        }
        check(NotFound, INITIAL, Trigger::System).unwrap();
    }

    #[test]
    fn only_deleted_is_a_tombstone() {
        let spec = [
            (Discovered, false),
            (Registered, false),
            (Connected, false),
            (Ignored, false),
            (Maintenance, false),
            (Disconnected, false),
            (Deleted, true),
            (NotFound, false),
        ];
        assert_eq!(spec.len(), State::ALL.len());
        for (s, want) in spec {
            assert_eq!(is_tombstone(s), want, "{s}");
            // A tombstone never changes.
            if want {
                assert!(is_terminal(s), "{s}");
            }
        }
    }

    #[test]
    fn monitored_connections_are_managed_and_probed() {
        for s in State::ALL {
            for t in [Trigger::User, Trigger::System] {
                assert!(!monitored(false, s, t), "{s} {t} unmanaged");
                assert_eq!(monitored(true, s, t), probed(s, t), "{s} {t}");
            }
        }
    }

    #[test]
    fn probe_cadence_and_thresholds_follow_the_contract() {
        // (state, probed once and soon, failures counted to the threshold).
        let spec = [
            (Discovered, true, false),
            (Registered, false, true),
            (Connected, false, true),
            (Ignored, false, false),
            (Maintenance, false, false),
            (Disconnected, false, false),
            (Deleted, false, false),
            (NotFound, false, false),
        ];
        assert_eq!(spec.len(), State::ALL.len());
        let findings = [
            Finding::Reachable,
            Finding::Unreachable,
            Finding::CredentialsRejected,
        ];
        let moves = |state, finding, reached| {
            after_probe(Probed {
                state,
                finding,
                threshold_reached: reached,
                auto_connects: false,
                disconnected_from: None,
            })
        };
        for (s, once, counted) in spec {
            assert_eq!(probed_once(s), once, "{s} once");
            assert_eq!(counts_failures(s), counted, "{s} counted");
            for finding in findings {
                // Probed once: whatever it finds moves it on.
                if once {
                    assert!(!moves(s, finding, false).is_empty(), "{s} {finding:?}");
                }
                // Only where failures are counted does the threshold matter.
                if !counted {
                    assert_eq!(moves(s, finding, false), moves(s, finding, true), "{s}");
                }
            }
            if counted {
                assert!(moves(s, Finding::Unreachable, false).is_empty(), "{s}");
                assert!(!moves(s, Finding::Unreachable, true).is_empty(), "{s}");
            }
        }
    }

    #[test]
    fn where_it_was_disconnected_from_matters_only_when_it_is_needed() {
        let findings = [
            Finding::Reachable,
            Finding::Unreachable,
            Finding::CredentialsRejected,
        ];
        for s in State::ALL {
            for finding in findings {
                let want = (s, finding) == (Disconnected, Finding::Reachable);
                assert_eq!(needs_disconnected_from(s, finding), want, "{s} {finding:?}");
                for (reached, auto) in [(false, false), (false, true), (true, false), (true, true)]
                {
                    let moves: Vec<&[State]> = [None, Some(Connected), Some(Registered)]
                        .into_iter()
                        .map(|disconnected_from| {
                            after_probe(Probed {
                                state: s,
                                finding,
                                threshold_reached: reached,
                                auto_connects: auto,
                                disconnected_from,
                            })
                        })
                        .collect();
                    if !want {
                        assert!(moves.windows(2).all(|w| w[0] == w[1]), "{s} {finding:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn only_deleted_is_terminal() {
        for s in State::ALL {
            assert_eq!(is_terminal(s), s == Deleted, "{s}");
        }
    }

    #[test]
    fn wire_numbers_round_trip() {
        for s in State::ALL {
            assert_eq!(State::from_number(s.number()), Some(s));
        }
        assert_eq!(State::from_number(0), None);
        assert_eq!(State::from_number(9), None);
        assert_eq!(Trigger::from_number(0), None);
    }
}
