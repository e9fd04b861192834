//! The proxy: accepting clients, connecting upstream, relaying and the message transaction.
pub mod connection;
pub mod io;
pub mod observe;
pub mod server;
pub mod transaction;
pub mod upstream;
