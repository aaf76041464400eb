//! Support for the end-to-end tests: real cgroups with real processes in them, and the simulated
//! host (a powercap tree whose counters a driver thread advances from a declared power model fed
//! by the machine's real /proc/stat), reusable by every end-to-end test.

pub use wattd_testkit::cgroups;
pub mod pgcluster;
pub mod simhost;
pub mod tls;
