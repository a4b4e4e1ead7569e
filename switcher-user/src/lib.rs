//! The switcher agent and its control plane, as a library under the thin `switcher` binary.
//! Its layers run one way, bottom to top (a unit test in `layers.rs` checks every import):
//!
//! 0. [`protocol`]: the typed wire types of the control socket and of the fleet's etcd
//!    documents, and the blocking client; with the leaf helpers [`accounts`] (user and group
//!    lookups that never block an async worker), [`limits`] (connection caps, descriptor
//!    budget), [`pins`] (the pinned paths), [`shadow`] (shadow traffic's shares and refusals)
//!    and [`steps`] (a rollout's plan) — none imports
//!    anything of the crate;
//! 1. [`config`]: the TOML file, parsed and validated into a [`config::Config`];
//! 2. [`dataplane`] (loads and attaches the XDP program, reads and writes its maps),
//!    [`maglev`], [`flowcount`] (open flows counted in batches off the request path),
//!    [`flowlist`] (`switcher flows`: open flows listed or summed, bounded),
//!    [`emergency`] (the CLI's path when no daemon runs) and [`health`] (backend probes);
//! 3. [`engine`]: the switch rules, once, and the switchboard in front of the maps, with one
//!    owner reached over a channel;
//! 4. [`fleet`]: fleet mode: the desired state in etcd, followed by every node;
//! 5. [`agent`]: `switcher daemon`: the control socket, health rounds, metrics, reload.
//!
//! The CLI (`src/cli`, in the binary) is on top.

pub mod accounts;
pub mod agent;
pub mod config;
pub mod dataplane;
pub mod emergency;
pub mod engine;
pub mod fleet;
pub mod flowcount;
pub mod flowlist;
pub mod flowtable;
pub mod health;
#[cfg(test)]
mod layers;
pub mod limits;
pub mod maglev;
pub mod pins;
pub mod protocol;
pub mod shadow;
pub mod slab;
pub mod steps;
