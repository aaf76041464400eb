//! The one integration-test binary of `wattd-collectors`: tests that need real host objects
//! (cgroups with processes in them) or generated host trees read end to end.

// Helpers outside #[test] functions are test code too: a panic is how they report a failure.
#![allow(clippy::unwrap_used)]

mod amd_smi;
mod cgroup;
mod hwmon;
mod sources;
mod trace;

/// Whether the cgroup trace's count of a run, `traced_us`, is the kernel's, `kernel_us`, as the
/// trace gives it on this kernel: exact (`Ok(false)`), or short by slices it did not see, by less
/// than a millisecond (`Ok(true)`, printed; now and then one run in some hundreds: see
/// ARCHITECTURE.md, the cgroup trace); never over. Tests bound how many may be short.
fn traced_as_kernel(what: &str, traced_us: u64, kernel_us: u64) -> Result<bool, String> {
    if traced_us == kernel_us {
        return Ok(false);
    }
    if traced_us < kernel_us && kernel_us - traced_us < 1_000 {
        eprintln!(
            "{what}: traced {traced_us} us, {} us short of the kernel's {kernel_us}: a slice \
             the trace did not see",
            kernel_us - traced_us
        );
        return Ok(true);
    }
    Err(format!(
        "{what}: traced {traced_us} us, the kernel's {kernel_us}"
    ))
}
