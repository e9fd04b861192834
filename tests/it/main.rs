//! The integration tests of proxsmtpd: one test binary (`cargo test --test it`), so that
//! the harness and the tests are compiled and linked once.
//!
//! - `common`: the harness (upstream, client, proxy launcher, metrics, third-party peers).
//! - `fault_support`: the invariant every fault test checks and the helpers to provoke
//!   faults.
//! - one module per theme below; `cargo test --test it relay::` runs one of them.

#[macro_use]
mod common;
mod fault_support;

mod admin;
mod cli;
mod config_layers;
mod container;
mod data;
mod demo;
mod differential;
mod faults;
mod filter;
mod hardening;
mod harness;
mod hook_harness;
mod hooks;
mod hostile_peers;
mod limits;
mod local_failure;
mod man;
mod metrics;
mod milter;
mod milter_proxy;
mod operations;
mod pid1;
mod pipelining;
mod proxy_protocol;
mod real_milters;
mod real_peers;
mod relay;
mod reload;
mod scanners;
mod sd_notify;
mod shadow;
mod shutdown;
mod soak;
mod telemetry;
mod tls;
mod transparent;
mod upstream;
