//! The content filter: running FilterCommand, reading its verdict, and the Header line.
//!
//! - `run`: starts the filter process (pipe or file mode), enforces FilterTimeout, and
//!   makes sure nothing it started outlives it.
//! - `orphans`: reaps, or kills, what a filter leaves running outside its process group.
//! - `verdict`: turns the exit status and last stderr line into deliver, reply or error.
//! - `header`: expands the Header template.
//! - `check`: whether FilterCommand can run at all (readiness).
pub mod check;
pub mod header;
pub mod orphans;
pub mod run;
pub mod verdict;
