//! The SMTP protocol pieces, all sans-IO: bytes in, values out.
pub mod command;
pub mod data;
pub mod deadline;
pub mod ehlo;
pub mod encode;
pub mod line;
pub mod reply;
#[cfg(test)]
mod test_rng;
