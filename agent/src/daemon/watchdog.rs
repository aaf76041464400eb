//! systemd's watchdog keep-alive (`WatchdogSec=`, given to the process as `WATCHDOG_USEC` and
//! `WATCHDOG_PID`): sent after a tick once a quarter of the period, or a second if that is
//! shorter, has passed since the last one.
//!
//! Each `sd_notify` message is a new datagram socket, a connect, a send and a close. Sent at
//! every tick (as before), that was four system calls a tick under systemd, a hundred times a
//! second at 100 Hz, for a watchdog of 30 s; systemd advises one message per half period. A
//! quarter leaves a tick's lateness of room; a second at most, because the period is read
//! once at start, and a `WatchdogSec=` lowered by a `daemon-reload` applies to the running
//! service, so a keep-alive every second keeps a healthy agent alive down to a watchdog of about
//! two seconds (100 times fewer messages than every tick at 100 Hz). Without a watchdog (or one
//! meant for another process) nothing is sent.

use std::time::{Duration, Instant};

/// When the next keep-alive is due.
#[derive(Debug)]
pub struct Watchdog {
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    /// From the environment systemd gives the main process.
    pub fn from_env() -> Watchdog {
        let mut usec = 0;
        let on = sd_notify::watchdog_enabled(false, &mut usec) && usec > 0;
        Watchdog::every(on.then(|| (Duration::from_micros(usec) / 4).min(Duration::from_secs(1))))
    }

    /// Keep-alives `every` so often, or never.
    pub fn every(every: Option<Duration>) -> Watchdog {
        Watchdog { every, last: None }
    }

    /// Whether a keep-alive is due at `now`; if so, it counts as sent.
    pub fn due(&mut self, now: Instant) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// A tick closed: tells systemd the loop is alive, when due.
    pub fn tick_closed(&mut self, now: Instant) {
        if self.due(now) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_keep_alive_per_period_and_the_first_at_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = Watchdog::every(Some(ms(100)));
        // Ticks every 10 ms for a second: the first tick, then one every 100 ms.
        let sent: Vec<u64> = (0..100u64)
            .filter(|i| w.due(t0 + ms(10 * i)))
            .map(|i| 10 * i)
            .collect();
        assert_eq!(sent, vec![0, 100, 200, 300, 400, 500, 600, 700, 800, 900]);
        // Ticks slower than the period: every one of them.
        let mut w = Watchdog::every(Some(ms(100)));
        assert!((0..5u64).all(|i| w.due(t0 + ms(250 * i))));
    }

    #[test]
    fn without_a_watchdog_nothing_is_due() {
        let mut w = Watchdog::every(None);
        let t0 = Instant::now();
        assert!((0..10u64).all(|i| !w.due(t0 + Duration::from_secs(i))));
    }
}
