//! The switch rules, written once: what a cut-over, a rollback or a weight asks of a service's
//! switch state, and what its previous colour becomes. The switchboard applies them to the
//! maps ([`super::Switchboard`]); the fleet's planner applies them to the desired state in
//! etcd (`crate::fleet::plan`). Neither decides anything of its own about colours.

use switcher_common::{BP_ALL, user::Colour};

use crate::protocol::percent;

/// A service's switch state: what the data path's `STATE` holds of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchState {
    pub active: Colour,
    /// Share of new flows sent to the other colour, in 0.01 %.
    pub canary_bp: u32,
    /// The colour a rollback goes back to.
    pub previous: Option<Colour>,
}

impl SwitchState {
    /// The state once `active` takes the new flows, `canary_bp` of them going to the other
    /// colour: the colour that was active becomes the previous one when it changes, and the
    /// previous colour stays otherwise.
    #[must_use]
    pub fn then(self, active: Colour, canary_bp: u32) -> SwitchState {
        let previous = if active == self.active { self.previous } else { Some(self.active) };
        SwitchState { active, canary_bp, previous }
    }
}

/// What an operator asks of a service's switch state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Make this colour active (default: the idle one), with no canary.
    Cutover(Option<Colour>),
    /// Go back to the previous colour; with none, end the canary (every new flow back on the
    /// active colour).
    Rollback,
    /// Send this share (basis points) of new flows to a colour, the rest to the other one.
    Weight(Colour, u32),
}

/// What the rules decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The service is there already: nothing to write.
    Unchanged,
    /// Make `to` active with no canary share: a cut-over, or a rollback (`rollback`), whose
    /// old colour drains.
    Switch { to: Colour, rollback: bool },
    /// Keep the active colour; send this share of new flows to the other one.
    Canary(u32),
}

/// Why the rules refuse a request, whatever the colours' health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No colour to roll back to: the service has been `active` all along.
    #[error("nothing to roll back: it has been {active} all along")]
    NothingToRollBack { active: Colour },
    /// A share above 100 %.
    #[error("{} is more than 100%", percent(*.0))]
    MoreThanAll(u32),
}

/// Applies the rules: a cut-over to the active colour without a canary changes nothing; a
/// rollback needs a previous colour other than the active one; a share is the canary of the
/// colour that is not active, and 100 % of it is a cut-over to it.
///
/// # Errors
/// [`Refused`]: what the rules do not allow.
pub fn decide(now: SwitchState, ask: Ask) -> Result<Decision, Refused> {
    match ask {
        Ask::Cutover(to) => {
            let to = to.unwrap_or(now.active.other());
            if to == now.active && now.canary_bp == 0 {
                return Ok(Decision::Unchanged);
            }
            Ok(Decision::Switch { to, rollback: false })
        }
        Ask::Rollback => match now.previous.filter(|p| *p != now.active) {
            Some(to) => Ok(Decision::Switch { to, rollback: true }),
            // Never switched, but a canary runs: rolling back ends it.
            None if now.canary_bp > 0 => Ok(Decision::Switch { to: now.active, rollback: true }),
            None => Err(Refused::NothingToRollBack { active: now.active }),
        },
        Ask::Weight(colour, bp) => {
            if bp > BP_ALL {
                return Err(Refused::MoreThanAll(bp));
            }
            let canary = if colour == now.active { BP_ALL - bp } else { bp };
            if canary == BP_ALL {
                return Ok(Decision::Switch { to: now.active.other(), rollback: false });
            }
            Ok(Decision::Canary(canary))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLUE: SwitchState = SwitchState { active: Colour::Blue, canary_bp: 0, previous: None };

    #[test]
    fn the_rules_of_a_switch() {
        use Colour::{Blue, Green};
        let switch = |to| Ok(Decision::Switch { to, rollback: false });
        assert_eq!(decide(BLUE, Ask::Cutover(None)), switch(Green), "the idle colour by default");
        assert_eq!(decide(BLUE, Ask::Cutover(Some(Blue))), Ok(Decision::Unchanged));
        let canary = SwitchState { canary_bp: 500, ..BLUE };
        assert_eq!(decide(canary, Ask::Cutover(Some(Blue))), switch(Blue), "ends the canary");
        assert_eq!(decide(BLUE, Ask::Rollback), Err(Refused::NothingToRollBack { active: Blue }));
        assert_eq!(
            decide(canary, Ask::Rollback),
            Ok(Decision::Switch { to: Blue, rollback: true }),
            "never switched, a canary running: a rollback ends the canary"
        );
        let green = BLUE.then(Green, 0);
        assert_eq!(green, SwitchState { active: Green, canary_bp: 0, previous: Some(Blue) });
        assert_eq!(decide(green, Ask::Rollback), Ok(Decision::Switch { to: Blue, rollback: true }));
        assert_eq!(green.then(Green, 250).previous, Some(Blue), "a canary keeps the previous colour");
        assert_eq!(decide(BLUE, Ask::Weight(Green, 500)), Ok(Decision::Canary(500)));
        assert_eq!(decide(BLUE, Ask::Weight(Blue, 9_000)), Ok(Decision::Canary(1_000)));
        assert_eq!(decide(BLUE, Ask::Weight(Green, 10_000)), switch(Green), "100 % is a cut-over");
        assert_eq!(decide(BLUE, Ask::Weight(Blue, 0)), switch(Green));
        assert_eq!(decide(BLUE, Ask::Weight(Green, 10_001)), Err(Refused::MoreThanAll(10_001)));
        assert_eq!(Refused::MoreThanAll(10_001).to_string(), "100.01% is more than 100%");
    }
}
