//! How long a client may take to send a message body.
//!
//! A per-read timeout lets a client that sends one byte every `TimeOut - 1` seconds hold a
//! session for ever. As Postfix's `smtpd_min_data_rate`, the DATA phase instead has one
//! deadline, `TimeOut` from its start, which every read moves on by the time its bytes
//! earn at the minimum rate (`MinDataRate` bytes per second), but never further than
//! `TimeOut` ahead: an honest link slower than the rate still gets `TimeOut` plus the credit
//! of what it sent, and a client that stops sending is cut off after `TimeOut`.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct DataDeadline {
    due: Instant,
    timeout: Duration,
    /// Bytes per second; 0 turns the rate off (every read earns a whole `timeout`).
    min_rate: u64,
}

impl DataDeadline {
    pub fn new(now: Instant, timeout: Duration, min_rate: u64) -> DataDeadline {
        DataDeadline {
            due: now + timeout,
            timeout,
            min_rate,
        }
    }

    /// When the client must have sent more (or its terminating dot).
    pub fn due(&self) -> Instant {
        self.due
    }

    /// `bytes` arrived at `now`.
    pub fn received(&mut self, now: Instant, bytes: usize) {
        let credit = if self.min_rate == 0 {
            self.timeout
        } else {
            Duration::from_secs_f64(bytes as f64 / self.min_rate as f64)
        };
        self.due = (self.due + credit).min(now + self.timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// (seconds after start, bytes read then, seconds left after that read)
    type Read = (f64, usize, f64);

    #[test]
    fn deadline_follows_the_minimum_rate() {
        let t0 = Instant::now();
        let cases: &[(u64, &[Read])] = &[
            // A fast client stays TimeOut ahead.
            (500, &[(0.1, 100_000, 10.0), (0.2, 100_000, 10.0)]),
            // One byte every 9 s: each read earns 2 ms, so the deadline barely moves.
            (500, &[(9.0, 1, 1.002), (10.0, 1, 0.004)]),
            // 250 bytes a second against 500: half a second lost every second.
            (500, &[(1.0, 250, 9.5), (2.0, 250, 9.0), (3.0, 250, 8.5)]),
            // Rate off: every read restarts TimeOut (the per-read timeout).
            (0, &[(9.0, 1, 10.0), (18.0, 1, 10.0)]),
        ];
        for (rate, reads) in cases {
            let mut d = DataDeadline::new(t0, secs(10.0), *rate);
            for &(at, bytes, left) in *reads {
                let now = t0 + secs(at);
                d.received(now, bytes);
                let got = d.due().duration_since(now).as_secs_f64();
                assert!(
                    (got - left).abs() < 1e-6,
                    "rate {rate} at {at}: {got} != {left}"
                );
            }
        }
    }
}
