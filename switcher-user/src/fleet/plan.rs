//! The fleet's planner: the next desired state of a service for an operator's change, by
//! the engine's switch rules (`crate::engine::rules`) and this node's view of the backends'
//! health; and the checked switch state a desired state read from etcd asks for.

use std::time::Duration;

use switcher_common::{BP_ALL, user::Colour};

use super::now_unix;
use crate::{
    config::BackendConfig,
    engine::{
        Maps, Switchboard, edit_pool,
        rules::{self, Ask, Decision, Refused, SwitchState},
    },
    protocol::{Desired, Request, SharedBackend, percent},
};

/// The switch state a desired state asks for, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub active: Colour,
    pub canary_bp: u32,
    pub previous: Option<Colour>,
    pub drain: Option<Duration>,
    /// Blue's and green's shared pools, when shared.
    pub pools: Option<[Vec<BackendConfig>; 2]>,
    /// Written by a rollback.
    pub rollback: bool,
    /// The fleet's shadow share and ceiling, when it sets them.
    pub shadow: Option<(u32, u32)>,
}

/// The state a desired state asks for; a document no switcher wrote is an error, not a panic
/// (its colours were checked when it was parsed).
///
/// # Errors
/// What is wrong with it.
pub fn target(d: &Desired) -> Result<Target, String> {
    if d.canary_bp > BP_ALL {
        return Err(format!("canary_bp {} is above {BP_ALL}", d.canary_bp));
    }
    if let Some(sh) = d.shadow
        && (sh.share_bp > BP_ALL || sh.ceiling == 0)
    {
        return Err(format!("shadow {} basis points at {}/s is not a shadow setting", sh.share_bp, sh.ceiling));
    }
    let pool = |p: &Option<Vec<SharedBackend>>| -> Result<Option<Vec<BackendConfig>>, String> {
        p.as_ref()
            .map(|list| {
                list.iter()
                    .map(|b| {
                        let addr = b.address.parse().map_err(|_| format!("{:?} is not ADDRESS:PORT", b.address))?;
                        if b.weight > 1000 {
                            return Err(format!("{}: weight {} is above 1000", b.address, b.weight));
                        }
                        Ok(BackendConfig { addr, weight: b.weight })
                    })
                    .collect()
            })
            .transpose()
    };
    let pools = match (pool(&d.blue)?, pool(&d.green)?) {
        (Some(b), Some(g)) => Some([b, g]),
        (None, None) => None,
        _ => return Err("a shared state has both pools or neither".into()),
    };
    Ok(Target {
        active: d.active,
        canary_bp: d.canary_bp,
        previous: d.previous,
        drain: d.drain_timeout_secs.map(Duration::from_secs),
        pools,
        rollback: d.rollback,
        shadow: d.shadow.map(|sh| (sh.share_bp, sh.ceiling)),
    })
}

fn shared(pool: &[BackendConfig]) -> Vec<SharedBackend> {
    pool.iter().map(|b| SharedBackend { address: b.addr.to_string(), weight: b.weight }).collect()
}

/// The desired state that describes what `board` does now for `name` (to seed etcd).
pub(super) fn seed<M: Maps>(board: &Switchboard<M>, name: &str, node: &str, share: bool) -> Option<Desired> {
    let (active, canary_bp, previous, config) = board.snapshot(name)?;
    Some(Desired {
        active,
        canary_bp,
        previous,
        drain_timeout_secs: None,
        rollback: false,
        blue: share.then(|| shared(&config.blue)),
        green: share.then(|| shared(&config.green)),
        shadow: None,
        change: "seeded from the first node's state".into(),
        changed_by: node.to_owned(),
        at_unix: now_unix(),
    })
}

