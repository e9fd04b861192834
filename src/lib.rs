//! proxsmtpd: an SMTP filtering proxy, a drop-in successor to proxsmtpd 1.10.
//!
//! Layout:
//! - `smtp`: the protocol pieces, sans-IO (line framing, replies, commands, EHLO filter,
//!   the DATA receiver and the wire encoder).
//! - `session`: the per-connection relay state machine, sans-IO.
//! - `filter`: the filter contract (running it, its verdict, the Header setting).
//! - `proxy`: tokio moving bytes: listener, upstream connection, relay, message transaction.
//! - `config`: settings, the proxsmtpd.conf reader and the layered configuration.
//! - `tls`: certificates (reloaded when they change) and TLS configurations for both sides.
//! - `admin`, `metrics`, `telemetry`, `logging`: what operators see; `man`: the manual pages.
//! - `app`, `cli`, `daemon`, `init`, `privileges`, `sd_notify`, `sockopt`: the process around
//!   it all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod filter;
pub mod init;
pub mod logging;
pub mod man;
pub mod metrics;
pub mod privileges;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod sd_notify;
pub mod session;
pub mod smtp;
pub mod sockopt;
pub mod telemetry;
pub mod tls;
