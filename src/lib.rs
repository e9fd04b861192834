//! proxsmtpd: an SMTP filtering proxy, a drop-in successor to proxsmtpd 1.10.
//!
//! Module map, one folder per concern:
//! - `protocol`: SMTP without I/O: line framing, replies, commands, the EHLO filter, the
//!   DATA receiver and the wire encoder, the session state machine, the relay core that
//!   ties them together, and PROXY header parsing.
//! - `proxy`: tokio moving bytes: listeners, client connections, the upstream, TLS streams,
//!   socket options and the message transaction.
//! - `filter`: the filter contract (running it, its verdict, the Header setting).
//! - `config`: settings, the proxsmtpd.conf reader and the layered configuration.
//! - `ops`: what operators see: admin server, metrics, traces, logs.
//! - `process`: the process around it all: command line, start-up, privileges, daemon
//!   mode, PID 1, reload, demo, systemd notification, manual pages.
#![forbid(unsafe_code)]

pub mod config;
pub mod filter;
pub mod ops;
pub mod process;
pub mod protocol;
pub mod proxy;
