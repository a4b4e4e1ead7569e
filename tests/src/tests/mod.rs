//! Privileged tests: the XDP program on crafted packets (T1) and in namespaces (T2). Each
//! skips with a message when not run as root.

mod agent;
mod direct;
mod e2e;
mod fleet;
mod fleet_rollout;
mod hostile;
mod inspect;
mod observability;
mod package;
mod production;
mod prog_test_run;
mod reliability;
mod rollout;
mod scale;
mod shadow;
