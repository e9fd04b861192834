//! The SMTP protocol, all sans-IO: bytes in, values and actions out. No tokio, no files,
//! no sockets here.
pub mod command;
pub mod data;
pub mod deadline;
pub mod ehlo;
pub mod encode;
pub mod hook;
pub mod line;
pub mod milter;
pub mod proxy_header;
pub mod relay;
pub mod reply;
pub mod session;
#[cfg(test)]
mod test_rng;
