//! NVIDIA GPUs as the PCI bus lists them, whatever NVML says: the check that a GPU the host has
//! is a GPU wattd measures. A GPU that is present and bound to the `nvidia` driver but that NVML
//! cannot open (no permission on `/dev/nvidia*` under the service's device policy, a library
//! missing, a driver mismatch) would otherwise leave its energy unbilled with nothing but an
//! info line to say so.

use std::path::Path;

use serde::Serialize;

use crate::hostfs::{read_bounded, HostRoot};

/// PCI vendor id of NVIDIA.
const NVIDIA_VENDOR: &str = "0x10de";
/// PCI vendor id of AMD (ATI).
const AMD_VENDOR: &str = "0x1002";
/// Most entries of `/sys/bus/pci/devices` looked at (a bound on hostile trees; real hosts have
/// a few hundred functions at most).
const PCI_FUNCTIONS_MAX: usize = 4096;
/// Largest `vendor` or `class` attribute read.
const ATTR_MAX: usize = 64;

/// One NVIDIA display or 3D controller on the PCI bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PciGpu {
    /// The PCI address, as the directory is named (`0000:17:00.0`).
    pub address: String,
    /// The kernel driver bound to it (`nvidia`, `vfio-pci`, `nouveau`), `None` when unbound.
    pub driver: Option<String>,
}

impl PciGpu {
    /// Bound to NVIDIA's own driver, so NVML should see it.
    pub fn is_nvidia_bound(&self) -> bool {
        self.driver.as_deref() == Some("nvidia")
    }

    /// Bound to its vendor's driver (`nvidia`, `amdgpu`), so the vendor's library should see it.
    pub fn is_vendor_bound(&self) -> bool {
        matches!(self.driver.as_deref(), Some("nvidia" | "amdgpu"))
    }
}

/// The AMD GPUs under `sys/bus/pci/devices` of `root`: display controllers (class 0x03xx: an
/// APU's integrated GPU included) and processing accelerators (0x12xx, as the MI300 series
/// reports itself), SR-IOV virtual functions left out, sorted by address.
pub fn amd_gpus(root: &HostRoot) -> Vec<PciGpu> {
    pci_functions(root, |dev| {
        attr(dev, "vendor") == AMD_VENDOR && {
            let class = attr(dev, "class");
            class.starts_with("0x03") || class.starts_with("0x12")
        }
    })
}

/// The NVIDIA GPUs under `sys/bus/pci/devices` of `root` (class 0x0300 VGA or 0x0302 3D
/// controller; NVSwitches, audio functions and SR-IOV virtual functions are left out), sorted
/// by address. A tree without
/// the directory has none; unreadable entries are skipped.
pub fn nvidia_gpus(root: &HostRoot) -> Vec<PciGpu> {
    pci_functions(root, is_nvidia_gpu)
}

