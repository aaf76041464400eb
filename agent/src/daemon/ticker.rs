//! The sampling period's clock: a periodic `timerfd` on `CLOCK_MONOTONIC` that the runtime's
//! reactor waits on like any descriptor.
//!
//! Not tokio's `Interval`: a tokio timer is re-armed from the task after it fires, when the
//! timer wheel is empty, and the wheel then wakes its own driver through an eventfd (a write and
//! one more `epoll_wait` at every tick, measured with `strace` on the idle 100 Hz daemon). A
//! periodic timerfd is armed once; a tick is its descriptor becoming readable and one 8-byte
//! read of how many periods elapsed. A tick read more than a quarter of a period after its
//! expiry (the one before ran long: a seal's fdatasync, a GPU's deadline) re-arms the clock one
//! period from then, as tokio's `MissedTickBehavior::Delay` did: on a fixed grid the interval
//! after it could be any length down to nothing, and a sliver of an interval reads RAPL's
//! counter (updated about every millisecond) as no energy or one update short, which would drag
//! the idle power estimate (the lowest power in its window) down. So no interval but the first
//! after a start is shorter than three quarters of a period; a late tick makes a longer one
//! (the interval's length is measured on the monotonic clock, so either is exact).

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Ticks every period, the first one period after it is made. Needs a tokio runtime with I/O.
#[derive(Debug)]
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
    period: Duration,
    /// When the timer last expired, as far as the reads tell (the grid's last point).
    last_expiry: Instant,
}

fn arm(fd: &OwnedFd, period: Duration) -> io::Result<()> {
    let spec = period
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "period out of range"))?;
    let spec = Itimerspec {
        it_interval: spec,
        it_value: spec,
    };
    timerfd_settime(fd, TimerfdTimerFlags::empty(), &spec)?;
    Ok(())
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
        let armed_at = Instant::now();
        arm(&fd, period)?;
        // SAFETY: the descriptor is owned by the `AsyncFd` it is moved into, which keeps it
        // open and unreplaced until it deregisters it on drop, then closes it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Ticker {
            fd,
            period,
            last_expiry: armed_at,
        })
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
                Ok(Ok(n)) => {
                    // The read took every elapsed period: not readable until the next one, whose
                    // expiry is a new edge for the reactor (even one that came since the read).
                    // Without this the next call reads once in vain before it waits.
                    ready.clear_ready();
                    drop(ready);
                    let now = Instant::now();
                    let expired = self.last_expiry + self.period * u32::try_from(n).unwrap_or(1);
                    // Read late: the next expiry is a period from now, not the grid's next point.
                    if now.saturating_duration_since(expired) > self.period / 4 {
                        arm(self.fd.get_ref(), self.period)?;
                        self.last_expiry = now;
                    } else {
                        self.last_expiry = expired;
                    }
                    return Ok(n);
                }
                Ok(Err(e)) => return Err(e),
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
    fn ticks_a_period_apart_and_a_late_tick_moves_the_next_a_period_on() {
        runtime().block_on(async {
            let period = Duration::from_millis(20);
            let made = Instant::now();
            let mut t = Ticker::new(period).unwrap();
            assert_eq!(t.tick().await.unwrap(), 1);
            let first = made.elapsed();
            assert!(first >= period, "first tick after {first:?}");
            assert_eq!(t.tick().await.unwrap(), 1);
            assert!(made.elapsed() >= period * 2);
            // Busy elsewhere for five and a half periods: one tick, which says so.
            std::thread::sleep(period * 5 + period / 2);
            let missed = t.tick().await.unwrap();
            assert!(missed >= 5, "{missed} periods");
            // Read late: the next tick is at least three quarters of a period on (the grid
            // moved a period from the read, unless the read came within a quarter period of
            // an expiry), never a sliver before the grid's next point.
            let late = Instant::now();
            assert_eq!(t.tick().await.unwrap(), 1);
            let next = late.elapsed();
            assert!(
                next >= period * 3 / 4,
                "the tick after a late one came {next:?} after it"
            );
        });
    }

    #[test]
    fn a_tick_that_ends_just_before_a_grid_point_leaves_no_sliver_of_an_interval() {
        runtime().block_on(async {
            let period = Duration::from_millis(40);
            let mut t = Ticker::new(period).unwrap();
            t.tick().await.unwrap();
            // A tick that runs until just before the grid's next-but-one point.
            std::thread::sleep(period * 2 - period / 8);
            t.tick().await.unwrap();
            let late = Instant::now();
            t.tick().await.unwrap();
            let next = late.elapsed();
            assert!(
                next >= period * 3 / 4,
                "an interval of {next:?} after a late tick (period {period:?})"
            );
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
