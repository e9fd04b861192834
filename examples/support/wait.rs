//! A wait of a set mean, fixed or spread evenly around it: the benchmark's stand-in for a
//! filter that takes its time (`null_hook --delay-ms`, `byte_relay --hold-dot-ms`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long each wait lasts.
#[derive(Clone, Copy, Default)]
pub struct Wait {
    pub delay: Duration,
    pub jitter: Duration,
}

impl Wait {
    /// `delay`, moved by up to `jitter` either way (uniformly, from a xorshift generator:
    /// the figures need a spread, not good randomness).
    pub fn next(self) -> Duration {
        static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
        if self.jitter.is_zero() {
            return self.delay;
        }
        let mut x = STATE.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::Relaxed);
        let span = 2 * self.jitter.as_micros() as u64 + 1;
        self.delay - self.jitter + Duration::from_micros(x % span)
    }
}

/// Milliseconds from the command line, for `flag`'s error message.
pub fn millis(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse()
        .map(Duration::from_millis)
        .map_err(|e| format!("{flag} {value}: {e}"))
}
