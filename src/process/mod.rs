//! The process around the proxy: command line, start-up and privileges, daemon mode and
//! PID file, PID 1 duties, the demo, systemd notification and the
//! manual pages.
pub mod app;
pub mod cli;
pub mod daemon;
pub mod demo;
pub mod init;
pub mod man;
pub mod privileges;
pub mod sd_notify;
