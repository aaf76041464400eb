//! The sampling period's clock: a periodic `timerfd` on `CLOCK_MONOTONIC` that the runtime's
//! reactor waits on like any descriptor.
//!
//! Not tokio's `Interval`: a tokio timer is re-armed from the task after it fires, when the
//! timer wheel is empty, and the wheel then wakes its own driver through an eventfd (a write and
//! one more `epoll_wait` at every tick, measured with `strace` on the idle 100 Hz daemon). A
//! periodic timerfd is armed once; a tick is its descriptor becoming readable and one 8-byte
//! read of how many periods elapsed. Periods missed while a tick ran long are one tick (the
//! interval's length is measured on the monotonic clock, so a long interval is exact), and the
//! grid stays where it was.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Ticks every period, the first one period after it is made. Needs a tokio runtime with I/O.
#[derive(Debug)]
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
}

impl Ticker {
    pub fn new(period: Duration) -> io::Result<Ticker> {
        if period.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a sampling period of zero",
            ));
        }
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        let spec = period
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "period out of range"))?;
        let spec = Itimerspec {
            it_interval: spec,
            it_value: spec,
        };
        timerfd_settime(&fd, TimerfdTimerFlags::empty(), &spec)?;
        // SAFETY: the descriptor is owned by the `AsyncFd` it is moved into, which keeps it
        // open and unreplaced until it deregisters it on drop, then closes it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Ticker { fd })
    }

    /// Waits for the next tick; gives how many periods elapsed since the last one (more than 1
    /// when a tick ran late). Cancel-safe: a tick is consumed only by the call that returns it.
    pub async fn tick(&mut self) -> io::Result<u64> {
        loop {
            let mut ready = self.fd.readable().await?;
            let read = ready.try_io(|fd| {
                let mut buf = [0u8; 8];
                let n = rustix::io::read(fd.get_ref(), &mut buf)?;
                if n != buf.len() {
                    return Err(io::Error::other(format!(
                        "timerfd read gave {n} bytes, not 8"
                    )));
                }
                Ok(u64::from_ne_bytes(buf))
            });
            match read {
                Ok(r) => {
                    // The read took every elapsed period: not readable until the next one, whose
                    // expiry is a new edge for the reactor (even one that came since the read).
                    // Without this the next call reads once in vain before it waits.
                    ready.clear_ready();
                    return r;
                }
                // Not readable after all: readiness is cleared, wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    }

    #[test]
    fn ticks_a_period_apart_and_a_late_tick_reports_the_periods_it_missed() {
        runtime().block_on(async {
            let period = Duration::from_millis(20);
            let made = Instant::now();
            let mut t = Ticker::new(period).unwrap();
            assert_eq!(t.tick().await.unwrap(), 1);
            let first = made.elapsed();
            assert!(first >= period, "first tick after {first:?}");
            assert_eq!(t.tick().await.unwrap(), 1);
            assert!(made.elapsed() >= period * 2);
            // Busy elsewhere for five periods: one tick, and it says so.
            std::thread::sleep(period * 5 + period / 2);
            let missed = t.tick().await.unwrap();
            assert!((5..=6).contains(&missed), "{missed} periods");
            // Then on the same grid, a period at a time.
            assert_eq!(t.tick().await.unwrap(), 1);
            assert!(made.elapsed() >= period * 7);
        });
    }

    #[test]
    fn a_tick_dropped_unfinished_is_not_consumed() {
        runtime().block_on(async {
            let period = Duration::from_millis(10);
            let mut t = Ticker::new(period).unwrap();
            // A select that another branch wins first: the tick's future is dropped.
            tokio::select! {
                biased;
                _ = std::future::ready(()) => {}
                _ = t.tick() => panic!("the ready branch is polled first"),
            }
            std::thread::sleep(period * 3);
            assert!(t.tick().await.unwrap() >= 3);
        });
    }

    #[test]
    fn a_zero_period_is_refused() {
        runtime().block_on(async {
            let e = Ticker::new(Duration::ZERO).unwrap_err();
            assert!(e.to_string().contains("zero"), "{e}");
        });
    }
}
