//! What operators see: the admin server (probes, metrics), Prometheus metrics, traces and
//! logs.
pub mod admin;
pub mod logging;
pub mod metrics;
pub mod telemetry;