/// The physical functions under `sys/bus/pci/devices` that `is_gpu` accepts, with their driver.
fn pci_functions(root: &HostRoot, is_gpu: impl Fn(&Path) -> bool) -> Vec<PciGpu> {
    let dir = root.join("sys/bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.take(PCI_FUNCTIONS_MAX).flatten() {
        let Some(address) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let path = entry.path();
        // An SR-IOV virtual function (vGPU hosts) is a slice of a physical GPU that NVML
        // lists, not a GPU of its own.
        if is_gpu(&path) && !path.join("physfn").exists() {
            out.push(PciGpu {
                address,
                driver: bound_driver(&path),
            });
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

fn is_nvidia_gpu(dev: &Path) -> bool {
    attr(dev, "vendor") == NVIDIA_VENDOR && {
        let class = attr(dev, "class");
        class.starts_with("0x0300") || class.starts_with("0x0302")
    }
}

/// A PCI function's small attribute (`vendor`, `class`), trimmed and lower-case; empty when
/// unreadable.
fn attr(dev: &Path, name: &str) -> String {
    read_bounded(&dev.join(name), ATTR_MAX, "PCI device attribute")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn bound_driver(dev: &Path) -> Option<String> {
    let target = std::fs::read_link(dev.join("driver")).ok()?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(root: &Path, addr: &str, vendor: &str, class: &str, driver: Option<&str>) {
        let dev = root.join("sys/bus/pci/devices").join(addr);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(dev.join("class"), format!("{class}\n")).unwrap();
        if let Some(d) = driver {
            let drv = root.join("sys/bus/pci/drivers").join(d);
            std::fs::create_dir_all(&drv).unwrap();
            std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{d}"), dev.join("driver"))
                .unwrap();
        }
    }

    /// Address, driver and whether the vendor's library should see it, of each GPU found.
    fn listed(found: &[PciGpu]) -> Vec<(&str, Option<&str>, bool)> {
        found
            .iter()
            .map(|g| (&*g.address, g.driver.as_deref(), g.is_vendor_bound()))
            .collect()
    }

    #[test]
    fn finds_amd_display_controllers_and_accelerators_with_their_driver() {
        let t = tempfile::tempdir().unwrap();
        // An MI300X (processing accelerator), an APU's integrated GPU, its audio function, an
        // NVIDIA GPU, an SR-IOV virtual function.
        function(
            t.path(),
            "0000:c1:00.0",
            "0x1002",
            "0x120000",
            Some("amdgpu"),
        );
        function(
            t.path(),
            "0000:05:00.0",
            "0x1002",
            "0x030000",
            Some("amdgpu"),
        );
        function(
            t.path(),
            "0000:05:00.1",
            "0x1002",
            "0x040300",
            Some("snd_hda_intel"),
        );
        function(
            t.path(),
            "0000:17:00.0",
            "0x10de",
            "0x030200",
            Some("nvidia"),
        );
        function(t.path(), "0000:c1:02.0", "0x1002", "0x120000", None);
        std::fs::write(t.path().join("sys/bus/pci/devices/0000:c1:02.0/physfn"), "").unwrap();
        assert_eq!(
            listed(&amd_gpus(&HostRoot::new(t.path()))),
            vec![
                ("0000:05:00.0", Some("amdgpu"), true),
                ("0000:c1:00.0", Some("amdgpu"), true)
            ]
        );
    }

    #[test]
    fn finds_nvidia_display_and_3d_controllers_with_their_driver() {
        let t = tempfile::tempdir().unwrap();
        function(
            t.path(),
            "0000:17:00.0",
            "0x10de",
            "0x030200",
            Some("nvidia"),
        );
        function(t.path(), "0000:03:00.0", "0x10de", "0x030000", None);
        function(
            t.path(),
            "0000:65:00.0",
            "0x10de",
            "0x030200",
            Some("vfio-pci"),
        );
        // An NVSwitch (bridge), a GPU's audio function, an Intel GPU, a NIC: none of them.
        function(
            t.path(),
            "0000:c1:00.0",
            "0x10de",
            "0x068000",
            Some("nvidia"),
        );
        function(t.path(), "0000:17:00.1", "0x10de", "0x040300", None);
        function(t.path(), "0000:00:02.0", "0x8086", "0x030000", Some("i915"));
        function(
            t.path(),
            "0000:5e:00.0",
            "0x15b3",
            "0x020000",
            Some("mlx5_core"),
        );
        // A virtual function of the first GPU (vGPU host), bound to nvidia too.
        function(
            t.path(),
            "0000:17:00.4",
            "0x10de",
            "0x030200",
            Some("nvidia"),
        );
        std::os::unix::fs::symlink(
            "../0000:17:00.0",
            t.path().join("sys/bus/pci/devices/0000:17:00.4/physfn"),
        )
        .unwrap();
        let found = nvidia_gpus(&HostRoot::new(t.path()));
        assert!(found
            .iter()
            .all(|g| g.is_nvidia_bound() == g.is_vendor_bound()));
        assert_eq!(
            listed(&found),
            vec![
                ("0000:03:00.0", None, false),
                ("0000:17:00.0", Some("nvidia"), true),
                ("0000:65:00.0", Some("vfio-pci"), false),
            ]
        );
    }

    #[test]
    fn a_tree_without_a_pci_bus_and_garbage_attributes_give_none() {
        let t = tempfile::tempdir().unwrap();
        assert!(nvidia_gpus(&HostRoot::new(t.path())).is_empty());
        let dev = t.path().join("sys/bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vendor"), vec![0xffu8; 10_000]).unwrap();
        std::fs::write(dev.join("class"), "0x030200").unwrap();
        assert!(nvidia_gpus(&HostRoot::new(t.path())).is_empty());
    }
}