/// The next desired state for `req` from `cur` (its `change` says what changed), checked
/// against this node's view of the backends' health; `None` when nothing would change.
///
/// # Errors
/// Why the change is refused.
pub fn plan<M: Maps>(
    board: &Switchboard<M>,
    req: &Request,
    cur: &Desired,
    share: bool,
) -> Result<Option<Desired>, String> {
    let t = target(cur)?;
    let mut next = Desired { drain_timeout_secs: None, rollback: false, ..cur.clone() };
    let now = SwitchState { active: t.active, canary_bp: t.canary_bp, previous: t.previous };
    let (service, ask, force, drain) = match req {
        Request::Cutover { service, colour, drain_timeout_secs, force, .. } => {
            (service, Ask::Cutover(*colour), *force, *drain_timeout_secs)
        }
        Request::Rollback { service, force, .. } => (service, Ask::Rollback, *force, None),
        Request::Weight { service, colour, basis_points, force, .. } => {
            (service, Ask::Weight(*colour, *basis_points), *force, None)
        }
        Request::Shadow { service, share_bp, ceiling, .. } => {
            let ceiling = board.check_shadow(service, *share_bp, *ceiling)?;
            let before = t.shadow.map_or(0, |(bp, _)| bp);
            if t.shadow == Some((*share_bp, ceiling)) {
                return Ok(None);
            }
            next.shadow = Some(crate::protocol::FleetShadow { share_bp: *share_bp, ceiling });
            next.change = format!("shadow {} → {}", percent(before), percent(*share_bp));
            next.at_unix = now_unix();
            return Ok(Some(next));
        }
        _ => return plan_pools(board, req, t, next, share),
    };
    let decision = rules::decide(now, ask).map_err(|e| match e {
        Refused::NothingToRollBack { active } => format!(
            "nothing to roll back: the fleet's {service} has been {active} since its desired state was written; use `switcher cutover {service} COLOUR`"
        ),
        Refused::MoreThanAll(_) => e.to_string(),
    })?;
    let what = match decision {
        Decision::Unchanged => return Ok(None),
        Decision::Switch { to, rollback } => {
            board.check_switch(service, to, rollback, force)?;
            let after = now.then(to, 0);
            (next.active, next.canary_bp, next.previous) = (after.active, after.canary_bp, after.previous);
            next.rollback = rollback;
            if rollback {
                format!("rollback {} → {to}", t.active)
            } else {
                next.drain_timeout_secs = drain;
                format!("cutover {} → {to}", t.active)
            }
        }
        Decision::Canary(canary) if canary == t.canary_bp => return Ok(None),
        Decision::Canary(canary) => {
            board.check_canary(service, t.active, canary, force)?;
            next.canary_bp = canary;
            format!("weight {} {} → {}", t.active.other(), percent(t.canary_bp), percent(canary))
        }
    };
    next.change = what;
    next.at_unix = now_unix();
    Ok(Some(next))
}

/// [`plan`] for a backend added or removed from a shared pool (`share_backends`).
fn plan_pools<M: Maps>(
    board: &Switchboard<M>,
    req: &Request,
    t: Target,
    mut next: Desired,
    share: bool,
) -> Result<Option<Desired>, String> {
    let what = match req {
        Request::BackendAdd { service, colour, address, .. } | Request::BackendRemove { service, colour, address }
            if share =>
        {
            let weight = match req {
                Request::BackendAdd { weight, .. } => Some(weight.unwrap_or(1)),
                _ => None,
            };
            let c = *colour;
            let (_, _, _, config) = board.snapshot(service).ok_or_else(|| format!("unknown service {service:?}"))?;
            let [mut blue, mut green] = t.pools.unwrap_or([config.blue.clone(), config.green.clone()]);
            let pool = if c == Colour::Blue { &mut blue } else { &mut green };
            let live = c == t.active || (t.canary_bp > 0 && c == t.active.other());
            let (addr, _) = edit_pool(&config, c, pool, address, weight, live)?;
            next.blue = Some(shared(&blue));
            next.green = Some(shared(&green));
            match weight {
                Some(w) => format!("backend add {c} {addr} weight {w}"),
                None => format!("backend remove {c} {addr}"),
            }
        }
        _ => return Err("not a change of the fleet's desired state".into()),
    };
    next.change = what;
    next.at_unix = now_unix();
    Ok(Some(next))
}
