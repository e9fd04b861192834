//! The fault matrix: the client, the filter, the spool and the upstream misbehave; every
//! case ends with `fault_support::Watch::check`.

mod client;
mod filter;
mod slow_spool;
mod spool;
mod upstream;
