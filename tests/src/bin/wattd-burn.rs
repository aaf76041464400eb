//! A duty-cycled CPU burner for the end-to-end tests: `wattd-burn DUTY SECONDS` keeps one CPU
//! busy for DUTY (0..=1) of every 10 ms period for SECONDS, then exits.

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(duty), Some(secs)) = (
        args.get(1).and_then(|s| s.parse::<f64>().ok()),
        args.get(2).and_then(|s| s.parse::<f64>().ok()),
    ) else {
        eprintln!("usage: wattd-burn DUTY SECONDS");
        std::process::exit(64);
    };
    let duty = duty.clamp(0.0, 1.0);
    let period = Duration::from_millis(10);
    let end = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
    let mut x: u64 = 1;
    while Instant::now() < end {
        let start = Instant::now();
        let busy = period.mul_f64(duty);
        while start.elapsed() < busy {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            std::hint::black_box(x);
        }
        let rest = period.saturating_sub(start.elapsed());
        if !rest.is_zero() {
            std::thread::sleep(rest);
        }
    }
}
