//! Tokio moving bytes: the listeners, client connections, the upstream, TLS streams, socket
//! options, the message transaction and the milter client.
pub mod conn;
pub mod connection;
pub mod hook;
pub mod io;
pub mod milter;
pub mod observe;
pub mod proxy_header;
pub mod server;
pub mod signal;
pub mod sockopt;
pub mod tls;
pub mod transaction;
pub mod upstream;
