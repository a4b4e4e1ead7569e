//! The switcher agent and its control plane, as a library under the thin `switcher` binary.
//!
//! - [`config`]: the TOML file, parsed and validated into a [`config::Config`];
//! - [`dataplane`]: loads the XDP program, attaches it, and reads and writes its maps;
//! - [`control`]: the JSON-lines protocol of the control socket, and a client for it;
//! - [`daemon`]: the agent: owns the data plane and serves the control socket;
//! - [`fleet`]: fleet mode: the desired state in etcd, followed by every node;
//! - [`flowcount`]: the open flows counted in batches off the request path;
//! - [`limits`]: the agent's connection caps and file-descriptor budget;
//! - [`accounts`]: user and group lookups that never block an async worker.

pub mod accounts;
pub mod agent;
pub mod config;
pub mod dataplane;
pub mod emergency;
pub mod engine;
pub mod fleet;
pub mod flowcount;
pub mod health;
pub mod limits;
pub mod maglev;
pub mod pins;
pub mod protocol;
