//! Compute-device resolution: turns `models.device` (`auto` / `cpu` / `cuda`) into the device the
//! generation engine and the embedder run on.
//!
//! - `cpu` always resolves to the CPU.
//! - `cuda` resolves to GPU 0, or fails at startup with the reason (a build without the `cuda`
//!   feature, no driver, no device, or a device older than compute capability 8.0, which our kernels
//!   need).
//! - `auto` resolves to GPU 0 when the build has CUDA and a usable GPU, otherwise to the CPU with ONE
//!   log line saying why (logged on the first resolution only: the embedder and the generation model
//!   both resolve the same setting).
//!
//! A `cuda` build links `libcuda` dynamically (candle's `cuda` feature forces cudarc's
//! `dynamic-linking`), so such a binary does not even start on a host without the driver library;
//! "no driver" here means the library is present but `cuInit` fails (no kernel module, no device
//! node). The decision itself ([`decide`]) is pure and unit-tested for every branch; the probe is
//! the only part that needs a GPU.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Device;

/// Where the models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDevice {
    Cpu,
    /// A CUDA GPU (only ever produced by a `cuda` build whose probe found a usable device).
    Cuda {
        ordinal: usize,
    },
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Outcome of [`decide`]: the device, plus why `auto` fell back to the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) device: ComputeDevice,
    pub(crate) fallback_reason: Option<String>,
}

/// Pure resolution of a setting given what the probe found (`Ok(ordinal)` = a usable GPU,
/// `Err(reason)` = why there is none).
pub(crate) fn decide(setting: Device, probe: Result<usize, String>) -> anyhow::Result<Decision> {
    match (setting, probe) {
        (Device::Cpu, _) => Ok(Decision {
            device: ComputeDevice::Cpu,
            fallback_reason: None,
        }),
        (Device::Cuda | Device::Auto, Ok(ordinal)) => Ok(Decision {
            device: ComputeDevice::Cuda { ordinal },
            fallback_reason: None,
        }),
        (Device::Cuda, Err(why)) => {
            anyhow::bail!("models.device = \"cuda\" (or --device cuda) but {why}; use --device cpu or auto")
        }
        (Device::Auto, Err(why)) => Ok(Decision {
            device: ComputeDevice::Cpu,
            fallback_reason: Some(why),
        }),
    }
}

/// Whether a usable GPU exists: `Ok(ordinal)` or the reason there is none.
#[cfg(not(feature = "cuda"))]
pub(crate) fn probe() -> Result<usize, String> {
    Err("this binary was built without CUDA support (rebuild with `--features cuda`)".into())
}

/// Whether a usable GPU exists: `Ok(ordinal)` or the reason there is none.
#[cfg(feature = "cuda")]
pub(crate) fn probe() -> Result<usize, String> {
    use cudarc::driver::CudaContext;
    let count = CudaContext::device_count().map_err(|e| format!("the CUDA driver is unavailable ({e})"))?;
    if count <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("GPU 0 cannot be opened ({e})"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| format!("GPU 0 does not report its compute capability ({e})"))?;
    if major < 8 {
        return Err(format!(
            "GPU 0 has compute capability {major}.{minor}; the kernels need 8.0 or newer"
        ));
    }
    Ok(0)
}

static LOGGED: AtomicBool = AtomicBool::new(false);

/// Resolves `setting` on this host and logs the choice (and an `auto` fallback's reason) once.
pub fn resolve(setting: Device) -> anyhow::Result<ComputeDevice> {
    let probe = match setting {
        Device::Cpu => Err(String::new()),
        Device::Auto | Device::Cuda => probe(),
    };
    let d = decide(setting, probe)?;
    if !LOGGED.swap(true, Ordering::Relaxed) {
        match &d.fallback_reason {
            Some(why) => tracing::info!("models.device = auto: running on the CPU because {why}"),
            None => tracing::info!(device = %d.device, "compute device selected"),
        }
    }
    Ok(d.device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_covers_every_setting() {
        let gpu = || Ok(0);
        let none = || Err("no GPU here".to_string());
        assert_eq!(decide(Device::Cpu, gpu()).unwrap().device, ComputeDevice::Cpu);
        assert_eq!(
            decide(Device::Cuda, gpu()).unwrap().device,
            ComputeDevice::Cuda { ordinal: 0 }
        );
        assert_eq!(
            decide(Device::Auto, gpu()).unwrap(),
            Decision {
                device: ComputeDevice::Cuda { ordinal: 0 },
                fallback_reason: None
            }
        );
        let auto = decide(Device::Auto, none()).unwrap();
        assert_eq!(auto.device, ComputeDevice::Cpu);
        assert_eq!(auto.fallback_reason.as_deref(), Some("no GPU here"));
        let e = decide(Device::Cuda, none()).unwrap_err().to_string();
        assert!(e.contains("no GPU here") && e.contains("--device cpu"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_build_falls_back_on_auto_and_refuses_cuda() {
        assert_eq!(resolve(Device::Auto).unwrap(), ComputeDevice::Cpu);
        assert_eq!(resolve(Device::Cpu).unwrap(), ComputeDevice::Cpu);
        let e = resolve(Device::Cuda).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
