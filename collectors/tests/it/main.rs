//! The one integration-test binary of `wattd-collectors`: tests that need real host objects
//! (cgroups with processes in them) or generated host trees read end to end.

mod cgroup;
